//! `merge-lora`: sd-scripts' `networks/merge_lora.py` and `networks/sdxl_merge_lora.py`.
//!
//! With `--sd_model`, every LoRA module's weight change `ratio · alpha/rank · up · down` is added
//! to the checkpoint weight it belongs to (UNet and text encoders, SD1/SD2/SDXL single files);
//! the other tensors are copied, and the UNet, text-encoder and VAE tensors are written in the
//! save precision. Without it, the LoRAs are merged into one LoRA: each module's `lora_down` and
//! `lora_up` are scaled by `sqrt(alpha / base_alpha) · ratio` (`|…|` for `lora_up`) and summed
//! (or concatenated along the rank with `--concat`); the alpha of the first file that has the
//! module is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;

use super::tensors::{round_to, Array, Precision, TensorFile};
use super::{lora_modules, merged_from, modelspec, title_of};
use crate::infra::pyjson::float_repr;
use crate::infra::report::Summary;
use crate::models::ModelFamily;
use crate::{Error, Result};

/// Options of `merge-lora`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Checkpoint to merge into; `None`: merge the LoRAs into one LoRA.
    pub sd_model: Option<PathBuf>,
    /// Output file.
    pub save_to: PathBuf,
    /// LoRA files.
    pub models: Vec<PathBuf>,
    /// One ratio per LoRA.
    pub ratios: Vec<f32>,
    /// Precision of the merge arithmetic.
    pub precision: Precision,
    /// Precision of the saved tensors (default: `precision`).
    pub save_precision: Option<Precision>,
    /// Write no `modelspec.*` metadata.
    pub no_metadata: bool,
    /// Concatenate the LoRAs along the rank instead of summing them.
    pub concat: bool,
    /// Shuffle the ranks of each merged module (random permutation).
    pub shuffle: bool,
    /// `--v2` (accepted for compatibility; the family is read from the checkpoint).
    pub v2: bool,
}

/// Runs `merge-lora`.
pub fn run(options: &Options) -> Result<Summary> {
    if options.models.is_empty() {
        return Err(Error::Usage("give at least one LoRA with --models".into()));
    }
    if options.models.len() != options.ratios.len() {
        return Err(Error::Usage(format!(
            "{} --models but {} --ratios: give one ratio per model",
            options.models.len(),
            options.ratios.len()
        )));
    }
    super::tensors::check_output(&options.save_to)?;
    let save = options.save_precision.unwrap_or(options.precision).dtype();
    let out = match &options.sd_model {
        Some(model) => merge_into_checkpoint(options, model, save)?,
        None => merge_loras(options, save)?,
    };
    out.write(&options.save_to, options.sd_model.is_none())?;
    tracing::info!("saved {}", options.save_to.display());
    Ok(Summary {
        done: options.models.len(),
        ..Summary::default()
    })
}

fn read_lora(path: &Path, precision: Precision) -> Result<TensorFile> {
    let mut file = TensorFile::read(path, "a LoRA")?;
    lora_modules(&file, path)?;
    for (key, array) in &mut file.tensors {
        let known = key.ends_with(".lora_down.weight")
            || key.ends_with(".lora_up.weight")
            || key.ends_with(".alpha");
        if !known {
            return Err(Error::bad_file(
                path,
                format!(
                    "tensor {key} is not part of a kohya LoRA module (lora_down/lora_up/alpha); \
                     LyCORIS files cannot be merged by this tool (merge_lora.py cannot either): use lycoris-lora's tools/merge.py"
                ),
            ));
        }
        array.cast(precision.dtype());
    }
    Ok(file)
}

