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
    /// `pndm`: `PNDMScheduler` with its defaults (`skip_prk_steps=False`: four Runge-Kutta
    /// steps of four model evaluations start it, then the fourth-order linear multistep).
    Pndm,
    /// `dpmsingle`: `DPMSolverSinglestepScheduler` with its defaults (dpmsolver++, order 2,
    /// midpoint, lower order at the end).
    DpmSingle,
    /// `dpm_2` / `k_dpm_2`: `KDPM2DiscreteScheduler` (two model evaluations per step but the
    /// last).
    Dpm2,
    /// `dpm_2_a` / `k_dpm_2_a`: `KDPM2AncestralDiscreteScheduler`.
    Dpm2Ancestral,
}

/// Every name sd-scripts accepts, with the kind it maps to.
const NAMES: &[(&str, SamplerKind)] = &[
    ("ddim", SamplerKind::Ddim),
    ("pndm", SamplerKind::Pndm),
    ("lms", SamplerKind::Lms),
    ("k_lms", SamplerKind::Lms),
    ("euler", SamplerKind::Euler),
    ("k_euler", SamplerKind::Euler),
    ("euler_a", SamplerKind::EulerAncestral),
    ("k_euler_a", SamplerKind::EulerAncestral),
    ("dpmsolver", SamplerKind::DpmSolver),
    ("dpmsolver++", SamplerKind::DpmSolverPlusPlus),
    ("dpmsingle", SamplerKind::DpmSingle),
    ("heun", SamplerKind::Heun),
    ("dpm_2", SamplerKind::Dpm2),
    ("k_dpm_2", SamplerKind::Dpm2),
    ("dpm_2_a", SamplerKind::Dpm2Ancestral),
    ("k_dpm_2_a", SamplerKind::Dpm2Ancestral),
];

impl SamplerKind {
    /// Parses a sampler name as sd-scripts spells it (case-insensitive); unknown names are
    /// refused, naming the accepted ones.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        match NAMES.iter().find(|(n, _)| *n == lower) {
            Some((_, kind)) => Ok(*kind),
            None => Err(Error::Usage(format!(
                "unknown sampler `{name}`; use one of: {}",
                Self::accepted().join(", ")
            ))),
        }
    }

    /// The names [`SamplerKind::parse`] accepts.
    pub fn accepted() -> Vec<&'static str> {
        NAMES.iter().map(|(name, _)| *name).collect()
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
            SamplerKind::Pndm => "pndm",
            SamplerKind::DpmSingle => "dpmsingle",
            SamplerKind::Dpm2 => "dpm_2",
            SamplerKind::Dpm2Ancestral => "dpm_2_a",
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
            SamplerKind::Pndm => "PNDMScheduler",
            SamplerKind::DpmSingle => "DPMSolverSinglestepScheduler",
            SamplerKind::Dpm2 => "KDPM2DiscreteScheduler",
            SamplerKind::Dpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
        }
    }

    /// Whether a step draws fresh noise.
    pub fn is_ancestral(self) -> bool {
        matches!(
            self,
            SamplerKind::EulerAncestral | SamplerKind::Dpm2Ancestral
        )
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
    /// Added to "leading"-spaced timesteps (DDIM, PNDM): gen_img sets 1, sample images during
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
    /// LMS derivatives, oldest first; DPM-Solver converted model outputs, oldest first; PNDM
    /// model outputs at the start of each step (`ets`), oldest first.
    outputs: Vec<Tensor>,
    /// DPM-Solver: number of steps taken at lower order.
    lower_order_nums: usize,
    /// Heun: derivative, dt and sample of the first stage.
    heun: Option<(Tensor, f64, Tensor)>,
    /// The sample the current multi-evaluation step starts from: KDPM2's first stage, the first
    /// step of a DPM-Solver singlestep pair, PNDM's Runge-Kutta step.
    stage_sample: Option<Tensor>,
    /// PNDM: the weighted sum of the Runge-Kutta step's model outputs so far.
    runge_kutta_sum: Option<Tensor>,
}

