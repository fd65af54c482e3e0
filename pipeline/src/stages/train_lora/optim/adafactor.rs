//! transformers' `Adafactor` (`transformers.optimization.Adafactor`), as sd-scripts builds it:
//! a factored second moment (row and column means) for tensors of two or more dimensions,
//! update clipping by RMS, optional first moment (`beta1`), and a learning rate that is either
//! the scheduled one or, with `relative_step=True` (sd-scripts' default), `min(1e-2, 1/sqrt(t))`
//! (`warmup_init`: `min(1e-6 t, 1/sqrt(t))`), scaled by the parameter's RMS when
//! `scale_parameter=True`.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::literal::Literal;
use super::Kwargs;
use crate::{Error, Result};

/// The keyword arguments Adafactor takes.
pub const KEYS: &[&str] = &[
    "eps",
    "clip_threshold",
    "decay_rate",
    "beta1",
    "weight_decay",
    "scale_parameter",
    "relative_step",
    "warmup_init",
];

/// sd-scripts' `get_optimizer` corrections: `relative_step=True` unless given, and forced on
/// with `warmup_init=True`.
pub fn complete_kwargs(kwargs: &mut Vec<(String, Literal)>) {
    let given = |kwargs: &[(String, Literal)], key: &str| {
        kwargs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.truthy())
    };
    match given(kwargs, "relative_step") {
        None => kwargs.push(("relative_step".into(), Literal::Bool(true))),
        Some(false) if given(kwargs, "warmup_init") == Some(true) => {
            tracing::info!("set relative_step to True because warmup_init is True");
            for (key, value) in kwargs.iter_mut() {
                if key == "relative_step" {
                    *value = Literal::Bool(true);
                }
            }
        }
        Some(_) => {}
    }
}

/// Adafactor's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Added to squared gradients.
    pub eps1: f64,
    /// Floor of the parameter scale.
    pub eps2: f64,
    /// RMS limit of an update.
    pub clip_threshold: f64,
    /// Exponent of the second-moment decay `1 - t^decay_rate`.
    pub decay_rate: f64,
    /// First-moment decay (`None`: no first moment).
    pub beta1: Option<f64>,
    /// Weight decay (times the learning rate).
    pub weight_decay: f64,
    /// Scale the learning rate by the parameter's RMS.
    pub scale_parameter: bool,
    /// The optimizer sets its own learning rate from the step.
    pub relative_step: bool,
    /// With `relative_step`: warm the learning rate up linearly.
    pub warmup_init: bool,
}

impl Config {
    /// Reads the arguments (after [`complete_kwargs`]).
    pub(super) fn from_kwargs(read: &Kwargs) -> Result<Self> {
        let eps = match read.get("eps") {
            None => (1e-30, 1e-3),
            Some(value) => {
                let pair: Option<Vec<f64>> = (value.as_sequence())
                    .and_then(|items| items.iter().map(Literal::as_f64).collect());
                match pair.as_deref() {
                    Some(&[a, b]) => (a, b),
                    _ => return Err(read.bad("eps", value, "two numbers, such as (1e-30, 1e-3)")),
                }
            }
        };
        let relative_step = read.flag("relative_step", true)?;
        let warmup_init = read.flag("warmup_init", false)?;
        if warmup_init && !relative_step {
            return Err(Error::Usage(
                "--optimizer_args warmup_init=True needs relative_step=True".into(),
            ));
        }
        Ok(Self {
            eps1: eps.0,
            eps2: eps.1,
            clip_threshold: read.number("clip_threshold", 1.0)?,
            decay_rate: read.number("decay_rate", -0.8)?,
            beta1: read.optional_number("beta1")?,
            weight_decay: read.number("weight_decay", 0.0)?,
            scale_parameter: read.flag("scale_parameter", true)?,
            relative_step,
            warmup_init,
        })
    }

    /// Bytes of state for a tensor of `len` values (upper bound: unfactored).
    pub fn state_bytes(&self, len: usize) -> u64 {
        let first = if self.beta1.is_some() { 4 * len } else { 0 };
        (first + 4 * len) as u64
    }

