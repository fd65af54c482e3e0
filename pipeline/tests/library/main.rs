//! Library-level tests that need the whole crate: text-encoder and UNet/LoRA goldens, training
//! maths, and the tier check of docs/design.md; one test binary.

mod support;

mod dylora;
mod generate_images;
mod kohya_datasets;
mod lycoris;
mod optimizers;
mod samplers;
mod sdxl_unet;
mod text_encoder_golden;
mod tiers;
mod train;
mod unet_lora;
