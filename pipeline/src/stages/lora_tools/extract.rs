//! `extract-lora`: sd-scripts' `networks/extract_lora_from_models.py`.
//!
//! For every layer sd-scripts' LoRA network would adapt (attention and feed-forward layers of
//! the UNet's transformer blocks, the resnet / sampler layers too with `--conv_dim`, and the
//! text encoders' projections when they differ by more than `--min_diff`), the difference
//! `tuned - original` is factored by SVD and cut to the rank; `lora_up = U · diag(S)`,
//! `lora_down = Vᵀ`, both clamped to `±quantile(|…|, clamp_quantile)` of their joined values as
//! sd-scripts does; alpha = rank.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rayon::prelude::*;

use super::linalg::{matrix, svd, to_row_major};
use super::tensors::{check_output, Array, Precision, TensorFile};
use super::{modelspec, module_slots, py_bool, text_encoder_names, title_of, WeightSlot};
use crate::infra::pyjson::float_repr;
use crate::infra::report::Summary;
use crate::models::ModelFamily;
use crate::{Error, Result};

/// Options of `extract-lora`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Original model.
    pub model_org: PathBuf,
    /// Tuned model.
    pub model_tuned: PathBuf,
    /// Output LoRA.
    pub save_to: PathBuf,
    /// Rank of linear and 1x1 conv modules.
    pub dim: usize,
    /// Rank of 3x3 conv modules (and resnet/sampler layers at all); `None`: none.
    pub conv_dim: Option<usize>,
    /// Quantile of the factors' values they are clamped to.
    pub clamp_quantile: f64,
    /// Text encoders are extracted when some weight differs by more than this.
    pub min_diff: f32,
    /// Precision of the saved tensors (default float).
    pub save_precision: Option<Precision>,
    /// `--v2` (the family is read from the checkpoint; checked against it).
    pub v2: bool,
    /// `--sdxl` (checked against the checkpoint).
    pub sdxl: bool,
    /// `--v_parameterization` (metadata only; default: `--v2`).
    pub v_parameterization: Option<bool>,
    /// Write no `modelspec.*` metadata.
    pub no_metadata: bool,
}

/// torch.quantile (linear interpolation) of `values`.
pub fn quantile(values: &mut [f32], q: f64) -> f32 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    let pos = q * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let frac = pos - lo as f64;
    (values[lo] as f64 + (values[hi] as f64 - values[lo] as f64) * frac) as f32
}

/// Factors each module's weight change (`(diff, weight shape)` by module name), a module per
/// thread, and inserts its `lora_up` / `lora_down` weights into `out`, at `ranks.0` (Linear and
/// 1x1 conv) or `ranks.1` (3x3 conv), at most the smaller side; returns each module's rank (the
/// caller writes the alphas), in name order.
pub fn insert_factors(
    out: &mut TensorFile,
    modules: &BTreeMap<String, (Vec<f32>, Vec<usize>)>,
    (rank, conv_rank): (usize, usize),
    clamp_quantile: f64,
    save: safetensors::Dtype,
) -> Vec<(String, usize)> {
    let factored: Vec<(&String, usize, Array, Array)> = modules
        .par_iter()
        .map(|(name, (diff, shape))| {
            let conv = shape.len() == 4;
            let conv3 = conv && shape[2..] != [1, 1];
            let (out_dim, in_dim) = (shape[0], shape[1]);
            let rank = if conv3 { conv_rank } else { rank }
                .min(in_dim)
                .min(out_dim);
            let cols = diff.len() / out_dim;
            let (up, down) = factor(diff, out_dim, cols, rank, clamp_quantile);
            let (up_shape, down_shape) = if conv {
                (
                    vec![out_dim, rank, 1, 1],
                    vec![rank, in_dim, shape[2], shape[3]],
                )
            } else {
                (vec![out_dim, rank], vec![rank, in_dim])
            };
            let up = Array::new(up_shape, up, save);
            (name, rank, up, Array::new(down_shape, down, save))
        })
        .collect();
    (factored.into_iter())
        .map(|(name, rank, up, down)| {
            out.tensors.insert(format!("{name}.lora_up.weight"), up);
            out.tensors.insert(format!("{name}.lora_down.weight"), down);
            (name.clone(), rank)
        })
        .collect()
}

