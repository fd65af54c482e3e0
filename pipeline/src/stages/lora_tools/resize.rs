//! `resize-lora`: sd-scripts' `networks/resize_lora.py`.
//!
//! Each module's weight change `up · down` is factored again by SVD and cut to the new rank
//! (fixed, or chosen per module by `--dynamic_method`); the new `lora_up` is `U · diag(S)`, the
//! new `lora_down` is `Vᵀ`, and the new alpha keeps the module's scale: `alpha / old_rank ·
//! new_rank`. The SVD of the product is taken from QR factorisations of both factors and the
//! SVD of the small `rank x rank` core, which gives the same singular values and vectors as an
//! SVD of the full product (whose further singular values are zero) at a fraction of the cost.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rayon::prelude::*;

use super::linalg::{matrix, product_svd, to_row_major};
use super::lora_modules;
use super::tensors::{Array, Precision, TensorFile};
use crate::infra::pyjson::float_repr;
use crate::infra::report::Summary;
use crate::{Error, Result};

/// sd-scripts' `MIN_SV`: a module whose largest singular value is at most this gets rank 1.
pub const MIN_SV: f64 = 1e-6;

/// `--dynamic_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum DynamicMethod {
    /// Keep singular values above `S[0] / param`.
    SvRatio,
    /// Keep enough singular values for `param` of the Frobenius norm.
    SvFro,
    /// Keep enough singular values for `param` of their sum.
    SvCumulative,
}

/// Options of `resize-lora`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Input LoRA.
    pub model: PathBuf,
    /// Output file.
    pub save_to: PathBuf,
    /// New rank (the upper bound with a dynamic method).
    pub new_rank: usize,
    /// New rank of conv modules (default `new_rank`).
    pub new_conv_rank: Option<usize>,
    /// Dynamic rank choice.
    pub dynamic_method: Option<DynamicMethod>,
    /// Its parameter.
    pub dynamic_param: Option<f64>,
    /// Precision of the saved tensors (default float).
    pub save_precision: Option<Precision>,
    /// Print the per-module retention figures.
    pub verbose: bool,
}

/// What rank_resize decided for one module.
#[derive(Debug, Clone, PartialEq)]
pub struct RankChoice {
    /// New rank.
    pub new_rank: usize,
    /// New alpha (`scale · new_rank`).
    pub new_alpha: f32,
    /// Share of `sum(S)` kept.
    pub sum_retained: f64,
    /// Share of the Frobenius norm kept.
    pub fro_retained: f64,
    /// `S[0] / S[new_rank - 1]`.
    pub max_ratio: f64,
}

/// Index of the first value `>= target` (torch.searchsorted, left side).
fn search_sorted(values: &[f64], target: f64) -> usize {
    values
        .iter()
        .position(|&v| v >= target)
        .unwrap_or(values.len())
}

fn clamp_index(index: usize, len: usize) -> usize {
    index.min(len.saturating_sub(1)).max(1)
}

/// The new rank for singular values `s` (all of them, zeros included) as resize_lora.py's
/// `rank_resize`.
pub fn rank_resize(
    s: &[f64],
    rank: usize,
    method: Option<DynamicMethod>,
    param: f64,
    scale: f32,
) -> RankChoice {
    let len = s.len();
    let mut new_rank = match method {
        Some(DynamicMethod::SvRatio) => {
            let min_sv = s[0] / param;
            clamp_index(s.iter().filter(|&&v| v > min_sv).count(), len) + 1
        }
        Some(DynamicMethod::SvCumulative) => {
            let total: f64 = s.iter().sum();
            let mut acc = 0.0;
            let cumulative: Vec<f64> = s
                .iter()
                .map(|v| {
                    acc += v;
                    acc / total
                })
                .collect();
            clamp_index(search_sorted(&cumulative, param) + 1, len) + 1
        }
        Some(DynamicMethod::SvFro) => {
            let total: f64 = s.iter().map(|v| v * v).sum();
            let mut acc = 0.0;
            let cumulative: Vec<f64> = s
                .iter()
                .map(|v| {
                    acc += v * v;
                    acc / total
                })
                .collect();
            clamp_index(search_sorted(&cumulative, param * param) + 1, len) + 1
        }
        None => rank,
    };
    if s[0] <= MIN_SV {
        new_rank = 1;
    } else if new_rank > rank {
        new_rank = rank;
    }
    let new_alpha = scale * new_rank as f32;
    let s_sum: f64 = s.iter().map(|v| v.abs()).sum();
    let s_rank: f64 = s.iter().take(new_rank).map(|v| v.abs()).sum();
    let fro: f64 = s.iter().map(|v| v * v).sum::<f64>().sqrt();
    let red_fro: f64 = s.iter().take(new_rank).map(|v| v * v).sum::<f64>().sqrt();
    RankChoice {
        new_rank,
        new_alpha,
        sum_retained: s_rank / s_sum,
        fro_retained: red_fro / fro,
        max_ratio: s[0] / s.get(new_rank - 1).copied().unwrap_or(0.0),
    }
}

