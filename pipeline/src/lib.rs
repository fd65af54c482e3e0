//! lorakit pipeline: the shared library behind every lorakit tool.
//!
//! Each executable under `tools/` parses its sd-scripts-style arguments and calls one `run`
//! function here. The modules are tiers, each using only the tiers listed before it (checked by
//! `tests/library/tiers.rs`; the picture is in `docs/design.md`):
//!
//! 1. [`infra`]: errors, atomic file I/O, hashing, Python-style JSON, run reports and progress;
//! 2. [`dataset`] and [`text`]: image discovery, sidecar files, shards, buckets and imaging;
//!    tokenizer, caption assembly and cleaning rules;
//! 3. [`formats`]: every file format and schema id (metadata JSON, manifests, npz caches, the
//!    text-encoder cache file, the tag-probability store, model families);
//! 4. [`models`]: kernels, frozen-weight ops and the networks of the real architectures;
//! 5. [`networks`]: trainable add-on networks (LoRA);
//! 6. [`stages`]: one module per tool (`Options` and `run`);
//! 7. [`cli`]: clap argument groups shared by the tools, and each long flag list with its
//!    conversion into stage options.

pub mod infra;

pub mod dataset;
pub mod text;

pub mod formats;

pub mod models;

pub mod networks;

pub mod stages;

pub mod cli;

pub use infra::error::{Error, Result};