/// The rank-`rank` factors `(up [out, rank], down [rank, cols])` of `diff` (`out x cols`), clamped.
pub fn factor(
    diff: &[f32],
    out: usize,
    cols: usize,
    rank: usize,
    clamp_quantile: f64,
) -> (Vec<f32>, Vec<f32>) {
    let decomposition = svd(matrix(out, cols, diff));
    let have = decomposition.s.len();
    let u = to_row_major(&decomposition.u);
    let vt = to_row_major(&decomposition.vt);
    let mut up = vec![0f32; out * rank];
    for o in 0..out {
        for k in 0..rank.min(have) {
            up[o * rank + k] = (u[o * have + k] as f64 * decomposition.s[k]) as f32;
        }
    }
    let mut down = vec![0f32; rank * cols];
    for k in 0..rank.min(have) {
        down[k * cols..(k + 1) * cols].copy_from_slice(&vt[k * cols..(k + 1) * cols]);
    }
    // Signs of singular pairs are arbitrary (LAPACK's and nalgebra's differ); flip each pair so
    // that its largest-magnitude value is positive. The largest value overall is then positive,
    // so `--clamp_quantile 1.0` clamps nothing, as the best rank-r approximation needs.
    for k in 0..rank.min(have) {
        let column = (0..out).map(|o| up[o * rank + k]);
        let row = down[k * cols..(k + 1) * cols].iter().copied();
        let peak = column
            .chain(row)
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        if peak < 0.0 {
            for o in 0..out {
                up[o * rank + k] = -up[o * rank + k];
            }
            for v in &mut down[k * cols..(k + 1) * cols] {
                *v = -*v;
            }
        }
    }
    let mut joined: Vec<f32> = up.iter().chain(&down).copied().collect();
    let hi = quantile(&mut joined, clamp_quantile);
    let lo = -hi;
    for v in up.iter_mut().chain(down.iter_mut()) {
        *v = v.clamp(lo.min(hi), hi.max(lo));
    }
    (up, down)
}

fn read_slot(file: &TensorFile, slot: &WeightSlot) -> Option<(Vec<f32>, Vec<usize>)> {
    let weight = file.tensors.get(&slot.key)?;
    match (slot.row_offset, slot.rows) {
        (Some(offset), Some(rows)) => {
            let cols = weight.shape[1];
            Some((
                weight.data[offset * cols..(offset + rows) * cols].to_vec(),
                vec![rows, cols],
            ))
        }
        _ => Some((weight.data.clone(), weight.shape.clone())),
    }
}

