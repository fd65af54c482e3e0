//! `cache-text-encoder`: metadata JSON + model → `<image stem>_te_outputs.npz` per entry, as
//! sd-scripts' `tools/cache_text_encoder_outputs.py` (extended to SD1.x/SD2.x).

use clap::Parser;
use lorakit_pipeline::cli::cache_text_encoder::CacheTextEncoderArgs;
use lorakit_pipeline::cli::LogArgs;

/// Cache CLIP text-encoder outputs of every caption in a metadata JSON.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    tool: CacheTextEncoderArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("cache-text-encoder", || args.tool.run(args.log.quiet))
}
