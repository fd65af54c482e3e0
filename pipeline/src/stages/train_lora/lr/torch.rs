//! `--lr_scheduler_type` / `--lr_scheduler_args`: the classes of `torch.optim.lr_scheduler` that
//! sd-scripts' `get_scheduler_fix` builds by name over the optimizer, stepped once per optimizer
//! step under accelerate. Each follows torch 2.6's chainable `get_lr` (what `step()` runs),
//! carried as `lr = scale × initial_lr + offset` so that every parameter group (UNet, text
//! encoder, block and LoRA+ rates) gets its own rate as torch gives it.

use std::f64::consts::PI;

use super::GroupRate;
use crate::stages::train_lora::optim::literal::Literal;
use crate::stages::train_lora::optim::{parse_kwargs, Kwargs};
use crate::{Error, Result};

/// The classes `--lr_scheduler_type` takes.
pub const CLASSES: &str = "CosineAnnealingLR, CosineAnnealingWarmRestarts, LinearLR, StepLR, \
    MultiStepLR, ExponentialLR, ConstantLR, PolynomialLR, OneCycleLR";

/// The module sd-scripts imports a bare class name from.
const MODULE: &str = "torch.optim.lr_scheduler";

/// Keyword arguments every class takes besides its own.
const COMMON_KEYS: &[&str] = &["last_epoch", "verbose"];

/// One torch scheduler with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum TorchScheduler {
    /// `StepLR(step_size, gamma=0.1)`.
    Step { step_size: usize, gamma: f64 },
    /// `MultiStepLR(milestones, gamma=0.1)`: a milestone given `k` times multiplies by `gamma^k`.
    MultiStep { milestones: Vec<usize>, gamma: f64 },
    /// `ConstantLR(factor=1/3, total_iters=5)`.
    Constant { factor: f64, total_iters: usize },
    /// `LinearLR(start_factor=1/3, end_factor=1.0, total_iters=5)`.
    Linear {
        start: f64,
        end: f64,
        total_iters: usize,
    },
    /// `ExponentialLR(gamma)`.
    Exponential { gamma: f64 },
    /// `PolynomialLR(total_iters=5, power=1.0)`.
    Polynomial { total_iters: usize, power: f64 },
    /// `CosineAnnealingLR(T_max, eta_min=0.0)`.
    CosineAnnealing { t_max: f64, eta_min: f64 },
    /// `CosineAnnealingWarmRestarts(T_0, T_mult=1, eta_min=0.0)`.
    WarmRestarts {
        t_0: usize,
        t_mult: usize,
        eta_min: f64,
    },
    /// `OneCycleLR(max_lr, total_steps, ..., cycle_momentum=False)`: the same absolute rate for
    /// every group, whatever its own.
    OneCycle(OneCycle),
}

/// `OneCycleLR`'s phases: each `(last step, start rate, end rate)`.
#[derive(Debug, Clone, PartialEq)]
pub struct OneCycle {
    phases: Vec<(f64, f64, f64)>,
    cosine: bool,
    /// The last step torch computes a rate for: accelerate stops stepping a scheduler with
    /// `total_steps` once it has stepped that often (optimizer steps, whatever the
    /// gradient accumulation), and the rate stays there.
    last_step: usize,
}

/// The keys each class takes (besides [`COMMON_KEYS`]).
fn class_keys(class: &str) -> Option<&'static [&'static str]> {
    Some(match class {
        "StepLR" => &["step_size", "gamma"],
        "MultiStepLR" => &["milestones", "gamma"],
        "ConstantLR" => &["factor", "total_iters"],
        "LinearLR" => &["start_factor", "end_factor", "total_iters"],
        "ExponentialLR" => &["gamma"],
        "PolynomialLR" => &["total_iters", "power"],
        "CosineAnnealingLR" => &["T_max", "eta_min"],
        "CosineAnnealingWarmRestarts" => &["T_0", "T_mult", "eta_min"],
        "OneCycleLR" => &[
            "max_lr",
            "total_steps",
            "epochs",
            "steps_per_epoch",
            "pct_start",
            "anneal_strategy",
            "cycle_momentum",
            "base_momentum",
            "max_momentum",
            "div_factor",
            "final_div_factor",
            "three_phase",
        ],
        _ => return None,
    })
}

/// Why a class of `torch.optim.lr_scheduler` that is not among [`CLASSES`] cannot run here.
fn unsupported_reason(class: &str) -> Option<&'static str> {
    Some(match class {
        "LambdaLR" | "MultiplicativeLR" => {
            "it takes a Python function, which --lr_scheduler_args cannot give"
        }
        "SequentialLR" | "ChainedScheduler" => {
            "it takes scheduler objects, which --lr_scheduler_args cannot give"
        }
        "ReduceLROnPlateau" => {
            "it needs a metric at each step, which sd-scripts does not pass (it fails there)"
        }
        "CyclicLR" => "it is not implemented here",
        _ => return None,
    })
}

