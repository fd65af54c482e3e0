//! The Stable Diffusion VAE: encoder (image -> latent posterior) and decoder (latents -> image),
//! built on candle.
//!
//! Tensors are requested by their diffusers names; [`ldm_name`] and [`decoder_ldm_name`] map them
//! to original LDM names.
//! Channel widths, the number of levels and of ResNet blocks per level are
//! read from tensor shapes, so the same code runs the narrow test model and a full SD VAE.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use rayon::prelude::*;

use super::checkpoint::{Checkpoint, Component};
use super::conv::Conv2d;
use super::kernels::with_f32_slice;
use crate::{Error, Result};

/// Group count of every VAE group norm.
const GROUPS: usize = 32;
/// Epsilon of every VAE group norm.
const NORM_EPS: f64 = 1e-6;

/// Maps a diffusers VAE tensor name to its original LDM name (encoder side and `quant_conv`;
/// other names are returned unchanged).
pub fn ldm_name(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mapped: Vec<String> = match parts.as_slice() {
        ["encoder", "down_blocks", i, "resnets", j, rest @ ..] => {
            let mut out = vec![
                "encoder".into(),
                "down".into(),
                (*i).into(),
                "block".into(),
                (*j).into(),
            ];
            out.extend(rest.iter().map(|p| resnet_part(p)));
            out
        }
        ["encoder", "down_blocks", i, "downsamplers", "0", rest @ ..] => {
            let mut out = vec![
                "encoder".into(),
                "down".into(),
                (*i).into(),
                "downsample".into(),
            ];
            out.extend(rest.iter().map(|p| p.to_string()));
            out
        }
        ["encoder", "mid_block", "resnets", j, rest @ ..] => {
            let block = if *j == "0" { "block_1" } else { "block_2" };
            let mut out = vec!["encoder".into(), "mid".into(), block.into()];
            out.extend(rest.iter().map(|p| resnet_part(p)));
            out
        }
        ["encoder", "mid_block", "attentions", "0", rest @ ..] => {
            let mut out = vec!["encoder".into(), "mid".into(), "attn_1".into()];
            let inner = match rest {
                ["group_norm", tail @ ..] => (vec!["norm"], tail),
                ["to_q", tail @ ..] => (vec!["q"], tail),
                ["to_k", tail @ ..] => (vec!["k"], tail),
                ["to_v", tail @ ..] => (vec!["v"], tail),
                ["to_out", "0", tail @ ..] => (vec!["proj_out"], tail),
                other => (Vec::new(), other),
            };
            out.extend(inner.0.iter().map(|p| p.to_string()));
            out.extend(inner.1.iter().map(|p| p.to_string()));
            out
        }
        ["encoder", "conv_norm_out", rest @ ..] => {
            let mut out = vec!["encoder".into(), "norm_out".into()];
            out.extend(rest.iter().map(|p| p.to_string()));
            out
        }
        _ => return name.to_string(),
    };
    mapped.join(".")
}

fn resnet_part(part: &str) -> String {
    if part == "conv_shortcut" {
        "nin_shortcut".into()
    } else {
        part.to_string()
    }
}

/// Group normalisation (32 groups) with an optional SiLU fused into the same pass.
struct GroupNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    channels: usize,
}

impl GroupNorm {
    fn load(vb: &VarBuilder, channels: usize) -> Result<Self> {
        if !channels.is_multiple_of(GROUPS) {
            return Err(Error::Model(format!(
                "VAE group norm `{}` has {channels} channels, not a multiple of {GROUPS}",
                vb.prefix()
            )));
        }
        let read = |name: &str| -> Result<Vec<f32>> {
            vb.get(channels, name)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1())
                .map_err(candle_error)
        };
        Ok(GroupNorm {
            weight: read("weight")?,
            bias: read("bias")?,
            channels,
        })
    }

    /// Normalises `x` ([B, C, H, W]) in f32 and applies SiLU when `silu` is set.
    fn forward(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        if channels != self.channels {
            candle_core::bail!(
                "group norm expects {} channels, got {channels}",
                self.channels
            );
        }
        let dtype = x.dtype();
        let per_channel = height * width;
        let per_group = channels / GROUPS * per_channel;
        let mut output = vec![0f32; batch * channels * per_channel];
        with_f32_slice(&x.to_dtype(DType::F32)?, |input| {
            output
                .par_chunks_mut(per_group)
                .zip(input.par_chunks(per_group))
                .enumerate()
                .for_each(|(index, (out, group))| {
                    let (mean, inv) = moments(group);
                    let first_channel = (index % GROUPS) * (channels / GROUPS);
                    let planes = out.chunks_mut(per_channel).zip(group.chunks(per_channel));
                    for (offset, (out, plane)) in planes.enumerate() {
                        let c = first_channel + offset;
                        let scale = inv * f64::from(self.weight[c]);
                        let shift = f64::from(self.bias[c]) - mean * scale;
                        let (scale, shift) = (scale as f32, shift as f32);
                        if silu {
                            for (o, &v) in out.iter_mut().zip(plane) {
                                let y = v * scale + shift;
                                *o = y / (1.0 + exp(-y));
                            }
                        } else {
                            for (o, &v) in out.iter_mut().zip(plane) {
                                *o = v * scale + shift;
                            }
                        }
                    }
                })
        })?;
        Tensor::from_vec(output, (batch, channels, height, width), x.device())?.to_dtype(dtype)
    }
}

