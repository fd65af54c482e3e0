//! Finding and loading the text encoder(s) of a model: a single-file LDM checkpoint (SD1.x,
//! SD2.x, SDXL), a diffusers folder, or a standalone `CLIPTextModel` `.safetensors` file.
//! The family is told by tensor names and shapes, never by file names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::clip::{infer_config, ldm_name, read_config_hints, ClipTextModel, WeightLayout};
use crate::tokenize::Padding;
use crate::{hashing, Error, Result};

/// Which Stable Diffusion generation the text encoders belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderFamily {
    /// SD1.x: one OpenAI CLIP ViT-L encoder.
    Sd1,
    /// SD2.x: one OpenCLIP ViT-H encoder (23 of its 24 layers).
    Sd2,
    /// SDXL: CLIP ViT-L + OpenCLIP ViT-bigG with projection.
    Sdxl,
}

impl TextEncoderFamily {
    /// Lower-case name used in manifests and messages.
    pub fn name(self) -> &'static str {
        match self {
            TextEncoderFamily::Sd1 => "sd1",
            TextEncoderFamily::Sd2 => "sd2",
            TextEncoderFamily::Sdxl => "sdxl",
        }
    }

    /// Padding of each encoder's tokenizer (spec §7.1).
    pub fn paddings(self) -> &'static [Padding] {
        match self {
            TextEncoderFamily::Sd1 => &[Padding::Eos],
            TextEncoderFamily::Sd2 => &[Padding::Zero],
            TextEncoderFamily::Sdxl => &[Padding::Eos, Padding::Zero],
        }
    }
}

/// The loaded text encoder(s) of a model.
pub struct TextEncoders {
    /// The detected family.
    pub family: TextEncoderFamily,
    /// One encoder (SD1/SD2) or two (SDXL, encoder 2 with its projection).
    pub encoders: Vec<ClipTextModel>,
    /// Hash of the text-encoder tensors only (names, dtypes, shapes, data), so a cache keyed
    /// on it survives UNet/VAE changes of the same file.
    pub weights_hash: String,
}

/// Where one encoder's tensors live.
struct EncoderSource {
    file: Arc<MmapedSafetensors>,
    path: PathBuf,
    prefix: String,
    layout: WeightLayout,
    hints: Option<serde_json::Value>,
    /// Layers in the file that the model does not use (SD2's 24th OpenCLIP layer).
    dropped_layers: usize,
    with_projection: bool,
}

/// Loads the text encoder(s) of `model` in `dtype` on `device`.
pub fn load_text_encoders(model: &Path, dtype: DType, device: &Device) -> Result<TextEncoders> {
    let (family, sources) = locate(model)?;
    let mut hash = hashing::KeyBuilder::new("text-encoder-weights", 1);
    let mut encoders = Vec::with_capacity(sources.len());
    for source in &sources {
        hash.text("encoder", &tensor_data_hash(source)?);
        encoders.push(load_encoder(source, dtype, device)?);
    }
    Ok(TextEncoders {
        family,
        encoders,
        weights_hash: hash.finish(),
    })
}

fn open_safetensors(path: &Path) -> Result<Arc<MmapedSafetensors>> {
    // SAFETY: the file is mapped read-only; lorakit never writes model files while reading them.
    let file = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
        Error::bad_file(
            path,
            format!("cannot read as .safetensors ({e}); .ckpt/.pt files must be converted to .safetensors first"),
        )
    })?;
    Ok(Arc::new(file))
}

fn has(file: &MmapedSafetensors, name: &str) -> bool {
    file.get(name).is_ok()
}

fn locate(model: &Path) -> Result<(TextEncoderFamily, Vec<EncoderSource>)> {
    if model.is_dir() {
        return locate_diffusers(model);
    }
    if !model.is_file() {
        return Err(Error::bad_file(model, "model not found"));
    }
    let file = open_safetensors(model)?;
    let arch = model.with_file_name("arch.json");
    let source =
        |prefix: &str, layout, section, dropped_layers, with_projection| -> Result<EncoderSource> {
            Ok(EncoderSource {
                file: file.clone(),
                path: model.to_path_buf(),
                prefix: prefix.to_string(),
                layout,
                hints: read_config_hints(&arch, Some(section))?,
                dropped_layers,
                with_projection,
            })
        };
    if has(
        &file,
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    ) && has(
        &file,
        "conditioner.embedders.1.model.token_embedding.weight",
    ) {
        return Ok((
            TextEncoderFamily::Sdxl,
            vec![
                source(
                    "conditioner.embedders.0.transformer.",
                    WeightLayout::Hf,
                    "text_encoder",
                    0,
                    false,
                )?,
                source(
                    "conditioner.embedders.1.model.",
                    WeightLayout::OpenClip,
                    "text_encoder_2",
                    0,
                    true,
                )?,
            ],
        ));
    }
    if has(&file, "cond_stage_model.model.token_embedding.weight") {
        return Ok((
            TextEncoderFamily::Sd2,
            vec![source(
                "cond_stage_model.model.",
                WeightLayout::OpenClip,
                "text_encoder",
                1,
                false,
            )?],
        ));
    }
    for (prefix, layout) in [
        ("cond_stage_model.transformer.", WeightLayout::Hf),
        ("cond_stage_model.transformer.", WeightLayout::HfFlat),
        ("", WeightLayout::Hf),
    ] {
        let probe = format!(
            "{prefix}{}",
            ldm_name(layout, "text_model.embeddings.token_embedding.weight")
        );
        if has(&file, &probe) {
            let width = file
                .get(&probe)
                .map(|view| view.shape().get(1).copied().unwrap_or(0))
                .unwrap_or(0);
            // A standalone HF text-encoder file of width 1024 is SD2's.
            let family = if prefix.is_empty() && width == 1024 {
                TextEncoderFamily::Sd2
            } else {
                TextEncoderFamily::Sd1
            };
            return Ok((
                family,
                vec![source(prefix, layout, "text_encoder", 0, false)?],
            ));
        }
    }
    Err(Error::bad_file(
        model,
        "no text encoder in this checkpoint (looked for cond_stage_model.*, conditioner.embedders.* \
         and text_model.* tensors); pass a full SD checkpoint or a diffusers model folder",
    ))
}

