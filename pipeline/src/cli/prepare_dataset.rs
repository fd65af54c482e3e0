//! The dataset options of sd-scripts' `train_network.py` (its spellings and defaults), their
//! conversion into a [`CommandLine`], and the flags of `prepare-dataset`.

use std::path::PathBuf;

use crate::dataset::kohya::CommandLine;
use crate::infra::report::Summary;
use crate::stages::prepare_dataset::{self, PrepareDatasetOptions};
use crate::{Error, Result};

/// The dataset options of `train_network.py`, spelled and defaulted as sd-scripts does.
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct DatasetArgs {
    /// Folder of `<repeats>_<class tokens>` subfolders (DreamBooth), or of the images of --in_json.
    #[arg(long)]
    pub train_data_dir: Option<PathBuf>,
    /// Folder of `<repeats>_<class tokens>` subfolders of regularisation images.
    #[arg(long)]
    pub reg_data_dir: Option<PathBuf>,
    /// Fine-tune metadata JSON (`caption`, `tags`, `image_size` per image) over --train_data_dir.
    #[arg(long)]
    pub in_json: Option<PathBuf>,
    /// Dataset config (.toml or .json) with [general], [[datasets]] and [[datasets.subsets]];
    /// its values win over the command line's.
    #[arg(long)]
    pub dataset_config: Option<PathBuf>,
    /// Training resolution "W,H" or "SIZE".
    #[arg(long)]
    pub resolution: Option<String>,
    /// Images per batch.
    #[arg(long, default_value_t = 1)]
    pub train_batch_size: i64,
    /// Aspect-ratio buckets.
    #[arg(long)]
    pub enable_bucket: bool,
    /// Smallest bucket side.
    #[arg(long, default_value_t = 256)]
    pub min_bucket_reso: i64,
    /// Largest bucket side.
    #[arg(long, default_value_t = 1024)]
    pub max_bucket_reso: i64,
    /// Bucket sides are multiples of this.
    #[arg(long, default_value_t = 64)]
    pub bucket_reso_steps: i64,
    /// Never enlarge images: buckets follow the image sizes.
    #[arg(long)]
    pub bucket_no_upscale: bool,
    /// Loss weight of regularisation images (recorded for training).
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Repeats of the --in_json subset.
    #[arg(long, default_value_t = 1)]
    pub dataset_repeats: i64,
    /// Extension of caption files beside DreamBooth images.
    #[arg(long, default_value = ".caption", alias = "caption_extention")]
    pub caption_extension: String,
    /// What captions are split on for shuffling, keep_tokens and tag dropout.
    #[arg(long, default_value = ",")]
    pub caption_separator: String,
    /// Shuffle the caption's pieces at every step.
    #[arg(long)]
    pub shuffle_caption: bool,
    /// Leading caption pieces that never move.
    #[arg(long, default_value_t = 0)]
    pub keep_tokens: i64,
    /// Separator marking the end of the kept pieces.
    #[arg(long, default_value = "")]
    pub keep_tokens_separator: String,
    /// Separator of pieces shuffled as one.
    #[arg(long)]
    pub secondary_separator: Option<String>,
    /// `{a|b}` wildcards and multi-line captions.
    #[arg(long)]
    pub enable_wildcard: bool,
    /// Text put before every caption.
    #[arg(long)]
    pub caption_prefix: Option<String>,
    /// Text put after every caption.
    #[arg(long)]
    pub caption_suffix: Option<String>,
    /// Colour augmentation.
    #[arg(long)]
    pub color_aug: bool,
    /// Horizontal-flip augmentation.
    #[arg(long)]
    pub flip_aug: bool,
    /// Face-crop augmentation range "LOW,HIGH".
    #[arg(long)]
    pub face_crop_aug_range: Option<String>,
    /// Random instead of centre crops.
    #[arg(long)]
    pub random_crop: bool,
    /// Probability of training an image on the empty caption.
    #[arg(long, default_value_t = 0.0)]
    pub caption_dropout_rate: f64,
    /// Drop every caption every N epochs.
    #[arg(long, default_value_t = 0)]
    pub caption_dropout_every_n_epochs: i64,
    /// Probability of dropping each caption piece.
    #[arg(long, default_value_t = 0.0)]
    pub caption_tag_dropout_rate: f64,
    /// Caption pieces used at step 0 (token warm-up).
    #[arg(long, default_value_t = 1)]
    pub token_warmup_min: i64,
    /// Step at which all caption pieces are used (below 1: a fraction of the run).
    #[arg(long, default_value_t = 0.0)]
    pub token_warmup_step: f64,
    /// Use the alpha channel as a loss mask.
    #[arg(long)]
    pub alpha_mask: bool,
    /// Accepted (sd-scripts caches folder listings in metadata_cache.json); folders are read afresh.
    #[arg(long)]
    pub cache_info: bool,
    /// Resampling filter for resizing.
    #[arg(long, value_parser = ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"])]
    pub resize_interpolation: Option<String>,
}

