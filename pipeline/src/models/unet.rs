//! Stable Diffusion 1.x / 2.x and SDXL UNet (`UNet2DConditionModel` topology), differentiable end
//! to end.
//!
//! Built only from candle ops that have a backward pass (norms are composed from elementary ops,
//! attention is [`crate::models::attention::attention`] with its own exact backward), with
//! per-sample timesteps, SD2/SDXL 64-channel heads, and every linear / conv layer an
//! [`AdaptableLayer`] so that LoRA modules can be attached. Base weights are frozen: their products
//! run through [`crate::models::frozen::FrozenOp`], so no gradient is ever computed for them.
//!
//! The architecture is read from tensor shapes: the number of levels (SD1/SD2: 4, SDXL: 3), the
//! transformer depth of each level's attentions (SD1/SD2: 1, SDXL base: 0/2/10 and 10 in the
//! middle), linear or 1x1-convolution `proj_in`/`proj_out`, and SDXL's `label_emb` ("text_time"
//! add-embedding: pool2 and six 256-wide sinusoidal size features, see [`sdxl_vector`]).
//!
//! Tensors are requested by diffusers names (`down_blocks.1.attentions.0.proj_in`);
//! [`ldm_mapping`] maps them to the original LDM / SGM names of single-file checkpoints. Weights
//! come through [`crate::models::Checkpoint::var_builder`] with `Component::Unet` and that mapping.
//! Layer paths ([`AdaptableLayer::path`], which name LoRA modules) are the module names of
//! sd-scripts' model of the family: diffusers names for SD1/SD2, SGM names for SDXL.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::models::adapter::{Adaptable, AdaptableLayer, AdaptableNorm, Container, NormType};
use crate::models::attention::{multi_head_attention, Products};
use crate::models::frozen::FrozenKind;
use crate::models::geglu::geglu;
use crate::models::norm::Norm;
use crate::models::recompute::{checkpointed, Recomputable};
use crate::models::ModelFamily;
use crate::{Error, Result};

/// Resnets per down level (`layers_per_block`); up levels have one more.
const LAYERS_PER_BLOCK: usize = 2;
/// Group count of every GroupNorm.
const NORM_GROUPS: usize = 32;

/// How attention heads are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// A fixed number of heads at every level (SD1: 8).
    Count(usize),
    /// A fixed head width (SD2 and SDXL: 64 channels per head).
    Width(usize),
}

/// Width of each sinusoidal size feature of SDXL's add-embedding (`addition_time_embed_dim`).
pub const SIZE_FEATURE_DIM: usize = 256;
/// Size values per sample in SDXL's add-embedding: original (h, w), crop (top, left), target
/// (h, w).
pub const SIZE_VALUES: usize = 6;

/// Architecture parameters read from the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetConfig {
    /// Output channels of the levels (SD1.5: 320, 640, 1280, 1280; SDXL: 320, 640, 1280).
    pub block_channels: Vec<usize>,
    /// Text-context width (SD1: 768, SD2: 1024, SDXL: 2048).
    pub context_dim: usize,
    /// Head sizing.
    pub heads: Heads,
    /// Latent channels in and out.
    pub latent_channels: usize,
    /// Transformer blocks in each attention of each down level; 0: no attentions.
    pub down_depth: Vec<usize>,
    /// Transformer blocks in the middle attention.
    pub mid_depth: usize,
    /// Transformer blocks in each attention of each up level (deepest first); 0: none.
    pub up_depth: Vec<usize>,
    /// `proj_in`/`proj_out` are linear layers over tokens (SD2, SDXL), not 1x1 convolutions.
    pub linear_projection: bool,
    /// Input width of SDXL's add-embedding (`label_emb`): pool2 plus
    /// [`SIZE_VALUES`] x [`SIZE_FEATURE_DIM`] (2816 for SDXL base); `None` without one.
    pub add_embedding_dim: Option<usize>,
}

impl UnetConfig {
    /// Whether this is the SD2 layout (64-channel heads, linear projections, no add-embedding).
    pub fn is_sd2(&self) -> bool {
        matches!(self.heads, Heads::Width(_)) && !self.is_sdxl()
    }

    /// Whether this is an SDXL UNet (with the size/pool add-embedding).
    pub fn is_sdxl(&self) -> bool {
        self.add_embedding_dim.is_some()
    }

    /// The model family this UNet belongs to.
    pub fn family(&self) -> ModelFamily {
        if self.is_sdxl() {
            ModelFamily::Sdxl
        } else if self.is_sd2() {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        }
    }

    /// Width of the pooled text embedding the add-embedding takes (SDXL base: 1280).
    pub fn pool_dim(&self) -> Option<usize> {
        self.add_embedding_dim
            .map(|dim| dim.saturating_sub(SIZE_VALUES * SIZE_FEATURE_DIM))
    }

    fn heads_at(&self, channels: usize) -> usize {
        match self.heads {
            Heads::Count(n) => n,
            Heads::Width(w) => (channels / w).max(1),
        }
    }
}

/// Maps a diffusers UNet tensor (or layer) name to its LDM name (without
/// `model.diffusion_model.`), SD1.x/SD2.x layout.
pub fn ldm_name(name: &str) -> String {
    mapped_name(name, false)
}

