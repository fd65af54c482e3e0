//! The CLIP text transformer of SD1.x, SD2.x and SDXL, and sd-scripts' ways of turning its
//! hidden states into UNet conditioning (clip skip, 75-token chunks stitched to `75n + 2`,
//! caption weights, SDXL's two encoders and pooled output).
//!
//! Our own module rather than candle-transformers' CLIP: the encoders must expose any layer's
//! hidden state, support both activations (`quick_gelu` for OpenAI CLIP, erf `gelu` for
//! OpenCLIP) at any width (the test models are tiny), and load OpenCLIP's fused attention
//! weights without a converted copy.

use std::path::Path;

use candle_core::{DType, IndexOp, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::models::adapter::{Adaptable, AdaptableLayer, AdaptableNorm, Container, NormType};
use crate::models::attention::causal_multi_head_attention;
use crate::models::frozen::FrozenKind;
use crate::models::norm::Norm;
use crate::models::recompute::{checkpointed, Recomputable};
use crate::{Error, Result};

/// Hidden size per attention head in every released SD text encoder.
const STANDARD_HEAD_DIM: usize = 64;
/// Layer-norm epsilon of every CLIP text encoder.
const LAYER_NORM_EPS: f64 = 1e-5;

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP: SD1.x, SDXL encoder 1).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP: SD2.x, SDXL encoder 2).
    Gelu,
}

impl ClipActivation {
    /// Parses a Hugging Face `hidden_act` value.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(ClipActivation::QuickGelu),
            "gelu" => Some(ClipActivation::Gelu),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            ClipActivation::QuickGelu => crate::models::kernels::quick_gelu(x),
            ClipActivation::Gelu => crate::models::kernels::gelu_erf(x),
        }
    }
}

/// Shape of a CLIP text transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    /// Vocabulary size (49408).
    pub vocab_size: usize,
    /// Width of the residual stream (768 SD1, 1024 SD2, 1280 SDXL encoder 2).
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Positions (77).
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub activation: ClipActivation,
}

/// How a checkpoint names (and packs) the text-encoder tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// Hugging Face `CLIPTextModel` names (`text_model.encoder.layers.N...`): SD1.x single
    /// files, SDXL encoder 1, every diffusers folder.
    Hf,
    /// Like [`WeightLayout::Hf`] without the `text_model.` level (some SD1.x checkpoints).
    HfFlat,
    /// OpenCLIP names (`transformer.resblocks.N...`, fused `attn.in_proj_*`): SD2.x and SDXL
    /// encoder 2 single files.
    OpenClip,
}

/// Maps a Hugging Face text-encoder tensor name to its name inside a single-file checkpoint's
/// text-encoder component, without the component prefix.
///
/// For [`WeightLayout::OpenClip`] the attention projections are requested as the fused
/// `text_model.encoder.layers.N.self_attn.in_proj_weight` / `in_proj_bias`.
pub fn ldm_name(layout: WeightLayout, hf_name: &str) -> String {
    match layout {
        WeightLayout::Hf => hf_name.to_string(),
        WeightLayout::HfFlat => hf_name
            .strip_prefix("text_model.")
            .unwrap_or(hf_name)
            .to_string(),
        WeightLayout::OpenClip => open_clip_name(hf_name),
    }
}

fn open_clip_name(hf_name: &str) -> String {
    if hf_name == "text_projection.weight" {
        return "text_projection".into();
    }
    let name = hf_name.strip_prefix("text_model.").unwrap_or(hf_name);
    if name == "embeddings.token_embedding.weight" {
        return "token_embedding.weight".into();
    }
    if name == "embeddings.position_embedding.weight" {
        return "positional_embedding".into();
    }
    if let Some(rest) = name.strip_prefix("final_layer_norm.") {
        return format!("ln_final.{rest}");
    }
    if let Some(rest) = name.strip_prefix("encoder.layers.") {
        let (index, inner) = rest.split_once('.').unwrap_or((rest, ""));
        let inner = [
            ("layer_norm1.", "ln_1."),
            ("layer_norm2.", "ln_2."),
            ("mlp.fc1.", "mlp.c_fc."),
            ("mlp.fc2.", "mlp.c_proj."),
            ("self_attn.out_proj.", "attn.out_proj."),
            ("self_attn.in_proj_", "attn.in_proj_"),
        ]
        .iter()
        .find_map(|(hf, open)| inner.strip_prefix(hf).map(|tail| format!("{open}{tail}")))
        .unwrap_or_else(|| inner.to_string());
        return format!("transformer.resblocks.{index}.{inner}");
    }
    name.to_string()
}

