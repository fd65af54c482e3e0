//! 2-D convolution on the CPU: im2col in row bands + one matrix product per band, and the
//! gradients for the input (col2im) and the weight (the bands rebuilt) for training.
//!
//! candle's stock CPU convolution spends most of its time re-packing tiles; turning each band of
//! output rows into a `[C·k·k, rows·W]` column matrix and multiplying it by the `[O, C·k·k]`
//! weight matrix runs at the speed of candle's matmul instead. Output is NCHW like the input, and
//! the bias is added while the band is copied out. 3x3 stride-1 padding-1 layers (nearly all the
//! work of a VAE) use the Winograd transform of [`super::winograd`] instead, with 4x fewer
//! multiplications. Non-f32 inputs use candle's own convolution.

use candle_core::{DType, Module, Shape, Tensor};
use rayon::prelude::*;

use super::bf16_products::{product, with_narrow_weight, Side};
use super::kernel_choice::cpu_kernels;
use super::kernels::{
    filled_in_chunks, for_each_f32_band, gemm_into, with_f32_slice, zeroed, Operand, Threads,
};
use super::winograd::{tile_count, Winograd};

/// Fewest Winograd tiles (4x4 output blocks, all images of a pass together) for which a layer
/// of [`Conv2d::transforming_per_pass`] transforms its kernels rather than running im2col.
/// Measured on 1280-channel layers, batch 2: at 16x16 (32 tiles) the Winograd pass with its
/// transform took 65 ms against im2col's 81, at 8x8 (8 tiles) 56 ms against 22.
pub const MIN_TILES_PER_PASS: usize = 32;

/// Floats of column matrix built per band (bounds the extra memory to ~64 MiB).
const BAND_BUDGET: usize = 16 << 20;

