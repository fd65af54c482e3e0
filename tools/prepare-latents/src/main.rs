//! `prepare-latents`: images + metadata JSON + model → aspect-ratio buckets, one
//! `<stem>_<WWWW>x<HHHH>_sd.npz` latent cache per image and the metadata JSON with
//! `train_resolution`, as sd-scripts' `finetune/prepare_buckets_latents.py` intends.

use clap::Parser;
use lorakit_pipeline::cli::prepare_latents::PrepareLatentsArgs;
use lorakit_pipeline::cli::LogArgs;

/// Bucket every image and cache its VAE latents.
///
/// Each image's cache gets sd-scripts' name `<stem>_<WWWW>x<HHHH>_sd.npz` beside it (or under
/// --cache_dir). When that file holds the cache of the same image made with other settings
/// (another resolution, bucket flags, VAE, seed, ...), the new cache goes to
/// `.lorakit/latents/<stem>_<key>_sd.npz` in the same folder instead, so several preparations
/// coexist and train-lora finds each run's caches by the keys in OUT_JSON's manifest. --prune
/// deletes the caches OUT_JSON does not use.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    tool: PrepareLatentsArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("prepare-latents", || args.tool.run(args.log.quiet))
}
