//! The LoRA tools of sd-scripts' `networks/` folder: `merge-lora` (merge_lora.py,
//! sdxl_merge_lora.py), `resize-lora` (resize_lora.py), `extract-lora`
//! (extract_lora_from_models.py), `svd-merge-lora` (svd_merge_lora.py) and `check-lora`
//! (check_lora_weights.py). They work on whole `.safetensors` files held as f32 arrays
//! ([`tensors::TensorFile`]); SVD and QR go through nalgebra in f64 ([`linalg`]).

pub mod check;
pub mod extract;
pub mod linalg;
pub mod merge;
pub mod resize;
pub mod svd_merge;
pub mod tensors;

use std::collections::BTreeMap;
use std::path::Path;

use crate::models::clip::{ldm_name as clip_ldm_name, WeightLayout};
use crate::models::{Checkpoint, Component, ModelFamily};
use crate::{Error, Result};
use tensors::TensorFile;

/// LyCORIS tensor-name endings (lycoris-lora's LoHa, LoKr, (IA)^3, full, DoRA and norm modules).
pub const LYCORIS_SUFFIXES: [&str; 20] = [
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_t2",
    ".dora_scale",
    ".lora_mid",
    ".diff",
    ".diff_b",
    ".on_input",
    ".w_norm",
    ".b_norm",
];

/// The tensors of one kohya LoRA module in a file.
#[derive(Debug, Clone)]
pub struct ModuleKeys {
    /// Module name, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub name: String,
    /// Key of `lora_down.weight`.
    pub down: String,
    /// Key of `lora_up.weight`.
    pub up: String,
    /// Key of `alpha`, when stored.
    pub alpha: Option<String>,
}

/// The kohya LoRA modules (`lora_down`/`lora_up`/`alpha`) of `file`, by name; a file with none
/// is refused with a message saying what it seems to be instead.
pub fn lora_modules(file: &TensorFile, path: &Path) -> Result<BTreeMap<String, ModuleKeys>> {
    // A LoCon module with DoRA's norms or a Tucker core is more than up · down, and norm
    // modules (train_norm) are no product at all: the sd-scripts scripts would drop those
    // tensors and write a wrong result.
    let extended = (file.tensors.keys()).find(|k| {
        [".dora_scale", ".lora_mid.weight", ".w_norm", ".b_norm"]
            .iter()
            .any(|suffix| k.ends_with(suffix))
    });
    if let Some(key) = extended {
        return Err(Error::bad_file(
            path,
            format!(
                "{key}: a LyCORIS LoCon file with DoRA (dora_scale), Tucker (lora_mid) or norm \
                 (w_norm / b_norm, train_norm) tensors; this tool handles plain \
                 lora_down/lora_up modules only; to merge it into a checkpoint use \
                 lycoris-lora's own merge (tools/merge.py of the LyCORIS repository); \
                 check-lora lists its weights"
            ),
        ));
    }
    let mut modules = BTreeMap::new();
    for key in file.tensors.keys() {
        if let Some(name) = key.strip_suffix(".lora_down.weight") {
            let up = format!("{name}.lora_up.weight");
            if !file.tensors.contains_key(&up) {
                return Err(Error::bad_file(
                    path,
                    format!("module {name} has lora_down but no lora_up weights"),
                ));
            }
            let alpha = format!("{name}.alpha");
            modules.insert(
                name.to_string(),
                ModuleKeys {
                    name: name.to_string(),
                    down: key.clone(),
                    alpha: file.tensors.contains_key(&alpha).then_some(alpha),
                    up,
                },
            );
        }
    }
    if modules.is_empty() {
        return Err(not_a_lora(file, path));
    }
    Ok(modules)
}

/// The error for a file without kohya LoRA modules.
pub fn not_a_lora(file: &TensorFile, path: &Path) -> Error {
    let lycoris = file.tensors.keys().any(|k| {
        LYCORIS_SUFFIXES
            .iter()
            .any(|s| k.ends_with(&format!("{s}.weight")) || k.ends_with(s))
    });
    let checkpoint = file
        .tensors
        .keys()
        .any(|k| k.starts_with("model.diffusion_model.") || k.starts_with("first_stage_model."));
    let what = if lycoris {
        "a LyCORIS file (LoHa/LoKr/...): this tool handles kohya lora_down/lora_up modules only, \
         as the sd-scripts script does; to merge it into a checkpoint use lycoris-lora's own \
         merge (tools/merge.py of the LyCORIS repository, lycoris.utils.merge); check-lora \
         lists its weights"
    } else if checkpoint {
        "a Stable Diffusion checkpoint, not a LoRA: pass the LoRA .safetensors file"
    } else {
        "not a LoRA: no `<module>.lora_down.weight` / `.lora_up.weight` tensors"
    };
    Error::bad_file(path, what.to_string())
}

