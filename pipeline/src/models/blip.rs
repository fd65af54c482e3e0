//! BLIP image captioner (Hugging Face `BlipForConditionalGeneration` layout, the layout of
//! `Salesforce/blip-image-captioning-large`).
//!
//! The vision tower is candle-transformers' `models::blip` ViT. Its text decoder cannot be used
//! for generation as sd-scripts does it: its key/value cache cannot be reordered between beams
//! and it recomputes the cross-attention keys and values over the 577 image tokens at every
//! step. The BERT decoder with cross-attention therefore lives here, with a cache that holds
//! the image keys/values once per image and the self-attention keys/values per beam.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::{blip, blip_text};
use serde_json::Value;

use crate::models::attention::{multi_head_attention, Products};
use crate::models::checkpoint::load_and_release;
use crate::models::frozen::{FrozenKind, FrozenOp};
use crate::models::kernel_choice::cpu_kernels;
use crate::models::kernels::{gelu_erf, transpose_matrix};
use crate::models::norm::Norm;
use crate::{infra::hashing, Error, Result};

/// Side length of the square image the vision tower takes (sd-scripts' `image_size`).
pub const IMAGE_SIZE: u32 = 384;
/// Per-channel mean of the CLIP normalisation BLIP uses.
pub const PIXEL_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// Per-channel standard deviation of the CLIP normalisation BLIP uses.
pub const PIXEL_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// The text prompt sd-scripts puts in front of every caption.
pub const PROMPT: &str = "a picture of ";

/// File names of a Hugging Face BLIP folder.
const CONFIG_FILE: &str = "config.json";
const WEIGHTS_FILE: &str = "model.safetensors";
const TOKENIZER_FILE: &str = "tokenizer.json";

/// The files of a BLIP captioning model on disk.
#[derive(Debug, Clone)]
pub struct BlipFiles {
    /// `config.json` (a `BlipConfig`).
    pub config: PathBuf,
    /// `model.safetensors`.
    pub weights: PathBuf,
    /// `tokenizer.json` (BERT WordPiece with `[DEC]`/`[ENC]`).
    pub tokenizer: PathBuf,
}

impl BlipFiles {
    /// Finds the model files for `--caption_weights`: a Hugging Face BLIP folder.
    ///
    /// A PyTorch pickle (sd-scripts' `model_large_caption.pth`) is refused with a message
    /// saying what to use instead; nothing is ever downloaded.
    pub fn locate(path: &Path) -> Result<Self> {
        let pickle = path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["pth", "pt", "ckpt", "bin"].contains(&e.to_ascii_lowercase().as_str())
        });
        if pickle {
            return Err(Error::bad_file(
                path,
                "this is a PyTorch pickle (like sd-scripts' model_large_caption.pth), which \
                 caption-images does not read: pass a Hugging Face BLIP captioning folder instead \
                 (config.json, model.safetensors, tokenizer.json), e.g. a local copy of \
                 Salesforce/blip-image-captioning-large (BLIP ViT-L captioning weights converted \
                 to the Hugging Face layout)",
            ));
        }
        if !path.is_dir() {
            return Err(Error::bad_file(
                path,
                "BLIP model folder not found: put a Hugging Face BLIP captioning folder there \
                 (config.json, model.safetensors, tokenizer.json, e.g. a local copy of \
                 Salesforce/blip-image-captioning-large) and pass it with --caption_weights; \
                 nothing is downloaded",
            ));
        }
        let files = BlipFiles {
            config: path.join(CONFIG_FILE),
            weights: path.join(WEIGHTS_FILE),
            tokenizer: path.join(TOKENIZER_FILE),
        };
        for file in [&files.config, &files.weights, &files.tokenizer] {
            if !file.is_file() {
                return Err(Error::bad_file(
                    file,
                    format!(
                        "missing from the BLIP model folder {} (it needs config.json, \
                         model.safetensors and tokenizer.json of a Hugging Face \
                         BlipForConditionalGeneration model)",
                        path.display()
                    ),
                ));
            }
        }
        Ok(files)
    }

    /// BLAKE3 over the config, weights and tokenizer: identifies the model in content keys
    /// (memoised on disk, so the weights are hashed once per machine).
    pub fn hash(&self) -> Result<String> {
        let files = [&self.config, &self.weights, &self.tokenizer].map(|f| f.to_path_buf());
        hashing::memoised(&files, "blip-model", || {
            let mut key = hashing::KeyBuilder::new("blip-model", 1);
            for file in &files {
                key.text("file", &hashing::hash_file(file)?);
            }
            Ok(key.finish())
        })
    }
}