/// A configured sampler for one generation (`set_timesteps` done).
#[derive(Debug)]
pub struct Sampler {
    config: SamplerConfig,
    alphas_cumprod: Vec<f32>,
    /// Timesteps given to the model, one per model evaluation.
    timesteps: Vec<f64>,
    /// Sigma schedule (Karras-style samplers and DPM-Solver), with the final 0; KDPM2 holds it
    /// expanded as diffusers does (every sigma after the first twice, the final 0 three times).
    sigmas: Vec<f64>,
    /// KDPM2: the sigma of the midpoint stage, expanded as `sigmas`.
    sigmas_interpol: Vec<f64>,
    /// KDPM2 ancestral: the fresh-noise level and the level the step moves to before adding
    /// it, expanded as `sigmas`.
    sigmas_up: Vec<f64>,
    sigmas_down: Vec<f64>,
    /// DPM-Solver singlestep: the solver order of each step.
    orders: Vec<usize>,
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
            sigmas_interpol: Vec::new(),
            sigmas_up: Vec::new(),
            sigmas_down: Vec::new(),
            orders: Vec::new(),
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
            SamplerKind::DpmSolver | SamplerKind::DpmSolverPlusPlus | SamplerKind::DpmSingle => {
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
                // dpmsolver++ and dpmsingle: final_sigmas_type "zero". dpmsolver: diffusers 0.32
                // refuses "zero" for it (sd-scripts' scheduler then fails to build), so it gets
                // the "sigma_min" that diffusers asks for.
                sigmas.push(if config.kind == SamplerKind::DpmSolver {
                    sigma_table[0]
                } else {
                    0.0
                });
                sampler.timesteps = timesteps;
                sampler.sigmas = sigmas;
                if config.kind == SamplerKind::DpmSingle {
                    sampler.orders = singlestep_orders(steps);
                }
            }
            SamplerKind::Pndm => {
                if steps < PNDM_RUNGE_KUTTA_STEPS {
                    return Err(Error::Usage(format!(
                        "pndm needs at least {PNDM_RUNGE_KUTTA_STEPS} sampling steps (its \
                         Runge-Kutta start spans the 4 largest timesteps), not {steps}"
                    )));
                }
                let ratio = TRAIN_TIMESTEPS / steps;
                sampler.step_ratio = ratio;
                sampler.timesteps = pndm_timesteps(steps, ratio, config.steps_offset);
            }
            SamplerKind::Dpm2 | SamplerKind::Dpm2Ancestral => {
                sampler.set_kdpm2_schedule(steps, &sigma_table);
            }
        }
        Ok(sampler)
    }

    /// KDPM2 and its ancestral variant: diffusers' float32 `linspace` timesteps, the sigma
    /// tables expanded to one entry per model evaluation, and the midpoint timesteps found by
    /// interpolating log-sigma over the training timesteps.
    fn set_kdpm2_schedule(&mut self, steps: usize, sigma_table: &[f64]) {
        let last = (TRAIN_TIMESTEPS - 1) as f64;
        let timesteps: Vec<f64> = linspace(0.0, last, steps)
            .into_iter()
            .rev()
            .map(f32_round)
            .collect();
        // s_0 .. s_{n-1} and the final 0.
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| f32_round(interp(t, sigma_table)))
            .collect();
        sigmas.push(0.0);
        let log_sigmas: Vec<f64> = sigma_table
            .iter()
            .map(|&s| f64::from((s as f32).ln()))
            .collect();
        let n = steps;
        // diffusers computes these tables in float32 torch ops; `down` cancels badly near the end
        // of the schedule, so the same float32 arithmetic is used here.
        let s32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        // The midpoint sigma: exp(lerp(log a, log b, 0.5)) as torch's lerp computes it at 0.5.
        let log_midpoint = |a: f32, b: f32| -> f64 {
            let (la, lb) = (a.ln(), b.ln());
            f64::from((lb - (lb - la) * 0.5).exp())
        };
        let interpol: Vec<f64>;
        let mut stage_timesteps: Vec<f64>;
        if self.config.kind == SamplerKind::Dpm2 {
            // si_k between s_k and s_{k-1} (si_0 is never used).
            interpol = (0..=n)
                .map(|k| {
                    if k == 0 {
                        0.0
                    } else {
                        log_midpoint(s32[k], s32[k - 1])
                    }
                })
                .collect();
            stage_timesteps = vec![timesteps[0]];
            for k in 1..n {
                stage_timesteps.push(sigma_to_t(interpol[k], &log_sigmas));
                stage_timesteps.push(timesteps[k]);
            }
        } else {
            let mut up = Vec::with_capacity(n + 1);
            let mut down = Vec::with_capacity(n + 1);
            for k in 0..=n {
                if k == n {
                    // diffusers' last up is 0/0 (NaN) and never used; its last down is 0.
                    up.push(0.0);
                    down.push(0.0);
                    continue;
                }
                let (s, next) = (s32[k], s32[k + 1]);
                let u = (next * next * (s * s - next * next) / (s * s)).sqrt();
                up.push(f64::from(u));
                down.push(f64::from((next * next - u * u).sqrt()));
            }
            // si_k between s_k and down_k; the last two are 0.
            interpol = (0..=n)
                .map(|k| {
                    if k + 2 > n {
                        0.0
                    } else {
                        log_midpoint(s32[k], down[k] as f32)
                    }
                })
                .collect();
            stage_timesteps = vec![timesteps[0]];
            for k in 1..n {
                stage_timesteps.push(sigma_to_t(interpol[k - 1], &log_sigmas));
                stage_timesteps.push(timesteps[k]);
            }
            self.sigmas_up = expand(&up);
            self.sigmas_down = expand(&down);
        }
        self.sigmas = expand(&sigmas);
        self.sigmas_interpol = expand(&interpol);
        self.timesteps = stage_timesteps.into_iter().map(f32_round).collect();
    }

    /// The configuration.
    pub fn config(&self) -> SamplerConfig {
        self.config
    }

    /// The timestep of each model evaluation, in order.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The sigma schedule (with its final 0) of the sigma-space samplers, as diffusers'
    /// `scheduler.sigmas`; empty for DDIM and PNDM.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The factor the initial standard-normal latents are multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.config.kind {
            SamplerKind::Ddim
            | SamplerKind::Pndm
            | SamplerKind::DpmSolver
            | SamplerKind::DpmSolverPlusPlus
            | SamplerKind::DpmSingle => 1.0,
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
            SamplerKind::Ddim
            | SamplerKind::Pndm
            | SamplerKind::DpmSolver
            | SamplerKind::DpmSolverPlusPlus
            | SamplerKind::DpmSingle => Ok(sample.clone()),
            SamplerKind::Dpm2 | SamplerKind::Dpm2Ancestral => {
                let i = self.step_index;
                let sigma = match (&self.history.stage_sample, self.config.kind) {
                    (None, _) => self.current_sigma()?,
                    (Some(_), SamplerKind::Dpm2) => self.sigmas_interpol[i],
                    (Some(_), _) => self.sigmas_interpol[i - 1],
                };
                scale(sample, 1.0 / (sigma * sigma + 1.0).sqrt())
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
            SamplerKind::DpmSingle => self.dpm_singlestep(output, sample)?,
            SamplerKind::Pndm => self.pndm(output, sample)?,
            SamplerKind::Dpm2 | SamplerKind::Dpm2Ancestral => self.kdpm2(output, sample, noise)?,
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
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let converted = self.dpm_convert(output, sample, plus_plus)?;
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

    /// DPM-Solver's `convert_model_output` at the current sigma: x0 (dpmsolver++) or eps
    /// (dpmsolver).
    fn dpm_convert(&self, output: &Tensor, sample: &Tensor, plus_plus: bool) -> Result<Tensor> {
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[self.step_index]);
        match (plus_plus, self.config.prediction) {
            (true, Prediction::Epsilon) => {
                combine(1.0 / alpha_s0, sample, -sigma_s0 / alpha_s0, output)
            }
            (true, Prediction::V) => combine(alpha_s0, sample, -sigma_s0, output),
            (false, Prediction::Epsilon) => Ok(output.clone()),
            (false, Prediction::V) => combine(alpha_s0, output, sigma_s0, sample),
        }
    }

    /// DPM-Solver++ singlestep, order 2: a first-order step to the next sigma, then a second
    /// step from the same start to the sigma after, using both model outputs (midpoint).
    fn dpm_singlestep(&mut self, output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let converted = self.dpm_convert(output, sample, true)?;
        self.history.outputs.push(converted);
        if self.history.outputs.len() > 2 {
            self.history.outputs.remove(0);
        }
        let order = self.orders[i].min(self.history.outputs.len());
        if order == 1 {
            self.history.stage_sample = Some(sample.clone());
        }
        let start =
            self.history.stage_sample.as_ref().ok_or_else(|| {
                Error::Model("dpmsingle: second-order step without a start".into())
            })?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let m0 = &self.history.outputs[self.history.outputs.len() - 1];
        if order == 1 {
            let h = lambda(self.sigmas[i + 1]) - lambda(self.sigmas[i]);
            let (_, sigma_s) = alpha_sigma(self.sigmas[i]);
            return combine(sigma_t / sigma_s, start, -alpha_t * ((-h).exp() - 1.0), m0);
        }
        let m1 = &self.history.outputs[self.history.outputs.len() - 2];
        let (_, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_s1 = lambda(self.sigmas[i - 1]);
        let h = lambda(self.sigmas[i + 1]) - lambda_s1;
        let r0 = (lambda(self.sigmas[i]) - lambda_s1) / h;
        let c = -alpha_t * ((-h).exp() - 1.0);
        // D0 = m1, D1 = (m0 - m1) / r0.
        let d1 = scale(&(m0 - m1).map_err(model_error)?, 1.0 / r0)?;
        let base = combine(sigma_t / sigma_s1, start, c, m1)?;
        combine(1.0, &base, 0.5 * c, &d1)
    }

    /// PNDM: the first 12 evaluations are four-stage Runge-Kutta steps (`step_prk`), the rest
    /// fourth-order linear multistep (`step_plms`), both through `_get_prev_sample`.
    fn pndm(&mut self, output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let t = self.timesteps[i] as i64;
        if i < PNDM_RUNGE_KUTTA_EVALUATIONS {
            let half = (self.step_ratio / 2) as i64;
            let previous = if i % 2 == 1 { t } else { t - half };
            let start_t = self.timesteps[i / 4 * 4] as i64;
            let combined = match i % 4 {
                0 => {
                    self.history.runge_kutta_sum = Some(scale(output, 1.0 / 6.0)?);
                    self.history.outputs.push(output.clone());
                    self.history.stage_sample = Some(sample.clone());
                    output.clone()
                }
                3 => {
                    let sum = self.history.runge_kutta_sum.take().ok_or_else(|| {
                        Error::Model("pndm: Runge-Kutta step without its start".into())
                    })?;
                    combine(1.0, &sum, 1.0 / 6.0, output)?
                }
                _ => {
                    let sum = self.history.runge_kutta_sum.as_ref().ok_or_else(|| {
                        Error::Model("pndm: Runge-Kutta step without its start".into())
                    })?;
                    self.history.runge_kutta_sum = Some(combine(1.0, sum, 1.0 / 3.0, output)?);
                    output.clone()
                }
            };
            let start =
                self.history.stage_sample.clone().ok_or_else(|| {
                    Error::Model("pndm: Runge-Kutta step without its start".into())
                })?;
            return self.pndm_previous(&start, start_t, previous, &combined);
        }
        let previous = t - self.step_ratio as i64;
        let ets = &mut self.history.outputs;
        if ets.len() > 3 {
            ets.drain(..ets.len() - 3);
        }
        ets.push(output.clone());
        let [e4, e3, e2, e1] = match ets.as_slice() {
            [a, b, c, d] => [a, b, c, d],
            _ => {
                return Err(Error::Model(
                    "pndm: multistep without its Runge-Kutta start".into(),
                ))
            }
        };
        // (55 e1 - 59 e2 + 37 e3 - 9 e4) / 24
        let combined = combine(55.0 / 24.0, e1, -59.0 / 24.0, e2)?;
        let combined = combine(1.0, &combined, 37.0 / 24.0, e3)?;
        let combined = combine(1.0, &combined, -9.0 / 24.0, e4)?;
        self.pndm_previous(sample, t, previous, &combined)
    }

    /// PNDM's `_get_prev_sample`: from timestep `t` to `previous` (abar of timestep 0 below 0).
    fn pndm_previous(
        &self,
        sample: &Tensor,
        t: i64,
        previous: i64,
        output: &Tensor,
    ) -> Result<Tensor> {
        let abar = |t: i64| -> Result<f64> {
            let index = t.max(0) as usize;
            self.alphas_cumprod
                .get(index)
                .map(|&a| f64::from(a))
                .ok_or_else(|| Error::Usage(format!("pndm: timestep {t} is past the schedule")))
        };
        let alpha_t = abar(t)?;
        let alpha_prev = abar(previous)?;
        let beta_t = 1.0 - alpha_t;
        let eps = match self.config.prediction {
            Prediction::Epsilon => output.clone(),
            Prediction::V => combine(alpha_t.sqrt(), output, beta_t.sqrt(), sample)?,
        };
        let sample_coefficient = (alpha_prev / alpha_t).sqrt();
        let denominator =
            alpha_t * (1.0 - alpha_prev).sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        combine(
            sample_coefficient,
            sample,
            -(alpha_prev - alpha_t) / denominator,
            &eps,
        )
    }

    /// KDPM2 (and its ancestral variant): a first stage moves to the midpoint sigma, a second
    /// stage evaluates the model there and moves the first stage's sample on with that
    /// derivative (ancestral: to `sigma_down`, then adds `sigma_up` of fresh noise).
    fn kdpm2(
        &mut self,
        output: &Tensor,
        sample: &Tensor,
        noise: &mut NoiseSource<'_>,
    ) -> Result<Tensor> {
        let i = self.step_index;
        let ancestral = self.config.kind == SamplerKind::Dpm2Ancestral;
        match self.history.stage_sample.take() {
            None => {
                let sigma = self.sigmas[i];
                let to = if ancestral {
                    self.sigmas_interpol[i]
                } else {
                    self.sigmas_interpol[i + 1]
                };
                let x0 = self.x0_sigma(output, sample, sigma)?;
                self.history.stage_sample = Some(sample.clone());
                self.euler_move(sample, &x0, sigma, to)
            }
            Some(start) => {
                let (sigma, interpol) = if ancestral {
                    (self.sigmas[i - 1], self.sigmas_interpol[i - 1])
                } else {
                    (self.sigmas[i - 1], self.sigmas_interpol[i])
                };
                let to = if ancestral {
                    self.sigmas_down[i - 1]
                } else {
                    self.sigmas[i]
                };
                let x0 = self.x0_sigma(output, sample, interpol)?;
                let derivative = scale(&(sample - &x0).map_err(model_error)?, 1.0 / interpol)?;
                let moved = combine(1.0, &start, to - sigma, &derivative)?;
                if ancestral {
                    let fresh = noise(sample.dims())?;
                    combine(1.0, &moved, self.sigmas_up[i - 1], &fresh)
                } else {
                    Ok(moved)
                }
            }
        }
    }
}

