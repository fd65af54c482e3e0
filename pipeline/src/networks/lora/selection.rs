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

/// How sd-scripts numbers a UNet's blocks for per-block settings
/// (docs/kohya-compat.md#per-block-settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLayout {
    /// SD1.x/SD2.x: 25 blocks (12 down, the middle block, 12 up).
    Sd,
    /// SDXL: 23 blocks (the embeddings, 9 input blocks, 3 middle, 9 output blocks, the out
    /// layers).
    Sdxl,
}

impl BlockLayout {
    /// Number of blocks: the values `block_dims` and its relatives take.
    pub fn count(self) -> usize {
        match self {
            BlockLayout::Sd => 25,
            BlockLayout::Sdxl => 23,
        }
    }

    /// Values of `down_lr_weight` / `up_lr_weight` and of `mid_lr_weight`.
    pub fn lr_weights_per_part(self) -> (usize, usize) {
        match self {
            BlockLayout::Sd => (12, 1),
            BlockLayout::Sdxl => (9, 3),
        }
    }

    /// The block of a UNet LoRA module name (sd-scripts' `get_block_index`); `None` for
    /// layers in no block.
    pub fn index(self, lora_name: &str) -> Option<usize> {
        match self {
            BlockLayout::Sd => sd_block_index(lora_name),
            BlockLayout::Sdxl => sdxl_block_index(lora_name),
        }
    }
}

/// Per-block ranks and alphas of the UNet (`block_dims`, `block_alphas`, `conv_block_dims`,
/// `conv_block_alphas`), one entry per block of `layout`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockDims {
    /// How the blocks are numbered.
    pub layout: BlockLayout,
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
        let block =
            (self.blocks.as_ref()).and_then(|blocks| blocks.layout.index(&layer.lora_name()));
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

/// The SD1.x/SD2.x block (0..25) of a UNet LoRA module name
/// (docs/kohya-compat.md#per-block-settings): down-block layers are 1..=11, the middle block 12,
/// up-block layers 13..=24; `None` for other layers.
fn sd_block_index(lora_name: &str) -> Option<usize> {
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
        Some(first + within).filter(|&b| b < BlockLayout::Sd.count())
    } else if lora_name.contains("mid_block_") {
        Some(12)
    } else {
        None
    }
}

/// The SDXL block (0..23) of a UNet LoRA module name in SGM naming
/// (docs/kohya-compat.md#per-block-settings): the time and label embeddings 0, `input_blocks_N`
/// 1 + N, `middle_block_N` 10 + N, `output_blocks_N` 13 + N, the out layers 22.
fn sdxl_block_index(lora_name: &str) -> Option<usize> {
    let name = lora_name.strip_prefix("lora_unet_")?;
    let numbered = |prefix: &str| -> Option<usize> {
        name.strip_prefix(prefix)?.split('_').next()?.parse().ok()
    };
    if name.starts_with("time_embed_") || name.starts_with("label_emb_") {
        Some(0)
    } else if let Some(n) = numbered("input_blocks_") {
        Some(1 + n)
    } else if let Some(n) = numbered("middle_block_") {
        Some(10 + n)
    } else if let Some(n) = numbered("output_blocks_") {
        Some(13 + n)
    } else if name.starts_with("out_") {
        Some(22)
    } else {
        None
    }
    .filter(|&b| b < BlockLayout::Sdxl.count())
}

/// kohya key prefix of a UNet layer path.
pub fn unet_lora_name(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}