/// Maps a diffusers UNet tensor (or layer) name to its SGM name (without
/// `model.diffusion_model.`), SDXL layout: as [`ldm_name`], except that the deepest up level has
/// attentions, so its upsampler is layer 2 of its last output block (SD1: layer 1). The
/// add-embedding (`add_embedding.linear_1/2`) is `label_emb.0.0/2`.
pub fn sdxl_ldm_name(name: &str) -> String {
    mapped_name(name, true)
}

/// The diffusers-to-LDM name mapping of `family`'s UNet.
pub fn ldm_mapping(family: ModelFamily) -> fn(&str) -> String {
    match family {
        ModelFamily::Sdxl => sdxl_ldm_name,
        _ => ldm_name,
    }
}

fn mapped_name(name: &str, sdxl: bool) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    // The parts from `n` on, with a leading dot (empty for a layer path that ends before `n`).
    let tail = |n: usize| {
        parts
            .get(n..)
            .filter(|rest| !rest.is_empty())
            .map_or(String::new(), |rest| format!(".{}", rest.join(".")))
    };
    let resnet = |n: usize| {
        let inner = parts.get(n..).map_or(String::new(), |rest| rest.join("."));
        let mapped = [
            ("norm1", "in_layers.0"),
            ("conv1", "in_layers.2"),
            ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"),
            ("time_emb_proj", "emb_layers.1"),
            ("conv_shortcut", "skip_connection"),
        ]
        .iter()
        .find_map(|(from, to)| inner.strip_prefix(from).map(|rest| format!("{to}{rest}")));
        mapped.unwrap_or(inner)
    };
    let index = |s: &str| s.parse::<usize>().unwrap_or(usize::MAX);
    match parts.as_slice() {
        ["time_embedding", "linear_1", ..] => format!("time_embed.0{}", tail(2)),
        ["time_embedding", "linear_2", ..] => format!("time_embed.2{}", tail(2)),
        ["add_embedding", "linear_1", ..] => format!("label_emb.0.0{}", tail(2)),
        ["add_embedding", "linear_2", ..] => format!("label_emb.0.2{}", tail(2)),
        ["conv_in", ..] => format!("input_blocks.0.0{}", tail(1)),
        ["conv_norm_out", ..] => format!("out.0{}", tail(1)),
        ["conv_out", ..] => format!("out.2{}", tail(1)),
        ["down_blocks", i, "resnets", j, ..] => {
            format!(
                "input_blocks.{}.0.{}",
                3 * index(i) + index(j) + 1,
                resnet(4)
            )
        }
        ["down_blocks", i, "attentions", j, ..] => {
            format!("input_blocks.{}.1{}", 3 * index(i) + index(j) + 1, tail(4))
        }
        ["down_blocks", i, "downsamplers", "0", "conv", ..] => {
            format!("input_blocks.{}.0.op{}", 3 * (index(i) + 1), tail(5))
        }
        ["mid_block", "resnets", j, ..] => format!("middle_block.{}.{}", 2 * index(j), resnet(3)),
        ["mid_block", "attentions", "0", ..] => format!("middle_block.1{}", tail(3)),
        ["up_blocks", i, "resnets", j, ..] => {
            format!("output_blocks.{}.0.{}", 3 * index(i) + index(j), resnet(4))
        }
        ["up_blocks", i, "attentions", j, ..] => {
            format!("output_blocks.{}.1{}", 3 * index(i) + index(j), tail(4))
        }
        ["up_blocks", i, "upsamplers", "0", "conv", ..] => {
            let i = index(i);
            let has_attention = sdxl || i > 0;
            format!(
                "output_blocks.{}.{}.conv{}",
                3 * i + 2,
                if has_attention { 2 } else { 1 },
                tail(5)
            )
        }
        _ => name.to_string(),
    }
}

/// Reads named UNet tensors and builds frozen layers from them.
struct Loader<'a, 'b> {
    vb: &'a VarBuilder<'b>,
    /// Storage dtype of linear and convolution weights.
    weights: DType,
    /// The layer path of a diffusers layer name (see [`AdaptableLayer::path`]).
    module_path: fn(&str) -> String,
}

/// A 1x1 convolution (stride 1, no padding).
const POINTWISE: FrozenKind = FrozenKind::Conv2d {
    stride: 1,
    padding: 0,
};

