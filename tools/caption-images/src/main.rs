//! `caption-images`: one BLIP caption file per image, as sd-scripts'
//! `finetune/make_captions.py`.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::{ImageArgs, LogArgs, ShardArgs};
use lorakit_pipeline::stages::caption_images::{
    self, CaptionOptions, Decoding, GenerationSettings,
};

/// Caption images with BLIP (sd-scripts finetune/make_captions.py).
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// Folder of training images.
    train_data_dir: PathBuf,
    /// Hugging Face BLIP captioning folder (config.json, model.safetensors, tokenizer.json),
    /// e.g. a local copy of Salesforce/blip-image-captioning-large. Nothing is downloaded.
    #[arg(long)]
    caption_weights: PathBuf,
    /// Extension of the caption files.
    #[arg(long, default_value = ".caption")]
    caption_extension: String,
    /// Old misspelling of --caption_extension, still accepted (overrides it when given).
    #[arg(long, hide = true)]
    caption_extention: Option<String>,
    /// Beam search (greedy with the default --num_beams 1) instead of nucleus sampling.
    #[arg(long)]
    beam_search: bool,
    /// Number of beams with --beam_search.
    #[arg(long, default_value_t = 1)]
    num_beams: usize,
    /// Cumulative probability kept by nucleus sampling.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Longest caption in tokens, counting the 4 prompt tokens ("[DEC] a picture of").
    #[arg(long, default_value_t = 75)]
    max_length: usize,
    /// Shortest caption in tokens, counting the 4 prompt tokens.
    #[arg(long, default_value_t = 5)]
    min_length: usize,
    /// Seed of nucleus sampling (combined with each image's content).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Images per vision-encoder batch.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Accepted for compatibility; images are decoded in parallel anyway.
    #[arg(long)]
    max_data_loader_n_workers: Option<usize>,
    /// Also caption images in subfolders.
    #[arg(long)]
    recursive: bool,
    /// Print every caption.
    #[arg(long)]
    debug: bool,
    /// Caption every image again, even when its caption file is up to date (caption files
    /// you wrote or edited are still kept; see --overwrite).
    #[arg(long)]
    force: bool,
    /// Replace caption files you wrote or edited since caption-images wrote them. Each is first
    /// copied to <name>.bak (or <name>.bak.N). Without it they are kept and reported as kept.
    #[arg(long)]
    overwrite: bool,
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
    if !args.beam_search && args.num_beams != 1 {
        tracing::warn!("--num_beams is ignored without --beam_search (as in sd-scripts)");
    }
    let decoding = if args.beam_search {
        Decoding::Beam {
            num_beams: args.num_beams,
        }
    } else {
        Decoding::Nucleus { top_p: args.top_p }
    };
    lorakit_pipeline::infra::report::run("caption-images", || {
        let options = CaptionOptions {
            train_data_dir: args.train_data_dir,
            caption_weights: args.caption_weights,
            generation: GenerationSettings {
                decoding,
                max_length: args.max_length,
                min_length: args.min_length,
            },
            seed: args.seed,
            batch_size: args.batch_size,
            caption_extension: args.caption_extention.unwrap_or(args.caption_extension),
            recursive: args.recursive,
            debug: args.debug,
            force: args.force,
            overwrite: args.overwrite,
            decode: args.image.options()?,
            shard: args.shard.shard,
            quiet: args.log.quiet,
        };
        caption_images::run(&options)
    })
}
