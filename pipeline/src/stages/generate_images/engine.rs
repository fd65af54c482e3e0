//! The models of a generation run, loaded once: text encoder(s) with their tokenizers, the UNet
//! (LoRAs merged into both at their multipliers, text-encoder modules too, as gen_img.py applies
//! them), the VAE decoder; and the sampling loop with classifier-free guidance.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::models::adapter::{Adaptable, Joined};
use crate::models::checkpoint::{Checkpoint, Component};
use crate::models::clip::{apply_weights, encode_sd, encode_sdxl};
use crate::models::samplers::{NoiseSource, Prediction, Sampler, SamplerConfig};
use crate::models::text_encoders::{paddings, text_encoders_of, TextEncoders};
use crate::models::unet::{self, sdxl_vector, Unet, SIZE_VALUES};
use crate::models::vae::VaeDecoder;
use crate::models::{ComputeDevice, ModelFamily};
use crate::text::tokenize::{
    tokenizer_source, ClipTokenizer, MaxTokenLength, TokenChunks, TokenizerSource, CHUNK_BODY,
    CHUNK_LEN,
};
use crate::{Error, Result};

/// When generating in float32 the UNet's 3x3 convolutions run in the Winograd domain (4x fewer
/// multiplications). Those with at most this many output channels (the two highest-resolution
/// levels of SD1.x, SD2.x and SDXL, where most of the convolution work is) keep their
/// transformed kernels, about 1 GB at SD1.5 size; the wider ones transform theirs at each pass.
const WINOGRAD_MAX_KEPT_CHANNELS: usize = 640;

/// What to load.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// `--ckpt`: single-file checkpoint or diffusers folder.
    pub ckpt: PathBuf,
    /// `--vae`: a VAE to use instead of the checkpoint's.
    pub vae: Option<PathBuf>,
    /// `--tokenizer`: folder with the CLIP vocabulary (default: the model's).
    pub tokenizer: Option<PathBuf>,
    /// `--network_weights` with their multipliers.
    pub networks: Vec<(PathBuf, f64)>,
    /// `--clip_skip` (SD1/SD2).
    pub clip_skip: Option<usize>,
    /// `--v_parameterization`.
    pub prediction: Prediction,
    /// Compute dtype of UNet and text encoders (`--fp16` / `--bf16`; the VAE stays float32).
    pub dtype: DType,
    /// `--max_embeddings_multiples`: up to this many 75-token chunks per prompt (1 to 3).
    pub max_embeddings_multiples: usize,
    /// `--v2`: the model must be SD2.x.
    pub v2: bool,
    /// `--sdxl`: the model must be SDXL.
    pub require_sdxl: bool,
    /// `--device`: where the models run.
    pub device: ComputeDevice,
}

/// The conditioning of one prompt: the UNet context `[T, D]` and, for SDXL, pool2 `[P]`.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Cross-attention context.
    pub context: Tensor,
    /// SDXL's pooled output of text encoder 2.
    pub pool: Option<Tensor>,
}

/// Everything one image of a batch needs besides the shared settings.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// Prompt conditioning.
    pub cond: Conditioning,
    /// Negative-prompt conditioning (the unconditional branch of CFG).
    pub uncond: Conditioning,
    /// SDXL size values: original (h, w), crop (top, left), target (h, w).
    pub sizes: [i64; SIZE_VALUES],
}

/// The loaded models.
pub struct Engine {
    family: ModelFamily,
    encoders: TextEncoders,
    tokenizers: Vec<ClipTokenizer>,
    clip_skip: usize,
    unet: Unet,
    vae: VaeDecoder,
    vae_scale: f64,
    max_chunks: usize,
    dtype: DType,
    device: Device,
}

fn model_error(context: &'static str) -> impl Fn(candle_core::Error) -> Error {
    move |e| Error::Model(format!("{context}: {e}"))
}