/// Mean and `1 / sqrt(variance + eps)` of `values`: f32 sums over short runs (vectorised),
/// accumulated in f64, two passes.
fn moments(values: &[f32]) -> (f64, f64) {
    const RUN: usize = 1024;
    let n = values.len() as f64;
    let sum: f64 = values
        .chunks(RUN)
        .map(|run| f64::from(lane_sum(run, |v| v)))
        .sum();
    let mean = sum / n;
    let center = mean as f32;
    let squares: f64 = values
        .chunks(RUN)
        .map(|run| f64::from(lane_sum(run, |v| (v - center) * (v - center))))
        .sum();
    let offset = f64::from(center) - mean;
    let var = (squares / n - offset * offset).max(0.0);
    (mean, 1.0 / (var + NORM_EPS).sqrt())
}

/// Sum of `f(v)` over `values`, accumulated in 16 independent lanes so that it vectorises.
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// `e^x` in f32 without branches or calls, so that loops over it vectorise: range reduction by
/// ln 2 and a degree-7 Taylor polynomial (relative error below 2e-7; inputs are clamped to
/// [-87, 88], where the result stays a normal number).
fn exp(x: f32) -> f32 {
    /// Adding and subtracting 1.5 * 2^23 rounds an f32 of magnitude below 2^22 to an integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for coefficient in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + coefficient;
    }
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

fn conv(vb: &VarBuilder, name: &str, stride: usize, padding: usize) -> Result<(Conv2d, usize)> {
    let weight = vb
        .get_unchecked(&format!("{name}.weight"))
        .map_err(candle_error)?;
    let dims = weight.dims().to_vec();
    if dims.len() != 4 {
        return Err(Error::Model(format!(
            "VAE weight `{}.{name}.weight` has shape {dims:?}, expected a convolution",
            vb.prefix()
        )));
    }
    let bias = vb
        .get(dims[0], &format!("{name}.bias"))
        .map_err(candle_error)?;
    let layer =
        Conv2d::transforming_per_pass(weight, bias, stride, padding).map_err(candle_error)?;
    Ok((layer, dims[0]))
}

/// A VAE ResNet block.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(vb: &VarBuilder, in_channels: usize) -> Result<(Self, usize)> {
        let norm1 = GroupNorm::load(&vb.pp("norm1"), in_channels)?;
        let (conv1, out_channels) = conv(vb, "conv1", 1, 1)?;
        let norm2 = GroupNorm::load(&vb.pp("norm2"), out_channels)?;
        let (conv2, _) = conv(vb, "conv2", 1, 1)?;
        let shortcut = if vb.contains_tensor("conv_shortcut.weight") {
            Some(conv(vb, "conv_shortcut", 1, 0)?.0)
        } else {
            None
        };
        let block = ResnetBlock {
            norm1,
            conv1,
            norm2,
            conv2,
            shortcut,
        };
        Ok((block, out_channels))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        match &self.shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The single-head self-attention block in the middle of the encoder.
struct Attention {
    norm: GroupNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    channels: usize,
}

