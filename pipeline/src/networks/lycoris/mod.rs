//! LyCORIS networks as the `lycoris-lora` package's `lycoris.kohya` module builds them for
//! sd-scripts (`--network_module lycoris.kohya`, docs/lycoris.md): LoCon, LoHa and LoKr modules
//! with lycoris' tensor names, shapes, initialisation and forward pass, and `.safetensors` save and
//! load.
//!
//! Every module changes its layer's weight by `ΔW · multiplier` and the layer computes
//! `W0 x + op(x, ΔW · multiplier)` (lycoris' default, non-bypass forward):
//! * LoCon: `ΔW = up · down · alpha / dim` (`lora_up.weight`, `lora_down.weight`);
//! * LoHa: `ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / dim` (`hada_w1_a`, ...);
//! * LoKr: `ΔW = (w1 ⊗ w2) · alpha / dim`, `w1` = `lokr_w1` or `lokr_w1_a · lokr_w1_b`, `w2` =
//!   `lokr_w2` or `lokr_w2_a · lokr_w2_b`; with both full matrices alpha is the dim (scale 1).
//! * full: the trained weight minus the frozen one (`diff`), and the bias likewise (`diff_b`).
//! * dylora: `ΔW = up[:, ..k·s] · down[..k·s] · alpha / (k·s)` over the first `k` blocks of
//!   `s = block_size` ranks, `k` drawn per forward pass while training (only block `k` is
//!   trained), all blocks otherwise; saved as one `lora_up.weight` / `lora_down.weight`.
//!
//! With `use_scalar` a trainable scalar multiplies `ΔW`; the file holds it multiplied into the
//! first factor.
//!
//! With Tucker decomposition (`use_tucker`, convolutions larger than 1x1) the rank-r products
//! become `rebuild(t, a, b)[p, q, k, l] = Σ_ij t[i, j, k, l] · a[i, p] · b[j, q]` with a core
//! `t` `[r, r, k, k]`: LoCon `lora_mid.weight` (`a` = `lora_upᵀ`, `b` = `lora_down`), LoHa
//! `hada_t1` / `hada_t2`, LoKr `lokr_t2` (for `w2`).
//!
//! With DoRA (`dora_wd`, a `dora_scale` tensor) the layer's weight becomes
//! `(W0 + ΔW) · s` instead, `s = dora_scale / (‖W0 + ΔW‖ + eps)` per output row (or per input
//! column with `wd_on_output=False`), and the
//! multiplier `m` scales `s` to `m · (s − 1) + 1` (see [`WeightDecompose`]).

mod preset;
mod selection;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::models::adapter::{Adaptable, AdaptableLayer, AdaptableNorm, LayerAdapter, NormAdapter};
use crate::models::frozen::FrozenKind;
use crate::models::trainable_conv;
use crate::networks::lora::{serialize_with_hashes, BranchDropout, LoadReport, NO_DROPOUT_STREAM};
use crate::{Error, Result};
pub use preset::{ModuleOverride, Preset};
pub use selection::{factorization, Algo, LycorisConfig};

/// The trainable factors of one module.
#[derive(Debug, Clone)]
pub enum Factors {
    /// LoCon (lycoris' LoRA): `lora_down.weight` `[r, in(, k, k)]`, `lora_up.weight`
    /// `[out, r(, 1, 1)]`; with Tucker `lora_down.weight` `[r, in, 1, 1]` and the core
    /// `lora_mid.weight` `[r, r, k, k]`.
    Locon {
        down: Var,
        up: Var,
        mid: Option<Var>,
    },
    /// LoHa: `hada_w1_a` / `hada_w2_a` `[out, r]`, `hada_w1_b` / `hada_w2_b` `[r, in·k·k]`; with
    /// Tucker `hada_wN_a` `[r, out]`, `hada_wN_b` `[r, in]` and the cores `hada_t1` / `hada_t2`
    /// `[r, r, k, k]`.
    Loha {
        w1_a: Var,
        w1_b: Var,
        w2_a: Var,
        w2_b: Var,
        tucker: Option<(Var, Var)>,
    },
    /// LoKr: the small Kronecker factor `w1` and the large one `w2`.
    Lokr { w1: KronFactor, w2: KronFactor },
    /// Full (`algo=full`): the whole weight and bias, trained from the frozen ones; the file
    /// holds their differences `diff` and `diff_b`.
    Full {
        /// The trained weight (`weight` in lycoris), starting at the frozen weight.
        weight: Var,
        /// The frozen weight.
        base: Tensor,
        /// The trained bias, if the layer has one or the file has `diff_b`.
        bias: Option<Var>,
        /// The frozen bias.
        base_bias: Option<Tensor>,
    },
    /// DyLoRA (`algo=dylora`): `lora_up` and `lora_down` as blocks of `block_size` ranks,
    /// `up_list.N` `[out, block_size]` and `down_list.N` `[block_size, in·k·k]`.
    Dylora {
        ups: Vec<Var>,
        downs: Vec<Var>,
        block_size: usize,
        /// The draws of how many blocks a training forward pass uses.
        draws: BlockDraws,
    },
}

/// The per-forward-pass draws of a dylora module: how many of its blocks a training step uses
/// (lycoris draws with Python's `random.randint`; lorakit from a generator keyed by the
/// micro-batch stream and the module's position, so a resumed run draws the same).
#[derive(Debug, Clone)]
pub struct BlockDraws {
    index: u64,
    stream: Arc<AtomicU64>,
}

impl BlockDraws {
    /// How many of `count` blocks this forward pass uses: all outside training, else 1 to
    /// `count`, uniformly.
    fn blocks(&self, count: usize) -> usize {
        let stream = self.stream.load(Ordering::Relaxed);
        if stream == NO_DROPOUT_STREAM || count <= 1 {
            return count;
        }
        let seed = stream ^ (self.index + 1).wrapping_mul(0xA24B_AED4_963E_E407);
        rand::rngs::StdRng::seed_from_u64(seed).random_range(0..count) + 1
    }
}

/// One Kronecker factor of a LoKr module: a full matrix or a rank-r product.
#[derive(Debug, Clone)]
pub enum KronFactor {
    /// `lokr_w1` `[a, c]` or `lokr_w2` `[b, d(, k, k)]`.
    Full(Var),
    /// `lokr_wN_a` `[·, r]` and `lokr_wN_b` `[r, ·]`.
    Product(Var, Var),
    /// `lokr_t2` `[r, r, k, k]`, `lokr_w2_a` `[r, b]`, `lokr_w2_b` `[r, d]` (Tucker, `w2` only).
    Tucker(Var, Var, Var),
}

impl KronFactor {
    /// The factor as a matrix (the product for a low-rank one).
    fn matrix(&self) -> candle_core::Result<Tensor> {
        match self {
            KronFactor::Full(w) => Ok(w.as_tensor().clone()),
            KronFactor::Product(a, b) => a.as_tensor().matmul(b.as_tensor()),
            KronFactor::Tucker(t, a, b) => rebuild_tucker(t, a.as_tensor(), b.as_tensor()),
        }
    }
}

