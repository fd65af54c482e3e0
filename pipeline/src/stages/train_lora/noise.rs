//! Seeded noise and timesteps (docs/kohya-compat.md#noise-and-timesteps) from a Rust RNG, so runs
//! are reproducible and resumable: every micro-batch draws from its own stream
//! `(seed, micro-batch index)`; or recorded ones read from a file ([`RecordedNoise`]).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::formats::npz::NpzReader;
use crate::stages::train_lora::data::mix;
use crate::stages::train_lora::schedule::TRAIN_TIMESTEPS;
use crate::{Error, Result};

/// Noise options of `train_network.py`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoiseOptions {
    /// `--noise_offset`.
    pub noise_offset: Option<f64>,
    /// `--noise_offset_random_strength`.
    pub noise_offset_random_strength: bool,
    /// `--adaptive_noise_scale`.
    pub adaptive_noise_scale: Option<f64>,
    /// `--multires_noise_iterations`.
    pub multires_noise_iterations: Option<usize>,
    /// `--multires_noise_discount` (default 0.3).
    pub multires_noise_discount: f64,
    /// `--min_timestep` (default 0).
    pub min_timestep: usize,
    /// `--max_timestep` (default 1000).
    pub max_timestep: usize,
    /// `--ip_noise_gamma`: input perturbation of the noise the UNet sees (not of the target).
    pub ip_noise_gamma: Option<f64>,
    /// `--ip_noise_gamma_random_strength`: the gamma times `U(0, 1)` per micro-batch.
    pub ip_noise_gamma_random_strength: bool,
}

/// The draws of one micro-batch.
pub struct NoiseDraw {
    /// The noise `eps` (the target of eps-prediction).
    pub eps: Tensor,
    /// The noise added to the latents: `eps`, plus the input perturbation with `--ip_noise_gamma`.
    pub input_eps: Tensor,
    /// One timestep per sample.
    pub timesteps: Vec<usize>,
}

/// A seeded source of Gaussian and uniform draws.
pub struct NoiseRng(StdRng);

impl NoiseRng {
    /// The stream of micro-batch `index` of a run seeded with `seed`.
    pub fn for_micro_batch(seed: u64, index: u64) -> Self {
        Self(StdRng::seed_from_u64(mix(seed, 0x0015_e000, index)))
    }

    /// The seed of the LoRA dropout masks of micro-batch `index` (a stream separate from the
    /// noise's).
    pub fn dropout_stream(seed: u64, index: u64) -> u64 {
        mix(seed, 0x00d1_0e00, index)
    }

    /// The seed of the `--flip_aug` choices of micro-batch `index`.
    pub fn flip_stream(seed: u64, index: u64) -> u64 {
        mix(seed, 0x0f11_9a09, index)
    }

    /// The seed of the caption-variant choices of micro-batch `index` (caption augmentation).
    pub fn variant_stream(seed: u64, index: u64) -> u64 {
        mix(seed, 0x0ca9_7105, index)
    }

    /// The seed of the caption-dropout choices of micro-batch `index`.
    pub fn caption_dropout_stream(seed: u64, index: u64) -> u64 {
        mix(seed, 0x0d40_9ca9, index)
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1: f64 = self.0.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.0.random();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// `N(0, 1)` tensor of `shape` on `device`.
    pub fn normal_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let count = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|_| self.normal()).collect();
        Ok(Tensor::from_vec(values, shape, device)?)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0.random()
    }

    /// Uniform integer in `[low, high)` (or `low` when the range is empty).
    pub fn int(&mut self, low: usize, high: usize) -> usize {
        if high <= low {
            low
        } else {
            self.0.random_range(low..high)
        }
    }
}