/// A convolution layer with square kernel, symmetric zero padding and bias.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// The original `[O, C, k, k]` weight (for the non-f32 path).
    weight: Tensor,
    /// How the f32 path multiplies.
    method: Method,
    bias: Tensor,
    bias_values: Vec<f32>,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// A convolution from an `[O, C, k, k]` weight and `[O]` bias; 3x3/stride 1/padding 1
    /// layers keep a Winograd-transformed copy of the weight (4x its f32 size) to run faster.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        let method = match winograd_applies(&weight, stride, padding)? {
            true => Method::Winograd(transformed(&weight)?),
            false => Method::Im2col,
        };
        Self::with_method(weight, bias, stride, padding, method)
    }

    /// [`Self::new`] without the resident transformed copy: a 3x3/stride 1/padding 1 layer
    /// transforms its weight into the Winograd domain at the start of each forward pass and
    /// drops the transform at its end, so it keeps no more than the weight in memory. The
    /// transform costs about as much as the products of [`MIN_TILES_PER_PASS`] tiles, so a pass
    /// over fewer tiles (all images together) runs im2col instead; the others give the results
    /// of [`Self::new`] bit for bit. For layers used in large passes (a VAE's) or whose kept
    /// transform would cost too much memory (a UNet's 1280-channel layers).
    pub fn transforming_per_pass(
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        let method = match winograd_applies(&weight, stride, padding)? {
            true => Method::WinogradPerPass,
            false => Method::Im2col,
        };
        Self::with_method(weight, bias, stride, padding, method)
    }

    /// A convolution without bias that multiplies with the weight tensor itself (im2col for
    /// every shape): no copy of the weights, and both gradients work for every layer.
    pub fn im2col(weight: Tensor, stride: usize, padding: usize) -> candle_core::Result<Self> {
        let bias = Tensor::zeros(weight.dim(0)?, DType::F32, weight.device())?;
        Self::with_method(weight, bias, stride, padding, Method::Im2col)
    }

    fn with_method(
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        padding: usize,
        method: Method,
    ) -> candle_core::Result<Self> {
        let (_, _, kh, kw) = weight.dims4()?;
        if kh != kw {
            candle_core::bail!("only square kernels are supported, got {kh}x{kw}");
        }
        let bias_values = bias.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Conv2d {
            weight: weight.contiguous()?,
            method,
            bias,
            bias_values,
            kernel: kh,
            stride,
            padding,
        })
    }

    /// Number of output channels.
    pub fn out_channels(&self) -> usize {
        self.bias_values.len()
    }

    /// The output size for an input of `height` x `width`.
    fn output_size(&self, height: usize, width: usize) -> candle_core::Result<(usize, usize)> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if height + 2 * p < k || width + 2 * p < k {
            candle_core::bail!("input {height}x{width} is smaller than the {k}x{k} kernel");
        }
        Ok(((height + 2 * p - k) / s + 1, (width + 2 * p - k) / s + 1))
    }

    fn forward_f32(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let sizes = x.dims4()?;
        let (output, shape) = with_f32_slice(x, |input| self.forward_elements(input, sizes))??;
        Tensor::from_vec(output, shape, x.device())
    }

    /// The f32 forward pass on the elements of a contiguous NCHW input of `sizes`: the NCHW
    /// output and its shape. im2col layers read their weight as an `[O, C·k·k]` matrix in f32
    /// bands.
    pub(crate) fn forward_elements(
        &self,
        input: &[f32],
        sizes: (usize, usize, usize, usize),
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (batch, channels, height, width) = sizes;
        let (out_h, out_w) = self.output_size(height, width)?;
        let expected = self.weight.dim(1)?;
        if channels != expected {
            candle_core::bail!("convolution expects {expected} input channels, got {channels}");
        }
        let out_channels = self.out_channels();
        let rows = channels * self.kernel * self.kernel;
        let plane_out = out_h * out_w;
        let shape = Shape::from((batch, out_channels, out_h, out_w));
        let len = batch * out_channels * plane_out;
        let transformed_here;
        let winograd = match &self.method {
            Method::Winograd(winograd) => Some(winograd),
            Method::WinogradPerPass if batch * tile_count(height, width) >= MIN_TILES_PER_PASS => {
                transformed_here = transformed(&self.weight)?;
                Some(&transformed_here)
            }
            Method::WinogradPerPass | Method::Im2col => None,
        };
        if let Some(winograd) = winograd {
            let mut output = zeroed(len);
            let bias = &self.bias_values;
            winograd.forward(input, &mut output, bias, (batch, height, width));
            return Ok((output, shape));
        }
        let matrix = &self.weight;
        // Each output plane starts from its channel's bias; the products add onto it.
        let bias = |plane: usize| self.bias_values[plane % out_channels];
        let mut output = filled_in_chunks(len, plane_out, bias);
        self.for_each_column_band(input, sizes, (out_h, out_w), |b, first, columns, col| {
            let dst = &mut output[b * out_channels * plane_out + first..];
            let bf16 = with_narrow_weight(matrix, |w| {
                let (lhs, rhs) = (Side::row_major(w, rows), Side::F32(col));
                product(
                    dst,
                    plane_out,
                    lhs,
                    rhs,
                    (out_channels, columns, rows),
                    true,
                )
            });
            if bf16.is_some() {
                return Ok(());
            }
            for_each_f32_band(matrix, |o, band| {
                let shape = (band.len() / rows, columns, rows);
                matmul_accumulate(&mut dst[o * plane_out..], plane_out, band, col, shape);
            })
        })?;
        Ok((output, shape))
    }

    /// Calls `f(image, first, columns, col)` for every band of output rows of every image of a
    /// contiguous NCHW `input` of `sizes`, where `col` is the band's `[C·k·k, columns]` im2col
    /// matrix for output pixels `first..first + columns` of the image. The matrix of one band is
    /// built at a time (about 64 MiB at most); a pointwise layer passes the input planes
    /// themselves.
    fn for_each_column_band(
        &self,
        input: &[f32],
        (_, channels, height, width): (usize, usize, usize, usize),
        (out_h, out_w): (usize, usize),
        mut f: impl FnMut(usize, usize, usize, Operand) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let rows = channels * k * k;
        let plane_in = height * width;
        let pointwise = k == 1 && s == 1 && p == 0;
        let band_rows = (BAND_BUDGET / (rows * out_w).max(1)).clamp(1, out_h);
        let mut col = if pointwise {
            Vec::new()
        } else {
            zeroed(rows * band_rows * out_w)
        };
        for (b, image) in input.chunks(channels * plane_in).enumerate() {
            let mut y0 = 0;
            while y0 < out_h {
                let y1 = (y0 + band_rows).min(out_h);
                let columns = (y1 - y0) * out_w;
                if pointwise {
                    // The input planes already form the [C, H·W] matrix (row stride = plane).
                    let planes = Operand::row_major(&image[y0 * out_w..], plane_in);
                    f(b, y0 * out_w, columns, planes)?;
                } else {
                    let col = &mut col[..rows * columns];
                    col.par_chunks_mut(columns)
                        .enumerate()
                        .for_each(|(row, dst)| {
                            let c = row / (k * k);
                            let (ky, kx) = ((row / k) % k, row % k);
                            let plane = &image[c * plane_in..(c + 1) * plane_in];
                            let window = ((ky, kx), (s, p), (y0, y1));
                            fill_row(dst, plane, (height, width), window, out_w);
                        });
                    f(b, y0 * out_w, columns, Operand::row_major(col, columns))?;
                }
                y0 = y1;
            }
        }
        Ok(())
    }
}

