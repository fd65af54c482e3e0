//! The learning-rate-free optimizers sd-scripts offers: prodigyopt's `Prodigy` and
//! dadaptation's `DAdaptAdam`, `DAdaptAdaGrad`, `DAdaptSGD`, `DAdaptLion`, `DAdaptAdan` and its
//! `experimental` `DAdaptAdamPreprint` (sd-scripts' `DAdaptation`) and `DAdaptAdanIP`. Each
//! estimates a distance `d` from sums over every parameter, so one step first updates every
//! tensor's moments, then `d`, then every parameter. The
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
    /// `dadaptation.DAdaptAdaGrad`.
    DAdaptAdaGrad,
    /// `dadaptation.DAdaptSGD`.
    DAdaptSgd,
    /// `dadaptation.DAdaptLion`.
    DAdaptLion,
    /// `dadaptation.DAdaptAdan`.
    DAdaptAdan,
    /// `dadaptation.experimental.DAdaptAdanIP`.
    DAdaptAdanIp,
}

impl Rule {
    /// sd-scripts' `--optimizer_type` name.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Prodigy => "Prodigy",
            Rule::DAdaptAdam => "DAdaptAdam",
            Rule::DAdaptAdamPreprint => "DAdaptAdamPreprint",
            Rule::DAdaptAdaGrad => "DAdaptAdaGrad",
            Rule::DAdaptSgd => "DAdaptSGD",
            Rule::DAdaptLion => "DAdaptLion",
            Rule::DAdaptAdan => "DAdaptAdan",
            Rule::DAdaptAdanIp => "DAdaptAdanIP",
        }
    }

    fn is_adan(self) -> bool {
        matches!(self, Rule::DAdaptAdan | Rule::DAdaptAdanIp)
    }
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

/// The keyword arguments of `DAdaptAdaGrad`.
pub const DADAPT_ADAGRAD_KEYS: &[&str] = &[
    "momentum",
    "log_every",
    "weight_decay",
    "eps",
    "d0",
    "growth_rate",
];

/// The keyword arguments of `DAdaptSGD`.
pub const DADAPT_SGD_KEYS: &[&str] = &[
    "momentum",
    "weight_decay",
    "log_every",
    "d0",
    "growth_rate",
    "fsdp_in_use",
];

/// The keyword arguments of `DAdaptLion`.
pub const DADAPT_LION_KEYS: &[&str] = &["betas", "weight_decay", "log_every", "d0", "fsdp_in_use"];

