//! `extract-lora`: sd-scripts' `networks/extract_lora_from_models.py`.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::stages::lora_tools::extract::{run, Options};
use lorakit_pipeline::stages::lora_tools::tensors::Precision;

/// Extract a LoRA from the weight difference of a tuned checkpoint and its original, by SVD.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// Original model (single-file .safetensors).
    #[arg(long, required = true)]
    model_org: PathBuf,
    /// Tuned model; the LoRA is the difference original -> tuned.
    #[arg(long, required = true)]
    model_tuned: PathBuf,
    /// Output .safetensors file.
    #[arg(long, required = true)]
    save_to: PathBuf,
    /// Rank of the LoRA.
    #[arg(long, default_value_t = 4)]
    dim: usize,
    /// Rank of 3x3 conv modules (default: none, no resnet/sampler modules).
    #[arg(long)]
    conv_dim: Option<usize>,
    /// Quantile of the factors' values they are clamped to.
    #[arg(long, default_value_t = 0.99)]
    clamp_quantile: f64,
    /// Text encoders are extracted only when a weight differs by more than this.
    #[arg(long, default_value_t = 0.01)]
    min_diff: f32,
    /// Precision of the saved tensors (default float).
    #[arg(long, value_enum)]
    save_precision: Option<Precision>,
    /// The models are Stable Diffusion 2.x.
    #[arg(long)]
    v2: bool,
    /// The models are SDXL.
    #[arg(long)]
    sdxl: bool,
    /// Metadata for a v-parameterization model (default: --v2).
    #[arg(long)]
    v_parameterization: bool,
    /// Write no modelspec metadata.
    #[arg(long)]
    no_metadata: bool,
    /// Accepted for compatibility (lorakit computes on the CPU).
    #[arg(long)]
    device: Option<String>,
    /// Accepted for compatibility (weights are read as stored and computed in f32/f64).
    #[arg(long)]
    load_precision: Option<Precision>,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    let options = Options {
        model_org: args.model_org,
        model_tuned: args.model_tuned,
        save_to: args.save_to,
        dim: args.dim,
        conv_dim: args.conv_dim,
        clamp_quantile: args.clamp_quantile,
        min_diff: args.min_diff,
        save_precision: args.save_precision,
        v2: args.v2,
        sdxl: args.sdxl,
        v_parameterization: args.v_parameterization.then_some(true),
        no_metadata: args.no_metadata,
    };
    lorakit_pipeline::infra::report::run("extract-lora", || run(&options))
}
