//! The flags of `generate-images` (gen_img.py spellings) and the stage options they describe.

use std::path::PathBuf;

use crate::infra::report::Summary;
use crate::models::precision::MixedPrecision;
use crate::models::samplers::{Prediction, SamplerKind};
use crate::models::ComputeDevice;
use crate::stages::generate_images::engine::EngineOptions;
use crate::stages::generate_images::GenerateOptions;
use crate::{Error, Result};

/// The flags of `generate-images`; the tool adds its description and the logging flags.
#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct GenerateImagesArgs {
    /// Model: single-file checkpoint (.safetensors) or diffusers folder (SD1.x, SD2.x, SDXL:
    /// detected from the weights).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Folder the PNGs are written to.
    #[arg(long, default_value = "outputs")]
    pub outdir: PathBuf,
    /// One prompt, with optional ` --n`, ` --w`, ` --h`, ` --d`, ` --l`, ` --s`, ` --ss`, ` --nl`
    /// options (as in prompt files).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt file: .txt (one prompt line each), .toml ([[prompt.subset]] tables) or .json.
    #[arg(long)]
    pub from_file: Option<PathBuf>,
    /// Image width (rounded down to a multiple of 8; default 512, SDXL 1024).
    #[arg(long = "W")]
    pub width: Option<usize>,
    /// Image height (rounded down to a multiple of 8; default 512, SDXL 1024).
    #[arg(long = "H")]
    pub height: Option<usize>,
    /// Sampling steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Sampler: ddim, pndm (at least 4 steps), lms (k_lms), euler (k_euler), euler_a
    /// (k_euler_a), heun, dpm_2 (k_dpm_2), dpm_2_a (k_dpm_2_a), dpmsolver, dpmsolver++,
    /// dpmsingle.
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    /// Classifier-free guidance scale (1 or less: no guidance).
    #[arg(long, default_value_t = 7.5)]
    pub scale: f64,
    /// Guidance away from the negative prompt at this scale, the unconditional branch being the
    /// empty prompt (gen_img's --negative_scale).
    #[arg(long)]
    pub negative_scale: Option<f64>,
    /// Seed: with one prompt and one image, the image's seed; otherwise the seed of the
    /// generator of every image's seed (random when not given).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub images_per_prompt: usize,
    /// Images per UNet call (images of one batch share size, steps, scale and sampler).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// LoRA files (kohya LoRA or DyLoRA, or LyCORIS LoCon/LoHa/LoKr) merged into the UNet and
    /// text encoder.
    #[arg(long, num_args = 1..)]
    pub network_weights: Vec<PathBuf>,
    /// Multiplier of each --network_weights file (default 1; one value applies to all).
    #[arg(long, num_args = 1..)]
    pub network_mul: Vec<f64>,
    /// Use the output of the k-th layer from the end of the text encoder (SD1/SD2).
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// Up to this many 75-token chunks per prompt (1 to 3; default 1, as gen_img).
    #[arg(long, default_value_t = 1)]
    pub max_embeddings_multiples: usize,
    /// SD2.x model (checked against the weights).
    #[arg(long)]
    pub v2: bool,
    /// The model predicts v (SD2.x 768-v models).
    #[arg(long)]
    pub v_parameterization: bool,
    /// VAE to decode with instead of the checkpoint's (single file or diffusers folder).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Folder with the CLIP vocab.json and merges.txt (default: the model's tokenizer/).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Refuse models that are not SDXL (the family is detected from the weights anyway).
    #[arg(long)]
    pub sdxl: bool,
    /// SDXL size conditioning: original width (default: the image width).
    #[arg(long)]
    pub original_width: Option<usize>,
    /// SDXL size conditioning: original height (default: the image height).
    #[arg(long)]
    pub original_height: Option<usize>,
    /// Run the UNet and text encoder in float16.
    #[arg(long)]
    pub fp16: bool,
    /// Run the UNet and text encoder in bfloat16.
    #[arg(long)]
    pub bf16: bool,
    /// Where the models run: cpu, or cuda (a build with the `cuda` feature).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: ComputeDevice,
    /// Name files im_000001.png, im_000002.png, ... instead of im_<time>_<index>_<seed>.png.
    #[arg(long)]
    pub sequential_file_name: bool,
    /// train-lora's sample images during training: samplers as sd-scripts configures them
    /// there (steps_offset 0, clip_sample on for ddim) instead of as gen_img.py, and files named
    /// `<PREFIX>_<prompt index:02>_<time>[_<seed>].png` as sd-scripts names them.
    #[arg(long, hide = true, value_name = "PREFIX")]
    pub training_samples: Option<String>,
}

