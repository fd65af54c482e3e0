//! The adaptable layers of a model: frozen linear and convolution layers a trainable network
//! (LoRA, in `crate::networks`) can attach an adapter to, and the visitor that reaches them.

use candle_core::{DType, Tensor};

use crate::models::frozen::{FrozenKind, FrozenOp};
use crate::models::low_rank::{linear_with_branch, pointwise_conv_with_branch, LowRankBranch};
use crate::models::norm::Norm;

/// A trainable change attached to a frozen layer.
pub trait LayerAdapter: std::any::Any + std::fmt::Debug + Send + Sync {
    /// What the adapter adds to the output of a layer of `kind` for input `x`, or `None` when it
    /// adds nothing this forward pass.
    fn delta(&self, x: &Tensor, kind: FrozenKind) -> candle_core::Result<Option<Tensor>>;

    /// The adapter as a plain low-rank branch for this forward pass, when it is one (a linear or
    /// pointwise-convolution layer then runs it fused with the frozen product,
    /// [`linear_with_branch`]).
    fn low_rank_branch(&self) -> Option<LowRankBranch> {
        None
    }

    /// A copy behind a new box (adapters share their trainable variables).
    fn clone_box(&self) -> Box<dyn LayerAdapter>;
}

impl Clone for Box<dyn LayerAdapter> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// The sd-scripts model class that contains a layer; drives module selection
/// (docs/kohya-compat.md#lora-module-selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// Inside a `Transformer2DModel` (the default LierLa target).
    Transformer,
    /// Inside a `ResnetBlock2D` (C3Lier only).
    Resnet,
    /// A `Downsample2D` (C3Lier only).
    Downsample,
    /// An `Upsample2D` (C3Lier only).
    Upsample,
    /// A linear layer of a CLIP text encoder's `CLIPAttention` / `CLIPMLP` (always a target
    /// when the text encoder is trained).
    TextEncoder,
    /// Anything else (never adapted).
    Other,
}

/// A frozen linear or convolution layer that may carry a trainable LoRA module.
#[derive(Debug, Clone)]
pub struct AdaptableLayer {
    /// Diffusers-style path of the layer, e.g. `down_blocks.0.attentions.0.proj_in`.
    pub path: String,
    /// The sd-scripts class that contains it.
    pub container: Container,
    /// The kohya name prefix of the model the layer is in (`lora_unet`, `lora_te`, `lora_te1`,
    /// `lora_te2`).
    pub lora_prefix: &'static str,
    op: FrozenOp,
    /// The attached trainable adapter (a LoRA module), if any.
    pub adapter: Option<Box<dyn LayerAdapter>>,
}

impl AdaptableLayer {
    /// A frozen layer from its weight and optional bias.
    pub fn new(
        path: String,
        container: Container,
        weight: Tensor,
        bias: Option<Tensor>,
        kind: FrozenKind,
    ) -> Self {
        Self {
            path,
            container,
            lora_prefix: "lora_unet",
            op: FrozenOp::new(weight, bias, kind),
            adapter: None,
        }
    }

    /// The kohya name of a LoRA module on this layer: the prefix, then the path with `_` for
    /// `.` (e.g. `lora_te_text_model_encoder_layers_0_self_attn_q_proj`).
    pub fn lora_name(&self) -> String {
        format!("{}_{}", self.lora_prefix, self.path.replace('.', "_"))
    }

    /// The frozen base weight.
    pub fn weight(&self) -> &Tensor {
        self.op.weight()
    }