/// The merged LoRA of `options.models` (merge_lora.py `merge_lora_models`).
pub fn merge_loras(options: &Options, save: safetensors::Dtype) -> Result<TensorFile> {
    let merge = options.precision.dtype();
    let mut base_alphas: BTreeMap<String, f32> = BTreeMap::new();
    let mut base_dims: BTreeMap<String, usize> = BTreeMap::new();
    let mut merged: BTreeMap<String, Array> = BTreeMap::new();
    let (mut v2, mut base_model) = (None::<String>, None::<String>);
    let mut sources = Vec::new();
    for (path, &ratio) in options.models.iter().zip(&options.ratios) {
        tracing::info!("loading: {}", path.display());
        let lora = read_lora(path, options.precision)?;
        if v2.is_none() {
            v2 = lora.metadata.get("ss_v2").cloned();
        }
        if base_model.is_none() {
            base_model = lora.metadata.get("ss_base_model_version").cloned();
        }
        let modules = lora_modules(&lora, path)?;
        let mut alphas: BTreeMap<String, f32> = BTreeMap::new();
        for (name, keys) in &modules {
            let dim = lora.tensors[&keys.down].shape[0];
            base_dims.entry(name.clone()).or_insert(dim);
            let alpha = match &keys.alpha {
                Some(key) => lora.tensors[key].item(),
                None => dim as f32,
            };
            alphas.insert(name.clone(), alpha);
            base_alphas.entry(name.clone()).or_insert(alpha);
        }
        for (name, keys) in &modules {
            let base_alpha = base_alphas[name];
            let scale = (alphas[name] / base_alpha).sqrt() * ratio;
            for (key, is_up) in [(&keys.down, false), (&keys.up, true)] {
                let scale = if is_up { scale.abs() } else { scale };
                let source = &lora.tensors[key];
                let mut scaled = source.data.iter().map(|v| v * scale).collect::<Vec<_>>();
                round_to(merge, &mut scaled);
                match merged.get_mut(key) {
                    Some(existing) if options.concat => {
                        *existing = concat(existing, source, scaled, is_up, path)?;
                    }
                    Some(existing) => {
                        if existing.shape != source.shape {
                            return Err(Error::bad_file(
                                path,
                                format!(
                                    "{key} has shape {:?}, the earlier LoRAs {:?}: LoRAs of \
                                     different ranks or models cannot be summed (use --concat \
                                     for different ranks)",
                                    source.shape, existing.shape
                                ),
                            ));
                        }
                        for (e, s) in existing.data.iter_mut().zip(&scaled) {
                            *e += s;
                        }
                        round_to(merge, &mut existing.data);
                    }
                    None => {
                        merged.insert(key.clone(), Array::new(source.shape.clone(), scaled, merge));
                    }
                }
            }
        }
        sources.push((path.clone(), lora.metadata.clone()));
    }
    for (name, alpha) in &base_alphas {
        merged.insert(
            format!("{name}.alpha"),
            Array::scalar(*alpha, safetensors::Dtype::F32),
        );
        if options.shuffle {
            shuffle_ranks(&mut merged, name);
        }
    }
    for array in merged.values_mut() {
        array.cast(save);
    }
    let dims: BTreeSet<usize> = base_dims.values().copied().collect();
    let alphas: BTreeSet<u32> = base_alphas.values().map(|a| a.to_bits()).collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("ss_network_module".into(), "networks.lora".into());
    metadata.insert(
        "ss_network_dim".into(),
        if dims.len() == 1 {
            dims.iter().next().expect("one").to_string()
        } else {
            "Dynamic".into()
        },
    );
    metadata.insert(
        "ss_network_alpha".into(),
        if alphas.len() == 1 {
            float_repr(f32::from_bits(*alphas.iter().next().expect("one")) as f64)
        } else {
            "Dynamic".into()
        },
    );
    if let Some(v2) = &v2 {
        metadata.insert("ss_v2".into(), v2.clone());
    }
    if let Some(base) = &base_model {
        metadata.insert("ss_base_model_version".into(), base.clone());
    }
    if !options.no_metadata {
        let is_v2 = v2.as_deref() == Some("True");
        let sdxl = base_model.as_deref().is_some_and(|b| b.starts_with("sdxl"));
        let family = if sdxl {
            ModelFamily::Sdxl
        } else if is_v2 {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        };
        let from: Vec<(&Path, &BTreeMap<String, String>)> =
            sources.iter().map(|(p, m)| (p.as_path(), m)).collect();
        metadata.extend(modelspec(
            family,
            is_v2,
            true,
            &title_of(&options.save_to),
            Some(merged_from(&from)),
        ));
    }
    Ok(TensorFile {
        tensors: merged,
        metadata,
    })
}

fn concat(
    existing: &Array,
    source: &Array,
    scaled: Vec<f32>,
    is_up: bool,
    path: &Path,
) -> Result<Array> {
    let mismatch = || {
        Error::bad_file(
            path,
            format!(
                "shape {:?} cannot be concatenated with {:?}",
                source.shape, existing.shape
            ),
        )
    };
    if existing.shape.len() != source.shape.len() {
        return Err(mismatch());
    }
    if !is_up {
        // lora_down: along dim 0.
        if existing.shape[1..] != source.shape[1..] {
            return Err(mismatch());
        }
        let mut shape = existing.shape.clone();
        shape[0] += source.shape[0];
        let mut data = existing.data.clone();
        data.extend_from_slice(&scaled);
        return Ok(Array::new(shape, data, existing.dtype));
    }
    // lora_up: along dim 1 (`[out, r]` or `[out, r, 1, 1]`).
    if existing.shape[0] != source.shape[0] || existing.shape[2..] != source.shape[2..] {
        return Err(mismatch());
    }
    let out = existing.shape[0];
    let (a, b) = (existing.data.len() / out, scaled.len() / out);
    let mut data = Vec::with_capacity(existing.data.len() + scaled.len());
    for o in 0..out {
        data.extend_from_slice(&existing.data[o * a..(o + 1) * a]);
        data.extend_from_slice(&scaled[o * b..(o + 1) * b]);
    }
    let mut shape = existing.shape.clone();
    shape[1] += source.shape[1];
    Ok(Array::new(shape, data, existing.dtype))
}

