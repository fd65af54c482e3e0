//! `generate-images`: text-to-image with an SD1.x/SD2.x/SDXL checkpoint and LoRAs, as
//! sd-scripts' `gen_img.py` (its flag names and prompt-line options).

use clap::Parser;
use lorakit_pipeline::cli::generate_images::GenerateImagesArgs;
use lorakit_pipeline::cli::LogArgs;

/// Generate PNG images from prompts with a Stable Diffusion checkpoint (SD1.x, SD2.x, SDXL) and
/// optional kohya LoRAs, classifier-free guidance and the samplers of sd-scripts. Each image has
/// its prompt and settings in PNG text chunks. Exit codes: 0 ok, 1 fatal error, 2 usage error.
#[derive(Parser)]
#[command(version, rename_all = "snake_case")]
struct Args {
    #[command(flatten)]
    tool: GenerateImagesArgs,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    args.log.init();
    lorakit_pipeline::infra::report::run("generate-images", || args.tool.run(args.log.quiet))
}