    /// The frozen bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.op.bias()
    }

    /// Linear or convolution (with stride and padding).
    pub fn kind(&self) -> FrozenKind {
        self.op.kind()
    }

    /// Adds `delta` (shaped like the weight) to the frozen weight.
    pub fn merge_into_weight(&mut self, delta: &Tensor) -> candle_core::Result<()> {
        let weight = self.op.weight();
        let merged = (weight.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?
            .to_dtype(weight.dtype())?;
        self.op = FrozenOp::new(merged, self.op.bias().cloned(), self.op.kind());
        Ok(())
    }

    /// Adds `delta` (one value per output channel) to the frozen bias; a layer without a bias
    /// gets `delta` as its bias.
    pub fn merge_into_bias(&mut self, delta: &Tensor) -> candle_core::Result<()> {
        let weight = self.op.weight().clone();
        let bias = match self.op.bias() {
            Some(bias) => (bias.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?
                .to_dtype(bias.dtype())?,
            None => delta.to_dtype(weight.dtype())?,
        };
        self.op = FrozenOp::new(weight, Some(bias), self.op.kind());
        Ok(())
    }

    /// Runs a 3x3 stride-1 convolution's forward pass in the Winograd domain from now on, its
    /// transformed kernels kept or made per pass ([`FrozenOp::with_winograd_forward`]); other
    /// layers are unchanged. A later [`Self::merge_into_weight`] goes back to the plain
    /// convolution.
    pub fn use_winograd_forward(&mut self, kept_kernels: bool) -> candle_core::Result<()> {
        self.op = self.op.clone().with_winograd_forward(kept_kernels)?;
        Ok(())
    }

    /// Stores a linear layer's weight transposed from now on
    /// ([`FrozenOp::with_inference_layout`]): faster products with few rows; other layers are
    /// unchanged. A later [`Self::merge_into_weight`] goes back to the plain layout.
    pub fn use_inference_layout(&mut self) -> candle_core::Result<()> {
        self.op = self.op.clone().with_inference_layout()?;
        Ok(())
    }

    /// `W0 x + b`, plus the adapter's change when one is attached.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(branch) = self.adapter.as_ref().and_then(|a| a.low_rank_branch()) {
            let (weight, bias) = (self.op.weight(), self.op.bias());
            let fused = match self.op.kind() {
                FrozenKind::Linear => linear_with_branch(x, weight, bias, &branch)?,
                FrozenKind::Conv2d {
                    stride: 1,
                    padding: 0,
                } => pointwise_conv_with_branch(x, weight, bias, &branch)?,
                FrozenKind::Conv2d { .. } => None,
            };
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        let y = self.op.forward(x)?;
        match self.adapter.as_ref().map(|a| a.delta(x, self.op.kind())) {
            Some(delta) => match delta? {
                Some(delta) => y + delta,
                None => Ok(y),
            },
            None => Ok(y),
        }
    }
}

/// A trainable change of a normalisation layer's weight and bias (lycoris' `train_norm`).
pub trait NormAdapter: std::any::Any + std::fmt::Debug + Send + Sync {
    /// The changes `(Δweight, Δbias)` (one value per channel) for this forward pass, or `None`
    /// when the adapter adds nothing this time.
    fn changes(&self) -> candle_core::Result<Option<(Tensor, Tensor)>>;

    /// A copy behind a new box (adapters share their trainable variables).
    fn clone_box(&self) -> Box<dyn NormAdapter>;
}

impl Clone for Box<dyn NormAdapter> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// What a normalisation layer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormType {
    /// `GroupNorm` over `[B, C, H, W]` with this many groups.
    Group {
        /// Number of channel groups.
        groups: usize,
    },
    /// `LayerNorm` over the last dimension.
    Layer,
}

/// A frozen GroupNorm or LayerNorm that may carry a trainable change of its weight and bias.
#[derive(Debug, Clone)]
pub struct AdaptableNorm {
    /// Diffusers-style path of the layer, e.g. `down_blocks.0.resnets.0.norm1`.
    pub path: String,
    /// The sd-scripts class that contains it.
    pub container: Container,
    /// The kohya name prefix of the model the layer is in.
    pub lora_prefix: &'static str,
    norm: Norm,
    kind: NormType,
    /// The attached trainable change, if any.
    pub adapter: Option<Box<dyn NormAdapter>>,
}

impl AdaptableNorm {
    /// A frozen normalisation layer.
    pub(crate) fn new(path: String, container: Container, norm: Norm, kind: NormType) -> Self {
        Self {
            path,
            container,
            lora_prefix: "lora_unet",
            norm,
            kind,
            adapter: None,
        }
    }

