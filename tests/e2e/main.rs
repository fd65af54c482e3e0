//! End-to-end tests: they drive the built lorakit executables (and `make`) on the bundled
//! fixtures, one module per tool or flow, in one test binary.

#[macro_use]
mod common;

mod bad_inputs;
mod caption;
mod coexist;
mod command_lines;
mod crash_safety;
mod data_parallel;
mod dylora;
mod fuzz;
mod generate_images;
mod latents;
mod lint;
mod lora_tools;
mod lycoris;
mod make_flow;
mod metadata;
mod prepare_dataset;
mod samples;
mod scheduled_prepare;
mod sd2;
mod sdxl;
mod sharding;
mod tag_images;
mod te_lora;
mod text_encoder;
mod train_lora;
mod web_ui;
