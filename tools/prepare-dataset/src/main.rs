//! `prepare-dataset`: a dataset described the way sd-scripts' `train_network.py` takes it
//! (`--train_data_dir` with `<repeats>_<name>` folders and `--reg_data_dir`, `--in_json`, or
//! `--dataset_config` TOML) written as one metadata JSON with each image's caption, size and
//! subset settings.

use clap::Parser;
use lorakit_pipeline::cli::prepare_dataset::PrepareDatasetArgs;
use lorakit_pipeline::cli::LogArgs;

/// Write any sd-scripts dataset form as one metadata JSON.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    tool: PrepareDatasetArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("prepare-dataset", || args.tool.run(args.log.quiet))
}
