//! Frozen (non-trainable) linear and convolution layers whose backward pass returns a gradient
//! for the activation only.
//!
//! candle's built-in `matmul`/`conv2d` always compute the gradient of both operands, so a frozen
//! base weight would get a full-size gradient tensor at every step (and keep it alive until the end
//! of the backward pass). Wrapping the operation in a [`CustomOp1`] whose only argument is the
//! activation hides the weight from the autograd graph: the backward pass computes `dL/dx` and
//! nothing else.

use std::sync::Arc;

use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Module, Shape, Storage, Tensor,
};

use super::conv::Conv2d;

/// The operation applied with a frozen weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrozenKind {
    /// `y = x W^T` over the last dimension (weight `[out, in]`).
    Linear,
    /// 2-D convolution (weight `[out, in, kh, kw]`), square stride and padding.
    Conv2d {
        /// Convolution stride.
        stride: usize,
        /// Zero padding on each side.
        padding: usize,
    },
}

/// A frozen weight applied to activations through a gradient-free-for-the-weight custom op.
#[derive(Debug, Clone)]
pub struct FrozenOp {
    weight: Tensor,
    kind: FrozenKind,
    /// For stride-1 convolutions: the kernel with in/out swapped and spatially flipped, so the
    /// input gradient is a plain (fast, im2col) convolution instead of a transposed one.
    backward_kernel: Option<Tensor>,
    /// For f32 CPU convolutions: the im2col convolution of [`super::conv`] with the frozen weight
    /// itself, for the forward pass and the input gradient (much faster than candle's stock
    /// convolution and transposed convolution, and no transformed or flipped copy of the weight:
    /// at SD1.5 size such copies would add gigabytes).
    cpu_conv: Option<Arc<Conv2d>>,
}

impl FrozenOp {
    /// Wraps `weight` (detached from any graph) for operation `kind`.
    pub fn new(weight: Tensor, kind: FrozenKind) -> Self {
        let weight = weight.detach();
        let cpu_conv = match kind {
            FrozenKind::Conv2d { stride, padding }
                if weight.dtype() == DType::F32 && weight.device().is_cpu() =>
            {
                bias_free_im2col(&weight, stride, padding)
                    .ok()
                    .map(Arc::new)
            }
            _ => None,
        };
        let backward_kernel = match kind {
            FrozenKind::Conv2d { stride: 1, .. } if cpu_conv.is_none() => {
                flipped_transposed(&weight).ok()
            }
            _ => None,
        };
        Self {
            weight,
            kind,
            backward_kernel,
            cpu_conv,
        }
    }

    /// The frozen weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The operation kind.
    pub fn kind(&self) -> FrozenKind {
        self.kind
    }

    /// Applies the frozen operation to `x` (any layout; the result is contiguous).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        dense(x)?.apply_op1(self.clone())
    }

    /// Plain candle computation of the operation on a graph-free input.
    fn compute(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.kind {
            FrozenKind::Linear => {
                let (rows, inner) = (
                    x.elem_count() / x.dim(candle_core::D::Minus1)?,
                    x.dim(candle_core::D::Minus1)?,
                );
                let mut out_dims = x.dims().to_vec();
                *out_dims
                    .last_mut()
                    .expect("linear input has a last dimension") = self.weight.dim(0)?;
                x.reshape((rows, inner))?
                    .matmul(&self.weight.t()?)?
                    .reshape(out_dims)
            }
            FrozenKind::Conv2d { stride, padding } => match self.fast_conv(x) {
                Some(conv) => conv.forward(x),
                None => x.conv2d(&self.weight, padding, stride, 1, 1),
            },
        }
    }

    /// The f32 CPU convolution, when it applies to `x`.
    fn fast_conv(&self, x: &Tensor) -> Option<&Conv2d> {
        let applies = x.dtype() == DType::F32 && x.device().is_cpu();
        self.cpu_conv.as_deref().filter(|_| applies)
    }

    /// Runs [`Self::compute`] on a storage handed over by candle and returns the result storage.
    fn run_on(&self, storage: Storage, layout: &Layout) -> candle_core::Result<(Storage, Shape)> {
        let x = tensor_from_storage(storage, layout)?;
        into_storage(self.compute(&x)?)
    }
}

