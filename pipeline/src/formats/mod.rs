//! Every file format the stages exchange, with its schema id: metadata JSON, manifests, npz
//! caches, the latent and text-encoder cache files, the tag-probability store and model
//! families.

pub mod bookkeeping;
pub mod latent_cache;
pub mod manifest;
pub mod metadata;
pub mod model_family;
pub mod npz;
pub mod schema;
pub mod tag_store;
pub mod te_cache;
pub mod tfevents;