    /// The kohya name of a module on this layer (as [`AdaptableLayer::lora_name`]).
    pub fn lora_name(&self) -> String {
        format!("{}_{}", self.lora_prefix, self.path.replace('.', "_"))
    }

    /// GroupNorm or LayerNorm.
    pub fn kind(&self) -> NormType {
        self.kind
    }

    /// The number of channels (of the weight and the bias).
    pub fn channels(&self) -> usize {
        self.norm.weight().elem_count()
    }

    /// Adds `weight` and `bias` (one value per channel) to the frozen weight and bias.
    pub fn merge(&mut self, weight: &Tensor, bias: &Tensor) -> candle_core::Result<()> {
        let add = |base: &Tensor, delta: &Tensor| -> candle_core::Result<Tensor> {
            (base.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?.reshape(base.shape())?)?
                .to_dtype(base.dtype())
        };
        let eps = self.norm.eps();
        self.norm = Norm::new(
            add(self.norm.weight(), weight)?,
            add(self.norm.bias(), bias)?,
            eps,
        );
        Ok(())
    }

    /// The normalisation of `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }

    /// The normalisation of `x` followed by SiLU (fused when no adapter changes it).
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let changes = match &self.adapter {
            Some(adapter) => adapter.changes()?,
            None => None,
        };
        let Some((weight_change, bias_change)) = changes else {
            let y = match self.kind {
                NormType::Group { groups } if silu => return self.norm.group_silu(groups, x),
                NormType::Group { groups } => self.norm.group(groups, x)?,
                NormType::Layer => self.norm.layer(x)?,
            };
            return if silu { y.silu() } else { Ok(y) };
        };
        // The normalised input times the changed weight, plus the changed bias.
        let unit = self.norm.unit()?;
        let (standardised, shape) = match self.kind {
            NormType::Group { groups } => (unit.group(groups, x)?, vec![self.channels(), 1, 1]),
            NormType::Layer => (unit.layer(x)?, vec![self.channels()]),
        };
        let changed = |base: &Tensor, change: Tensor| -> candle_core::Result<Tensor> {
            (base.to_dtype(DType::F32)? + change.to_dtype(DType::F32)?)?
                .to_dtype(x.dtype())?
                .reshape(shape.as_slice())
        };
        let weight = changed(self.norm.weight(), weight_change)?;
        let bias = changed(self.norm.bias(), bias_change)?;
        let y = standardised.broadcast_mul(&weight)?.broadcast_add(&bias)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

/// Something whose adaptable layers can be visited (the UNet, a text encoder).
pub trait Adaptable {
    /// Calls `f` on every adaptable layer, in model order.
    fn visit_layers(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer));

    /// Calls `f` on every normalisation layer that can take a trainable change, in model order
    /// (none by default).
    fn visit_norms(&mut self, _f: &mut dyn FnMut(&mut AdaptableNorm)) {}

    /// Stores every linear layer's weight transposed, for inference
    /// ([`AdaptableLayer::use_inference_layout`]). Call it after every LoRA has been merged.
    fn use_inference_layout(&mut self) -> candle_core::Result<()> {
        let mut outcome = Ok(());
        self.visit_layers(&mut |layer| {
            if outcome.is_ok() {
                outcome = layer.use_inference_layout();
            }
        });
        outcome
    }
}

/// Several models visited one after the other as one (sd-scripts' network over the text
/// encoder(s) and the UNet: text-encoder modules first).
pub struct Joined<'a>(pub Vec<&'a mut dyn Adaptable>);

impl Adaptable for Joined<'_> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer)) {
        for model in self.0.iter_mut() {
            model.visit_layers(f);
        }
    }

    fn visit_norms(&mut self, f: &mut dyn FnMut(&mut AdaptableNorm)) {
        for model in self.0.iter_mut() {
            model.visit_norms(f);
        }
    }
}