impl Loader<'_, '_> {
    /// The tensor `name`, which must have `shape` (checked where the weights are fetched, see
    /// [`crate::models::Checkpoint::var_builder`]: a wrong shape is refused naming the file,
    /// the tensor and both shapes, not met later as a failing product).
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.vb
            .get(shape, name)
            .map_err(|e| Error::Model(e.to_string()))
    }

    /// The shape of the stored tensor `name`, to read the architecture from.
    fn stored_dims(&self, name: &str) -> Result<Vec<usize>> {
        let tensor = self
            .vb
            .get_unchecked(name)
            .map_err(|e| Error::Model(e.to_string()))?;
        Ok(tensor.dims().to_vec())
    }

    /// Dimension `axis` of the stored tensor `name`, to read the architecture from.
    fn stored_dim(&self, name: &str, axis: usize) -> Result<usize> {
        let dims = self.stored_dims(name)?;
        dims.get(axis).copied().ok_or_else(|| {
            Error::Model(format!(
                "the UNet tensor for `{name}` has shape {dims:?}: not the weight of an \
                 SD1.x/SD2.x/SDXL UNet"
            ))
        })
    }

    /// Whether the checkpoint holds the tensor `name`.
    fn has(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// How many of `{prefix}.0`, `{prefix}.1`, ... hold the tensor `{prefix}.{i}.{leaf}`.
    fn count(&self, prefix: &str, leaf: &str) -> usize {
        (0..)
            .take_while(|i| self.has(&format!("{prefix}.{i}.{leaf}")))
            .count()
    }

    /// A frozen layer of `kind` with weight `shape` (`[out, in]`, or `[out, in, k, k]`) and,
    /// with `bias`, a bias of `[out]`.
    fn layer(
        &self,
        path: &str,
        container: Container,
        kind: FrozenKind,
        shape: &[usize],
        bias: bool,
    ) -> Result<AdaptableLayer> {
        let weight = self
            .tensor(&format!("{path}.weight"), shape)?
            .to_dtype(self.weights)?;
        let bias = if bias {
            Some(self.tensor(&format!("{path}.bias"), &shape[..1])?)
        } else {
            None
        };
        Ok(AdaptableLayer::new(
            (self.module_path)(path),
            container,
            weight,
            bias,
            kind,
        ))
    }

    /// A linear layer `in_ch -> out_ch`.
    fn linear(
        &self,
        path: &str,
        container: Container,
        (in_ch, out_ch): (usize, usize),
        bias: bool,
    ) -> Result<AdaptableLayer> {
        self.layer(path, container, FrozenKind::Linear, &[out_ch, in_ch], bias)
    }

    /// A 3x3 convolution `in_ch -> out_ch` with padding 1.
    fn conv3(
        &self,
        path: &str,
        container: Container,
        stride: usize,
        (in_ch, out_ch): (usize, usize),
    ) -> Result<AdaptableLayer> {
        let kind = FrozenKind::Conv2d { stride, padding: 1 };
        self.layer(path, container, kind, &[out_ch, in_ch, 3, 3], true)
    }

    /// A normalisation over `channels` of `kind` that can take a trainable change.
    fn adaptable_norm(
        &self,
        path: &str,
        container: Container,
        channels: usize,
        eps: f64,
        kind: NormType,
    ) -> Result<AdaptableNorm> {
        let norm = self.norm(path, channels, eps)?;
        Ok(AdaptableNorm::new(
            (self.module_path)(path),
            container,
            norm,
            kind,
        ))
    }

    /// A GroupNorm (of [`NORM_GROUPS`] groups) over `channels` that can take a trainable change.
    fn group_norm(
        &self,
        path: &str,
        container: Container,
        channels: usize,
        eps: f64,
    ) -> Result<AdaptableNorm> {
        let kind = NormType::Group {
            groups: NORM_GROUPS,
        };
        self.adaptable_norm(path, container, channels, eps, kind)
    }

    /// A normalisation over `channels`.
    fn norm(&self, path: &str, channels: usize, eps: f64) -> Result<Norm> {
        Ok(Norm::new(
            self.tensor(&format!("{path}.weight"), &[channels])?,
            self.tensor(&format!("{path}.bias"), &[channels])?,
            eps,
        ))
    }
}

/// `ResnetBlock2D`.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: AdaptableNorm,
    conv1: AdaptableLayer,
    time_emb_proj: AdaptableLayer,
    norm2: AdaptableNorm,
    conv2: AdaptableLayer,
    conv_shortcut: Option<AdaptableLayer>,
}