/// A frozen linear layer of the transformer, named by its Hugging Face module path (e.g.
/// `text_model.encoder.layers.0.self_attn.q_proj`) for a LoRA module to attach to.
fn adaptable(vb: &VarBuilder, weight: Tensor, bias: Tensor) -> AdaptableLayer {
    AdaptableLayer::new(
        vb.prefix(),
        Container::TextEncoder,
        weight,
        Some(bias),
        FrozenKind::Linear,
    )
}

/// A linear layer `in -> out` with bias at `vb`.
fn linear(
    vb: VarBuilder,
    (inputs, outputs): (usize, usize),
) -> candle_core::Result<AdaptableLayer> {
    let weight = vb.get((outputs, inputs), "weight")?;
    let bias = vb.get(outputs, "bias")?;
    Ok(adaptable(&vb, weight, bias))
}

fn layer_norm(vb: VarBuilder, width: usize) -> candle_core::Result<Norm> {
    Ok(Norm::new(
        vb.get(width, "weight")?,
        vb.get(width, "bias")?,
        LAYER_NORM_EPS,
    ))
}

/// A layer norm of an encoder layer, named by its Hugging Face module path, that can take a
/// trainable change.
fn adaptable_layer_norm(vb: VarBuilder, width: usize) -> candle_core::Result<AdaptableNorm> {
    let path = vb.prefix();
    let norm = layer_norm(vb, width)?;
    Ok(AdaptableNorm::new(
        path,
        Container::TextEncoder,
        norm,
        NormType::Layer,
    ))
}

fn model_error(context: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Model(format!("{context}: {e}"))
}

#[derive(Clone)]
struct Attention {
    q_proj: AdaptableLayer,
    k_proj: AdaptableLayer,
    v_proj: AdaptableLayer,
    out_proj: AdaptableLayer,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(
        vb: VarBuilder,
        config: &ClipTextConfig,
        layout: WeightLayout,
    ) -> candle_core::Result<Self> {
        let width = config.hidden_size;
        let (q_proj, k_proj, v_proj) = if layout == WeightLayout::OpenClip {
            let weight = vb.get((3 * width, width), "in_proj_weight")?;
            let bias = vb.get(3 * width, "in_proj_bias")?;
            let part = |i: usize, name: &str| -> candle_core::Result<AdaptableLayer> {
                Ok(adaptable(
                    &vb.pp(name),
                    weight.narrow(0, i * width, width)?.contiguous()?,
                    bias.narrow(0, i * width, width)?.contiguous()?,
                ))
            };
            (part(0, "q_proj")?, part(1, "k_proj")?, part(2, "v_proj")?)
        } else {
            let proj = |name: &str| linear(vb.pp(name), (width, width));
            (proj("q_proj")?, proj("k_proj")?, proj("v_proj")?)
        };
        Ok(Attention {
            q_proj,
            k_proj,
            v_proj,
            out_proj: linear(vb.pp("out_proj"), (width, width))?,
            heads: config.num_attention_heads,
            head_dim: width / config.num_attention_heads,
        })
    }

    /// Causal self-attention (each token sees itself and the tokens before it).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let out = causal_multi_head_attention(&q, &k, &v, self.heads, scale)?;
        self.out_proj.forward(&out)
    }

    fn visit(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        // Hugging Face's `CLIPAttention` order (sd-scripts' module order).
        for layer in [
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.q_proj,
            &mut self.out_proj,
        ] {
            f(layer);
        }
    }
}

