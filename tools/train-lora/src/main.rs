//! `train-lora`: LoRA training from cached latents, as sd-scripts' `train_network.py --network_module
//! networks.lora`: text encoder and UNet by default, the UNet only (from cached text-encoder
//! outputs) with `--network_train_unet_only`.

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::stages::train_lora::TrainArgs;

/// Train a LoRA (kohya format) for SD1.x/SD2.x/SDXL from cached latents. By default, as
/// sd-scripts, the text encoder is trained too: it is loaded and every step's captions are
/// encoded live (exact --shuffle_caption / --keep_tokens / tag and caption dropout). With
/// --network_train_unet_only (or --cache_text_encoder_outputs) only the UNet is trained, from
/// cached text-encoder outputs; the text encoder never runs. The VAE is never loaded. A kohya
/// dataset (--train_data_dir, --reg_data_dir, --dataset_config) is first prepared by
/// prepare-dataset, prepare-latents and cache-text-encoder, run as child processes. Several
/// processes train one LoRA data-parallel when launched with RANK, WORLD_SIZE, MASTER_ADDR and
/// MASTER_PORT set (as `torchrun --no-python` does); rank 0 writes the files. Exit codes: 0 ok,
/// 1 fatal error, 2 usage error.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let started = std::time::Instant::now();
    let parsed = match lorakit_pipeline::cli::train_lora::parse::<Args>(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(error) => {
            return lorakit_pipeline::infra::report::finish("train-lora", started, Err(error))
        }
    };
    let mut args = parsed.args;
    args.log.init();
    args.train.quiet = args.log.quiet;
    args.train.settings = parsed.settings;
    args.train.notices = parsed.notices;
    args.train.preparation = parsed.preparation;
    lorakit_pipeline::infra::report::run("train-lora", || {
        lorakit_pipeline::stages::train_lora::run(&args.train)
    })
}