impl ResnetBlock {
    /// The resnet at `path` from `in_ch` to `out_ch` channels, with time embeddings of `temb`.
    fn load(l: &Loader, path: &str, in_ch: usize, out_ch: usize, temb: usize) -> Result<Self> {
        let c = Container::Resnet;
        Ok(Self {
            norm1: l.group_norm(&format!("{path}.norm1"), c, in_ch, 1e-5)?,
            conv1: l.conv3(&format!("{path}.conv1"), c, 1, (in_ch, out_ch))?,
            time_emb_proj: l.linear(&format!("{path}.time_emb_proj"), c, (temb, out_ch), true)?,
            norm2: l.group_norm(&format!("{path}.norm2"), c, out_ch, 1e-5)?,
            conv2: l.conv3(&format!("{path}.conv2"), c, 1, (out_ch, out_ch))?,
            conv_shortcut: if in_ch != out_ch {
                Some(l.layer(
                    &format!("{path}.conv_shortcut"),
                    c,
                    POINTWISE,
                    &[out_ch, in_ch, 1, 1],
                    true,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> candle_core::Result<Tensor> {
        self.finish(&self.second_conv_input(x, temb)?, x)
    }

    /// The block up to its second convolution: that convolution's input.
    fn second_conv_input(&self, x: &Tensor, temb: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self
            .time_emb_proj
            .forward(&temb.silu()?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        self.norm2.forward_silu(&h.broadcast_add(&t)?)
    }

    /// The second convolution of `h` plus the shortcut of the block's input `x`.
    fn finish(&self, h: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv2.forward(h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        shortcut + h
    }

    /// The block, with gradient checkpointing when `checkpoint` is set. The second convolution
    /// and the shortcut are left out of the recomputed part, whose output is the convolution's
    /// input (kept until the backward pass), so the backward pass does not run them again.
    fn apply(&self, x: &Tensor, temb: &Tensor, checkpoint: bool) -> candle_core::Result<Tensor> {
        match checkpoint {
            true => self.finish(&checkpointed(self, x, temb)?, x),
            false => self.forward(x, temb),
        }
    }

    fn visit(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        f(&mut self.conv1);
        f(&mut self.time_emb_proj);
        f(&mut self.conv2);
        if let Some(conv) = &mut self.conv_shortcut {
            f(conv);
        }
    }

    fn visit_norms(&mut self, f: &mut dyn FnMut(&mut AdaptableNorm)) {
        f(&mut self.norm1);
        f(&mut self.norm2);
    }
}

/// Recomputes [`ResnetBlock::second_conv_input`] (see [`ResnetBlock::apply`]).
impl Recomputable for ResnetBlock {
    fn run(&self, x: &Tensor, temb: &Tensor) -> candle_core::Result<Tensor> {
        self.second_conv_input(x, temb)
    }
}

/// Multi-head attention (`attn1` self, `attn2` cross).
#[derive(Debug, Clone)]
struct Attention {
    to_q: AdaptableLayer,
    to_k: AdaptableLayer,
    to_v: AdaptableLayer,
    to_out: AdaptableLayer,
    heads: usize,
}

impl Attention {
    /// The attention at `path` over `channels`, attending to a context of width `context`.
    fn load(l: &Loader, path: &str, heads: usize, channels: usize, context: usize) -> Result<Self> {
        let t = Container::Transformer;
        let c = channels;
        Ok(Self {
            to_q: l.linear(&format!("{path}.to_q"), t, (c, c), false)?,
            to_k: l.linear(&format!("{path}.to_k"), t, (context, c), false)?,
            to_v: l.linear(&format!("{path}.to_v"), t, (context, c), false)?,
            to_out: l.linear(&format!("{path}.to_out.0"), t, (c, c), true)?,
            heads,
        })
    }

    /// The attention before its output projection `to_out`: the heads' outputs side by side.
    fn attend(&self, x: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let context = context.unwrap_or(x);
        let head_dim = x.dim(2)? / self.heads;
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let products = Products::matching(self.to_q.weight());
        multi_head_attention(&q, &k, &v, self.heads, scale, products)
    }

    fn visit(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        f(&mut self.to_q);
        f(&mut self.to_k);
        f(&mut self.to_v);
        f(&mut self.to_out);
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: AdaptableNorm,
    attn1: Attention,
    norm2: AdaptableNorm,
    attn2: Attention,
    norm3: AdaptableNorm,
    ff_in: AdaptableLayer,
    ff_out: AdaptableLayer,
}

impl TransformerBlock {
    /// The block at `path` over `channels` with a text context of width `context`; its
    /// GEGLU feed-forward is 4 times as wide (its input projection twice that).
    fn load(l: &Loader, path: &str, heads: usize, channels: usize, context: usize) -> Result<Self> {
        let t = Container::Transformer;
        let c = channels;
        Ok(Self {
            norm1: l.adaptable_norm(&format!("{path}.norm1"), t, c, 1e-5, NormType::Layer)?,
            attn1: Attention::load(l, &format!("{path}.attn1"), heads, c, c)?,
            norm2: l.adaptable_norm(&format!("{path}.norm2"), t, c, 1e-5, NormType::Layer)?,
            attn2: Attention::load(l, &format!("{path}.attn2"), heads, c, context)?,
            norm3: l.adaptable_norm(&format!("{path}.norm3"), t, c, 1e-5, NormType::Layer)?,
            ff_in: l.linear(&format!("{path}.ff.net.0.proj"), t, (c, 8 * c), true)?,
            ff_out: l.linear(&format!("{path}.ff.net.2"), t, (4 * c, c), true)?,
        })
    }

    /// The block; with `checkpoint`, each of its three residual parts is checkpointed up to its
    /// output projection. The projection runs outside the recomputed part and keeps its input
    /// (a tensor of the block's width, four times that for the feed-forward) until the backward
    /// pass, which so does not run it again: about a third of the block's multiply-adds.
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        checkpoint: bool,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for part in [Part::SelfAttention, Part::CrossAttention, Part::FeedForward] {
            let inner = if checkpoint {
                let part = BlockPart {
                    block: self.clone(),
                    part,
                };
                checkpointed(&part, &x, context)?
            } else {
                self.inner(part, &x, context)?
            };
            x = (self.output_projection(part).forward(&inner)? + x)?;
        }
        Ok(x)
    }

    /// The residual part `part` of the block up to its output projection.
    fn inner(&self, part: Part, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        match part {
            Part::SelfAttention => self.attn1.attend(&self.norm1.forward(x)?, None),
            Part::CrossAttention => self.attn2.attend(&self.norm2.forward(x)?, Some(context)),
            Part::FeedForward => geglu(&self.ff_in.forward(&self.norm3.forward(x)?)?),
        }
    }

    fn output_projection(&self, part: Part) -> &AdaptableLayer {
        match part {
            Part::SelfAttention => &self.attn1.to_out,
            Part::CrossAttention => &self.attn2.to_out,
            Part::FeedForward => &self.ff_out,
        }
    }

    fn visit(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        self.attn1.visit(f);
        self.attn2.visit(f);
        f(&mut self.ff_in);
        f(&mut self.ff_out);
    }

    fn visit_norms(&mut self, f: &mut dyn FnMut(&mut AdaptableNorm)) {
        f(&mut self.norm1);
        f(&mut self.norm2);
        f(&mut self.norm3);
    }
}

/// The residual parts of a [`TransformerBlock`], each added to the stream it reads.
#[derive(Debug, Clone, Copy)]
enum Part {
    SelfAttention,
    CrossAttention,
    FeedForward,
}

/// One residual part of a transformer block, recomputed in the backward pass up to its output
/// projection (see [`TransformerBlock::forward`]).
#[derive(Debug, Clone)]
struct BlockPart {
    block: TransformerBlock,
    part: Part,
}

impl Recomputable for BlockPart {
    fn run(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        self.block.inner(self.part, x, context)
    }
}

/// How a [`SpatialTransformer`] is built.
#[derive(Debug, Clone, Copy)]
struct TransformerShape {
    heads: usize,
    channels: usize,
    context: usize,
    depth: usize,
    linear_projection: bool,
}

/// `Transformer2DModel`: GroupNorm, `proj_in`, `depth` transformer blocks, `proj_out`.
#[derive(Debug, Clone)]
struct SpatialTransformer {
    norm: AdaptableNorm,
    proj_in: AdaptableLayer,
    blocks: Vec<TransformerBlock>,
    proj_out: AdaptableLayer,
    linear_projection: bool,
}

impl SpatialTransformer {
    /// The transformer at `path`. Linear projections apply to the tokens; 1x1-convolution
    /// projections to the feature map (mathematically the same map, but sd-scripts' modules and
    /// so the LoRA shapes differ).
    fn load(l: &Loader, path: &str, shape: TransformerShape) -> Result<Self> {
        let t = Container::Transformer;
        let c = shape.channels;
        let projection = |name: &str| {
            let path = format!("{path}.{name}");
            if shape.linear_projection {
                l.linear(&path, t, (c, c), true)
            } else {
                l.layer(&path, t, POINTWISE, &[c, c, 1, 1], true)
            }
        };
        let blocks = (0..shape.depth)
            .map(|k| {
                let block = format!("{path}.transformer_blocks.{k}");
                TransformerBlock::load(l, &block, shape.heads, c, shape.context)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: l.group_norm(&format!("{path}.norm"), t, c, 1e-6)?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
            linear_projection: shape.linear_projection,
        })
    }

    /// The transformer; with `checkpoint`, each transformer block is checkpointed.
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        checkpoint: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |map: Tensor| map.flatten_from(2)?.transpose(1, 2)?.contiguous();
        let mut tokens = if self.linear_projection {
            self.proj_in.forward(&to_tokens(normed)?)?
        } else {
            to_tokens(self.proj_in.forward(&normed)?)?
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, checkpoint)?;
        }
        let to_map = |tokens: Tensor| tokens.transpose(1, 2)?.reshape((b, c, h, w));
        let out = if self.linear_projection {
            to_map(self.proj_out.forward(&tokens)?)?
        } else {
            self.proj_out.forward(&to_map(tokens)?)?
        };
        out + x
    }

    fn visit(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        f(&mut self.proj_in);
        for block in &mut self.blocks {
            block.visit(f);
        }
        f(&mut self.proj_out);
    }

    fn visit_norms(&mut self, f: &mut dyn FnMut(&mut AdaptableNorm)) {
        f(&mut self.norm);
        for block in &mut self.blocks {
            block.visit_norms(f);
        }
    }
}

/// One down or up level.
#[derive(Debug, Clone)]
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    resample: Option<AdaptableLayer>,
}

impl Level {
    fn visit(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        for (i, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.visit(f);
            if let Some(attn) = self.attentions.get_mut(i) {
                attn.visit(f);
            }
        }
        if let Some(conv) = &mut self.resample {
            f(conv);
        }
    }

    fn visit_norms(&mut self, f: &mut dyn FnMut(&mut AdaptableNorm)) {
        for (i, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.visit_norms(f);
            if let Some(attn) = self.attentions.get_mut(i) {
                attn.visit_norms(f);
            }
        }
    }
}

/// The SD1.x/SD2.x/SDXL conditional UNet.
#[derive(Debug, Clone)]
pub struct Unet {
    /// Architecture read from the weights.
    pub config: UnetConfig,
    time_linear_1: AdaptableLayer,
    time_linear_2: AdaptableLayer,
    /// SDXL's add-embedding (`label_emb`): two linear layers with a SiLU between.
    add_embedding: Option<[AdaptableLayer; 2]>,
    conv_in: AdaptableLayer,
    down: Vec<Level>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialTransformer,
    up: Vec<Level>,
    norm_out: Norm,
    conv_out: AdaptableLayer,
    /// Resnets and transformer blocks at this many of the highest-resolution levels recompute
    /// their activations in the backward pass ([`crate::models::recompute`]); 0: none.
    checkpointed_levels: usize,
}

impl Unet {
    /// Reads the architecture from tensor shapes and loads the frozen weights (diffusers names):
    /// linear and convolution weights in `weights`, biases and norms in `vb`'s dtype (the compute
    /// dtype, see [`crate::models::precision::ModelPrecision`]).
    pub fn load(vb: &VarBuilder<'_>, weights: DType) -> Result<Self> {
        let probe = Loader {
            vb,
            weights,
            module_path: str::to_string,
        };
        let config = detect_config(&probe)?;
        let module_path: fn(&str) -> String = if config.is_sdxl() {
            sdxl_ldm_name
        } else {
            str::to_string
        };
        let l = Loader {
            vb,
            weights,
            module_path,
        };
        let ch = config.block_channels.clone();
        let levels = ch.len();
        let (latent, context) = (config.latent_channels, config.context_dim);
        let temb = 4 * ch[0];
        let other = Container::Other;
        let transformer = |channels: usize, depth: usize| TransformerShape {
            heads: config.heads_at(channels),
            channels,
            context,
            depth,
            linear_projection: config.linear_projection,
        };
        let time_linear_1 = l.linear("time_embedding.linear_1", other, (ch[0], temb), true)?;
        let time_linear_2 = l.linear("time_embedding.linear_2", other, (temb, temb), true)?;
        let add_embedding = match config.add_embedding_dim {
            Some(dim) => Some([
                l.linear("add_embedding.linear_1", other, (dim, temb), true)?,
                l.linear("add_embedding.linear_2", other, (temb, temb), true)?,
            ]),
            None => None,
        };
        let conv_in = l.conv3("conv_in", other, 1, (latent, ch[0]))?;
        let mut down = Vec::with_capacity(levels);
        let mut in_ch = ch[0];
        for (i, &out_ch) in ch.iter().enumerate() {
            let mut level = Level {
                resnets: Vec::new(),
                attentions: Vec::new(),
                resample: None,
            };
            for j in 0..LAYERS_PER_BLOCK {
                let res_in = if j == 0 { in_ch } else { out_ch };
                level.resnets.push(ResnetBlock::load(
                    &l,
                    &format!("down_blocks.{i}.resnets.{j}"),
                    res_in,
                    out_ch,
                    temb,
                )?);
                if config.down_depth[i] > 0 {
                    level.attentions.push(SpatialTransformer::load(
                        &l,
                        &format!("down_blocks.{i}.attentions.{j}"),
                        transformer(out_ch, config.down_depth[i]),
                    )?);
                }
            }
            if i + 1 < levels {
                level.resample = Some(l.conv3(
                    &format!("down_blocks.{i}.downsamplers.0.conv"),
                    Container::Downsample,
                    2,
                    (out_ch, out_ch),
                )?);
            }
            down.push(level);
            in_ch = out_ch;
        }
        let last = ch[levels - 1];
        let mid_resnets = [
            ResnetBlock::load(&l, "mid_block.resnets.0", last, last, temb)?,
            ResnetBlock::load(&l, "mid_block.resnets.1", last, last, temb)?,
        ];
        let mid_attention = SpatialTransformer::load(
            &l,
            "mid_block.attentions.0",
            transformer(last, config.mid_depth),
        )?;
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(levels);
        let mut prev_out = reversed[0];
        for i in 0..levels {
            let out_ch = reversed[i];
            let skip_in = reversed[(i + 1).min(levels - 1)];
            let mut level = Level {
                resnets: Vec::new(),
                attentions: Vec::new(),
                resample: None,
            };
            for j in 0..=LAYERS_PER_BLOCK {
                let skip = if j == LAYERS_PER_BLOCK {
                    skip_in
                } else {
                    out_ch
                };
                let res_in = if j == 0 { prev_out } else { out_ch };
                level.resnets.push(ResnetBlock::load(
                    &l,
                    &format!("up_blocks.{i}.resnets.{j}"),
                    res_in + skip,
                    out_ch,
                    temb,
                )?);
                if config.up_depth[i] > 0 {
                    level.attentions.push(SpatialTransformer::load(
                        &l,
                        &format!("up_blocks.{i}.attentions.{j}"),
                        transformer(out_ch, config.up_depth[i]),
                    )?);
                }
            }
            if i + 1 < levels {
                level.resample = Some(l.conv3(
                    &format!("up_blocks.{i}.upsamplers.0.conv"),
                    Container::Upsample,
                    1,
                    (out_ch, out_ch),
                )?);
            }
            up.push(level);
            prev_out = out_ch;
        }
        Ok(Self {
            norm_out: l.norm("conv_norm_out", ch[0], 1e-5)?,
            conv_out: l.conv3("conv_out", other, 1, (ch[0], latent))?,
            config,
            time_linear_1,
            time_linear_2,
            add_embedding,
            conv_in,
            down,
            mid_resnets,
            mid_attention,
            up,
            checkpointed_levels: 0,
        })
    }

    /// Gradient checkpointing (`--gradient_checkpointing`): the resnets and transformer blocks
    /// of the `levels` highest-resolution levels (down, middle and up blocks at those
    /// resolutions) keep only their inputs for the backward pass and run again there. 0 turns it
    /// off; `usize::MAX` checkpoints every block, as sd-scripts does. Every level costs about
    /// the same compute, but each deeper level holds half the activations of the one above it,
    /// so the first levels give most of the saving.
    pub fn set_gradient_checkpointing(&mut self, levels: usize) {
        self.checkpointed_levels = levels;
    }

    /// Runs the 3x3 stride-1 convolutions in the Winograd domain, for inference: 4x fewer
    /// multiplications. Those with at most `max_kept_channels` output channels (the
    /// high-resolution levels, where most convolution work is) keep their transformed kernels,
    /// 4x their f32 weight size in memory (about 1 GB at SD1.5 size for 640 channels); the
    /// wider ones transform them at each pass over enough tiles and run im2col otherwise
    /// ([`crate::models::conv::Conv2d::transforming_per_pass`]). Call it after every LoRA has
    /// been merged.
    pub fn use_winograd_forward(&mut self, max_kept_channels: usize) -> Result<()> {
        let mut failure = None;
        self.visit_layers(&mut |layer| {
            let kept = layer
                .weight()
                .dim(0)
                .is_ok_and(|out| out <= max_kept_channels);
            if failure.is_none() {
                failure = layer.use_winograd_forward(kept).err();
            }
        });
        match failure {
            Some(e) => Err(Error::Model(format!("Winograd convolutions: {e}"))),
            None => Ok(()),
        }
    }

    /// Predicts noise (or v) for latents `[B, 4, H, W]`, per-sample timesteps `[B]` (any numeric
    /// dtype) and text context `[B, T, context_dim]`. SDXL UNets also take the add-embedding
    /// input `vector` `[B, add_embedding_dim]` ([`sdxl_vector`]); other UNets take `None`.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        vector: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let temb = timestep_embedding(timesteps, self.config.block_channels[0])?
            .to_dtype(latents.dtype())?;
        let mut temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&temb)?.silu()?)?;
        match (&self.add_embedding, vector) {
            (Some([linear_1, linear_2]), Some(vector)) => {
                let vector = vector.to_dtype(latents.dtype())?;
                temb = (temb + linear_2.forward(&linear_1.forward(&vector)?.silu()?)?)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(candle_core::Error::Msg(
                    "an SDXL UNet needs the size/pool2 conditioning vector".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(candle_core::Error::Msg(
                    "a conditioning vector was given, but this UNet has no SDXL add-embedding"
                        .into(),
                ))
            }
        }
        let levels = self.down.len();
        let checkpoint_at = |level: usize| level < self.checkpointed_levels;
        let mut x = self.conv_in.forward(latents)?;
        let mut skips = vec![x.clone()];
        for (i, level) in self.down.iter().enumerate() {
            let checkpoint = checkpoint_at(i);
            for (j, resnet) in level.resnets.iter().enumerate() {
                x = resnet.apply(&x, &temb, checkpoint)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(&x, context, checkpoint)?;
                }
                skips.push(x.clone());
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(&x)?;
                skips.push(x.clone());
            }
        }
        let checkpoint = checkpoint_at(levels - 1);
        x = self.mid_resnets[0].apply(&x, &temb, checkpoint)?;
        x = self.mid_attention.forward(&x, context, checkpoint)?;
        x = self.mid_resnets[1].apply(&x, &temb, checkpoint)?;
        for (i, level) in self.up.iter().enumerate() {
            let checkpoint = checkpoint_at(levels - 1 - i);
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
                x = resnet.apply(&Tensor::cat(&[&x, &skip], 1)?, &temb, checkpoint)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(&x, context, checkpoint)?;
                }
            }
            if let Some(conv) = &level.resample {
                // To the size of the skip connection it meets next (2x, or one less where a
                // stride-2 convolution rounded an odd size up, as diffusers' `upsample_size`).
                let (_, _, h, w) = x.dims4()?;
                let (h, w) = match skips.last() {
                    Some(skip) => {
                        let (_, _, sh, sw) = skip.dims4()?;
                        (sh, sw)
                    }
                    None => (2 * h, 2 * w),
                };
                x = conv.forward(&x.upsample_nearest2d(h, w)?)?;
            }
        }
        self.conv_out
            .forward(&self.norm_out.group_silu(NORM_GROUPS, &x)?)
    }
}

impl Adaptable for Unet {
    fn visit_layers(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        f(&mut self.time_linear_1);
        f(&mut self.time_linear_2);
        if let Some([linear_1, linear_2]) = &mut self.add_embedding {
            f(linear_1);
            f(linear_2);
        }
        f(&mut self.conv_in);
        for level in &mut self.down {
            level.visit(f);
        }
        self.mid_resnets[0].visit(f);
        self.mid_attention.visit(f);
        self.mid_resnets[1].visit(f);
        for level in &mut self.up {
            level.visit(f);
        }
        f(&mut self.conv_out);
    }

