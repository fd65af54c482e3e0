//! sd-scripts' dataset forms, described once (docs/kohya-compat.md#dataset-forms):
//! DreamBooth folders `N_name/` (+ regularisation folders), fine-tune metadata, and
//! `--dataset_config` TOML with datasets and subsets.
//!
//! [`config::describe`] turns a command line (and config file) into a [`config::Description`];
//! [`register::resolve`] turns that into images with captions, repeats, sizes and buckets as
//! sd-scripts' `DatasetGroup` holds them after `make_buckets()`.

pub mod config;
pub mod register;

pub use config::{
    describe, CommandLine, Dataset, DatasetKind, Description, DescriptionSource, Subset,
    SubsetSource,
};
pub use register::{
    resolve, Bucket, BucketInfo, DirInfo, DirList, Image, RegisteredSubset, ResolvedDataset,
    ResolvedGroup, SubsetDirName, TagFrequency,
};