fn shuffle_ranks(merged: &mut BTreeMap<String, Array>, name: &str) {
    let (down_key, up_key) = (
        format!("{name}.lora_down.weight"),
        format!("{name}.lora_up.weight"),
    );
    let Some(rank) = merged.get(&down_key).map(|d| d.shape[0]) else {
        return;
    };
    let mut perm: Vec<usize> = (0..rank).collect();
    perm.shuffle(&mut rand::rng());
    if let Some(down) = merged.get_mut(&down_key) {
        let cols = down.data.len() / rank;
        let old = down.data.clone();
        for (new_r, &old_r) in perm.iter().enumerate() {
            down.data[new_r * cols..(new_r + 1) * cols]
                .copy_from_slice(&old[old_r * cols..(old_r + 1) * cols]);
        }
    }
    if let Some(up) = merged.get_mut(&up_key) {
        let out = up.shape[0];
        let old = up.data.clone();
        for o in 0..out {
            for (new_r, &old_r) in perm.iter().enumerate() {
                up.data[o * rank + new_r] = old[o * rank + old_r];
            }
        }
    }
}

/// The checkpoint with the LoRAs merged in (merge_lora.py `merge_to_sd_model`).
pub fn merge_into_checkpoint(
    options: &Options,
    model: &Path,
    save: safetensors::Dtype,
) -> Result<TensorFile> {
    let merge = options.precision.dtype();
    let mut loras = Vec::new();
    let mut names = BTreeSet::new();
    for path in &options.models {
        let lora = read_lora(path, options.precision)?;
        names.extend(lora_modules(&lora, path)?.into_keys());
        loras.push(lora);
    }
    let (family, slots) = super::module_slots(model, &names)?;
    tracing::info!("loading SD model: {}", model.display());
    let mut checkpoint = TensorFile::read(model, "a Stable Diffusion checkpoint")?;
    let is_model_tensor = |key: &str| {
        [
            "model.diffusion_model.",
            "first_stage_model.",
            "cond_stage_model.",
            "conditioner.embedders.",
        ]
        .iter()
        .any(|p| key.starts_with(p))
    };
    for (key, array) in checkpoint.tensors.iter_mut() {
        if is_model_tensor(key) {
            array.cast(merge);
        }
    }
    let mut merged_modules = 0usize;
    for ((path, lora), &ratio) in options.models.iter().zip(&loras).zip(&options.ratios) {
        tracing::info!("merging: {}", path.display());
        for (name, keys) in lora_modules(lora, path)? {
            let Some(slot) = slots.get(&name) else {
                tracing::info!("no module found for LoRA weight: {}", keys.down);
                continue;
            };
            let (mut product, out, cols, rank) = super::delta_of(lora, &keys);
            round_to(merge, &mut product);
            let alpha = keys
                .alpha
                .as_ref()
                .map_or(rank as f32, |k| lora.tensors[k].item());
            let scale = alpha / rank as f32;
            let Some(weight) = checkpoint.tensors.get_mut(&slot.key) else {
                return Err(Error::bad_file(
                    model,
                    format!("tensor {} (for LoRA module {name}) is missing", slot.key),
                ));
            };
            let offset = slot.row_offset.unwrap_or(0) * cols;
            let fits = match slot.rows {
                Some(rows) => rows == out && weight.data.len() >= offset + out * cols,
                None => weight.data.len() == out * cols,
            };
            if !fits {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "module {name} changes a [{out}, {cols}] weight but {} is {:?}: the LoRA \
                         is for another model",
                        slot.key, weight.shape
                    ),
                ));
            }
            let target = &mut weight.data[offset..offset + out * cols];
            for (w, d) in target.iter_mut().zip(&product) {
                *w += ratio * d * scale;
            }
            round_to(merge, target);
            merged_modules += 1;
        }
    }
    tracing::info!("merged {merged_modules} modules");
    for (key, array) in checkpoint.tensors.iter_mut() {
        if is_model_tensor(key) {
            array.cast(save);
        }
    }
    if !options.no_metadata {
        let mut from: Vec<(&Path, &BTreeMap<String, String>)> = vec![(model, &checkpoint.metadata)];
        for (path, lora) in options.models.iter().zip(&loras) {
            from.push((path.as_path(), &lora.metadata));
        }
        let merged = merged_from(&from);
        let v_param = family == ModelFamily::Sd2;
        let spec = modelspec(
            family,
            v_param,
            false,
            &title_of(&options.save_to),
            Some(merged),
        );
        checkpoint.metadata = spec;
    } else {
        checkpoint.metadata.clear();
    }
    Ok(checkpoint)
}
