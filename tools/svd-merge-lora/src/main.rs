//! `svd-merge-lora`: sd-scripts' `networks/svd_merge_lora.py`.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::stages::lora_tools::svd_merge::{run, Options};
use lorakit_pipeline::stages::lora_tools::tensors::Precision;

/// Merge LoRAs into one LoRA of a chosen rank: sum their weight changes, then SVD.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// LoRA files to merge.
    #[arg(long, num_args = 1.., required = true)]
    models: Vec<PathBuf>,
    /// Ratio of each LoRA, one per model.
    #[arg(long, num_args = 1.., required = true, allow_negative_numbers = true)]
    ratios: Vec<f32>,
    /// Rank of the merged LoRA.
    #[arg(long, default_value_t = 4)]
    new_rank: usize,
    /// Rank of its 3x3 conv modules (default: --new_rank).
    #[arg(long)]
    new_conv_rank: Option<usize>,
    /// Output .safetensors file.
    #[arg(long, required = true)]
    save_to: PathBuf,
    /// Precision of the merge arithmetic.
    #[arg(long, value_enum, default_value = "float")]
    precision: Precision,
    /// Precision of the saved tensors (default: --precision).
    #[arg(long, value_enum)]
    save_precision: Option<Precision>,
    /// Write no modelspec metadata.
    #[arg(long)]
    no_metadata: bool,
    /// Quantile of the factors' values they are clamped to (lorakit extension; svd_merge_lora.py
    /// has the constant 0.99; 1.0 keeps the best rank-r approximation unclamped).
    #[arg(long, default_value_t = 0.99)]
    clamp_quantile: f64,
    /// Accepted for compatibility (lorakit computes on the CPU).
    #[arg(long)]
    device: Option<String>,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    let options = Options {
        models: args.models,
        ratios: args.ratios,
        new_rank: args.new_rank,
        new_conv_rank: args.new_conv_rank,
        save_to: args.save_to,
        precision: args.precision,
        save_precision: args.save_precision,
        no_metadata: args.no_metadata,
        clamp_quantile: args.clamp_quantile,
    };
    lorakit_pipeline::infra::report::run("svd-merge-lora", || run(&options))
}
