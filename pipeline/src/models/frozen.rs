//! Frozen (non-trainable) linear and convolution layers whose backward pass returns a gradient
//! for the activation only.
//!
//! candle's built-in `matmul`/`conv2d` always compute the gradient of both operands, so a frozen
//! base weight would get a full-size gradient tensor at every step (and keep it alive until the end
//! of the backward pass). Wrapping the operation in a [`CustomOp1`] whose only argument is the
//! activation hides the weight from the autograd graph: the backward pass computes `dL/dx` and
//! nothing else.
//!
//! The weight may be stored in a narrower dtype than the activations (float16, bfloat16 or float8
//! under `--mixed_precision` / `--fp8_base`, see [`super::precision`]): each forward and backward
//! pass widens it to the activation dtype for the duration of that one product, or, for bfloat16
//! and float8 weights on CPUs with AVX512-BF16, multiplies it with the activations rounded to
//! bfloat16 ([`super::bf16_products`]).

use std::sync::Arc;

use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Layout, Module, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::bf16_products::{product_new, with_narrow_weight, Side};
use super::conv::Conv2d;
use super::kernel_choice::cpu_kernels;
use super::kernels::{
    f32_elements, for_each_f32_band, gemm_into, transpose_matrix, with_f32_slice, zeroed, Operand,
    Threads,
};

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
    /// Added inside the op, so the graph keeps no unbiased copy of the output.
    bias: Option<Tensor>,
    kind: FrozenKind,
    /// For stride-1 convolutions: the kernel with in/out swapped and spatially flipped, so the
    /// input gradient is a plain (fast, im2col) convolution instead of a transposed one.
    backward_kernel: Option<Tensor>,
    /// For CPU convolutions: the im2col convolution of [`super::conv`] with the frozen weight
    /// itself, for the forward pass and the input gradient (much faster than candle's stock
    /// convolution and transposed convolution, and no transformed or flipped copy of the weight:
    /// at SD1.5 size such copies would add gigabytes).
    cpu_conv: Option<Arc<Conv2d>>,
    /// For 3x3 stride-1 CPU convolutions set up for inference
    /// ([`Self::with_winograd_forward`]): the Winograd convolution of [`super::winograd`], used
    /// for the forward pass (4x fewer multiplications; a transformed kernel 4x the weight's f32
    /// size, kept or made per pass); the input gradient still runs through `cpu_conv`.
    winograd_conv: Option<Arc<Conv2d>>,
    /// For CPU linear layers set up for inference ([`Self::with_inference_layout`]): the weight
    /// stored transposed, `[in, out]` and contiguous; `weight` is then a view of this storage.
    /// The matrix-product kernels read a row-major right-hand side without repacking it, which
    /// makes products with few rows (a text encoder's 77 tokens, one decoding step) about 1.5x
    /// faster; the memory is the same.
    weight_in_out: Option<Tensor>,
}

impl FrozenOp {
    /// Wraps `weight` and `bias` (detached from any graph) for operation `kind`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, kind: FrozenKind) -> Self {
        let weight = weight.detach();
        let bias = bias.map(|b| b.detach());
        let cpu_conv = match kind {
            FrozenKind::Conv2d { stride, padding } if cpu_kernels(weight.device()) => {
                Conv2d::im2col(weight.clone(), stride, padding)
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
            bias,
            kind,
            backward_kernel,
            cpu_conv,
            winograd_conv: None,
            weight_in_out: None,
        }
    }

    /// This operation with its weight stored transposed when it is a CPU linear layer
    /// (unchanged otherwise): faster products with few rows, for inference. Both passes keep
    /// working; [`Self::weight`] stays `[out, in]` (a strided view).
    pub fn with_inference_layout(mut self) -> candle_core::Result<Self> {
        if self.kind == FrozenKind::Linear
            && self.weight.rank() == 2
            && cpu_kernels(self.weight.device())
            && self.weight_in_out.is_none()
        {
            // A weight loaded as a view of transposed storage is used as it lies.
            let viewed = self.weight.t()?;
            let in_out = if viewed.is_contiguous() && viewed.layout().start_offset() == 0 {
                viewed
            } else {
                transpose_matrix(&self.weight)?
            };
            self.weight = in_out.t()?;
            self.weight_in_out = Some(in_out);
        }
        Ok(self)
    }

