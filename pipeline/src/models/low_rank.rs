//! A frozen linear layer (or pointwise convolution) and its trainable low-rank branch as one
//! operation: `y = x W^T + b + scale · (x D^T) U^T` (W frozen, D = `lora_down`, U = `lora_up`).
//!
//! Composed of separate candle ops, the graph keeps the frozen product, its biased copy, the
//! branch's output and its scaled copy until the backward pass: four tensors of the layer's
//! output size per adapted layer, most of a transformer block's activation memory. As one custom
//! op only `x` and the two factors are kept, the output is written once, and the branch's small
//! hidden `x D^T` is recomputed in the backward pass. f32 activations on the CPU; the frozen
//! weight may be stored narrower ([`super::frozen`] reads it in f32 bands).

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::frozen::{dense, linear, linear_input_gradient};
use super::kernel_choice::cpu_kernels;
use super::kernels::{
    f32_elements, gemm_into, with_f32_slice, with_f32_slices, zeroed, Operand, Threads,
};

/// A plain low-rank branch `scale · up(down(x))` of a linear layer (a LoRA module without
/// dropout this pass).
#[derive(Debug, Clone)]
pub struct LowRankBranch {
    /// `[rank, in]`.
    pub down: Tensor,
    /// `[out, rank]`.
    pub up: Tensor,
    /// The branch's scale (multiplier · alpha / rank).
    pub scale: f64,
}

/// `x W^T + b + branch(x)` as one op, or `None` where it does not apply (activations or factors
/// not f32 on the CPU, factors not 2-D, a weight viewed in another layout), in which case the caller composes the ops itself.
pub(crate) fn linear_with_branch(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    branch: &LowRankBranch,
) -> candle_core::Result<Option<Tensor>> {
    if !fused_applies(x, weight, bias, branch) || branch.down.rank() != 2 {
        return Ok(None);
    }
    // The op takes the leading dimensions as rows itself: reshapes around it would be graph
    // nodes whose gradients the backward pass copies and sums once more.
    let op = FusedLowRankLinear::new(weight, bias, branch, ActivationLayout::Rows);
    let y = dense(x)?.apply_op3(&dense(&branch.down)?, &dense(&branch.up)?, op)?;
    Ok(Some(y))
}

/// The 1x1 convolution `[B, C, H, W]` with weight `[out, C, 1, 1]`, its bias and a branch of
/// 1x1 factors as one op (the same product per pixel), or `None` where it does not apply.
pub(crate) fn pointwise_conv_with_branch(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    branch: &LowRankBranch,
) -> candle_core::Result<Option<Tensor>> {
    let pointwise = |t: &Tensor| t.rank() == 4 && t.dims()[2..] == [1, 1];
    let applies = fused_applies(x, weight, bias, branch)
        && x.rank() == 4
        && pointwise(weight)
        && pointwise(&branch.down)
        && pointwise(&branch.up);
    if !applies {
        return Ok(None);
    }
    let as_matrix = |t: &Tensor| dense(&t.flatten_from(1)?);
    let op = FusedLowRankLinear::new(weight, bias, branch, ActivationLayout::ChannelsFirst);
    let y = dense(x)?.apply_op3(&as_matrix(&branch.down)?, &as_matrix(&branch.up)?, op)?;
    Ok(Some(y))
}

/// Whether the fused op can run: f32 activations and factors on the CPU, a CPU weight.
fn fused_applies(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    branch: &LowRankBranch,
) -> bool {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && cpu_kernels(t.device());
    f32_cpu(x)
        && f32_cpu(&branch.down)
        && f32_cpu(&branch.up)
        && cpu_kernels(weight.device())
        && weight.is_contiguous()
        && bias.is_none_or(f32_cpu)
}

/// How the op's activations are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActivationLayout {
    /// `[..., features]`: every leading index is a row.
    Rows,
    /// `[B, C, H, W]`: each pixel is a row; transposed to rows and back inside the op.
    ChannelsFirst,
}

#[derive(Debug, Clone)]
struct FusedLowRankLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    layout: ActivationLayout,
}

