//! The command-line tier: clap argument groups several tools share, and the flags of the tools
//! with long flag lists (with their conversion into stage options), so every `main.rs` only
//! parses and calls one function.

use clap::Args;
pub mod cache_text_encoder;
pub mod caption_images;
pub mod generate_images;
pub mod kohya_options;
pub mod lint_dataset;
pub mod prepare_dataset;
pub mod prepare_latents;
pub mod tag_images;
pub mod train_lora;

use std::io::IsTerminal;

/// Output verbosity flags every tool accepts.
#[derive(Debug, Clone, Default, Args)]
#[command(rename_all = "snake_case")]
pub struct LogArgs {
    /// Print only errors and skipped items (no progress, no logs, no summary of a clean run).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print detailed per-item logs.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

impl LogArgs {
    /// Installs the `tracing` subscriber on stderr at the chosen level (`RUST_LOG` overrides).
    pub fn init(&self) {
        crate::infra::report::set_quiet(self.quiet);
        let level = if self.quiet {
            "error"
        } else if self.verbose {
            "debug"
        } else {
            "info"
        };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .without_time()
            .try_init();
    }
}

/// Positional arguments and flags shared by `merge-captions` and `merge-tags`.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct MergeArgs {
    /// Folder of training images.
    pub train_data_dir: std::path::PathBuf,
    /// Metadata JSON to write.
    pub out_json: std::path::PathBuf,
    /// Metadata JSON to start from (default: OUT_JSON when it exists, updated in place).
    #[arg(long)]
    pub in_json: Option<std::path::PathBuf>,
    /// Key images by their path (folder as given + file name) instead of their file stem.
    #[arg(long)]
    pub full_path: bool,
    /// Also search subfolders (requires --full_path).
    #[arg(long)]
    pub recursive: bool,
    /// Print every merged entry.
    #[arg(long)]
    pub debug: bool,
}

impl MergeArgs {
    /// The library options for a merge of `field` from `extension` files.
    pub fn into_options(
        self,
        caption_extension: String,
        field: crate::stages::merge_sidecars::SidecarField,
        quiet: bool,
    ) -> crate::stages::merge_sidecars::MergeOptions {
        crate::stages::merge_sidecars::MergeOptions {
            train_data_dir: self.train_data_dir,
            out_json: self.out_json,
            in_json: self.in_json,
            caption_extension,
            full_path: self.full_path,
            recursive: self.recursive,
            debug: self.debug,
            quiet,
            field,
        }
    }
}

/// `--shard i/n` or `--shard auto` for per-image stages (see [`crate::dataset::shard`]).
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct ShardArgs {
    /// Process only shard i of n (0-based, e.g. 0/3); items are assigned by a hash of their
    /// path, stable across machines. Join the shard outputs with `merge-shards`. auto: the
    /// part of a Slurm job array (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT) or of a
    /// Kubernetes Indexed Job (JOB_COMPLETION_INDEX of --shard_count).
    #[arg(long, default_value = "0/1")]
    pub shard: crate::dataset::shard::ShardChoice,
    /// With --shard auto: the number of parts (a Kubernetes Indexed Job's completions; under
    /// Slurm it must equal SLURM_ARRAY_TASK_COUNT).
    #[arg(long)]
    pub shard_count: Option<u64>,
}

impl ShardArgs {
    /// The part to process: the one given, or the scheduler's (from the environment).
    pub fn resolve(&self) -> crate::Result<crate::dataset::shard::Shard> {
        use crate::dataset::shard::{Shard, ShardChoice};
        match self.shard {
            ShardChoice::Given(shard) => match self.shard_count {
                None => Ok(shard),
                Some(_) => Err(crate::Error::Usage(
                    "--shard_count goes with --shard auto; --shard i/n names the count itself"
                        .into(),
                )),
            },
            ShardChoice::Auto => {
                let (shard, source) =
                    Shard::from_scheduler(|name| std::env::var(name).ok(), self.shard_count)
                        .map_err(crate::Error::Usage)?;
                tracing::info!(
                    "--shard auto: shard {}/{} ({source})",
                    shard.index,
                    shard.count
                );
                Ok(shard)
            }
        }
    }
}

/// The bucket flags shared by `prepare-latents` and `lint-dataset` (sd-scripts spellings).
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct BucketArgs {
    /// Smallest bucket side.
    #[arg(long, default_value_t = 256)]
    pub min_bucket_reso: u32,
    /// Largest bucket side.
    #[arg(long, default_value_t = 1024)]
    pub max_bucket_reso: u32,
    /// Bucket sides are multiples of this.
    #[arg(long, default_value_t = 64)]
    pub bucket_reso_steps: u32,
    /// Never enlarge images: one bucket per image size (ignores min/max bucket reso).
    #[arg(long)]
    pub bucket_no_upscale: bool,
}

impl BucketArgs {
    /// The bucket settings for a maximum resolution given as `W,H` or `SIZE`.
    pub fn settings(
        &self,
        max_resolution: &str,
    ) -> crate::Result<crate::dataset::bucket::BucketSettings> {
        Ok(crate::dataset::bucket::BucketSettings {
            max_resolution: crate::dataset::bucket::parse_resolution(max_resolution)?,
            min_bucket_reso: self.min_bucket_reso,
            max_bucket_reso: self.max_bucket_reso,
            bucket_reso_steps: self.bucket_reso_steps,
            no_upscale: self.bucket_no_upscale,
        })
    }
}

/// The image-decoding flags shared by every stage that reads pixels.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct ImageArgs {
    /// Decompression-bomb limit: largest image decoded, in pixels.
    #[arg(long, default_value_t = crate::dataset::imaging::DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
    /// Decompression-bomb limit: longest image side decoded, in pixels.
    #[arg(long, default_value_t = crate::dataset::imaging::DEFAULT_MAX_SIDE)]
    pub max_image_side: u32,
    /// Turn images upright by their EXIF orientation tag before use. Off by default, like
    /// sd-scripts, which uses the stored pixels as they are.
    #[arg(long)]
    pub exif_transpose: bool,
}

impl ImageArgs {
    /// The decode options these flags describe.
    pub fn options(&self) -> crate::Result<crate::dataset::imaging::DecodeOptions> {
        if self.max_image_pixels == 0 || self.max_image_side == 0 {
            return Err(crate::Error::Usage(
                "--max_image_pixels and --max_image_side must be positive".into(),
            ));
        }
        Ok(crate::dataset::imaging::DecodeOptions {
            limits: crate::dataset::imaging::DecodeLimits {
                max_pixels: self.max_image_pixels,
                max_side: self.max_image_side,
            },
            exif_transpose: self.exif_transpose,
        })
    }
}