    /// This operation with its forward pass in the Winograd domain when it is a 3x3, stride-1,
    /// padding-1 convolution on the CPU (unchanged otherwise), for inference. With
    /// `kept_kernels` the transformed kernels stay in memory (4x the weight's f32 size);
    /// without, each forward pass transforms them and drops them
    /// ([`Conv2d::transforming_per_pass`]).
    pub fn with_winograd_forward(mut self, kept_kernels: bool) -> candle_core::Result<Self> {
        let winograd = self.kind
            == FrozenKind::Conv2d {
                stride: 1,
                padding: 1,
            }
            && cpu_kernels(self.weight.device())
            && self.weight.rank() == 4
            && self.weight.dims()[2..] == [3, 3];
        if winograd {
            let bias = Tensor::zeros(self.weight.dim(0)?, DType::F32, self.weight.device())?;
            let weight = self.weight.clone();
            let conv = match kept_kernels {
                true => Conv2d::new(weight, bias, 1, 1)?,
                false => Conv2d::transforming_per_pass(weight, bias, 1, 1)?,
            };
            self.winograd_conv = Some(Arc::new(conv));
        }
        Ok(self)
    }

    /// The frozen weight (`[out, in, ...]`; a strided view after
    /// [`Self::with_inference_layout`]).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The frozen bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The operation kind.
    pub fn kind(&self) -> FrozenKind {
        self.kind
    }

    /// The weight in `dtype` (the stored tensor itself when it already is).
    fn weight_in(&self, dtype: DType) -> candle_core::Result<Tensor> {
        self.weight.to_dtype(dtype)
    }

    /// Applies the frozen operation to `x` (any layout; the result is contiguous).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = dense(x)?;
        if x.track_op() {
            x.apply_op1(self.clone())
        } else {
            // No gradient to pass back (inference, or layers before any trained one): computed
            // directly, without the copies of input and output a custom op costs.
            self.compute(&x)
        }
    }

    /// Plain candle computation of the operation on a graph-free input.
    fn compute(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.compute_unbiased(x)?;
        match (&self.bias, self.kind) {
            (None, _) => Ok(y),
            (Some(bias), FrozenKind::Linear) => y.broadcast_add(bias),
            (Some(bias), FrozenKind::Conv2d { .. }) => {
                y.broadcast_add(&bias.reshape((bias.dim(0)?, 1, 1))?)
            }
        }
    }

    /// The product or convolution without the bias.
    fn compute_unbiased(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
                let x = x.reshape((rows, inner))?;
                let y = if let Some(in_out) = self.in_out_weight_for(&x) {
                    linear_in_out(&x, in_out)?
                } else if self.widens_in_bands(&x) {
                    linear_in_bands(&x, &self.weight)?
                } else {
                    x.matmul(&self.weight_in(x.dtype())?.t()?)?
                };
                y.reshape(out_dims)
            }
            FrozenKind::Conv2d { stride, padding } => match self.forward_conv(x) {
                Some(conv) => conv.forward(x),
                None => x.conv2d(&self.weight_in(x.dtype())?, padding, stride, 1, 1),
            },
        }
    }

    /// The transposed weight of [`Self::with_inference_layout`], when products with `x` (an
    /// activation or gradient) use it.
    fn in_out_weight_for(&self, x: &Tensor) -> Option<&Tensor> {
        let applies = x.dtype() == DType::F32 && cpu_kernels(x.device());
        self.weight_in_out.as_ref().filter(|_| applies)
    }

    /// Whether a linear product with `x` reads a narrow CPU weight in f32 bands
    /// ([`for_each_f32_band`]) rather than widening it whole.
    fn widens_in_bands(&self, x: &Tensor) -> bool {
        let narrow = self.weight.dtype() != DType::F32 && cpu_kernels(self.weight.device());
        narrow && x.dtype() == DType::F32 && cpu_kernels(x.device())
    }

    /// The f32 CPU convolution, when it applies to `x`.
    fn fast_conv(&self, x: &Tensor) -> Option<&Conv2d> {
        let applies = x.dtype() == DType::F32 && cpu_kernels(x.device());
        self.cpu_conv.as_deref().filter(|_| applies)
    }

    /// The f32 CPU convolution of the forward pass, when one applies to `x`.
    fn forward_conv(&self, x: &Tensor) -> Option<&Conv2d> {
        let winograd = self.winograd_conv.as_deref();
        let applies = x.dtype() == DType::F32 && cpu_kernels(x.device());
        winograd.filter(|_| applies).or_else(|| self.fast_conv(x))
    }

    /// The forward pass straight on candle's f32 CPU storage, the result written into a new
    /// storage: without the copies of input and output that [`Self::run_on`] makes. For the f32
    /// CPU convolutions and linear layers with narrow weights (the paths [`Self::compute`] takes
    /// for them, bias added in place); `None` for other operations.
    fn forward_on_elements(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
        let Some(x) = f32_elements(storage, layout) else {
            return Ok(None);
        };
        let dims = layout.dims();
        let (mut y, shape, plane) = match self.kind {
            FrozenKind::Linear => {
                let narrow = self.weight.dtype() != DType::F32;
                let cpu = cpu_kernels(self.weight.device());
                let (Some(&inner), true, None, true) =
                    (dims.last(), narrow, &self.weight_in_out, cpu)
                else {
                    return Ok(None);
                };
                let (rows, out) = (x.len() / inner.max(1), self.weight.dim(0)?);
                let y = linear(x, rows, &self.weight)?;
                let mut out_dims = dims.to_vec();
                *out_dims
                    .last_mut()
                    .expect("linear input has a last dimension") = out;
                (y, Shape::from(out_dims), 1)
            }
            FrozenKind::Conv2d { .. } => {
                let conv = self.winograd_conv.as_deref().or(self.cpu_conv.as_deref());
                let Some(conv) = conv.filter(|_| cpu_kernels(self.weight.device())) else {
                    return Ok(None);
                };
                let sizes = layout.shape().dims4()?;
                let (y, shape) = conv.forward_elements(x, sizes)?;
                let (_, _, height, width) = shape.dims4()?;
                (y, shape, height * width)
            }
        };
        if let Some(bias) = &self.bias {
            let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            // Linear rows hold one value per output; convolution planes one channel each.
            let per_row = bias.len() * plane;
            y.par_chunks_mut(per_row).for_each(|row| {
                for (values, b) in row.chunks_mut(plane).zip(&bias) {
                    values.iter_mut().for_each(|v| *v += b);
                }
            });
        }
        Ok(Some((CpuStorage::F32(y), shape)))
    }

    /// Runs [`Self::compute`] on a storage handed over by candle and returns the result storage.
    fn run_on(&self, storage: Storage, layout: &Layout) -> candle_core::Result<(Storage, Shape)> {
        let x = tensor_from_storage(storage, layout)?;
        into_storage(self.compute(&x)?)
    }
}

