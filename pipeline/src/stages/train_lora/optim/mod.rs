//! Optimizers over the LoRA variables (docs/kohya-compat.md#optimizers): sd-scripts'
//! `--optimizer_type` names with their reference implementations' maths (torch AdamW and SGD,
//! lion-pytorch, bitsandbytes' 8-bit and paged optimizers, transformers' Adafactor), per-variable
//! state that can be saved and restored exactly, plus global-norm clipping.

pub mod adafactor;
pub mod bnb;
pub mod dadapt;
pub mod literal;
pub mod quant;
pub mod schedulefree;

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::{Error, Result};
use literal::Literal;

/// The update rule and its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Algorithm {
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
    /// `torch.optim.SGD` with Nesterov momentum (`SGDNesterov`).
    SgdNesterov {
        /// Momentum factor.
        momentum: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// A bitsandbytes optimizer.
    Bnb(bnb::Config),
    /// transformers' `Adafactor`.
    Adafactor(adafactor::Config),
    /// prodigyopt's `Prodigy` or one of dadaptation's optimizers.
    DAdapt(dadapt::Config),
    /// A schedule-free optimizer.
    ScheduleFree(schedulefree::Config),
}

/// The optimizer a command line asks for: its maths, the class sd-scripts would build and the
/// keyword arguments it would pass (for `ss_optimizer`).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerKind {
    /// The update rule.
    pub algorithm: Algorithm,
    /// `module.Class` of the reference implementation.
    pub class: &'static str,
    /// `--optimizer_args` as parsed, plus the ones sd-scripts adds (SGD momentum, Adafactor's
    /// `relative_step`), in sd-scripts' order.
    pub kwargs: Vec<(String, Literal)>,
}

/// `--optimizer_type` names (sd-scripts' spelling; matched case-insensitively).
const NAMES: &str = "AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, \
                     Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, Adafactor, Prodigy, \
                     DAdaptation, DAdaptAdamPreprint, DAdaptAdam, DAdaptAdaGrad, DAdaptAdan, \
                     DAdaptAdanIP, DAdaptLion, DAdaptSGD, AdamWScheduleFree, RAdamScheduleFree, \
                     SGDScheduleFree";

/// Keyword arguments of `torch.optim.AdamW` (sd-scripts passes `lr` itself).
const TORCH_ADAMW_KEYS: &[&str] = &[
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
];
/// Keyword arguments of lion-pytorch's `Lion`.
const LION_KEYS: &[&str] = &[
    "betas",
    "weight_decay",
    "use_triton",
    "decoupled_weight_decay",
];
/// Keyword arguments of `torch.optim.SGD` (sd-scripts passes `nesterov=True` itself).
const TORCH_SGD_KEYS: &[&str] = &[
    "momentum",
    "dampening",
    "weight_decay",
    "maximize",
    "foreach",
    "differentiable",
    "fused",
];
/// Keyword arguments of bitsandbytes' `AdamW8bit`.
const BNB_ADAMW8BIT_KEYS: &[&str] = &[
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "optim_bits",
    "min_8bit_size",
    "is_paged",
];
/// Keyword arguments of bitsandbytes' `PagedAdamW`, `PagedAdamW8bit`, `PagedAdamW32bit`.
const BNB_PAGED_ADAMW_KEYS: &[&str] = &[
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "optim_bits",
    "min_8bit_size",
];
/// Keyword arguments of bitsandbytes' `Lion8bit`.
const BNB_LION8BIT_KEYS: &[&str] = &["betas", "weight_decay", "min_8bit_size", "is_paged"];
/// Keyword arguments of bitsandbytes' `PagedLion8bit`.
const BNB_PAGED_LION_KEYS: &[&str] = &["betas", "weight_decay", "min_8bit_size"];
/// Keyword arguments of bitsandbytes' `SGD8bit` (sd-scripts passes `nesterov=True` itself).
const BNB_SGD_KEYS: &[&str] = &["momentum", "dampening", "weight_decay", "min_8bit_size"];

/// The optimizer sd-scripts' `get_optimizer` picks from `--optimizer_type` and the legacy
/// `--use_8bit_adam` / `--use_lion_optimizer` flags, which exclude each other and the type.
pub fn optimizer_name(optimizer_type: &str, use_8bit_adam: bool, use_lion: bool) -> Result<String> {
    let legacy = match (use_8bit_adam, use_lion) {
        (true, true) => {
            return Err(Error::Usage(
                "--use_8bit_adam and --use_lion_optimizer both given; keep one (or give \
                 --optimizer_type)"
                    .into(),
            ))
        }
        (true, false) => Some(("--use_8bit_adam", "AdamW8bit")),
        (false, true) => Some(("--use_lion_optimizer", "Lion")),
        (false, false) => None,
    };
    match legacy {
        Some((flag, name)) if !optimizer_type.is_empty() => Err(Error::Usage(format!(
            "{flag} means --optimizer_type {name}, but --optimizer_type {optimizer_type} is \
             given too; keep one"
        ))),
        Some((_, name)) => Ok(name.into()),
        None if optimizer_type.is_empty() => Ok("AdamW".into()),
        None => Ok(optimizer_type.into()),
    }
}

