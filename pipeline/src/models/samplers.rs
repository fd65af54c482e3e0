//! Diffusion samplers (inference schedulers) as sd-scripts configures diffusers' schedulers for
//! `gen_img.py` and for sample images during training: the scaled-linear DDPM schedule (betas
//! 0.00085 to 0.012, 1000 training steps), epsilon or v prediction, and per sampler the
//! timestep spacing, `steps_offset` and `clip_sample` of the diffusers class.
//!
//! A [`Sampler`] is driven like a diffusers scheduler: for each entry of
//! [`Sampler::timesteps`] (one per model evaluation; Heun evaluates twice per step), scale the
//! model input with [`Sampler::scale_model_input`], run the model, then [`Sampler::step`].
//! The initial latent noise is multiplied by [`Sampler::init_noise_sigma`]. Ancestral samplers
//! draw fresh noise through the caller's [`NoiseSource`], so the caller decides the random
//! stream (gen_img draws it per image from the image's seed).
//!
//! Coefficients are computed in f64 from the float32 schedule (as diffusers computes them from
//! its float32 `alphas_cumprod` in numpy); tensors stay in their dtype (f32 in practice).

use candle_core::Tensor;

use crate::{Error, Result};

/// Number of DDPM training timesteps (`SCHEDULER_TIMESTEPS`).
pub const TRAIN_TIMESTEPS: usize = 1000;
/// `SCHEDULER_LINEAR_START`.
pub const BETA_START: f32 = 0.00085;
/// `SCHEDULER_LINEAR_END`.
pub const BETA_END: f32 = 0.012;

/// The samplers (`--sampler` / `--sample_sampler` values), by their diffusers class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// `ddim`: `DDIMScheduler` (eta 0).
    Ddim,
    /// `lms` / `k_lms`: `LMSDiscreteScheduler` (order 4).
    Lms,
    /// `euler` / `k_euler`: `EulerDiscreteScheduler`.
    Euler,
    /// `euler_a` / `k_euler_a`: `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// `heun`: `HeunDiscreteScheduler` (two model evaluations per step).
    Heun,
    /// `dpmsolver`: `DPMSolverMultistepScheduler(algorithm_type="dpmsolver")`, order 2.
    DpmSolver,
    /// `dpmsolver++`: `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")`, order 2.
    DpmSolverPlusPlus,
}

/// Every name sd-scripts accepts, with the kind it maps to (`None`: accepted by sd-scripts but
/// not implemented here yet).
const NAMES: &[(&str, Option<SamplerKind>)] = &[
    ("ddim", Some(SamplerKind::Ddim)),
    ("pndm", None),
    ("lms", Some(SamplerKind::Lms)),
    ("k_lms", Some(SamplerKind::Lms)),
    ("euler", Some(SamplerKind::Euler)),
    ("k_euler", Some(SamplerKind::Euler)),
    ("euler_a", Some(SamplerKind::EulerAncestral)),
    ("k_euler_a", Some(SamplerKind::EulerAncestral)),
    ("dpmsolver", Some(SamplerKind::DpmSolver)),
    ("dpmsolver++", Some(SamplerKind::DpmSolverPlusPlus)),
    ("dpmsingle", None),
    ("heun", Some(SamplerKind::Heun)),
    ("dpm_2", None),
    ("k_dpm_2", None),
    ("dpm_2_a", None),
    ("k_dpm_2_a", None),
];

