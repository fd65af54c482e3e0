//! `check-lora`: sd-scripts' `networks/check_lora_weights.py` plus the header metadata.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::stages::lora_tools::check::{run, Options};

/// List a LoRA's weights (key, shape, mean |value|, min |value|) and its metadata.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// LoRA file (.safetensors).
    file: PathBuf,
    /// List every tensor, not only the LoRA weights.
    #[arg(long, short = 's')]
    show_all_keys: bool,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
    /// Leave out the metadata.
    #[arg(long)]
    no_metadata: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    lorakit_pipeline::infra::report::set_quiet(true);
    let options = Options {
        file: args.file,
        show_all_keys: args.show_all_keys,
        json: args.json,
        no_metadata: args.no_metadata,
    };
    lorakit_pipeline::infra::report::run("check-lora", || run(&options))
}
