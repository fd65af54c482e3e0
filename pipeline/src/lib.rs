//! lorakit pipeline: the shared library behind every lorakit tool.
//!
//! Each executable under `tools/` parses its sd-scripts-style arguments and calls one `run`
//! function here. Formats (metadata JSON, manifests, caches), image handling, models and training
//! all live in this crate so that every format has exactly one implementation.

pub mod bucket;
pub mod caption;
pub mod caption_text;
pub mod clean;
pub mod cli;
pub mod dataset;
pub mod error;
pub mod fsio;
pub mod hashing;
pub mod imaging;
pub mod latents;
pub mod lint;
pub mod lora;
pub mod manifest;
pub mod merge;
pub mod metadata;
pub mod models;
pub mod npz;
pub mod report;
pub mod schema;
pub mod shard;
pub mod sidecar;
pub mod tagger;
pub mod te_cache;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
