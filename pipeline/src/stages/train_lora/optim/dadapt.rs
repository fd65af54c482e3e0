//! The learning-rate-free Adam variants sd-scripts offers: prodigyopt's `Prodigy`,
//! dadaptation's `DAdaptAdam` and its `experimental.DAdaptAdamPreprint` (sd-scripts'
//! `DAdaptation`). Both estimate a distance `d` from sums over every parameter, so
//! one step first updates every tensor's moments, then `d`, then every parameter. The
//! arithmetic follows torch's: float32 tensors, float64 Python scalars (cast to float32 where
//! they scale a tensor), sums read out with `.item()`.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::literal::Literal;
use super::Kwargs;
use crate::{Error, Result};

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// `prodigyopt.Prodigy`.
    Prodigy,
    /// `dadaptation.DAdaptAdam`.
    DAdaptAdam,
    /// `dadaptation.experimental.DAdaptAdamPreprint`.
    DAdaptAdamPreprint,
}

/// The keyword arguments of each optimizer.
pub const PRODIGY_KEYS: &[&str] = &[
    "betas",
    "beta3",
    "eps",
    "weight_decay",
    "decouple",
    "use_bias_correction",
    "safeguard_warmup",
    "d0",
    "d_coef",
    "growth_rate",
    "fsdp_in_use",
    "slice_p",
];

/// The keyword arguments of `DAdaptAdam`.
pub const DADAPT_ADAM_KEYS: &[&str] = &[
    "betas",
    "eps",
    "weight_decay",
    "log_every",
    "decouple",
    "use_bias_correction",
    "d0",
    "growth_rate",
    "fsdp_in_use",
];

/// The keyword arguments of `DAdaptAdamPreprint`.
pub const DADAPT_ADAM_PREPRINT_KEYS: &[&str] = &[
    "betas",
    "eps",
    "weight_decay",
    "log_every",
    "decouple",
    "d0",
    "growth_rate",
    "fsdp_in_use",
];

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Which optimizer.
    pub rule: Rule,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Decay of Prodigy's numerator and `s` (default `sqrt(beta2)`).
    pub beta3: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Decoupled (AdamW-style) weight decay instead of adding it to the gradient.
    pub decouple: bool,
    /// Adam's bias correction in the step size.
    pub use_bias_correction: bool,
    /// Prodigy: leave the learning rate out of `s` (for warmup schedules).
    pub safeguard_warmup: bool,
    /// Initial `d`.
    pub d0: f64,
    /// Prodigy: multiplier of the estimate.
    pub d_coef: f64,
    /// Largest growth of `d` per step.
    pub growth_rate: f64,
    /// Prodigy: use every `slice_p`-th value for the estimate.
    pub slice_p: usize,
}

impl Config {
    /// Reads the arguments of `rule`.
    pub(super) fn from_kwargs(rule: Rule, read: &Kwargs) -> Result<Self> {
        let (beta1, beta2) = read.betas("betas", (0.9, 0.999))?;
        let beta3 = read.optional_number("beta3")?.unwrap_or(beta2.sqrt());
        let positive = |key: &str, default: f64| -> Result<f64> {
            let value = read.number(key, default)?;
            if value > 0.0 {
                Ok(value)
            } else {
                Err(read.bad(key, &Literal::Float(value), "a number above 0"))
            }
        };
        let slice_p = read.number("slice_p", 1.0)?;
        if slice_p < 1.0 || slice_p.fract() != 0.0 {
            return Err(read.bad("slice_p", &Literal::Float(slice_p), "a whole number from 1"));
        }
        Ok(Self {
            rule,
            beta1,
            beta2,
            beta3,
            eps: positive("eps", 1e-8)?,
            weight_decay: read.number("weight_decay", 0.0)?,
            decouple: read.flag("decouple", rule == Rule::Prodigy)?,
            use_bias_correction: read.flag("use_bias_correction", false)?,
            safeguard_warmup: read.flag("safeguard_warmup", false)?,
            d0: positive("d0", 1e-6)?,
            d_coef: read.number("d_coef", 1.0)?,
            growth_rate: read.number("growth_rate", f64::INFINITY)?,
            slice_p: slice_p as usize,
        })
    }

    /// Bytes of state for a tensor of `len` values.
    pub fn state_bytes(&self, len: usize) -> u64 {
        let tensors = match self.rule {
            Rule::Prodigy => 3 + usize::from(self.beta1 > 0.0),
            Rule::DAdaptAdam | Rule::DAdaptAdamPreprint => 3,
        };
        (4 * tensors * len) as u64
    }
}