impl TorchScheduler {
    /// Builds `--lr_scheduler_type class` (bare or as `torch.optim.lr_scheduler.Class`, as
    /// sd-scripts imports it) with `--lr_scheduler_args`.
    pub fn parse(class_type: &str, args: &[String]) -> Result<Self> {
        let class = match class_type.rsplit_once('.') {
            None => class_type,
            Some((MODULE, class)) => class,
            Some((module, _)) => {
                return Err(Error::Usage(format!(
                    "--lr_scheduler_type {class_type}: only {MODULE}'s classes run here, not \
                     {module}'s; use one of {CLASSES}, or --lr_scheduler NAME"
                )))
            }
        };
        let Some(own_keys) = class_keys(class) else {
            let why = unsupported_reason(class).map_or(String::new(), |why| format!(" ({why})"));
            return Err(Error::Usage(format!(
                "--lr_scheduler_type {class_type} is not supported{why}; use one of {CLASSES} \
                 (bare or as {MODULE}.Name), or --lr_scheduler NAME"
            )));
        };
        let kwargs = parse_kwargs("--lr_scheduler_args", args)?;
        let takes = || {
            format!(
                "{class} takes {}",
                [own_keys, COMMON_KEYS].concat().join(", ")
            )
        };
        if let Some((key, _)) = kwargs
            .iter()
            .find(|(k, _)| !own_keys.contains(&k.as_str()) && !COMMON_KEYS.contains(&k.as_str()))
        {
            return Err(Error::Usage(format!(
                "--lr_scheduler_args {key}: not an argument of {class}; {}",
                takes()
            )));
        }
        let read = Kwargs {
            flag: "--lr_scheduler_args",
            owner: class,
            given: &kwargs,
        };
        let required = |key: &str| -> Result<&Literal> {
            read.get(key).ok_or_else(|| {
                Error::Usage(format!(
                    "--lr_scheduler_args: {class} needs {key}=...; {}",
                    takes()
                ))
            })
        };
        read.only(
            "last_epoch",
            &Literal::Int(-1),
            "a run starts the scheduler afresh (--resume restores its position)",
        )?;
        if let Some(verbose) = read.get("verbose") {
            tracing::info!(
                "--lr_scheduler_args verbose={verbose}: deprecated in torch, where it prints \
                 nothing either"
            );
        }
        let count = |key: &str, default: Option<usize>| -> Result<usize> {
            match (read.get(key), default) {
                (None, Some(default)) => Ok(default),
                _ => {
                    let value = required(key)?;
                    match value {
                        Literal::Int(n) if *n >= 0 => Ok(*n as usize),
                        _ => Err(read.bad(key, value, "a whole number of steps")),
                    }
                }
            }
        };
        let number = |key: &str, default: Option<f64>| -> Result<f64> {
            match (read.get(key), default) {
                (None, Some(default)) => Ok(default),
                _ => {
                    let value = required(key)?;
                    (value.as_f64()).ok_or_else(|| read.bad(key, value, "a number"))
                }
            }
        };
        let factor_in = |key: &str, default: f64, low_open: bool| -> Result<f64> {
            let value = number(key, Some(default))?;
            let inside = if low_open { value > 0.0 } else { value >= 0.0 };
            match inside && value <= 1.0 {
                true => Ok(value),
                false => Err(read.bad(
                    key,
                    &Literal::Float(value),
                    if low_open {
                        "a number above 0 up to 1"
                    } else {
                        "a number from 0 up to 1"
                    },
                )),
            }
        };
        Ok(match class {
            "StepLR" => Self::Step {
                step_size: match count("step_size", None)? {
                    0 => return Err(read.bad("step_size", &Literal::Int(0), "a positive count")),
                    n => n,
                },
                gamma: number("gamma", Some(0.1))?,
            },
            "MultiStepLR" => {
                let value = required("milestones")?;
                let milestones: Option<Vec<usize>> = value.as_sequence().and_then(|items| {
                    (items.iter())
                        .map(|item| match item {
                            Literal::Int(n) if *n >= 0 => Some(*n as usize),
                            _ => None,
                        })
                        .collect()
                });
                Self::MultiStep {
                    milestones: milestones.ok_or_else(|| {
                        read.bad(
                            "milestones",
                            value,
                            "a list of step numbers, such as [10,20]",
                        )
                    })?,
                    gamma: number("gamma", Some(0.1))?,
                }
            }
            // Torch divides by the factor when the constant part ends.
            "ConstantLR" => Self::Constant {
                factor: factor_in("factor", 1.0 / 3.0, true)?,
                total_iters: count("total_iters", Some(5))?,
            },
            "LinearLR" => Self::Linear {
                start: factor_in("start_factor", 1.0 / 3.0, true)?,
                end: factor_in("end_factor", 1.0, false)?,
                total_iters: count("total_iters", Some(5))?,
            },
            "ExponentialLR" => Self::Exponential {
                gamma: number("gamma", None)?,
            },
            "PolynomialLR" => Self::Polynomial {
                total_iters: count("total_iters", Some(5))?,
                power: match number("power", Some(1.0))? {
                    p if p >= 0.0 => p,
                    p => return Err(read.bad("power", &Literal::Float(p), "a number from 0 up")),
                },
            },
            "CosineAnnealingLR" => Self::CosineAnnealing {
                t_max: match number("T_max", None)? {
                    t if t > 0.0 => t,
                    t => return Err(read.bad("T_max", &Literal::Float(t), "a positive count")),
                },
                eta_min: number("eta_min", Some(0.0))?,
            },
            "CosineAnnealingWarmRestarts" => Self::WarmRestarts {
                t_0: match count("T_0", None)? {
                    0 => return Err(read.bad("T_0", &Literal::Int(0), "a positive integer")),
                    n => n,
                },
                t_mult: match count("T_mult", Some(1))? {
                    0 => return Err(read.bad("T_mult", &Literal::Int(0), "an integer from 1 up")),
                    n => n,
                },
                eta_min: number("eta_min", Some(0.0))?,
            },
            "OneCycleLR" => Self::OneCycle(one_cycle(&read, &number, &count)?),
            _ => unreachable!("class_keys lists the classes"),
        })
    }