impl Attention {
    fn load(vb: &VarBuilder, channels: usize) -> Result<Self> {
        // Diffusers files written before diffusers 0.14 use query/key/value/proj_attn.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy {
            ["group_norm", "query", "key", "value", "proj_attn"]
        } else {
            ["group_norm", "to_q", "to_k", "to_v", "to_out.0"]
        };
        let linear =
            |name: &str| candle_nn::linear(channels, channels, vb.pp(name)).map_err(candle_error);
        Ok(Attention {
            norm: GroupNorm::load(&vb.pp(names[0]), channels)?,
            query: linear(names[1])?,
            key: linear(names[2])?,
            value: linear(names[3])?,
            out: linear(names[4])?,
            channels,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x, false)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.query.forward(&tokens)?;
        let k = self.key.forward(&tokens)?;
        let v = self.value.forward(&tokens)?;
        let scale = 1.0 / (self.channels as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let attended = self.out.forward(&weights.matmul(&v)?)?;
        let attended = attended
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        x + attended
    }
}

/// One resolution level of the encoder.
struct DownLevel {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

/// The latent posterior of a batch: `mean` and `std` are [B, latent_channels, H/8, W/8].
pub struct Posterior {
    /// Posterior mean.
    pub mean: Tensor,
    /// Posterior standard deviation, `exp(0.5 * clamp(logvar, -30, 20))`.
    pub std: Tensor,
}

/// The VAE encoder with its `quant_conv`.
pub struct VaeEncoder {
    conv_in: Conv2d,
    levels: Vec<DownLevel>,
    mid_first: ResnetBlock,
    mid_attention: Attention,
    mid_second: ResnetBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Conv2d,
    latent_channels: usize,
    dtype: DType,
    device: Device,
}

impl VaeEncoder {
    /// Loads the encoder from `checkpoint`'s VAE, computing in `dtype` on `device`.
    pub fn load(checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let root = checkpoint.var_builder(Component::Vae, dtype, device, &ldm_name)?;
        let vb = root.pp("encoder");
        let (conv_in, mut channels) = conv(&vb, "conv_in", 1, 1)?;
        let mut levels = Vec::new();
        while vb.contains_tensor(&format!(
            "down_blocks.{}.resnets.0.conv1.weight",
            levels.len()
        )) {
            let level_vb = vb.pp(format!("down_blocks.{}", levels.len()));
            let mut resnets = Vec::new();
            while level_vb.contains_tensor(&format!("resnets.{}.conv1.weight", resnets.len())) {
                let (block, out) = ResnetBlock::load(
                    &level_vb.pp(format!("resnets.{}", resnets.len())),
                    channels,
                )?;
                channels = out;
                resnets.push(block);
            }
            let downsample = if level_vb.contains_tensor("downsamplers.0.conv.weight") {
                Some(conv(&level_vb, "downsamplers.0.conv", 2, 0)?.0)
            } else {
                None
            };
            levels.push(DownLevel {
                resnets,
                downsample,
            });
        }
        if levels.is_empty() {
            // Surface the missing tensor by name.
            vb.get_unchecked("down_blocks.0.resnets.0.conv1.weight")
                .map_err(candle_error)?;
        }
        let mid = vb.pp("mid_block");
        let (mid_first, _) = ResnetBlock::load(&mid.pp("resnets.0"), channels)?;
        let mid_attention = Attention::load(&mid.pp("attentions.0"), channels)?;
        let (mid_second, _) = ResnetBlock::load(&mid.pp("resnets.1"), channels)?;
        let norm_out = GroupNorm::load(&vb.pp("conv_norm_out"), channels)?;
        let (conv_out, moments) = conv(&vb, "conv_out", 1, 1)?;
        let (quant_conv, _) = conv(&root, "quant_conv", 1, 0)?;
        Ok(VaeEncoder {
            conv_in,
            levels,
            mid_first,
            mid_attention,
            mid_second,
            norm_out,
            conv_out,
            quant_conv,
            latent_channels: moments / 2,
            dtype,
            device: device.clone(),
        })
    }

    /// Number of latent channels (4 for SD1/SD2/SDXL).
    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    /// Encodes `images` ([B, 3, H, W], values in [-1, 1], on any device) into the latent
    /// posterior (f32, on the encoder's device).
    pub fn encode(&self, images: &Tensor) -> Result<Posterior> {
        self.forward(images).map_err(candle_error)
    }