    fn visit_norms(&mut self, f: &mut dyn FnMut(&mut AdaptableNorm)) {
        for level in &mut self.down {
            level.visit_norms(f);
        }
        self.mid_resnets[0].visit_norms(f);
        self.mid_attention.visit_norms(f);
        self.mid_resnets[1].visit_norms(f);
        for level in &mut self.up {
            level.visit_norms(f);
        }
    }
}

/// SDXL's add-embedding input for a batch, as sd-scripts' `sdxl_train_network.py` builds it:
/// `pool2` `[B, P]` followed by the sinusoidal embeddings ([`timestep_embedding`],
/// [`SIZE_FEATURE_DIM`] wide) of each sample's six size values `[original height, original
/// width, crop top, crop left, target height, target width]`.
pub fn sdxl_vector(pool2: &Tensor, sizes: &[[i64; SIZE_VALUES]]) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = sizes.iter().flatten().map(|&v| v as f32).collect();
    let batch = sizes.len();
    let values = Tensor::from_vec(values, batch * SIZE_VALUES, pool2.device())?;
    let features = timestep_embedding(&values, SIZE_FEATURE_DIM)?
        .reshape((batch, SIZE_VALUES * SIZE_FEATURE_DIM))?
        .to_dtype(pool2.dtype())?;
    Tensor::cat(&[pool2, &features], 1)
}