impl Conv2d {
    /// The gradient of a loss with respect to this layer's input (`[N, C, height, width]`),
    /// given its gradient with respect to the output: the transposed convolution, computed as
    /// one matrix product `Wᵀ · dY` per image followed by a scatter-add of the columns back onto
    /// the input grid (col2im). Any stride and padding; f32 CPU tensors only.
    pub fn input_gradient(
        &self,
        grad_output: &Tensor,
        (height, width): (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let Method::Im2col = &self.method else {
            candle_core::bail!("input_gradient needs an im2col layer (Conv2d::im2col)")
        };
        let (batch, out_channels, out_h, out_w) = grad_output.dims4()?;
        if out_channels != self.out_channels() {
            candle_core::bail!(
                "gradient has {out_channels} channels, the layer {}",
                self.out_channels()
            );
        }
        let channels = self.weight.dim(1)?;
        let k = self.kernel;
        let rows = channels * k * k;
        let plane_out = out_h * out_w;
        let grad_input = with_f32_slice(grad_output, |grad| {
            let mut grad_input = zeroed(batch * channels * height * width);
            let mut columns = zeroed(rows * plane_out);
            for (image_grad, input_grad) in grad
                .chunks(out_channels * plane_out)
                .zip(grad_input.chunks_mut(channels * height * width))
            {
                // columns [C·k·k, OH·OW] = Wᵀ [C·k·k, O] · dY [O, OH·OW], summed over bands
                // of output channels; Wᵀ is read in place.
                let bf16 = with_narrow_weight(&self.weight, |w| {
                    let gradient = Side::F32(Operand::row_major(image_grad, plane_out));
                    let shape = (rows, plane_out, out_channels);
                    product(
                        &mut columns,
                        plane_out,
                        Side::transposed(w, rows),
                        gradient,
                        shape,
                        false,
                    )
                });
                if bf16.is_none() {
                    for_each_f32_band(&self.weight, |first, band| {
                        let transposed = Operand::transposed(band, rows);
                        let gradient =
                            Operand::row_major(&image_grad[first * plane_out..], plane_out);
                        let shape = (rows, plane_out, band.len() / rows);
                        gemm_into(
                            &mut columns,
                            plane_out,
                            transposed,
                            gradient,
                            shape,
                            first > 0,
                            Threads::Pool,
                        );
                    })?;
                }
                input_grad
                    .par_chunks_mut(height * width)
                    .zip(columns.par_chunks(k * k * plane_out))
                    .for_each(|(plane, taps)| {
                        scatter_columns(
                            plane,
                            taps,
                            (height, width),
                            (out_h, out_w),
                            (k, self.stride, self.padding),
                        )
                    });
            }
            Ok::<_, candle_core::Error>(grad_input)
        })??;
        Tensor::from_vec(
            grad_input,
            (batch, channels, height, width),
            grad_output.device(),
        )
    }

    /// The gradient of a loss with respect to this layer's weight (`[O, C, k, k]`, f32), given
    /// the layer's `input` and the loss's gradient with respect to its output: `Σ dY · colᵀ`
    /// over the images and bands of output rows, with each band's im2col matrix rebuilt from
    /// the input (the whole batch's is never held). Any stride and padding; f32 CPU tensors
    /// only.
    pub fn weight_gradient(
        &self,
        input: &Tensor,
        grad_output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let sizes = input.dims4()?;
        let (batch, channels, height, width) = sizes;
        let (out_h, out_w) = self.output_size(height, width)?;
        let out_channels = self.out_channels();
        if grad_output.dims4()? != (batch, out_channels, out_h, out_w)
            || channels != self.weight.dim(1)?
        {
            candle_core::bail!(
                "weight gradient: input {:?} and output gradient {:?} do not fit the weight {:?}",
                input.dims(),
                grad_output.dims(),
                self.weight.dims()
            );
        }
        let rows = channels * self.kernel * self.kernel;
        let plane_out = out_h * out_w;
        let mut gradient = zeroed(out_channels * rows);
        with_f32_slice(input, |input| {
            with_f32_slice(grad_output, |grad| {
                self.for_each_column_band(input, sizes, (out_h, out_w), |b, first, columns, col| {
                    // gradient [O, C·k·k] += dY [O, columns] · colᵀ [columns, C·k·k]
                    let start = b * out_channels * plane_out + first;
                    let grad = Operand::row_major(&grad[start..], plane_out);
                    let shape = (out_channels, rows, columns);
                    gemm_into(
                        &mut gradient,
                        rows,
                        grad,
                        col.t(),
                        shape,
                        true,
                        Threads::Pool,
                    );
                    Ok(())
                })
            })
        })???;
        Tensor::from_vec(gradient, self.weight.shape(), input.device())
    }
}

/// Adds every kernel tap's column row (`taps`: `[k·k, OH·OW]` for one input channel) onto the
/// input positions it was read from (the inverse of [`fill_row`]).
fn scatter_columns(
    plane: &mut [f32],
    taps: &[f32],
    (height, width): (usize, usize),
    (out_h, out_w): (usize, usize),
    (k, stride, padding): (usize, usize, usize),
) {
    for (tap, values) in taps.chunks(out_h * out_w).enumerate() {
        let (ky, kx) = (tap / k, tap % k);
        for (y, row) in values.chunks(out_w).enumerate() {
            let iy = (y * stride + ky) as isize - padding as isize;
            if iy < 0 || iy >= height as isize {
                continue;
            }
            let target = &mut plane[iy as usize * width..(iy as usize + 1) * width];
            for (x, value) in row.iter().enumerate() {
                let ix = (x * stride + kx) as isize - padding as isize;
                if ix >= 0 && ix < width as isize {
                    target[ix as usize] += value;
                }
            }
        }
    }
}

/// Whether a layer with this `[O, C, k, k]` weight, stride and padding runs in the Winograd
/// domain: a 3x3, stride-1, padding-1 convolution on the CPU.
fn winograd_applies(weight: &Tensor, stride: usize, padding: usize) -> candle_core::Result<bool> {
    let (_, _, kh, _) = weight.dims4()?;
    Ok((kh, stride, padding) == (3, 1, 1) && cpu_kernels(weight.device()))
}

/// The Winograd-domain kernels of an `[O, C, 3, 3]` weight of any float dtype.
fn transformed(weight: &Tensor) -> candle_core::Result<Winograd> {
    let (out_channels, in_channels, _, _) = weight.dims4()?;
    let weight = weight.to_dtype(DType::F32)?;
    with_f32_slice(&weight, |weight| {
        Winograd::new(weight, out_channels, in_channels)
    })
}

/// How a layer's f32 forward pass multiplies.
#[derive(Clone, Debug)]
enum Method {
    /// Winograd F(4x4, 3x3) (3x3 kernel, stride 1, padding 1), the transformed kernels kept.
    Winograd(Winograd),
    /// Winograd as above, the kernels transformed at the start of each forward pass.
    WinogradPerPass,
    /// Banded im2col with the weight tensor as a row-major `[O, C·k·k]` matrix.
    Im2col,
}

/// `dst += lhs · rhs` for row-major `lhs` `[m, k]` (contiguous), `rhs` `[k, n]` and `dst`
/// `[m, n]` with row stride `dst_stride`, on the rayon pool.
fn matmul_accumulate(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: &[f32],
    rhs: Operand,
    (m, n, k): (usize, usize, usize),
) {
    let lhs = Operand::row_major(lhs, k);
    gemm_into(dst, dst_stride, lhs, rhs, (m, n, k), true, Threads::Pool);
}

/// Fills one im2col row (kernel tap `(ky, kx)` of one channel) for output rows `y0..y1`.
fn fill_row(
    dst: &mut [f32],
    plane: &[f32],
    (height, width): (usize, usize),
    ((ky, kx), (stride, padding), (y0, y1)): ((usize, usize), (usize, usize), (usize, usize)),
    out_w: usize,
) {
    for (y, segment) in (y0..y1).zip(dst.chunks_mut(out_w)) {
        let iy = (y * stride + ky) as isize - padding as isize;
        if iy < 0 || iy >= height as isize {
            segment.fill(0.0);
            continue;
        }
        let row = &plane[iy as usize * width..(iy as usize + 1) * width];
        if stride == 1 {
            // Output x reads input x + kx - padding: copy the valid span, zero the edges.
            let shift = kx as isize - padding as isize;
            let first = (-shift).max(0) as usize;
            let last = ((width as isize - shift).min(out_w as isize)).max(first as isize) as usize;
            segment[..first].fill(0.0);
            segment[last..].fill(0.0);
            let from = (first as isize + shift) as usize;
            segment[first..last].copy_from_slice(&row[from..from + (last - first)]);
        } else {
            for (x, value) in segment.iter_mut().enumerate() {
                let ix = (x * stride + kx) as isize - padding as isize;
                *value = if ix < 0 || ix >= width as isize {
                    0.0
                } else {
                    row[ix as usize]
                };
            }
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() == DType::F32 && cpu_kernels(x.device()) {
            return self.forward_f32(x);
        }
        let out = x.conv2d(
            &self.weight.to_dtype(x.dtype())?,
            self.padding,
            self.stride,
            1,
            1,
        )?;
        let bias = self.bias.to_dtype(x.dtype())?.reshape((1, (), 1, 1))?;
        out.broadcast_add(&bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::relative_difference;
    use candle_core::Device;

    /// Max abs difference between our layer and candle's `conv2d` + bias, relative to the
    /// largest output magnitude.
    fn relative_error(
        (batch, channels, out_channels): (usize, usize, usize),
        (k, stride, padding): (usize, usize, usize),
        (h, w): (usize, usize),
    ) -> f32 {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (batch, channels, h, w), &device).unwrap();
        let scale = 1.0 / ((channels * k * k) as f32).sqrt();
        let shape = (out_channels, channels, k, k);
        let weight = Tensor::randn(0f32, scale, shape, &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, out_channels, &device).unwrap();
        let ours = Conv2d::new(weight.clone(), bias.clone(), stride, padding)
            .unwrap()
            .forward(&x)
            .unwrap();
        let reference = x
            .conv2d(&weight, padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, out_channels, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), reference.dims());
        relative_difference(&ours, &reference)
    }

    #[test]
    fn matches_candle_convolution() {
        // Odd sizes, sizes that are not multiples of the 4x4 Winograd block, stride 2, every
        // padding; 3x3/stride 1/padding 1 takes the Winograd path, the rest im2col.
        for (k, stride, padding, h, w) in [
            (3, 1, 1, 9, 7),
            (3, 1, 1, 1, 1),
            (3, 1, 1, 4, 8),
            (3, 1, 1, 13, 6),
            (3, 2, 0, 9, 8),
            (3, 2, 1, 7, 11),
            (1, 1, 0, 5, 6),
            (3, 1, 0, 6, 6),
        ] {
            let error = relative_error((2, 5, 4), (k, stride, padding), (h, w));
            assert!(error < 1e-5, "k{k} s{stride} p{padding} {h}x{w}: {error}");
        }
    }

    #[test]
    fn winograd_is_accurate_at_vae_widths() {
        // A 512-channel layer as in the middle of the SD VAE, on a non-square odd-sized input
        // that spans several bands of tile rows. The transform costs some precision as the
        // channel count grows (measured over 40 runs: at most 2.1e-5 of the peak output at 512
        // channels, 1.01e-5 at 128; limits leave about 5x).
        let error = relative_error((1, 512, 512), (3, 1, 1), (37, 30));
        assert!(error < 1e-4, "{error}");
        let error = relative_error((1, 128, 128), (3, 1, 1), (130, 129));
        assert!(error < 5e-5, "{error}");
    }

    #[test]
    fn kernels_transformed_per_pass_give_the_kept_kernels_outputs_or_im2col_bit_for_bit() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.1, (5, 7, 3, 3), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 5, &device).unwrap();
        let bits = |layer: Conv2d, x: &Tensor| -> Vec<u32> {
            let y = layer.forward(x).unwrap().flatten_all().unwrap();
            y.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        // 2 images of 6x6 tiles: enough tiles for the per-pass transform.
        let many = Tensor::randn(0f32, 1.0, (2, 7, 23, 21), &device).unwrap();
        // 1 image of 2x2 tiles: im2col.
        let few = Tensor::randn(0f32, 1.0, (1, 7, 8, 8), &device).unwrap();
        assert!(2 * tile_count(23, 21) >= MIN_TILES_PER_PASS);
        assert!(tile_count(8, 8) < MIN_TILES_PER_PASS);
        let per_pass =
            || Conv2d::transforming_per_pass(weight.clone(), bias.clone(), 1, 1).unwrap();
        let kept = Conv2d::new(weight.clone(), bias.clone(), 1, 1).unwrap();
        assert_eq!(bits(per_pass(), &many), bits(kept, &many));
        let im2col =
            Conv2d::with_method(weight.clone(), bias.clone(), 1, 1, Method::Im2col).unwrap();
        assert_eq!(bits(per_pass(), &few), bits(im2col, &few));
        // Other shapes are im2col layers either way.
        let plain = Conv2d::transforming_per_pass(weight.clone(), bias.clone(), 2, 1).unwrap();
        assert!(matches!(plain.method, Method::Im2col));
    }
}
