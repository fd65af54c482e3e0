//! `train-lora`: UNet LoRA training from cached latents and cached text-encoder outputs, as
//! sd-scripts' `train_network.py --network_module networks.lora --network_train_unet_only`.

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::stages::train_lora::TrainArgs;

/// Train a UNet-only LoRA (kohya format) for SD1.x/SD2.x/SDXL from cached latents and cached
/// text-encoder outputs. The text encoder and the VAE are never loaded, so only the UNet is
/// trained (like sd-scripts with cached text-encoder outputs). A kohya dataset
/// (--train_data_dir, --reg_data_dir, --dataset_config) is first prepared by prepare-dataset,
/// prepare-latents and cache-text-encoder, run as child processes. Exit codes: 0 ok, 1 fatal
/// error, 2 usage error.
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
