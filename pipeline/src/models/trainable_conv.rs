//! 2-D convolution with a trainable weight (the down-projection of a conv LoRA) as a candle op
//! whose forward pass and both gradients, for the input and for the weight, run on the banded
//! im2col kernels of [`super::conv`].
//!
//! candle's own `conv2d` computes its backward pass through its transposed convolution, which is
//! slow on the CPU and holds several full-size intermediates. Here the input gradient is one
//! matrix product per image followed by col2im, and the weight gradient rebuilds the im2col
//! matrix one band of output rows at a time, so no column matrix outlives the call that builds
//! it.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use super::conv::Conv2d;
use super::frozen::{dense, tensor_from_storage};
use super::kernel_choice::cpu_kernels;
use super::kernels::f32_elements;

/// `x` convolved with `weight` (`[O, C, k, k]`, no bias), differentiable in both. f32 CPU tensors
/// use the im2col kernels; other dtypes and devices use candle's `conv2d`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let on_kernels = [x, weight]
        .iter()
        .all(|t| t.dtype() == DType::F32 && cpu_kernels(t.device()));
    if !on_kernels {
        return x.conv2d(weight, padding, stride, 1, 1);
    }
    dense(x)?.apply_op2(&dense(weight)?, TrainableConv { stride, padding })
}

/// The op behind [`conv2d`]: arguments `(input, weight)`.
struct TrainableConv {
    stride: usize,
    padding: usize,
}

impl TrainableConv {
    /// The im2col layer of `weight` (shares its storage).
    fn layer(&self, weight: &Tensor) -> candle_core::Result<Conv2d> {
        Conv2d::im2col(weight.clone(), self.stride, self.padding)
    }
}