/// lycoris' `rebuild_tucker`: `Σ_ij t[i, j, k, l] · a[i, p] · b[j, q]`, shaped `[p, q, k, l]`.
fn rebuild_tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (rank_i, rank_j, kh, kw) = t.dims4()?;
    let (p, q) = (a.dim(1)?, b.dim(1)?);
    // [p, i] · [i, j·k·l] → [p, j, k·l] → [p, k·l, j] · [j, q] → [p, k·l, q] → [p, q, k, l].
    let left = a.t()?.matmul(&t.reshape((rank_i, ()))?)?;
    let left = (left.reshape((p, rank_j, kh * kw))?.transpose(1, 2)?).contiguous()?;
    let out = left.reshape((p * kh * kw, rank_j))?.matmul(b)?;
    (out.reshape((p, kh * kw, q))?.transpose(1, 2)?)
        .contiguous()?
        .reshape((p, q, kh, kw))
}

/// DoRA's weight decomposition of one module (lycoris' `weight_decompose`, `dora_wd=True`): the
/// changed weight `W0 + ΔW` is rescaled so that each output row's norm (lycoris' default
/// `wd_on_output=True`), or each input column's (`wd_on_output=False`), is the trained
/// `dora_scale`.
#[derive(Debug, Clone)]
pub struct WeightDecompose {
    /// `dora_scale`, `[out, 1(, 1, 1)]` or by input column `[1, in(, 1, 1)]`, initialised to the
    /// norms of `W0`.
    pub scale: Var,
    /// The layer's frozen weight `W0`.
    base: Tensor,
    /// Norms of output rows (`wd_on_output=True`) or of input columns.
    on_output: bool,
}

impl WeightDecompose {
    /// The decomposition of `layer`'s weight with fresh norms (lycoris' initialisation).
    fn new(layer: &AdaptableLayer, on_output: bool, device: &Device) -> Result<Self> {
        let base = layer.weight().to_device(device)?;
        let norms = weight_norms(&base.to_dtype(DType::F32)?, on_output)?;
        Ok(Self {
            scale: Var::from_tensor(&norms)?,
            base,
            on_output,
        })
    }

    /// The weight change `(W0 + diff) · s − W0`, `s = dora_scale / (‖W0 + diff‖ + eps)` per
    /// output row or input column (eps: float32's machine epsilon), with `s` replaced by
    /// `multiplier · (s − 1) + 1` when the multiplier is not 1.
    fn delta(&self, diff: &Tensor, multiplier: f64) -> candle_core::Result<Tensor> {
        let base = self.base.to_dtype(DType::F32)?;
        let weight = (&base + diff.to_dtype(DType::F32)?)?;
        let norms = (weight_norms(&weight, self.on_output)? + f32::EPSILON as f64)?;
        let mut scale = self.scale.as_tensor().div(&norms)?;
        if multiplier != 1.0 {
            scale = scale.affine(multiplier, 1.0 - multiplier)?;
        }
        weight.broadcast_mul(&scale)? - base
    }
}

/// The Euclidean norms of a weight's output rows, `[out, 1(, 1, 1)]`, or of its input columns,
/// `[1, in(, 1, 1)]`.
fn weight_norms(weight: &Tensor, on_output: bool) -> candle_core::Result<Tensor> {
    match on_output {
        true => row_norms(weight),
        false => row_norms(&weight.transpose(0, 1)?.contiguous()?)?.transpose(0, 1),
    }
}

/// The Euclidean norm of each output row of a weight, shaped `[out, 1(, 1, 1)]`.
fn row_norms(weight: &Tensor) -> candle_core::Result<Tensor> {
    let mut shape = vec![1; weight.rank()];
    shape[0] = weight.dim(0)?;
    (weight
        .reshape((shape[0], ()))?
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?)
    .reshape(shape)
}

/// One LyCORIS module on one layer.
#[derive(Debug, Clone)]
pub struct LycorisModule {
    /// kohya key prefix, e.g. `lora_unet_conv_in`.
    pub name: String,
    /// The trainable factors.
    pub factors: Factors,
    /// The `alpha` tensor's value (a float, as lycoris stores it).
    pub alpha: f32,
    /// `alpha / dim` (1 for a LoKr module of two full matrices).
    pub scale: f64,
    /// Multiplier (1.0 in training).
    pub multiplier: f64,
    /// DoRA's weight decomposition (`dora_wd`), if any.
    pub dora: Option<WeightDecompose>,
    /// `use_scalar`'s trainable 0-d scalar on `ΔW`, if any. The saved file holds no scalar:
    /// lycoris multiplies it into the first factor (`lora_up`, `hada_w1_a`, `lokr_w1` or
    /// `lokr_w1_a`).
    pub scalar: Option<Var>,
    /// The layer's weight shape.
    shape: Vec<usize>,
    /// Rank and module dropout while training.
    dropout: Option<BranchDropout>,
}

impl LycorisModule {
    /// The trainable tensors as lycoris names them (after the module name and a dot), in
    /// lycoris' order; `use_scalar`'s `scalar` last.
    pub fn named_vars(&self) -> Vec<(Cow<'static, str>, &Var)> {
        let mut vars = self.factor_vars();
        if let Some(dora) = &self.dora {
            vars.push(("dora_scale".into(), &dora.scale));
        }
        if let Some(scalar) = &self.scalar {
            vars.push(("scalar".into(), scalar));
        }
        vars
    }

    /// The tensors lycoris saves, by name: the factors and `dora_scale`, with `use_scalar`'s
    /// scalar multiplied into the first factor (lycoris' `custom_state_dict`).
    fn saved_tensors(&self) -> candle_core::Result<Vec<(Cow<'static, str>, Tensor)>> {
        match &self.factors {
            Factors::Full { .. } => {
                let mut out = vec![("diff".into(), self.factor_delta()?)];
                out.extend(self.bias_diff()?.map(|b| ("diff_b".into(), b)));
                return Ok(out);
            }
            Factors::Dylora { ups, downs, .. } => {
                // lycoris' custom_state_dict: the blocks concatenated; `lora_up` stays
                // `[out, dim]` for convolutions too.
                let up = Tensor::cat(&ups.iter().map(|v| v.as_tensor()).collect::<Vec<_>>(), 1)?;
                let down =
                    Tensor::cat(&downs.iter().map(|v| v.as_tensor()).collect::<Vec<_>>(), 0)?;
                let mut down_shape = vec![down.dim(0)?];
                down_shape.extend(&self.shape[1..]);
                return Ok(vec![
                    ("lora_up.weight".into(), up),
                    ("lora_down.weight".into(), down.reshape(down_shape)?),
                ]);
            }
            _ => {}
        }
        let mut out = Vec::new();
        for (index, (suffix, var)) in self.named_vars().into_iter().enumerate() {
            match (&self.scalar, index) {
                (Some(_), _) if suffix == "scalar" => {}
                (Some(scalar), 0) => {
                    out.push((suffix, var.as_tensor().broadcast_mul(scalar.as_tensor())?))
                }
                _ => out.push((suffix, var.as_tensor().clone())),
            }
        }
        Ok(out)
    }