/// `x W^T` for an f32 CPU `x` `[rows, in]` and a narrow weight `[out, in]` read in f32 bands of
/// output rows.
fn linear_in_bands(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let ((rows, _), out) = (x.dims2()?, weight.dim(0)?);
    let y = with_f32_slice(x, |x| linear(x, rows, weight))??;
    Tensor::from_vec(y, (rows, out), x.device())
}

/// `x W^T` on slices: `x` `[rows, in]`, a CPU weight `[out, in]` (or a pointwise convolution
/// kernel `[out, in, 1, 1]`) of any stored dtype (read in f32 bands of output rows); the result
/// is `[rows, out]`.
pub(crate) fn linear(x: &[f32], rows: usize, weight: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (out, inner) = matrix_dims(weight)?;
    let bf16 = with_narrow_weight(weight, |w| {
        let lhs = Side::F32(Operand::row_major(x, inner));
        product_new(lhs, Side::transposed(w, inner), (rows, out, inner))
    });
    if let Some(y) = bf16 {
        return Ok(y);
    }
    let mut y = zeroed(rows * out);
    for_each_f32_band(weight, |first, band| {
        let lhs = Operand::row_major(x, inner);
        let rhs = Operand::transposed(band, inner);
        let shape = (rows, band.len() / inner, inner);
        gemm_into(&mut y[first..], out, lhs, rhs, shape, false, Threads::Pool);
    })?;
    Ok(y)
}

/// `dY W` for an f32 CPU `dY` `[rows, out]` and a narrow weight `[out, in]`, summed over f32
/// bands of the weight's rows.
fn linear_input_gradient_in_bands(grad: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let ((rows, _), inner) = (grad.dims2()?, weight.dim(1)?);
    let dx = with_f32_slice(grad, |grad| linear_input_gradient(grad, rows, weight))??;
    Tensor::from_vec(dx, (rows, inner), grad.device())
}