impl DatasetArgs {
    /// The command-line layer of the dataset description.
    pub fn command_line(&self) -> Result<CommandLine> {
        let resolution = self
            .resolution
            .as_deref()
            .map(crate::dataset::bucket::parse_resolution)
            .transpose()?;
        let face_crop_aug_range = match &self.face_crop_aug_range {
            None => None,
            Some(text) => {
                let parts: Vec<Option<f64>> =
                    text.split(',').map(|p| p.trim().parse().ok()).collect();
                match parts.as_slice() {
                    [Some(low), Some(high)] if low <= high => Some((*low, *high)),
                    _ => {
                        return Err(Error::Usage(format!(
                            "--face_crop_aug_range {text:?} must be two numbers LOW,HIGH with LOW <= HIGH"
                        )))
                    }
                }
            }
        };
        Ok(CommandLine {
            train_data_dir: self.train_data_dir.clone(),
            reg_data_dir: self.reg_data_dir.clone(),
            in_json: self.in_json.clone(),
            dataset_config: self.dataset_config.clone(),
            resolution,
            train_batch_size: self.train_batch_size,
            enable_bucket: self.enable_bucket,
            min_bucket_reso: self.min_bucket_reso,
            max_bucket_reso: self.max_bucket_reso,
            bucket_reso_steps: self.bucket_reso_steps,
            bucket_no_upscale: self.bucket_no_upscale,
            prior_loss_weight: self.prior_loss_weight,
            network_multiplier: 1.0,
            dataset_repeats: self.dataset_repeats,
            caption_extension: self.caption_extension.clone(),
            caption_separator: self.caption_separator.clone(),
            shuffle_caption: self.shuffle_caption,
            keep_tokens: self.keep_tokens,
            keep_tokens_separator: self.keep_tokens_separator.clone(),
            secondary_separator: self.secondary_separator.clone(),
            enable_wildcard: self.enable_wildcard,
            caption_prefix: self.caption_prefix.clone(),
            caption_suffix: self.caption_suffix.clone(),
            color_aug: self.color_aug,
            flip_aug: self.flip_aug,
            face_crop_aug_range,
            random_crop: self.random_crop,
            caption_dropout_rate: self.caption_dropout_rate,
            caption_dropout_every_n_epochs: self.caption_dropout_every_n_epochs,
            caption_tag_dropout_rate: self.caption_tag_dropout_rate,
            token_warmup_min: self.token_warmup_min,
            token_warmup_step: self.token_warmup_step,
            alpha_mask: self.alpha_mask,
            cache_info: self.cache_info,
            resize_interpolation: self.resize_interpolation.clone(),
        })
    }
}

/// The flags of `prepare-dataset`; the tool adds its description and the logging flags.
#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct PrepareDatasetArgs {
    #[command(flatten)]
    pub dataset: DatasetArgs,
    /// Metadata JSON to write: one entry per image with its caption and subset settings.
    #[arg(long)]
    pub out_json: PathBuf,
}

impl PrepareDatasetArgs {
    /// Runs `prepare-dataset`.
    pub fn run(&self, quiet: bool) -> Result<Summary> {
        prepare_dataset::run(&PrepareDatasetOptions {
            dataset: self.dataset.command_line()?,
            out_json: self.out_json.clone(),
            quiet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        dataset: DatasetArgs,
    }

    #[test]
    fn defaults_are_train_network_py_defaults() {
        let parsed = Wrapper::try_parse_from(["x"]).unwrap();
        assert_eq!(
            parsed.dataset.command_line().unwrap(),
            CommandLine::default()
        );
        let given = Wrapper::try_parse_from([
            "x",
            "--resolution",
            "256",
            "--caption_extention",
            ".txt",
            "--face_crop_aug_range",
            "2.0,3.0",
        ])
        .unwrap()
        .dataset
        .command_line()
        .unwrap();
        assert_eq!(given.resolution, Some((256, 256)));
        assert_eq!(given.caption_extension, ".txt");
        assert_eq!(given.face_crop_aug_range, Some((2.0, 3.0)));
        let bad = Wrapper::try_parse_from(["x", "--face_crop_aug_range", "3,2"])
            .unwrap()
            .dataset
            .command_line()
            .unwrap_err()
            .to_string();
        assert!(bad.contains("LOW <= HIGH"), "{bad}");
    }
}
