//! `svd-merge-lora`: sd-scripts' `networks/svd_merge_lora.py` (without `--lbws`).
//!
//! Each module's weight changes `ratio · alpha/rank · up · down` are summed over the LoRAs, and
//! the sum is factored by SVD at `--new_rank` (`--new_conv_rank` for 3x3 convs), its factors
//! clamped to the 0.99 quantile as sd-scripts does; alpha = the new rank (int64, as upstream).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::extract::insert_factors;
use super::tensors::{check_output, round_to, Array, Precision, TensorFile};
use super::{delta_of, lora_modules, merged_from, modelspec, title_of};
use crate::infra::report::Summary;
use crate::models::ModelFamily;
use crate::{Error, Result};

/// sd-scripts' `CLAMP_QUANTILE`.
pub const CLAMP_QUANTILE: f64 = 0.99;

/// Options of `svd-merge-lora`.
#[derive(Debug, Clone)]
pub struct Options {
    /// LoRA files.
    pub models: Vec<PathBuf>,
    /// One ratio per LoRA.
    pub ratios: Vec<f32>,
    /// Rank of the result.
    pub new_rank: usize,
    /// Rank of 3x3 conv modules (default `new_rank`).
    pub new_conv_rank: Option<usize>,
    /// Output file.
    pub save_to: PathBuf,
    /// Precision of the merge arithmetic.
    pub precision: Precision,
    /// Precision of the saved tensors (default: `precision`).
    pub save_precision: Option<Precision>,
    /// Write no `modelspec.*` metadata.
    pub no_metadata: bool,
    /// Quantile the factors are clamped to (sd-scripts: the constant 0.99).
    pub clamp_quantile: f64,
}

/// Runs `svd-merge-lora`.
pub fn run(options: &Options) -> Result<Summary> {
    if options.models.is_empty() || options.models.len() != options.ratios.len() {
        return Err(Error::Usage(format!(
            "{} --models but {} --ratios: give one ratio per model",
            options.models.len(),
            options.ratios.len()
        )));
    }
    check_output(&options.save_to)?;
    let merge = options.precision.dtype();
    let save = options.save_precision.unwrap_or(options.precision).dtype();
    let conv_rank = options.new_conv_rank.unwrap_or(options.new_rank);
    let mut sums: BTreeMap<String, (Vec<f32>, Vec<usize>)> = BTreeMap::new();
    let (mut v2, mut base_model) = (None::<String>, None::<String>);
    let mut sources = Vec::new();
    for (path, &ratio) in options.models.iter().zip(&options.ratios) {
        let mut lora = TensorFile::read(path, "a LoRA")?;
        for array in lora.tensors.values_mut() {
            array.cast(merge);
        }
        if v2.is_none() {
            v2 = lora.metadata.get("ss_v2").cloned();
        }
        if base_model.is_none() {
            base_model = lora.metadata.get("ss_base_model_version").cloned();
        }
        for (name, keys) in lora_modules(&lora, path)? {
            let (mut product, out, _cols, rank) = delta_of(&lora, &keys);
            round_to(merge, &mut product);
            let alpha = keys
                .alpha
                .as_ref()
                .map_or(rank as f32, |k| lora.tensors[k].item());
            let scale = alpha / rank as f32;
            let down = &lora.tensors[&keys.down];
            let mut shape = down.shape.clone();
            shape[0] = out;
            let entry = sums
                .entry(name.clone())
                .or_insert_with(|| (vec![0.0; product.len()], shape.clone()));
            if entry.1 != shape {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "module {name} changes a {shape:?} weight, the earlier LoRAs {:?}",
                        entry.1
                    ),
                ));
            }
            for (s, p) in entry.0.iter_mut().zip(&product) {
                *s += ratio * p * scale;
            }
            round_to(merge, &mut entry.0);
        }
        sources.push((path.clone(), lora.metadata));
    }
    let mut out = TensorFile::default();
    let ranks = insert_factors(
        &mut out,
        &sums,
        (options.new_rank, conv_rank),
        options.clamp_quantile,
        save,
    );
    for (name, rank) in ranks {
        out.tensors.insert(
            format!("{name}.alpha"),
            Array::new(Vec::new(), vec![rank as f32], safetensors::Dtype::I64),
        );
    }
    for array in out.tensors.values_mut() {
        array.cast(save);
    }
    let m = &mut out.metadata;
    m.insert("ss_network_module".into(), "networks.lora".into());
    m.insert("ss_network_dim".into(), options.new_rank.to_string());
    m.insert("ss_network_alpha".into(), options.new_rank.to_string());
    m.insert(
        "ss_network_args".into(),
        format!("{{\"conv_dim\": {conv_rank}, \"conv_alpha\": {conv_rank}}}"),
    );
    if let Some(v2) = &v2 {
        m.insert("ss_v2".into(), v2.clone());
    }
    if let Some(base) = &base_model {
        m.insert("ss_base_model_version".into(), base.clone());
    }
    if !options.no_metadata {
        let is_v2 = v2.as_deref() == Some("True");
        let sdxl = base_model
            .as_deref()
            .is_some_and(|b| b.to_ascii_lowercase().starts_with("sdxl"));
        let family = if sdxl {
            ModelFamily::Sdxl
        } else if is_v2 {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        };
        let from: Vec<(&Path, &BTreeMap<String, String>)> =
            sources.iter().map(|(p, m)| (p.as_path(), m)).collect();
        let spec = modelspec(
            family,
            is_v2,
            true,
            &title_of(&options.save_to),
            Some(merged_from(&from)),
        );
        out.metadata.extend(spec);
    }
    out.write(&options.save_to, true)?;
    tracing::info!("saved {}", options.save_to.display());
    Ok(Summary {
        done: options.models.len(),
        ..Summary::default()
    })
}
