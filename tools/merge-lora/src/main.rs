//! `merge-lora`: sd-scripts' `networks/merge_lora.py` / `sdxl_merge_lora.py`.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::stages::lora_tools::merge::{run, Options};
use lorakit_pipeline::stages::lora_tools::tensors::Precision;

/// Merge LoRAs into a Stable Diffusion checkpoint (SD1/SD2/SDXL single file), or several LoRAs
/// into one LoRA when no --sd_model is given.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// Checkpoint (.safetensors) to merge into; omitted: merge the LoRAs into one LoRA.
    #[arg(long)]
    sd_model: Option<PathBuf>,
    /// Output .safetensors file.
    #[arg(long, required = true)]
    save_to: PathBuf,
    /// LoRA files to merge.
    #[arg(long, num_args = 1.., required = true)]
    models: Vec<PathBuf>,
    /// Ratio of each LoRA, one per model.
    #[arg(long, num_args = 1.., required = true, allow_negative_numbers = true)]
    ratios: Vec<f32>,
    /// Precision of the merge arithmetic.
    #[arg(long, value_enum, default_value = "float")]
    precision: Precision,
    /// Precision of the saved tensors (default: --precision).
    #[arg(long, value_enum)]
    save_precision: Option<Precision>,
    /// Write no modelspec metadata (the minimal ss_* metadata of a merged LoRA is still written).
    #[arg(long)]
    no_metadata: bool,
    /// Concatenate the LoRAs along the rank instead of summing them (rank = sum of ranks).
    #[arg(long)]
    concat: bool,
    /// Shuffle the ranks of each merged module.
    #[arg(long)]
    shuffle: bool,
    /// Stable Diffusion 2.x checkpoint (accepted; the family is read from the checkpoint).
    #[arg(long)]
    v2: bool,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    let options = Options {
        sd_model: args.sd_model,
        save_to: args.save_to,
        models: args.models,
        ratios: args.ratios,
        precision: args.precision,
        save_precision: args.save_precision,
        no_metadata: args.no_metadata,
        concat: args.concat,
        shuffle: args.shuffle,
        v2: args.v2,
    };
    lorakit_pipeline::infra::report::run("merge-lora", || run(&options))
}