    fn forward(&self, images: &Tensor) -> candle_core::Result<Posterior> {
        let images = images.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mut x = self.conv_in.forward(&images)?;
        for level in &self.levels {
            for block in &level.resnets {
                x = block.forward(&x)?;
            }
            if let Some(downsample) = &level.downsample {
                // Asymmetric padding (right and bottom only), then a stride-2 convolution.
                x = downsample.forward(&x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                    D::Minus2,
                    0,
                    1,
                )?)?;
            }
        }
        x = self.mid_first.forward(&x)?;
        x = self.mid_attention.forward(&x)?;
        x = self.mid_second.forward(&x)?;
        x = self.conv_out.forward(&self.norm_out.forward(&x, true)?)?;
        let moments = self.quant_conv.forward(&x)?.to_dtype(DType::F32)?;
        let mean = moments.narrow(1, 0, self.latent_channels)?;
        let logvar = moments
            .narrow(1, self.latent_channels, self.latent_channels)?
            .clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(Posterior { mean, std })
    }
}

/// Maps a diffusers VAE decoder tensor name to its original LDM name, for a decoder of `levels`
/// resolution levels (diffusers numbers the up blocks from the deepest, LDM from the shallowest;
/// other names are returned unchanged).
pub fn decoder_ldm_name(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let up = |i: &str| -> String {
        i.parse::<usize>()
            .ok()
            .and_then(|i| levels.checked_sub(i + 1))
            .map_or_else(|| i.to_string(), |v| v.to_string())
    };
    let mapped: Vec<String> = match parts.as_slice() {
        ["decoder", "up_blocks", i, "resnets", j, rest @ ..] => {
            let mut out = vec![
                "decoder".into(),
                "up".into(),
                up(i),
                "block".into(),
                (*j).into(),
            ];
            out.extend(rest.iter().map(|p| resnet_part(p)));
            out
        }
        ["decoder", "up_blocks", i, "upsamplers", "0", rest @ ..] => {
            let mut out = vec!["decoder".into(), "up".into(), up(i), "upsample".into()];
            out.extend(rest.iter().map(|p| p.to_string()));
            out
        }
        ["decoder", rest @ ..] => {
            // The middle block and the output norm are named as the encoder's.
            let as_encoder = format!("encoder.{}", rest.join("."));
            let mapped = ldm_name(&as_encoder);
            return match mapped.strip_prefix("encoder.") {
                Some(tail) if mapped != as_encoder => format!("decoder.{tail}"),
                _ => name.to_string(),
            };
        }
        _ => return name.to_string(),
    };
    mapped.join(".")
}

/// Number of decoder levels of a VAE with these stored tensor names (LDM or diffusers names).
fn decoder_levels(names: &[String]) -> usize {
    let mut levels = std::collections::BTreeSet::new();
    for name in names {
        let tail = name
            .split_once("decoder.up.")
            .or_else(|| name.split_once("decoder.up_blocks."))
            .map(|(_, tail)| tail);
        if let Some(index) = tail.and_then(|t| t.split('.').next()?.parse::<usize>().ok()) {
            levels.insert(index);
        }
    }
    levels.len()
}

/// One resolution level of the decoder.
struct UpLevel {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

/// The VAE decoder with its `post_quant_conv`.
pub struct VaeDecoder {
    post_quant_conv: Conv2d,
    conv_in: Conv2d,
    mid_first: ResnetBlock,
    mid_attention: Attention,
    mid_second: ResnetBlock,
    levels: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
}

impl VaeDecoder {
    /// Loads the decoder from `checkpoint`'s VAE, computing in `dtype` on `device`.
    pub fn load(checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let levels = decoder_levels(&checkpoint.tensor_names(Component::Vae)?);
        let mapping = move |name: &str| decoder_ldm_name(name, levels);
        let root = checkpoint.var_builder(Component::Vae, dtype, device, &mapping)?;
        let vb = root.pp("decoder");
        let (post_quant_conv, _) = conv(&root, "post_quant_conv", 1, 0)?;
        let (conv_in, channels) = conv(&vb, "conv_in", 1, 1)?;
        let mid = vb.pp("mid_block");
        let (mid_first, _) = ResnetBlock::load(&mid.pp("resnets.0"), channels)?;
        let mid_attention = Attention::load(&mid.pp("attentions.0"), channels)?;
        let (mid_second, mut channels) = ResnetBlock::load(&mid.pp("resnets.1"), channels)?;
        let mut ups = Vec::with_capacity(levels);
        for i in 0..levels.max(1) {
            let level_vb = vb.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::new();
            while resnets.is_empty()
                || level_vb.contains_tensor(&format!("resnets.{}.conv1.weight", resnets.len()))
            {
                let (block, out) = ResnetBlock::load(
                    &level_vb.pp(format!("resnets.{}", resnets.len())),
                    channels,
                )?;
                channels = out;
                resnets.push(block);
            }
            let upsample = if level_vb.contains_tensor("upsamplers.0.conv.weight") {
                Some(conv(&level_vb, "upsamplers.0.conv", 1, 1)?.0)
            } else {
                None
            };
            ups.push(UpLevel { resnets, upsample });
        }
        let norm_out = GroupNorm::load(&vb.pp("conv_norm_out"), channels)?;
        let (conv_out, _) = conv(&vb, "conv_out", 1, 1)?;
        Ok(VaeDecoder {
            post_quant_conv,
            conv_in,
            mid_first,
            mid_attention,
            mid_second,
            levels: ups,
            norm_out,
            conv_out,
            dtype,
        })
    }