    /// The factors' tensors as lycoris names them, in lycoris' order.
    fn factor_vars(&self) -> Vec<(Cow<'static, str>, &Var)> {
        let vars: Vec<(&'static str, &Var)> = match &self.factors {
            Factors::Locon { down, up, mid } => {
                let mut vars = vec![("lora_up.weight", up), ("lora_down.weight", down)];
                vars.extend(mid.iter().map(|m| ("lora_mid.weight", m)));
                vars
            }
            Factors::Loha {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                tucker,
            } => {
                let mut vars = vec![
                    ("hada_w1_a", w1_a),
                    ("hada_w1_b", w1_b),
                    ("hada_w2_a", w2_a),
                    ("hada_w2_b", w2_b),
                ];
                if let Some((t1, t2)) = tucker {
                    vars.extend([("hada_t1", t1), ("hada_t2", t2)]);
                }
                vars
            }
            Factors::Lokr { w1, w2 } => {
                let mut vars = Vec::with_capacity(4);
                match w1 {
                    KronFactor::Full(w) => vars.push(("lokr_w1", w)),
                    KronFactor::Product(a, b) | KronFactor::Tucker(_, a, b) => {
                        vars.extend([("lokr_w1_a", a), ("lokr_w1_b", b)]);
                    }
                }
                match w2 {
                    KronFactor::Full(w) => vars.push(("lokr_w2", w)),
                    KronFactor::Product(a, b) => {
                        vars.extend([("lokr_w2_a", a), ("lokr_w2_b", b)]);
                    }
                    KronFactor::Tucker(t, a, b) => {
                        vars.extend([("lokr_w2_a", a), ("lokr_w2_b", b), ("lokr_t2", t)]);
                    }
                }
                vars
            }
            Factors::Full { weight, bias, .. } => {
                let mut vars = vec![("weight", weight)];
                vars.extend(bias.iter().map(|b| ("bias", b)));
                vars
            }
            Factors::Dylora { ups, downs, .. } => {
                // lycoris' parameter names: `up_list.N`, then `down_list.N`.
                let ups = (ups.iter().enumerate()).map(|(i, v)| (format!("up_list.{i}"), v));
                let downs = (downs.iter().enumerate()).map(|(i, v)| (format!("down_list.{i}"), v));
                return ups.chain(downs).map(|(n, v)| (Cow::Owned(n), v)).collect();
            }
        };
        vars.into_iter()
            .map(|(n, v)| (Cow::Borrowed(n), v))
            .collect()
    }

    /// The change of the bias at this module's multiplier (`algo=full` only).
    pub fn bias_delta(&self) -> candle_core::Result<Option<Tensor>> {
        (self.bias_diff()?)
            .map(|diff| diff.affine(self.multiplier, 0.0))
            .transpose()
    }

    /// The trained bias minus the frozen one (`diff_b`; `algo=full` only).
    fn bias_diff(&self) -> candle_core::Result<Option<Tensor>> {
        let Factors::Full {
            bias: Some(bias),
            base_bias,
            ..
        } = &self.factors
        else {
            return Ok(None);
        };
        let diff = match base_bias {
            Some(base) => (bias.as_tensor() - base.to_dtype(DType::F32)?)?,
            None => bias.as_tensor().clone(),
        };
        Ok(Some(diff))
    }

    /// The change of the layer's weight at this module's multiplier, shaped like the weight:
    /// `ΔW · multiplier`, or DoRA's rescaled change.
    pub fn weight_delta(&self) -> candle_core::Result<Tensor> {
        self.scaled_delta(self.factor_delta()?)
    }

    /// The weight change at the multiplier from `ΔW` (`diff`): `ΔW · multiplier`, or with DoRA
    /// the decomposed weight's change.
    fn scaled_delta(&self, diff: Tensor) -> candle_core::Result<Tensor> {
        match &self.dora {
            None => diff.affine(self.multiplier, 0.0),
            Some(dora) => dora.delta(&diff, self.multiplier),
        }
    }

    /// `ΔW` of the factors (`· alpha / dim`, no multiplier), shaped like the layer's weight.
    fn factor_delta(&self) -> candle_core::Result<Tensor> {
        let delta = match &self.factors {
            Factors::Locon { down, up, mid } => {
                let rank = down.dim(0)?;
                let up = up.as_tensor().reshape(((), rank))?;
                let down = down.as_tensor().reshape((rank, ()))?;
                match mid {
                    None => up.matmul(&down)?,
                    Some(mid) => rebuild_tucker(mid, &up.t()?, &down)?,
                }
            }
            Factors::Loha {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                tucker,
            } => {
                let (w1_a, w1_b) = (w1_a.as_tensor(), w1_b.as_tensor());
                let (w2_a, w2_b) = (w2_a.as_tensor(), w2_b.as_tensor());
                match tucker {
                    None => (w1_a.matmul(w1_b)? * w2_a.matmul(w2_b)?)?,
                    Some((t1, t2)) => {
                        (rebuild_tucker(t1, w1_a, w1_b)? * rebuild_tucker(t2, w2_a, w2_b)?)?
                    }
                }
            }
            Factors::Lokr { w1, w2 } => {
                let w2 = w2.matrix()?;
                kron(&w1.matrix()?, &w2.reshape((w2.dim(0)?, ()))?)?
            }
            Factors::Full { weight, base, .. } => {
                (weight.as_tensor() - base.to_dtype(DType::F32)?)?
            }
            Factors::Dylora {
                ups,
                downs,
                block_size,
                draws,
            } => {
                // The first `used` blocks; only the last of them is trained (lycoris takes the
                // others' `.data`). Scaled to `alpha / (used · block_size)`: `self.scale` is
                // `alpha / dim`.
                let used = draws.blocks(ups.len());
                let blocks = |list: &[Var]| -> Vec<Tensor> {
                    (list[..used].iter().enumerate())
                        .map(|(i, v)| match i + 1 < used {
                            true => v.as_tensor().detach(),
                            false => v.as_tensor().clone(),
                        })
                        .collect()
                };
                let up = Tensor::cat(&blocks(ups), 1)?;
                let down = Tensor::cat(&blocks(downs), 0)?;
                let rank = ups.len() * block_size;
                up.matmul(&down)?
                    .affine(rank as f64 / (used * block_size) as f64, 0.0)?
            }
        };
        let delta = (delta.reshape(self.shape.as_slice())?).affine(self.scale, 0.0)?;
        match &self.scalar {
            Some(scalar) => delta.broadcast_mul(scalar.as_tensor()),
            None => Ok(delta),
        }
    }
}

/// The Kronecker product of two matrices `[a, c] ⊗ [b, e]` = `[a·b, c·e]`.
fn kron(left: &Tensor, right: &Tensor) -> candle_core::Result<Tensor> {
    let (a, c) = left.dims2()?;
    let (b, e) = right.dims2()?;
    left.reshape((a, 1, c, 1))?
        .broadcast_mul(&right.reshape((1, b, 1, e))?)?
        .reshape((a * b, c * e))
}

impl LayerAdapter for LycorisModule {
    fn clone_box(&self) -> Box<dyn LayerAdapter> {
        Box::new(self.clone())
    }

