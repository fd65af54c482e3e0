//! The schedule-free optimizers of the `schedulefree` package (`AdamWScheduleFree`,
//! `RAdamScheduleFree`, `SGDScheduleFree`), as sd-scripts builds them. Each keeps `z` (the
//! base sequence) besides the parameters; training reads the parameters at `y`, evaluation and
//! saving at `x`. sd-scripts switches to `x` (`optimizer.eval()`) after every step and back to
//! `y` (`optimizer.train()`) before the next, so [`State::update`] ends at `x` and
//! [`State::to_train`] comes back; the float32 round trip is part of the trajectory there and
//! here. The arithmetic follows torch's: float32 tensors, float64 Python scalars.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::literal::Literal;
use super::Kwargs;
use crate::Result;

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// `schedulefree.AdamWScheduleFree`.
    AdamW,
    /// `schedulefree.RAdamScheduleFree`.
    RAdam,
    /// `schedulefree.SGDScheduleFree`.
    Sgd,
}

/// The keyword arguments of `AdamWScheduleFree`.
pub const ADAMW_KEYS: &[&str] = &[
    "betas",
    "eps",
    "weight_decay",
    "warmup_steps",
    "r",
    "weight_lr_power",
    "foreach",
];
/// The keyword arguments of `RAdamScheduleFree`.
pub const RADAM_KEYS: &[&str] = &[
    "betas",
    "eps",
    "weight_decay",
    "r",
    "weight_lr_power",
    "foreach",
    "silent_sgd_phase",
];
/// The keyword arguments of `SGDScheduleFree`.
pub const SGD_KEYS: &[&str] = &[
    "momentum",
    "weight_decay",
    "warmup_steps",
    "r",
    "weight_lr_power",
    "foreach",
];

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Which optimizer.
    pub rule: Rule,
    /// The interpolation between `x` and `z` (`betas[0]`, SGD's `momentum`).
    pub beta1: f64,
    /// Second-moment decay (not SGD).
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Weight decay, added to the normalised gradient at `y`.
    pub weight_decay: f64,
    /// Linear warmup of the learning rate over this many steps (not RAdam).
    pub warmup_steps: usize,
    /// Power of the step in the averaging weight.
    pub r: f64,
    /// Power of the largest learning rate in the averaging weight.
    pub weight_lr_power: f64,
    /// RAdam: no step while the rectification is undefined.
    pub silent_sgd_phase: bool,
}

impl Config {
    /// Reads the arguments of `rule`.
    pub(super) fn from_kwargs(rule: Rule, read: &Kwargs) -> Result<Self> {
        let (beta1, beta2) = match rule {
            Rule::Sgd => {
                let momentum = read.number("momentum", 0.9)?;
                if !(momentum > 0.0 && momentum < 1.0) {
                    return Err(read.bad(
                        "momentum",
                        &Literal::Float(momentum),
                        "a number between 0 and 1",
                    ));
                }
                (momentum, 0.0)
            }
            _ => read.betas("betas", (0.9, 0.999))?,
        };
        let warmup = read.number("warmup_steps", 0.0)?;
        if warmup < 0.0 || warmup.fract() != 0.0 {
            return Err(read.bad(
                "warmup_steps",
                &Literal::Float(warmup),
                "a whole number from 0",
            ));
        }
        Ok(Self {
            rule,
            beta1,
            beta2,
            eps: read.number_in("eps", 1e-8, 0.0..f64::INFINITY)?,
            weight_decay: read.number("weight_decay", 0.0)?,
            warmup_steps: warmup as usize,
            r: read.number("r", 0.0)?,
            weight_lr_power: read.number("weight_lr_power", 2.0)?,
            silent_sgd_phase: read.flag("silent_sgd_phase", true)?,
        })
    }

    /// Bytes of state for a tensor of `len` values (`z`, and `exp_avg_sq` but for SGD).
    pub fn state_bytes(&self, len: usize) -> u64 {
        let tensors = if self.rule == Rule::Sgd { 1 } else { 2 };
        (4 * tensors * len) as u64
    }

    /// The learning rate and the averaging weight `ckp1` of step `k` (from 0), updating the
    /// parameter group's largest learning rate and weight sum.
    fn schedule(&self, group: &mut Group, lr: f64) -> (f64, f64) {
        let k = group.k;
        group.k += 1;
        let step = (k + 1) as f64;
        let lr = match self.rule {
            Rule::RAdam => {
                let beta2_t = self.beta2.powf(step);
                let rho_inf = 2.0 / (1.0 - self.beta2) - 1.0;
                let rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t);
                let rect = if rho_t > 4.0 {
                    ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                        / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                        .sqrt()
                } else if self.silent_sgd_phase {
                    0.0
                } else {
                    1.0
                };
                lr * rect
            }
            _ if (k as usize) < self.warmup_steps => lr * (step / self.warmup_steps as f64),
            _ => lr,
        };
        group.lr_max = group.lr_max.max(lr);
        let weight = step.powf(self.r) * group.lr_max.powf(self.weight_lr_power);
        group.weight_sum += weight;
        let ckp1 = if group.weight_sum == 0.0 {
            0.0
        } else {
            weight / group.weight_sum
        };
        (lr, ckp1)
    }
}

/// A parameter group's running values (`lr_max`, `weight_sum`, steps taken `k`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Group {
    lr_max: f64,
    weight_sum: f64,
    k: u64,
}

/// torch's `lerp_`: `a + w (b - a)` for `w < 0.5`, else `b - (b - a)(1 - w)`, in float32.
fn lerp(a: f32, b: f32, weight: f64) -> f32 {
    let w = weight as f32;
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// The state of one tensor: `z`, `exp_avg_sq`, its group's running values, and whether the
/// parameter is at `y` (training) or `x`.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    z: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    group: Group,
    train_mode: bool,
}

