//! Learning-rate schedulers (`--lr_scheduler`, docs/kohya-compat.md#learning-rate-schedulers): the
//! multiplier of each parameter group's learning rate after `s` optimizer steps, as sd-scripts
//! builds them from transformers and diffusers; and torch's own classes by
//! `--lr_scheduler_type` ([`torch`]).

pub mod torch;

use std::f64::consts::PI;

use crate::{Error, Result};
use torch::TorchScheduler;

/// A parameter group's learning rate at one step: `scale` × the group's initial rate +
/// `offset` (torch's `eta_min` and `OneCycleLR` give rates that are not multiples of it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupRate {
    pub scale: f64,
    pub offset: f64,
}

impl GroupRate {
    /// The rate of a group that starts at `initial`.
    pub fn of(&self, initial: f64) -> f64 {
        self.scale * initial + self.offset
    }

    /// This rate multiplied by `factor`.
    fn times(self, factor: f64) -> Self {
        Self {
            scale: self.scale * factor,
            offset: self.offset * factor,
        }
    }
}

/// Everything a schedule depends on besides its name.
#[derive(Debug, Clone, Default)]
pub struct ScheduleParams {
    /// Optimizer steps of the run `T`.
    pub total: usize,
    /// Warmup steps `W` (already resolved, see [`resolve_steps`]).
    pub warmup: usize,
    /// Decay steps `D` of `warmup_stable_decay`.
    pub decay: usize,
    /// Base learning rate (`lr_init` of the polynomial schedule).
    pub base_lr: f64,
    /// `--lr_scheduler_num_cycles`.
    pub cycles: f64,
    /// `--lr_scheduler_power`.
    pub power: f64,
    /// `--lr_scheduler_timescale` of `inverse_sqrt` (default `W`, or 10000 without warmup).
    pub timescale: Option<usize>,
    /// `--lr_scheduler_min_lr_ratio` of `cosine_with_min_lr` and `warmup_stable_decay`.
    pub min_lr_ratio: Option<f64>,
    /// `--lr_scheduler_args key=value`: `step_rules` of `piecewise_constant`.
    pub scheduler_args: Vec<String>,
}

/// The shape of a schedule after warmup.
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
    InverseSqrt { timescale: f64 },
    CosineWithMinLr { min_ratio: f64 },
    WarmupStableDecay { min_ratio: f64 },
    PiecewiseConstant { rules: Vec<(usize, f64)>, last: f64 },
}

/// A learning-rate scheduler.
#[derive(Debug, Clone)]
pub struct LrScheduler(Rule);

#[derive(Debug, Clone)]
enum Rule {
    /// `--lr_scheduler NAME`: a multiplier of every group's rate.
    Named {
        shape: Shape,
        params: ScheduleParams,
    },
    /// `--lr_scheduler_type Class`, with its rates for each step of the run worked out once.
    Torch {
        scheduler: TorchScheduler,
        rates: Vec<GroupRate>,
    },
}

/// Scheduler names accepted by `--lr_scheduler`.
const NAMES: &str = "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant";

impl LrScheduler {
    /// Builds the scheduler `name` (sd-scripts' names).
    pub fn new(name: &str, params: ScheduleParams) -> Result<Self> {
        let min_ratio = params.min_lr_ratio;
        let shape = match name {
            "constant" => Shape::Constant,
            "constant_with_warmup" => Shape::ConstantWithWarmup,
            "linear" => Shape::Linear,
            "cosine" => Shape::Cosine,
            "cosine_with_restarts" => Shape::CosineWithRestarts,
            "polynomial" => Shape::Polynomial,
            "inverse_sqrt" => Shape::InverseSqrt {
                timescale: params.timescale.unwrap_or(if params.warmup > 0 {
                    params.warmup
                } else {
                    10_000
                }) as f64,
            },
            "cosine_with_min_lr" => Shape::CosineWithMinLr {
                min_ratio: min_ratio.ok_or_else(|| {
                    Error::Usage(
                        "--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio"
                            .into(),
                    )
                })?,
            },
            "warmup_stable_decay" => Shape::WarmupStableDecay {
                min_ratio: min_ratio.unwrap_or(0.0),
            },
            "piecewise_constant" => {
                let (rules, last) = step_rules(&params.scheduler_args)?;
                Shape::PiecewiseConstant { rules, last }
            }
            other => {
                return Err(Error::Usage(format!(
                    "--lr_scheduler {other} is not supported; use {NAMES}"
                )))
            }
        };
        let without_warmup = matches!(shape, Shape::Constant | Shape::PiecewiseConstant { .. });
        if without_warmup && params.warmup > 0 {
            let instead = if name == "constant" {
                "; use constant_with_warmup"
            } else {
                ""
            };
            return Err(Error::Usage(format!(
                "--lr_scheduler {name} does not take --lr_warmup_steps{instead}"
            )));
        }
        if !matches!(shape, Shape::PiecewiseConstant { .. }) && !params.scheduler_args.is_empty() {
            return Err(Error::Usage(format!(
                "--lr_scheduler_args: only piecewise_constant takes arguments (step_rules), not {name}"
            )));
        }
        if matches!(shape, Shape::WarmupStableDecay { .. })
            && params.warmup + params.decay > params.total
        {
            return Err(Error::Usage(format!(
                "--lr_warmup_steps {} plus --lr_decay_steps {} exceed the {} training steps",
                params.warmup, params.decay, params.total
            )));
        }
        Ok(Self(Rule::Named { shape, params }))
    }