impl CustomOp2 for TrainableConv {
    fn name(&self) -> &'static str {
        "trainable-conv2d"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some(elements) = f32_elements(input, input_layout) else {
            candle_core::bail!("trainable conv2d expects a contiguous f32 input");
        };
        // The weight is small (rank x C·k·k): a copy is cheaper than any bookkeeping.
        let weight = tensor_from_storage(Storage::Cpu(weight.clone()), weight_layout)?;
        let sizes = input_layout.shape().dims4()?;
        let (output, shape) = self.layer(&weight)?.forward_elements(elements, sizes)?;
        Ok((CpuStorage::F32(output), shape))
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let layer = self.layer(weight)?;
        let grad = dense(grad_res)?;
        let (_, _, height, width) = input.dims4()?;
        let input_gradient = layer.input_gradient(&grad, (height, width))?;
        let weight_gradient = layer.weight_gradient(input, &grad)?;
        Ok((Some(input_gradient), Some(weight_gradient)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::{relative_difference, weighted_sum_gradients};
    use candle_core::{Device, Var};

    /// Output, input gradient and weight gradient of `sum(conv(x, w) * loss_weights)`.
    fn output_and_gradients(
        conv: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
        x: &Tensor,
        weight: &Tensor,
        loss_weights: &Tensor,
    ) -> [Tensor; 3] {
        let (x, weight) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(weight).unwrap(),
        );
        let y = conv(x.as_tensor(), weight.as_tensor()).unwrap();
        let [x_grad, weight_grad] = weighted_sum_gradients(&y, loss_weights, [&x, &weight]);
        [y, x_grad, weight_grad]
    }

    #[test]
    fn output_and_both_gradients_match_candle_autograd() {
        // Strides 1 and 2, paddings 0 and 1, odd sizes, rank 1 and ranks above the channel
        // count. candle's conv2d backward mishandles strided layers whose input size leaves a
        // remainder, so strided sizes here leave none (the finite-difference test covers those).
        // Measured over 30 runs: at most 9.1e-7 of the peak magnitude (output), 1.9e-7 (input
        // gradient) and 6.1e-7 (weight gradient), from summation order.
        let device = Device::Cpu;
        for (k, stride, padding, (h, w), (batch, channels, rank)) in [
            (3, 1, 1, (9, 7), (2, 5, 4)),
            (3, 1, 1, (16, 16), (1, 32, 8)),
            (3, 1, 0, (6, 8), (2, 3, 1)),
            (3, 2, 1, (9, 7), (2, 5, 4)),
            (3, 2, 0, (7, 9), (1, 4, 6)),
            (3, 2, 1, (17, 17), (2, 16, 8)),
            (1, 1, 0, (5, 6), (2, 5, 3)),
        ] {
            let x = Tensor::randn(0f32, 1.0, (batch, channels, h, w), &device).unwrap();
            let weight = Tensor::randn(0f32, 0.3, (rank, channels, k, k), &device).unwrap();
            let reference = x.conv2d(&weight, padding, stride, 1, 1).unwrap();
            let loss_weights = Tensor::randn(0f32, 1.0, reference.shape(), &device).unwrap();
            let ours = output_and_gradients(
                |x, w| conv2d(x, w, stride, padding),
                &x,
                &weight,
                &loss_weights,
            );
            let theirs = output_and_gradients(
                |x, w| x.conv2d(w, padding, stride, 1, 1),
                &x,
                &weight,
                &loss_weights,
            );
            let case = format!("k{k} s{stride} p{padding} {h}x{w} b{batch} c{channels} r{rank}");
            for (what, ours, theirs) in [
                ("output", &ours[0], &theirs[0]),
                ("input gradient", &ours[1], &theirs[1]),
                ("weight gradient", &ours[2], &theirs[2]),
            ] {
                assert_eq!(ours.dims(), theirs.dims(), "{case}: {what}");
                let difference = relative_difference(ours, theirs);
                assert!(difference <= 1e-5, "{case}: {what} off by {difference}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        // The loss sum(y * loss_weights) is linear in the input and in the weight, so a central
        // difference with a step of 1 is exact up to float rounding: every element of both
        // gradients is checked, on sizes that leave a remainder under stride 2. Measured over 30
        // runs: at most 5.6e-7 of the peak gradient.
        let device = Device::Cpu;
        for (stride, padding, (h, w)) in [(1, 1, (5, 4)), (2, 1, (6, 5)), (2, 0, (6, 8))] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &device).unwrap();
            let weight = Tensor::randn(0f32, 0.3, (2, 3, 3, 3), &device).unwrap();
            let y = conv2d(&x, &weight, stride, padding).unwrap();
            let loss_weights = Tensor::randn(0f32, 1.0, y.shape(), &device).unwrap();
            let gradients = output_and_gradients(
                |x, w| conv2d(x, w, stride, padding),
                &x,
                &weight,
                &loss_weights,
            );
            let loss_weights: Vec<f32> = loss_weights.flatten_all().unwrap().to_vec1().unwrap();
            let loss = |x: &[f32], weight: &[f32]| -> f64 {
                let x = Tensor::from_slice(x, (2, 3, h, w), &device).unwrap();
                let weight = Tensor::from_slice(weight, (2, 3, 3, 3), &device).unwrap();
                let y = conv2d(&x, &weight, stride, padding).unwrap();
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                y.iter()
                    .zip(&loss_weights)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum()
            };
            let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let (x, weight) = (values(&x), values(&weight));
            let numeric = |perturbed: &dyn Fn(usize, f32) -> f64, count: usize| -> Vec<f64> {
                (0..count)
                    .map(|i| (perturbed(i, 1.0) - perturbed(i, -1.0)) / 2.0)
                    .collect()
            };
            let input_numeric = numeric(
                &|i, step| {
                    let mut moved = x.clone();
                    moved[i] += step;
                    loss(&moved, &weight)
                },
                x.len(),
            );
            let weight_numeric = numeric(
                &|i, step| {
                    let mut moved = weight.clone();
                    moved[i] += step;
                    loss(&x, &moved)
                },
                weight.len(),
            );
            let case = format!("s{stride} p{padding} {h}x{w}");
            for (what, analytic, numeric) in [
                ("input", values(&gradients[1]), input_numeric),
                ("weight", values(&gradients[2]), weight_numeric),
            ] {
                let peak = numeric.iter().fold(0f64, |m, v| m.max(v.abs()));
                let worst = analytic
                    .iter()
                    .zip(&numeric)
                    .map(|(&a, &n)| (a as f64 - n).abs())
                    .fold(0f64, f64::max);
                assert!(
                    worst <= 5e-6 * peak,
                    "{case}: {what} gradient off by {worst} (peak {peak})"
                );
            }
        }
    }
}
