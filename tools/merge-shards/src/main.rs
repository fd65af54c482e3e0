//! `merge-shards`: join the JSON outputs (and manifests) of a stage run with `--shard i/n`.

use std::path::PathBuf;

use clap::Parser;
use lorakit_pipeline::cli::LogArgs;
use lorakit_pipeline::stages::merge_shards::merge_shard_outputs;

/// Join the outputs of a stage run with --shard i/n on several machines into one output.
///
/// Per-image files (latents, text-encoder outputs, tags, captions) need no joining: every shard
/// writes its own. This joins the stage's JSON document (metadata JSON or cache index) and sums
/// the manifests, so the result equals an unsharded run.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// The joined output to write.
    out_json: PathBuf,
    /// The shard outputs, in any order.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// Order entries like this metadata JSON (the stage's input); default: sorted by key.
    #[arg(long)]
    order_like: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("merge-shards", || {
        merge_shard_outputs(&args.shards, &args.out_json, args.order_like.as_deref())
    })
}