impl SamplerKind {
    /// Parses a sampler name as sd-scripts spells it (case-insensitive); unknown names and the
    /// names not implemented yet are refused, naming the accepted ones.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        match NAMES.iter().find(|(n, _)| *n == lower) {
            Some((_, Some(kind))) => Ok(*kind),
            Some((_, None)) => Err(Error::Usage(format!(
                "sampler `{name}` is an sd-scripts sampler that lorakit does not implement yet; \
                 use one of: {}",
                Self::accepted().join(", ")
            ))),
            None => Err(Error::Usage(format!(
                "unknown sampler `{name}`; use one of: {}",
                Self::accepted().join(", ")
            ))),
        }
    }

    /// The names [`SamplerKind::parse`] accepts.
    pub fn accepted() -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(_, kind)| kind.is_some())
            .map(|(name, _)| *name)
            .collect()
    }

    /// The canonical (sd-scripts) name.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Lms => "lms",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::Heun => "heun",
            SamplerKind::DpmSolver => "dpmsolver",
            SamplerKind::DpmSolverPlusPlus => "dpmsolver++",
        }
    }

    /// The diffusers class sd-scripts uses for this sampler.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Lms => "LMSDiscreteScheduler",
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SamplerKind::Heun => "HeunDiscreteScheduler",
            SamplerKind::DpmSolver | SamplerKind::DpmSolverPlusPlus => {
                "DPMSolverMultistepScheduler"
            }
        }
    }

    /// Whether a step draws fresh noise.
    pub fn is_ancestral(self) -> bool {
        matches!(self, SamplerKind::EulerAncestral)
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prediction {
    /// The noise (SD1.x, SD2.x base, SDXL).
    #[default]
    Epsilon,
    /// v (SD2.x 768-v, `--v_parameterization`).
    V,
}

/// A sampler's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// The algorithm.
    pub kind: SamplerKind,
    /// Epsilon or v prediction.
    pub prediction: Prediction,
    /// Added to "leading"-spaced timesteps (DDIM): gen_img sets 1, sample images during
    /// training keep diffusers' default 0.
    pub steps_offset: usize,
    /// Clamp the predicted x0 to [-1, 1] (DDIM): gen_img sets false, training's samples true.
    pub clip_sample: bool,
}

impl SamplerConfig {
    /// The scheduler `gen_img.py` builds: `steps_offset=1`, `clip_sample=False`.
    pub fn gen_img(kind: SamplerKind, prediction: Prediction) -> Self {
        SamplerConfig {
            kind,
            prediction,
            steps_offset: 1,
            clip_sample: false,
        }
    }

    /// The scheduler sd-scripts' `get_my_scheduler` builds for sample images during training:
    /// diffusers' defaults (`steps_offset=0`), `clip_sample=True` where the class has it.
    pub fn training_samples(kind: SamplerKind, prediction: Prediction) -> Self {
        SamplerConfig {
            kind,
            prediction,
            steps_offset: 0,
            clip_sample: kind == SamplerKind::Ddim,
        }
    }
}

/// Where ancestral samplers take their fresh standard-normal noise from: called with the
/// sample's shape, returns a tensor of that shape (on the sample's device, f32).
pub type NoiseSource<'a> = dyn FnMut(&[usize]) -> Result<Tensor> + 'a;

/// `alphas_cumprod` of the scaled-linear schedule in float32, computed as torch does
/// (`linspace(sqrt(start), sqrt(end), 1000, float32) ** 2`, then a running product).
pub fn alphas_cumprod() -> Vec<f32> {
    let (start, end) = (BETA_START.sqrt(), BETA_END.sqrt());
    let last = (TRAIN_TIMESTEPS - 1) as f32;
    let step = (end - start) / last;
    let mut running = 1.0f32;
    (0..TRAIN_TIMESTEPS)
        .map(|t| {
            // torch.linspace fills the first half from the start and the second from the end.
            let root = if t < TRAIN_TIMESTEPS / 2 {
                start + step * t as f32
            } else {
                end - step * (last - t as f32)
            };
            running *= 1.0 - root * root;
            running
        })
        .collect()
}

/// State of the multistep and two-stage samplers.
#[derive(Debug, Default)]
struct History {
    /// LMS derivatives, oldest first; DPM-Solver converted model outputs, oldest first.
    outputs: Vec<Tensor>,
    /// DPM-Solver: number of steps taken at lower order.
    lower_order_nums: usize,
    /// Heun: derivative, dt and sample of the first stage.
    heun: Option<(Tensor, f64, Tensor)>,
}

/// A configured sampler for one generation (`set_timesteps` done).
#[derive(Debug)]
pub struct Sampler {
    config: SamplerConfig,
    alphas_cumprod: Vec<f32>,
    /// Timesteps given to the model, one per model evaluation.
    timesteps: Vec<f64>,
    /// Sigma schedule (Karras-style samplers and DPM-Solver), with the final 0.
    sigmas: Vec<f64>,
    /// DDIM: the gap between consecutive timesteps.
    step_ratio: usize,
    step_index: usize,
    history: History,
}