#[derive(Clone)]
struct EncoderLayer {
    layer_norm1: AdaptableNorm,
    attention: Attention,
    layer_norm2: AdaptableNorm,
    fc1: AdaptableLayer,
    fc2: AdaptableLayer,
    activation: ClipActivation,
}

impl EncoderLayer {
    fn load(
        vb: VarBuilder,
        config: &ClipTextConfig,
        layout: WeightLayout,
    ) -> candle_core::Result<Self> {
        let width = config.hidden_size;
        Ok(EncoderLayer {
            layer_norm1: adaptable_layer_norm(vb.pp("layer_norm1"), width)?,
            attention: Attention::load(vb.pp("self_attn"), config, layout)?,
            layer_norm2: adaptable_layer_norm(vb.pp("layer_norm2"), width)?,
            fc1: linear(vb.pp("mlp.fc1"), (width, config.intermediate_size))?,
            fc2: linear(vb.pp("mlp.fc2"), (config.intermediate_size, width))?,
            activation: config.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let attended = self.attention.forward(&self.layer_norm1.forward(x)?)?;
        let x = (x + attended)?;
        let hidden = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let mlp = self.fc2.forward(&self.activation.apply(&hidden)?)?;
        x + mlp
    }
}

impl Recomputable for EncoderLayer {
    /// A CLIP layer has no conditioning: the slot holds an empty tensor.
    fn run(&self, x: &Tensor, _no_condition: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x)
    }
}

/// A CLIP text transformer (Hugging Face `CLIPTextModel`, optionally with the
/// `text_projection` of `CLIPTextModelWithProjection`).
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: Norm,
    text_projection: Option<Linear>,
    /// Whether each transformer layer runs with gradient checkpointing.
    gradient_checkpointing: bool,
}

impl Adaptable for ClipTextModel {
    fn visit_layers(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        for layer in &mut self.layers {
            layer.attention.visit(f);
            f(&mut layer.fc1);
            f(&mut layer.fc2);
        }
    }

    fn visit_norms(&mut self, f: &mut dyn FnMut(&mut AdaptableNorm)) {
        for layer in &mut self.layers {
            f(&mut layer.layer_norm1);
            f(&mut layer.layer_norm2);
        }
    }
}

impl ClipTextModel {
    /// Builds the model from a `VarBuilder` that serves Hugging Face names (`text_model.*`,
    /// `text_projection.weight`); OpenCLIP layouts request fused attention weights instead.
    pub fn load(
        vb: VarBuilder,
        config: &ClipTextConfig,
        layout: WeightLayout,
        with_projection: bool,
    ) -> Result<Self> {
        let load = || -> candle_core::Result<Self> {
            let text = vb.pp("text_model");
            let width = config.hidden_size;
            let token_embedding = candle_nn::embedding(
                config.vocab_size,
                width,
                text.pp("embeddings.token_embedding"),
            )?;
            let position_embedding = text.get(
                (config.max_position_embeddings, width),
                "embeddings.position_embedding.weight",
            )?;
            let layers = (0..config.num_hidden_layers)
                .map(|i| EncoderLayer::load(text.pp(format!("encoder.layers.{i}")), config, layout))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let final_layer_norm = layer_norm(text.pp("final_layer_norm"), width)?;
            let text_projection = if with_projection {
                Some(Linear::new(
                    vb.get((width, width), "text_projection.weight")?,
                    None,
                ))
            } else {
                None
            };
            Ok(ClipTextModel {
                config: config.clone(),
                token_embedding,
                position_embedding,
                layers,
                final_layer_norm,
                text_projection,
                gradient_checkpointing: false,
            })
        };
        load().map_err(model_error("loading the CLIP text encoder"))
    }

    /// The model's shape.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Sets the kohya prefix of LoRA modules on this encoder's layers: `lora_te` (SD1.x/SD2.x),
    /// `lora_te1` / `lora_te2` (SDXL's two encoders).
    pub fn set_lora_prefix(&mut self, prefix: &'static str) {
        self.visit_layers(&mut |layer| layer.lora_prefix = prefix);
        self.visit_norms(&mut |norm| norm.lora_prefix = prefix);
    }