/// `dY W` on slices: `dY` `[rows, out]`, a CPU weight as in [`linear`] (read in f32 bands,
/// their products summed); the result is `[rows, in]`.
pub(crate) fn linear_input_gradient(
    grad: &[f32],
    rows: usize,
    weight: &Tensor,
) -> candle_core::Result<Vec<f32>> {
    let (out, inner) = matrix_dims(weight)?;
    let bf16 = with_narrow_weight(weight, |w| {
        let lhs = Side::F32(Operand::row_major(grad, out));
        product_new(lhs, Side::row_major(w, inner), (rows, inner, out))
    });
    if let Some(dx) = bf16 {
        return Ok(dx);
    }
    let mut dx = zeroed(rows * inner);
    for_each_f32_band(weight, |first, band| {
        let lhs = Operand::row_major(&grad[first..], out);
        let rhs = Operand::row_major(band, inner);
        let shape = (rows, inner, band.len() / inner);
        gemm_into(&mut dx, inner, lhs, rhs, shape, first > 0, Threads::Pool);
    })?;
    Ok(dx)
}

/// `x W^T` for an f32 CPU `x` `[rows, in]` and a CPU weight stored transposed, `[in, out]` (of
/// any stored dtype, read in f32 bands of input rows whose products are summed).
fn linear_in_out(x: &Tensor, in_out: &Tensor) -> candle_core::Result<Tensor> {
    let ((rows, inner), out) = (x.dims2()?, in_out.dim(1)?);
    let y = with_f32_slice(x, |x| {
        let bf16 = with_narrow_weight(in_out, |w| {
            let lhs = Side::F32(Operand::row_major(x, inner));
            product_new(lhs, Side::row_major(w, out), (rows, out, inner))
        });
        if let Some(y) = bf16 {
            return Ok(y);
        }
        let mut y = zeroed(rows * out);
        for_each_f32_band(in_out, |first, band| {
            let lhs = Operand::row_major(&x[first..], inner);
            let rhs = Operand::row_major(band, out);
            let shape = (rows, out, band.len() / out);
            gemm_into(&mut y, out, lhs, rhs, shape, first > 0, Threads::Pool);
        })?;
        Ok::<_, candle_core::Error>(y)
    })??;
    Tensor::from_vec(y, (rows, out), x.device())
}

/// `dY W` for an f32 CPU `dY` `[rows, out]` and a weight stored transposed as in
/// [`linear_in_out`] (each band of input rows gives its own columns of the result).
fn linear_input_gradient_in_out(grad: &Tensor, in_out: &Tensor) -> candle_core::Result<Tensor> {
    let ((rows, out), inner) = (grad.dims2()?, in_out.dim(0)?);
    let dx = with_f32_slice(grad, |grad| {
        let bf16 = with_narrow_weight(in_out, |w| {
            let lhs = Side::F32(Operand::row_major(grad, out));
            product_new(lhs, Side::transposed(w, out), (rows, inner, out))
        });
        if let Some(dx) = bf16 {
            return Ok(dx);
        }
        let mut dx = zeroed(rows * inner);
        for_each_f32_band(in_out, |first, band| {
            let lhs = Operand::row_major(grad, out);
            let rhs = Operand::transposed(band, out);
            let shape = (rows, band.len() / out, out);
            gemm_into(
                &mut dx[first..],
                inner,
                lhs,
                rhs,
                shape,
                false,
                Threads::Pool,
            );
        })?;
        Ok::<_, candle_core::Error>(dx)
    })??;
    Tensor::from_vec(dx, (rows, inner), grad.device())
}