/// Draws `eps` for scaled latents `x0` `[B, C, H, W]` with offset / multi-resolution noise,
/// per-sample timesteps, and the input perturbation.
pub fn draw(rng: &mut NoiseRng, x0: &Tensor, options: &NoiseOptions) -> Result<NoiseDraw> {
    let (b, c, h, w) = x0.dims4()?;
    let device = x0.device();
    let mut eps = rng.normal_tensor(&[b, c, h, w], device)?;
    if let Some(offset) = options.noise_offset.filter(|o| *o != 0.0) {
        let offset = if options.noise_offset_random_strength {
            rng.uniform() * offset
        } else {
            offset
        };
        let per_channel = rng.normal_tensor(&[b, c, 1, 1], device)?;
        let scaled = match options.adaptive_noise_scale {
            Some(a) => {
                let mean_abs = x0.mean_keepdim(3)?.mean_keepdim(2)?.abs()?;
                let strength = ((mean_abs * a)? + offset)?.relu()?;
                per_channel.mul(&strength)?
            }
            None => (per_channel * offset)?,
        };
        eps = eps.broadcast_add(&scaled)?;
    }
    if let Some(iterations) = options.multires_noise_iterations.filter(|&k| k > 0) {
        for i in 0..iterations {
            let r = 2.0 + 2.0 * rng.uniform();
            let hi = ((h as f64 / r.powi(i as i32)) as usize).max(1);
            let wi = ((w as f64 / r.powi(i as i32)) as usize).max(1);
            let coarse = rng.normal_tensor(&[b, c, hi, wi], device)?;
            let up = coarse.upsample_bilinear2d(h, w, false)?;
            eps = (eps + (up * options.multires_noise_discount.powi(i as i32))?)?;
            if hi == 1 || wi == 1 {
                break;
            }
        }
        let n = eps.elem_count() as f64;
        let mean = eps.mean_all()?.to_scalar::<f32>()? as f64;
        let var = eps
            .broadcast_sub(&Tensor::new(mean as f32, device)?)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64
            / (n - 1.0);
        eps = (eps / var.sqrt())?;
    }
    let timesteps = (0..b)
        .map(|_| rng.int(options.min_timestep, options.max_timestep))
        .collect();
    let input_eps = match options.ip_noise_gamma.filter(|g| *g != 0.0) {
        Some(gamma) => {
            let strength = if options.ip_noise_gamma_random_strength {
                rng.uniform() * gamma
            } else {
                gamma
            };
            (&eps + (rng.normal_tensor(&[b, c, h, w], device)? * strength)?)?
        }
        None => eps.clone(),
    };
    Ok(NoiseDraw {
        eps,
        input_eps,
        timesteps,
    })
}

/// Noise and timesteps recorded from another run (`--recorded_noise`): micro-batch `i` takes
/// `noise_<i>` (float32, the latents' shape) and `timesteps_<i>` (int64, one per sample) of an
/// `.npz`, as `tests/fixtures/generate/sdxl_train_run.py` records them from sd-scripts.
pub struct RecordedNoise {
    path: PathBuf,
    /// Per micro-batch: the noise, its shape, the timesteps.
    draws: Vec<(Vec<f32>, Vec<usize>, Vec<usize>)>,
}