/// The im2col convolution with `weight` and no bias.
fn bias_free_im2col(weight: &Tensor, stride: usize, padding: usize) -> candle_core::Result<Conv2d> {
    let zeros = Tensor::zeros(weight.dim(0)?, DType::F32, &Device::Cpu)?;
    Conv2d::im2col(weight.clone(), zeros, stride, padding)
}

/// `[out, in, kh, kw]` -> `[in, out, kh, kw]` flipped in both spatial dimensions.
fn flipped_transposed(weight: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, kh, kw) = weight.dims4()?;
    let device = weight.device();
    let rows = Tensor::from_vec((0..kh as u32).rev().collect::<Vec<_>>(), kh, device)?;
    let cols = Tensor::from_vec((0..kw as u32).rev().collect::<Vec<_>>(), kw, device)?;
    weight
        .transpose(0, 1)?
        .contiguous()?
        .index_select(&rows, 2)?
        .index_select(&cols, 3)?
        .contiguous()
}

/// Wraps a storage handed to a custom op's forward pass as a graph-free tensor.
pub(crate) fn tensor_from_storage(
    storage: Storage,
    layout: &Layout,
) -> candle_core::Result<Tensor> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("custom op expects contiguous inputs without offset")
    }
    Ok(Tensor::from_storage(
        storage,
        layout.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// The storage of a computed tensor, as a custom op's forward pass returns it.
pub(crate) fn into_storage(y: Tensor) -> candle_core::Result<(Storage, Shape)> {
    let y = y.contiguous()?;
    let shape = y.shape().clone();
    let (y_storage, y_layout) = y.storage_and_layout();
    if y_layout.start_offset() != 0 {
        candle_core::bail!("custom op produced an offset result")
    }
    let owned = match &*y_storage {
        Storage::Cpu(s) => Storage::Cpu(s.clone()),
        Storage::Cuda(s) => Storage::Cuda(candle_core::backend::BackendStorage::try_clone(
            s, y_layout,
        )?),
        Storage::Metal(_) => candle_core::bail!("custom op: metal is not supported"),
    };
    Ok((owned, shape))
}

/// `x` itself when contiguous without offset, else a contiguous copy (what the ops need).
pub(crate) fn dense(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.is_contiguous() && x.layout().start_offset() == 0 {
        Ok(x.clone())
    } else {
        x.force_contiguous()
    }
}

impl CustomOp1 for FrozenOp {
    fn name(&self) -> &'static str {
        "frozen-weight-op"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.run_on(Storage::Cpu(storage.clone()), layout)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("frozen op: device changed during the forward pass"),
        }
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let input = candle_core::backend::BackendStorage::try_clone(storage, layout)?;
        match self.run_on(Storage::Cuda(input), layout)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("frozen op: device changed during the forward pass"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if let Some(conv) = self.fast_conv(grad_res) {
            let (_, _, height, width) = arg.dims4()?;
            return Ok(Some(
                conv.input_gradient(&dense(grad_res)?, (height, width))?,
            ));
        }
        let grad = match self.kind {
            FrozenKind::Linear => {
                let out = grad_res.dim(candle_core::D::Minus1)?;
                let rows = grad_res.elem_count() / out;
                grad_res
                    .reshape((rows, out))?
                    .matmul(&self.weight)?
                    .reshape(arg.shape())?
            }
            FrozenKind::Conv2d { stride: 1, padding } if self.backward_kernel.is_some() => {
                let kernel = self.backward_kernel.as_ref().expect("checked above");
                let kernel_h = kernel.dim(2)?;
                grad_res.conv2d(kernel, kernel_h - 1 - padding, 1, 1, 1)?
            }
            FrozenKind::Conv2d { stride, padding } => {
                let (_, _, grad_h, _) = grad_res.dims4()?;
                let kernel_h = self.weight.dim(2)?;
                let covered = (grad_h - 1) * stride + kernel_h - 2 * padding;
                let output_padding = arg.dim(2)? - covered;
                grad_res.conv_transpose2d(&self.weight, padding, output_padding, stride, 1)?
            }
        };
        Ok(Some(grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::relative_difference;
    use candle_core::{Device, Var};

    #[test]
    fn convolution_output_and_input_gradient_match_candle() {
        // Every path: Winograd (3x3 stride 1 padding 1), im2col stride 1, pointwise, and the
        // col2im input gradient of strided layers, on odd sizes. The reference gradient is
        // candle's transposed convolution (its conv2d backward mishandles strided layers whose
        // input size leaves a remainder, so sizes here keep the same remainder in both axes).
        let device = Device::Cpu;
        for (k, stride, padding, h, w) in [
            (3, 1, 1, 9, 7),
            (3, 2, 1, 9, 9),
            (3, 2, 1, 8, 10),
            (3, 2, 0, 7, 9),
            (1, 1, 0, 5, 6),
            (3, 1, 0, 6, 6),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, 5, h, w), &device).unwrap();
            let weight = Tensor::randn(0f32, 0.3, (4, 5, k, k), &device).unwrap();
            let op = FrozenOp::new(weight.clone(), FrozenKind::Conv2d { stride, padding });
            assert!(op.cpu_conv.is_some(), "f32 CPU layers use the fast kernels");

            let input = Var::from_tensor(&x).unwrap();
            let ours = op.forward(input.as_tensor()).unwrap();
            let reference = x.conv2d(&weight, padding, stride, 1, 1).unwrap();
            let case = format!("k{k} s{stride} p{padding} {h}x{w}");
            assert_eq!(ours.dims(), reference.dims(), "{case}");
            assert!(relative_difference(&ours, &reference) < 1e-5, "{case}");

            // A loss that weights every output differently, so each position's gradient counts.
            let weights = Tensor::randn(0f32, 1.0, reference.shape(), &device).unwrap();
            let grads = (ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let ours_grad = grads.get(input.as_tensor()).unwrap();
            let out_h = reference.dim(2).unwrap();
            let output_padding = h - ((out_h - 1) * stride + k - 2 * padding);
            let reference_grad = weights
                .conv_transpose2d(&weight, padding, output_padding, stride, 1)
                .unwrap();
            assert_eq!(ours_grad.dims(), x.dims(), "{case}");
            let difference = relative_difference(ours_grad, &reference_grad);
            assert!(
                difference < 1e-5,
                "{case}: input gradient off by {difference}"
            );
        }
    }

    #[test]
    fn linear_input_gradient_matches_candle_autograd() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6), &device).unwrap();
        let weight = Tensor::randn(0f32, 0.3, (4, 6), &device).unwrap();
        let op = FrozenOp::new(weight.clone(), FrozenKind::Linear);
        let ours_input = Var::from_tensor(&x).unwrap();
        let reference_input = Var::from_tensor(&x).unwrap();
        let ours = op.forward(ours_input.as_tensor()).unwrap();
        let reference = reference_input
            .as_tensor()
            .broadcast_matmul(&weight.t().unwrap())
            .unwrap();
        assert!(relative_difference(&ours, &reference) < 1e-6);
        let grad_of = |y: Tensor, input: &Var| {
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            grads.get(input.as_tensor()).unwrap().clone()
        };
        let ours_grad = grad_of(ours, &ours_input);
        let reference_grad = grad_of(reference, &reference_input);
        assert!(relative_difference(&ours_grad, &reference_grad) < 1e-6);
    }
}
