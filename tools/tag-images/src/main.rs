//! `tag-images`: WD14 tagger → one tag file per image, as sd-scripts'
//! `finetune/tag_images_by_wd14_tagger.py` (always through ONNX Runtime).

use clap::Parser;
use lorakit_pipeline::cli::tag_images::TagImagesArgs;
use lorakit_pipeline::cli::LogArgs;

/// Tag images with a WD14 tagger (sd-scripts tag_images_by_wd14_tagger.py, ONNX only).
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    tool: TagImagesArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("tag-images", || args.tool.run(args.log.quiet))
}