impl RecordedNoise {
    /// Reads every `noise_<i>` / `timesteps_<i>` pair of `path`, `i` = 0, 1, … without gaps.
    pub fn read(path: &Path) -> Result<Self> {
        let mut npz = NpzReader::open(path)?;
        let mut draws = Vec::new();
        while npz.contains(&format!("noise_{}", draws.len())) {
            let i = draws.len();
            let (noise, shape) = npz.read_f32(&format!("noise_{i}"))?;
            let (timesteps, _) = npz.read_i64(&format!("timesteps_{i}"))?;
            let timesteps = (timesteps.iter())
                .map(|&t| usize::try_from(t).ok().filter(|&t| t < TRAIN_TIMESTEPS))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    Error::bad_file(path, format!("timesteps_{i}: outside 0..{TRAIN_TIMESTEPS}"))
                })?;
            draws.push((noise, shape, timesteps));
        }
        if draws.is_empty() {
            return Err(Error::bad_file(
                path,
                "no noise_0 array: not a recorded-noise file",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            draws,
        })
    }

    /// The recorded draw of micro-batch `index` for scaled latents `x0`, checked against their
    /// shape.
    pub fn draw(&self, index: u64, x0: &Tensor) -> Result<NoiseDraw> {
        let (noise, shape, timesteps) = self.draws.get(index as usize).ok_or_else(|| {
            Error::bad_file(
                &self.path,
                format!(
                    "micro-batch {index} has no recorded noise: the file holds {} (use at most that many steps)",
                    self.draws.len()
                ),
            )
        })?;
        if shape.as_slice() != x0.dims() || timesteps.len() != shape[0] {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "micro-batch {index}: recorded noise {shape:?} with {} timesteps, the batch's latents are {:?}",
                    timesteps.len(),
                    x0.dims()
                ),
            ));
        }
        let eps = Tensor::from_vec(noise.clone(), shape.as_slice(), x0.device())?;
        Ok(NoiseDraw {
            input_eps: eps.clone(),
            eps,
            timesteps: timesteps.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn recorded_noise_is_taken_per_micro_batch_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noise.npz");
        let mut writer = crate::formats::npz::NpzWriter::new();
        for i in 0..2 {
            let noise = (0..8).map(|v| (v + 10 * i) as f32).collect();
            writer
                .add_f32(&format!("noise_{i}"), noise, &[2, 1, 2, 2])
                .unwrap();
            writer
                .add_i64(&format!("timesteps_{i}"), vec![i, 999], &[2])
                .unwrap();
        }
        writer.write(&path).unwrap();
        let recorded = RecordedNoise::read(&path).unwrap();
        let x0 = Tensor::zeros((2, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let draw = recorded.draw(1, &x0).unwrap();
        assert_eq!(draw.timesteps, vec![1, 999]);
        assert_eq!(values(&draw.eps)[..3], [10.0, 11.0, 12.0]);
        assert_eq!(values(&draw.input_eps), values(&draw.eps));
        let message = |e: crate::Error| e.to_string();
        assert!(message(recorded.draw(2, &x0).err().unwrap()).contains("holds 2"));
        let other = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(message(recorded.draw(0, &other).err().unwrap()).contains("[2, 1, 2, 2]"));

        let mut writer = crate::formats::npz::NpzWriter::new();
        writer
            .add_f32("noise_0", vec![0.0; 2], &[1, 1, 1, 2])
            .unwrap();
        writer.add_i64("timesteps_0", vec![1000], &[1]).unwrap();
        writer.write(&path).unwrap();
        let error = RecordedNoise::read(&path).err().unwrap();
        assert!(message(error).contains("outside 0..1000"));
    }

    #[test]
    fn input_perturbation_changes_only_what_the_unet_sees() {
        let x0 = Tensor::zeros((2, 4, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let plain_options = NoiseOptions {
            max_timestep: 1000,
            ..NoiseOptions::default()
        };
        let plain = draw(&mut NoiseRng::for_micro_batch(9, 3), &x0, &plain_options).unwrap();
        assert_eq!(values(&plain.input_eps), values(&plain.eps));
        let options = NoiseOptions {
            ip_noise_gamma: Some(0.1),
            ..plain_options
        };
        let perturbed = draw(&mut NoiseRng::for_micro_batch(9, 3), &x0, &options).unwrap();
        assert_eq!(
            values(&perturbed.eps),
            values(&plain.eps),
            "same target noise"
        );
        assert_eq!(perturbed.timesteps, plain.timesteps);
        let difference: Vec<f32> = (values(&perturbed.input_eps).iter())
            .zip(values(&plain.eps))
            .map(|(a, b)| a - b)
            .collect();
        let n = difference.len() as f32;
        let std = (difference.iter().map(|d| d * d).sum::<f32>() / n).sqrt();
        assert!((std - 0.1).abs() < 0.01, "perturbation std {std}");
    }
}