/// Runs `resize-lora`.
pub fn run(options: &Options) -> Result<Summary> {
    super::tensors::check_output(&options.save_to)?;
    let param = match (options.dynamic_method, options.dynamic_param) {
        (Some(_), None) | (Some(_), Some(0.0)) => {
            return Err(Error::Usage(
                "--dynamic_method needs --dynamic_param (e.g. sv_fro 0.9)".into(),
            ))
        }
        (_, p) => p.unwrap_or(0.0),
    };
    let save = options.save_precision.unwrap_or(Precision::Float).dtype();
    let lora = TensorFile::read(&options.model, "a LoRA")?;
    let modules = lora_modules(&lora, &options.model)?;
    let conv_rank = options.new_conv_rank.unwrap_or(options.new_rank);
    let mut out = lora.clone();
    let mut max_old_rank = 0usize;
    let mut last_alpha = None::<f32>;
    let mut report = String::from("\n");
    let mut fro_list = Vec::new();
    // Each module's decomposition on its own thread; the file is assembled in module order.
    let resized: Vec<(&String, &super::ModuleKeys, Array, Array, RankChoice, usize)> = modules
        .par_iter()
        .map(|(name, keys)| {
            let down = &lora.tensors[&keys.down];
            let up = &lora.tensors[&keys.up];
            let conv = down.shape.len() == 4;
            let old_rank = down.shape[0];
            let scale = keys
                .alpha
                .as_ref()
                .map_or(1.0, |k| lora.tensors[k].item() / old_rank as f32);
            let out_size = up.shape[0];
            let cols = down.data.len() / old_rank.max(1);
            let svd = product_svd(
                matrix(out_size, old_rank, &up.data),
                matrix(old_rank, cols, &down.data),
            );
            let mut s = svd.s.clone();
            s.resize(out_size.min(cols), 0.0);
            let target = if conv { conv_rank } else { options.new_rank };
            let choice = rank_resize(&s, target, options.dynamic_method, param, scale);
            let r = choice.new_rank;
            let have = svd.s.len();
            let mut new_up = vec![0f32; out_size * r];
            let mut new_down = vec![0f32; r * cols];
            let u = to_row_major(&svd.u);
            let vt = to_row_major(&svd.vt);
            for o in 0..out_size {
                for k in 0..r.min(have) {
                    new_up[o * r + k] = (u[o * have + k] as f64 * svd.s[k]) as f32;
                }
            }
            for k in 0..r.min(have) {
                new_down[k * cols..(k + 1) * cols].copy_from_slice(&vt[k * cols..(k + 1) * cols]);
            }
            let mut down_shape = down.shape.clone();
            down_shape[0] = r;
            let up_shape = if conv {
                vec![out_size, r, 1, 1]
            } else {
                vec![out_size, r]
            };
            let down = Array::new(down_shape, new_down, save);
            let up = Array::new(up_shape, new_up, save);
            (name, keys, down, up, choice, old_rank)
        })
        .collect();
    for (name, keys, down, up, choice, old_rank) in resized {
        max_old_rank = max_old_rank.max(old_rank);
        out.tensors.insert(keys.down.clone(), down);
        out.tensors.insert(keys.up.clone(), up);
        out.tensors.insert(
            format!("{name}.alpha"),
            Array::scalar(choice.new_alpha, save),
        );
        if options.verbose {
            if !choice.fro_retained.is_nan() {
                fro_list.push(choice.fro_retained);
            }
            report += &format!(
                "{name:75} | sum(S) retained: {:.1}%, fro retained: {:.1}%, max(S) ratio: {:0.1}",
                choice.sum_retained * 100.0,
                choice.fro_retained * 100.0,
                choice.max_ratio
            );
            if options.dynamic_method.is_some() {
                report += &format!(
                    ", dynamic | dim: {}, alpha: {}\n",
                    choice.new_rank,
                    float_repr(choice.new_alpha as f64)
                );
            } else {
                report += "\n";
            }
        }
        last_alpha = Some(choice.new_alpha);
    }
    if options.verbose {
        let n = fro_list.len().max(1) as f64;
        let mean = fro_list.iter().sum::<f64>() / n;
        let std = (fro_list.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        println!("{report}");
        println!(
            "Average Frobenius norm retention: {:.2}% | std: {std:0.3}",
            mean * 100.0
        );
    }
    for array in out.tensors.values_mut() {
        array.cast(save);
    }
    let metadata = &mut out.metadata;
    let comment = metadata
        .get("ss_training_comment")
        .cloned()
        .unwrap_or_default();
    match options.dynamic_method {
        None => {
            let conv_desc = if conv_rank == options.new_rank {
                String::new()
            } else {
                format!(" (conv: {conv_rank})")
            };
            metadata.insert(
                "ss_training_comment".into(),
                format!(
                    "dimension is resized from {max_old_rank} to {}{conv_desc}; {comment}",
                    options.new_rank
                ),
            );
            metadata.insert("ss_network_dim".into(), options.new_rank.to_string());
            metadata.insert(
                "ss_network_alpha".into(),
                last_alpha.map_or("None".into(), |a| float_repr(a as f64)),
            );
        }
        Some(method) => {
            let method = match method {
                DynamicMethod::SvRatio => "sv_ratio",
                DynamicMethod::SvFro => "sv_fro",
                DynamicMethod::SvCumulative => "sv_cumulative",
            };
            metadata.insert(
                "ss_training_comment".into(),
                format!(
                    "Dynamic resize with {method}: {} from {max_old_rank}; {comment}",
                    float_repr(param)
                ),
            );
            metadata.insert("ss_network_dim".into(), "Dynamic".into());
            metadata.insert("ss_network_alpha".into(), "Dynamic".into());
        }
    }
    out.write(&options.save_to, true)?;
    tracing::info!("saved {}", options.save_to.display());
    Ok(Summary {
        done: modules.len(),
        ..Summary::default()
    })
}

/// Rank per module of a LoRA file (for reports and tests).
pub fn ranks(file: &TensorFile, path: &std::path::Path) -> Result<BTreeMap<String, usize>> {
    Ok(lora_modules(file, path)?
        .into_iter()
        .map(|(name, keys)| (name, file.tensors[&keys.down].shape[0]))
        .collect())
}