/// `[B, C, P]` -> `[B·P, C]`.
fn channels_last(x: &[f32], channels: usize, pixels: usize) -> Vec<f32> {
    let mut out = zeroed(x.len());
    for (image, out) in x
        .chunks(channels * pixels)
        .zip(out.chunks_mut(channels * pixels))
    {
        for (c, plane) in image.chunks(pixels).enumerate() {
            for (p, &value) in plane.iter().enumerate() {
                out[p * channels + c] = value;
            }
        }
    }
    out
}

/// `[B·P, C]` -> `[B, C, P]`.
fn channels_first(x: &[f32], channels: usize, pixels: usize) -> Vec<f32> {
    let mut out = zeroed(x.len());
    for (rows, image) in x
        .chunks(channels * pixels)
        .zip(out.chunks_mut(channels * pixels))
    {
        for (p, row) in rows.chunks(channels).enumerate() {
            for (c, &value) in row.iter().enumerate() {
                image[c * pixels + p] = value;
            }
        }
    }
    out
}

/// The sizes of one product: `rows` activations of width `inner`, `out` outputs, `rank`, and
/// for channels-first activations the pixels per image.
#[derive(Clone, Copy)]
struct Sizes {
    rows: usize,
    inner: usize,
    out: usize,
    rank: usize,
    pixels: usize,
}

impl Sizes {
    fn of(
        x: &Shape,
        down: &Shape,
        up: &Shape,
        layout: ActivationLayout,
    ) -> candle_core::Result<Self> {
        let (rows, inner, pixels) = match layout {
            ActivationLayout::Rows => {
                let Some(&inner) = x.dims().last().filter(|_| x.rank() >= 2) else {
                    candle_core::bail!("low-rank linear: input {:?} has no rows", x.dims())
                };
                (x.elem_count() / inner.max(1), inner, 1)
            }
            ActivationLayout::ChannelsFirst => {
                let (batch, channels, height, width) = x.dims4()?;
                (batch * height * width, channels, height * width)
            }
        };
        let (rank, down_inner) = down.dims2()?;
        let (out, up_rank) = up.dims2()?;
        if down_inner != inner || up_rank != rank {
            candle_core::bail!(
                "low-rank branch {:?} / {:?} does not fit input {:?}",
                down.dims(),
                up.dims(),
                x.dims()
            )
        }
        Ok(Sizes {
            rows,
            inner,
            out,
            rank,
            pixels,
        })
    }

    /// `x D^T`, `[rows, rank]`.
    fn hidden(&self, x: &[f32], down: &[f32]) -> Vec<f32> {
        let mut hidden = zeroed(self.rows * self.rank);
        let (lhs, rhs) = (
            Operand::row_major(x, self.inner),
            Operand::transposed(down, self.inner),
        );
        let shape = (self.rows, self.rank, self.inner);
        gemm_into(
            &mut hidden,
            self.rank,
            lhs,
            rhs,
            shape,
            false,
            Threads::Pool,
        );
        hidden
    }
}

