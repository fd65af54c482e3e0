//! `resize-lora`: sd-scripts' `networks/resize_lora.py`.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::stages::lora_tools::resize::{run, DynamicMethod, Options};
use lorakit_pipeline::stages::lora_tools::tensors::Precision;

/// Resize a LoRA to a lower rank by SVD of each module's weight change, keeping its scale.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// LoRA to resize (.safetensors).
    #[arg(long, required = true)]
    model: PathBuf,
    /// Output .safetensors file.
    #[arg(long, required = true)]
    save_to: PathBuf,
    /// New rank (the upper bound with --dynamic_method).
    #[arg(long, default_value_t = 4)]
    new_rank: usize,
    /// New rank of conv modules (default: --new_rank).
    #[arg(long)]
    new_conv_rank: Option<usize>,
    /// Choose each module's rank from its singular values.
    #[arg(long, value_enum)]
    dynamic_method: Option<DynamicMethod>,
    /// Target of --dynamic_method (sv_ratio: max/min singular value ratio; sv_fro, sv_cumulative:
    /// share of the Frobenius norm / of the singular value sum to keep).
    #[arg(long)]
    dynamic_param: Option<f64>,
    /// Precision of the saved tensors (default float).
    #[arg(long, value_enum)]
    save_precision: Option<Precision>,
    /// Accepted for compatibility (lorakit computes on the CPU).
    #[arg(long)]
    device: Option<String>,
    /// Print each module's retained sum(S) and Frobenius norm.
    #[arg(long)]
    verbose: bool,
    /// Print only errors.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    LogArgs {
        quiet: args.quiet,
        verbose: false,
    }
    .init();
    let options = Options {
        model: args.model,
        save_to: args.save_to,
        new_rank: args.new_rank,
        new_conv_rank: args.new_conv_rank,
        dynamic_method: args.dynamic_method,
        dynamic_param: args.dynamic_param,
        save_precision: args.save_precision,
        verbose: args.verbose,
    };
    lorakit_pipeline::infra::report::run("resize-lora", || run(&options))
}
