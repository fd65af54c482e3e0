//! `prepare-latents`: images + metadata JSON + model → aspect-ratio buckets, one
//! `<stem>_<WWWW>x<HHHH>_sd.npz` latent cache per image and the metadata JSON with
//! `train_resolution`, as sd-scripts' `finetune/prepare_buckets_latents.py` intends.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::{BucketArgs, ImageArgs, LogArgs, ShardArgs};
use lorakit_pipeline::models::precision::MixedPrecision;
use lorakit_pipeline::stages::prepare_latents::{prepare_latents, LatentOptions};

/// Bucket every image and cache its VAE latents.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// Folder with the training images.
    train_data_dir: PathBuf,
    /// Metadata JSON to read (merge-captions / merge-tags / clean-captions output).
    in_json: PathBuf,
    /// Metadata JSON to write (adds train_resolution to every entry).
    out_json: PathBuf,
    /// Model: single-file checkpoint (.safetensors) or diffusers folder.
    model_name_or_path: PathBuf,
    /// Use this VAE (.safetensors file or diffusers folder) instead of the model's.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Accepted for compatibility; the model family is detected from the weights.
    #[arg(long)]
    v2: bool,
    /// Images per VAE call (images of one bucket are batched together).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Accepted for compatibility; decoding uses every core.
    #[arg(long)]
    max_data_loader_n_workers: Option<usize>,
    /// Maximum resolution "W,H" (or "S"): its area bounds every bucket.
    #[arg(long, default_value = "512,512")]
    max_resolution: String,
    #[command(flatten)]
    buckets: BucketArgs,
    /// VAE precision: no, fp16 or bf16.
    #[arg(long, default_value = "no")]
    mixed_precision: String,
    /// Run the VAE in float32 whatever --mixed_precision says.
    #[arg(long)]
    no_half_vae: bool,
    /// Metadata keys are full image paths.
    #[arg(long)]
    full_path: bool,
    /// Also cache latents of the horizontally flipped image (latents_flipped).
    #[arg(long)]
    flip_aug: bool,
    /// Also cache the alpha channel as a loss mask (alpha_mask); a bare flag or any non-empty value turns it on.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    alpha_mask: Option<String>,
    /// Accept existing cache files that pass sd-scripts' validity check even without our content key.
    #[arg(long)]
    skip_existing: bool,
    /// Search sub-folders too (requires --full_path).
    #[arg(long)]
    recursive: bool,
    /// Seed of the latent samples (each image's sample also depends on its content).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write cache files here (keeping sub-folders) instead of beside the images.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Re-encode every image, even up-to-date ones.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    image: ImageArgs,
    #[command(flatten)]
    shard: ShardArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("prepare-latents", || {
        let precision = if args.no_half_vae {
            MixedPrecision::No
        } else {
            MixedPrecision::parse(&args.mixed_precision)?
        };
        let options = LatentOptions {
            train_data_dir: args.train_data_dir,
            in_json: args.in_json,
            out_json: args.out_json,
            model: args.model_name_or_path,
            vae: args.vae,
            buckets: args.buckets.settings(&args.max_resolution)?,
            batch_size: args.batch_size,
            precision,
            full_path: args.full_path,
            flip_aug: args.flip_aug,
            alpha_mask: args
                .alpha_mask
                .is_some_and(|v| !v.is_empty() && v != "false"),
            skip_existing: args.skip_existing,
            recursive: args.recursive,
            decode: args.image.options()?,
            seed: args.seed,
            cache_dir: args.cache_dir,
            force: args.force,
            shard: args.shard.shard,
            quiet: args.log.quiet,
        };
        prepare_latents(&options)
    })
}