fn locate_diffusers(model: &Path) -> Result<(TextEncoderFamily, Vec<EncoderSource>)> {
    let component = |folder: &str, with_projection: bool| -> Result<Option<EncoderSource>> {
        let dir = model.join(folder);
        if !dir.is_dir() {
            return Ok(None);
        }
        let weights = ["model.safetensors", "model.fp16.safetensors"]
            .iter()
            .map(|name| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| {
                Error::bad_file(
                    &dir,
                    "no model.safetensors in this text-encoder folder (.bin weights are not read; convert them)",
                )
            })?;
        Ok(Some(EncoderSource {
            file: open_safetensors(&weights)?,
            path: weights,
            prefix: String::new(),
            layout: WeightLayout::Hf,
            hints: read_config_hints(&dir.join("config.json"), None)?,
            dropped_layers: 0,
            with_projection,
        }))
    };
    let first = component("text_encoder", false)?.ok_or_else(|| {
        Error::bad_file(model, "this model folder has no text_encoder/ subfolder")
    })?;
    if let Some(second) = component("text_encoder_2", true)? {
        return Ok((TextEncoderFamily::Sdxl, vec![first, second]));
    }
    let width = first
        .file
        .get("text_model.embeddings.token_embedding.weight")
        .map(|view| view.shape().get(1).copied().unwrap_or(0))
        .unwrap_or(0);
    let family = if width == 1024 {
        TextEncoderFamily::Sd2
    } else {
        TextEncoderFamily::Sd1
    };
    Ok((family, vec![first]))
}

impl EncoderSource {
    fn name(&self, hf_name: &str) -> String {
        format!("{}{}", self.prefix, ldm_name(self.layout, hf_name))
    }

    fn shape(&self, hf_name: &str) -> Result<Vec<usize>> {
        let name = self.name(hf_name);
        self.file
            .get(&name)
            .map(|view| view.shape().to_vec())
            .map_err(|_| {
                Error::bad_file(&self.path, format!("text-encoder tensor {name} is missing"))
            })
    }

    fn layer_count(&self) -> usize {
        let probe =
            |i: usize| self.name(&format!("text_model.encoder.layers.{i}.layer_norm1.weight"));
        (0..).take_while(|&i| has(&self.file, &probe(i))).count()
    }
}

fn load_encoder(source: &EncoderSource, dtype: DType, device: &Device) -> Result<ClipTextModel> {
    let embedding = source.shape("text_model.embeddings.token_embedding.weight")?;
    let positions = source.shape("text_model.embeddings.position_embedding.weight")?;
    let mlp = source.shape("text_model.encoder.layers.0.mlp.fc1.weight")?;
    let layers = source.layer_count().saturating_sub(source.dropped_layers);
    let (&[vocab, width], &[position_count, _], &[intermediate, _]) =
        (embedding.as_slice(), positions.as_slice(), mlp.as_slice())
    else {
        return Err(Error::bad_file(
            &source.path,
            "text-encoder embedding tensors have unexpected ranks",
        ));
    };
    let config = infer_config(
        (vocab, width),
        position_count,
        intermediate,
        layers,
        source.layout,
        source.hints.as_ref(),
    )?;
    let backend = MappedTensors {
        file: source.file.clone(),
        prefix: source.prefix.clone(),
        layout: source.layout,
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    ClipTextModel::load(vb, &config, source.layout, source.with_projection)
        .map_err(|e| Error::bad_file(&source.path, e.to_string()))
}

/// Hash of every tensor under the encoder's prefix: names, dtypes, shapes and bytes.
fn tensor_data_hash(source: &EncoderSource) -> Result<String> {
    let mut names: Vec<_> = source
        .file
        .tensors()
        .into_iter()
        .filter(|(name, _)| name.starts_with(&source.prefix) && !name.ends_with("position_ids"))
        .collect();
    if source.prefix.is_empty() {
        names.retain(|(name, _)| {
            name.starts_with("text_model.") || name == "text_projection.weight"
        });
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = blake3::Hasher::new();
    for (name, view) in names {
        let name = &name[source.prefix.len()..];
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}{:?}", view.dtype(), view.shape()).as_bytes());
        hasher.update(view.data());
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// A candle backend serving Hugging Face names from a single-file checkpoint through
/// [`ldm_name`].
struct MappedTensors {
    file: Arc<MmapedSafetensors>,
    prefix: String,
    layout: WeightLayout,
}

impl MappedTensors {
    fn full_name(&self, name: &str) -> String {
        format!("{}{}", self.prefix, ldm_name(self.layout, name))
    }
}

impl SimpleBackend for MappedTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "tensor {} has shape {:?}, expected {:?}",
                self.full_name(name),
                tensor.dims(),
                shape.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let full = self.full_name(name);
        self.file
            .load(&full, device)
            .map_err(|_| candle_core::Error::Msg(format!("tensor {full} is missing")))?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        has(&self.file, &self.full_name(name))
    }
}
