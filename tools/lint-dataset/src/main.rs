//! `lint-dataset`: per-file findings about a dataset folder (images, captions, tags, metadata,
//! caches) before any expensive stage runs. Exit code 0: no errors; 3: errors found.

use clap::Parser;
use lorakit_pipeline::cli::lint_dataset::LintDatasetArgs;
use lorakit_pipeline::cli::LogArgs;

/// Check a dataset folder before tagging, captioning, caching or training.
///
/// Reads only file headers unless --decode is given. Exit code 0 when no errors were found
/// (warnings allowed), 3 when some were, 1 when the folder cannot be read, 2 for a bad command line.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    tool: LintDatasetArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("lint-dataset", || args.tool.run(args.log.quiet))
}