/// `--optimizer_args` / `--lr_scheduler_args` (named by `flag`) as sd-scripts reads them:
/// `key=value`, the value a Python literal.
pub fn parse_kwargs(flag: &str, args: &[String]) -> Result<Vec<(String, Literal)>> {
    let mut kwargs: Vec<(String, Literal)> = Vec::new();
    for arg in args {
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("{flag} {arg:?}: expected key=value")))?;
        let value = Literal::parse(value).map_err(|e| {
            Error::Usage(format!(
                "{flag} {arg:?}: the value is not a Python literal ({e})"
            ))
        })?;
        let key = key.trim().to_string();
        match kwargs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => kwargs.push((key, value)),
        }
    }
    Ok(kwargs)
}

/// Reads typed values out of the keyword arguments of one optimizer or scheduler class.
pub(crate) struct Kwargs<'a> {
    /// The option they came from (`--optimizer_args`).
    pub flag: &'a str,
    /// The class that takes them.
    pub owner: &'a str,
    pub given: &'a [(String, Literal)],
}

impl Kwargs<'_> {
    pub fn get(&self, key: &str) -> Option<&Literal> {
        self.given.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn bad(&self, key: &str, value: &Literal, wanted: &str) -> Error {
        Error::Usage(format!(
            "{} {key}={value}: {} takes {wanted} for {key}",
            self.flag, self.owner
        ))
    }

    pub fn number(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, v, "a number")),
        }
    }

    /// A number that must lie in `range`.
    pub fn number_in(&self, key: &str, default: f64, range: std::ops::Range<f64>) -> Result<f64> {
        let value = self.number(key, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(self.bad(
                key,
                &Literal::Float(value),
                &format!("a number from {} up to {}", range.start, range.end),
            ))
        }
    }

    pub fn optional_number(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None | Some(Literal::None) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, v, "a number or None")),
        }
    }

    pub fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v @ (Literal::Bool(_) | Literal::Int(_) | Literal::None)) => Ok(v.truthy()),
            Some(v) => Err(self.bad(key, v, "True or False")),
        }
    }

    /// Three numbers (the Adans' `betas`), each in `[0, 1)`.
    fn beta_triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        let numbers: Option<Vec<f64>> = value
            .as_sequence()
            .and_then(|items| items.iter().map(Literal::as_f64).collect());
        match numbers.as_deref() {
            Some(&[a, b, c]) if [a, b, c].iter().all(|x| (0.0..1.0).contains(x)) => Ok([a, b, c]),
            _ => Err(self.bad(
                key,
                value,
                "three numbers from 0 up to 1, such as (0.98, 0.92, 0.99)",
            )),
        }
    }

    /// Two numbers (`betas`), each in `[0, 1)`.
    fn betas(&self, key: &str, default: (f64, f64)) -> Result<(f64, f64)> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        let pair: Option<Vec<f64>> = value
            .as_sequence()
            .map(|items| {
                items
                    .iter()
                    .map(Literal::as_f64)
                    .collect::<Option<Vec<_>>>()
            })
            .unwrap_or_default();
        match pair.as_deref() {
            Some(&[a, b]) if (0.0..1.0).contains(&a) && (0.0..1.0).contains(&b) => Ok((a, b)),
            _ => Err(self.bad(
                key,
                value,
                "two numbers from 0 up to 1, such as (0.9, 0.999)",
            )),
        }
    }

    /// A value that only has one setting here (`amsgrad=False`): anything else is refused.
    pub fn only(&self, key: &str, allowed: &Literal, why: &str) -> Result<()> {
        match self.get(key) {
            Some(v)
                if v != allowed && !(v.as_f64().is_some() && v.as_f64() == allowed.as_f64()) =>
            {
                Err(Error::Usage(format!(
                    "{} {key}={v}: {why}; {} here takes only {key}={allowed}",
                    self.flag, self.owner
                )))
            }
            _ => Ok(()),
        }
    }
}