    /// The step size before the parameter scale: the scheduled `lr`, or the relative step.
    fn step_size(&self, step: usize, lr: f64) -> f64 {
        if self.relative_step {
            let min_step = if self.warmup_init {
                1e-6 * step as f64
            } else {
                1e-2
            };
            min_step.min(1.0 / (step as f64).sqrt())
        } else {
            lr
        }
    }
}

/// Adafactor's state of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// `[outer, rows, columns]` for a factored tensor (last two dimensions), `None` for a vector.
    factors: Option<[usize; 3]>,
    /// `exp_avg` (with `beta1`).
    exp_avg: Option<Vec<f32>>,
    /// `exp_avg_sq_row` and `exp_avg_sq_col` (factored), or `exp_avg_sq`.
    second: Vec<Vec<f32>>,
    /// The parameter's RMS at the last step (for the learning rate it applied).
    rms: f32,
}

/// Mean square root of the values, `norm(x) / sqrt(n)`.
fn rms(values: &[f32]) -> f32 {
    let sum: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    (sum.sqrt() as f32) / (values.len() as f64).sqrt() as f32
}

impl State {
    /// Zero state for a tensor of shape `dims`.
    pub fn new(config: &Config, dims: &[usize]) -> Self {
        let len: usize = dims.iter().product();
        let factors = (dims.len() >= 2).then(|| {
            let (rows, cols) = (dims[dims.len() - 2], dims[dims.len() - 1]);
            [len / (rows * cols).max(1), rows, cols]
        });
        let second = match factors {
            Some([outer, rows, cols]) => vec![vec![0.0; outer * rows], vec![0.0; outer * cols]],
            None => vec![vec![0.0; len]],
        };
        Self {
            factors,
            exp_avg: config.beta1.map(|_| vec![0.0; len]),
            second,
            rms: 0.0,
        }
    }

    /// The learning rate applied at `step` (`_get_lr`), from the parameter RMS of that step.
    fn lr(&self, config: &Config, step: usize, lr: f64) -> f64 {
        let scale = if config.scale_parameter {
            config.eps2.max(f64::from(self.rms))
        } else {
            1.0
        };
        scale * config.step_size(step, lr)
    }

    /// The learning rate of the last step where Adafactor chooses it (`relative_step`).
    pub fn last_lr(&self, config: &Config, step: usize) -> Option<f64> {
        (config.relative_step && step > 0).then(|| self.lr(config, step, 0.0))
    }

