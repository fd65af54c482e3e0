//! `lint-dataset`: per-file findings about a dataset folder (images, captions, tags, metadata,
//! caches) before any expensive stage runs. Exit code 0: no errors; 3: errors found.

use clap::Parser;
use lorakit_pipeline::cli::{BucketArgs, ImageArgs, LogArgs};
use lorakit_pipeline::models::precision::MixedPrecision;
use lorakit_pipeline::stages::lint_dataset::{self, CacheSettings, LintOptions};
use lorakit_pipeline::text::caption_text::DEFAULT_SEPARATOR;
use lorakit_pipeline::text::tokenize::MaxTokenLength;

/// Check a dataset folder before tagging, captioning, caching or training.
///
/// Reads only file headers unless --decode is given. Exit code 0 when no errors were found
/// (warnings allowed), 3 when some were, 1 when the folder cannot be read, 2 for a bad command line.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// Folder of training images.
    train_data_dir: std::path::PathBuf,
    /// Also check subfolders.
    #[arg(long)]
    recursive: bool,
    /// Metadata JSON to compare with the folder (entries without image, images without entry).
    #[arg(long)]
    in_json: Option<std::path::PathBuf>,
    /// Extension of caption files.
    #[arg(long, default_value = ".caption")]
    caption_extension: String,
    /// Extension of tag files.
    #[arg(long, default_value = ".txt")]
    tag_extension: String,
    /// Decode every image (slower): catches damaged pixel data and finds near-duplicates.
    #[arg(long)]
    decode: bool,
    #[command(flatten)]
    image: ImageArgs,
    /// Training resolution `W,H` or `SIZE`: enables the bucket checks and occupancy histogram.
    #[arg(long)]
    resolution: Option<String>,
    #[command(flatten)]
    buckets: BucketArgs,
    /// Training batch size: buckets holding fewer images are reported.
    #[arg(long, default_value_t = 1)]
    train_batch_size: usize,
    /// Folder with the CLIP vocab.json and merges.txt: enables the token-overflow check.
    #[arg(long)]
    tokenizer: Option<std::path::PathBuf>,
    /// Token budget captions are checked against: 75, 150 or 225.
    #[arg(long, default_value_t = 75)]
    max_token_length: usize,
    /// Largest perceptual-hash distance (of 64 bits) reported as a near-duplicate (with --decode).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=32))]
    near_duplicate_distance: u32,
    /// Report caption/tag files longer than this many bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    max_caption_bytes: u64,
    /// Number of tags shown in the frequency table of the text report.
    #[arg(long, default_value_t = 30)]
    top_tags: usize,
    /// Model (checkpoint or diffusers folder) the caches were made with: enables the stale-cache
    /// check, which recomputes every cache file's content key (latents need --resolution,
    /// text-encoder outputs --in_json) with the flags below, spelled as in the cache stages.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Separate VAE given to prepare-latents.
    #[arg(long)]
    vae: Option<std::path::PathBuf>,
    /// --cache_dir of prepare-latents / cache-text-encoder (default: caches beside the images).
    #[arg(long)]
    cache_dir: Option<std::path::PathBuf>,
    /// Metadata keys are full image paths (--full_path of the stages).
    #[arg(long)]
    full_path: bool,
    /// --mixed_precision of prepare-latents and cache-text-encoder: no, fp16 or bf16.
    #[arg(long, default_value = "no")]
    mixed_precision: String,
    /// --flip_aug of prepare-latents.
    #[arg(long)]
    flip_aug: bool,
    /// --alpha_mask of prepare-latents.
    #[arg(long)]
    alpha_mask: bool,
    /// --seed of prepare-latents.
    #[arg(long, default_value_t = 0)]
    latent_seed: u64,
    /// --clip_skip of cache-text-encoder.
    #[arg(long)]
    clip_skip: Option<usize>,
    /// --weighted_captions of cache-text-encoder.
    #[arg(long)]
    weighted_captions: bool,
    /// --caption_separator of cache-text-encoder.
    #[arg(long, default_value = DEFAULT_SEPARATOR)]
    caption_separator: String,
    /// --seed of cache-text-encoder.
    #[arg(long, default_value_t = 42)]
    text_seed: u64,
    /// Print the report as JSON (schema lorakit.lint_report/v1) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("lint-dataset", || {
        let buckets = match &args.resolution {
            Some(text) => Some(args.buckets.settings(text)?),
            None => None,
        };
        let options = LintOptions {
            train_data_dir: args.train_data_dir,
            recursive: args.recursive,
            in_json: args.in_json,
            caption_extension: args.caption_extension,
            tag_extension: args.tag_extension,
            decode: args.decode,
            image: args.image.options()?,
            near_duplicate_distance: args.near_duplicate_distance,
            max_caption_bytes: args.max_caption_bytes,
            top_tags: args.top_tags,
            buckets,
            batch_size: args.train_batch_size,
            tokenizer: args.tokenizer,
            max_token_length: MaxTokenLength::new(args.max_token_length)?,
            caches: match args.model {
                Some(model) => Some(CacheSettings {
                    model,
                    vae: args.vae,
                    cache_dir: args.cache_dir,
                    full_path: args.full_path,
                    latent_precision: MixedPrecision::parse(&args.mixed_precision)?,
                    text_precision: MixedPrecision::parse(&args.mixed_precision)?,
                    flip_aug: args.flip_aug,
                    alpha_mask: args.alpha_mask,
                    latent_seed: args.latent_seed,
                    clip_skip: args.clip_skip,
                    weighted_captions: args.weighted_captions,
                    caption_separator: args.caption_separator,
                    text_seed: args.text_seed,
                }),
                None => None,
            },
            json: args.json,
            quiet: args.log.quiet,
        };
        lint_dataset::run(&options)
    })
}