impl OptimizerKind {
    /// Parses `--optimizer_type` (case-insensitive, empty = AdamW) and `--optimizer_args`,
    /// refusing keys the optimizer does not take with the list of those it does.
    pub fn parse(name: &str, args: &[String]) -> Result<Self> {
        let mut kwargs = parse_kwargs("--optimizer_args", args)?;
        let lower = if name.is_empty() {
            "adamw".to_string()
        } else {
            name.to_ascii_lowercase()
        };
        let (class, keys): (&'static str, &[&str]) = match lower.as_str() {
            "adamw" => ("torch.optim.adamw.AdamW", TORCH_ADAMW_KEYS),
            "lion" => ("lion_pytorch.lion_pytorch.Lion", LION_KEYS),
            "sgdnesterov" => ("torch.optim.sgd.SGD", TORCH_SGD_KEYS),
            "adamw8bit" => ("bitsandbytes.optim.adamw.AdamW8bit", BNB_ADAMW8BIT_KEYS),
            "pagedadamw8bit" => (
                "bitsandbytes.optim.adamw.PagedAdamW8bit",
                BNB_PAGED_ADAMW_KEYS,
            ),
            "pagedadamw" => ("bitsandbytes.optim.adamw.PagedAdamW", BNB_PAGED_ADAMW_KEYS),
            "pagedadamw32bit" => (
                "bitsandbytes.optim.adamw.PagedAdamW32bit",
                BNB_PAGED_ADAMW_KEYS,
            ),
            "lion8bit" => ("bitsandbytes.optim.lion.Lion8bit", BNB_LION8BIT_KEYS),
            "pagedlion8bit" => ("bitsandbytes.optim.lion.PagedLion8bit", BNB_PAGED_LION_KEYS),
            "sgdnesterov8bit" => ("bitsandbytes.optim.sgd.SGD8bit", BNB_SGD_KEYS),
            "adafactor" => ("transformers.optimization.Adafactor", adafactor::KEYS),
            "prodigy" => ("prodigyopt.prodigy.Prodigy", dadapt::PRODIGY_KEYS),
            "dadaptadam" => (
                "dadaptation.dadapt_adam.DAdaptAdam",
                dadapt::DADAPT_ADAM_KEYS,
            ),
            "dadaptation" | "dadaptadampreprint" => (
                "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
                dadapt::DADAPT_ADAM_PREPRINT_KEYS,
            ),
            "dadaptadagrad" => (
                "dadaptation.dadapt_adagrad.DAdaptAdaGrad",
                dadapt::DADAPT_ADAGRAD_KEYS,
            ),
            "dadaptsgd" => ("dadaptation.dadapt_sgd.DAdaptSGD", dadapt::DADAPT_SGD_KEYS),
            "dadaptlion" => (
                "dadaptation.dadapt_lion.DAdaptLion",
                dadapt::DADAPT_LION_KEYS,
            ),
            "dadaptadan" => (
                "dadaptation.dadapt_adan.DAdaptAdan",
                dadapt::DADAPT_ADAN_KEYS,
            ),
            "dadaptadanip" => (
                "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP",
                dadapt::DADAPT_ADAN_KEYS,
            ),
            "adamwschedulefree" => (
                "schedulefree.adamw_schedulefree.AdamWScheduleFree",
                schedulefree::ADAMW_KEYS,
            ),
            "radamschedulefree" => (
                "schedulefree.radam_schedulefree.RAdamScheduleFree",
                schedulefree::RADAM_KEYS,
            ),
            "sgdschedulefree" => (
                "schedulefree.sgd_schedulefree.SGDScheduleFree",
                schedulefree::SGD_KEYS,
            ),
            "ademamix8bit" | "pagedademamix8bit" => {
                return Err(Error::Usage(format!(
                    "--optimizer_type {name}: sd-scripts' get_optimizer has no branch for it (it \
                     looks for torch.optim.{name} and stops); use AdamW8bit"
                )))
            }
            _ => {
                return Err(Error::Usage(format!(
                    "--optimizer_type {name} is not supported; use one of {NAMES}"
                )))
            }
        };
        // sd-scripts adds these before building the optimizer (and so into ss_optimizer).
        if matches!(lower.as_str(), "sgdnesterov" | "sgdnesterov8bit")
            && !kwargs.iter().any(|(k, _)| k == "momentum")
        {
            kwargs.push(("momentum".into(), Literal::Float(0.9)));
        }
        if lower == "adafactor" {
            adafactor::complete_kwargs(&mut kwargs);
        }
        if let Some((key, _)) = kwargs.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
            let why = match key.as_str() {
                "lr" => "the learning rate is --learning_rate".to_string(),
                "nesterov" => "sd-scripts passes nesterov=True itself".to_string(),
                _ => format!("{name} takes {}", keys.join(", ")),
            };
            return Err(Error::Usage(format!(
                "--optimizer_args {key}: not an argument here; {why}"
            )));
        }
        let read = Kwargs {
            flag: "--optimizer_args",
            owner: class,
            given: &kwargs,
        };
        let weight_decay = |default| read.number_in("weight_decay", default, 0.0..f64::INFINITY);
        let algorithm = match lower.as_str() {
            "adamw" => {
                read.only(
                    "amsgrad",
                    &Literal::Bool(false),
                    "AMSGrad is not implemented",
                )?;
                read.only(
                    "maximize",
                    &Literal::Bool(false),
                    "training minimises the loss",
                )?;
                let (beta1, beta2) = read.betas("betas", (0.9, 0.999))?;
                Algorithm::AdamW {
                    beta1,
                    beta2,
                    eps: read.number_in("eps", 1e-8, 0.0..f64::INFINITY)?,
                    weight_decay: weight_decay(0.01)?,
                }
            }
            "lion" => {
                read.only(
                    "decoupled_weight_decay",
                    &Literal::Bool(false),
                    "decoupled weight decay is not implemented",
                )?;
                let (beta1, beta2) = read.betas("betas", (0.9, 0.99))?;
                Algorithm::Lion {
                    beta1,
                    beta2,
                    weight_decay: weight_decay(0.0)?,
                }
            }
            "sgdnesterov" => {
                read.only(
                    "dampening",
                    &Literal::Int(0),
                    "Nesterov momentum needs no dampening",
                )?;
                read.only(
                    "maximize",
                    &Literal::Bool(false),
                    "training minimises the loss",
                )?;
                let momentum = read.number("momentum", 0.9)?;
                if momentum <= 0.0 {
                    return Err(Error::Usage(format!(
                        "--optimizer_args momentum={momentum}: Nesterov momentum needs a \
                         momentum above 0"
                    )));
                }
                Algorithm::SgdNesterov {
                    momentum,
                    weight_decay: weight_decay(0.0)?,
                }
            }
            "adafactor" => Algorithm::Adafactor(adafactor::Config::from_kwargs(&read)?),
            "prodigy" => {
                Algorithm::DAdapt(dadapt::Config::from_kwargs(dadapt::Rule::Prodigy, &read)?)
            }
            "dadaptadam" => Algorithm::DAdapt(dadapt::Config::from_kwargs(
                dadapt::Rule::DAdaptAdam,
                &read,
            )?),
            "dadaptation" | "dadaptadampreprint" => Algorithm::DAdapt(dadapt::Config::from_kwargs(
                dadapt::Rule::DAdaptAdamPreprint,
                &read,
            )?),
            "dadaptadagrad" => Algorithm::DAdapt(dadapt::Config::from_kwargs(
                dadapt::Rule::DAdaptAdaGrad,
                &read,
            )?),
            "dadaptsgd" => {
                Algorithm::DAdapt(dadapt::Config::from_kwargs(dadapt::Rule::DAdaptSgd, &read)?)
            }
            "dadaptlion" => Algorithm::DAdapt(dadapt::Config::from_kwargs(
                dadapt::Rule::DAdaptLion,
                &read,
            )?),
            "dadaptadan" => Algorithm::DAdapt(dadapt::Config::from_kwargs(
                dadapt::Rule::DAdaptAdan,
                &read,
            )?),
            "dadaptadanip" => Algorithm::DAdapt(dadapt::Config::from_kwargs(
                dadapt::Rule::DAdaptAdanIp,
                &read,
            )?),
            "adamwschedulefree" => Algorithm::ScheduleFree(schedulefree::Config::from_kwargs(
                schedulefree::Rule::AdamW,
                &read,
            )?),
            "radamschedulefree" => Algorithm::ScheduleFree(schedulefree::Config::from_kwargs(
                schedulefree::Rule::RAdam,
                &read,
            )?),
            "sgdschedulefree" => Algorithm::ScheduleFree(schedulefree::Config::from_kwargs(
                schedulefree::Rule::Sgd,
                &read,
            )?),
            bnb_name => {
                read.only(
                    "amsgrad",
                    &Literal::Bool(false),
                    "bitsandbytes has no AMSGrad",
                )?;
                let (rule, betas) = match bnb_name {
                    "lion8bit" | "pagedlion8bit" => (bnb::Rule::Lion, (0.9, 0.99)),
                    "sgdnesterov8bit" => (bnb::Rule::Momentum, (0.0, 0.0)),
                    _ => (bnb::Rule::Adam, (0.9, 0.999)),
                };
                let (beta1, beta2) = match rule {
                    bnb::Rule::Momentum => {
                        let momentum = read.number("momentum", 0.9)?;
                        if momentum == 0.0 {
                            return Err(Error::Usage(
                                "--optimizer_args momentum=0: bitsandbytes' SGD8bit needs a \
                                 momentum"
                                    .into(),
                            ));
                        }
                        (momentum, read.number("dampening", 0.0)?)
                    }
                    _ => read.betas("betas", betas)?,
                };
                let eight_bit = match bnb_name {
                    "pagedadamw32bit" => false,
                    "pagedadamw" => match read.number("optim_bits", 32.0)? {
                        b if b == 8.0 => true,
                        b if b == 32.0 => false,
                        _ => {
                            return Err(Error::Usage("--optimizer_args optim_bits: 8 or 32".into()))
                        }
                    },
                    _ => {
                        read.only("optim_bits", &Literal::Int(32), "the states are 8-bit")?;
                        true
                    }
                };
                Algorithm::Bnb(bnb::Config {
                    rule,
                    beta1,
                    beta2,
                    eps: read.number_in("eps", 1e-8, 0.0..f64::INFINITY)?,
                    weight_decay: weight_decay(match rule {
                        bnb::Rule::Adam => 0.01,
                        _ => 0.0,
                    })?,
                    eight_bit,
                    min_8bit_size: read.number_in("min_8bit_size", 4096.0, 0.0..f64::INFINITY)?
                        as usize,
                })
            }
        };
        Ok(Self {
            algorithm,
            class,
            kwargs,
        })
    }

    /// Whether the optimizer chooses its learning rate itself (Adafactor with `relative_step`):
    /// `--learning_rate` only names the scheduler then.
    pub fn sets_own_lr(&self) -> bool {
        matches!(&self.algorithm, Algorithm::Adafactor(config) if config.relative_step)
    }

    /// Whether the optimizer replaces the `requested` scheduler (`--lr_scheduler` or
    /// `--lr_scheduler_type`) by a constant rate. Where the optimizer sets its own learning
    /// rate, sd-scripts replaces any scheduler by `adafactor:<lr>` (a constant the optimizer
    /// ignores) and refuses a warmup; `adafactor` with any other optimizer is refused, as there.
    /// A schedule-free optimizer keeps the learning rate constant (sd-scripts' dummy
    /// scheduler); a warmup there is refused in favour of the optimizer's own `warmup_steps`.
    pub fn replaces_scheduler(&self, requested: &str, warmup_steps: usize) -> Result<bool> {
        if self.sets_own_lr() {
            if requested != "adafactor" {
                tracing::info!(
                    "Adafactor with relative_step=True sets its own learning rate: \
                     {requested} is replaced by adafactor, as in sd-scripts"
                );
            }
            if warmup_steps > 0 {
                return Err(Error::Usage(
                    "--lr_warmup_steps: Adafactor with relative_step=True takes no warmup (it \
                     sets its own learning rate; warmup_init=True warms it up); drop the option"
                        .into(),
                ));
            }
            return Ok(true);
        }
        if matches!(self.algorithm, Algorithm::ScheduleFree(_)) {
            if warmup_steps > 0 {
                return Err(Error::Usage(
                    "--lr_warmup_steps: a schedule-free optimizer takes no scheduler (sd-scripts \
                     ignores it and keeps --learning_rate); give --optimizer_args warmup_steps=N \
                     instead"
                        .into(),
                ));
            }
            if requested != "constant" {
                tracing::warn!(
                    "a schedule-free optimizer keeps --learning_rate: the scheduler \
                     {requested} is not applied, as in sd-scripts"
                );
            }
            return Ok(true);
        }
        if requested.starts_with("adafactor") {
            return Err(Error::Usage(format!(
                "--lr_scheduler {requested} goes only with --optimizer_type Adafactor and \
                 relative_step=True (its default); choose another scheduler"
            )));
        }
        Ok(false)
    }

    /// Bytes of optimizer state for a tensor of `len` values.
    pub fn state_bytes(&self, len: usize) -> u64 {
        let len64 = len as u64;
        match &self.algorithm {
            Algorithm::AdamW { .. } => 8 * len64,
            Algorithm::Lion { .. } | Algorithm::SgdNesterov { .. } => 4 * len64,
            Algorithm::Bnb(config) => config.state_bytes(len),
            Algorithm::Adafactor(config) => config.state_bytes(len),
            Algorithm::DAdapt(config) => config.state_bytes(len),
            Algorithm::ScheduleFree(config) => config.state_bytes(len),
        }
    }

    /// sd-scripts' warnings about the learning rates of each parameter group (`lrs`), and the
    /// refusals of optimizers that cannot take them.
    pub fn check_learning_rates(&self, lrs: &[f64]) -> Result<()> {
        match &self.algorithm {
            Algorithm::DAdapt(config) => dadapt::check_learning_rates(config.rule, lrs),
            _ => Ok(()),
        }
    }

    /// The `ss_optimizer` string as sd-scripts writes it: `module.Class`, then
    /// `(key=value,...)` with Python's `str()` of each value when there are arguments.
    pub fn description(&self) -> String {
        if self.kwargs.is_empty() {
            self.class.to_string()
        } else {
            let args: Vec<String> = (self.kwargs.iter())
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            format!("{}({})", self.class, args.join(","))
        }
    }
}