impl Engine {
    /// Loads the checkpoint's text encoder(s), UNet (with every network merged) and VAE decoder.
    pub fn load(options: &EngineOptions) -> Result<Self> {
        if !(1..=3).contains(&options.max_embeddings_multiples) {
            return Err(Error::Usage(format!(
                "--max_embeddings_multiples must be 1, 2 or 3 (75, 150 or 225 tokens), not {}",
                options.max_embeddings_multiples
            )));
        }
        crate::models::tune_process_for_models();
        let device = options.device.open(0)?;
        let checkpoint = Checkpoint::open(&options.ckpt)?;
        let mut encoders = text_encoders_of(&checkpoint, options.dtype, &device)?;
        let family = encoders.family;
        let model = options.ckpt.display();
        if options.require_sdxl && family != ModelFamily::Sdxl {
            return Err(Error::Usage(format!(
                "--sdxl given, but {model} is an {} model",
                family.name()
            )));
        }
        if family != ModelFamily::Sdxl && options.v2 != (family == ModelFamily::Sd2) {
            return Err(Error::Usage(format!(
                "{model} is an {} model: {} --v2",
                family.name(),
                if options.v2 { "remove" } else { "add" }
            )));
        }
        let clip_skip = match (family, options.clip_skip) {
            (ModelFamily::Sdxl, Some(_)) => {
                tracing::warn!("--clip_skip is ignored for SDXL");
                1
            }
            (_, k) => k.unwrap_or(1),
        };
        let layers = encoders.encoders[0].config().num_hidden_layers;
        if clip_skip == 0 || clip_skip > layers {
            return Err(Error::Usage(format!(
                "--clip_skip must be between 1 and {layers} for this text encoder, not {clip_skip}"
            )));
        }
        let tokenizers = tokenizer_sources(&options.ckpt, options.tokenizer.as_deref(), family)
            .iter()
            .zip(paddings(family))
            .map(|(source, &padding)| ClipTokenizer::open(source, padding))
            .collect::<Result<Vec<_>>>()?;

        let mapping = unet::ldm_mapping(checkpoint.family());
        let vb = checkpoint.var_builder(Component::Unet, options.dtype, &device, &mapping)?;
        let mut unet = Unet::load(&vb, options.dtype).map_err(|e| {
            Error::bad_file(
                &options.ckpt,
                format!("not an SD1.x/SD2.x/SDXL checkpoint with a UNet: {e}"),
            )
        })?;
        for (encoder, prefix) in encoders
            .encoders
            .iter_mut()
            .zip(family.text_encoder_lora_prefixes())
        {
            encoder.set_lora_prefix(prefix);
        }
        for (path, multiplier) in &options.networks {
            let mut models: Vec<&mut dyn Adaptable> = (encoders.encoders.iter_mut())
                .map(|encoder| encoder as &mut dyn Adaptable)
                .collect();
            models.push(&mut unet);
            let report = crate::networks::merge_file(&mut Joined(models), path, *multiplier)?;
            if report.applied == 0 {
                return Err(Error::bad_file(
                    path,
                    "no module of this LoRA matches the model (a LoRA of another model family?)",
                ));
            }
            tracing::info!(
                "{}: {} UNet and {} text-encoder modules merged at multiplier {multiplier}",
                path.display(),
                report.applied - report.applied_text_encoder,
                report.applied_text_encoder,
            );
            if report.ignored_text_encoder > 0 || !report.unknown.is_empty() {
                tracing::warn!(
                    "{}: {} modules match no layer of this model and are not used",
                    path.display(),
                    report.ignored_text_encoder + report.unknown.len()
                );
            }
        }
        if options.dtype == DType::F32 {
            unet.use_winograd_forward(WINOGRAD_MAX_KEPT_CHANNELS)?;
        }
        let layout = |e: candle_core::Error| Error::Model(format!("inference layout: {e}"));
        unet.use_inference_layout().map_err(layout)?;
        for encoder in encoders.encoders.iter_mut() {
            encoder.use_inference_layout().map_err(layout)?;
        }
        let vae = match &options.vae {
            Some(path) => VaeDecoder::load(&Checkpoint::open(path)?, DType::F32, &device)?,
            None => VaeDecoder::load(&checkpoint, DType::F32, &device)?,
        };
        let vae_scale = if family == ModelFamily::Sdxl {
            0.13025
        } else {
            0.18215
        };
        Ok(Engine {
            family,
            encoders,
            tokenizers,
            clip_skip,
            unet,
            vae,
            vae_scale,
            max_chunks: options.max_embeddings_multiples,
            dtype: options.dtype,
            device,
        })
    }