    /// Builds `--lr_scheduler_type class` with `--lr_scheduler_args` for a run of `total`
    /// optimizer steps (see [`TorchScheduler::parse`]).
    pub fn torch(class: &str, args: &[String], total: usize) -> Result<Self> {
        let scheduler = TorchScheduler::parse(class, args)?;
        let rates = scheduler.trajectory(total + 1);
        Ok(Self(Rule::Torch { scheduler, rates }))
    }

    /// Each group's rate at scheduler step `s` (0-based count of completed optimizer steps).
    pub fn rate(&self, s: usize) -> GroupRate {
        match &self.0 {
            Rule::Named { shape, params } => GroupRate {
                scale: multiplier(shape, params, s),
                offset: 0.0,
            },
            Rule::Torch { scheduler, rates } => match rates.get(s) {
                Some(rate) => *rate,
                None => scheduler.trajectory(s + 1)[s],
            },
        }
    }
}

/// The multiplier of a named schedule at scheduler step `s`.
fn multiplier(shape: &Shape, p: &ScheduleParams, s: usize) -> f64 {
    let (s_f, w, t) = (s as f64, p.warmup as f64, p.total as f64);
    let warming = s < p.warmup;
    let ramp = s_f / w.max(1.0);
    let progress = (s_f - w) / (t - w).max(1.0);
    let half_cosine = |x: f64| 0.5 * (1.0 + (PI * x).cos());
    match shape {
        Shape::Constant => 1.0,
        Shape::PiecewiseConstant { rules, last } => rules
            .iter()
            .find(|(until, _)| s < *until)
            .map_or(*last, |(_, value)| *value),
        _ if warming => match *shape {
            Shape::WarmupStableDecay { min_ratio } => min_ratio + (1.0 - min_ratio) * ramp,
            _ => ramp,
        },
        Shape::ConstantWithWarmup => 1.0,
        Shape::Linear => ((t - s_f) / (t - w).max(1.0)).max(0.0),
        Shape::Cosine => half_cosine(progress).max(0.0),
        Shape::CosineWithRestarts => {
            if progress >= 1.0 {
                0.0
            } else {
                half_cosine((p.cycles * progress) % 1.0).max(0.0)
            }
        }
        Shape::Polynomial => {
            let end = 1e-7;
            if s > p.total {
                end / p.base_lr
            } else {
                ((p.base_lr - end) * (1.0 - progress).powf(p.power) + end) / p.base_lr
            }
        }
        Shape::InverseSqrt { timescale } => 1.0 / ((s_f + timescale - w) / timescale).sqrt(),
        Shape::CosineWithMinLr { min_ratio } => {
            (half_cosine(p.cycles * progress) * (1.0 - min_ratio) + min_ratio).max(0.0)
        }
        Shape::WarmupStableDecay { min_ratio } => {
            let stable = p.total - p.warmup - p.decay;
            if s < p.warmup + stable {
                1.0
            } else if s < p.total {
                let into_decay = (s - p.warmup - stable) as f64 / (p.decay as f64).max(1.0);
                (half_cosine(p.cycles * into_decay) * (1.0 - min_ratio) + min_ratio).max(0.0)
            } else {
                *min_ratio
            }
        }
    }
}

/// `step_rules="v1:n1,v2:n2,...,last"` of `piecewise_constant`: multiplier `v1` before step
/// `n1`, `v2` before `n2`, ..., `last` after.
fn step_rules(args: &[String]) -> Result<(Vec<(usize, f64)>, f64)> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules=\"1:100,0.1:200,0.01\" ({why})"
        ))
    };
    let mut rules_text = None;
    for arg in args {
        match arg.split_once('=') {
            Some(("step_rules", value)) => rules_text = Some(value.trim_matches(['"', '\''])),
            _ => return Err(bad(&format!("unknown argument {arg}"))),
        }
    }
    let text = rules_text.ok_or_else(|| bad("step_rules is missing"))?;
    let mut parts: Vec<&str> = text.split(',').collect();
    let last = parts
        .pop()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| bad("the last item must be a number"))?;
    let rules = parts
        .iter()
        .map(|rule| {
            let (value, until) = rule.split_once(':').ok_or_else(|| bad(rule))?;
            Ok((
                until.trim().parse::<usize>().map_err(|_| bad(rule))?,
                value.trim().parse::<f64>().map_err(|_| bad(rule))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((rules, last))
}

/// Resolves a step count given as `flag`: an integer, a fraction `< 1` of `total`, or `"N%"`.
pub fn resolve_steps(flag: &str, value: &str, total: usize) -> Result<usize> {
    let bad = || {
        Error::Usage(format!(
            "{flag} {value:?}: expected an integer, a fraction below 1 or a percentage like 5%"
        ))
    };
    if let Some(percent) = value.strip_suffix('%') {
        let p: f64 = percent.trim().parse().map_err(|_| bad())?;
        return Ok((p / 100.0 * total as f64) as usize);
    }
    if let Ok(count) = value.parse::<usize>() {
        return Ok(count);
    }
    let fraction: f64 = value.parse().map_err(|_| bad())?;
    if !(0.0..1.0).contains(&fraction) {
        return Err(bad());
    }
    Ok((fraction * total as f64) as usize)
}