/// Rounds to the nearest float32 (diffusers stores its sigma and timestep tables in float32).
fn f32_round(v: f64) -> f64 {
    f64::from(v as f32)
}

/// numpy's `linspace(start, end, n)` (float64).
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i == n - 1 {
                end
            } else {
                start + step * i as f64
            }
        })
        .collect()
}

/// numpy's `interp(x, arange(len(table)), table)`.
fn interp(x: f64, table: &[f64]) -> f64 {
    if x <= 0.0 {
        return table[0];
    }
    let last = table.len() - 1;
    if x >= last as f64 {
        return table[last];
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    table[i] + (table[i + 1] - table[i]) * frac
}

fn scale(t: &Tensor, factor: f64) -> Result<Tensor> {
    t.affine(factor, 0.0).map_err(model_error)
}

/// `a * x + b * y`.
fn combine(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    (x.affine(a, 0.0).map_err(model_error)? + y.affine(b, 0.0).map_err(model_error)?)
        .map_err(model_error)
}

fn model_error(e: candle_core::Error) -> Error {
    Error::Model(format!("sampler step: {e}"))
}

impl Sampler {
    /// Sets up `steps` inference steps (diffusers' `set_timesteps`).
    pub fn new(config: SamplerConfig, steps: usize) -> Result<Self> {
        if steps == 0 || steps > TRAIN_TIMESTEPS {
            return Err(Error::Usage(format!(
                "the number of sampling steps must be between 1 and {TRAIN_TIMESTEPS}, not {steps}"
            )));
        }
        let alphas_cumprod = alphas_cumprod();
        // sigma_t = sqrt((1 - abar) / abar), in float32 as diffusers computes it.
        let sigma_table: Vec<f64> = alphas_cumprod
            .iter()
            .map(|&a| f64::from(((1.0 - a) / a).sqrt()))
            .collect();
        let last = (TRAIN_TIMESTEPS - 1) as f64;
        let mut sampler = Sampler {
            config,
            alphas_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_ratio: 0,
            step_index: 0,
            history: History::default(),
        };
        match config.kind {
            SamplerKind::Ddim => {
                // "leading" spacing plus steps_offset.
                let ratio = TRAIN_TIMESTEPS / steps;
                sampler.step_ratio = ratio;
                sampler.timesteps = (0..steps)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect();
            }
            SamplerKind::Lms
            | SamplerKind::Euler
            | SamplerKind::EulerAncestral
            | SamplerKind::Heun => {
                // "linspace" spacing: float timesteps, sigmas interpolated at them.
                let timesteps: Vec<f64> = linspace(0.0, last, steps)
                    .into_iter()
                    .rev()
                    .map(f32_round)
                    .collect();
                let mut sigmas: Vec<f64> = timesteps
                    .iter()
                    .map(|&t| f32_round(interp(t, &sigma_table)))
                    .collect();
                sigmas.push(0.0);
                if config.kind == SamplerKind::Heun {
                    // Every step after the first evaluates the model twice.
                    let mut doubled_t = vec![timesteps[0]];
                    let mut doubled_s = vec![sigmas[0]];
                    for (&t, &s) in timesteps[1..].iter().zip(&sigmas[1..steps]) {
                        doubled_t.extend([t, t]);
                        doubled_s.extend([s, s]);
                    }
                    doubled_s.push(0.0);
                    sampler.timesteps = doubled_t;
                    sampler.sigmas = doubled_s;
                } else {
                    sampler.timesteps = timesteps;
                    sampler.sigmas = sigmas;
                }
            }
            SamplerKind::DpmSolver | SamplerKind::DpmSolverPlusPlus => {
                // "linspace" over steps + 1 points, rounded to integers, the last dropped.
                let timesteps: Vec<f64> = linspace(0.0, last, steps + 1)
                    .into_iter()
                    .map(|t| t.round_ties_even())
                    .rev()
                    .take(steps)
                    .collect();
                let mut sigmas: Vec<f64> = timesteps
                    .iter()
                    .map(|&t| f32_round(interp(t, &sigma_table)))
                    .collect();
                // dpmsolver++: final_sigmas_type "zero". dpmsolver: diffusers 0.32 refuses
                // "zero" for it (sd-scripts' scheduler then fails to build), so it gets the
                // "sigma_min" that diffusers asks for.
                sigmas.push(if config.kind == SamplerKind::DpmSolver {
                    sigma_table[0]
                } else {
                    0.0
                });
                sampler.timesteps = timesteps;
                sampler.sigmas = sigmas;
            }
        }
        Ok(sampler)
    }

    /// The configuration.
    pub fn config(&self) -> SamplerConfig {
        self.config
    }

    /// The timestep of each model evaluation, in order.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The sigma schedule (with its final 0) of the sigma-space samplers; empty for DDIM.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The factor the initial standard-normal latents are multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.config.kind {
            SamplerKind::Ddim | SamplerKind::DpmSolver | SamplerKind::DpmSolverPlusPlus => 1.0,
            // "linspace" spacing: the largest sigma itself.
            _ => self.sigmas.iter().copied().fold(0.0, f64::max),
        }
    }

    /// Index of the next model evaluation.
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// The model input for the current step (diffusers' `scale_model_input`).
    pub fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        match self.config.kind {
            SamplerKind::Ddim | SamplerKind::DpmSolver | SamplerKind::DpmSolverPlusPlus => {
                Ok(sample.clone())
            }
            _ => {
                let sigma = self.current_sigma()?;
                scale(sample, 1.0 / (sigma * sigma + 1.0).sqrt())
            }
        }
    }

    fn current_sigma(&self) -> Result<f64> {
        self.sigmas.get(self.step_index).copied().ok_or_else(|| {
            Error::Model(format!(
                "sampler stepped past its {} steps",
                self.timesteps.len()
            ))
        })
    }

    /// x0 from the model output at noise level `sigma` (sigma-space samplers).
    fn x0_sigma(&self, output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        match self.config.prediction {
            Prediction::Epsilon => combine(1.0, sample, -sigma, output),
            Prediction::V => {
                let s2 = sigma * sigma + 1.0;
                combine(-sigma / s2.sqrt(), output, 1.0 / s2, sample)
            }
        }
    }

    /// One sampler step: the sample of the next step from the model output at the current one.
    pub fn step(
        &mut self,
        output: &Tensor,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Result<Tensor> {
        if self.step_index >= self.timesteps.len() {
            return Err(Error::Model(format!(
                "sampler stepped past its {} steps",
                self.timesteps.len()
            )));
        }
        let next = match self.config.kind {
            SamplerKind::Ddim => self.ddim(output, sample)?,
            SamplerKind::Euler => {
                let (sigma, to) = (
                    self.sigmas[self.step_index],
                    self.sigmas[self.step_index + 1],
                );
                let x0 = self.x0_sigma(output, sample, sigma)?;
                self.euler_move(sample, &x0, sigma, to)?
            }
            SamplerKind::EulerAncestral => {
                let (from, to) = (
                    self.sigmas[self.step_index],
                    self.sigmas[self.step_index + 1],
                );
                let x0 = self.x0_sigma(output, sample, from)?;
                let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
                let down = (to * to - up * up).sqrt();
                let moved = self.euler_move(sample, &x0, from, down)?;
                let fresh = noise(sample.dims())?;
                combine(1.0, &moved, up, &fresh)?
            }
            SamplerKind::Heun => self.heun(output, sample)?,
            SamplerKind::Lms => self.lms(output, sample)?,
            SamplerKind::DpmSolver | SamplerKind::DpmSolverPlusPlus => {
                self.dpm_solver(output, sample)?
            }
        };
        self.step_index += 1;
        Ok(next)
    }

    /// `sample + (sample - x0) / sigma * (to - sigma)`.
    fn euler_move(&self, sample: &Tensor, x0: &Tensor, sigma: f64, to: f64) -> Result<Tensor> {
        let derivative = scale(&(sample - x0).map_err(model_error)?, 1.0 / sigma)?;
        combine(1.0, sample, to - sigma, &derivative)
    }

    fn ddim(&self, output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[self.step_index] as usize;
        let alpha_t = f64::from(self.alphas_cumprod[t]);
        // set_alpha_to_one=True: the step after the last has abar = 1.
        let alpha_prev = t
            .checked_sub(self.step_ratio)
            .map_or(1.0, |p| f64::from(self.alphas_cumprod[p]));
        let beta_t = 1.0 - alpha_t;
        let (mut x0, eps) = match self.config.prediction {
            Prediction::Epsilon => (
                combine(
                    1.0 / alpha_t.sqrt(),
                    sample,
                    -beta_t.sqrt() / alpha_t.sqrt(),
                    output,
                )?,
                output.clone(),
            ),
            Prediction::V => (
                combine(alpha_t.sqrt(), sample, -beta_t.sqrt(), output)?,
                combine(alpha_t.sqrt(), output, beta_t.sqrt(), sample)?,
            ),
        };
        if self.config.clip_sample {
            x0 = x0.clamp(-1f32, 1f32).map_err(model_error)?;
        }
        combine(alpha_prev.sqrt(), &x0, (1.0 - alpha_prev).sqrt(), &eps)
    }

    fn heun(&mut self, output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        match self.history.heun.take() {
            None => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = self.x0_sigma(output, sample, sigma)?;
                let derivative = scale(&(sample - &x0).map_err(model_error)?, 1.0 / sigma)?;
                let dt = next - sigma;
                let moved = combine(1.0, sample, dt, &derivative)?;
                // The last step (to sigma 0) has no second stage.
                if i + 1 < self.timesteps.len() {
                    self.history.heun = Some((derivative, dt, sample.clone()));
                }
                Ok(moved)
            }
            Some((first, dt, start)) => {
                let sigma_next = self.sigmas[i];
                let x0 = self.x0_sigma(output, sample, sigma_next)?;
                let derivative = scale(&(sample - &x0).map_err(model_error)?, 1.0 / sigma_next)?;
                let mean = combine(0.5, &first, 0.5, &derivative)?;
                combine(1.0, &start, dt, &mean)
            }
        }
    }

    fn lms(&mut self, output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        const ORDER: usize = 4;
        let i = self.step_index;
        let sigma = self.sigmas[i];
        let x0 = self.x0_sigma(output, sample, sigma)?;
        let derivative = scale(&(sample - &x0).map_err(model_error)?, 1.0 / sigma)?;
        self.history.outputs.push(derivative);
        if self.history.outputs.len() > ORDER {
            self.history.outputs.remove(0);
        }
        let order = (i + 1).min(ORDER);
        let mut next = sample.clone();
        for (current, derivative) in self.history.outputs.iter().rev().enumerate().take(order) {
            let coefficient = lms_coefficient(&self.sigmas, order, i, current);
            next = combine(1.0, &next, coefficient, derivative)?;
        }
        Ok(next)
    }

    fn dpm_solver(&mut self, output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let plus_plus = self.config.kind == SamplerKind::DpmSolverPlusPlus;
        let alpha_sigma = |sigma: f64| {
            let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
            (alpha, sigma * alpha)
        };
        let lambda = |sigma: f64| {
            let (alpha, s) = alpha_sigma(sigma);
            alpha.ln() - s.ln()
        };
        // convert_model_output: x0 (dpmsolver++) or eps (dpmsolver).
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let converted = match (plus_plus, self.config.prediction) {
            (true, Prediction::Epsilon) => {
                combine(1.0 / alpha_s0, sample, -sigma_s0 / alpha_s0, output)?
            }
            (true, Prediction::V) => combine(alpha_s0, sample, -sigma_s0, output)?,
            (false, Prediction::Epsilon) => output.clone(),
            (false, Prediction::V) => combine(alpha_s0, output, sigma_s0, sample)?,
        };
        self.history.outputs.push(converted);
        if self.history.outputs.len() > 2 {
            self.history.outputs.remove(0);
        }
        // lower_order_final: the last step is first order with a final sigma of zero, or with
        // fewer than 15 steps.
        let steps = self.timesteps.len();
        let last_step = i + 1 == steps && (!final_sigma_nonzero(self.config.kind) || steps < 15);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = lambda(self.sigmas[i + 1]);
        let lambda_s0 = lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s0;
        let m0 = &self.history.outputs[self.history.outputs.len() - 1];
        let next = if self.history.lower_order_nums < 1 || last_step {
            if plus_plus {
                combine(
                    sigma_t / sigma_s0,
                    sample,
                    -alpha_t * ((-h).exp() - 1.0),
                    m0,
                )?
            } else {
                combine(alpha_t / alpha_s0, sample, -sigma_t * (h.exp() - 1.0), m0)?
            }
        } else {
            let m1 = &self.history.outputs[self.history.outputs.len() - 2];
            let lambda_s1 = lambda(self.sigmas[i - 1]);
            let r0 = (lambda_s0 - lambda_s1) / h;
            // D1 = (m0 - m1) / r0; midpoint solver.
            let d1 = scale(&(m0 - m1).map_err(model_error)?, 1.0 / r0)?;
            if plus_plus {
                let c = -alpha_t * ((-h).exp() - 1.0);
                let base = combine(sigma_t / sigma_s0, sample, c, m0)?;
                combine(1.0, &base, 0.5 * c, &d1)?
            } else {
                let c = -sigma_t * (h.exp() - 1.0);
                let base = combine(alpha_t / alpha_s0, sample, c, m0)?;
                combine(1.0, &base, 0.5 * c, &d1)?
            }
        };
        if self.history.lower_order_nums < 2 {
            self.history.lower_order_nums += 1;
        }
        Ok(next)
    }
}