/// The keyword arguments of `DAdaptAdan` and `DAdaptAdanIP`.
pub const DADAPT_ADAN_KEYS: &[&str] = &[
    "betas",
    "eps",
    "weight_decay",
    "no_prox",
    "log_every",
    "d0",
    "growth_rate",
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
    /// Decay of Prodigy's numerator and `s` (default `sqrt(beta2)`); the Adans' third beta.
    pub beta3: f64,
    /// DAdaptSGD's and DAdaptAdaGrad's momentum.
    pub momentum: f64,
    /// The Adans: decay the weights before the step instead of dividing after it.
    pub no_prox: bool,
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
        let (beta1, beta2, beta3) = if rule.is_adan() {
            let [a, b, c] = read.beta_triple("betas", [0.98, 0.92, 0.99])?;
            (a, b, c)
        } else {
            let default = if rule == Rule::DAdaptLion {
                (0.9, 0.99)
            } else {
                (0.9, 0.999)
            };
            let (beta1, beta2) = read.betas("betas", default)?;
            let beta3 = read.optional_number("beta3")?.unwrap_or(beta2.sqrt());
            (beta1, beta2, beta3)
        };
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
            momentum: read.number_in("momentum", 0.0, 0.0..1.0)?,
            no_prox: read.flag("no_prox", false)?,
            eps: positive(
                "eps",
                if rule == Rule::DAdaptAdaGrad {
                    1e-6
                } else {
                    1e-8
                },
            )?,
            weight_decay: read.number("weight_decay", if rule.is_adan() { 0.02 } else { 0.0 })?,
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
            Rule::DAdaptAdam | Rule::DAdaptAdamPreprint | Rule::DAdaptAdaGrad => 3,
            Rule::DAdaptSgd | Rule::DAdaptLion => 2,
            Rule::DAdaptAdan | Rule::DAdaptAdanIp => 5,
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
    /// Prodigy's `d_numerator`, the `numerator_weighted` of DAdaptAdam, DAdaptSGD, DAdaptLion
    /// and DAdaptAdanIP, the `gsq_weighted` of DAdaptAdamPreprint, DAdaptAdaGrad and DAdaptAdan.
    pub numerator: f64,
    /// DAdaptAdaGrad's `sksq_weighted`.
    pub sksq_weighted: f64,
    /// DAdaptAdaGrad's `skl1`.
    pub skl1: f64,
    /// DAdaptSGD's norm of the first gradient (`g0_norm`).
    pub g0_norm: f64,
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
            sksq_weighted: 0.0,
            skl1: 0.0,
            g0_norm: 0.0,
            k: 0,
        }
    }

    fn named(&mut self) -> [(&'static str, &mut f64); 6] {
        [
            ("d", &mut self.d),
            ("d_max", &mut self.d_max),
            ("numerator", &mut self.numerator),
            ("sksq_weighted", &mut self.sksq_weighted),
            ("skl1", &mut self.skl1),
            ("g0_norm", &mut self.g0_norm),
        ]
    }

    /// As named float64 tensors (`dadapt.d`, ...).
    pub fn tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut copy = *self;
        let k = copy.k as f64;
        (copy.named().into_iter())
            .map(|(name, value)| (name, *value))
            .chain([("k", k)])
            .map(|(name, value)| {
                Ok((
                    format!("dadapt.{name}"),
                    Tensor::from_slice(&[value], 1, &Device::Cpu)?,
                ))
            })
            .collect()
    }

    /// Restores [`Global::tensors`]. The sums only DAdaptAdaGrad and DAdaptSGD keep may be
    /// absent (states saved before they existed); they are 0 then.
    pub fn restore(&mut self, saved: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
        let read = |name: &str| -> std::result::Result<Option<f64>, String> {
            let key = format!("dadapt.{name}");
            let Some(tensor) = saved.get(&key) else {
                return Ok(None);
            };
            (tensor.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(|e| format!("{key}: {e}"))?
                .first()
                .copied()
                .map(Some)
                .ok_or_else(|| format!("{key} is empty"))
        };
        let k = read("k")?;
        for (name, slot) in self.named() {
            match read(name)? {
                Some(value) => *slot = value,
                None if matches!(name, "sksq_weighted" | "skl1" | "g0_norm") => *slot = 0.0,
                None => return Err(format!("dadapt.{name} is missing (different optimizer?)")),
            }
        }
        self.k = k.ok_or("dadapt.k is missing (different optimizer?)")? as u64;
        Ok(())
    }
}

/// The state of one tensor (empty vectors for what its optimizer does not keep).
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// `s`.
    s: Vec<f32>,
    /// The starting values: Prodigy's `p0` (every `slice_p`-th), DAdaptSGD's and
    /// DAdaptAdaGrad's `x0`.
    p0: Vec<f32>,
    /// `exp_avg` (empty for Prodigy with `beta1 = 0`).
    exp_avg: Vec<f32>,
    /// `exp_avg_sq`.
    exp_avg_sq: Vec<f32>,
    /// DAdaptAdaGrad's sum of squared gradients (`alphak`, from 1e-6).
    alphak: Vec<f32>,
    /// The Adans' average of gradient differences (`exp_avg_diff`).
    exp_avg_diff: Vec<f32>,
    /// The Adans' previous gradient (`pre_grad`).
    pre_grad: Vec<f32>,
}

