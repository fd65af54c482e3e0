//! The `generate-images` stage (sd-scripts' `gen_img.py`): text-to-image with an SD1.x / SD2.x /
//! SDXL checkpoint and optional LoRAs, classifier-free guidance and the samplers of
//! [`crate::models::samplers`]. Each image's initial noise and ancestral-step noise come from its
//! own seed, so an image does not depend on its batch. PNGs are written atomically with
//! gen_img's text chunks and an A1111-style `parameters` chunk.

pub mod engine;
pub mod png;
pub mod prompts;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::infra::fsio;
use crate::infra::report::{Progress, Summary, Throughput};
use crate::models::samplers::{Prediction, SamplerConfig, SamplerKind};
use crate::models::ModelFamily;
use crate::{Error, Result};
use engine::{Conditioning, Engine, EngineOptions, ImageRequest};
use prompts::{parse_prompt_line, read_prompt_file, PromptLine};

/// Options of one generation run.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Models to load.
    pub engine: EngineOptions,
    /// `--outdir`.
    pub outdir: PathBuf,
    /// `--prompt`: one prompt line (with ` --` options).
    pub prompt: Option<String>,
    /// `--from_file`: a prompt file (.txt, .toml, .json).
    pub from_file: Option<PathBuf>,
    /// `--W` (default 512, SDXL 1024).
    pub width: Option<usize>,
    /// `--H` (default 512, SDXL 1024).
    pub height: Option<usize>,
    /// `--steps`.
    pub steps: usize,
    /// `--sampler`.
    pub sampler: String,
    /// `--scale`: CFG scale.
    pub scale: f64,
    /// `--negative_scale`.
    pub negative_scale: Option<f64>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--images_per_prompt`.
    pub images_per_prompt: usize,
    /// `--batch_size`.
    pub batch_size: usize,
    /// `--original_width` / `--original_height` (SDXL; default: the image size).
    pub original_size: (Option<usize>, Option<usize>),
    /// `--sequential_file_name`: `im_000001.png`, ... instead of time stamp and seed.
    pub sequential_file_name: bool,
    /// Sample images during training (train-lora's child run), with this file-name prefix:
    /// samplers configured as sd-scripts' `get_my_scheduler` rather than as gen_img.py, and each
    /// image named as sd-scripts' `sample_image_inference` names it,
    /// `{prefix}_{prompt index:02}_{time}[_{seed}].png` (the seed only where the prompt gives
    /// one; `--f` file names are not used).
    pub training_samples: Option<String>,
    /// No progress display.
    pub quiet: bool,
}

/// One image to make.
#[derive(Debug, Clone)]
struct Job {
    line: PromptLine,
    seed: u64,
    width: usize,
    height: usize,
    steps: usize,
    scale: f64,
    sampler: SamplerKind,
    /// Index of the image over the whole run.
    index: usize,
}

impl Job {
    /// Images with the same key can share a batch.
    fn batch_key(&self) -> (usize, usize, usize, u64, &'static str) {
        (
            self.width,
            self.height,
            self.steps,
            self.scale.to_bits(),
            self.sampler.name(),
        )
    }
}

/// A seeded stream of standard-normal values (Box–Muller over `StdRng`), one per image.
pub struct SeedNoise(rand::rngs::StdRng);

impl SeedNoise {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        SeedNoise(rand::rngs::StdRng::seed_from_u64(seed))
    }

    /// `n` standard-normal values.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = self.0.random_range(f64::EPSILON..1.0);
                let u2: f64 = self.0.random();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }
}

/// Draws one `[1, C, h, w]` slice per stream and stacks them into `shape` (`[B, C, h, w]`).
pub fn draw_batch(streams: &mut [SeedNoise], shape: &[usize]) -> Result<Tensor> {
    let per = shape[1..].iter().product();
    let values: Vec<f32> = streams.iter_mut().flat_map(|s| s.normals(per)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).map_err(|e| Error::Model(format!("noise: {e}")))
}

/// The A1111 name of a sampler (for the `parameters` text).
fn a1111_sampler(kind: SamplerKind) -> &'static str {
    match kind {
        SamplerKind::Ddim => "DDIM",
        SamplerKind::Lms => "LMS",
        SamplerKind::Euler => "Euler",
        SamplerKind::EulerAncestral => "Euler a",
        SamplerKind::Heun => "Heun",
        SamplerKind::DpmSolver => "DPM-Solver 2M",
        SamplerKind::DpmSolverPlusPlus => "DPM++ 2M",
        SamplerKind::Pndm => "PLMS",
        SamplerKind::DpmSingle => "DPM++ 2S",
        SamplerKind::Dpm2 => "DPM2",
        SamplerKind::Dpm2Ancestral => "DPM2 a",
    }
}

/// Runs `generate-images`; returns the images written.
pub fn run(options: &GenerateOptions) -> Result<Summary> {
    if options.batch_size == 0 || options.images_per_prompt == 0 {
        return Err(Error::Usage(
            "--batch_size and --images_per_prompt must be at least 1".into(),
        ));
    }
    let default_sampler = SamplerKind::parse(&options.sampler)?;
    let lines = prompt_lines(options)?;
    if options.outdir.exists() && !options.outdir.is_dir() {
        return Err(Error::bad_file(
            &options.outdir,
            "--outdir is a file, not a folder: choose another name",
        ));
    }
    let engine = Engine::load(&options.engine)?;
    let jobs = plan_jobs(options, &lines, default_sampler, engine.family())?;
    std::fs::create_dir_all(&options.outdir).map_err(|e| Error::io(&options.outdir, e))?;

    let progress = Progress::new("generate-images", jobs.len(), options.quiet);
    let mut summary = Summary::default();
    let model_name = options
        .engine
        .ckpt
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hashes = InfotextHashes::of(options)?;
    let mut steps_done = 0;
    let mut start = 0;
    while start < jobs.len() {
        let key = jobs[start].batch_key();
        let mut end = start + 1;
        while end < jobs.len() && end - start < options.batch_size && jobs[end].batch_key() == key {
            end += 1;
        }
        let batch = &jobs[start..end];
        let images = generate_batch(options, &engine, batch, &progress)?;
        steps_done += batch[0].steps;
        let timestamp = crate::infra::clock::local_timestamp();
        for (position, (job, image)) in batch.iter().zip(images).enumerate() {
            let name = match (&options.training_samples, &job.line.filename) {
                (Some(prefix), _) => {
                    let prompt_index = job.index / options.images_per_prompt;
                    let seed_suffix = if job.line.seeds.is_empty() {
                        String::new()
                    } else {
                        format!("_{}", job.seed)
                    };
                    format!("{prefix}_{prompt_index:02}_{timestamp}{seed_suffix}.png")
                }
                (None, Some(name)) => name.clone(),
                (None, None) if options.sequential_file_name => {
                    format!("im_{:06}.png", job.index + 1)
                }
                (None, None) => format!("im_{timestamp}_{position:03}_{}.png", job.seed),
            };
            let path = options.outdir.join(name);
            let texts = png_texts(options, job, engine.family(), &model_name, &hashes);
            fsio::write_atomic(&path, &png::encode_png(&image, &texts)?)?;
            tracing::debug!("wrote {}", path.display());
            summary.done += 1;
            progress.inc(1);
        }
        start = end;
    }
    progress.finish();
    summary.throughput = Some(Throughput {
        count: steps_done,
        unit: "sampling steps",
    });
    Ok(summary)
}

/// The prompt lines of `--prompt` or `--from_file`.
fn prompt_lines(options: &GenerateOptions) -> Result<Vec<PromptLine>> {
    let lines = match (&options.prompt, &options.from_file) {
        (Some(_), Some(_)) => {
            return Err(Error::Usage(
                "give --prompt or --from_file, not both".into(),
            ))
        }
        (Some(prompt), None) => vec![parse_prompt_line(prompt)],
        (None, Some(path)) => read_prompt_file(path)?,
        (None, None) => {
            return Err(Error::Usage(
                "nothing to generate: give --prompt TEXT or --from_file FILE".into(),
            ))
        }
    };
    if lines.is_empty() {
        return Err(Error::Usage("the prompt file holds no prompt".into()));
    }
    for line in &lines {
        for ignored in &line.ignored {
            tracing::warn!(
                "prompt option {ignored:?} not understood, ignored ({:?})",
                line.prompt
            );
        }
        if !line.network_muls.is_empty() {
            tracing::warn!("--am (per-prompt network multipliers) is not supported, ignored; use --network_mul");
        }
    }
    Ok(lines)
}

/// One job per image: sizes, steps, scale, sampler and seed resolved.
fn plan_jobs(
    options: &GenerateOptions,
    lines: &[PromptLine],
    default_sampler: SamplerKind,
    family: ModelFamily,
) -> Result<Vec<Job>> {
    let default_size = if family == ModelFamily::Sdxl {
        1024
    } else {
        512
    };
    // gen_img: a fixed --seed with one image in all is used as is; otherwise each image's seed
    // is drawn from a generator seeded with it (ours is not Python's, so the values differ).
    let single = lines.len() == 1 && options.images_per_prompt == 1;
    let mut seeds = rand::rngs::StdRng::seed_from_u64(options.seed.unwrap_or_else(rand::random));
    let mut jobs = Vec::new();
    for line in lines {
        let sampler = match &line.sampler {
            Some(name) => SamplerKind::parse(name)?,
            None => default_sampler,
        };
        let round = |v: usize| (v - v % 8).max(64);
        let width = round(line.width.or(options.width).unwrap_or(default_size));
        let height = round(line.height.or(options.height).unwrap_or(default_size));
        for k in 0..options.images_per_prompt {
            let seed = match (line.seeds.get(k), options.seed) {
                (Some(&seed), _) => seed,
                (None, Some(seed)) if single => seed,
                _ => u64::from(seeds.random::<u32>()),
            };
            jobs.push(Job {
                line: line.clone(),
                seed,
                width,
                height,
                steps: line.steps.unwrap_or(options.steps),
                scale: line.scale.unwrap_or(options.scale),
                sampler,
                index: jobs.len(),
            });
        }
    }
    Ok(jobs)
}

/// Samples and decodes one batch of jobs that share size, steps, scale and sampler.
fn generate_batch(
    options: &GenerateOptions,
    engine: &Engine,
    batch: &[Job],
    progress: &Progress,
) -> Result<Vec<image::RgbImage>> {
    let first = &batch[0];
    let negative_scale = first.line.negative_scale.or(options.negative_scale);
    let mut texts: Vec<&str> = Vec::new();
    for job in batch {
        texts.push(&job.line.prompt);
        texts.push(job.line.negative_prompt.as_deref().unwrap_or(""));
    }
    if negative_scale.is_some() {
        texts.push("");
    }
    let mut encoded = engine.encode(&texts)?;
    let empty: Option<Conditioning> = negative_scale.map(|_| encoded.pop()).flatten();
    let mut encoded = encoded.into_iter();
    let requests: Vec<ImageRequest> = batch
        .iter()
        .map(|job| {
            let cond = encoded.next().expect("one conditioning per prompt");
            let uncond = encoded
                .next()
                .expect("one conditioning per negative prompt");
            let original_w = job
                .line
                .original_width
                .or(options.original_size.0)
                .unwrap_or(job.width);
            let original_h = job
                .line
                .original_height
                .or(options.original_size.1)
                .unwrap_or(job.height);
            ImageRequest {
                cond,
                uncond,
                sizes: [
                    original_h as i64,
                    original_w as i64,
                    job.line.crop_top.unwrap_or(0) as i64,
                    job.line.crop_left.unwrap_or(0) as i64,
                    job.height as i64,
                    job.width as i64,
                ],
            }
        })
        .collect();
    let mut streams: Vec<SeedNoise> = batch.iter().map(|job| SeedNoise::new(job.seed)).collect();
    let shape = [batch.len(), 4, first.height / 8, first.width / 8];
    let noise = draw_batch(&mut streams, &shape)?;
    let prediction = options.engine.prediction;
    let config = if options.training_samples.is_some() {
        SamplerConfig::training_samples(first.sampler, prediction)
    } else {
        SamplerConfig::gen_img(first.sampler, prediction)
    };
    let mut step_noise = |shape: &[usize]| draw_batch(&mut streams, shape);
    let label = format!("{}x{} {}", first.width, first.height, first.sampler.name());
    let latents = engine.sample(
        &requests,
        &noise,
        config,
        first.steps,
        first.scale,
        negative_scale.zip(empty.as_ref()),
        &mut step_noise,
        &mut |step, total| progress.set_status(format!("{label} step {step}/{total}")),
    )?;
    engine::to_rgb8(&engine.decode(&latents)?)
}

/// The file hashes AUTOMATIC1111 writes into `parameters`, so that its PNG Info and model sites
/// find the checkpoint and LoRAs; computed once per run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InfotextHashes {
    /// `Model hash`: the first 10 hex digits of the checkpoint file's SHA-256 (A1111's short
    /// hash); none for a diffusers folder, which A1111 does not load.
    pub model: Option<String>,
    /// `Lora hashes`: each `--network_weights` file's name (its stem without `:` and `,`, as
    /// A1111 writes names) and the first 12 hex digits of the SHA-256 of its tensor data
    /// (sd-scripts' `sshs_model_hash`, taken from the metadata when present, as A1111 does).
    pub loras: Vec<(String, String)>,
}

impl InfotextHashes {
    /// The hashes of `options`' checkpoint (memoised per file, it can be gigabytes) and networks.
    pub fn of(options: &GenerateOptions) -> Result<Self> {
        let ckpt = &options.engine.ckpt;
        let model = if ckpt.is_file() {
            let hash = crate::infra::hashing::memoised(&[ckpt.clone()], "sha256", || {
                crate::infra::hashing::sha256_file_from(ckpt, 0)
            })?;
            Some(hash[..10].to_string())
        } else {
            None
        };
        let loras = (options.engine.networks.iter())
            .map(|(path, _)| {
                let name = (path.file_stem())
                    .map(|s| s.to_string_lossy().replace([':', ','], ""))
                    .unwrap_or_default();
                Ok((name, safetensors_data_hash(path)?[..12].to_string()))
            })
            .collect::<Result<_>>()?;
        Ok(InfotextHashes { model, loras })
    }
}

/// sd-scripts' `sshs_model_hash` of a `.safetensors` file: from its metadata, else the SHA-256
/// of the bytes after the header.
fn safetensors_data_hash(path: &std::path::Path) -> Result<String> {
    let bytes = crate::infra::fsio::read(path)?;
    let (header_len, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a safetensors file ({e})")))?;
    let recorded = (header.metadata().as_ref())
        .and_then(|m| m.get("sshs_model_hash"))
        .filter(|h| h.len() >= 12 && h.chars().all(|c| c.is_ascii_hexdigit()));
    Ok(match recorded {
        Some(hash) => hash.to_lowercase(),
        None => crate::networks::lora::sha256_hex(&bytes[8 + header_len..]),
    })
}

/// The PNG text chunks of an image: gen_img's keys and an A1111-style `parameters`.
fn png_texts(
    options: &GenerateOptions,
    job: &Job,
    family: ModelFamily,
    model: &str,
    hashes: &InfotextHashes,
) -> Vec<(String, String)> {
    let negative = job.line.negative_prompt.clone().unwrap_or_default();
    let negative_scale = job.line.negative_scale.or(options.negative_scale);
    let mut texts = vec![
        ("prompt".to_string(), job.line.prompt.clone()),
        ("seed".to_string(), job.seed.to_string()),
        ("sampler".to_string(), job.sampler.name().to_string()),
        ("steps".to_string(), job.steps.to_string()),
        ("scale".to_string(), job.scale.to_string()),
        ("negative-prompt".to_string(), negative.clone()),
    ];
    if let Some(scale) = negative_scale {
        texts.push(("negative-scale".to_string(), scale.to_string()));
    }
    let mut parameters = job.line.prompt.clone();
    if !negative.is_empty() {
        parameters.push_str(&format!("\nNegative prompt: {negative}"));
    }
    let model_hash = (hashes.model.as_ref())
        .map(|hash| format!("Model hash: {hash}, "))
        .unwrap_or_default();
    parameters.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, {model_hash}Model: {model}",
        job.steps,
        a1111_sampler(job.sampler),
        job.scale,
        job.seed,
        job.width,
        job.height
    ));
    if family == ModelFamily::Sdxl {
        let original_w = job
            .line
            .original_width
            .or(options.original_size.0)
            .unwrap_or(job.width);
        let original_h = job
            .line
            .original_height
            .or(options.original_size.1)
            .unwrap_or(job.height);
        texts.push(("original-height".into(), original_h.to_string()));
        texts.push(("original-width".into(), original_w.to_string()));
        texts.push((
            "crop-top".into(),
            job.line.crop_top.unwrap_or(0).to_string(),
        ));
        texts.push((
            "crop-left".into(),
            job.line.crop_left.unwrap_or(0).to_string(),
        ));
    }
    if options.engine.prediction == Prediction::V {
        parameters.push_str(", v-prediction");
    }
    let loras: Vec<String> = options
        .engine
        .networks
        .iter()
        .map(|(path, mul)| {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("<lora:{name}:{mul}>")
        })
        .collect();
    if !loras.is_empty() {
        parameters.push_str(&format!(", Networks: {}", loras.join(" ")));
    }
    if !hashes.loras.is_empty() {
        let listed: Vec<String> = (hashes.loras.iter())
            .map(|(name, hash)| format!("{name}: {hash}"))
            .collect();
        // A1111 quotes a value holding `:` or `,`.
        parameters.push_str(&format!(", Lora hashes: \"{}\"", listed.join(", ")));
    }
    texts.push(("parameters".to_string(), parameters));
    texts
}