/// The optimizer state of one variable.
enum VarState {
    /// Tensors on the variable's device under torch's state names (AdamW: `exp_avg`,
    /// `exp_avg_sq`; Lion: `exp_avg`; SGD: `momentum_buffer`).
    Tensors(Vec<(&'static str, Tensor)>),
    /// bitsandbytes' states, kept in host memory.
    Bnb(bnb::State),
    /// Adafactor's states, kept in host memory.
    Adafactor(adafactor::State),
    /// The states of Prodigy or a D-adaptation optimizer, kept in host memory.
    DAdapt(dadapt::State),
    /// A schedule-free optimizer's states, kept in host memory.
    ScheduleFree(schedulefree::State),
}

/// Optimizer state for a list of variables, each with its own learning-rate factor (the
/// parameter group it belongs to: block LR weights, LoRA+).
pub struct Optimizer {
    kind: OptimizerKind,
    vars: Vec<Var>,
    lr_factors: Vec<f64>,
    states: Vec<VarState>,
    /// The shared estimate of Prodigy or a D-adaptation optimizer.
    estimate: Option<dadapt::Global>,
    /// Updates applied to each variable (a variable without a gradient is not updated, as in
    /// torch, so counts can differ under module dropout).
    pub steps: Vec<usize>,
}

/// The values of a tensor as one float32 vector in host memory.
fn host_values(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(tensor
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
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
        let states = vars
            .iter()
            .map(|var| {
                let tensor = var.as_tensor();
                let zeros = || tensor.zeros_like();
                Ok(match &kind.algorithm {
                    Algorithm::AdamW { .. } => {
                        VarState::Tensors(vec![("exp_avg", zeros()?), ("exp_avg_sq", zeros()?)])
                    }
                    Algorithm::Lion { .. } => VarState::Tensors(vec![("exp_avg", zeros()?)]),
                    Algorithm::SgdNesterov { .. } => {
                        VarState::Tensors(vec![("momentum_buffer", zeros()?)])
                    }
                    Algorithm::Bnb(config) => {
                        VarState::Bnb(bnb::State::new(config, tensor.elem_count()))
                    }
                    Algorithm::Adafactor(config) => {
                        VarState::Adafactor(adafactor::State::new(config, tensor.dims()))
                    }
                    Algorithm::DAdapt(config) => {
                        VarState::DAdapt(dadapt::State::new(config, &host_values(tensor)?))
                    }
                    Algorithm::ScheduleFree(config) => VarState::ScheduleFree(
                        schedulefree::State::new(config, &host_values(tensor)?),
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let estimate = match &kind.algorithm {
            Algorithm::DAdapt(config) => Some(dadapt::Global::new(config)),
            _ => None,
        };
        Ok(Self {
            kind,
            estimate,
            steps: vec![0; vars.len()],
            vars,
            lr_factors,
            states,
        })
    }

    /// The variables, in the order of [`Optimizer::step`]'s gradients.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Applies one update with the (already clipped) gradients, each variable at learning rate
    /// `lr` × its factor + `offset` (the part of a torch scheduler's rate that is not a multiple
    /// of the group's own, see [`crate::stages::train_lora::lr::GroupRate`]); a variable without
    /// a gradient is left as it is.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, offset: f64) -> Result<()> {
        if let Algorithm::DAdapt(config) = &self.kind.algorithm {
            return self.estimating_step(*config, grads, lr, offset);
        }
        if let Algorithm::ScheduleFree(config) = &self.kind.algorithm {
            return self.schedule_free_step(*config, grads, lr, offset);
        }
        for (i, (var, grad)) in self.vars.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            self.steps[i] += 1;
            let step = self.steps[i];
            let lr = lr * self.lr_factors[i] + offset;
            let param = var.as_tensor();
            match (&self.kind.algorithm, &mut self.states[i]) {
                (algorithm, VarState::Tensors(moments)) => {
                    let (updated, new_moments) =
                        tensor_step(algorithm, param, grad, moments, step, lr)?;
                    var.set(&updated)?;
                    for ((_, slot), new) in moments.iter_mut().zip(new_moments) {
                        *slot = new;
                    }
                }
                (Algorithm::Bnb(config), VarState::Bnb(state)) => {
                    let mut values = host_values(param)?;
                    state.update(config, &mut values, &host_values(grad)?, step, lr);
                    var.set(&Tensor::from_vec(values, param.shape(), param.device())?)?;
                }
                (Algorithm::Adafactor(config), VarState::Adafactor(state)) => {
                    let mut values = host_values(param)?;
                    state.update(config, &mut values, &host_values(grad)?, step, lr);
                    var.set(&Tensor::from_vec(values, param.shape(), param.device())?)?;
                }
                _ => unreachable!("states are made for the algorithm"),
            }
        }
        Ok(())
    }

    /// One step of a schedule-free optimizer: every parameter group counts the step; the
    /// variables with a gradient move, and all end at `x` (sd-scripts' `optimizer.eval()`).
    fn schedule_free_step(
        &mut self,
        config: schedulefree::Config,
        grads: &[Option<Tensor>],
        lr: f64,
        offset: f64,
    ) -> Result<()> {
        for (i, grad) in grads.iter().enumerate() {
            let VarState::ScheduleFree(state) = &mut self.states[i] else {
                unreachable!("states are made for the algorithm")
            };
            let tensor = self.vars[i].as_tensor();
            let mut values = host_values(tensor)?;
            let grad = grad.as_ref().map(host_values).transpose()?;
            state.update(
                &config,
                &mut values,
                grad.as_deref(),
                lr * self.lr_factors[i] + offset,
            );
            if grad.is_some() {
                self.steps[i] += 1;
                self.vars[i].set(&Tensor::from_vec(values, tensor.shape(), tensor.device())?)?;
            }
        }
        Ok(())
    }

    /// Puts the parameters where the next forward pass reads them: a schedule-free optimizer
    /// moves them from `x` back to `y` (sd-scripts' `optimizer.train()`); no change otherwise.
    pub fn prepare_forward(&mut self) -> Result<()> {
        let Algorithm::ScheduleFree(config) = &self.kind.algorithm else {
            return Ok(());
        };
        for (var, state) in self.vars.iter().zip(&mut self.states) {
            let VarState::ScheduleFree(state) = state else {
                unreachable!("states are made for the algorithm")
            };
            if state.in_train_mode() {
                continue;
            }
            let tensor = var.as_tensor();
            let mut values = host_values(tensor)?;
            state.to_train(config, &mut values);
            var.set(&Tensor::from_vec(values, tensor.shape(), tensor.device())?)?;
        }
        Ok(())
    }

    /// One step of Prodigy or a D-adaptation optimizer over every variable with a gradient at
    /// once.
    fn estimating_step(
        &mut self,
        config: dadapt::Config,
        grads: &[Option<Tensor>],
        lr: f64,
        offset: f64,
    ) -> Result<()> {
        let mut values: Vec<(usize, Vec<f32>, Vec<f32>)> = Vec::new();
        for (i, (var, grad)) in self.vars.iter().zip(grads).enumerate() {
            if let Some(grad) = grad {
                values.push((i, host_values(var.as_tensor())?, host_values(grad)?));
            }
        }
        let mut states: Vec<Option<&mut dadapt::State>> = (self.states.iter_mut())
            .map(|state| match state {
                VarState::DAdapt(state) => Some(state),
                _ => None,
            })
            .collect();
        let mut slots: Vec<dadapt::Slot> = Vec::new();
        for (i, param, grad) in values.iter_mut() {
            slots.push(dadapt::Slot {
                param: param.as_mut_slice(),
                grad: std::mem::take(grad),
                state: states[*i].take().expect("a DAdapt state per variable"),
                lr: lr * self.lr_factors[*i] + offset,
                updates: self.steps[*i],
            });
        }
        let estimate = self.estimate.as_mut().expect("an estimate for DAdapt");
        // DAdaptLion moves the parameters even in a step it does not count.
        let counted = dadapt::step(&config, estimate, &mut slots);
        drop(slots);
        for (i, param, _) in values {
            self.steps[i] += usize::from(counted);
            let tensor = self.vars[i].as_tensor();
            self.vars[i].set(&Tensor::from_vec(param, tensor.shape(), tensor.device())?)?;
        }
        Ok(())
    }

    /// The learning rate the optimizer applied to its first variable at its last step, where
    /// the optimizer sets it itself (Adafactor with `relative_step` or `scale_parameter`);
    /// `None` where it is the scheduled one.
    pub fn own_lr(&self) -> Option<f64> {
        match (&self.kind.algorithm, self.states.first()) {
            (Algorithm::Adafactor(config), Some(VarState::Adafactor(state))) => {
                state.last_lr(config, self.steps[0])
            }
            _ => None,
        }
    }

    /// The state as named tensors (`<name>.<variable index>`), for `optimizer.safetensors`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, state) in self.states.iter().enumerate() {
            match state {
                VarState::Tensors(moments) => {
                    for (name, tensor) in moments {
                        out.push((
                            format!("{name}.{i}"),
                            tensor.to_device(&candle_core::Device::Cpu)?,
                        ));
                    }
                }
                VarState::Bnb(state) => out.extend(state.tensors(i)?),
                VarState::Adafactor(state) => out.extend(state.tensors(i)?),
                VarState::DAdapt(state) => out.extend(state.tensors(i)?),
                VarState::ScheduleFree(state) => out.extend(state.tensors(i)?),
            }
        }
        if let Some(estimate) = &self.estimate {
            out.extend(estimate.tensors()?);
        }
        Ok(out)
    }

    /// Restores the state written by [`Optimizer::state_tensors`]; `Err` says which tensor is
    /// missing or has the wrong shape.
    pub fn restore_state(
        &mut self,
        saved: &HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        for (i, state) in self.states.iter_mut().enumerate() {
            match state {
                VarState::Tensors(moments) => {
                    for (name, slot) in moments.iter_mut() {
                        let key = format!("{name}.{i}");
                        let tensor = saved
                            .get(&key)
                            .ok_or_else(|| format!("{key} is missing (different optimizer?)"))?;
                        if tensor.dims() != slot.dims() {
                            return Err(format!("{key} has the wrong shape"));
                        }
                        *slot = tensor.to_device(slot.device()).map_err(|e| e.to_string())?;
                    }
                }
                VarState::Bnb(state) => state.restore(i, saved)?,
                VarState::Adafactor(state) => state.restore(i, saved)?,
                VarState::DAdapt(state) => state.restore(i, saved)?,
                VarState::ScheduleFree(state) => state.restore(i, saved)?,
            }
        }
        if let Some(estimate) = &mut self.estimate {
            estimate.restore(saved)?;
        }
        Ok(())
    }
}

/// One update of the optimizers whose state lives in tensors; returns the new parameter and
/// the new state tensors.
fn tensor_step(
    algorithm: &Algorithm,
    param: &Tensor,
    grad: &Tensor,
    moments: &[(&'static str, Tensor)],
    step: usize,
    lr: f64,
) -> Result<(Tensor, Vec<Tensor>)> {
    Ok(match *algorithm {
        Algorithm::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => {
            let m = ((&moments[0].1 * beta1)? + (grad * (1.0 - beta1))?)?;
            let v = ((&moments[1].1 * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let bias1 = 1.0 - beta1.powi(step as i32);
            let bias2 = 1.0 - beta2.powi(step as i32);
            let denom = ((v.sqrt()? / bias2.sqrt())? + eps)?;
            let decayed = (param * (1.0 - lr * weight_decay))?;
            let updated = (decayed - (m.div(&denom)? * (lr / bias1))?)?;
            (updated, vec![m, v])
        }
        Algorithm::Lion {
            beta1,
            beta2,
            weight_decay,
        } => {
            let m = &moments[0].1;
            let update = ((m * beta1)? + (grad * (1.0 - beta1))?)?.sign()?;
            let decayed = (param * (1.0 - lr * weight_decay))?;
            let updated = (decayed - (update * lr)?)?;
            (updated, vec![((m * beta2)? + (grad * (1.0 - beta2))?)?])
        }
        Algorithm::SgdNesterov {
            momentum,
            weight_decay,
        } => {
            let grad = if weight_decay != 0.0 {
                (grad + (param * weight_decay)?)?
            } else {
                grad.clone()
            };
            let buffer = if step == 1 {
                grad.clone()
            } else {
                ((&moments[0].1 * momentum)? + &grad)?
            };
            let direction = (&grad + (&buffer * momentum)?)?;
            ((param - (direction * lr)?)?, vec![buffer])
        }
        Algorithm::Bnb(_)
        | Algorithm::Adafactor(_)
        | Algorithm::DAdapt(_)
        | Algorithm::ScheduleFree(_) => {
            unreachable!("host-memory optimizers have no tensor state")
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, args: &[&str]) -> Result<OptimizerKind> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        OptimizerKind::parse(name, &args)
    }

    #[test]
    fn names_and_arguments_are_read_as_sd_scripts_reads_them() {
        let kind = parse("adamw8bit", &["betas=0.9,0.99", "weight_decay=0.1"]).unwrap();
        let Algorithm::Bnb(config) = kind.algorithm else {
            panic!("{kind:?}")
        };
        assert_eq!(
            (config.beta1, config.beta2, config.weight_decay),
            (0.9, 0.99, 0.1)
        );
        assert!(config.eight_bit && config.min_8bit_size == 4096);
        assert_eq!(
            kind.description(),
            "bitsandbytes.optim.adamw.AdamW8bit(betas=(0.9, 0.99),weight_decay=0.1)"
        );
        assert_eq!(
            parse("", &[]).unwrap().description(),
            "torch.optim.adamw.AdamW"
        );
        let kind = parse("PagedAdamW", &["optim_bits=8"]).unwrap();
        assert!(matches!(kind.algorithm, Algorithm::Bnb(c) if c.eight_bit));
        let kind = parse("SGDNesterov8bit", &[]).unwrap();
        assert_eq!(
            kind.description(),
            "bitsandbytes.optim.sgd.SGD8bit(momentum=0.9)"
        );
        assert!(matches!(kind.algorithm, Algorithm::Bnb(c) if c.rule == bnb::Rule::Momentum));
    }

    #[test]
    fn unknown_keys_and_values_are_refused_with_what_is_taken() {
        let error = parse("Prodigy", &["scale_parameter=False"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("scale_parameter") && error.contains("d_coef"),
            "{error}"
        );
        let error = parse("AdamW8bit", &["lr=1"]).unwrap_err().to_string();
        assert!(error.contains("--learning_rate"), "{error}");
        let error = parse("AdamW", &["betas=0.9"]).unwrap_err().to_string();
        assert!(error.contains("two numbers"), "{error}");
        let error = parse("Adafactor", &["relative_step=false"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("True and False"), "{error}");
        let error = parse("AdEMAMix8bit", &[]).unwrap_err().to_string();
        assert!(error.contains("AdamW8bit"), "{error}");
        let error = parse("DAdaptAdan", &["betas=(0.9,0.9)"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("three numbers"), "{error}");
        let error = parse("DAdaptLion", &["growth_rate=2"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("d0"), "{error}");
        let error = parse("DAdaptation", &["use_bias_correction=True"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("growth_rate"), "{error}");
        assert!(parse("Ranger", &[]).is_err());
    }

    #[test]
    fn legacy_flags_name_the_optimizer_and_exclude_each_other() {
        assert_eq!(optimizer_name("", true, false).unwrap(), "AdamW8bit");
        assert_eq!(optimizer_name("", false, true).unwrap(), "Lion");
        assert_eq!(optimizer_name("", false, false).unwrap(), "AdamW");
        assert!(optimizer_name("AdamW", true, false).is_err());
        assert!(optimizer_name("", true, true).is_err());
    }

    #[test]
    fn adafactor_gets_sd_scripts_relative_step_and_scheduler() {
        let kind = parse("Adafactor", &[]).unwrap();
        assert!(kind.sets_own_lr());
        assert_eq!(
            kind.description(),
            "transformers.optimization.Adafactor(relative_step=True)"
        );
        assert!(kind.replaces_scheduler("cosine", 0).unwrap());
        assert!(kind.replaces_scheduler("constant", 5).is_err());
        let kind = parse("Adafactor", &["relative_step=False", "warmup_init=True"]).unwrap();
        assert!(kind.sets_own_lr(), "warmup_init forces relative_step on");
        let kind = parse("Adafactor", &["relative_step=False"]).unwrap();
        assert!(!kind.sets_own_lr());
        assert!(kind.replaces_scheduler("adafactor", 0).is_err());
        assert!(!kind.replaces_scheduler("cosine", 3).unwrap());
    }

    #[test]
    fn schedule_free_optimizers_keep_the_learning_rate_and_refuse_a_warmup() {
        let kind = parse("SGDScheduleFree", &["warmup_steps=3"]).unwrap();
        assert!(kind.replaces_scheduler("cosine", 0).unwrap());
        let error = kind
            .replaces_scheduler("constant", 5)
            .unwrap_err()
            .to_string();
        assert!(error.contains("warmup_steps=N"), "{error}");
        let error = parse("RAdamScheduleFree", &["warmup_steps=3"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("silent_sgd_phase"), "{error}");
        assert!(parse("SGDScheduleFree", &["momentum=0"]).is_err());
    }

    #[test]
    fn learning_rate_free_optimizers_refuse_several_learning_rates() {
        for name in [
            "Prodigy",
            "DAdaptAdam",
            "DAdaptation",
            "DAdaptAdaGrad",
            "DAdaptSGD",
            "DAdaptLion",
            "DAdaptAdan",
            "DAdaptAdanIP",
        ] {
            let kind = parse(name, &[]).unwrap();
            assert!(kind.check_learning_rates(&[1.0, 1.0, 0.0]).is_ok());
            let error = kind
                .check_learning_rates(&[1.0, 16.0])
                .unwrap_err()
                .to_string();
            assert!(error.contains("loraplus_lr_ratio"), "{error}");
        }
        assert!(parse("AdamW", &[])
            .unwrap()
            .check_learning_rates(&[1.0, 16.0])
            .is_ok());
    }

    /// The tensors of a rank-`rank` LoRA (LierLa) on the full-size SD1.5 UNet: 16 transformer
    /// blocks (channels 320, 320, 640, 640, 1280, 1280 down, 1280 mid, 3 x 1280, 640, 320 up),
    /// each with proj_in, proj_out, the self-attention's q, k, v, out, the cross-attention's q,
    /// k and v (from the 768-wide text encoder), out, and the feed-forward's C -> 8C and 4C -> C.
    fn sd15_lora_tensor_sizes(rank: usize) -> Vec<usize> {
        let channels = [
            320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320,
        ];
        let mut sizes = Vec::new();
        for c in channels {
            let layers = [
                (c, c),
                (c, c),
                (c, c),
                (c, c),
                (c, c),
                (c, c),
                (c, c),
                (768, c),
                (768, c),
                (c, c),
                (c, 8 * c),
                (4 * c, c),
            ];
            for (input, output) in layers {
                sizes.push(rank * input);
                sizes.push(output * rank);
            }
        }
        sizes
    }

    /// The figure of docs/train-lora.md: AdamW8bit keeps about a quarter of AdamW's state.
    #[test]
    fn adamw8bit_state_of_a_rank_128_sd15_lora_is_a_quarter_of_adamw() {
        let sizes = sd15_lora_tensor_sizes(128);
        assert_eq!(sizes.len(), 2 * 192);
        assert_eq!(sizes.iter().sum::<usize>(), 54_263_808);
        let bytes = |name: &str| -> u64 {
            let kind = parse(name, &[]).unwrap();
            sizes.iter().map(|&len| kind.state_bytes(len)).sum()
        };
        let (full, eight) = (bytes("AdamW"), bytes("AdamW8bit"));
        assert_eq!(full, 434_110_464);
        assert_eq!(eight, 110_223_360);
        assert!((eight as f64) / (full as f64) <= 0.3);
    }
}