    /// `op(x, ΔW · multiplier)` with the layer's own stride and padding, or `None` when module
    /// dropout skips the module for this forward pass. Rank dropout (lycoris' definition for the
    /// rebuilt weight) zeroes whole output rows of `ΔW` (before DoRA's decomposition), without
    /// rescaling.
    fn delta(&self, x: &Tensor, kind: FrozenKind) -> candle_core::Result<Option<Tensor>> {
        let mut draw = self.dropout.as_ref().and_then(BranchDropout::draw);
        if draw.as_mut().is_some_and(|d| d.skips_branch()) {
            return Ok(None);
        }
        let mut diff = self.factor_delta()?;
        if let Some(draw) = &mut draw {
            if let Some(mask) = draw.row_mask(diff.dim(0)?, diff.rank(), diff.device())? {
                diff = diff.broadcast_mul(&mask)?;
            }
        }
        let delta = self.scaled_delta(diff)?.to_dtype(x.dtype())?;
        let out = match kind {
            FrozenKind::Linear => x.broadcast_matmul(&delta.t()?)?,
            FrozenKind::Conv2d { stride, padding } => {
                trainable_conv::conv2d(x, &delta, stride, padding)?
            }
        };
        match self.bias_delta()? {
            None => Ok(Some(out)),
            Some(bias) => {
                let bias = bias.to_dtype(x.dtype())?;
                let bias = match kind {
                    FrozenKind::Linear => bias,
                    FrozenKind::Conv2d { .. } => bias.reshape(((), 1, 1))?,
                };
                Ok(Some(out.broadcast_add(&bias)?))
            }
        }
    }
}

/// A trainable change of a normalisation layer's weight and bias (lycoris' `NormModule`,
/// `train_norm`): `w_norm` and `b_norm`, zero at first. The layer normalises with
/// `weight + w_norm · multiplier` and `bias + b_norm · multiplier`.
#[derive(Debug, Clone)]
pub struct NormModule {
    /// kohya key prefix, e.g. `lora_unet_down_blocks_0_resnets_0_norm1`.
    pub name: String,
    /// `w_norm`, one value per channel.
    pub weight: Var,
    /// `b_norm`, one value per channel.
    pub bias: Var,
    /// Multiplier (1.0 in training).
    pub multiplier: f64,
    /// Rank (channel) and module dropout while training.
    dropout: Option<BranchDropout>,
}

impl NormModule {
    /// A fresh module (zeros) on `norm`.
    fn new(norm: &AdaptableNorm, device: &Device) -> Result<Self> {
        let zeros = || Var::zeros(norm.channels(), DType::F32, device);
        Ok(Self {
            name: norm.lora_name(),
            weight: zeros()?,
            bias: zeros()?,
            multiplier: 1.0,
            dropout: None,
        })
    }

    /// The module of a file's `w_norm` / `b_norm` on `norm`.
    fn from_tensors(
        norm: &AdaptableNorm,
        mut tensors: HashMap<String, Tensor>,
        multiplier: f64,
        device: &Device,
        path: &Path,
    ) -> Result<Self> {
        let name = norm.lora_name();
        let mut take = |part: &str| -> Result<Var> {
            let tensor = tensors.remove(part).ok_or_else(|| {
                Error::bad_file(path, format!("norm module {name} has no {part}"))
            })?;
            if tensor.elem_count() != norm.channels() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "{name}.{part} has {} values but the layer {} channels: the file was \
                         trained for a different base model",
                        tensor.elem_count(),
                        norm.channels()
                    ),
                ));
            }
            let tensor = tensor
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_device(device)?;
            Ok(Var::from_tensor(&tensor)?)
        };
        let (weight, bias) = (take("w_norm")?, take("b_norm")?);
        Ok(Self {
            name: name.clone(),
            weight,
            bias,
            multiplier,
            dropout: None,
        })
    }

    /// The trainable tensors as lycoris names them.
    fn named_vars(&self) -> [(&'static str, &Var); 2] {
        [("w_norm", &self.weight), ("b_norm", &self.bias)]
    }

    /// The changes at the multiplier, without dropout.
    fn scaled(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.weight.as_tensor().affine(self.multiplier, 0.0)?,
            self.bias.as_tensor().affine(self.multiplier, 0.0)?,
        ))
    }
}

impl NormAdapter for NormModule {
    /// `(w_norm, b_norm) · multiplier`, or nothing when module dropout skips the module this
    /// forward pass; rank dropout zeroes each channel's change with its probability, unscaled.
    /// (lycoris' own mask keeps a channel with the dropout probability instead, the reverse of
    /// what its other modules do; lorakit drops it with that probability.)
    fn changes(&self) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let mut draw = self.dropout.as_ref().and_then(BranchDropout::draw);
        if draw.as_mut().is_some_and(|d| d.skips_branch()) {
            return Ok(None);
        }
        let (mut weight, mut bias) = self.scaled()?;
        if let Some(draw) = &mut draw {
            let channels = weight.elem_count();
            if let Some(mask) = draw.row_mask(channels, 1, weight.device())? {
                weight = weight.broadcast_mul(&mask)?;
                bias = bias.broadcast_mul(&mask)?;
            }
        }
        Ok(Some((weight, bias)))
    }

    fn clone_box(&self) -> Box<dyn NormAdapter> {
        Box::new(self.clone())
    }
}

/// A LyCORIS network attached to a model.
#[derive(Debug, Clone)]
pub struct LycorisNetwork {
    /// Modules in model order.
    pub modules: Vec<LycorisModule>,
    /// Norm modules (`train_norm`) in model order.
    pub norms: Vec<NormModule>,
    /// The micro-batch stream shared by the modules' dropout.
    dropout_stream: Arc<AtomicU64>,
}

