//! `web-ui`: a local web page over the lorakit tools (the kohya_ss GUI counterpart).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::Parser;

/// Serve a local web page to look at a dataset (lint report, buckets, tags, captions to edit),
/// write a train-lora config, run train-lora and follow it live, and browse past runs. It prints
/// the address to open, with a random access token. The page reads and writes only inside the
/// folders given with --folder. Exit codes: 0 ok, 1 fatal error, 2 usage error.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    /// A folder the page may use (datasets, models, output folders); give it several times.
    #[arg(long, required = true)]
    folder: Vec<PathBuf>,
    /// Address to listen on (anything but loopback needs --allow_remote).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Serve an address other than loopback: anyone who gets the printed address can use it.
    #[arg(long)]
    allow_remote: bool,
    /// Folder of the lorakit tools (default: the folder of this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let options = lorakit_web::Options {
        folders: args.folder,
        host: args.host,
        port: args.port,
        allow_remote: args.allow_remote,
        bin_dir: args.bin_dir,
    };
    lorakit_pipeline::infra::report::run("web-ui", || {
        lorakit_web::serve(&options).map(|()| Default::default())
    })
}