/// PNDM's Runge-Kutta start spans its 4 largest timesteps (`pndm_order`): three Runge-Kutta
/// steps between them ...
const PNDM_RUNGE_KUTTA_STEPS: usize = 4;
/// ... of 4 model evaluations each, before the linear multistep part.
const PNDM_RUNGE_KUTTA_EVALUATIONS: usize = 12;

/// PNDMScheduler's `set_timesteps` with `skip_prk_steps=False` and "leading" spacing: the
/// Runge-Kutta timesteps of the 4 largest steps (each with its midpoint `ratio / 2` above the
/// next), then the remaining steps from the largest down.
fn pndm_timesteps(steps: usize, ratio: usize, offset: usize) -> Vec<f64> {
    let base: Vec<usize> = (0..steps).map(|i| i * ratio + offset).collect();
    let half = ratio / 2;
    let [a, b, c, d] = [
        base[steps - 4],
        base[steps - 3],
        base[steps - 2],
        base[steps - 1],
    ];
    let runge_kutta = [
        d,
        c + half,
        c + half,
        c,
        c,
        b + half,
        b + half,
        b,
        b,
        a + half,
        a + half,
        a,
    ];
    runge_kutta
        .into_iter()
        .chain(base[..steps - 3].iter().rev().copied())
        .map(|t| t as f64)
        .collect()
}