impl State {
    /// The state before the first step of a tensor with values `param`.
    pub fn new(config: &Config, param: &[f32]) -> Self {
        let len = param.len();
        let zeros = |used: bool| if used { vec![0.0; len] } else { Vec::new() };
        let rule = config.rule;
        let (s, p0) = match rule {
            Rule::Prodigy => (
                vec![0.0; len.div_ceil(config.slice_p)],
                param.iter().step_by(config.slice_p).copied().collect(),
            ),
            Rule::DAdaptSgd | Rule::DAdaptAdaGrad => (vec![0.0; len], param.to_vec()),
            _ => (vec![0.0; len], Vec::new()),
        };
        let first = match rule {
            Rule::Prodigy => config.beta1 > 0.0,
            Rule::DAdaptSgd | Rule::DAdaptAdaGrad => false,
            _ => true,
        };
        Self {
            s,
            p0,
            exp_avg: zeros(first),
            exp_avg_sq: zeros(!matches!(
                rule,
                Rule::DAdaptSgd | Rule::DAdaptAdaGrad | Rule::DAdaptLion
            )),
            alphak: if rule == Rule::DAdaptAdaGrad {
                vec![1e-6; len]
            } else {
                Vec::new()
            },
            exp_avg_diff: zeros(rule.is_adan()),
            pre_grad: zeros(rule.is_adan()),
        }
    }

