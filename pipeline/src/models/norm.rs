//! Group and layer normalisation with the affine transform fused in, and an analytic backward
//! pass (f32 on the CPU).
//!
//! Built from elementary candle ops, one normalisation keeps five or six activation-sized
//! intermediates alive for the backward pass (centred input, its square, the quotient, the
//! scaled and the shifted result). As one custom op it keeps only its input and output: at
//! SD1.5 size that is several hundred MB less per training step.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::models::kernels::{
    avx2_fma, avx512, exp_approx, f32_elements, sum_of, sum_of_pairs, with_f32_slice, zeroed,
};

/// Which elements form one normalised row.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NormKind {
    /// GroupNorm over `[B, C, H, W]`: each sample's channels split into `groups` rows of
    /// `C / groups * H * W` elements.
    Group {
        /// Number of channel groups.
        groups: usize,
    },
    /// LayerNorm over the last dimension (rows of `C` elements).
    Layer,
}

/// `y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]` over rows of the input, optionally
/// followed by SiLU (`y · sigmoid(y)`, as every UNet and VAE resnet applies it; fused, the graph
/// keeps no normalised copy for the activation).
#[derive(Debug, Clone)]
pub(crate) struct AffineNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    kind: NormKind,
    eps: f32,
    silu: bool,
}

/// `x · sigmoid(x)`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp_approx(-x))
}

/// The derivative of [`silu`]: `s (1 + x (1 - s))` with `s = sigmoid(x)`.
#[inline(always)]
fn silu_derivative(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp_approx(-x));
    s * (1.0 + x * (1.0 - s))
}

