//! `clean-captions`: clean captions and tags of a metadata JSON, as sd-scripts'
//! `finetune/clean_captions_and_tags.py`.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::stages::clean_captions::{self, CleanOptions};

/// Clean captions and tags in a metadata JSON (sd-scripts clean_captions_and_tags.py).
///
/// Accepts `in_json out_json`, or sd-scripts' legacy `train_data_dir in_json out_json`
/// (the folder is ignored).
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// `in_json out_json` (or legacy `train_data_dir in_json out_json`).
    #[arg(num_args = 2..=3, required = true, value_names = ["IN_JSON", "OUT_JSON"])]
    paths: Vec<PathBuf>,
    /// Optional filter list applied after the built-in rules: one rule per line, a plain tag to
    /// drop, `/regex/` to drop matching tags, or `s/regex/replacement/` for captions and tags.
    #[arg(long)]
    filter: Option<PathBuf>,
    /// Print every cleaned entry.
    #[arg(long)]
    debug: bool,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    let n = args.paths.len();
    let options = CleanOptions {
        in_json: args.paths[n - 2].clone(),
        out_json: args.paths[n - 1].clone(),
        filter: args.filter,
        debug: args.debug,
    };
    lorakit_pipeline::infra::report::run("clean-captions", || clean_captions::run(&options))
}
