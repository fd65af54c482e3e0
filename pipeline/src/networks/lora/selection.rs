//! Which UNet layers get a LoRA module, with what rank and alpha
//! (docs/kohya-compat.md#lora-module-selection, docs/kohya-compat.md#per-block-settings), and the
//! kohya names of the modules (docs/kohya-compat.md#lora-key-names).

use super::{AdaptableLayer, Alpha, Container};
use crate::models::frozen::FrozenKind;

/// Which layers get a module and with what rank/alpha (docs/kohya-compat.md#lora-module-selection,
/// docs/kohya-compat.md#per-block-settings, docs/kohya-compat.md#network-arguments).
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Rank for Linear and 1x1 conv layers (`--network_dim`, default 4).
    pub network_dim: usize,
    /// Alpha for those layers (`--network_alpha`, default integer 1).
    pub network_alpha: Alpha,
    /// Rank for 3x3 convs (`conv_dim` network arg); `None` = LierLa (no conv modules).
    pub conv_dim: Option<usize>,
    /// Alpha for 3x3 convs (`conv_alpha`, default 1.0).
    pub conv_alpha: f32,
    /// Per-block ranks and alphas; when set they replace the four values above.
    pub blocks: Option<BlockDims>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            network_dim: 4,
            network_alpha: Alpha::Int(1),
            conv_dim: None,
            conv_alpha: 1.0,
            blocks: None,
        }
    }
}

/// Number of UNet blocks of SD1.x/SD2.x for per-block settings
/// (docs/kohya-compat.md#per-block-settings).
pub const SD_BLOCKS: usize = 25;

/// Per-block ranks and alphas of the UNet (`block_dims`, `block_alphas`, `conv_block_dims`,
/// `conv_block_alphas`), [`SD_BLOCKS`] entries each, indexed by [`sd_block_index`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockDims {
    /// Rank of Linear and 1x1 conv layers per block (0: no module).
    pub dims: Vec<usize>,
    /// Alpha of those layers per block.
    pub alphas: Vec<Alpha>,
    /// Rank and alpha of 3x3 convolutions per block; `None`: no conv modules.
    pub conv: Option<(Vec<usize>, Vec<Alpha>)>,
}

impl LoraConfig {
    /// Rank and alpha for a layer, or `None` when it gets no module.
    pub fn select(&self, layer: &AdaptableLayer) -> Option<(usize, Alpha)> {
        let conv_enabled = match &self.blocks {
            Some(blocks) => blocks.conv.is_some(),
            None => self.conv_dim.is_some(),
        };
        let targeted = match layer.container {
            // sd-scripts gives every text-encoder module --network_dim / --network_alpha
            // (block_dims and conv_dim are UNet settings).
            Container::TextEncoder => {
                return (self.network_dim > 0).then_some((self.network_dim, self.network_alpha))
            }
            Container::Transformer => true,
            Container::Resnet | Container::Downsample | Container::Upsample => conv_enabled,
            Container::Other => false,
        };
        if !targeted {
            return None;
        }
        let is_pointwise = match layer.kind() {
            FrozenKind::Linear => true,
            FrozenKind::Conv2d { .. } => {
                let dims = layer.weight().dims();
                dims[2] == 1 && dims[3] == 1
            }
        };
        let block = sd_block_index(&layer.lora_name());
        let (rank, alpha) = match (&self.blocks, block) {
            (Some(blocks), Some(block)) if is_pointwise => {
                (blocks.dims[block], blocks.alphas[block])
            }
            (Some(blocks), Some(block)) => {
                let (dims, alphas) = blocks.conv.as_ref()?;
                (dims[block], alphas[block])
            }
            _ if is_pointwise => (self.network_dim, self.network_alpha),
            _ => (self.conv_dim?, Alpha::Float(self.conv_alpha)),
        };
        (rank > 0).then_some((rank, alpha))
    }
}

/// The SD1.x/SD2.x block (0..[`SD_BLOCKS`]) of a UNet LoRA module name
/// (docs/kohya-compat.md#per-block-settings): down-block layers are 1..=11, the middle block 12,
/// up-block layers 13..=24; `None` for other layers.
pub fn sd_block_index(lora_name: &str) -> Option<usize> {
    static PATTERN: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_",
        )
        .expect("valid block pattern")
    });
    if let Some(found) = PATTERN.captures(lora_name) {
        let level: usize = found[2].parse().ok()?;
        let layer: usize = found[4].parse().ok()?;
        let within = match &found[3] {
            "upsamplers" | "downsamplers" => 3 * level + 2,
            _ => 3 * level + layer,
        };
        let first = if &found[1] == "down" { 1 } else { 13 };
        Some(first + within).filter(|&b| b < SD_BLOCKS)
    } else if lora_name.contains("mid_block_") {
        Some(12)
    } else {
        None
    }
}

/// kohya key prefix of a UNet layer path.
pub fn unet_lora_name(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}