/// Architecture and special token ids of a BLIP captioner, read from `config.json`.
#[derive(Debug, Clone)]
pub struct BlipConfig {
    /// The full model configuration in candle's terms.
    pub model: blip::Config,
    /// `[DEC]`, the id that replaces `[CLS]` at the start of the decoder prompt.
    pub bos_token_id: u32,
    /// `[SEP]`, the id that ends a caption.
    pub sep_token_id: u32,
}

impl BlipConfig {
    /// Reads a Hugging Face `BlipConfig`, with its defaults for the fields a file may omit.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::infra::fsio::read(path)?;
        let root: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&root).map_err(|message| Error::bad_file(path, message))
    }

    fn from_json(root: &Value) -> std::result::Result<Self, String> {
        let empty = Value::Object(Default::default());
        let text = root.get("text_config").unwrap_or(&empty);
        let vision = root.get("vision_config").unwrap_or(&empty);
        let number =
            |section: &Value, name: &str, default: usize| -> std::result::Result<usize, String> {
                match section.get(name) {
                    None | Some(Value::Null) => Ok(default),
                    Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        format!("`{name}` must be a non-negative integer, found {v}")
                    }),
                }
            };
        let float =
            |section: &Value, name: &str, default: f64| -> std::result::Result<f64, String> {
                match section.get(name) {
                    None | Some(Value::Null) => Ok(default),
                    Some(v) => v
                        .as_f64()
                        .ok_or_else(|| format!("`{name}` must be a number, found {v}")),
                }
            };
        let activation = |section: &Value| -> std::result::Result<candle_nn::Activation, String> {
            let name = section
                .get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("gelu");
            serde_json::from_value(Value::String(name.to_string()))
                .map_err(|_| format!("unsupported activation `hidden_act: {name}`"))
        };
        let vision_config = blip::VisionConfig {
            hidden_size: number(vision, "hidden_size", 768)?,
            intermediate_size: number(vision, "intermediate_size", 3072)?,
            projection_dim: number(vision, "projection_dim", 512)?,
            num_hidden_layers: number(vision, "num_hidden_layers", 12)?,
            num_attention_heads: number(vision, "num_attention_heads", 12)?,
            image_size: number(vision, "image_size", IMAGE_SIZE as usize)?,
            patch_size: number(vision, "patch_size", 16)?,
            hidden_act: activation(vision)?,
            layer_norm_eps: float(vision, "layer_norm_eps", 1e-5)?,
        };
        // As in transformers' BlipConfig, the decoder cross-attends to the vision width.
        let text_config = blip_text::Config {
            vocab_size: number(text, "vocab_size", 30524)?,
            hidden_size: number(text, "hidden_size", 768)?,
            encoder_hidden_size: vision_config.hidden_size,
            intermediate_size: number(text, "intermediate_size", 3072)?,
            projection_dim: number(text, "projection_dim", 768)?,
            num_hidden_layers: number(text, "num_hidden_layers", 12)?,
            num_attention_heads: number(text, "num_attention_heads", 8)?,
            max_position_embeddings: number(text, "max_position_embeddings", 512)?,
            hidden_act: activation(text)?,
            layer_norm_eps: float(text, "layer_norm_eps", 1e-12)?,
            is_decoder: true,
        };
        if vision_config.image_size != IMAGE_SIZE as usize {
            return Err(format!(
                "vision image_size {} is not supported (sd-scripts' BLIP uses {IMAGE_SIZE})",
                vision_config.image_size
            ));
        }
        for (what, width, heads) in [
            (
                "vision",
                vision_config.hidden_size,
                vision_config.num_attention_heads,
            ),
            (
                "text",
                text_config.hidden_size,
                text_config.num_attention_heads,
            ),
        ] {
            if heads == 0 || width % heads != 0 {
                return Err(format!(
                    "{what} hidden_size {width} is not divisible by num_attention_heads {heads}"
                ));
            }
        }
        let model = blip::Config {
            text_config,
            vision_config,
            projection_dim: number(root, "projection_dim", 512)?,
            image_text_hidden_size: number(root, "image_text_hidden_size", 256)?,
        };
        Ok(BlipConfig {
            model,
            bos_token_id: number(text, "bos_token_id", 30522)? as u32,
            sep_token_id: number(text, "sep_token_id", 102)? as u32,
        })
    }
}

/// Maps a candle error to a model error that says what was being done.
fn model_error(context: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Model(format!("{context}: {e}"))
}

/// One transformer layer of the BLIP vision tower (pre-LayerNorm ViT block).
struct VisionLayer {
    layer_norm1: Norm,
    qkv: FrozenOp,
    projection: FrozenOp,
    layer_norm2: Norm,
    fc1: FrozenOp,
    fc2: FrozenOp,
}

