//! Stable Diffusion networks and the checkpoint loader they share.
//!
//! `checkpoint` opens weights in every supported layout; each network module owns the mapping
//! from its diffusers/HF tensor names to the original LDM names (spec Appendix A).

pub mod checkpoint;
pub mod clip;
pub mod text_encoders;

pub use checkpoint::{Checkpoint, Component, ModelFamily};
