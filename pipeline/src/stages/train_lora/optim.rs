//! Optimizers over the LoRA variables (docs/kohya-compat.md#optimizers): AdamW (torch defaults,
//! weight decay 0.01) and Lion, with per-variable state that can be saved and restored, plus
//! global-norm clipping.

use candle_core::{backprop::GradStore, Tensor, Var};

use crate::{Error, Result};

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// `torch.optim.AdamW`.
    AdamW {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// lion-pytorch `Lion`.
    Lion {
        /// Interpolation factor for the update sign.
        beta1: f64,
        /// Momentum decay.
        beta2: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

impl OptimizerKind {
    /// Parses `--optimizer_type` and `--optimizer_args k=v` (betas=0.9,0.99 / weight_decay / eps).
    pub fn parse(name: &str, args: &[String]) -> Result<Self> {
        let mut kind = match name.to_ascii_lowercase().as_str() {
            "" | "adamw" => OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
            "lion" => OptimizerKind::Lion {
                beta1: 0.9,
                beta2: 0.99,
                weight_decay: 0.0,
            },
            other => {
                return Err(Error::Usage(format!(
                    "--optimizer_type {other} is not supported; use AdamW or Lion"
                )))
            }
        };
        for arg in args {
            let (key, value) = arg.split_once('=').ok_or_else(|| {
                Error::Usage(format!("--optimizer_args {arg:?}: expected key=value"))
            })?;
            let numbers: Vec<f64> = value
                .trim_matches(|c| c == '(' || c == ')' || c == '[' || c == ']')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::Usage(format!("--optimizer_args {arg:?}: expected numbers")))?;
            let one = || {
                numbers
                    .first()
                    .copied()
                    .ok_or_else(|| Error::Usage(format!("--optimizer_args {arg:?}: missing value")))
            };
            match (&mut kind, key.trim()) {
                (
                    OptimizerKind::AdamW { weight_decay, .. }
                    | OptimizerKind::Lion { weight_decay, .. },
                    "weight_decay",
                ) => *weight_decay = one()?,
                (OptimizerKind::AdamW { eps, .. }, "eps") => *eps = one()?,
                (
                    OptimizerKind::AdamW { beta1, beta2, .. }
                    | OptimizerKind::Lion { beta1, beta2, .. },
                    "betas",
                ) if numbers.len() == 2 => {
                    *beta1 = numbers[0];
                    *beta2 = numbers[1];
                }
                _ => {
                    return Err(Error::Usage(format!(
                        "--optimizer_args {arg:?} is not supported by {name}"
                    )))
                }
            }
        }
        Ok(kind)
    }

    /// How many f32 values of state the optimizer keeps per trained parameter.
    pub fn state_slots(&self) -> usize {
        match self {
            OptimizerKind::AdamW { .. } => 2,
            OptimizerKind::Lion { .. } => 1,
        }
    }

    /// The `ss_optimizer` string (torch class path plus given arguments).
    pub fn description(&self, args: &[String]) -> String {
        let class = match self {
            OptimizerKind::AdamW { .. } => "torch.optim.adamw.AdamW",
            OptimizerKind::Lion { .. } => "lion_pytorch.lion_pytorch.Lion",
        };
        if args.is_empty() {
            class.to_string()
        } else {
            format!("{class}({})", args.join(","))
        }
    }
}

/// Optimizer state for a list of variables, each with its own learning-rate factor (the
/// parameter group it belongs to: block LR weights, LoRA+).
pub struct Optimizer {
    kind: OptimizerKind,
    vars: Vec<Var>,
    lr_factors: Vec<f64>,
    /// First moments (AdamW, Lion).
    pub exp_avg: Vec<Tensor>,
    /// Second moments (AdamW only; empty for Lion).
    pub exp_avg_sq: Vec<Tensor>,
    /// Updates applied to each variable (a variable without a gradient is not updated, as in
    /// torch, so counts can differ under module dropout).
    pub steps: Vec<usize>,
}

impl Optimizer {
    /// Fresh state (zero moments) for `vars` with learning-rate factors `lr_factors`.
    pub fn new(kind: OptimizerKind, vars: Vec<Var>, lr_factors: Vec<f64>) -> Result<Self> {
        if vars.len() != lr_factors.len() {
            return Err(Error::Model(format!(
                "{} variables but {} learning-rate factors",
                vars.len(),
                lr_factors.len()
            )));
        }
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let exp_avg = vars
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let exp_avg_sq = match kind {
            OptimizerKind::AdamW { .. } => vars
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<Vec<_>>>()?,
            OptimizerKind::Lion { .. } => Vec::new(),
        };
        Ok(Self {
            kind,
            steps: vec![0; vars.len()],
            vars,
            lr_factors,
            exp_avg,
            exp_avg_sq,
        })
    }

    /// The variables, in the order of [`Optimizer::step`]'s gradients.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Applies one update with base learning rate `lr` (times each variable's factor) and the
    /// (already clipped) gradients; a variable without a gradient is left as it is.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        for (i, (var, grad)) in self.vars.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            self.steps[i] += 1;
            let step = self.steps[i] as i32;
            let lr = lr * self.lr_factors[i];
            let param = var.as_tensor();
            match self.kind {
                OptimizerKind::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let m = ((&self.exp_avg[i] * beta1)? + (grad * (1.0 - beta1))?)?;
                    let v = ((&self.exp_avg_sq[i] * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                    let bias1 = 1.0 - beta1.powi(step);
                    let bias2 = 1.0 - beta2.powi(step);
                    let denom = ((v.sqrt()? / bias2.sqrt())? + eps)?;
                    let decayed = (param * (1.0 - lr * weight_decay))?;
                    var.set(&(decayed - (m.div(&denom)? * (lr / bias1))?)?)?;
                    self.exp_avg[i] = m;
                    self.exp_avg_sq[i] = v;
                }
                OptimizerKind::Lion {
                    beta1,
                    beta2,
                    weight_decay,
                } => {
                    let update = ((&self.exp_avg[i] * beta1)? + (grad * (1.0 - beta1))?)?.sign()?;
                    let decayed = (param * (1.0 - lr * weight_decay))?;
                    var.set(&(decayed - (update * lr)?)?)?;
                    self.exp_avg[i] = ((&self.exp_avg[i] * beta2)? + (grad * (1.0 - beta2))?)?;
                }
            }
        }
        Ok(())
    }
}

/// Gradients of `vars` from `store` (`None` for a variable the loss did not reach, e.g. a
/// module skipped by module dropout).
pub fn collect_grads(store: &GradStore, vars: &[Var]) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|v| store.get(v.as_tensor()).cloned())
        .collect()
}

/// Adds the gradients of another micro-batch into `sum` (gradient accumulation).
pub fn accumulate(sum: &mut [Option<Tensor>], grads: Vec<Option<Tensor>>) -> Result<()> {
    for (total, grad) in sum.iter_mut().zip(grads) {
        *total = match (total.take(), grad) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
    }
    Ok(())
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (torch
/// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}