/// Sinusoidal timestep embedding `[cos, sin]` (diffusers `flip_sin_to_cos=True`, shift 0), f32.
/// The frequencies are computed in f32 step by step as sd-scripts computes them in torch
/// (`exp(-ln(10000) * i / half)`), so that large arguments (SDXL's image sizes) round alike.
pub fn timestep_embedding(timesteps: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    let log_period = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_period * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

/// The architecture, read from the shapes of a few tensors (every tensor's shape is then
/// checked against it as the weights load).
fn detect_config(l: &Loader) -> Result<UnetConfig> {
    let latent_channels = l.stored_dim("conv_in.weight", 1)?;
    let levels = l.count("down_blocks", "resnets.0.conv1.weight");
    let mut block_channels = Vec::with_capacity(levels);
    for i in 0..levels {
        block_channels.push(l.stored_dim(&format!("down_blocks.{i}.resnets.0.conv1.weight"), 0)?);
    }
    if !(2..=4).contains(&levels) || block_channels.iter().any(|c| c % NORM_GROUPS != 0) {
        return Err(Error::Model(format!(
            "UNet levels with channels {block_channels:?}: not an SD1.x/SD2.x/SDXL UNet (2 to 4 \
             levels, channels multiples of {NORM_GROUPS})"
        )));
    }
    let depth =
        |attention: &str| l.count(&format!("{attention}.transformer_blocks"), "norm1.weight");
    let down_depth: Vec<usize> = (0..levels)
        .map(|i| depth(&format!("down_blocks.{i}.attentions.0")))
        .collect();
    let up_depth: Vec<usize> = (0..levels)
        .map(|i| depth(&format!("up_blocks.{i}.attentions.0")))
        .collect();
    let mid_depth = depth("mid_block.attentions.0");
    let Some(first) = down_depth.iter().position(|&d| d > 0) else {
        return Err(Error::Model(
            "the UNet has no cross-attention in its down levels: not an SD1.x/SD2.x/SDXL UNet"
                .into(),
        ));
    };
    let attention = format!("down_blocks.{first}.attentions.0");
    let context_dim = l.stored_dim(
        &format!("{attention}.transformer_blocks.0.attn2.to_k.weight"),
        1,
    )?;
    let linear_projection = l.stored_dims(&format!("{attention}.proj_in.weight"))?.len() == 2;
    let add_embedding_dim = if l.has("add_embedding.linear_1.weight") {
        Some(l.stored_dim("add_embedding.linear_1.weight", 1)?)
    } else {
        None
    };
    // Head sizes are not stored: SD2 and SDXL use 64-channel heads, SD1 8 heads. SD2 is told
    // by its linear projections (SD1's are 1x1 convolutions) or its 1024-wide context.
    let heads = if context_dim == 1024 || linear_projection || add_embedding_dim.is_some() {
        Heads::Width(64)
    } else {
        Heads::Count(8)
    };
    Ok(UnetConfig {
        block_channels,
        context_dim,
        heads,
        latent_channels,
        down_depth,
        mid_depth,
        up_depth,
        linear_projection,
        add_embedding_dim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::checkpoint::{Checkpoint, Component};
    use candle_core::Device;

    #[test]
    fn a_tensor_of_the_wrong_shape_is_refused_naming_file_tensor_and_shapes() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/sd15-tiny/model.safetensors");
        let mut tensors = candle_core::safetensors::load(&fixture, &Device::Cpu).unwrap();
        let name = "model.diffusion_model.input_blocks.2.0.in_layers.2.weight";
        let weight = &tensors[name];
        assert_eq!(weight.dims(), [32, 32, 3, 3]);
        let reshaped = weight.reshape((64, 16, 3, 3)).unwrap();
        tensors.insert(name.to_string(), reshaped);
        let dir = tempfile::tempdir().unwrap();
        let damaged = dir.path().join("damaged.safetensors");
        candle_core::safetensors::save(&tensors, &damaged).unwrap();

        let checkpoint = Checkpoint::open(&damaged).unwrap();
        let vb = checkpoint
            .var_builder(Component::Unet, DType::F32, &Device::Cpu, &ldm_name)
            .unwrap();
        let message = Unet::load(&vb, DType::F32).unwrap_err().to_string();
        for part in [
            "damaged.safetensors",
            name,
            "[64, 16, 3, 3]",
            "expects [32, 32, 3, 3]",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
    }
}