/// Whether the sampler's last sigma is not zero (`dpmsolver`, see [`Sampler::new`]).
fn final_sigma_nonzero(kind: SamplerKind) -> bool {
    kind == SamplerKind::DpmSolver
}

/// LMS coefficient: the integral over `[sigmas[t], sigmas[t + 1]]` of the Lagrange basis
/// polynomial of `sigmas[t - current]` over the nodes `sigmas[t - k]`, `k < order` (diffusers
/// integrates it numerically; it is a polynomial of degree < 4, integrated exactly here).
fn lms_coefficient(sigmas: &[f64], order: usize, t: usize, current: usize) -> f64 {
    // Coefficients of the polynomial, lowest degree first.
    let mut poly = vec![1.0f64];
    for k in 0..order {
        if k == current {
            continue;
        }
        let node = sigmas[t - k];
        let denominator = sigmas[t - current] - node;
        let mut product = vec![0.0; poly.len() + 1];
        for (d, &c) in poly.iter().enumerate() {
            product[d + 1] += c / denominator;
            product[d] -= c * node / denominator;
        }
        poly = product;
    }
    let antiderivative = |x: f64| -> f64 {
        poly.iter()
            .enumerate()
            .map(|(d, &c)| c * x.powi(d as i32 + 1) / (d + 1) as f64)
            .sum()
    };
    antiderivative(sigmas[t + 1]) - antiderivative(sigmas[t])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unimplemented_names_are_refused_naming_the_accepted_ones() {
        for name in ["foo", "dpm_2_a"] {
            let message = SamplerKind::parse(name).unwrap_err().to_string();
            for accepted in ["ddim", "euler_a", "dpmsolver++", "heun", "k_lms"] {
                assert!(message.contains(accepted), "{name}: {message}");
            }
        }
        assert_eq!(
            SamplerKind::parse("K_EULER_A").unwrap(),
            SamplerKind::EulerAncestral
        );
    }

    #[test]
    fn ddim_timesteps_are_leading_with_the_offset() {
        let gen = Sampler::new(
            SamplerConfig::gen_img(SamplerKind::Ddim, Prediction::Epsilon),
            4,
        )
        .unwrap();
        assert_eq!(gen.timesteps(), [751.0, 501.0, 251.0, 1.0]);
        let train = Sampler::new(
            SamplerConfig::training_samples(SamplerKind::Ddim, Prediction::Epsilon),
            4,
        )
        .unwrap();
        assert_eq!(train.timesteps(), [750.0, 500.0, 250.0, 0.0]);
    }

    #[test]
    fn lms_coefficients_of_one_node_are_the_interval() {
        let sigmas = [3.0, 2.0, 1.0, 0.0];
        assert!((lms_coefficient(&sigmas, 1, 0, 0) - (-1.0)).abs() < 1e-12);
        // Two nodes: the Lagrange weights integrate to the interval length.
        let sum: f64 = (0..2).map(|c| lms_coefficient(&sigmas, 2, 1, c)).sum();
        assert!((sum - (-1.0)).abs() < 1e-12);
    }
}