/// A weight's first dimension and the product of the others: its shape as a matrix.
fn matrix_dims(weight: &Tensor) -> candle_core::Result<(usize, usize)> {
    let out = weight.dim(0)?;
    Ok((out, weight.elem_count() / out.max(1)))
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
        if let Some(done) = self.forward_on_elements(storage, layout)? {
            return Ok(done);
        }
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
                let grad = grad_res.reshape((rows, out))?;
                let grad = if let Some(in_out) = self.in_out_weight_for(&grad) {
                    linear_input_gradient_in_out(&grad, in_out)?
                } else if self.widens_in_bands(&grad) {
                    linear_input_gradient_in_bands(&grad, &self.weight)?
                } else {
                    grad.matmul(&self.weight_in(grad.dtype())?)?
                };
                grad.reshape(arg.shape())?
            }
            FrozenKind::Conv2d { stride: 1, padding } if self.backward_kernel.is_some() => {
                let kernel = self.backward_kernel.as_ref().expect("checked above");
                let kernel_h = kernel.dim(2)?;
                let kernel = kernel.to_dtype(grad_res.dtype())?;
                grad_res.conv2d(&kernel, kernel_h - 1 - padding, 1, 1, 1)?
            }
            FrozenKind::Conv2d { stride, padding } => {
                let (_, _, grad_h, _) = grad_res.dims4()?;
                let kernel_h = self.weight.dim(2)?;
                let covered = (grad_h - 1) * stride + kernel_h - 2 * padding;
                let output_padding = arg.dim(2)? - covered;
                let weight = self.weight_in(grad_res.dtype())?;
                grad_res.conv_transpose2d(&weight, padding, output_padding, stride, 1)?
            }
        };
        Ok(Some(grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::{relative_difference, weighted_sum_gradients};
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
            let op = FrozenOp::new(weight.clone(), None, FrozenKind::Conv2d { stride, padding });
            assert!(op.cpu_conv.is_some(), "f32 CPU layers use the fast kernels");

            let input = Var::from_tensor(&x).unwrap();
            let ours = op.forward(input.as_tensor()).unwrap();
            let reference = x.conv2d(&weight, padding, stride, 1, 1).unwrap();
            let case = format!("k{k} s{stride} p{padding} {h}x{w}");
            assert_eq!(ours.dims(), reference.dims(), "{case}");
            assert!(relative_difference(&ours, &reference) < 1e-5, "{case}");

            // A loss that weights every output differently, so each position's gradient counts.
            let weights = Tensor::randn(0f32, 1.0, reference.shape(), &device).unwrap();
            let [ours_grad] = weighted_sum_gradients(&ours, &weights, [&input]);
            let out_h = reference.dim(2).unwrap();
            let output_padding = h - ((out_h - 1) * stride + k - 2 * padding);
            let reference_grad = weights
                .conv_transpose2d(&weight, padding, output_padding, stride, 1)
                .unwrap();
            assert_eq!(ours_grad.dims(), x.dims(), "{case}");
            let difference = relative_difference(&ours_grad, &reference_grad);
            assert!(
                difference < 1e-5,
                "{case}: input gradient off by {difference}"
            );

            // The inference set-up: Winograd forward for 3x3 stride-1 layers only, same values,
            // and the input gradient still exact.
            for kept_kernels in [true, false] {
                let winograd = op.clone().with_winograd_forward(kept_kernels).unwrap();
                let transformed = (k, stride, padding) == (3, 1, 1);
                assert_eq!(winograd.winograd_conv.is_some(), transformed, "{case}");
                let input = Var::from_tensor(&x).unwrap();
                let fast = winograd.forward(input.as_tensor()).unwrap();
                assert!(relative_difference(&fast, &reference) < 1e-5, "{case}");
                let [fast_grad] = weighted_sum_gradients(&fast, &weights, [&input]);
                assert!(
                    relative_difference(&fast_grad, &reference_grad) < 1e-5,
                    "{case}"
                );
            }
        }
    }

    #[test]
    fn linear_input_gradient_matches_candle_autograd() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6), &device).unwrap();
        let weight = Tensor::randn(0f32, 0.3, (4, 6), &device).unwrap();
        let op = FrozenOp::new(weight.clone(), None, FrozenKind::Linear);
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

    #[test]
    fn inference_layout_gives_the_same_products_and_gradients() {
        // Stored transposed, a linear layer's output and input gradient equal the plain layout's
        // up to summation order, for f32 and narrow weights (several widened bands at 1100 rows).
        let device = Device::Cpu;
        for (weight_shape, input_shape) in [
            (vec![6, 5], vec![2, 3, 5]),
            (vec![300, 1100], vec![77, 1100]),
        ] {
            let weight = Tensor::randn(0f32, 0.3, weight_shape, &device).unwrap();
            let x = Tensor::randn(0f32, 1.0, input_shape, &device).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let weight = weight.to_dtype(dtype).unwrap();
                let bias = Tensor::randn(0f32, 1.0, weight.dim(0).unwrap(), &device).unwrap();
                let plain = FrozenOp::new(weight.clone(), Some(bias.clone()), FrozenKind::Linear);
                let inference = plain.clone().with_inference_layout().unwrap();
                assert!(inference.weight_in_out.is_some(), "{dtype:?}");
                assert_eq!(inference.weight().dims(), weight.dims());
                let run = |op: &FrozenOp| {
                    let input = Var::from_tensor(&x).unwrap();
                    let y = op.forward(input.as_tensor()).unwrap();
                    let loss_weights = Tensor::ones(y.shape(), DType::F32, &device).unwrap();
                    let [grad] = weighted_sum_gradients(&y, &loss_weights, [&input]);
                    (y, grad)
                };
                let ((y, grad), (y_plain, grad_plain)) = (run(&inference), run(&plain));
                assert!(relative_difference(&y, &y_plain) < 1e-6, "{dtype:?} output");
                assert!(
                    relative_difference(&grad, &grad_plain) < 1e-6,
                    "{dtype:?} gradient"
                );
            }
        }
    }

    #[test]
    fn narrow_weights_are_widened_inside_the_op() {
        // A weight stored as f16, bf16 or f8 (with an f32 bias) gives what the same rounded
        // values give as f32 up to summation order (banded products against candle's one matrix product), and lands
        // within the dtype's rounding of the f32 weight. The last two layers are wide enough to
        // be widened in several bands. With AVX512-BF16, bf16 and f8 weights multiply
        // bfloat16-rounded activations and output gradients (as PyTorch's autocast does): the
        // reference is fed the same rounded values.
        let device = Device::Cpu;
        let cases = [
            (
                FrozenKind::Conv2d {
                    stride: 1,
                    padding: 1,
                },
                vec![6, 5, 3, 3],
                vec![2, 5, 9, 7],
            ),
            (
                FrozenKind::Conv2d {
                    stride: 2,
                    padding: 1,
                },
                vec![6, 5, 3, 3],
                vec![2, 5, 9, 9],
            ),
            (
                FrozenKind::Conv2d {
                    stride: 1,
                    padding: 0,
                },
                vec![6, 5, 1, 1],
                vec![2, 5, 4, 6],
            ),
            (FrozenKind::Linear, vec![6, 5], vec![2, 3, 5]),
            (FrozenKind::Linear, vec![1100, 4096], vec![3, 4096]),
            (
                FrozenKind::Conv2d {
                    stride: 1,
                    padding: 1,
                },
                vec![1000, 512, 3, 3],
                vec![1, 512, 5, 5],
            ),
        ];
        for (kind, weight_shape, input_shape) in cases {
            let weight = Tensor::randn(0f32, 0.3, weight_shape, &device).unwrap();
            let bias = Some(Tensor::randn(0f32, 1.0, weight.dim(0).unwrap(), &device).unwrap());
            let x = Tensor::randn(0f32, 1.0, input_shape, &device).unwrap();
            let exact = FrozenOp::new(weight.clone(), bias.clone(), kind)
                .forward(&x)
                .unwrap();
            for (dtype, rounding) in [
                (DType::F16, 2e-3),
                (DType::BF16, 1e-2),
                (DType::F8E4M3, 1e-1),
            ] {
                let narrow = weight.to_dtype(dtype).unwrap();
                let widened = narrow.to_dtype(DType::F32).unwrap();
                let narrow_op = FrozenOp::new(narrow, bias.clone(), kind);
                assert_eq!(narrow_op.weight().dtype(), dtype, "stored as given");
                let case = format!("{kind:?} {dtype:?}");
                let in_bf16 = dtype != DType::F16 && crate::models::bf16_products::available();
                let as_multiplied = |t: &Tensor| match in_bf16 {
                    true => t
                        .to_dtype(DType::BF16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap(),
                    false => t.clone(),
                };
                let input = Var::from_tensor(&x).unwrap();
                let y = narrow_op.forward(input.as_tensor()).unwrap();
                let reference_input = Var::from_tensor(&as_multiplied(&x)).unwrap();
                let reference = FrozenOp::new(widened, bias.clone(), kind)
                    .forward(reference_input.as_tensor())
                    .unwrap();
                assert_eq!(y.dtype(), DType::F32, "{case}");
                let y_off = relative_difference(&y, &reference);
                assert!(y_off < 1e-5, "{case}: output {y_off}");
                let loss_weights = Tensor::randn(0f32, 1.0, y.shape(), &device).unwrap();
                let [grad] = weighted_sum_gradients(&y, &loss_weights, [&input]);
                let [reference_grad] = weighted_sum_gradients(
                    &reference,
                    &as_multiplied(&loss_weights),
                    [&reference_input],
                );
                let grad_off = relative_difference(&grad, &reference_grad);
                assert!(grad_off < 1e-5, "{case}: gradient {grad_off}");
                let off = relative_difference(&y, &exact);
                assert!(
                    off > 0.0 && off < rounding,
                    "{case}: {off} from the f32 weight"
                );
            }
        }
    }
}