impl FusedLowRankLinear {
    fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        branch: &LowRankBranch,
        layout: ActivationLayout,
    ) -> Self {
        FusedLowRankLinear {
            weight: weight.clone(),
            bias: bias.cloned(),
            scale: branch.scale as f32,
            layout,
        }
    }

    /// Activations in this op's layout as rows (borrowed when they are rows already).
    fn layout_to_rows<'a>(&self, x: &'a [f32], width: usize, s: Sizes) -> Cow<'a, [f32]> {
        match self.layout {
            ActivationLayout::Rows => Cow::Borrowed(x),
            ActivationLayout::ChannelsFirst => Cow::Owned(channels_last(x, width, s.pixels)),
        }
    }

    /// Rows back in this op's layout.
    fn rows_to_layout(&self, rows: Vec<f32>, width: usize, s: Sizes) -> Vec<f32> {
        match self.layout {
            ActivationLayout::Rows => rows,
            ActivationLayout::ChannelsFirst => channels_first(&rows, width, s.pixels),
        }
    }

    fn forward(
        &self,
        x: &[f32],
        down: &[f32],
        up: &[f32],
        s: Sizes,
    ) -> candle_core::Result<Vec<f32>> {
        let mut y = linear(x, s.rows, &self.weight)?;
        if let Some(bias) = &self.bias {
            with_f32_slice(bias, |bias| {
                y.par_chunks_mut(s.out).for_each(|row| {
                    row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                })
            })?;
        }
        let mut hidden = s.hidden(x, down);
        hidden.iter_mut().for_each(|h| *h *= self.scale);
        let (lhs, rhs) = (
            Operand::row_major(&hidden, s.rank),
            Operand::transposed(up, s.rank),
        );
        gemm_into(
            &mut y,
            s.out,
            lhs,
            rhs,
            (s.rows, s.out, s.rank),
            true,
            Threads::Pool,
        );
        Ok(y)
    }

    /// The gradients of `x` (when `input_gradient` is set), `down` and `up` for the output
    /// gradient `grad`.
    fn backward(
        &self,
        x: &[f32],
        down: &[f32],
        up: &[f32],
        grad: &[f32],
        s: Sizes,
        input_gradient: bool,
    ) -> candle_core::Result<(Option<Vec<f32>>, [Vec<f32>; 2])> {
        // g = scale · dY U, [rows, rank]: the gradient reaching the hidden.
        let mut hidden_grad = zeroed(s.rows * s.rank);
        let (lhs, rhs) = (
            Operand::row_major(grad, s.out),
            Operand::row_major(up, s.rank),
        );
        let shape = (s.rows, s.rank, s.out);
        gemm_into(
            &mut hidden_grad,
            s.rank,
            lhs,
            rhs,
            shape,
            false,
            Threads::Pool,
        );
        hidden_grad.iter_mut().for_each(|g| *g *= self.scale);

        // dX = dY W + g D.
        let x_grad = if input_gradient {
            let mut x_grad = linear_input_gradient(grad, s.rows, &self.weight)?;
            let (lhs, rhs) = (
                Operand::row_major(&hidden_grad, s.rank),
                Operand::row_major(down, s.inner),
            );
            let shape = (s.rows, s.inner, s.rank);
            gemm_into(&mut x_grad, s.inner, lhs, rhs, shape, true, Threads::Pool);
            Some(x_grad)
        } else {
            None
        };

        // dD = g^T X, [rank, in].
        let mut down_grad = zeroed(s.rank * s.inner);
        let (lhs, rhs) = (
            Operand::row_major(&hidden_grad, s.rank).t(),
            Operand::row_major(x, s.inner),
        );
        let shape = (s.rank, s.inner, s.rows);
        gemm_into(
            &mut down_grad,
            s.inner,
            lhs,
            rhs,
            shape,
            false,
            Threads::Pool,
        );

        // dU = scale · dY^T (X D^T), [out, rank].
        let mut hidden = s.hidden(x, down);
        hidden.iter_mut().for_each(|h| *h *= self.scale);
        let mut up_grad = zeroed(s.out * s.rank);
        let (lhs, rhs) = (
            Operand::row_major(grad, s.out).t(),
            Operand::row_major(&hidden, s.rank),
        );
        let shape = (s.out, s.rank, s.rows);
        gemm_into(&mut up_grad, s.rank, lhs, rhs, shape, false, Threads::Pool);
        Ok((x_grad, [down_grad, up_grad]))
    }
}