    /// The rate after `last_epoch` steps, from the rate `lr` after the step before (the
    /// group's initial rate before the first); `restart` is `CosineAnnealingWarmRestarts`'
    /// `(T_cur, T_i)` there.
    fn next(&self, last_epoch: usize, lr: GroupRate, restart: (usize, usize)) -> GroupRate {
        let t = last_epoch;
        match self {
            Self::Step { step_size, gamma } => match t == 0 || t % step_size != 0 {
                true => lr,
                false => lr.times(*gamma),
            },
            Self::MultiStep { milestones, gamma } => {
                let hits = milestones.iter().filter(|m| **m == t).count();
                match hits {
                    0 => lr,
                    k => lr.times(gamma.powf(k as f64)),
                }
            }
            Self::Constant {
                factor,
                total_iters,
            } => match t {
                0 => lr.times(*factor),
                t if t != *total_iters => lr,
                _ => lr.times(1.0 / factor),
            },
            Self::Linear {
                start,
                end,
                total_iters,
            } => match t {
                0 => lr.times(*start),
                t if t > *total_iters => lr,
                t => lr.times(
                    1.0 + (end - start)
                        / (*total_iters as f64 * start + (t as f64 - 1.0) * (end - start)),
                ),
            },
            Self::Exponential { gamma } => match t {
                0 => lr,
                _ => lr.times(*gamma),
            },
            Self::Polynomial { total_iters, power } => match t {
                0 => lr,
                t if t > *total_iters => lr,
                t => {
                    let n = *total_iters as f64;
                    let t = t as f64;
                    lr.times(((1.0 - t / n) / (1.0 - (t - 1.0) / n)).powf(*power))
                }
            },
            Self::CosineAnnealing { t_max, eta_min } => {
                let tf = t as f64;
                if t == 0 {
                    lr
                } else if (tf - 1.0 - t_max).rem_euclid(2.0 * t_max) == 0.0 {
                    // lr + (initial - eta_min)(1 - cos(π/T)) / 2
                    let c = (1.0 - (PI / t_max).cos()) / 2.0;
                    GroupRate {
                        scale: lr.scale + c,
                        offset: lr.offset - eta_min * c,
                    }
                } else {
                    let r =
                        (1.0 + (PI * tf / t_max).cos()) / (1.0 + (PI * (tf - 1.0) / t_max).cos());
                    GroupRate {
                        scale: lr.scale * r,
                        offset: (lr.offset - eta_min) * r + eta_min,
                    }
                }
            }
            Self::WarmRestarts { eta_min, .. } => {
                let (t_cur, t_i) = restart;
                let c = (1.0 + (PI * t_cur as f64 / t_i as f64).cos()) / 2.0;
                GroupRate {
                    scale: c,
                    offset: eta_min - eta_min * c,
                }
            }
            Self::OneCycle(cycle) => GroupRate {
                scale: 0.0,
                offset: cycle.rate(t.min(cycle.last_step)),
            },
        }
    }

