//! `caption-images`: one BLIP caption file per image, as sd-scripts'
//! `finetune/make_captions.py`.

use clap::Parser;
use lorakit_pipeline::cli::caption_images::CaptionImagesArgs;
use lorakit_pipeline::cli::LogArgs;

/// Caption images with BLIP (sd-scripts finetune/make_captions.py).
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    tool: CaptionImagesArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("caption-images", || args.tool.run(args.log.quiet))
}
