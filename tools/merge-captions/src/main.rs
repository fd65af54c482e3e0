//! `merge-captions`: caption files (`.caption`) → metadata JSON, as sd-scripts'
//! `finetune/merge_captions_to_metadata.py`.

use clap::Parser;
use lorakit_pipeline::cli::{LogArgs, MergeArgs};
use lorakit_pipeline::stages::merge_sidecars::{merge_sidecars, SidecarField};

/// Merge caption sidecar files into a metadata JSON (sd-scripts merge_captions_to_metadata.py).
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    merge: MergeArgs,
    /// Extension of caption files.
    #[arg(long, default_value = ".caption")]
    caption_extension: String,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    let options = args.merge.into_options(
        args.caption_extension,
        SidecarField::Caption,
        args.log.quiet,
    );
    lorakit_pipeline::infra::report::run("merge-captions", || merge_sidecars(&options))
}