    /// The model family.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Encodes prompts (A1111 attention syntax parsed, as gen_img does) into conditionings of one
    /// common length: the longest prompt's chunk count, at most `--max_embeddings_multiples`.
    pub fn encode(&self, prompts: &[&str]) -> Result<Vec<Conditioning>> {
        let mut longest = 0;
        for prompt in prompts {
            for tokenizer in &self.tokenizers {
                let mut length = 0;
                for (fragment, _) in crate::text::tokenize::parse_prompt_attention(prompt) {
                    length += tokenizer.body_ids(&fragment)?.len();
                }
                longest = longest.max(length);
            }
        }
        let chunks = (longest.max(1) - 1) / CHUNK_BODY + 1;
        let max_len = MaxTokenLength::new(chunks.min(self.max_chunks) * CHUNK_BODY)?;
        prompts
            .iter()
            .map(|prompt| {
                let tokens: Vec<TokenChunks> = self
                    .tokenizers
                    .iter()
                    .map(|t| t.tokenize_weighted(prompt, max_len))
                    .collect::<Result<_>>()?;
                if tokens.iter().any(|t| t.truncated) {
                    tracing::warn!(
                        "prompt longer than {} tokens, cut (--max_embeddings_multiples raises the limit): {prompt}",
                        max_len.tokens()
                    );
                }
                self.encode_tokens(&tokens, max_len)
            })
            .collect()
    }

    fn encode_tokens(
        &self,
        tokens: &[TokenChunks],
        max_len: MaxTokenLength,
    ) -> Result<Conditioning> {
        let ids = |i: usize| {
            Tensor::from_vec(
                tokens[i].ids.clone(),
                (1, max_len.chunks(), CHUNK_LEN),
                &self.device,
            )
            .map_err(model_error("token ids"))
        };
        let weighted = |i: usize, hidden: Tensor| -> Result<Tensor> {
            if tokens[i].is_unweighted() {
                return Ok(hidden);
            }
            let weights = Tensor::from_vec(
                tokens[i].body_weights(),
                (1, max_len.tokens()),
                &self.device,
            )
            .map_err(model_error("prompt weights"))?;
            renormalized(&hidden, &apply_weights(&hidden, &weights)?)
        };
        match self.family {
            ModelFamily::Sd1 | ModelFamily::Sd2 => {
                let hidden = encode_sd(&self.encoders.encoders[0], &ids(0)?, self.clip_skip)?;
                let hidden = weighted(0, hidden)?;
                Ok(Conditioning {
                    context: hidden.squeeze(0).map_err(model_error("context"))?,
                    pool: None,
                })
            }
            ModelFamily::Sdxl => {
                let out = encode_sdxl(
                    &self.encoders.encoders[0],
                    &self.encoders.encoders[1],
                    &ids(0)?,
                    &ids(1)?,
                    self.tokenizers[1].eos_id(),
                )?;
                let h1 = weighted(0, out.hidden_state1)?;
                let h2 = weighted(1, out.hidden_state2)?;
                let context = Tensor::cat(&[h1, h2], 2)
                    .and_then(|c| c.squeeze(0))
                    .map_err(model_error("context"))?;
                Ok(Conditioning {
                    context,
                    pool: Some(out.pool2.squeeze(0).map_err(model_error("pool"))?),
                })
            }
        }
    }