impl State {
    /// The state before the first step of a tensor with values `param` (at `y`, as
    /// sd-scripts calls `train()` when it builds the optimizer).
    pub fn new(config: &Config, param: &[f32]) -> Self {
        Self {
            z: param.to_vec(),
            exp_avg_sq: if config.rule == Rule::Sgd {
                Vec::new()
            } else {
                vec![0.0; param.len()]
            },
            group: Group {
                lr_max: -1.0,
                weight_sum: 0.0,
                k: 0,
            },
            train_mode: true,
        }
    }

    /// Moves `param` from `x` to `y` (`optimizer.train()`); nothing when already there.
    pub fn to_train(&mut self, config: &Config, param: &mut [f32]) {
        if !self.train_mode {
            for (p, z) in param.iter_mut().zip(&self.z) {
                *p = lerp(*p, *z, 1.0 - config.beta1);
            }
            self.train_mode = true;
        }
    }

    /// Whether the parameter is at `y`.
    pub fn in_train_mode(&self) -> bool {
        self.train_mode
    }

    /// One step of the tensor's parameter group (`lr` is the group's rate), taken whether or
    /// not the tensor has a gradient; with `grad` the tensor is updated at `y` and moved to `x`.
    pub fn update(&mut self, config: &Config, param: &mut [f32], grad: Option<&[f32]>, lr: f64) {
        let k = self.group.k;
        let (lr, ckp1) = config.schedule(&mut self.group, lr);
        let Some(grad) = grad else {
            return;
        };
        self.to_train(config, param);
        let beta1 = config.beta1;
        let y_lr = (lr * (beta1 * (1.0 - ckp1) - 1.0)) as f32;
        let z_lr = lr as f32;
        let decay = config.weight_decay as f32;
        let step = (k + 1) as f64;
        let normalise = match config.rule {
            Rule::Sgd => None,
            Rule::AdamW => Some(1.0 - config.beta2.powf(step)),
            Rule::RAdam => {
                let bias_correction2 = 1.0 - config.beta2.powf(step);
                let rho_inf = 2.0 / (1.0 - config.beta2) - 1.0;
                let rho_t = rho_inf - 2.0 * step * config.beta2.powf(step) / bias_correction2;
                (rho_t > 4.0).then_some(bias_correction2)
            }
        };
        let (beta2, keep2) = (config.beta2 as f32, (1.0 - config.beta2) as f32);
        let (bias2, eps) = (normalise.unwrap_or(1.0) as f32, config.eps as f32);
        for i in 0..param.len() {
            let mut g = grad[i];
            if config.rule != Rule::Sgd {
                let v = &mut self.exp_avg_sq[i];
                *v = *v * beta2 + keep2 * g * g;
                if normalise.is_some() {
                    g /= (*v / bias2).sqrt() + eps;
                }
            }
            let y = &mut param[i];
            if decay != 0.0 {
                g += *y * decay;
            }
            *y = lerp(*y, self.z[i], ckp1);
            *y += g * y_lr;
            self.z[i] -= g * z_lr;
        }
        // sd-scripts' optimizer.eval() after the step.
        for (p, z) in param.iter_mut().zip(&self.z) {
            *p = lerp(*p, *z, 1.0 - 1.0 / beta1);
        }
        self.train_mode = false;
    }

    /// The state as named tensors with the tensor's index (`z.3`, `exp_avg_sq.3`,
    /// `schedulefree.3`: largest learning rate, weight sum, steps, train mode).
    pub fn tensors(&self, index: usize) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            format!("z.{index}"),
            Tensor::from_slice(&self.z, self.z.len(), &Device::Cpu)?,
        )];
        if !self.exp_avg_sq.is_empty() {
            out.push((
                format!("exp_avg_sq.{index}"),
                Tensor::from_slice(&self.exp_avg_sq, self.exp_avg_sq.len(), &Device::Cpu)?,
            ));
        }
        let scalars = [
            self.group.lr_max,
            self.group.weight_sum,
            self.group.k as f64,
            f64::from(u8::from(self.train_mode)),
        ];
        out.push((
            format!("schedulefree.{index}"),
            Tensor::from_slice(&scalars, 4, &Device::Cpu)?,
        ));
        Ok(out)
    }

    /// Restores [`State::tensors`].
    pub fn restore(
        &mut self,
        index: usize,
        saved: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        let read = |name: &str| -> std::result::Result<Tensor, String> {
            let key = format!("{name}.{index}");
            saved
                .get(&key)
                .ok_or_else(|| format!("{key} is missing (different optimizer?)"))?
                .flatten_all()
                .map_err(|e| format!("{key}: {e}"))
        };
        let mut vectors = vec![("z", &mut self.z)];
        if !self.exp_avg_sq.is_empty() {
            vectors.push(("exp_avg_sq", &mut self.exp_avg_sq));
        }
        for (name, values) in vectors {
            let restored = read(name)?
                .to_vec1::<f32>()
                .map_err(|e| format!("{name}.{index}: {e}"))?;
            if restored.len() != values.len() {
                return Err(format!("{name}.{index} has the wrong shape"));
            }
            *values = restored;
        }
        let scalars = read("schedulefree")?
            .to_vec1::<f64>()
            .map_err(|e| format!("schedulefree.{index}: {e}"))?;
        let [lr_max, weight_sum, k, train_mode] = scalars[..] else {
            return Err(format!("schedulefree.{index} has the wrong shape"));
        };
        self.group = Group {
            lr_max,
            weight_sum,
            k: k as u64,
        };
        self.train_mode = train_mode != 0.0;
        Ok(())
    }
}
