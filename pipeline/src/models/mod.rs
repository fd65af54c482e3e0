//! Stable Diffusion networks (candle) and the checkpoint loader they share.
//!
//! `checkpoint` opens weights in every supported layout; each network module owns the mapping
//! from its diffusers/HF tensor names to the original LDM names (spec Appendix A).

pub mod attention;
pub mod blip;
pub mod checkpoint;
pub mod clip;
pub mod conv;
pub mod frozen;
pub mod text_encoders;
pub mod unet;
pub mod vae;
pub mod winograd;

pub use checkpoint::{Checkpoint, Component, ModelFamily};