/// DPMSolverSinglestepScheduler's order list for order 2 with `lower_order_final` (which
/// diffusers forces on with a final sigma of zero): pairs of a first- and a second-order step,
/// the last step first order.
fn singlestep_orders(steps: usize) -> Vec<usize> {
    let mut orders: Vec<usize> = if steps.is_multiple_of(2) {
        (0..steps - 2).map(|i| 1 + i % 2).chain([1, 1]).collect()
    } else {
        (0..steps - 1).map(|i| 1 + i % 2).chain([1]).collect()
    };
    if let Some(last) = orders.last_mut() {
        *last = 1;
    }
    orders
}

/// Every entry after the first twice and the last once more (diffusers' KDPM2 tables:
/// `cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`).
fn expand(values: &[f64]) -> Vec<f64> {
    let mut expanded = vec![values[0]];
    for &v in &values[1..] {
        expanded.extend([v, v]);
    }
    expanded.push(values[values.len() - 1]);
    expanded
}

/// diffusers' `_sigma_to_t`: the training timestep of `sigma`, interpolating linearly in
/// log-sigma between the two neighbouring entries of `log_sigmas` (ascending).
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (low_value, high_value) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((low_value - log_sigma) / (low_value - high_value)).clamp(0.0, 1.0);
    low as f64 + w
}