impl CustomOp3 for FusedLowRankLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-with-low-rank-branch"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sizes = Sizes::of(l1.shape(), l2.shape(), l3.shape(), self.layout)?;
        let (Some(x), Some(down), Some(up)) = (
            f32_elements(s1, l1),
            f32_elements(s2, l2),
            f32_elements(s3, l3),
        ) else {
            candle_core::bail!("low-rank linear: expected contiguous f32 inputs")
        };
        let mut dims = l1.shape().dims().to_vec();
        match self.layout {
            ActivationLayout::Rows => *dims.last_mut().expect("rows have a width") = sizes.out,
            ActivationLayout::ChannelsFirst => dims[1] = sizes.out,
        }
        let shape = Shape::from(dims);
        let rows = self.layout_to_rows(x, sizes.inner, sizes);
        let y = self.forward(&rows, down, up, sizes)?;
        Ok((
            CpuStorage::F32(self.rows_to_layout(y, sizes.out, sizes)),
            shape,
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sizes = Sizes::of(x.shape(), down.shape(), up.shape(), self.layout)?;
        // An input that carries no gradient (the text context of a cross-attention key or
        // value) is spared the product through the frozen weight.
        let input_gradient = x.track_op();
        let inputs = [x, down, up, grad_res].map(Tensor::detach);
        let (x_grad, [down_grad, up_grad]) = with_f32_slices(
            inputs.each_ref(),
            |[x_values, down_values, up_values, grad]| {
                let x_rows = self.layout_to_rows(x_values, sizes.inner, sizes);
                let grad_rows = self.layout_to_rows(grad, sizes.out, sizes);
                self.backward(
                    &x_rows,
                    down_values,
                    up_values,
                    &grad_rows,
                    sizes,
                    input_gradient,
                )
            },
        )??;
        let device = x.device();
        let x_grad = x_grad
            .map(|rows| {
                let values = self.rows_to_layout(rows, sizes.inner, sizes);
                Tensor::from_vec(values, x.shape(), device)
            })
            .transpose()?;
        Ok((
            x_grad,
            Some(Tensor::from_vec(down_grad, down.shape(), device)?),
            Some(Tensor::from_vec(up_grad, up.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::{relative_difference, weighted_sum_gradients};
    use crate::models::frozen::{FrozenKind, FrozenOp};
    use candle_core::{Device, Var};

    /// `fused` equals `reference` within 1e-5, and so do the gradients of a weighted sum of
    /// each with respect to its input (`x` for `fused`, `reference_x` for `reference`) and the
    /// shared factors.
    fn assert_same_values_and_gradients(
        case: &str,
        fused: &Tensor,
        reference: &Tensor,
        [x, reference_x, down, up]: [&Var; 4],
    ) {
        assert_eq!(fused.dims(), reference.dims(), "{case}");
        let off = relative_difference(fused, reference);
        assert!(off < 1e-5, "{case}: output {off}");
        let loss_weights = Tensor::randn(0f32, 1.0, fused.shape(), fused.device()).unwrap();
        let ours = weighted_sum_gradients(fused, &loss_weights, [x, down, up]);
        let theirs = weighted_sum_gradients(reference, &loss_weights, [reference_x, down, up]);
        for (name, (a, b)) in ["x", "down", "up"].iter().zip(ours.iter().zip(&theirs)) {
            let off = relative_difference(a, b);
            assert!(off < 1e-5, "{case}: gradient of {name} off by {off}");
        }
    }

    #[test]
    fn matches_the_composed_ops_with_gradients() {
        // The fused op against the frozen op, a bias add and the branch written as candle ops,
        // for f32 and bf16 weights, a 3-D input and an output wide enough for several bands.
        let device = Device::Cpu;
        for (out, inner, rank, dtype) in [
            (7, 5, 3, DType::F32),
            (7, 5, 3, DType::BF16),
            (1100, 4096, 4, DType::BF16),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, inner), &device).unwrap();
            let weight = Tensor::randn(0f32, 0.3, (out, inner), &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bias = Tensor::randn(0f32, 1.0, out, &device).unwrap();
            let down = Var::randn(0f32, 0.3, (rank, inner), &device).unwrap();
            let up = Var::randn(0f32, 0.3, (out, rank), &device).unwrap();
            let scale = 0.75;
            let branch = LowRankBranch {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
                scale,
            };
            let input = Var::from_tensor(&x).unwrap();
            let fused = linear_with_branch(input.as_tensor(), &weight, Some(&bias), &branch)
                .unwrap()
                .expect("f32 CPU activations take the fused op");

            let reference_input = Var::from_tensor(&x).unwrap();
            let frozen = FrozenOp::new(weight.clone(), None, FrozenKind::Linear);
            let reference = (frozen.forward(reference_input.as_tensor()).unwrap())
                .broadcast_add(&bias)
                .unwrap()
                + (reference_input.as_tensor())
                    .broadcast_matmul(&down.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&up.as_tensor().t().unwrap())
                    .unwrap()
                    .affine(scale, 0.0)
                    .unwrap();
            let reference = reference.unwrap();
            let case = format!("{out}x{inner} rank {rank} {dtype:?}");
            let inputs = [&input, &reference_input, &down, &up];
            assert_same_values_and_gradients(&case, &fused, &reference, inputs);
        }
    }

    #[test]
    fn pointwise_convolution_matches_the_composed_ops_with_gradients() {
        let device = Device::Cpu;
        let (out, channels, rank) = (6, 5, 2);
        let x = Tensor::randn(0f32, 1.0, (2, channels, 3, 4), &device).unwrap();
        let weight = Tensor::randn(0f32, 0.3, (out, channels, 1, 1), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, out, &device).unwrap();
        let down = Var::randn(0f32, 0.3, (rank, channels, 1, 1), &device).unwrap();
        let up = Var::randn(0f32, 0.3, (out, rank, 1, 1), &device).unwrap();
        let scale = 1.5;
        let branch = LowRankBranch {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale,
        };
        let input = Var::from_tensor(&x).unwrap();
        let fused = pointwise_conv_with_branch(input.as_tensor(), &weight, Some(&bias), &branch)
            .unwrap()
            .expect("f32 CPU activations take the fused op");
        let reference_input = Var::from_tensor(&x).unwrap();
        let conv = |x: &Tensor, w: &Tensor| x.conv2d(w, 0, 1, 1, 1).unwrap();
        let reference = (conv(reference_input.as_tensor(), &weight)
            .broadcast_add(&bias.reshape((out, 1, 1)).unwrap())
            .unwrap()
            + conv(
                &conv(reference_input.as_tensor(), down.as_tensor()),
                up.as_tensor(),
            )
            .affine(scale, 0.0)
            .unwrap())
        .unwrap();
        let inputs = [&input, &reference_input, &down, &up];
        assert_same_values_and_gradients("pointwise", &fused, &reference, inputs);
    }

    #[test]
    fn an_input_without_gradient_still_trains_the_factors() {
        // A cross-attention key on the text context: the context carries no gradient, the
        // factors get the same gradients as with a tracked input.
        let device = Device::Cpu;
        let (out, inner, rank) = (6, 5, 2);
        let context = Tensor::randn(0f32, 1.0, (4, inner), &device).unwrap();
        let weight = Tensor::randn(0f32, 0.3, (out, inner), &device).unwrap();
        let down = Var::randn(0f32, 0.3, (rank, inner), &device).unwrap();
        let up = Var::randn(0f32, 0.3, (out, rank), &device).unwrap();
        let branch = LowRankBranch {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale: 0.5,
        };
        let loss_weights = Tensor::randn(0f32, 1.0, (4, out), &device).unwrap();
        let key = |x: &Tensor| {
            let y = linear_with_branch(x, &weight, None, &branch)
                .unwrap()
                .unwrap();
            (y * &loss_weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let tracked = Var::from_tensor(&context).unwrap();
        let (plain, with_input) = (key(&context), key(tracked.as_tensor()));
        assert!(with_input.get(tracked.as_tensor()).is_some());
        assert!(plain.get(&context).is_none(), "no gradient for the context");
        for factor in [&down, &up] {
            let (a, b) = (plain.get(factor).unwrap(), with_input.get(factor).unwrap());
            assert_eq!(relative_difference(a, b), 0.0);
        }
    }

    #[test]
    fn other_dtypes_and_devices_fall_back_to_the_composed_ops() {
        let device = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F16, &device).unwrap();
        let branch = LowRankBranch {
            down: Tensor::zeros((1, 4), DType::F32, &device).unwrap(),
            up: Tensor::zeros((3, 1), DType::F32, &device).unwrap(),
            scale: 1.0,
        };
        let weight = Tensor::zeros((3, 4), DType::F32, &device).unwrap();
        assert!(linear_with_branch(&x, &weight, None, &branch)
            .unwrap()
            .is_none());
    }
}