    fn named(&mut self) -> [(&'static str, &mut Vec<f32>); 7] {
        [
            ("s", &mut self.s),
            ("p0", &mut self.p0),
            ("exp_avg", &mut self.exp_avg),
            ("exp_avg_sq", &mut self.exp_avg_sq),
            ("alphak", &mut self.alphak),
            ("exp_avg_diff", &mut self.exp_avg_diff),
            ("pre_grad", &mut self.pre_grad),
        ]
    }

    /// The state under the reference's names with the tensor's index (`s.3`, `p0.3`, ...).
    pub fn tensors(&self, index: usize) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut copy = self.clone();
        (copy.named().into_iter())
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
    /// Updates it took before this one (the Adans keep the first gradient as `pre_grad`).
    pub updates: usize,
}

/// A float32 sum, computed in float64 and read out as torch's `.sum().item()` gives it.
fn item(values: impl Iterator<Item = f32>) -> f64 {
    f64::from(values.map(f64::from).sum::<f64>() as f32)
}

/// One step over every tensor that has a gradient. Returns false when nothing moved (every
/// gradient zero), as the references return early then, without counting the step.
pub fn step(config: &Config, global: &mut Global, slots: &mut [Slot]) -> bool {
    match config.rule {
        Rule::DAdaptSgd => return sgd_step(config, global, slots),
        Rule::DAdaptAdaGrad => return adagrad_step(config, global, slots),
        Rule::DAdaptLion => return lion_step(config, global, slots),
        Rule::DAdaptAdan | Rule::DAdaptAdanIp => return adan_step(config, global, slots),
        Rule::Prodigy | Rule::DAdaptAdam | Rule::DAdaptAdamPreprint => {}
    }
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
            _ => {
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
        _ => {
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
            _ => config.eps as f32,
        };
        let decay = (-config.weight_decay * dlr) as f32;
        let (step, moment): (f32, &[f32]) = match config.rule {
            Rule::Prodigy if beta1 > 0.0 => (-dlr as f32, state.exp_avg.as_slice()),
            Rule::Prodigy => ((-dlr * d) as f32, slot.grad.as_slice()),
            _ => (-1.0, state.exp_avg.as_slice()),
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

/// `x = x * (1 - ck) + z * ck` (torch's `mul_(1 - ck).add_(z, alpha=ck)`).
fn average_towards(param: &mut [f32], z: impl Iterator<Item = f32>, ck: f64) {
    let (keep, take) = ((1.0 - ck) as f32, ck as f32);
    for (p, z) in param.iter_mut().zip(z) {
        *p = *p * keep + z * take;
    }
}

/// DAdaptSGD: dual averaging, the step scaled by the first gradient's norm.
fn sgd_step(config: &Config, global: &mut Global, slots: &mut [Slot]) -> bool {
    let lr = slots.iter().map(|s| s.lr).fold(0.0, f64::max);
    if global.k == 0 {
        // The reference adds the weight decay here into a copy it drops.
        let g_sq: f64 = (slots.iter())
            .filter(|slot| slot.lr > 0.0)
            .map(|slot| item(slot.grad.iter().map(|g| g * g)))
            .sum();
        global.g0_norm = g_sq.sqrt();
    }
    if global.g0_norm == 0.0 {
        return false;
    }
    let dlr = global.d * lr / global.g0_norm;
    let mut numerator = global.numerator;
    let mut sk_sq = 0.0f64;
    for slot in slots.iter_mut() {
        if config.weight_decay != 0.0 {
            let decay = config.weight_decay as f32;
            for (g, p) in slot.grad.iter_mut().zip(slot.param.iter()) {
                *g += decay * p;
            }
        }
        if slot.lr > 0.0 {
            let s = &mut slot.state.s;
            numerator += dlr * item(slot.grad.iter().zip(s.iter()).map(|(g, s)| g * s));
            let add = dlr as f32;
            for (s, g) in s.iter_mut().zip(&slot.grad) {
                *s += add * g;
            }
            sk_sq += item(s.iter().map(|s| s * s));
        }
    }
    if sk_sq == 0.0 {
        return false;
    }
    if lr > 0.0 {
        let d_hat = 2.0 * numerator / sk_sq.sqrt();
        global.d = global.d.max(d_hat.min(global.d * config.growth_rate));
    }
    global.numerator = numerator;
    for slot in slots.iter_mut() {
        let state = &*slot.state;
        let z = state.p0.iter().zip(&state.s).map(|(x0, s)| x0 - s);
        average_towards(slot.param, z, 1.0 - config.momentum);
    }
    global.k += 1;
    true
}

/// DAdaptAdaGrad: AdaGrad's dual averaging with `d` from the weighted sums of `s`.
fn adagrad_step(config: &Config, global: &mut Global, slots: &mut [Slot]) -> bool {
    let lr = slots.iter().map(|s| s.lr).fold(0.0, f64::max);
    let dlr = global.d * lr;
    let eps = config.eps as f32;
    let (mut g_sq, mut sksq_change, mut skl1_change) = (0.0f64, 0.0f64, 0.0f64);
    for slot in slots.iter_mut() {
        if config.weight_decay != 0.0 {
            let decay = config.weight_decay as f32;
            for (g, p) in slot.grad.iter_mut().zip(slot.param.iter()) {
                *g += decay * p;
            }
        }
        let state = &mut *slot.state;
        let weighted = |state: &State| {
            item(
                (state.s.iter())
                    .zip(&state.alphak)
                    .map(|(s, a)| s * s / (a.sqrt() + eps)),
            )
        };
        let old_sksq = weighted(state);
        let old_l1 = item(state.s.iter().map(|s| s.abs()));
        for (a, g) in state.alphak.iter_mut().zip(&slot.grad) {
            *a += g * g;
        }
        g_sq += item(
            (slot.grad.iter())
                .zip(&state.alphak)
                .map(|(g, a)| g * g / (a.sqrt() + eps)),
        );
        let add = dlr as f32;
        for (s, g) in state.s.iter_mut().zip(&slot.grad) {
            *s += add * g;
        }
        sksq_change += weighted(state) - old_sksq;
        skl1_change += item(state.s.iter().map(|s| s.abs())) - old_l1;
    }
    let sksq_weighted = global.sksq_weighted + sksq_change;
    let skl1 = global.skl1 + skl1_change;
    if skl1 == 0.0 {
        return false;
    }
    let gsq_weighted = global.numerator + dlr * dlr * g_sq;
    if lr > 0.0 {
        let d_hat = (sksq_weighted - gsq_weighted) / skl1;
        global.d = global.d.max(d_hat.min(global.d * config.growth_rate));
    }
    global.numerator = gsq_weighted;
    global.sksq_weighted = sksq_weighted;
    global.skl1 = skl1;
    for slot in slots.iter_mut() {
        let state = &*slot.state;
        let z = (state.p0.iter())
            .zip(&state.s)
            .zip(&state.alphak)
            .map(|((x0, s), a)| x0 - s / (a.sqrt() + eps));
        if config.momentum != 0.0 {
            average_towards(slot.param, z, 1.0 - config.momentum);
        } else {
            for (p, z) in slot.param.iter_mut().zip(z) {
                *p = z;
            }
        }
    }
    global.k += 1;
    true
}

/// DAdaptLion: Lion's signed step of size `d * lr`, `d` from the averaged steps. It moves the
/// parameters before estimating `d`.
fn lion_step(config: &Config, global: &mut Global, slots: &mut [Slot]) -> bool {
    let lr = slots.iter().map(|s| s.lr).fold(0.0, f64::max);
    let dlr = global.d * lr;
    let (beta1, beta2) = (config.beta1 as f32, config.beta2);
    let sqrt_beta2 = beta2.sqrt();
    let decay = (1.0 - dlr * config.weight_decay) as f32;
    let (step, keep) = (-dlr as f32, (1.0 - config.beta1) as f32);
    let (m_add, s_add) = (
        ((1.0 - beta2) * dlr) as f32,
        ((1.0 - sqrt_beta2) * dlr) as f32,
    );
    let mut numerator_acum = 0.0f64;
    let mut sk_l1 = 0.0f64;
    for slot in slots.iter_mut() {
        let state = &mut *slot.state;
        let mut dot = 0.0f64;
        for i in 0..slot.param.len() {
            let g = slot.grad[i];
            let m = &mut state.exp_avg[i];
            let update = sign(*m * beta1 + g * keep);
            let p = &mut slot.param[i];
            *p *= decay;
            *p += step * update;
            *m = *m * beta2 as f32 + g * m_add;
            dot += f64::from(update * state.s[i]);
            state.s[i] = state.s[i] * sqrt_beta2 as f32 + update * s_add;
        }
        numerator_acum += dlr * f64::from(dot as f32);
        sk_l1 += item(state.s.iter().map(|s| s.abs()));
    }
    let numerator = sqrt_beta2 * global.numerator + (1.0 - sqrt_beta2) * numerator_acum;
    if sk_l1 == 0.0 {
        return false;
    }
    if lr > 0.0 {
        let d_hat = numerator / ((1.0 - sqrt_beta2) * sk_l1);
        global.d = global.d.max(d_hat);
    }
    global.numerator = numerator;
    global.k += 1;
    true
}

/// torch's `sign`: -1, 0 or 1.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// DAdaptAdan and DAdaptAdanIP: Adan's three averages (gradient, gradient difference, squared
/// Nesterov gradient), `d` from `s` weighted by the second moment (Adan) or from the inner
/// products of gradients and `s` (AdanIP, whose scalars are float32 tensors as there).
fn adan_step(config: &Config, global: &mut Global, slots: &mut [Slot]) -> bool {
    let lr = slots.iter().map(|s| s.lr).fold(0.0, f64::max);
    let ip = config.rule == Rule::DAdaptAdanIp;
    let dlr = global.d * lr;
    let (beta1, beta2, beta3) = (config.beta1, config.beta2, config.beta3);
    let eps = config.eps as f32;
    let (b1, b2, b3) = (beta1 as f32, beta2 as f32, beta3 as f32);
    let m_add = (dlr * (1.0 - beta1)) as f32;
    let n_add = (dlr * (1.0 - beta2)) as f32;
    let v_add = (1.0 - beta3) as f32;
    let s_add = (dlr * (1.0 - beta3)) as f32;
    let (mut g_sq, mut sksq_weighted, mut sk_l1) = (0.0f64, 0.0f64, 0.0f64);
    let mut numerator_acum = 0.0f32;
    for slot in slots.iter_mut() {
        let state = &mut *slot.state;
        if slot.updates == 0 {
            state.pre_grad.copy_from_slice(&slot.grad);
        }
        let (mut gg, mut ss, mut ip_dot) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..slot.grad.len() {
            let g = slot.grad[i];
            let diff = g - state.pre_grad[i];
            let update = g + b2 * diff;
            if ip {
                let denom = state.exp_avg_sq[i].sqrt() + eps;
                ip_dot += f64::from(g * (state.s[i] / denom));
            }
            state.exp_avg[i] = state.exp_avg[i] * b1 + g * m_add;
            state.exp_avg_diff[i] = state.exp_avg_diff[i] * b2 + diff * n_add;
            state.exp_avg_sq[i] = state.exp_avg_sq[i] * b3 + update * update * v_add;
            let denom = state.exp_avg_sq[i].sqrt() + eps;
            if !ip {
                gg += f64::from(g * g / denom);
            }
            state.s[i] = state.s[i] * b3 + g * s_add;
            if !ip {
                ss += f64::from(state.s[i] * state.s[i] / denom);
            }
        }
        if ip {
            numerator_acum += dlr as f32 * ip_dot as f32;
        } else {
            g_sq += f64::from(gg as f32);
            sksq_weighted += f64::from(ss as f32);
        }
        sk_l1 += item(state.s.iter().map(|s| s.abs()));
    }
    let numerator = if ip {
        f64::from(beta3 as f32 * global.numerator as f32 + v_add * numerator_acum)
    } else {
        beta3 * global.numerator + g_sq * dlr.powi(2) * (1.0 - beta3)
    };
    if sk_l1 == 0.0 {
        return false;
    }
    if lr > 0.0 {
        let d_hat = if ip {
            f64::from((2.0 * (beta3 / (1.0 - beta3))) as f32 * numerator as f32 / sk_l1 as f32)
        } else {
            (sksq_weighted / (1.0 - beta3) - numerator) / sk_l1
        };
        global.d = global.d.max(d_hat.min(global.d * config.growth_rate));
    }
    global.numerator = numerator;
    let (shrink, divide) = (
        (1.0 - dlr * config.weight_decay) as f32,
        (1.0 + dlr * config.weight_decay) as f32,
    );
    for slot in slots.iter_mut() {
        let state = &mut *slot.state;
        for i in 0..slot.param.len() {
            let denom = state.exp_avg_sq[i].sqrt() + eps;
            let update = (state.exp_avg[i] + b2 * state.exp_avg_diff[i]) / denom;
            let p = &mut slot.param[i];
            if config.no_prox {
                *p *= shrink;
                *p -= update;
            } else {
                *p -= update;
                *p /= divide;
            }
        }
        state.pre_grad.copy_from_slice(&slot.grad);
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
        let name = rule.name();
        let why = match rule {
            Rule::DAdaptAdaGrad | Rule::DAdaptAdan | Rule::DAdaptAdanIp => {
                "it applies its first parameter group's learning rate to every tensor".to_string()
            }
            _ => "it stops with \"Setting different lr values in different parameter groups is \
                  only supported for values of 0\""
                .to_string(),
        };
        return Err(Error::Usage(format!(
            "--optimizer_type {name} needs one learning rate for every LoRA tensor ({why}): drop \
             loraplus_lr_ratio and the block learning-rate weights from --network_args"
        )));
    }
    Ok(())
}