/// A weight `[out, ...]` as `out x rest` plus its shape, or `None` for a scalar.
pub fn delta_of(file: &TensorFile, keys: &ModuleKeys) -> (Vec<f32>, usize, usize, usize) {
    let down = &file.tensors[&keys.down];
    let up = &file.tensors[&keys.up];
    let rank = down.shape[0];
    let (out, _) = up.matrix_dims();
    let cols = down.data.len() / rank.max(1);
    let mut product = vec![0f32; out * cols];
    for o in 0..out {
        for r in 0..rank {
            let u = up.data[o * rank + r];
            if u == 0.0 {
                continue;
            }
            let row = &down.data[r * cols..(r + 1) * cols];
            let target = &mut product[o * cols..(o + 1) * cols];
            for (t, d) in target.iter_mut().zip(row) {
                *t += u * d;
            }
        }
    }
    (product, out, cols, rank)
}

/// Where a LoRA module's weight lives in a single-file checkpoint: the full tensor name, and for
/// OpenCLIP's fused `in_proj` the first row of the module's slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSlot {
    /// Stored tensor name.
    pub key: String,
    /// First row of the slice (q: 0, k: width, v: 2 x width) within a fused `in_proj_weight`.
    pub row_offset: Option<usize>,
    /// Rows of the slice (the fused weight's width), with `row_offset`.
    pub rows: Option<usize>,
    /// A UNet layer of a resnet, downsample or upsample block (LoRA modules there only with
    /// `conv_dim`, sd-scripts' C3Lier).
    pub conv_block: bool,
}

/// The LoRA module names sd-scripts creates for a single-file checkpoint, each with the stored
/// tensor it changes: the UNet layers inside transformer, resnet, down- and upsample blocks,
/// and the text encoders' attention projections and MLP linears.
pub fn module_slots(
    checkpoint_path: &Path,
    names: &std::collections::BTreeSet<String>,
) -> Result<(ModelFamily, BTreeMap<String, WeightSlot>)> {
    let checkpoint = Checkpoint::open(checkpoint_path)?;
    if checkpoint_path.is_dir() {
        return Err(Error::bad_file(
            checkpoint_path,
            "a diffusers folder; pass a single-file .safetensors checkpoint (as merge_lora.py)",
        ));
    }
    let family = checkpoint.family();
    let mapping = crate::models::unet::ldm_mapping(family);
    let vb = checkpoint.var_builder(
        Component::Unet,
        candle_core::DType::F16,
        &candle_core::Device::Cpu,
        &mapping,
    )?;
    let mut unet = crate::models::unet::Unet::load(&vb, candle_core::DType::F16).map_err(|e| {
        Error::bad_file(
            checkpoint_path,
            format!("not an SD1.x/SD2.x/SDXL checkpoint with a UNet: {e}"),
        )
    })?;
    let mut slots = BTreeMap::new();
    use crate::models::adapter::{Adaptable, Container};
    unet.visit_layers(&mut |layer| {
        if layer.container == Container::Other {
            return;
        }
        let name = crate::networks::lora::unet_lora_name(&layer.path);
        let stored = if family == ModelFamily::Sdxl {
            layer.path.clone()
        } else {
            mapping(&layer.path)
        };
        slots.insert(
            name,
            WeightSlot {
                key: format!("model.diffusion_model.{stored}.weight"),
                row_offset: None,
                rows: None,
                conv_block: layer.container != Container::Transformer,
            },
        );
    });
    drop(unet);
    let stored: std::collections::BTreeSet<String> = safetensors_names(checkpoint_path)?;
    for name in names {
        if let Some(slot) = text_encoder_slot(family, name, &stored, &checkpoint)? {
            slots.insert(name.clone(), slot);
        }
    }
    Ok((family, slots))
}

fn safetensors_names(path: &Path) -> Result<std::collections::BTreeSet<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let mut len = [0u8; 8];
    use std::io::Read;
    reader
        .read_exact(&mut len)
        .map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len) as usize;
    if len > 100_000_000 {
        return Err(Error::bad_file(
            path,
            "not a safetensors file (header too long)",
        ));
    }
    let mut header = vec![0u8; len];
    reader
        .read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::bad_file(path, format!("unreadable safetensors header ({e})")))?;
    Ok(value
        .as_object()
        .map(|m| m.keys().filter(|k| *k != "__metadata__").cloned().collect())
        .unwrap_or_default())
}