    /// Runs the sampler from `noise` (`[B, 4, h, w]` standard normal, on any device; so is
    /// `step_noise`) to the final latents (on the engine's device),
    /// with classifier-free guidance at `scale` (none when `scale` is 1 or less, as diffusers).
    /// `negative_scale` adds gen_img's third branch with the negative prompt at that scale, the
    /// unconditional branch then being the empty prompt (`empty`).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        requests: &[ImageRequest],
        noise: &Tensor,
        config: SamplerConfig,
        steps: usize,
        scale: f64,
        negative_scale: Option<(f64, &Conditioning)>,
        step_noise: &mut NoiseSource<'_>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let batch = requests.len();
        let mut sampler = Sampler::new(config, steps)?;
        let guided = scale > 1.0;
        // Branches, in order: uncond (or the empty prompt with --negative_scale), cond, negative.
        let mut branches: Vec<Vec<&Conditioning>> = Vec::new();
        if guided {
            branches.push(match negative_scale {
                Some((_, empty)) => vec![empty; batch],
                None => requests.iter().map(|r| &r.uncond).collect(),
            });
        }
        branches.push(requests.iter().map(|r| &r.cond).collect());
        if let (true, Some(_)) = (guided, negative_scale) {
            branches.push(requests.iter().map(|r| &r.uncond).collect());
        }
        let all: Vec<&Conditioning> = branches.iter().flatten().copied().collect();
        let contexts: Vec<Tensor> = all.iter().map(|c| c.context.clone()).collect();
        let context = Tensor::stack(&contexts, 0)
            .and_then(|c| c.to_dtype(self.dtype))
            .map_err(model_error("context"))?;
        let vector = match self.family {
            ModelFamily::Sdxl => {
                let pools: Vec<Tensor> = all
                    .iter()
                    .map(|c| {
                        c.pool
                            .clone()
                            .ok_or_else(|| Error::Model("SDXL prompt without pool2".into()))
                    })
                    .collect::<Result<_>>()?;
                let sizes: Vec<[i64; SIZE_VALUES]> = (0..branches.len())
                    .flat_map(|_| requests.iter().map(|r| r.sizes))
                    .collect();
                let pool = Tensor::stack(&pools, 0).map_err(model_error("pool"))?;
                Some(sdxl_vector(&pool, &sizes).map_err(model_error("size conditioning"))?)
            }
            _ => None,
        };
        let copies = branches.len();
        let mut latents = (noise.to_device(&self.device))
            .and_then(|noise| noise * sampler.init_noise_sigma())
            .map_err(model_error("noise"))?;
        let mut step_noise = |shape: &[usize]| -> Result<Tensor> {
            (step_noise(shape)?.to_device(&self.device)).map_err(model_error("noise"))
        };
        let timesteps = sampler.timesteps().to_vec();
        for (index, &t) in timesteps.iter().enumerate() {
            let input = sampler.scale_model_input(&latents)?;
            let repeated: Vec<&Tensor> = (0..copies).map(|_| &input).collect();
            let input = Tensor::cat(&repeated, 0)
                .and_then(|x| x.to_dtype(self.dtype))
                .map_err(model_error("model input"))?;
            let times =
                Tensor::from_vec(vec![t as f32; copies * batch], copies * batch, &self.device)
                    .map_err(model_error("timesteps"))?;
            let output = self
                .unet
                .forward(&input, &times, &context, vector.as_ref())
                .and_then(|o| o.to_dtype(DType::F32))
                .map_err(model_error("UNet"))?;
            let output = if guided {
                let run = || -> candle_core::Result<Tensor> {
                    let uncond = output.narrow(0, 0, batch)?;
                    let cond = output.narrow(0, batch, batch)?;
                    let mut guided = (&uncond + ((cond - &uncond)? * scale)?)?;
                    if let Some((negative, _)) = negative_scale {
                        let negative_branch = output.narrow(0, 2 * batch, batch)?;
                        guided = (guided - ((negative_branch - &uncond)? * negative)?)?;
                    }
                    Ok(guided)
                };
                run().map_err(model_error("guidance"))?
            } else {
                output
            };
            latents = sampler.step(&output, &latents, &mut step_noise)?;
            on_step(index + 1, timesteps.len());
        }
        Ok(latents)
    }

    /// Decodes final latents into RGB images (`[B, H, W, 3]` values in [0, 1], f32).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.vae_scale).map_err(model_error("latents"))?;
        let images = self.vae.decode(&scaled)?;
        let run = || -> candle_core::Result<Tensor> {
            ((images * 0.5)? + 0.5)?
                .clamp(0f32, 1f32)?
                .permute((0, 2, 3, 1))?
                .contiguous()
        };
        run().map_err(model_error("VAE output"))
    }
}

/// gen_img's prompt weighting: the weighted hidden states scaled back to the unweighted mean
/// (`previous_mean / current_mean`, per prompt).
fn renormalized(plain: &Tensor, weighted: &Tensor) -> Result<Tensor> {
    let run = || -> candle_core::Result<Tensor> {
        let before = plain.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
        let after = weighted
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        weighted * f64::from(before / after)
    };
    run().map_err(model_error("prompt weights"))
}

/// Converts `[B, H, W, 3]` values in [0, 1] to 8-bit RGB pixels per image, rounded as diffusers
/// and gen_img do (`(x * 255).round()`).
pub fn to_rgb8(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (batch, height, width, _) = images.dims4().map_err(model_error("images"))?;
    let values: Vec<f32> = images
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(model_error("images"))?;
    let per_image = height * width * 3;
    (0..batch)
        .map(|b| {
            let pixels: Vec<u8> = values[b * per_image..(b + 1) * per_image]
                .iter()
                .map(|v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
                .collect();
            image::RgbImage::from_raw(width as u32, height as u32, pixels)
                .ok_or_else(|| Error::Model("image buffer size".into()))
        })
        .collect()
}

fn tokenizer_sources(
    model: &Path,
    explicit: Option<&Path>,
    family: ModelFamily,
) -> Vec<TokenizerSource> {
    let first = tokenizer_source(model, explicit);
    if family != ModelFamily::Sdxl {
        return vec![first];
    }
    let second = [model.join("tokenizer_2")]
        .into_iter()
        .find(|dir| explicit.is_none() && dir.join("vocab.json").is_file())
        .map_or_else(|| first.clone(), TokenizerSource::Folder);
    vec![first, second]
}