    /// Decodes latents `[B, 4, h, w]` (already divided by the scaling factor) into images
    /// `[B, 3, 8h, 8w]` with values around [-1, 1] (f32, not clamped).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.forward(latents).map_err(candle_error)
    }

    fn forward(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let z = self
            .post_quant_conv
            .forward(&latents.to_dtype(self.dtype)?)?;
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid_first.forward(&x)?;
        x = self.mid_attention.forward(&x)?;
        x = self.mid_second.forward(&x)?;
        for level in &self.levels {
            for block in &level.resnets {
                x = block.forward(&x)?;
            }
            if let Some(upsample) = &level.upsample {
                let (_, _, h, w) = x.dims4()?;
                x = upsample.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        x = self.conv_out.forward(&self.norm_out.forward(&x, true)?)?;
        x.to_dtype(DType::F32)
    }
}

fn candle_error(e: candle_core::Error) -> Error {
    Error::Model(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::npz::NpzReader;

    use crate::infra::test_support::fixtures;

    #[test]
    fn exp_is_accurate() {
        for i in -8700..8800 {
            let x = i as f32 * 0.01 + 0.003;
            let (ours, reference) = (exp(x), x.exp());
            assert!(
                ((ours - reference) / reference).abs() < 3e-7,
                "{x}: {ours} vs {reference}"
            );
        }
        assert!(exp(-1000.0) >= 0.0 && exp(1000.0).is_finite());
    }

    #[test]
    fn maps_diffusers_names_to_ldm() {
        for (diffusers, ldm) in [
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                "encoder.down.2.downsample.conv.bias",
            ),
            (
                "encoder.mid_block.resnets.1.norm2.weight",
                "encoder.mid.block_2.norm2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.bias",
                "encoder.mid.attn_1.norm.bias",
            ),
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            ("quant_conv.weight", "quant_conv.weight"),
        ] {
            assert_eq!(ldm_name(diffusers), ldm);
        }
    }

    #[test]
    fn maps_diffusers_decoder_names_to_ldm() {
        for (diffusers, ldm) in [
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.1.resnets.0.conv_shortcut.bias",
                "decoder.up.2.block.0.nin_shortcut.bias",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_q.weight",
                "decoder.mid.attn_1.q.weight",
            ),
            (
                "decoder.mid_block.resnets.0.norm1.bias",
                "decoder.mid.block_1.norm1.bias",
            ),
            ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
            ("decoder.conv_in.weight", "decoder.conv_in.weight"),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ] {
            assert_eq!(decoder_ldm_name(diffusers, 4), ldm);
        }
    }

    #[test]
    fn posterior_matches_golden_within_tolerance() {
        let checkpoint = Checkpoint::open(&fixtures().join("sd15-tiny/model.safetensors")).unwrap();
        let encoder = VaeEncoder::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(encoder.latent_channels(), 4);
        for stem in ["astronaut", "chelsea", "cell", "text"] {
            let mut golden =
                NpzReader::open(&fixtures().join(format!("golden/vae/{stem}_vae.npz"))).unwrap();
            let input = golden.read_tensor_f32("vae_input", &Device::Cpu).unwrap();
            let posterior = encoder.encode(&input).unwrap();
            for (name, ours) in [
                ("posterior_mean", &posterior.mean),
                ("posterior_std", &posterior.std),
            ] {
                let (expected, shape) = golden.read_f32(name).unwrap();
                assert_eq!(&ours.dims()[1..], shape.as_slice(), "{stem} {name}");
                let ours: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
                for (a, b) in ours.iter().zip(&expected) {
                    let abs = (a - b).abs();
                    assert!(abs <= 1e-4, "{stem} {name}: {a} vs {b}");
                    if b.abs() > 1e-2 {
                        assert!(abs / b.abs() <= 1e-3, "{stem} {name}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