/// DPM-Solver's `(alpha_t, sigma_t)` of a sigma (`alpha = 1 / sqrt(sigma^2 + 1)`).
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// DPM-Solver's half log-SNR `lambda = log(alpha) - log(sigma)`.
fn lambda(sigma: f64) -> f64 {
    let (alpha, s) = alpha_sigma(sigma);
    alpha.ln() - s.ln()
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
    fn unknown_names_are_refused_naming_the_accepted_ones() {
        for name in ["foo", "k_dpm_3"] {
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
    fn pndm_refuses_fewer_steps_than_its_runge_kutta_start() {
        let config = SamplerConfig::gen_img(SamplerKind::Pndm, Prediction::Epsilon);
        let message = Sampler::new(config, 3).unwrap_err().to_string();
        assert!(message.contains("at least 4"), "{message}");
        // 12 Runge-Kutta evaluations, then one per remaining step.
        assert_eq!(Sampler::new(config, 20).unwrap().timesteps().len(), 29);
    }

    #[test]
    fn dpmsingle_pairs_first_and_second_order_steps_and_ends_at_first_order() {
        assert_eq!(singlestep_orders(1), [1]);
        assert_eq!(singlestep_orders(4), [1, 2, 1, 1]);
        assert_eq!(singlestep_orders(5), [1, 2, 1, 2, 1]);
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
