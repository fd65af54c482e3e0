//! `cache-text-encoder`: metadata JSON + model → `<image stem>_te_outputs.npz` per entry, as
//! sd-scripts' `tools/cache_text_encoder_outputs.py` (extended to SD1.x/SD2.x).

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::{LogArgs, ShardArgs};
use lorakit_pipeline::models::precision::MixedPrecision;
use lorakit_pipeline::stages::cache_text_encoder::{cache_text_encoder_outputs, TeCacheOptions};
use lorakit_pipeline::text::caption_text::{CaptionAugmentation, DEFAULT_SEPARATOR};
use lorakit_pipeline::text::tokenize::MaxTokenLength;

/// Cache CLIP text-encoder outputs of every caption in a metadata JSON.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// Metadata JSON (merge-captions / clean-captions / prepare-latents output).
    in_json: PathBuf,
    /// Model: single-file checkpoint (.safetensors) or diffusers folder.
    model: PathBuf,
    /// Folder with the CLIP vocab.json and merges.txt (default: the model's tokenizer/).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Folder that stem or relative metadata keys are resolved in.
    #[arg(long)]
    train_data_dir: Option<PathBuf>,
    /// Metadata keys are image paths (written with --full_path); stems are not looked up.
    #[arg(long)]
    full_path: bool,
    /// Write cache files here (named by image stem) instead of beside the images.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Use the output of the k-th layer from the end, with the final layer norm (SD1/SD2).
    #[arg(long)]
    clip_skip: Option<usize>,
    /// Token budget per caption: 75, 150 or 225.
    #[arg(long, default_value_t = 75)]
    max_token_length: usize,
    /// Captions per encoder call.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Encoder precision: no, fp16 (outputs stored as float16) or bf16 (outputs float32).
    #[arg(long, default_value = "no")]
    mixed_precision: String,
    /// Refuse models that are not SDXL (the family is detected from the weights anyway).
    #[arg(long)]
    sdxl: bool,
    /// Parse A1111 attention syntax `(word:1.2)`, `[word]` in captions.
    #[arg(long)]
    weighted_captions: bool,
    /// Separator between caption and tags, and between tags for augmentation.
    #[arg(long, default_value = DEFAULT_SEPARATOR)]
    caption_separator: String,
    /// Also store N augmented versions of every caption (needs --shuffle_caption or --caption_tag_dropout_rate).
    #[arg(long, default_value_t = 0)]
    variants: usize,
    /// Variants: shuffle the comma-separated pieces after the first --keep_tokens.
    #[arg(long)]
    shuffle_caption: bool,
    /// Variants: leading pieces that never move or drop.
    #[arg(long, default_value_t = 0)]
    keep_tokens: usize,
    /// Variants: probability of dropping each movable piece.
    #[arg(long, default_value_t = 0.0)]
    caption_tag_dropout_rate: f64,
    /// Variants: random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Delete cache files that belong to no metadata entry.
    #[arg(long)]
    prune: bool,
    #[command(flatten)]
    shard: ShardArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("cache-text-encoder", || {
        let options = TeCacheOptions {
            in_json: args.in_json,
            model: args.model,
            tokenizer: args.tokenizer,
            train_data_dir: args.train_data_dir,
            full_path: args.full_path,
            cache_dir: args.cache_dir,
            clip_skip: args.clip_skip,
            max_token_length: MaxTokenLength::new(args.max_token_length)?,
            batch_size: args.batch_size,
            mixed_precision: MixedPrecision::parse(&args.mixed_precision)?,
            require_sdxl: args.sdxl,
            weighted_captions: args.weighted_captions,
            augmentation: CaptionAugmentation {
                shuffle: args.shuffle_caption,
                keep_tokens: args.keep_tokens,
                tag_dropout_rate: args.caption_tag_dropout_rate,
                separator: args.caption_separator.clone(),
            },
            caption_separator: args.caption_separator,
            variants: args.variants,
            seed: args.seed,
            prune: args.prune,
            shard: args.shard.shard,
            quiet: args.log.quiet,
        };
        cache_text_encoder_outputs(&options)
    })
}
