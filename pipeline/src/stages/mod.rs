//! One module per tool: each exposes its options and a `run` function that the tool's `main`
//! calls. `merge_sidecars` serves both merge-captions and merge-tags.

pub mod cache_text_encoder;
pub mod caption_images;
pub mod clean_captions;
pub mod lint_dataset;
pub mod lora_tools;
pub mod merge_shards;
pub mod merge_sidecars;
pub mod prepare_dataset;
pub mod prepare_latents;
pub mod tag_images;
pub mod train_lora;