/// The stored weight of a text-encoder LoRA module (`lora_te_`, `lora_te1_`, `lora_te2_`).
fn text_encoder_slot(
    family: ModelFamily,
    name: &str,
    stored: &std::collections::BTreeSet<String>,
    checkpoint: &Checkpoint,
) -> Result<Option<WeightSlot>> {
    static PATTERN: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"^lora_(te|te1|te2)_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc(1|2))$",
        )
        .expect("valid pattern")
    });
    let Some(found) = PATTERN.captures(name) else {
        return Ok(None);
    };
    let component = match (&found[1], family) {
        ("te", ModelFamily::Sd1 | ModelFamily::Sd2) | ("te1", ModelFamily::Sdxl) => {
            Component::TextEncoder
        }
        ("te2", ModelFamily::Sdxl) => Component::TextEncoder2,
        _ => return Ok(None),
    };
    let Some(prefix) = crate::models::checkpoint::ldm_prefix(family, component) else {
        return Ok(None);
    };
    let layer = &found[2];
    let hf_inner = if let Some(fc) = found.get(5) {
        format!("mlp.fc{}", fc.as_str())
    } else {
        format!("self_attn.{}_proj", &found[4])
    };
    let hf = format!("text_model.encoder.layers.{layer}.{hf_inner}.weight");
    for layout in [WeightLayout::Hf, WeightLayout::HfFlat] {
        let key = format!("{prefix}{}", clip_ldm_name(layout, &hf));
        if stored.contains(&key) {
            return Ok(Some(WeightSlot {
                key,
                row_offset: None,
                rows: None,
                conv_block: false,
            }));
        }
    }
    // OpenCLIP: q/k/v are row blocks of the fused in_proj weight.
    if let Some(qkv) = found.get(4).filter(|m| m.as_str() != "out") {
        let key = format!("{prefix}transformer.resblocks.{layer}.attn.in_proj_weight");
        if stored.contains(&key) {
            let fused = checkpoint.tensor(component, &key[prefix.len()..])?;
            let width = fused.dim(1).map_err(|e| Error::Model(e.to_string()))?;
            let index = match qkv.as_str() {
                "q" => 0,
                "k" => 1,
                _ => 2,
            };
            return Ok(Some(WeightSlot {
                key,
                row_offset: Some(index * width),
                rows: Some(width),
                conv_block: false,
            }));
        }
    }
    let key = format!("{prefix}{}", clip_ldm_name(WeightLayout::OpenClip, &hf));
    Ok(stored.contains(&key).then_some(WeightSlot {
        key,
        row_offset: None,
        rows: None,
        conv_block: false,
    }))
}

/// Every text-encoder LoRA module name sd-scripts could create for `family` (those a
/// checkpoint lacks are dropped by [`module_slots`]); SD2 drops OpenCLIP's last layer as
/// sd-scripts' converted text encoder does.
pub fn text_encoder_names(family: ModelFamily, layers: usize) -> Vec<String> {
    let prefixes: &[&str] = match family {
        ModelFamily::Sdxl => &["lora_te1_", "lora_te2_"],
        _ => &["lora_te_"],
    };
    let mut names = Vec::new();
    for prefix in prefixes {
        for layer in 0..layers {
            for part in [
                "self_attn_q_proj",
                "self_attn_k_proj",
                "self_attn_v_proj",
                "self_attn_out_proj",
                "mlp_fc1",
                "mlp_fc2",
            ] {
                names.push(format!("{prefix}text_model_encoder_layers_{layer}_{part}"));
            }
        }
    }
    names
}

/// `"True"` / `"False"`.
pub fn py_bool(value: bool) -> String {
    if value { "True" } else { "False" }.to_string()
}

/// sd-scripts' `sai_model_spec.build_metadata` fields for the tools' outputs (LoRA or
/// checkpoint), without the optional ones they leave out.
pub fn modelspec(
    family: ModelFamily,
    v_parameterization: bool,
    lora: bool,
    title: &str,
    merged_from: Option<String>,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let sdxl = family == ModelFamily::Sdxl;
    let base = match (family, v_parameterization) {
        (ModelFamily::Sd1, _) => "stable-diffusion-v1",
        (ModelFamily::Sd2, false) => "stable-diffusion-v2-512",
        (ModelFamily::Sd2, true) => "stable-diffusion-v2-768-v",
        (ModelFamily::Sdxl, _) => "stable-diffusion-xl-v1-base",
    };
    let architecture = if lora {
        format!("{base}/lora")
    } else {
        base.to_string()
    };
    let implementation = if (lora && sdxl) || !lora {
        "https://github.com/Stability-AI/generative-models"
    } else {
        "diffusers"
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let reso = if sdxl {
        "1024x1024"
    } else if family == ModelFamily::Sd2 && v_parameterization {
        "768x768"
    } else {
        "512x512"
    };
    m.insert("modelspec.sai_model_spec".into(), "1.0.1".into());
    m.insert("modelspec.architecture".into(), architecture);
    m.insert("modelspec.implementation".into(), implementation.into());
    m.insert("modelspec.title".into(), title.to_string());
    m.insert("modelspec.resolution".into(), reso.into());
    m.insert(
        "modelspec.prediction_type".into(),
        if v_parameterization { "v" } else { "epsilon" }.into(),
    );
    m.insert(
        "modelspec.implementation_version".into(),
        format!("lorakit/{}", env!("CARGO_PKG_VERSION")),
    );
    m.insert(
        "modelspec.date".into(),
        crate::stages::train_lora::metadata::iso_date(now),
    );
    if let Some(merged_from) = merged_from {
        m.insert("modelspec.merged_from".into(), merged_from);
    }
    m
}

/// sd-scripts' `build_merged_from`: each file's `modelspec.title`, else its stem, joined with
/// `, `.
pub fn merged_from(files: &[(&Path, &BTreeMap<String, String>)]) -> String {
    files
        .iter()
        .map(|(path, metadata)| {
            metadata
                .get("modelspec.title")
                .cloned()
                .unwrap_or_else(|| title_of(path))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The stem of an output path (`modelspec.title`).
pub fn title_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
