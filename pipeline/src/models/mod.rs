//! Neural networks and the checkpoint loader they share.
//!
//! `checkpoint` opens Stable Diffusion weights in every supported layout; each network module
//! owns the mapping from its diffusers/HF tensor names to the original LDM names (spec Appendix
//! A). `blip` is the BLIP image captioner.

pub mod blip;
pub mod checkpoint;
pub mod clip;
pub mod text_encoders;

pub use checkpoint::{Checkpoint, Component, ModelFamily};