    /// The rates of the first `steps` optimizer steps (`last_epoch` 0, 1, ...).
    pub fn trajectory(&self, steps: usize) -> Vec<GroupRate> {
        let mut rates = Vec::with_capacity(steps);
        let mut lr = GroupRate {
            scale: 1.0,
            offset: 0.0,
        };
        let (mut t_cur, mut t_i) = match self {
            Self::WarmRestarts { t_0, .. } => (0, *t_0),
            _ => (0, 1),
        };
        for t in 0..steps {
            if let (Self::WarmRestarts { t_mult, .. }, true) = (self, t > 0) {
                t_cur += 1;
                if t_cur >= t_i {
                    t_cur -= t_i;
                    t_i *= t_mult;
                }
            }
            lr = self.next(t, lr, (t_cur, t_i));
            rates.push(lr);
        }
        rates
    }
}

/// `OneCycleLR`'s arguments; `cycle_momentum=True` (its default) would also cycle the
/// optimizer's momentum / beta1, which lorakit's optimizers keep fixed, so it is refused.
fn one_cycle(
    read: &Kwargs,
    number: &dyn Fn(&str, Option<f64>) -> Result<f64>,
    count: &dyn Fn(&str, Option<usize>) -> Result<usize>,
) -> Result<OneCycle> {
    if read.flag("cycle_momentum", true)? {
        return Err(Error::Usage(
            "--lr_scheduler_args: OneCycleLR cycles the optimizer's momentum unless \
             cycle_momentum=False, and lorakit's optimizers keep it fixed; add cycle_momentum=False"
                .into(),
        ));
    }
    for key in ["base_momentum", "max_momentum"] {
        if let Some(value) = read.get(key) {
            tracing::info!(
                "--lr_scheduler_args {key}={value}: OneCycleLR uses it only with cycle_momentum=True"
            );
        }
    }
    let max_lr = match read.get("max_lr") {
        Some(value @ (Literal::List(_) | Literal::Tuple(_))) => {
            return Err(read.bad(
                "max_lr",
                value,
                "one number here (a list needs sd-scripts' parameter-group order)",
            ))
        }
        _ => number("max_lr", None)?,
    };
    let total = match read.get("total_steps") {
        Some(_) => count("total_steps", None)?,
        None if read.get("epochs").is_some() && read.get("steps_per_epoch").is_some() => {
            count("epochs", None)? * count("steps_per_epoch", None)?
        }
        None => {
            return Err(Error::Usage(
                "--lr_scheduler_args: OneCycleLR needs total_steps=N (or epochs=E and \
                 steps_per_epoch=S)"
                    .into(),
            ))
        }
    };
    if total == 0 {
        return Err(read.bad("total_steps", &Literal::Int(0), "a positive count"));
    }
    let pct_start = match read.get("pct_start") {
        None => 0.3,
        Some(Literal::Float(p)) if (0.0..=1.0).contains(p) => *p,
        Some(value) => {
            return Err(read.bad(
                "pct_start",
                value,
                "a float from 0 up to 1 (torch refuses an integer)",
            ))
        }
    };
    let cosine = match read.get("anneal_strategy") {
        None => true,
        Some(Literal::Str(s)) if s == "cos" => true,
        Some(Literal::Str(s)) if s == "linear" => false,
        Some(value) => return Err(read.bad("anneal_strategy", value, "'cos' or 'linear'")),
    };
    let div_factor = number("div_factor", Some(25.0))?;
    let final_div_factor = number("final_div_factor", Some(1e4))?;
    let initial = max_lr / div_factor;
    let min_lr = initial / final_div_factor;
    let (total_f, up) = (total as f64, pct_start * total as f64);
    let phases = match read.flag("three_phase", false)? {
        true => vec![
            (up - 1.0, initial, max_lr),
            (2.0 * up - 2.0, max_lr, initial),
            (total_f - 1.0, initial, min_lr),
        ],
        false => vec![(up - 1.0, initial, max_lr), (total_f - 1.0, max_lr, min_lr)],
    };
    // Torch divides by each phase's length when it reaches it.
    let mut start = 0.0;
    for (end, _, _) in &phases {
        if *end == start {
            return Err(Error::Usage(format!(
                "--lr_scheduler_args: OneCycleLR with pct_start={pct_start} and {total} steps \
                 has a phase of no steps, where torch divides by zero; change pct_start"
            )));
        }
        start = *end;
    }
    Ok(OneCycle {
        phases,
        cosine,
        last_step: total,
    })
}

impl OneCycle {
    /// torch's rate at step `step`.
    fn rate(&self, step: usize) -> f64 {
        let step = step as f64;
        let mut start_step = 0.0;
        for (i, (end_step, start, end)) in self.phases.iter().enumerate() {
            if step <= *end_step || i == self.phases.len() - 1 {
                let pct = (step - start_step) / (end_step - start_step);
                return match self.cosine {
                    true => end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0),
                    false => (end - start) * pct + start,
                };
            }
            start_step = *end_step;
        }
        unreachable!("the last phase takes every later step")
    }
}
