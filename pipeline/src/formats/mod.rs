//! Every file format the stages exchange, with its schema id: metadata JSON, manifests, npz
//! caches, the text-encoder cache file, the tag-probability store and model families.

pub mod manifest;
pub mod metadata;
pub mod model_family;
pub mod npz;
pub mod schema;
pub mod tag_store;
pub mod te_cache;
pub mod tfevents;