impl GenerateImagesArgs {
    /// The stage options these flags describe (`quiet` comes from the logging flags).
    pub fn options(self, quiet: bool) -> Result<GenerateOptions> {
        SamplerKind::parse(&self.sampler)?;
        let muls = match self.network_mul.as_slice() {
            [] => vec![1.0; self.network_weights.len()],
            [one] => vec![*one; self.network_weights.len()],
            many if many.len() == self.network_weights.len() => many.to_vec(),
            many => {
                return Err(Error::Usage(format!(
                    "{} --network_mul values for {} --network_weights files",
                    many.len(),
                    self.network_weights.len()
                )))
            }
        };
        let precision = match (self.fp16, self.bf16) {
            (true, true) => return Err(Error::Usage("give --fp16 or --bf16, not both".into())),
            (true, false) => MixedPrecision::Fp16,
            (false, true) => MixedPrecision::Bf16,
            (false, false) => MixedPrecision::No,
        };
        if self.v_parameterization && !self.v2 {
            tracing::warn!(
                "--v_parameterization without --v2: SD1.x and SDXL models predict noise"
            );
        }
        Ok(GenerateOptions {
            engine: EngineOptions {
                ckpt: self.ckpt,
                vae: self.vae,
                tokenizer: self.tokenizer,
                networks: self.network_weights.into_iter().zip(muls).collect(),
                clip_skip: self.clip_skip,
                prediction: if self.v_parameterization {
                    Prediction::V
                } else {
                    Prediction::Epsilon
                },
                dtype: precision.dtype(),
                max_embeddings_multiples: self.max_embeddings_multiples,
                v2: self.v2,
                require_sdxl: self.sdxl,
                device: self.device,
            },
            outdir: self.outdir,
            prompt: self.prompt,
            from_file: self.from_file,
            width: self.width,
            height: self.height,
            steps: self.steps,
            sampler: self.sampler,
            scale: self.scale,
            negative_scale: self.negative_scale,
            seed: self.seed,
            images_per_prompt: self.images_per_prompt,
            batch_size: self.batch_size,
            original_size: (self.original_width, self.original_height),
            sequential_file_name: self.sequential_file_name,
            training_samples: self.training_samples,
            quiet,
        })
    }

    /// Runs the stage with these flags.
    pub fn run(self, quiet: bool) -> Result<Summary> {
        crate::stages::generate_images::run(&self.options(quiet)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::parse_flags;

    fn parse(flags: &[&str]) -> GenerateImagesArgs {
        parse_flags(&["generate-images", "--ckpt", "m.safetensors"], flags)
    }

    #[test]
    fn gen_img_flag_names_reach_the_options() {
        let options = parse(&[
            "--W",
            "640",
            "--H",
            "384",
            "--steps",
            "12",
            "--sampler",
            "k_euler_a",
            "--scale",
            "5",
            "--network_weights",
            "a.safetensors",
            "b.safetensors",
            "--network_mul",
            "0.5",
            "0.7",
            "--v2",
            "--v_parameterization",
            "--prompt",
            "a cat --n dog",
        ])
        .options(false)
        .unwrap();
        assert_eq!((options.width, options.height), (Some(640), Some(384)));
        assert_eq!(options.steps, 12);
        assert_eq!(options.engine.networks.len(), 2);
        assert_eq!(options.engine.networks[1].1, 0.7);
        assert_eq!(options.engine.prediction, Prediction::V);
    }

    #[test]
    fn unknown_samplers_and_mismatched_multipliers_are_refused() {
        let message = parse(&["--sampler", "k_foo"])
            .options(false)
            .unwrap_err()
            .to_string();
        assert!(message.contains("euler_a"), "{message}");
        assert!(parse(&[
            "--network_weights",
            "a",
            "b",
            "--network_mul",
            "1",
            "2",
            "3"
        ])
        .options(false)
        .is_err());
    }
}