    /// Turns gradient checkpointing of the transformer layers on or off (`--gradient_checkpointing`
    /// while the text encoder is trained, as sd-scripts checkpoints it): each layer keeps only
    /// its input and runs again in the backward pass ([`checkpointed`]).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Hidden states of `ids` (`[B, 77]`, u32) after each of `after_layers` transformer layers
    /// (0 = the embeddings), in the order asked; layers past the deepest one asked are not run.
    /// LoRA modules attached to the linear layers take part (with their backward pass).
    pub fn hidden_states(&self, ids: &Tensor, after_layers: &[usize]) -> Result<Vec<Tensor>> {
        let run = || -> candle_core::Result<Vec<Tensor>> {
            let (_, len) = ids.dims2()?;
            let deepest = after_layers.iter().copied().max().unwrap_or(0);
            let positions = self.position_embedding.narrow(0, 0, len)?;
            let mut x = self
                .token_embedding
                .forward(ids)?
                .broadcast_add(&positions)?;
            let no_condition = Tensor::zeros(0, DType::F32, ids.device())?;
            let mut outputs: Vec<Option<Tensor>> = vec![None; after_layers.len()];
            for depth in 0..=deepest {
                if depth > 0 {
                    let layer = &self.layers[depth - 1];
                    x = if self.gradient_checkpointing {
                        checkpointed(layer, &x, &no_condition)?
                    } else {
                        layer.forward(&x)?
                    };
                }
                for (slot, &wanted) in outputs.iter_mut().zip(after_layers) {
                    if wanted == depth {
                        *slot = Some(x.clone());
                    }
                }
            }
            Ok(outputs.into_iter().flatten().collect())
        };
        if let Some(&bad) = after_layers.iter().find(|&&d| d > self.layers.len()) {
            return Err(Error::Model(format!(
                "layer {bad} asked of a {}-layer text encoder",
                self.layers.len()
            )));
        }
        run().map_err(model_error("running the CLIP text encoder"))
    }

    /// Applies the final layer norm.
    pub fn final_layer_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.final_layer_norm
            .layer(hidden)
            .map_err(model_error("final layer norm"))
    }

    /// Applies `text_projection` (models loaded with a projection only).
    pub fn project(&self, pooled: &Tensor) -> Result<Tensor> {
        let projection = self
            .text_projection
            .as_ref()
            .ok_or_else(|| Error::Model("this text encoder has no text_projection".into()))?;
        projection
            .forward(pooled)
            .map_err(model_error("text projection"))
    }
}

/// Rebuilds one sequence per caption from its chunks' hidden states, as sd-scripts does:
/// `[B*n, 77, D]` → `[B, 75n + 2, D]` (BOS of chunk 0, positions 1..=75 of every chunk, last
/// position of the last chunk).
pub fn stitch_chunks(hidden: &Tensor, chunks: usize) -> Result<Tensor> {
    let run = || -> candle_core::Result<Tensor> {
        let (rows, len, width) = hidden.dims3()?;
        let batch = rows / chunks;
        if chunks == 1 {
            return Ok(hidden.clone());
        }
        let grouped = hidden.reshape((batch, chunks, len, width))?;
        let first = grouped.i((.., 0, 0..1))?;
        let body = grouped
            .i((.., .., 1..len - 1))?
            .reshape((batch, chunks * (len - 2), width))?;
        let last = grouped.i((.., chunks - 1, len - 1..len))?;
        Tensor::cat(&[first, body, last], 1)
    };
    run().map_err(model_error("stitching token chunks"))
}

/// Multiplies the body positions of stitched hidden states `[B, 75n + 2, D]` by the caption
/// weights (`[B, 75n]`, sd-scripts' `--weighted_captions`; no renormalisation).
pub fn apply_weights(hidden: &Tensor, body_weights: &Tensor) -> Result<Tensor> {
    let run = || -> candle_core::Result<Tensor> {
        let (_, len, _) = hidden.dims3()?;
        let body = hidden
            .narrow(1, 1, len - 2)?
            .broadcast_mul(&body_weights.to_dtype(hidden.dtype())?.unsqueeze(2)?)?;
        Tensor::cat(
            &[hidden.narrow(1, 0, 1)?, body, hidden.narrow(1, len - 1, 1)?],
            1,
        )
    };
    run().map_err(model_error("applying caption weights"))
}