/// Per-row statistics: the mean and `1 / sqrt(var + eps)`.
#[inline(always)]
fn statistics(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len().max(1) as f32;
    let mean = sum_of(row, |x| x) / n;
    let var = sum_of(row, |x| (x - mean) * (x - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The per-channel parameters of one row: the row runs through consecutive channels from
/// `first`, `per_channel` elements each.
#[derive(Clone, Copy)]
struct RowChannels<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    first: usize,
    per_channel: usize,
    eps: f32,
    silu: bool,
}

/// One row of [`AffineNorm::forward_rows`].
#[inline(always)]
fn forward_row(out: &mut [f32], row: &[f32], p: RowChannels) {
    let (mean, rstd) = statistics(row, p.eps);
    let segments = out.chunks_mut(p.per_channel).zip(row.chunks(p.per_channel));
    for (c, (out, row)) in (p.first..).zip(segments) {
        let (scale, shift) = (rstd * p.weight[c], p.bias[c]);
        for (y, &x) in out.iter_mut().zip(row) {
            *y = (x - mean) * scale + shift;
        }
        if p.silu {
            out.iter_mut().for_each(|y| *y = silu(*y));
        }
    }
}

/// One row of [`AffineNorm::backward_rows`].
#[inline(always)]
fn backward_row(dx: &mut [f32], row: &[f32], dy: &[f32], p: RowChannels) {
    let (mean, rstd) = statistics(row, p.eps);
    let n = row.len() as f32;
    // dx holds g = dy · weight (times SiLU's derivative) until the last loop.
    let segments = dx.chunks_mut(p.per_channel).zip(row.chunks(p.per_channel));
    for (c, ((g, row), dy)) in (p.first..).zip(segments.zip(dy.chunks(p.per_channel))) {
        let (weight, bias) = (p.weight[c], p.bias[c]);
        for ((g, &x), &dy) in g.iter_mut().zip(row).zip(dy) {
            let derivative = match p.silu {
                true => silu_derivative((x - mean) * rstd * weight + bias),
                false => 1.0,
            };
            *g = dy * derivative * weight;
        }
    }
    let mean_g = sum_of(dx, |g| g) / n;
    let mean_gx = sum_of_pairs(dx, row, |g, x| g * (x - mean) * rstd) / n;
    for (g, &x) in dx.iter_mut().zip(row) {
        *g = rstd * (*g - mean_g - (x - mean) * rstd * mean_gx);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn forward_row_avx512(out: &mut [f32], row: &[f32], p: RowChannels) {
    forward_row(out, row, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_row_avx2(out: &mut [f32], row: &[f32], p: RowChannels) {
    forward_row(out, row, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn backward_row_avx512(dx: &mut [f32], row: &[f32], dy: &[f32], p: RowChannels) {
    backward_row(dx, row, dy, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_row_avx2(dx: &mut [f32], row: &[f32], dy: &[f32], p: RowChannels) {
    backward_row(dx, row, dy, p)
}

impl AffineNorm {
    /// A normalisation of `kind` with per-channel `weight` and `bias`.
    pub(crate) fn new(
        weight: &Tensor,
        bias: &Tensor,
        kind: NormKind,
        eps: f64,
        silu: bool,
    ) -> candle_core::Result<Self> {
        let as_vec = |t: &Tensor| t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>();
        Ok(Self {
            weight: as_vec(weight)?,
            bias: as_vec(bias)?,
            kind,
            eps: eps as f32,
            silu,
        })
    }

    /// Row length and elements per channel for an input of `elements` elements in `batch`
    /// samples.
    fn rows(&self, elements: usize, batch: usize) -> candle_core::Result<(usize, usize)> {
        let channels = self.weight.len();
        let (row_len, inner) = match self.kind {
            NormKind::Layer => (channels, 1),
            NormKind::Group { groups } => {
                let per_sample = elements / batch.max(1);
                (per_sample / groups.max(1), per_sample / channels.max(1))
            }
        };
        if row_len == 0 || inner == 0 || !elements.is_multiple_of(row_len) {
            candle_core::bail!("affine norm: {elements} elements do not split into rows")
        }
        Ok((row_len, inner))
    }

    /// The first channel of row `r`; the row then runs through consecutive channels, `inner`
    /// elements each.
    fn first_channel(&self, r: usize, (row_len, inner): (usize, usize)) -> usize {
        match self.kind {
            NormKind::Layer => 0,
            NormKind::Group { groups } => (r % groups) * (row_len / inner),
        }
    }

    /// Applies the normalisation to `x`, whose first dimension is the batch.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::models::frozen::dense(x)?.apply_op1(self.clone())
    }

    /// The parameters of row `r`.
    fn row_channels(&self, r: usize, rows: (usize, usize)) -> RowChannels<'_> {
        RowChannels {
            weight: &self.weight,
            bias: &self.bias,
            first: self.first_channel(r, rows),
            per_channel: rows.1,
            eps: self.eps,
            silu: self.silu,
        }
    }

    fn forward_rows(&self, input: &[f32], rows: (usize, usize)) -> Vec<f32> {
        let row_len = rows.0;
        let mut output = zeroed(input.len());
        #[cfg(target_arch = "x86_64")]
        let (wide, avx2) = (avx512(), avx2_fma());
        output
            .par_chunks_mut(row_len)
            .zip(input.par_chunks(row_len))
            .enumerate()
            .for_each(|(r, (out, row))| {
                let p = self.row_channels(r, rows);
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the CPU supports the features this copy of the loop is compiled for.
                    unsafe { forward_row_avx512(out, row, p) };
                    return;
                }
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU supports the features this copy of the loop is compiled for.
                    unsafe { forward_row_avx2(out, row, p) };
                    return;
                }
                forward_row(out, row, p);
            });
        output
    }

    /// `dx = rstd * (g - mean(g) - x̂ * mean(g * x̂))` with `g = dy * weight` and `x̂` the
    /// standardised input, per row (`dy` first times SiLU's derivative at the normalised value
    /// when the SiLU is fused).
    fn backward_rows(&self, input: &[f32], grad: &[f32], rows: (usize, usize)) -> Vec<f32> {
        let row_len = rows.0;
        let mut grad_input = zeroed(input.len());
        #[cfg(target_arch = "x86_64")]
        let (wide, avx2) = (avx512(), avx2_fma());
        grad_input
            .par_chunks_mut(row_len)
            .zip(input.par_chunks(row_len).zip(grad.par_chunks(row_len)))
            .enumerate()
            .for_each(|(r, (dx, (row, dy)))| {
                let p = self.row_channels(r, rows);
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the CPU supports the features this copy of the loop is compiled for.
                    unsafe { backward_row_avx512(dx, row, dy, p) };
                    return;
                }
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU supports the features this copy of the loop is compiled for.
                    unsafe { backward_row_avx2(dx, row, dy, p) };
                    return;
                }
                backward_row(dx, row, dy, p);
            });
        grad_input
    }
}

impl CustomOp1 for AffineNorm {
    fn name(&self) -> &'static str {
        "affine-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = f32_elements(storage, layout).ok_or_else(|| {
            candle_core::Error::Msg("affine norm: expects a contiguous f32 input".into())
        })?;
        let batch = layout.shape().dims().first().copied().unwrap_or(1);
        let rows = self.rows(input.len(), batch)?;
        Ok((
            CpuStorage::F32(self.forward_rows(input, rows)),
            layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let rows = self.rows(arg.elem_count(), arg.dim(0)?)?;
        let grad_input = with_f32_slice(arg, |input| {
            with_f32_slice(grad_res, |grad| self.backward_rows(input, grad, rows))
        })??;
        Ok(Some(Tensor::from_vec(
            grad_input,
            arg.shape(),
            arg.device(),
        )?))
    }
}

/// Affine normalisation parameters (GroupNorm or LayerNorm) of a frozen model, with a backward
/// pass for the activations: the fused [`AffineNorm`] for f32 CPU inputs, elementary candle ops
/// otherwise.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    /// A normalisation with per-channel `weight` and `bias` (detached from any graph).
    pub(crate) fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight: weight.detach(),
            bias: bias.detach(),
            eps,
        }
    }

    /// The per-channel weight.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The per-channel bias.
    pub(crate) fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The variance epsilon.
    pub(crate) fn eps(&self) -> f64 {
        self.eps
    }

    /// The same normalisation without its affine transform (weight 1, bias 0).
    pub(crate) fn unit(&self) -> candle_core::Result<Self> {
        Ok(Self::new(
            self.weight.ones_like()?,
            self.bias.zeros_like()?,
            self.eps,
        ))
    }

    /// GroupNorm over `[B, C, H, W]` with `groups` groups.
    pub(crate) fn group(&self, groups: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        self.group_then(groups, x, false)
    }

    /// GroupNorm followed by SiLU.
    pub(crate) fn group_silu(&self, groups: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        self.group_then(groups, x, true)
    }

    /// GroupNorm, then SiLU when `silu` is set.
    fn group_then(&self, groups: usize, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        if is_f32_cpu(x) {
            let kind = NormKind::Group { groups };
            return AffineNorm::new(&self.weight, &self.bias, kind, self.eps, silu)?.forward(x);
        }
        let normed = self.group_elementary(groups, x)?;
        if silu {
            normed.silu()
        } else {
            Ok(normed)
        }
    }

    /// GroupNorm from elementary candle ops.
    fn group_elementary(&self, groups: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let grouped = x.reshape((b, groups, (c / groups) * h * w))?;
        let normed = standardise(&grouped, self.eps)?.reshape((b, c, h, w))?;
        normed
            .broadcast_mul(&self.weight.to_dtype(x.dtype())?.reshape((c, 1, 1))?)?
            .broadcast_add(&self.bias.to_dtype(x.dtype())?.reshape((c, 1, 1))?)
    }

    /// LayerNorm over the last dimension.
    pub(crate) fn layer(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if is_f32_cpu(x) {
            return AffineNorm::new(&self.weight, &self.bias, NormKind::Layer, self.eps, false)?
                .forward(x);
        }
        standardise(x, self.eps)?
            .broadcast_mul(&self.weight.to_dtype(x.dtype())?)?
            .broadcast_add(&self.bias.to_dtype(x.dtype())?)
    }
}