/// The BLIP vision tower (transformers' `BlipVisionModel`) on lorakit's kernels: frozen-weight
/// products with the bias inside, token-major multi-head attention with the chunked softmax,
/// fused LayerNorm and the vectorised erf GELU.
struct VisionTower {
    patch_embedding: FrozenOp,
    class_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<VisionLayer>,
    post_layernorm: Norm,
    heads: usize,
    activation: candle_nn::Activation,
}

impl VisionTower {
    /// Loads `vision_model.*` tensors (Hugging Face names) from `vb`.
    fn new(cfg: &blip::VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let width = cfg.hidden_size;
        let norm = |vb: VarBuilder| {
            Ok::<_, candle_core::Error>(Norm::new(
                vb.get(width, "weight")?,
                vb.get(width, "bias")?,
                cfg.layer_norm_eps,
            ))
        };
        let embeddings = vb.pp("embeddings");
        let patch = cfg.patch_size;
        let positions = (cfg.image_size / patch).pow(2) + 1;
        let patch_embedding = FrozenOp::new(
            embeddings.get((width, 3, patch, patch), "patch_embedding.weight")?,
            Some(embeddings.get(width, "patch_embedding.bias")?),
            FrozenKind::Conv2d {
                stride: patch,
                padding: 0,
            },
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let layer = vb.pp(format!("encoder.layers.{i}"));
                Ok(VisionLayer {
                    layer_norm1: norm(layer.pp("layer_norm1"))?,
                    qkv: inference_linear(layer.pp("self_attn.qkv"), width, 3 * width)?,
                    projection: inference_linear(layer.pp("self_attn.projection"), width, width)?,
                    layer_norm2: norm(layer.pp("layer_norm2"))?,
                    fc1: inference_linear(layer.pp("mlp.fc1"), width, cfg.intermediate_size)?,
                    fc2: inference_linear(layer.pp("mlp.fc2"), cfg.intermediate_size, width)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(VisionTower {
            patch_embedding,
            class_embedding: embeddings.get((1, 1, width), "class_embedding")?,
            position_embedding: embeddings.get((1, positions, width), "position_embedding")?,
            layers,
            post_layernorm: norm(vb.pp("post_layernorm"))?,
            heads: cfg.num_attention_heads,
            activation: cfg.hidden_act,
        })
    }

    /// Image embeddings `[B, patches + 1, width]` of pixels `[B, 3, size, size]`.
    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let batch = pixels.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let width = self.class_embedding.dim(2)?;
        let class = self.class_embedding.broadcast_as((batch, 1, width))?;
        let mut x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let scale = ((width / self.heads) as f64).powf(-0.5);
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&layer.layer_norm1.layer(&x)?)?;
            let part = |i: usize| qkv.narrow(2, i * width, width);
            let attended = multi_head_attention(
                &part(0)?,
                &part(1)?,
                &part(2)?,
                self.heads,
                scale,
                Products::F32,
            )?;
            x = (x + layer.projection.forward(&attended)?)?;
            let hidden = layer.fc1.forward(&layer.layer_norm2.layer(&x)?)?;
            let hidden = match self.activation {
                candle_nn::Activation::Gelu => gelu_erf(&hidden)?,
                other => hidden.apply(&other)?,
            };
            x = (x + layer.fc2.forward(&hidden)?)?;
        }
        self.post_layernorm.layer(&x)
    }
}

/// A frozen linear layer (`weight` `[outputs, inputs]` and `bias` under `vb`) stored for
/// inference ([`FrozenOp::with_inference_layout`]).
fn inference_linear(
    vb: VarBuilder,
    inputs: usize,
    outputs: usize,
) -> candle_core::Result<FrozenOp> {
    FrozenOp::new(
        vb.get((outputs, inputs), "weight")?,
        Some(vb.get(outputs, "bias")?),
        FrozenKind::Linear,
    )
    .with_inference_layout()
}

/// One attention block of the BERT decoder (self- or cross-attention), with its output
/// projection and post-LayerNorm.
struct DecoderAttention {
    query: FrozenOp,
    key: FrozenOp,
    value: FrozenOp,
    output: FrozenOp,
    norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

impl DecoderAttention {
    fn new(cfg: &blip_text::Config, key_width: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let width = cfg.hidden_size;
        Ok(DecoderAttention {
            query: inference_linear(vb.pp("self.query"), width, width)?,
            key: inference_linear(vb.pp("self.key"), key_width, width)?,
            value: inference_linear(vb.pp("self.value"), key_width, width)?,
            output: inference_linear(vb.pp("output.dense"), width, width)?,
            norm: candle_nn::layer_norm(width, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            head_dim: width / cfg.num_attention_heads,
        })
    }

    /// `[B, T, W]` -> `[B, heads, T, head_dim]`.
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, tokens, _) = xs.dims3()?;
        xs.reshape((batch, tokens, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Keys and values of `source`, split into heads.
    fn keys_values(&self, source: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.split_heads(&self.key.forward(source)?)?,
            self.split_heads(&self.value.forward(source)?)?,
        ))
    }