/// SD1.x/SD2.x conditioning (sd-scripts' `SdTextEncodingStrategy`): for ids `[B, n, 77]`,
/// `hidden_states[-clip_skip]` with the final layer norm, chunks stitched → `[B, 75n + 2, D]`.
pub fn encode_sd(model: &ClipTextModel, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
    let layers = model.config().num_hidden_layers;
    if clip_skip == 0 || clip_skip > layers {
        return Err(Error::Usage(format!(
            "--clip_skip must be between 1 and {layers} for this text encoder, not {clip_skip}"
        )));
    }
    let (batch, chunks, len) = ids.dims3().map_err(model_error("token ids"))?;
    let flat = ids
        .reshape((batch * chunks, len))
        .map_err(model_error("token ids"))?;
    let hidden = model
        .hidden_states(&flat, &[layers + 1 - clip_skip])?
        .remove(0);
    stitch_chunks(&model.final_layer_norm(&hidden)?, chunks)
}

/// SDXL conditioning of one batch (sd-scripts' `SdxlTextEncodingStrategy`).
pub struct SdxlConditioning {
    /// Encoder-1 output of layer 11, no final norm: `[B, 75n + 2, 768]`.
    pub hidden_state1: Tensor,
    /// Encoder-2 penultimate layer, no final norm: `[B, 75n + 2, 1280]`.
    pub hidden_state2: Tensor,
    /// Encoder-2 final-normed state at chunk 0's first EOS, through `text_projection`: `[B, 1280]`.
    pub pool2: Tensor,
}