/// Runs `extract-lora`.
pub fn run(options: &Options) -> Result<Summary> {
    if options.v2 && options.sdxl {
        return Err(Error::Usage(
            "--v2 and --sdxl cannot be given together".into(),
        ));
    }
    check_output(&options.save_to)?;
    let save = options.save_precision.unwrap_or(Precision::Float).dtype();
    let te_names: BTreeSet<String> = text_encoder_names(ModelFamily::Sdxl, 64)
        .into_iter()
        .chain(text_encoder_names(ModelFamily::Sd1, 64))
        .collect();
    let (family, mut slots) = module_slots(&options.model_org, &te_names)?;
    let (tuned_family, _) = module_slots(&options.model_tuned, &BTreeSet::new())?;
    if family != tuned_family {
        return Err(Error::bad_file(
            &options.model_tuned,
            format!(
                "is {tuned_family:?} but --model_org is {family:?}: both must be the same \
                 architecture"
            ),
        ));
    }
    let expected = if options.sdxl {
        ModelFamily::Sdxl
    } else if options.v2 {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    };
    if family != expected {
        return Err(Error::Usage(format!(
            "{} is a {family:?} checkpoint; pass {} (sd-scripts needs the flag to load it)",
            options.model_org.display(),
            match family {
                ModelFamily::Sdxl => "--sdxl",
                ModelFamily::Sd2 => "--v2",
                ModelFamily::Sd1 => "neither --v2 nor --sdxl",
            }
        )));
    }
    if family == ModelFamily::Sd2 {
        // sd-scripts' SD2 text encoder has one layer less than OpenCLIP's.
        let layer_of = |name: &str| {
            name.strip_prefix("lora_te_text_model_encoder_layers_")
                .and_then(|rest| rest.split('_').next())
                .and_then(|n| n.parse::<usize>().ok())
        };
        if let Some(last) = slots.keys().filter_map(|n| layer_of(n)).max() {
            slots.retain(|n, _| layer_of(n) != Some(last));
        }
    }
    if options.conv_dim.is_none() {
        slots.retain(|_, slot| !slot.conv_block);
    }
    let org = TensorFile::read(&options.model_org, "a Stable Diffusion checkpoint")?;
    let tuned = TensorFile::read(&options.model_tuned, "a Stable Diffusion checkpoint")?;
    let mut diffs: BTreeMap<String, (Vec<f32>, Vec<usize>)> = BTreeMap::new();
    let mut te_max = 0f32;
    for (name, slot) in &slots {
        let (Some((a, shape)), Some((b, shape_t))) =
            (read_slot(&org, slot), read_slot(&tuned, slot))
        else {
            return Err(Error::bad_file(
                &options.model_tuned,
                format!("tensor {} is missing in one of the models", slot.key),
            ));
        };
        if shape != shape_t {
            return Err(Error::bad_file(
                &options.model_tuned,
                format!("{} is {shape_t:?} but {shape:?} in --model_org", slot.key),
            ));
        }
        let diff: Vec<f32> = b.iter().zip(&a).map(|(t, o)| t - o).collect();
        if name.starts_with("lora_te") {
            te_max = diff.iter().fold(te_max, |m, v| m.max(v.abs()));
        }
        diffs.insert(name.clone(), (diff, shape));
    }
    if te_max > options.min_diff {
        tracing::info!("Text encoder is different. {te_max} > {}", options.min_diff);
    } else {
        tracing::warn!("Text encoder is same. Extract U-Net only.");
        diffs.retain(|name, _| !name.starts_with("lora_te"));
    }
    let mut out = TensorFile::default();
    let conv_rank = options.conv_dim.unwrap_or(options.dim);
    let ranks = insert_factors(
        &mut out,
        &diffs,
        (options.dim, conv_rank),
        options.clamp_quantile,
        save,
    );
    for (name, rank) in ranks {
        out.tensors
            .insert(format!("{name}.alpha"), Array::scalar(rank as f32, save));
    }
    for array in out.tensors.values_mut() {
        array.cast(save);
    }
    let v_param = options.v_parameterization.unwrap_or(options.v2);
    let version = match family {
        ModelFamily::Sdxl => "sdxl_base_v1-0".to_string(),
        _ => format!(
            "sd_{}{}",
            if options.v2 { "v2" } else { "v1" },
            if v_param { "_v" } else { "" }
        ),
    };
    let m = &mut out.metadata;
    m.insert("ss_v2".into(), py_bool(options.v2));
    m.insert("ss_base_model_version".into(), version);
    m.insert("ss_network_module".into(), "networks.lora".into());
    m.insert("ss_network_dim".into(), options.dim.to_string());
    m.insert("ss_network_alpha".into(), float_repr(options.dim as f64));
    m.insert(
        "ss_network_args".into(),
        match options.conv_dim {
            Some(c) => format!(
                "{{\"conv_dim\": \"{c}\", \"conv_alpha\": \"{}\"}}",
                float_repr(c as f64)
            ),
            None => "{}".into(),
        },
    );
    if !options.no_metadata {
        m.extend(modelspec(
            family,
            v_param,
            true,
            &title_of(&options.save_to),
            None,
        ));
    }
    out.write(&options.save_to, true)?;
    tracing::info!("LoRA weights are saved to: {}", options.save_to.display());
    Ok(Summary {
        done: diffs.len(),
        ..Summary::default()
    })
}