    /// Attends from `xs` to the given keys/values, then projects, adds `xs` and normalises.
    fn attend(
        &self,
        xs: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let query = self.split_heads(&self.query.forward(xs)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (query.matmul(&keys.t()?)? * scale)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(values)?
            .transpose(1, 2)?
            .flatten_from(D::Minus2)?;
        (self.output.forward(&context)? + xs)?.apply(&self.norm)
    }
}

/// One BERT decoder layer: causal self-attention, cross-attention to the image, feed-forward.
struct DecoderLayer {
    self_attention: DecoderAttention,
    cross_attention: DecoderAttention,
    intermediate: FrozenOp,
    output: FrozenOp,
    output_norm: LayerNorm,
    activation: candle_nn::Activation,
}

impl DecoderLayer {
    fn new(cfg: &blip_text::Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(DecoderLayer {
            self_attention: DecoderAttention::new(cfg, cfg.hidden_size, vb.pp("attention"))?,
            cross_attention: DecoderAttention::new(
                cfg,
                cfg.encoder_hidden_size,
                vb.pp("crossattention"),
            )?,
            intermediate: inference_linear(
                vb.pp("intermediate.dense"),
                cfg.hidden_size,
                cfg.intermediate_size,
            )?,
            output: inference_linear(
                vb.pp("output.dense"),
                cfg.intermediate_size,
                cfg.hidden_size,
            )?,
            output_norm: candle_nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("output.LayerNorm"),
            )?,
            activation: cfg.hidden_act,
        })
    }
}

/// The BLIP text decoder (`text_decoder.bert` + `text_decoder.cls`).
struct TextDecoder {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embedding_norm: LayerNorm,
    layers: Vec<DecoderLayer>,
    head_dense: FrozenOp,
    head_norm: LayerNorm,
    head_activation: candle_nn::Activation,
    lm_head: FrozenOp,
    max_positions: usize,
}

impl TextDecoder {
    fn new(cfg: &blip_text::Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let bert = vb.pp("bert");
        let width = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, bert.pp("encoder.layer").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let head = vb.pp("cls.predictions");
        Ok(TextDecoder {
            word_embeddings: candle_nn::embedding(
                cfg.vocab_size,
                width,
                bert.pp("embeddings.word_embeddings"),
            )?,
            position_embeddings: candle_nn::embedding(
                cfg.max_position_embeddings,
                width,
                bert.pp("embeddings.position_embeddings"),
            )?,
            embedding_norm: candle_nn::layer_norm(
                width,
                cfg.layer_norm_eps,
                bert.pp("embeddings.LayerNorm"),
            )?,
            layers,
            head_dense: inference_linear(head.pp("transform.dense"), width, width)?,
            head_norm: candle_nn::layer_norm(
                width,
                cfg.layer_norm_eps,
                head.pp("transform.LayerNorm"),
            )?,
            head_activation: cfg.hidden_act,
            lm_head: FrozenOp::new(
                head.get((cfg.vocab_size, width), "decoder.weight")?,
                Some(head.get(cfg.vocab_size, "bias")?),
                FrozenKind::Linear,
            )
            .with_inference_layout()?,
            max_positions: cfg.max_position_embeddings,
        })
    }
}

/// Decoding state of sequences decoded side by side (the beams of one image, or one sequence
/// per image of a batch): the image keys/values of every layer, computed once per image, and the
/// growing self-attention cache.
pub struct DecoderCache {
    image_keys_values: Vec<(Tensor, Tensor)>,
    self_keys_values: Vec<Option<(Tensor, Tensor)>>,
    /// The image each row attends to.
    row_images: Vec<usize>,
    length: usize,
}

impl DecoderCache {
    /// Number of tokens already fed.
    pub fn len(&self) -> usize {
        self.length
    }

    /// True before the first step.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Number of sequences decoded side by side.
    pub fn sequences(&self) -> usize {
        self.row_images.len()
    }

