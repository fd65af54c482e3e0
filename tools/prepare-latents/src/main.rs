//! `prepare-latents`: images + metadata JSON + model → aspect-ratio buckets, one
//! `<stem>_<WWWW>x<HHHH>_sd.npz` latent cache per image and the metadata JSON with
//! `train_resolution`, as sd-scripts' `finetune/prepare_buckets_latents.py` intends.

use clap::Parser;
use lorakit_pipeline::cli::prepare_latents::PrepareLatentsArgs;
use lorakit_pipeline::cli::LogArgs;

/// Bucket every image and cache its VAE latents.
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