impl LycorisNetwork {
    /// Creates and attaches fresh modules, initialised as lycoris initialises them, drawn from a
    /// seeded RNG.
    pub fn create(
        model: &mut dyn Adaptable,
        config: &LycorisConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dropout_stream = Arc::new(AtomicU64::new(NO_DROPOUT_STREAM));
        let mut modules = Vec::new();
        let mut failure = None;
        model.visit_layers(&mut |layer| {
            if failure.is_some() {
                return;
            }
            let (config, dim, alpha) = match config.module_config(layer) {
                Ok(Some(selected)) => selected,
                Ok(None) => return,
                Err(e) => {
                    failure = Some(e);
                    return;
                }
            };
            let draws = BlockDraws {
                index: modules.len() as u64,
                stream: dropout_stream.clone(),
            };
            match new_module(layer, &config, dim, alpha, draws, &mut rng, device) {
                Ok(mut module) => {
                    if config.dropout.any() {
                        module.dropout = Some(BranchDropout::new(
                            config.dropout,
                            modules.len() as u64,
                            dropout_stream.clone(),
                        ));
                    }
                    layer.adapter = Some(Box::new(module.clone()));
                    modules.push(module);
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let mut norms = Vec::new();
        model.visit_norms(&mut |norm| {
            if failure.is_some() {
                return;
            }
            let module = config
                .selects_norm(norm)
                .and_then(|selected| match selected {
                    true => NormModule::new(norm, device).map(Some),
                    false => Ok(None),
                });
            match module {
                Ok(Some(mut module)) => {
                    if config.dropout.any() {
                        module.dropout = Some(BranchDropout::new(
                            config.dropout,
                            (modules.len() + norms.len()) as u64,
                            dropout_stream.clone(),
                        ));
                    }
                    norm.adapter = Some(Box::new(module.clone()));
                    norms.push(module);
                }
                Ok(None) => {}
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(Self {
            modules,
            norms,
            dropout_stream,
        })
    }

    /// Loads a LyCORIS file (LoCon, LoHa or LoKr modules) and attaches the modules whose names
    /// the model has; returns the network and the names of the file's modules it has not.
    pub fn load(
        model: &mut dyn Adaptable,
        path: &Path,
        multiplier: f64,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let mut file = read_modules(path)?;
        let mut modules = Vec::new();
        let mut failure = None;
        model.visit_layers(&mut |layer| {
            if failure.is_some() {
                return;
            }
            let name = layer.lora_name();
            let Some(tensors) = file.remove(&name) else {
                return;
            };
            match module_from_tensors(layer, &name, tensors, multiplier, device, path) {
                Ok(module) => {
                    layer.adapter = Some(Box::new(module.clone()));
                    modules.push(module);
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let mut norms = Vec::new();
        model.visit_norms(&mut |norm| {
            if failure.is_some() {
                return;
            }
            let Some(tensors) = file.remove(&norm.lora_name()) else {
                return;
            };
            match NormModule::from_tensors(norm, tensors, multiplier, device, path) {
                Ok(module) => {
                    norm.adapter = Some(Box::new(module.clone()));
                    norms.push(module);
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let network = Self {
            modules,
            norms,
            dropout_stream: Arc::new(AtomicU64::new(NO_DROPOUT_STREAM)),
        };
        Ok((network, file.into_keys().collect()))
    }

    /// Merges the modules of the LyCORIS file `path` that `model` has a layer for into its frozen
    /// weights, each as `ΔW · multiplier` (generate-images, `--base_weights`); the report counts
    /// what was merged and what the model has no layer for.
    pub fn merge_file(
        model: &mut dyn Adaptable,
        path: &Path,
        multiplier: f64,
    ) -> Result<LoadReport> {
        let mut file = read_modules(path)?;
        let mut report = LoadReport::default();
        let mut failure = None;
        model.visit_norms(&mut |norm| {
            if failure.is_some() {
                return;
            }
            let name = norm.lora_name();
            let Some(tensors) = file.remove(&name) else {
                return;
            };
            let merged = NormModule::from_tensors(norm, tensors, multiplier, &Device::Cpu, path)
                .and_then(|module| {
                    let (weight, bias) = module.scaled()?;
                    Ok(norm.merge(&weight, &bias)?)
                });
            match merged {
                Ok(()) => {
                    report.applied += 1;
                    if !name.starts_with("lora_unet_") {
                        report.applied_text_encoder += 1;
                    }
                }
                Err(e) => failure = Some(e),
            }
        });
        model.visit_layers(&mut |layer| {
            if failure.is_some() {
                return;
            }
            let name = layer.lora_name();
            let Some(tensors) = file.remove(&name) else {
                return;
            };
            let merged = module_from_tensors(layer, &name, tensors, multiplier, &Device::Cpu, path)
                .and_then(|module| Ok((module.weight_delta()?, module.bias_delta()?)))
                .and_then(|(delta, bias)| {
                    let device = layer.weight().device().clone();
                    layer.merge_into_weight(&delta.to_device(&device)?)?;
                    if let Some(bias) = bias {
                        layer.merge_into_bias(&bias.to_device(&device)?)?;
                    }
                    Ok(())
                });
            match merged {
                Ok(()) => {
                    report.applied += 1;
                    if !name.starts_with("lora_unet_") {
                        report.applied_text_encoder += 1;
                    }
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        for name in file.into_keys() {
            match name.starts_with("lora_unet_") {
                true => report.unknown.push(name),
                false => report.ignored_text_encoder += 1,
            }
        }
        Ok(report)
    }

    /// Loads the weights of the LyCORIS file `path` into this network's modules of the same
    /// names (`--network_weights`): a module the file lacks keeps its initialisation; a tensor
    /// whose shape differs is an error. A dylora module takes a saved file's `lora_up` /
    /// `lora_down` split into its blocks (lycoris' dylora module loads nothing).
    pub fn load_weights(&self, path: &Path) -> Result<usize> {
        let mut file = read_modules(path)?;
        let mut applied = 0;
        for module in &self.modules {
            let Some(tensors) = file.remove(&module.name) else {
                continue;
            };
            if let Factors::Dylora {
                ups,
                downs,
                block_size,
                ..
            } = &module.factors
            {
                if let (Some(up), Some(down)) = (
                    tensors.get("lora_up.weight"),
                    tensors.get("lora_down.weight"),
                ) {
                    let rank = ups.len() * block_size;
                    let (out, fan) = (ups[0].dim(0)?, downs[0].dim(1)?);
                    if up.elem_count() != out * rank || down.elem_count() != rank * fan {
                        return Err(Error::bad_file(
                            path,
                            format!(
                                "{}: lora_up {:?} / lora_down {:?} do not fit this network's \
                                 dim {rank}; pass the file's --network_dim / conv_dim",
                                module.name,
                                up.dims(),
                                down.dims()
                            ),
                        ));
                    }
                    let up = up.to_dtype(DType::F32)?.reshape((out, rank))?;
                    let down = down.to_dtype(DType::F32)?.reshape((rank, fan))?;
                    for (i, (up_block, down_block)) in ups.iter().zip(downs).enumerate() {
                        let start = i * block_size;
                        up_block.set(
                            &up.narrow(1, start, *block_size)?
                                .to_device(up_block.device())?,
                        )?;
                        down_block.set(
                            &down
                                .narrow(0, start, *block_size)?
                                .to_device(down_block.device())?,
                        )?;
                    }
                    applied += 1;
                    continue;
                }
            }
            if let Factors::Full { .. } = &module.factors {
                if tensors.contains_key("diff") {
                    // A saved file: the frozen weight and bias plus the differences.
                    let file_module = module_from_tensors_for(module, tensors, path)?;
                    for ((_, var), (_, value)) in
                        (module.named_vars().into_iter()).zip(file_module.named_vars())
                    {
                        var.set(&value.as_tensor().to_device(var.device())?)?;
                    }
                    applied += 1;
                    continue;
                }
            }
            for (suffix, var) in module.named_vars() {
                if suffix == "scalar" && !tensors.contains_key("scalar") {
                    // A saved file holds the scalar multiplied into a factor: lycoris sets it
                    // to 1 after loading.
                    var.set(&Tensor::ones((), DType::F32, var.device())?)?;
                    continue;
                }
                let tensor = tensors.get(suffix.as_ref()).ok_or_else(|| {
                    Error::bad_file(
                        path,
                        format!(
                            "module {} has no {suffix}: the file was made with another algo or \
                             network_args",
                            module.name
                        ),
                    )
                })?;
                if tensor.dims() != var.dims() {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "{}.{suffix} has shape {:?} in the file but {:?} in this network; \
                             pass the file's --network_dim / network_args",
                            module.name,
                            tensor.dims(),
                            var.dims()
                        ),
                    ));
                }
                var.set(&tensor.to_dtype(DType::F32)?.to_device(var.device())?)?;
            }
            applied += 1;
        }
        for module in &self.norms {
            let Some(tensors) = file.remove(&module.name) else {
                continue;
            };
            for (part, var) in module.named_vars() {
                let tensor = tensors.get(part).ok_or_else(|| {
                    Error::bad_file(path, format!("norm module {} has no {part}", module.name))
                })?;
                if tensor.elem_count() != var.elem_count() {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "{}.{part} has {} values in the file but {} in this network",
                            module.name,
                            tensor.elem_count(),
                            var.elem_count()
                        ),
                    ));
                }
                let tensor = tensor.to_dtype(DType::F32)?.flatten_all()?;
                var.set(&tensor.to_device(var.device())?)?;
            }
            applied += 1;
        }
        Ok(applied)
    }

    /// Sets the dropout masks' stream for the next forward pass (`None`: no dropout).
    pub fn set_dropout_stream(&self, stream: Option<u64>) {
        let value = stream.map_or(NO_DROPOUT_STREAM, |s| s.max(1));
        self.dropout_stream.store(value, Ordering::Relaxed);
    }

    /// Every trainable variable with its module name, in module order.
    pub fn named_vars(&self) -> Vec<(&str, Var)> {
        let modules = (self.modules.iter()).flat_map(|m| {
            (m.named_vars().into_iter()).map(move |(_, var)| (m.name.as_str(), var.clone()))
        });
        let norms = (self.norms.iter()).flat_map(|m| {
            (m.named_vars().into_iter()).map(move |(_, var)| (m.name.as_str(), var.clone()))
        });
        modules.chain(norms).collect()
    }

    /// The state dict as lycoris saves it: the factors and `alpha` (a 0-d float tensor), in
    /// `save_dtype` (F32 when `None`); `use_scalar`'s scalar multiplied into the first factor.
    pub fn state_dict(&self, save_dtype: Option<DType>) -> Result<Vec<(String, Tensor)>> {
        self.tensors(save_dtype, false)
    }

    /// The state dict of a `--save_state` folder: as [`Self::state_dict`] in F32, with the
    /// trainable tensors as they are (`use_scalar`'s `scalar` apart), so a resumed run
    /// continues bit for bit.
    pub fn training_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        self.tensors(None, true)
    }

    fn tensors(&self, save_dtype: Option<DType>, raw: bool) -> Result<Vec<(String, Tensor)>> {
        let dtype = save_dtype.unwrap_or(DType::F32);
        let mut out = Vec::new();
        for module in &self.modules {
            // lycoris' full module saves no alpha.
            if !matches!(module.factors, Factors::Full { .. }) {
                out.push((
                    format!("{}.alpha", module.name),
                    Tensor::new(module.alpha, &Device::Cpu)?.to_dtype(dtype)?,
                ));
            }
            let tensors = match raw {
                true => (module.named_vars().into_iter())
                    .map(|(suffix, var)| (suffix, var.as_tensor().clone()))
                    .collect(),
                false => module.saved_tensors()?,
            };
            for (suffix, tensor) in tensors {
                let tensor = tensor.to_device(&Device::Cpu)?.to_dtype(dtype)?;
                out.push((format!("{}.{suffix}", module.name), tensor));
            }
        }
        // lycoris' norm module saves no alpha.
        for module in &self.norms {
            for (part, var) in module.named_vars() {
                let tensor = var.as_tensor().to_device(&Device::Cpu)?.to_dtype(dtype)?;
                out.push((format!("{}.{part}", module.name), tensor));
            }
        }
        Ok(out)
    }

    /// Writes the network with `metadata` (plus the sd-webui hashes) atomically to `path`.
    pub fn save(
        &self,
        path: &Path,
        save_dtype: Option<DType>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        write_tensors(path, &self.state_dict(save_dtype)?, metadata)
    }

    /// Writes [`Self::training_state_dict`] atomically to `path` (a `--save_state` folder).
    pub fn save_training_state(&self, path: &Path) -> Result<()> {
        write_tensors(path, &self.training_state_dict()?, &BTreeMap::new())
    }
}

/// Writes `tensors` with `metadata` (plus the sd-webui hashes) atomically to `path`.
fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let bytes = serialize_with_hashes(tensors, metadata).map_err(|e| {
        Error::Model(format!(
            "cannot serialise LyCORIS network {}: {e}",
            path.display()
        ))
    })?;
    crate::infra::fsio::write_atomic(path, &bytes)
}

/// `count` values drawn uniformly from `(-bound, bound)`.
fn uniform(rng: &mut rand::rngs::StdRng, count: usize, bound: f64) -> Vec<f32> {
    (0..count)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

/// `count` values drawn from a normal distribution of standard deviation `std` (Box-Muller).
fn normal(rng: &mut rand::rngs::StdRng, count: usize, std: f64) -> Vec<f32> {
    (0..count)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

/// How a fresh tensor is filled (torch's initialisers as lycoris calls them).
enum Init {
    /// `kaiming_uniform_(a=sqrt(5))`: uniform in `±1/sqrt(fan_in)`, fan-in = the product of all
    /// dimensions but the first.
    Kaiming,
    /// `normal_(std=…)`.
    Normal(f64),
    /// `constant_(0)`.
    Zeros,
}

fn new_var(
    shape: &[usize],
    init: Init,
    rng: &mut rand::rngs::StdRng,
    device: &Device,
) -> Result<Var> {
    let count: usize = shape.iter().product();
    let values = match init {
        Init::Kaiming => {
            let fan_in: usize = shape[1..].iter().product();
            uniform(rng, count, 1.0 / (fan_in as f64).sqrt())
        }
        Init::Normal(std) => normal(rng, count, std),
        Init::Zeros => vec![0.0; count],
    };
    Ok(Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?)
}

/// A fresh module of rank `dim` on `layer`, shaped and initialised as lycoris does; a dylora
/// module draws its blocks with `draws`.
fn new_module(
    layer: &AdaptableLayer,
    config: &LycorisConfig,
    dim: usize,
    alpha: f32,
    draws: BlockDraws,
    rng: &mut rand::rngs::StdRng,
    device: &Device,
) -> Result<LycorisModule> {
    let shape = layer.weight().dims().to_vec();
    let (out_dim, in_dim) = (shape[0], shape[1]);
    let kernel: Vec<usize> = shape[2..].to_vec();
    let kernel_size: usize = kernel.iter().product();
    let alpha = if alpha == 0.0 { dim as f32 } else { alpha };
    let mut var = |shape: &[usize], init: Init| new_var(shape, init, rng, device);
    // Tucker only for kernels larger than 1x1, as lycoris.
    let tucker = config.use_tucker && kernel_size > 1;
    let core = [vec![dim, dim], kernel.clone()].concat();
    // LoCon's `lora_up` and LoKr's `w2` / `w2_b` start at zero, or Kaiming-uniform with
    // `use_scalar` (whose scalar starts at zero instead).
    let otherwise_zero = || match config.use_scalar {
        true => Init::Kaiming,
        false => Init::Zeros,
    };
    let (factors, alpha) = match config.algo {
        Algo::Locon => {
            let (down_shape, up_shape) = match layer.kind() {
                FrozenKind::Linear => (vec![dim, in_dim], vec![out_dim, dim]),
                FrozenKind::Conv2d { .. } if tucker => {
                    (vec![dim, in_dim, 1, 1], vec![out_dim, dim, 1, 1])
                }
                FrozenKind::Conv2d { .. } => {
                    let mut down = vec![dim, in_dim];
                    down.extend(&kernel);
                    (down, vec![out_dim, dim, 1, 1])
                }
            };
            let down = var(&down_shape, Init::Kaiming)?;
            let mid = match tucker {
                true => Some(var(&core, Init::Kaiming)?),
                false => None,
            };
            let up = var(&up_shape, otherwise_zero())?;
            (Factors::Locon { down, up, mid }, alpha)
        }
        Algo::Loha => {
            let (a_shape, b_shape) = match tucker {
                true => ([dim, out_dim], [dim, in_dim]),
                false => ([out_dim, dim], [dim, in_dim * kernel_size]),
            };
            let tucker = match tucker {
                true => Some((
                    var(&core, Init::Normal(0.1))?,
                    var(&core, Init::Normal(0.1))?,
                )),
                false => None,
            };
            let w1_a = var(&a_shape, Init::Normal(0.1))?;
            let w1_b = var(&b_shape, Init::Normal(1.0))?;
            let w2_a = var(
                &a_shape,
                match config.use_scalar {
                    true => Init::Normal(0.1),
                    false => Init::Zeros,
                },
            )?;
            let w2_b = var(&b_shape, Init::Normal(1.0))?;
            (
                Factors::Loha {
                    w1_a,
                    w1_b,
                    w2_a,
                    w2_b,
                    tucker,
                },
                alpha,
            )
        }
        Algo::Lokr => {
            let (in_m, in_n) = factorization(in_dim, config.factor);
            let (out_l, out_k) = factorization(out_dim, config.factor);
            let small = (out_l, in_m);
            let large = (out_k, in_n);
            let dim_f = dim as f64;
            let w1_full = !(config.decompose_both && dim_f < small.0.max(small.1) as f64 / 2.0);
            let w2_full = dim_f >= large.0.max(large.1) as f64 / 2.0;
            let w2 = if w2_full {
                let mut w2_shape = vec![large.0, large.1];
                w2_shape.extend(&kernel);
                KronFactor::Full(var(&w2_shape, otherwise_zero())?)
            } else if tucker {
                let t = var(&core, Init::Kaiming)?;
                let a = var(&[dim, large.0], Init::Kaiming)?;
                let b = var(&[dim, large.1], otherwise_zero())?;
                KronFactor::Tucker(t, a, b)
            } else {
                let a = var(&[large.0, dim], Init::Kaiming)?;
                let b = var(&[dim, large.1 * kernel_size], otherwise_zero())?;
                KronFactor::Product(a, b)
            };
            let w1 = if w1_full {
                KronFactor::Full(var(&[small.0, small.1], Init::Kaiming)?)
            } else {
                let a = var(&[small.0, dim], Init::Kaiming)?;
                let b = var(&[dim, small.1], Init::Kaiming)?;
                KronFactor::Product(a, b)
            };
            // Two full matrices: lycoris sets alpha to the dim (scale 1).
            let alpha = if w1_full && w2_full {
                dim as f32
            } else {
                alpha
            };
            (Factors::Lokr { w1, w2 }, alpha)
        }
        Algo::Full => {
            // The trained weight and bias start at the frozen ones; no alpha is saved.
            let base = layer.weight().to_device(device)?;
            let base_bias = layer.bias().map(|b| b.to_device(device)).transpose()?;
            let trained = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F32)?);
            let factors = Factors::Full {
                weight: trained(&base)?,
                bias: base_bias.as_ref().map(trained).transpose()?,
                base,
                base_bias,
            };
            (factors, dim as f32)
        }
        Algo::Dylora => {
            // lycoris fills the down blocks (Kaiming-uniform over `in·k·k`), then zeroes the up
            // blocks.
            let (block_size, blocks) = (config.block_size, dim / config.block_size);
            let fan_in = in_dim * kernel_size;
            let downs = (0..blocks)
                .map(|_| var(&[block_size, fan_in], Init::Kaiming))
                .collect::<Result<Vec<_>>>()?;
            let ups = (0..blocks)
                .map(|_| var(&[out_dim, block_size], Init::Zeros))
                .collect::<Result<Vec<_>>>()?;
            let factors = Factors::Dylora {
                ups,
                downs,
                block_size,
                draws,
            };
            (factors, alpha)
        }
    };
    let dora = match config.weight_decompose {
        true => Some(WeightDecompose::new(layer, config.wd_on_output, device)?),
        false => None,
    };
    let scalar = match config.use_scalar && config.algo != Algo::Full {
        true => Some(Var::from_tensor(&Tensor::zeros((), DType::F32, device)?)?),
        false => None,
    };
    Ok(LycorisModule {
        name: layer.lora_name(),
        factors,
        alpha,
        scale: alpha as f64 / dim as f64,
        multiplier: 1.0,
        dora,
        scalar,
        shape,
        dropout: None,
    })
}

/// The tensors of each module of a LyCORIS file, by module name and then tensor name.
type FileModules = BTreeMap<String, HashMap<String, Tensor>>;

/// Reads a LyCORIS `.safetensors` file, grouping its tensors by module.
fn read_modules(path: &Path) -> Result<FileModules> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::bad_file(path, format!("not a readable safetensors file ({e})")))?;
    let mut modules: FileModules = BTreeMap::new();
    for (key, tensor) in tensors {
        let (module, part) = key.split_once('.').ok_or_else(|| {
            Error::bad_file(
                path,
                format!("unexpected key {key}: not a LyCORIS network file"),
            )
        })?;
        modules
            .entry(module.to_string())
            .or_default()
            .insert(part.to_string(), tensor);
    }
    Ok(modules)
}

/// True when the safetensors file `path` holds LyCORIS modules (LoHa or LoKr factors, or
/// lycoris' Tucker / DoRA / full / norm tensors) rather than kohya `lora_down` / `lora_up` ones
/// only.
pub fn is_lycoris_file(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a safetensors file ({e})")))?;
    let lycoris_part = |part: &str| {
        part.starts_with("hada_")
            || part.starts_with("lokr_")
            || matches!(
                part,
                "dora_scale" | "lora_mid.weight" | "diff" | "diff_b" | "w_norm" | "b_norm"
            )
    };
    Ok((header.tensors().keys())
        .filter_map(|key| key.split_once('.'))
        .any(|(_, part)| lycoris_part(part)))
}

/// The full module of a file's `diff` / `diff_b` on the layer of `module` (an `algo=full`
/// module), which must have the same tensors.
fn module_from_tensors_for(
    module: &LycorisModule,
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<LycorisModule> {
    let Factors::Full {
        base, base_bias, ..
    } = &module.factors
    else {
        unreachable!("called for full modules only");
    };
    let loaded = full_from_tensors(&module.name, base, base_bias.as_ref(), tensors, path)?;
    let parts = |m: &LycorisModule| -> Vec<(Cow<'static, str>, Vec<usize>)> {
        (m.named_vars().into_iter())
            .map(|(part, var)| (part, var.dims().to_vec()))
            .collect()
    };
    if parts(&loaded) != parts(module) {
        return Err(Error::bad_file(
            path,
            format!(
                "module {} has {:?} in the file but {:?} in this network",
                module.name,
                parts(&loaded),
                parts(module)
            ),
        ));
    }
    Ok(loaded)
}

/// An `algo=full` module from a file's `diff` (and `diff_b`) on a layer of weight `base` and
/// bias `base_bias`.
fn full_from_tensors(
    name: &str,
    base: &Tensor,
    base_bias: Option<&Tensor>,
    mut tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<LycorisModule> {
    let bad = |message: String| Error::bad_file(path, message);
    let diff = tensors.remove("diff").expect("a full module's diff");
    if diff.dims() != base.dims() {
        return Err(bad(format!(
            "module {name}: diff has shape {:?}, the layer weight {:?}: the file was trained for \
             a different base model",
            diff.dims(),
            base.dims()
        )));
    }
    let device = base.device();
    let weight = (base.to_dtype(DType::F32)? + diff.to_dtype(DType::F32)?.to_device(device)?)?;
    let bias = match tensors.remove("diff_b") {
        Some(diff_b) => {
            let diff_b = diff_b.to_dtype(DType::F32)?.to_device(device)?;
            if diff_b.dims() != [base.dim(0)?] {
                return Err(bad(format!(
                    "module {name}: diff_b has shape {:?}, not [{}]",
                    diff_b.dims(),
                    base.dim(0)?
                )));
            }
            Some(Var::from_tensor(&match base_bias {
                Some(b) => (b.to_dtype(DType::F32)? + diff_b)?,
                None => diff_b,
            })?)
        }
        None => None,
    };
    if let Some(part) = tensors.keys().next() {
        return Err(bad(format!(
            "module {name} has diff (algo=full) and an unexpected tensor {part}"
        )));
    }
    Ok(LycorisModule {
        name: name.to_string(),
        factors: Factors::Full {
            weight: Var::from_tensor(&weight)?,
            base: base.clone(),
            bias,
            base_bias: base_bias.cloned(),
        },
        alpha: 1.0,
        scale: 1.0,
        multiplier: 1.0,
        dora: None,
        scalar: None,
        shape: base.dims().to_vec(),
        dropout: None,
    })
}

/// A module from its tensors in a file, on `layer`; the dim is read where lycoris reads it.
fn module_from_tensors(
    layer: &AdaptableLayer,
    name: &str,
    mut tensors: HashMap<String, Tensor>,
    multiplier: f64,
    device: &Device,
    path: &Path,
) -> Result<LycorisModule> {
    let bad = |message: String| Error::bad_file(path, message);
    if tensors.contains_key("diff") {
        let base = layer.weight().to_device(device)?;
        let base_bias = layer.bias().map(|b| b.to_device(device)).transpose()?;
        let mut module = full_from_tensors(name, &base, base_bias.as_ref(), tensors, path)?;
        module.multiplier = multiplier;
        return Ok(module);
    }
    let dora = match tensors.remove("dora_scale") {
        Some(norms) => {
            let weight = layer.weight();
            let layout = |axis: usize| -> Result<Vec<usize>> {
                let mut shape = vec![1; weight.rank()];
                shape[axis] = weight.dim(axis)?;
                Ok(shape)
            };
            let (by_row, by_column) = (layout(0)?, layout(1)?);
            let on_output = if norms.dims() == by_row.as_slice() {
                true
            } else if norms.dims() == by_column.as_slice() {
                false
            } else {
                return Err(bad(format!(
                    "module {name}: dora_scale has shape {:?}, neither {by_row:?} (per output \
                     row, wd_on_output=True) nor {by_column:?} (per input column): the file was \
                     trained for a different base model",
                    norms.dims()
                )));
            };
            Some(WeightDecompose {
                scale: Var::from_tensor(&norms.to_dtype(DType::F32)?.to_device(device)?)?,
                base: weight.to_device(device)?,
                on_output,
            })
        }
        None => None,
    };
    let alpha = match tensors.remove("alpha") {
        Some(alpha) => Some(alpha.to_dtype(DType::F32)?.to_scalar::<f32>()?),
        None => None,
    };
    let mut take = |part: &str| -> Result<Option<Var>> {
        match tensors.remove(part) {
            Some(t) => Ok(Some(Var::from_tensor(
                &t.to_dtype(DType::F32)?.to_device(device)?,
            )?)),
            None => Ok(None),
        }
    };
    let (factors, dim) = if let Some(down) = take("lora_down.weight")? {
        let up = take("lora_up.weight")?
            .ok_or_else(|| bad(format!("module {name} has lora_down but no lora_up")))?;
        let mid = take("lora_mid.weight")?;
        let dim = down.dim(0)?;
        (Factors::Locon { down, up, mid }, dim)
    } else if let Some(w1_a) = take("hada_w1_a")? {
        let mut need =
            |part: &str| take(part)?.ok_or_else(|| bad(format!("LoHa module {name} lacks {part}")));
        let (w1_b, w2_a, w2_b) = (need("hada_w1_b")?, need("hada_w2_a")?, need("hada_w2_b")?);
        let tucker = match need("hada_t1") {
            Ok(t1) => Some((t1, need("hada_t2")?)),
            Err(_) => None,
        };
        let dim = w1_b.dim(0)?;
        (
            Factors::Loha {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                tucker,
            },
            dim,
        )
    } else {
        let mut factor = |n: u8| -> Result<Option<KronFactor>> {
            if let Some(w) = take(&format!("lokr_w{n}"))? {
                return Ok(Some(KronFactor::Full(w)));
            }
            let core = match n {
                2 => take("lokr_t2")?,
                _ => None,
            };
            match (
                take(&format!("lokr_w{n}_a"))?,
                take(&format!("lokr_w{n}_b"))?,
            ) {
                (Some(a), Some(b)) => Ok(Some(match core {
                    Some(t) => KronFactor::Tucker(t, a, b),
                    None => KronFactor::Product(a, b),
                })),
                (None, None) => Ok(None),
                _ => Err(bad(format!(
                    "LoKr module {name} has only one of lokr_w{n}_a / _b"
                ))),
            }
        };
        match (factor(1)?, factor(2)?) {
            (Some(w1), Some(w2)) => {
                // lycoris reads the dim from w1_a, else w2_a, else it is 1 (two full matrices);
                // a Tucker core is [dim, dim, k, k].
                let dim = match (&w1, &w2) {
                    (KronFactor::Product(a, _), _) | (_, KronFactor::Product(a, _)) => a.dim(1)?,
                    (_, KronFactor::Tucker(t, _, _)) => t.dim(0)?,
                    _ => 1,
                };
                (Factors::Lokr { w1, w2 }, dim)
            }
            _ => {
                return Err(bad(format!(
                    "module {name} is neither LoCon (lora_down/lora_up), LoHa (hada_*) nor LoKr \
                     (lokr_*)"
                )))
            }
        }
    };
    if let Some(part) = tensors.keys().next() {
        return Err(bad(format!(
            "module {name} has an unexpected tensor {part}"
        )));
    }
    // lycoris: alpha 0 or missing means the dim; two full LoKr matrices always have scale 1.
    let both_full = matches!(
        &factors,
        Factors::Lokr {
            w1: KronFactor::Full(_),
            w2: KronFactor::Full(_)
        }
    );
    let alpha = match alpha {
        Some(a) if a != 0.0 && !both_full => a,
        _ => dim as f32,
    };
    let module = LycorisModule {
        name: name.to_string(),
        factors,
        alpha,
        scale: alpha as f64 / dim as f64,
        multiplier,
        dora,
        scalar: None,
        shape: layer.weight().dims().to_vec(),
        dropout: None,
    };
    let delta_count = module.factor_delta().map(|d| d.elem_count()).unwrap_or(0);
    if delta_count != layer.weight().elem_count() {
        return Err(bad(format!(
            "module {name} does not fit the layer weight {:?}: the file was trained for a \
             different base model",
            layer.weight().dims()
        )));
    }
    Ok(module)
}