    /// Keeps the sequences `sources` (in that order, repeats allowed): row `i` of the cache
    /// becomes the former row `sources[i]` (beams after a beam-search step, or the unfinished
    /// sequences of a batch).
    pub fn reorder(&mut self, sources: &[usize]) -> Result<()> {
        let failed = model_error("reordering the decoder cache");
        if sources.iter().any(|&s| s >= self.row_images.len()) {
            return Err(Error::Model(
                "decoder cache reordered from a missing row".into(),
            ));
        }
        let device = self.image_keys_values[0].0.device().clone();
        let index =
            Tensor::from_iter(sources.iter().map(|&s| s as u32), &device).map_err(&failed)?;
        let select = |entry: &mut (Tensor, Tensor)| -> Result<()> {
            *entry = (
                entry.0.index_select(&index, 0).map_err(&failed)?,
                entry.1.index_select(&index, 0).map_err(&failed)?,
            );
            Ok(())
        };
        for entry in self.self_keys_values.iter_mut().flatten() {
            select(entry)?;
        }
        let row_images: Vec<usize> = sources.iter().map(|&s| self.row_images[s]).collect();
        // Beams of one image all attend to the same keys/values: no copy needed then.
        if row_images != self.row_images {
            for entry in &mut self.image_keys_values {
                select(entry)?;
            }
            self.row_images = row_images;
        }
        Ok(())
    }
}

/// A loaded BLIP captioner: vision tower, text decoder, tokenizer and special ids.
pub struct BlipCaptioner {
    vision: VisionTower,
    decoder: TextDecoder,
    tokenizer: tokenizers::Tokenizer,
    config: BlipConfig,
    prompt_ids: Vec<u32>,
    device: Device,
}

impl BlipCaptioner {
    /// Loads the model in `files` in float32 on `device`.
    pub fn load(files: &BlipFiles, device: &Device) -> Result<Self> {
        let config = BlipConfig::load(&files.config)?;
        let mut tensors = load_tensors(&files.weights, device)?;
        // A tied LM head (as in the released checkpoints) may be stored only once.
        let head = "text_decoder.cls.predictions.";
        if !tensors.contains_key(&format!("{head}decoder.weight")) {
            if let Some(words) = tensors.get("text_decoder.bert.embeddings.word_embeddings.weight")
            {
                let words = words.clone();
                tensors.insert(format!("{head}decoder.weight"), words);
            }
        }
        if !tensors.contains_key(&format!("{head}bias")) {
            if let Some(bias) = tensors.get(&format!("{head}decoder.bias")) {
                let bias = bias.clone();
                tensors.insert(format!("{head}bias"), bias);
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let bad_weights = |e: candle_core::Error| {
            Error::bad_file(
                &files.weights,
                format!("does not match config.json as a BlipForConditionalGeneration: {e}"),
            )
        };
        let vision = VisionTower::new(&config.model.vision_config, vb.pp("vision_model"))
            .map_err(bad_weights)?;
        let decoder = TextDecoder::new(&config.model.text_config, vb.pp("text_decoder"))
            .map_err(bad_weights)?;
        let tokenizer = tokenizers::Tokenizer::from_file(&files.tokenizer).map_err(|e| {
            Error::bad_file(&files.tokenizer, format!("cannot read the tokenizer: {e}"))
        })?;
        let prompt_ids = decoder_prompt(&tokenizer, config.bos_token_id)
            .map_err(|message| Error::bad_file(&files.tokenizer, message))?;
        Ok(BlipCaptioner {
            vision,
            decoder,
            tokenizer,
            config,
            prompt_ids,
            device: device.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &BlipConfig {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The decoder prompt: `[DEC] a picture of` (the tokenised [`PROMPT`] with `[CLS]` replaced by
    /// `[DEC]` and the final `[SEP]` dropped).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    /// Size of the vocabulary (width of the logits).
    pub fn vocab_size(&self) -> usize {
        self.config.model.text_config.vocab_size
    }

    /// Runs the vision tower on normalised pixels `[B, 3, 384, 384]`: image embeddings
    /// `[B, 577, vision width]` (after the final LayerNorm).
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision
            .forward(pixels)
            .map_err(model_error("running the BLIP vision encoder"))
    }

    /// Starts decoding `rows_per_image` sequences for each image of `image_embeds`
    /// (`[B, N, width]`); rows are grouped by image, in image order.
    pub fn start(&self, image_embeds: &Tensor, rows_per_image: usize) -> Result<DecoderCache> {
        let failed = model_error("preparing the BLIP decoder");
        let images = image_embeds.dim(0).map_err(&failed)?;
        let row_images: Vec<usize> = (0..images)
            .flat_map(|image| std::iter::repeat_n(image, rows_per_image))
            .collect();
        let index = Tensor::from_iter(row_images.iter().map(|&i| i as u32), &self.device)
            .map_err(&failed)?;
        let image_keys_values = self
            .decoder
            .layers
            .iter()
            .map(|layer| {
                let (keys, values) = layer.cross_attention.keys_values(image_embeds)?;
                if rows_per_image == 1 {
                    Ok((keys, values))
                } else {
                    Ok((
                        keys.index_select(&index, 0)?,
                        values.index_select(&index, 0)?,
                    ))
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(&failed)?;
        Ok(DecoderCache {
            self_keys_values: vec![None; image_keys_values.len()],
            image_keys_values,
            row_images,
            length: 0,
        })
    }

    /// Feeds `tokens` (`sequences` rows of equal length, continuing the cached ones) and returns
    /// the decoder's last hidden states `[sequences, T, width]` (before the LM head).
    pub fn feed(&self, cache: &mut DecoderCache, tokens: &[Vec<u32>]) -> Result<Tensor> {
        let failed = model_error("running the BLIP text decoder");
        let count = tokens.first().map_or(0, Vec::len);
        if tokens.len() != cache.sequences()
            || count == 0
            || tokens.iter().any(|t| t.len() != count)
        {
            return Err(Error::Model(format!(
                "decoder fed {} sequences of unequal or zero length, expected {}",
                tokens.len(),
                cache.sequences()
            )));
        }
        let start = cache.length;
        if start + count > self.decoder.max_positions {
            return Err(Error::Model(format!(
                "caption longer than the {} positions the BLIP decoder supports (lower --max_length)",
                self.decoder.max_positions
            )));
        }
        // The cache is only updated once every layer succeeded.
        let run = || -> candle_core::Result<(Tensor, Vec<Option<(Tensor, Tensor)>>)> {
            let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(flat, (tokens.len(), count), &self.device)?;
            let positions =
                Tensor::arange(start as u32, (start + count) as u32, &self.device)?.unsqueeze(0)?;
            let words = self.decoder.word_embeddings.forward(&ids)?;
            let places = self.decoder.position_embeddings.forward(&positions)?;
            let mut xs = words
                .broadcast_add(&places)?
                .apply(&self.decoder.embedding_norm)?;
            // Causal mask over [cached + new] keys; only needed when several tokens are new.
            let mask = (count > 1)
                .then(|| {
                    let total = start + count;
                    let values: Vec<f32> = (0..count)
                        .flat_map(|i| {
                            (0..total).map(move |j| {
                                if j > start + i {
                                    f32::NEG_INFINITY
                                } else {
                                    0.0
                                }
                            })
                        })
                        .collect();
                    Tensor::from_vec(values, (count, total), &self.device)
                })
                .transpose()?;
            let mut updated = Vec::with_capacity(self.decoder.layers.len());
            for (index, layer) in self.decoder.layers.iter().enumerate() {
                let (new_keys, new_values) = layer.self_attention.keys_values(&xs)?;
                let (keys, values) = match &cache.self_keys_values[index] {
                    Some((old_keys, old_values)) => (
                        Tensor::cat(&[old_keys, &new_keys], 2)?,
                        Tensor::cat(&[old_values, &new_values], 2)?,
                    ),
                    None => (new_keys, new_values),
                };
                xs = layer
                    .self_attention
                    .attend(&xs, &keys, &values, mask.as_ref())?;
                updated.push(Some((keys, values)));
                let (image_keys, image_values) = &cache.image_keys_values[index];
                xs = layer
                    .cross_attention
                    .attend(&xs, image_keys, image_values, None)?;
                let hidden = layer.intermediate.forward(&xs)?.apply(&layer.activation)?;
                xs = (layer.output.forward(&hidden)? + &xs)?.apply(&layer.output_norm)?;
            }
            Ok((xs, updated))
        };
        let (hidden, updated) = run().map_err(&failed)?;
        cache.self_keys_values = updated;
        cache.length += count;
        Ok(hidden)
    }

    /// Applies the LM head to hidden states `[B, T, width]`: logits `[B, T, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = || -> candle_core::Result<Tensor> {
            let transformed = self.decoder.head_dense.forward(hidden)?;
            let normed = transformed
                .apply(&self.decoder.head_activation)?
                .apply(&self.decoder.head_norm)?;
            self.decoder.lm_head.forward(&normed)
        };
        head().map_err(model_error("running the BLIP LM head"))
    }

    /// Logits of the last position of every sequence after feeding `tokens`, as rows of f32.
    pub fn next_token_logits(
        &self,
        cache: &mut DecoderCache,
        tokens: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        let hidden = self.feed(cache, tokens)?;
        let last = hidden
            .i((
                ..,
                hidden.dim(1).map_err(model_error("decoder output"))? - 1..,
            ))
            .map_err(model_error("decoder output"))?;
        self.logits(&last)?
            .squeeze(1)
            .and_then(|t| t.to_vec2::<f32>())
            .map_err(model_error("reading the BLIP logits"))
    }

    /// Id that ends a caption (`[SEP]`).
    pub fn sep_token_id(&self) -> u32 {
        self.config.sep_token_id
    }

    /// Decodes ids to text as transformers' `decode(ids, skip_special_tokens=True)` does.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Model(format!("decoding caption tokens: {e}")))
    }
}

/// Reads every tensor of a safetensors file through a memory map, so that only the tensors
/// themselves (not a second copy of the file) are held in memory.
fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let unreadable = |e: candle_core::Error| {
        Error::bad_file(path, format!("cannot read the safetensors file: {e}"))
    };
    // SAFETY: the map is only read while loading, and lorakit never writes model files; as with
    // every memory-mapped reader, the file must not be truncated by another program meanwhile.
    let file =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(unreadable)?;
    file.tensors()
        .into_iter()
        .map(|(name, _)| {
            let mut tensor = load_and_release(&file, &name, device).map_err(unreadable)?;
            if is_linear_weight(&name, &tensor) && cpu_kernels(device) {
                // Transposed now, one tensor at a time, so that the inference layout of the
                // frozen products never holds a second copy of the model.
                tensor = transpose_matrix(&tensor)
                    .and_then(|in_out| in_out.t())
                    .map_err(unreadable)?;
            }
            Ok((name, tensor))
        })
        .collect()
}

/// Whether `name` is the weight of a linear layer (2-D, and not an embedding table).
fn is_linear_weight(name: &str, tensor: &Tensor) -> bool {
    name.ends_with(".weight") && !name.contains("embedding") && tensor.rank() == 2
}

/// Tokenises [`PROMPT`] with the special tokens, puts `bos` first and drops the final `[SEP]`.
fn decoder_prompt(
    tokenizer: &tokenizers::Tokenizer,
    bos: u32,
) -> std::result::Result<Vec<u32>, String> {
    let encoding = tokenizer
        .encode(PROMPT, true)
        .map_err(|e| format!("cannot tokenise the caption prompt: {e}"))?;
    let mut ids = encoding.get_ids().to_vec();
    if ids.len() < 2 {
        return Err("the tokenizer does not add [CLS]/[SEP] around the prompt (expected a BERT tokenizer.json)".into());
    }
    ids.pop();
    ids[0] = bos;
    Ok(ids)
}

/// Test helpers shared by the BLIP and caption tests: the tiny fixture model, loaded once, and
/// its golden arrays.
#[cfg(test)]
pub(crate) mod fixture {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use super::*;

    /// The `blip-tiny` fixture folder; a missing fixture fails the test.
    pub fn dir() -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/blip-tiny");
        assert!(
            dir.join("golden.npz").is_file(),
            "fixture missing at {}",
            dir.display()
        );
        dir
    }

    /// The tiny model, loaded once per test binary.
    pub fn model() -> &'static BlipCaptioner {
        static MODEL: OnceLock<BlipCaptioner> = OnceLock::new();
        MODEL.get_or_init(|| {
            BlipCaptioner::load(&BlipFiles::locate(&dir()).unwrap(), &Device::Cpu).unwrap()
        })
    }

    /// A float32 golden array and its shape.
    pub fn f32_array(name: &str) -> (Vec<f32>, Vec<usize>) {
        let mut archive = npyz::npz::NpzArchive::open(dir().join("golden.npz")).unwrap();
        let array = archive
            .by_name(name)
            .unwrap()
            .unwrap_or_else(|| panic!("no {name}"));
        let shape = array.shape().iter().map(|&d| d as usize).collect();
        (array.into_vec::<f32>().unwrap(), shape)
    }

    /// An int64 golden array and its shape.
    pub fn i64_array(name: &str) -> (Vec<i64>, Vec<usize>) {
        let mut archive = npyz::npz::NpzArchive::open(dir().join("golden.npz")).unwrap();
        let array = archive
            .by_name(name)
            .unwrap()
            .unwrap_or_else(|| panic!("no {name}"));
        let shape = array.shape().iter().map(|&d| d as usize).collect();
        (array.into_vec::<i64>().unwrap(), shape)
    }

    /// The golden pixels of image `index` as a `[1, 3, 384, 384]` tensor.
    pub fn pixels(index: usize) -> Tensor {
        let (values, _) = f32_array("pixel_values");
        let size = 3 * 384 * 384;
        Tensor::from_vec(
            values[index * size..(index + 1) * size].to_vec(),
            (1, 3, 384, 384),
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Largest absolute difference of two equally long slices.
    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;

    #[test]
    fn vision_features_match_golden() {
        let (expected, shape) = f32_array("vision_last_hidden_state");
        assert_eq!(shape, [4, 577, 64]);
        let (pixels, _) = f32_array("pixel_values");
        let pixels = Tensor::from_vec(pixels, (4, 3, 384, 384), &Device::Cpu).unwrap();
        let features = model().encode_images(&pixels).unwrap();
        let actual: Vec<f32> = features.flatten_all().unwrap().to_vec1().unwrap();
        let error = max_abs_diff(&actual, &expected);
        eprintln!("vision features: max abs error {error:e}");
        assert!(error < 1e-4, "vision features differ by {error}");
    }

    #[test]
    fn prompt_hidden_states_and_logits_match_golden() {
        let model = model();
        let (prompt, _) = i64_array("decoder_prompt_ids");
        let prompt: Vec<u32> = prompt.iter().map(|&id| id as u32).collect();
        assert_eq!(model.prompt_ids(), prompt.as_slice());
        let (hidden_expected, _) = f32_array("prompt_text_hidden_state");
        let (logits_expected, shape) = f32_array("prompt_logits");
        assert_eq!(shape, [4, 4, 30524]);
        let (hidden_size, vocab) = (4 * 32, 4 * 30524);
        for image in 0..4 {
            let embeds = model.encode_images(&pixels(image)).unwrap();
            let mut cache = model.start(&embeds, 1).unwrap();
            let hidden = model.feed(&mut cache, &[prompt.clone()]).unwrap();
            let logits = model.logits(&hidden).unwrap();
            let hidden: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
            let logits: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            let hidden_error = max_abs_diff(
                &hidden,
                &hidden_expected[image * hidden_size..(image + 1) * hidden_size],
            );
            let logits_error = max_abs_diff(
                &logits,
                &logits_expected[image * vocab..(image + 1) * vocab],
            );
            eprintln!("image {image}: hidden {hidden_error:e}, logits {logits_error:e}");
            assert!(
                hidden_error < 5e-5,
                "image {image}: hidden states differ by {hidden_error}"
            );
            assert!(
                logits_error < 5e-4,
                "image {image}: logits differ by {logits_error}"
            );
        }
    }

    #[test]
    fn cached_steps_equal_a_full_forward() {
        let model = model();
        let embeds = model.encode_images(&pixels(1)).unwrap();
        let tokens: Vec<u32> = model
            .prompt_ids()
            .iter()
            .copied()
            .chain([2287, 1037])
            .collect();
        let mut full = model.start(&embeds, 1).unwrap();
        let all = model.feed(&mut full, &[tokens.clone()]).unwrap();
        let mut stepped = model.start(&embeds, 1).unwrap();
        model.feed(&mut stepped, &[tokens[..4].to_vec()]).unwrap();
        model.feed(&mut stepped, &[vec![tokens[4]]]).unwrap();
        let last = model.feed(&mut stepped, &[vec![tokens[5]]]).unwrap();
        let expected: Vec<f32> = all.i((0, 5)).unwrap().to_vec1().unwrap();
        let actual: Vec<f32> = last.i((0, 0)).unwrap().to_vec1().unwrap();
        assert!(max_abs_diff(&actual, &expected) < 1e-5);
        assert_eq!(stepped.len(), 6);
    }

    #[test]
    fn pickles_and_missing_models_are_refused_with_directions() {
        let message = BlipFiles::locate(Path::new("/models/model_large_caption.pth"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("model_large_caption.pth") && message.contains("Hugging Face"),
            "{message}"
        );
        let dir = tempfile::tempdir().unwrap();
        let message = BlipFiles::locate(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("absent") && message.contains("nothing is downloaded"),
            "{message}"
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let message = BlipFiles::locate(dir.path()).unwrap_err().to_string();
        assert!(message.contains("model.safetensors"), "{message}");
    }

    #[test]
    fn config_defaults_follow_transformers() {
        let config = BlipConfig::from_json(
            &serde_json::json!({"vision_config": {"hidden_size": 1024, "num_attention_heads": 16}}),
        )
        .unwrap();
        assert_eq!(config.model.text_config.encoder_hidden_size, 1024);
        assert_eq!(config.model.text_config.vocab_size, 30524);
        assert_eq!((config.bos_token_id, config.sep_token_id), (30522, 102));
        let bad = BlipConfig::from_json(&serde_json::json!({"vision_config": {"image_size": 224}}));
        assert!(bad.unwrap_err().contains("224"));
    }
}
