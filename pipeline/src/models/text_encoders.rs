//! The text encoder(s) of a model, loaded through [`Checkpoint`]: a single-file LDM checkpoint
//! (SD1.x, SD2.x, SDXL), a diffusers folder, or a standalone `CLIPTextModel` file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::adapter::Adaptable;
use super::checkpoint::{Checkpoint, Component, ModelFamily};
use super::clip::{infer_config, ldm_name, read_config_hints, ClipTextModel, WeightLayout};
use crate::text::tokenize::Padding;
use crate::{infra::hashing, Error, Result};

/// Width of SD2's OpenCLIP ViT-H text encoder (tells SD2 from SD1 in text-encoder-only files).
const SD2_WIDTH: usize = 1024;

/// The loaded text encoder(s) of a model.
pub struct TextEncoders {
    /// The detected family.
    pub family: ModelFamily,
    /// One encoder (SD1/SD2) or two (SDXL, encoder 2 with its projection).
    pub encoders: Vec<ClipTextModel>,
    /// Hash of the text-encoder tensors only (names, dtypes, shapes, data), so a cache keyed
    /// on it survives UNet/VAE changes of the same file.
    pub weights_hash: String,
}

impl TextEncoders {
    /// Stores every linear weight transposed, for encoding only
    /// ([`Adaptable::use_inference_layout`]).
    pub fn use_inference_layout(&mut self) -> Result<()> {
        for encoder in self.encoders.iter_mut() {
            encoder
                .use_inference_layout()
                .map_err(|e| Error::Model(format!("text encoder inference layout: {e}")))?;
        }
        Ok(())
    }
}

/// Padding of each encoder's tokenizer (docs/kohya-compat.md#tokenizer-padding).
pub fn paddings(family: ModelFamily) -> &'static [Padding] {
    match family {
        ModelFamily::Sd1 => &[Padding::Eos],
        ModelFamily::Sd2 => &[Padding::Zero],
        ModelFamily::Sdxl => &[Padding::Eos, Padding::Zero],
    }
}

/// Opens `model` and loads its text encoder(s) in `dtype` on `device`.
pub fn load_text_encoders(model: &Path, dtype: DType, device: &Device) -> Result<TextEncoders> {
    text_encoders_of(&Checkpoint::open(model)?, dtype, device)
}

/// Loads the text encoder(s) of an opened checkpoint.
pub fn text_encoders_of(
    checkpoint: &Checkpoint,
    dtype: DType,
    device: &Device,
) -> Result<TextEncoders> {
    if !checkpoint.has(Component::TextEncoder) {
        return Err(Error::bad_file(
            checkpoint.path(),
            "no text encoder in this checkpoint (no cond_stage_model.*, conditioner.embedders.*, \
             text_encoder/ or text_model.* tensors); pass a full SD checkpoint or a diffusers \
             model folder",
        ));
    }
    let components: &[Component] = match checkpoint.family() {
        ModelFamily::Sdxl => &[Component::TextEncoder, Component::TextEncoder2],
        _ => &[Component::TextEncoder],
    };
    let mut family = checkpoint.family();
    let mut hash = hashing::KeyBuilder::new("text-encoder-weights", 1);
    let mut encoders = Vec::with_capacity(components.len());
    for &component in components {
        let encoder = load_encoder(checkpoint, component, family, dtype, device)?;
        if family == ModelFamily::Sd1 && encoder.config().hidden_size == SD2_WIDTH {
            family = ModelFamily::Sd2;
        }
        hash.text("encoder", &checkpoint.component_hash(component)?);
        encoders.push(encoder);
    }
    Ok(TextEncoders {
        family,
        encoders,
        weights_hash: hash.finish(),
    })
}

/// How the component's tensors are named.
fn layout_of(
    checkpoint: &Checkpoint,
    component: Component,
    names: &HashSet<String>,
) -> Result<WeightLayout> {
    Ok(if !checkpoint.uses_ldm_names(component)? {
        WeightLayout::Hf
    } else if names.contains("token_embedding.weight") {
        WeightLayout::OpenClip
    } else if names.iter().any(|n| n.starts_with("text_model.")) {
        WeightLayout::Hf
    } else {
        WeightLayout::HfFlat
    })
}

/// Architecture hints that tensor shapes cannot give: the diffusers `config.json` of the
/// component, or the matching section of a lorakit `arch.json` beside a single file.
fn config_hints(
    checkpoint: &Checkpoint,
    component: Component,
) -> Result<Option<serde_json::Value>> {
    let path = checkpoint.path();
    if path.is_dir() {
        let config: PathBuf = path.join(component.diffusers_folder()).join("config.json");
        return read_config_hints(&config, None);
    }
    read_config_hints(
        &path.with_file_name("arch.json"),
        Some(component.diffusers_folder()),
    )
}

fn load_encoder(
    checkpoint: &Checkpoint,
    component: Component,
    family: ModelFamily,
    dtype: DType,
    device: &Device,
) -> Result<ClipTextModel> {
    let names: HashSet<String> = checkpoint.tensor_names(component)?.into_iter().collect();
    let layout = layout_of(checkpoint, component, &names)?;
    let stored = |hf_name: &str| ldm_name(layout, hf_name);
    let dims = |hf_name: &str| -> Result<Vec<usize>> {
        Ok(checkpoint
            .tensor(component, &stored(hf_name))?
            .dims()
            .to_vec())
    };
    let width = dims("text_model.final_layer_norm.weight")?[0];
    let positions = dims("text_model.embeddings.position_embedding.weight")?[0];
    let intermediate = dims("text_model.encoder.layers.0.mlp.fc1.bias")?[0];
    let vocab = dims("text_model.embeddings.token_embedding.weight")?[0];
    let stored_layers = (0..)
        .take_while(|i| {
            names.contains(&stored(&format!(
                "text_model.encoder.layers.{i}.layer_norm1.weight"
            )))
        })
        .count();
    // sd-scripts builds SD2's encoder without the 24th OpenCLIP layer
    // (docs/kohya-compat.md#sd2-text-encoder-layers).
    let dropped = usize::from(family == ModelFamily::Sd2 && layout == WeightLayout::OpenClip);
    let config = infer_config(
        (vocab, width),
        positions,
        intermediate,
        stored_layers.saturating_sub(dropped),
        layout,
        config_hints(checkpoint, component)?.as_ref(),
    )?;
    let mapping = move |hf_name: &str| ldm_name(layout, hf_name);
    let vb = checkpoint.var_builder(component, dtype, device, &mapping)?;
    ClipTextModel::load(vb, &config, layout, component == Component::TextEncoder2)
        .map_err(|e| Error::bad_file(checkpoint.path(), e.to_string()))
}