/// The estimate shared by all parameters (a parameter group's `d`, `d_max`, numerator, `k`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Global {
    /// The distance estimate.
    pub d: f64,
    /// Prodigy: the largest estimate so far.
    pub d_max: f64,
    /// Prodigy's `d_numerator`, DAdaptAdam's `numerator_weighted`, DAdaptAdamPreprint's
    /// `gsq_weighted`.
    pub numerator: f64,
    /// Steps taken.
    pub k: u64,
}

impl Global {
    /// The state before the first step.
    pub fn new(config: &Config) -> Self {
        Self {
            d: config.d0,
            d_max: config.d0,
            numerator: 0.0,
            k: 0,
        }
    }

    /// As named float64 tensors (`dadapt.d`, ...).
    pub fn tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        [
            ("d", self.d),
            ("d_max", self.d_max),
            ("numerator", self.numerator),
            ("k", self.k as f64),
        ]
        .into_iter()
        .map(|(name, value)| {
            Ok((
                format!("dadapt.{name}"),
                Tensor::from_slice(&[value], 1, &Device::Cpu)?,
            ))
        })
        .collect()
    }

    /// Restores [`Global::tensors`].
    pub fn restore(&mut self, saved: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
        let read = |name: &str| -> std::result::Result<f64, String> {
            let key = format!("dadapt.{name}");
            saved
                .get(&key)
                .ok_or_else(|| format!("{key} is missing (different optimizer?)"))?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(|e| format!("{key}: {e}"))?
                .first()
                .copied()
                .ok_or_else(|| format!("{key} is empty"))
        };
        self.d = read("d")?;
        self.d_max = read("d_max")?;
        self.numerator = read("numerator")?;
        self.k = read("k")? as u64;
        Ok(())
    }
}

/// The state of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// `s`.
    s: Vec<f32>,
    /// Prodigy: the starting values (`p0`).
    p0: Vec<f32>,
    /// `exp_avg` (empty for Prodigy with `beta1 = 0`).
    exp_avg: Vec<f32>,
    /// `exp_avg_sq`.
    exp_avg_sq: Vec<f32>,
}

impl State {
    /// The state before the first step of a tensor with values `param`.
    pub fn new(config: &Config, param: &[f32]) -> Self {
        let len = param.len();
        let (s, p0) = match config.rule {
            Rule::Prodigy => (
                vec![0.0; len.div_ceil(config.slice_p)],
                param.iter().step_by(config.slice_p).copied().collect(),
            ),
            Rule::DAdaptAdam | Rule::DAdaptAdamPreprint => (vec![0.0; len], Vec::new()),
        };
        let first = config.rule != Rule::Prodigy || config.beta1 > 0.0;
        Self {
            s,
            p0,
            exp_avg: if first { vec![0.0; len] } else { Vec::new() },
            exp_avg_sq: vec![0.0; len],
        }
    }

    fn named(&mut self) -> [(&'static str, &mut Vec<f32>); 4] {
        [
            ("s", &mut self.s),
            ("p0", &mut self.p0),
            ("exp_avg", &mut self.exp_avg),
            ("exp_avg_sq", &mut self.exp_avg_sq),
        ]
    }

    /// The state under the reference's names with the tensor's index (`s.3`, `p0.3`, ...).
    pub fn tensors(&self, index: usize) -> candle_core::Result<Vec<(String, Tensor)>> {
        [
            ("s", &self.s),
            ("p0", &self.p0),
            ("exp_avg", &self.exp_avg),
            ("exp_avg_sq", &self.exp_avg_sq),
        ]
        .into_iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, values)| {
            Ok((
                format!("{name}.{index}"),
                Tensor::from_slice(values, values.len(), &Device::Cpu)?,
            ))
        })
        .collect()
    }

    /// Restores [`State::tensors`].
    pub fn restore(
        &mut self,
        index: usize,
        saved: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        for (name, values) in self.named() {
            if values.is_empty() {
                continue;
            }
            let key = format!("{name}.{index}");
            let restored = saved
                .get(&key)
                .ok_or_else(|| format!("{key} is missing (different optimizer?)"))?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| format!("{key}: {e}"))?;
            if restored.len() != values.len() {
                return Err(format!(
                    "{key} has {} values, this run keeps {}",
                    restored.len(),
                    values.len()
                ));
            }
            *values = restored;
        }
        Ok(())
    }
}

