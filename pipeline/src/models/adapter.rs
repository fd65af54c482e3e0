//! The adaptable layers of a model: frozen linear and convolution layers a trainable network
//! (LoRA, in `crate::networks`) can attach an adapter to, and the visitor that reaches them.

use candle_core::{DType, Tensor};

use crate::models::frozen::{FrozenKind, FrozenOp};
use crate::models::low_rank::{linear_with_branch, pointwise_conv_with_branch, LowRankBranch};

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

    /// Runs a 3x3 stride-1 convolution's forward pass in the Winograd domain from now on
    /// ([`FrozenOp::with_winograd_forward`]); other layers are unchanged. A later
    /// [`Self::merge_into_weight`] goes back to the plain convolution.
    pub fn use_winograd_forward(&mut self) -> candle_core::Result<()> {
        self.op = self.op.clone().with_winograd_forward()?;
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

/// Something whose adaptable layers can be visited (the UNet, a text encoder).
pub trait Adaptable {
    /// Calls `f` on every adaptable layer, in model order.
    fn visit_layers(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer));

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
}