    /// One update of `param` with `grad` at 1-based `step` and scheduled learning rate `lr`.
    pub fn update(
        &mut self,
        config: &Config,
        param: &mut [f32],
        grad: &[f32],
        step: usize,
        lr: f64,
    ) {
        self.rms = rms(param);
        let lr = self.lr(config, step, lr) as f32;
        let beta2t = 1.0 - (step as f64).powf(config.decay_rate);
        let (keep, add) = (beta2t as f32, (1.0 - beta2t) as f32);
        let eps1 = config.eps1 as f32;
        let squared: Vec<f32> = grad.iter().map(|&g| g * g + eps1).collect();
        let mut update: Vec<f32> = match self.factors {
            Some([outer, rows, cols]) => {
                let (row, col) = self.second.split_at_mut(1);
                let (row, col) = (&mut row[0], &mut col[0]);
                for o in 0..outer {
                    let block = &squared[o * rows * cols..(o + 1) * rows * cols];
                    for r in 0..rows {
                        let mean = block[r * cols..(r + 1) * cols]
                            .iter()
                            .map(|&v| f64::from(v))
                            .sum::<f64>()
                            / cols as f64;
                        let slot = &mut row[o * rows + r];
                        *slot = *slot * keep + add * mean as f32;
                    }
                    for c in 0..cols {
                        let mean = (0..rows)
                            .map(|r| f64::from(block[r * cols + c]))
                            .sum::<f64>()
                            / rows as f64;
                        let slot = &mut col[o * cols + c];
                        *slot = *slot * keep + add * mean as f32;
                    }
                }
                let mut update = vec![0f32; grad.len()];
                for o in 0..outer {
                    let row = &row[o * rows..(o + 1) * rows];
                    let row_mean =
                        (row.iter().map(|&v| f64::from(v)).sum::<f64>() / rows as f64) as f32;
                    for r in 0..rows {
                        let r_factor = 1.0 / (row[r] / row_mean).sqrt();
                        for c in 0..cols {
                            let c_factor = 1.0 / col[o * cols + c].sqrt();
                            let i = (o * rows + r) * cols + c;
                            update[i] = r_factor * c_factor * grad[i];
                        }
                    }
                }
                update
            }
            None => {
                let sq = &mut self.second[0];
                for (slot, &s) in sq.iter_mut().zip(&squared) {
                    *slot = *slot * keep + add * s;
                }
                sq.iter()
                    .zip(grad)
                    .map(|(&v, &g)| 1.0 / v.sqrt() * g)
                    .collect()
            }
        };
        let clip = (rms(&update) / config.clip_threshold as f32).max(1.0);
        for u in update.iter_mut() {
            *u = *u / clip * lr;
        }
        if let (Some(exp_avg), Some(beta1)) = (&mut self.exp_avg, config.beta1) {
            let (keep, add) = (beta1 as f32, (1.0 - beta1) as f32);
            for (m, u) in exp_avg.iter_mut().zip(update.iter_mut()) {
                *m = *m * keep + add * *u;
                *u = *m;
            }
        }
        let decay = (-config.weight_decay * f64::from(lr)) as f32;
        for (p, u) in param.iter_mut().zip(&update) {
            if config.weight_decay != 0.0 {
                *p += *p * decay;
            }
            *p -= u;
        }
    }

    /// The state under transformers' names with the tensor's index (`exp_avg_sq_row.3`, ...).
    pub fn tensors(&self, index: usize) -> candle_core::Result<Vec<(String, Tensor)>> {
        let names: &[&str] = if self.factors.is_some() {
            &["exp_avg_sq_row", "exp_avg_sq_col"]
        } else {
            &["exp_avg_sq"]
        };
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for (name, values) in names.iter().zip(&self.second) {
            out.push((
                format!("{name}.{index}"),
                Tensor::from_slice(values, values.len(), &Device::Cpu)?,
            ));
        }
        if let Some(exp_avg) = &self.exp_avg {
            out.push((
                format!("exp_avg.{index}"),
                Tensor::from_slice(exp_avg, exp_avg.len(), &Device::Cpu)?,
            ));
        }
        out.push((
            format!("RMS.{index}"),
            Tensor::from_slice(&[self.rms], 1, &Device::Cpu)?,
        ));
        Ok(out)
    }

    /// Restores the state written by [`State::tensors`].
    pub fn restore(
        &mut self,
        index: usize,
        saved: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        let read = |name: &str, len: usize| -> std::result::Result<Vec<f32>, String> {
            let key = format!("{name}.{index}");
            let tensor = saved
                .get(&key)
                .ok_or_else(|| format!("{key} is missing (different optimizer?)"))?;
            let values = tensor
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| format!("{key}: {e}"))?;
            if values.len() != len {
                return Err(format!(
                    "{key} has {} values, this run keeps {len}",
                    values.len()
                ));
            }
            Ok(values)
        };
        let names: &[&str] = if self.factors.is_some() {
            &["exp_avg_sq_row", "exp_avg_sq_col"]
        } else {
            &["exp_avg_sq"]
        };
        for (name, values) in names.iter().zip(self.second.iter_mut()) {
            *values = read(name, values.len())?;
        }
        if let Some(exp_avg) = &mut self.exp_avg {
            *exp_avg = read("exp_avg", exp_avg.len())?;
        }
        self.rms = read("RMS", 1)?[0];
        Ok(())
    }
}