/// Runs both SDXL encoders on ids `[B, n, 77]` (one tensor per tokenizer).
pub fn encode_sdxl(
    encoder1: &ClipTextModel,
    encoder2: &ClipTextModel,
    ids1: &Tensor,
    ids2: &Tensor,
    eos_id: u32,
) -> Result<SdxlConditioning> {
    let (batch, chunks, len) = ids1.dims3().map_err(model_error("token ids"))?;
    let flat1 = ids1
        .reshape((batch * chunks, len))
        .map_err(model_error("token ids"))?;
    let flat2 = ids2
        .reshape((batch * chunks, len))
        .map_err(model_error("token ids"))?;
    let hidden1 = encoder1.hidden_states(&flat1, &[11])?.remove(0);
    let depth2 = encoder2.config().num_hidden_layers;
    let mut states2 = encoder2.hidden_states(&flat2, &[depth2 - 1, depth2])?;
    let last2 = encoder2.final_layer_norm(&states2.remove(1))?;
    let hidden2 = states2.remove(0);

    let pooled = (|| -> candle_core::Result<Tensor> {
        let ids: Vec<Vec<u32>> = flat2.to_vec2()?;
        let rows = (0..batch)
            .map(|b| {
                let row = b * chunks;
                let position = ids[row].iter().position(|&id| id == eos_id).unwrap_or(0);
                last2.i((row, position))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    })()
    .map_err(model_error("pooling encoder 2"))?;
    Ok(SdxlConditioning {
        hidden_state1: stitch_chunks(&hidden1, chunks)?,
        hidden_state2: stitch_chunks(&hidden2, chunks)?,
        pool2: encoder2.project(&pooled)?,
    })
}

/// Reads an optional architecture description for a text encoder: a Hugging Face
/// `config.json` (diffusers `text_encoder/`), or the `text_encoder` / `text_encoder_2` object
/// of a lorakit `arch.json` beside a single-file checkpoint. Only fields that cannot be read
/// from tensor shapes are used (`num_attention_heads`, `hidden_act`).
pub fn read_config_hints(path: &Path, section: Option<&str>) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = crate::infra::fsio::read(path)?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
    Ok(match section {
        Some(name) => value.get(name).cloned(),
        None => Some(value),
    })
}

/// Infers a [`ClipTextConfig`] from tensor shapes (`token_embedding` `[V, D]`,
/// `position_embedding` `[P, D]`, MLP width, layer count) plus optional config hints; without
/// hints the head count is `D / 64` (true of every released SD text encoder) and the
/// activation follows the layout.
pub fn infer_config(
    vocab_and_width: (usize, usize),
    positions: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    layout: WeightLayout,
    hints: Option<&serde_json::Value>,
) -> Result<ClipTextConfig> {
    let (vocab_size, hidden_size) = vocab_and_width;
    let hint = |name: &str| hints.and_then(|h| h.get(name));
    let num_attention_heads = match hint("num_attention_heads").and_then(|v| v.as_u64()) {
        Some(heads) => heads as usize,
        None => (hidden_size / STANDARD_HEAD_DIM).max(1),
    };
    if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
        return Err(Error::Model(format!(
            "text encoder width {hidden_size} is not divisible into {num_attention_heads} heads"
        )));
    }
    let activation = match hint("hidden_act").and_then(|v| v.as_str()) {
        Some(name) => ClipActivation::from_hf(name)
            .ok_or_else(|| Error::Model(format!("unsupported text-encoder activation {name:?}")))?,
        None if layout == WeightLayout::OpenClip || hidden_size > 768 => ClipActivation::Gelu,
        None => ClipActivation::QuickGelu,
    };
    Ok(ClipTextConfig {
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        max_position_embeddings: positions,
        activation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_clip_names() {
        let cases = [
            (
                "text_model.embeddings.token_embedding.weight",
                "token_embedding.weight",
            ),
            (
                "text_model.embeddings.position_embedding.weight",
                "positional_embedding",
            ),
            (
                "text_model.encoder.layers.3.layer_norm1.weight",
                "transformer.resblocks.3.ln_1.weight",
            ),
            (
                "text_model.encoder.layers.3.layer_norm2.bias",
                "transformer.resblocks.3.ln_2.bias",
            ),
            (
                "text_model.encoder.layers.10.mlp.fc1.weight",
                "transformer.resblocks.10.mlp.c_fc.weight",
            ),
            (
                "text_model.encoder.layers.10.mlp.fc2.bias",
                "transformer.resblocks.10.mlp.c_proj.bias",
            ),
            (
                "text_model.encoder.layers.0.self_attn.out_proj.weight",
                "transformer.resblocks.0.attn.out_proj.weight",
            ),
            (
                "text_model.encoder.layers.0.self_attn.in_proj_weight",
                "transformer.resblocks.0.attn.in_proj_weight",
            ),
            (
                "text_model.encoder.layers.0.self_attn.in_proj_bias",
                "transformer.resblocks.0.attn.in_proj_bias",
            ),
            ("text_model.final_layer_norm.weight", "ln_final.weight"),
            ("text_projection.weight", "text_projection"),
        ];
        for (hf, open) in cases {
            assert_eq!(ldm_name(WeightLayout::OpenClip, hf), open);
        }
        assert_eq!(
            ldm_name(WeightLayout::HfFlat, "text_model.final_layer_norm.bias"),
            "final_layer_norm.bias"
        );
    }

    #[test]
    fn stitching_keeps_bos_bodies_and_last() {
        // Two captions x two chunks of 4 positions, value = 100*row + position.
        let values: Vec<f32> = (0..4)
            .flat_map(|row| (0..4).map(move |p| (100 * row + p) as f32))
            .collect();
        let hidden = Tensor::from_vec(values, (4, 4, 1), &candle_core::Device::Cpu).unwrap();
        let stitched = stitch_chunks(&hidden, 2).unwrap();
        let rows: Vec<Vec<f32>> = stitched.squeeze(2).unwrap().to_vec2().unwrap();
        assert_eq!(rows[0], [0., 1., 2., 101., 102., 103.]);
        assert_eq!(rows[1], [200., 201., 202., 301., 302., 303.]);
    }
}