/// One tensor taking part in a step.
pub struct Slot<'a> {
    /// Its values, updated in place.
    pub param: &'a mut [f32],
    /// Its gradient.
    pub grad: Vec<f32>,
    /// Its state.
    pub state: &'a mut State,
    /// Its parameter group's learning rate.
    pub lr: f64,
}

/// One step over every tensor that has a gradient. Returns false when nothing moved (every
/// gradient zero), as the references return early then, without counting the step.
pub fn step(config: &Config, global: &mut Global, slots: &mut [Slot]) -> bool {
    let (beta1, beta2) = (config.beta1, config.beta2);
    let lr = slots.iter().map(|s| s.lr).fold(0.0, f64::max);
    let k = global.k as i32;
    let bias_correction = if config.use_bias_correction {
        (1.0 - beta2.powi(k + 1)).sqrt() / (1.0 - beta1.powi(k + 1))
    } else {
        1.0
    };
    let d = global.d;
    let dlr = d * lr * bias_correction;
    let sqrt_beta2 = beta2.sqrt();
    let mut numerator_sum = 0.0f64;
    let mut denominator = 0.0f64;
    // DAdaptAdamPreprint: the sums of `s * s / denom` and `g * g / denom`.
    let mut sksq_weighted = 0.0f64;
    let mut g_sq = 0.0f64;
    for slot in slots.iter_mut() {
        let grad = &mut slot.grad;
        let param = &*slot.param;
        if config.weight_decay != 0.0 && !config.decouple {
            let decay = config.weight_decay as f32;
            for (g, p) in grad.iter_mut().zip(param) {
                *g += decay * p;
            }
        }
        if slot.lr <= 0.0 {
            continue;
        }
        let state = &mut *slot.state;
        match config.rule {
            Rule::Prodigy => {
                let scale = d / config.d0;
                let dot: f64 = (grad.iter().step_by(config.slice_p))
                    .zip(param.iter().step_by(config.slice_p))
                    .zip(&state.p0)
                    .map(|((&g, &p), &p0)| f64::from(g * (p0 - p)))
                    .sum();
                numerator_sum += scale * dlr * f64::from(dot as f32);
                if beta1 > 0.0 {
                    let add = (d * (1.0 - beta1)) as f32;
                    for (m, &g) in state.exp_avg.iter_mut().zip(grad.iter()) {
                        *m = *m * beta1 as f32 + g * add;
                    }
                }
                let add = (d * d * (1.0 - beta2)) as f32;
                for (v, &g) in state.exp_avg_sq.iter_mut().zip(grad.iter()) {
                    *v = *v * beta2 as f32 + add * g * g;
                }
                let add = (if config.safeguard_warmup {
                    scale * d
                } else {
                    scale * dlr
                }) as f32;
                for (s, &g) in state.s.iter_mut().zip(grad.iter().step_by(config.slice_p)) {
                    *s = *s * config.beta3 as f32 + g * add;
                }
            }
            Rule::DAdaptAdam => {
                let eps = config.eps as f32;
                let dot: f64 = (grad.iter())
                    .zip(&state.s)
                    .zip(&state.exp_avg_sq)
                    .map(|((&g, &s), &v)| f64::from(g * (s / (v.sqrt() + eps))))
                    .sum();
                numerator_sum += dlr * f64::from(dot as f32);
                let add = (dlr * (1.0 - beta1)) as f32;
                for (m, &g) in state.exp_avg.iter_mut().zip(grad.iter()) {
                    *m = *m * beta1 as f32 + g * add;
                }
                let add = (1.0 - beta2) as f32;
                for (v, &g) in state.exp_avg_sq.iter_mut().zip(grad.iter()) {
                    *v = *v * beta2 as f32 + add * g * g;
                }
                let add = (dlr * (1.0 - sqrt_beta2)) as f32;
                for (s, &g) in state.s.iter_mut().zip(grad.iter()) {
                    *s = *s * sqrt_beta2 as f32 + g * add;
                }
            }
            Rule::DAdaptAdamPreprint => {
                let eps = config.eps as f32;
                let add = (dlr * (1.0 - beta1)) as f32;
                for (m, &g) in state.exp_avg.iter_mut().zip(grad.iter()) {
                    *m = *m * beta1 as f32 + g * add;
                }
                let add = (1.0 - beta2) as f32;
                for (v, &g) in state.exp_avg_sq.iter_mut().zip(grad.iter()) {
                    *v = *v * beta2 as f32 + add * (g * g);
                }
                let add = (dlr * (1.0 - beta2)) as f32;
                for (s, &g) in state.s.iter_mut().zip(grad.iter()) {
                    *s = *s * beta2 as f32 + g * add;
                }
                let (mut gg, mut ss) = (0.0f64, 0.0f64);
                for ((&g, &s), &v) in grad.iter().zip(&state.s).zip(&state.exp_avg_sq) {
                    let denom = v.sqrt() + eps;
                    gg += f64::from(g * g / denom);
                    ss += f64::from(s * s / denom);
                }
                g_sq += f64::from(gg as f32);
                sksq_weighted += f64::from(ss as f32);
            }
        }
        let l1: f64 = state.s.iter().map(|&s| f64::from(s.abs())).sum();
        denominator += f64::from(l1 as f32);
    }
    if denominator == 0.0 {
        return false;
    }
    match config.rule {
        Rule::Prodigy => {
            let numerator = global.numerator * config.beta3 + numerator_sum;
            if lr > 0.0 {
                let d_hat = config.d_coef * numerator / denominator;
                let mut d = global.d;
                if d == config.d0 {
                    d = d.max(d_hat);
                }
                global.d_max = global.d_max.max(d_hat);
                global.d = global.d_max.min(d * config.growth_rate);
            }
            global.numerator = numerator;
        }
        Rule::DAdaptAdam => {
            let numerator = sqrt_beta2 * global.numerator + (1.0 - sqrt_beta2) * numerator_sum;
            if lr > 0.0 {
                let d_hat = numerator / ((1.0 - sqrt_beta2) * denominator);
                global.d = global.d.max(d_hat.min(global.d * config.growth_rate));
            }
            global.numerator = numerator;
        }
        Rule::DAdaptAdamPreprint => {
            let gsq_weighted = beta2 * global.numerator + g_sq * dlr.powi(2) * (1.0 - beta2);
            if lr > 0.0 {
                let d_hat = (sksq_weighted / (1.0 - beta2) - gsq_weighted) / denominator;
                global.d = global.d.max(d_hat.min(global.d * config.growth_rate));
            }
            global.numerator = gsq_weighted;
        }
    }
    let d = global.d;
    for slot in slots.iter_mut() {
        let state = &*slot.state;
        let eps = match config.rule {
            Rule::Prodigy => (d * config.eps) as f32,
            Rule::DAdaptAdam | Rule::DAdaptAdamPreprint => config.eps as f32,
        };
        let decay = (-config.weight_decay * dlr) as f32;
        let (step, moment): (f32, &[f32]) = match config.rule {
            Rule::Prodigy if beta1 > 0.0 => (-dlr as f32, state.exp_avg.as_slice()),
            Rule::Prodigy => ((-dlr * d) as f32, slot.grad.as_slice()),
            Rule::DAdaptAdam | Rule::DAdaptAdamPreprint => (-1.0, state.exp_avg.as_slice()),
        };
        // The preprint leaves parameters whose group has no learning rate undecayed.
        let decays = config.weight_decay != 0.0
            && config.decouple
            && (config.rule != Rule::DAdaptAdamPreprint || slot.lr > 0.0);
        for i in 0..slot.param.len() {
            let denom = state.exp_avg_sq[i].sqrt() + eps;
            let p = &mut slot.param[i];
            if decays {
                *p += decay * *p;
            }
            *p += step * moment[i] / denom;
        }
    }
    global.k += 1;
    true
}

/// sd-scripts' learning-rate advice for these optimizers, and the references' refusal of
/// parameter groups with different learning rates.
pub fn check_learning_rates(rule: Rule, lrs: &[f64]) -> Result<()> {
    let Some(&first) = lrs.first() else {
        return Ok(());
    };
    if first <= 0.1 {
        tracing::warn!(
            "learning rate is too low. If using D-Adaptation or Prodigy, set learning rate around \
             1.0: lr={first}"
        );
        tracing::warn!("recommend option: lr=1.0");
    }
    if lrs.iter().any(|&lr| lr != first && lr != 0.0) {
        let name = match rule {
            Rule::Prodigy => "Prodigy",
            Rule::DAdaptAdam => "DAdaptAdam",
            Rule::DAdaptAdamPreprint => "DAdaptAdamPreprint",
        };
        return Err(Error::Usage(format!(
            "--optimizer_type {name} needs one learning rate for every LoRA tensor (it stops with \"Setting \
             different lr values in different parameter groups is only supported for values of \
             0\"): drop loraplus_lr_ratio and the block learning-rate weights from --network_args"
        )));
    }
    Ok(())
}