/// Whether `x` can take the fused f32 CPU kernels.
fn is_f32_cpu(x: &Tensor) -> bool {
    x.dtype() == candle_core::DType::F32 && crate::models::kernel_choice::cpu_kernels(x.device())
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension (biased variance).
fn standardise(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(candle_core::D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::{max_difference, weighted_sum_gradients};
    use candle_core::{DType, Device, Var, D};

    /// The same normalisation from elementary candle ops (differentiated by candle).
    fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize) -> Tensor {
        let dims = x.dims().to_vec();
        let rows = if dims.len() == 4 {
            x.reshape((dims[0], groups, ())).unwrap()
        } else {
            x.clone()
        };
        let mean = rows.mean_keepdim(D::Minus1).unwrap();
        let centred = rows.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape(dims.as_slice())
            .unwrap();
        let (weight, bias) = if dims.len() == 4 {
            let c = dims[1];
            (
                weight.reshape((c, 1, 1)).unwrap(),
                bias.reshape((c, 1, 1)).unwrap(),
            )
        } else {
            (weight.clone(), bias.clone())
        };
        normed
            .broadcast_mul(&weight)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
    }

    #[test]
    fn the_vector_copies_of_the_row_loops_equal_the_portable_loops_bit_for_bit() {
        // [2, 8, 5, 7] in 4 groups: rows of 70, with and without the fused SiLU.
        let device = Device::Cpu;
        let (batch, channels, count) = (2, 8, 2 * 8 * 35);
        let input = Tensor::randn(0.5f32, 2.0, count, &device)
            .unwrap()
            .to_vec1()
            .unwrap();
        let grad = Tensor::randn(0f32, 1.0, count, &device)
            .unwrap()
            .to_vec1()
            .unwrap();
        let weight = Tensor::randn(1f32, 0.3, channels, &device).unwrap();
        let bias = Tensor::randn(0f32, 0.3, channels, &device).unwrap();
        for silu in [false, true] {
            let kind = NormKind::Group { groups: 4 };
            let norm = AffineNorm::new(&weight, &bias, kind, 1e-5, silu).unwrap();
            let rows = norm.rows(count, batch).unwrap();
            let (forward, backward) = (
                norm.forward_rows(&input, rows),
                norm.backward_rows(&input, &grad, rows),
            );
            let row_len = rows.0;
            for (r, row) in input.chunks(row_len).enumerate() {
                let p = norm.row_channels(r, rows);
                let (mut out, mut dx) = (vec![0f32; row_len], vec![0f32; row_len]);
                forward_row(&mut out, row, p);
                backward_row(&mut dx, row, &grad[r * row_len..][..row_len], p);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&forward[r * row_len..][..row_len]),
                    bits(&out),
                    "{silu} {r}"
                );
                assert_eq!(
                    bits(&backward[r * row_len..][..row_len]),
                    bits(&dx),
                    "{silu} {r}"
                );
            }
        }
    }

    #[test]
    fn group_and_layer_norm_match_elementary_ops_with_gradients() {
        let device = Device::Cpu;
        // GroupNorm [2, 8, 3, 5] with 4 groups, alone and followed by SiLU; LayerNorm over 6
        // and 37 features (shorter and longer than the kernels' lanes).
        for (dims, groups, kind, silu) in [
            (vec![2, 8, 3, 5], 4, NormKind::Group { groups: 4 }, false),
            (vec![2, 8, 3, 5], 4, NormKind::Group { groups: 4 }, true),
            (vec![2, 7, 6], 1, NormKind::Layer, false),
            (vec![2, 5, 37], 1, NormKind::Layer, false),
        ] {
            let channels = if dims.len() == 4 { dims[1] } else { dims[2] };
            let x = (Tensor::randn(0f32, 2.0, dims.as_slice(), &device).unwrap() + 0.7).unwrap();
            let weight = Tensor::randn(1f32, 0.3, channels, &device).unwrap();
            let bias = Tensor::randn(0f32, 0.3, channels, &device).unwrap();
            let norm = AffineNorm::new(&weight, &bias, kind, 1e-5, silu).unwrap();

            let ours_input = Var::from_tensor(&x).unwrap();
            let reference_input = Var::from_tensor(&x).unwrap();
            let ours = norm.forward(ours_input.as_tensor()).unwrap();
            let mut expected = reference(reference_input.as_tensor(), &weight, &bias, groups);
            if silu {
                expected = expected.silu().unwrap();
            }
            assert!(max_difference(&ours, &expected) < 1e-5, "{dims:?} {silu}");

            let weights = Tensor::randn(0f32, 1.0, dims.as_slice(), &device).unwrap();
            let [ours_grad] = weighted_sum_gradients(&ours, &weights, [&ours_input]);
            let [expected_grad] = weighted_sum_gradients(&expected, &weights, [&reference_input]);
            assert_eq!(ours_grad.dtype(), DType::F32);
            let difference = max_difference(&ours_grad, &expected_grad);
            assert!(
                difference < 1e-5,
                "{dims:?} {silu}: gradient off by {difference}"
            );
        }
    }
}
