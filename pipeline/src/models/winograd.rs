//! Winograd F(4x4, 3x3) convolution for 3x3, stride-1, padding-1 layers on the CPU (f32).
//!
//! Each 4x4 block of output pixels ("tile") is computed from the 6x6 input patch around it. Patch
//! and kernel are moved into a 36-point transform domain where the convolution becomes 36
//! independent matrix products `[O, C] x [C, tiles]`; the products are transformed back to 4x4
//! output blocks. That is 36 multiplications per tile and channel pair instead of 144 (4x fewer).
//! The transforms work on whole rows of tiles at once, so they vectorise. The price is a little
//! precision: about 1e-6 relative to the output scale in f32 (see the tests of `conv`).

use rayon::prelude::*;

/// Side of the output block computed per tile.
const BLOCK: usize = 4;
/// Side of the input patch, and of the transform domain, per tile.
const PATCH: usize = BLOCK + 2;
/// Points of the transform domain.
const POINTS: usize = PATCH * PATCH;
/// Floats of transformed input and products held per band of tile rows (64 MiB).
const BAND_BUDGET: usize = 16 << 20;

/// Kernel transform `G` (6x3) of F(4, 3).
const KERNEL_TRANSFORM: [[f64; 3]; PATCH] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// The tiles (4x4 output blocks) of one `height` x `width` image.
pub fn tile_count(height: usize, width: usize) -> usize {
    height.div_ceil(BLOCK) * width.div_ceil(BLOCK)
}

/// A 3x3 convolution (stride 1, zero padding 1) with its kernels in the transform domain.
#[derive(Clone, Debug)]
pub struct Winograd {
    /// Transformed kernels, row-major `[POINTS][O][C]`.
    kernels: Vec<f32>,
    out_channels: usize,
    in_channels: usize,
}

/// A raw pointer that may cross threads (each thread touches a disjoint part).
#[derive(Clone, Copy)]
struct SharedPtr<T>(*mut T);
// SAFETY: used only to hand disjoint output regions of one buffer to rayon workers.
unsafe impl<T> Send for SharedPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

impl Winograd {
    /// Transforms a row-major `[O, C, 3, 3]` weight. Each output channel's kernels are
    /// transformed together, tap by tap across the input channels (so the loops vectorise), and
    /// written straight into their rows of the 36 point blocks: the only memory this takes is
    /// the transformed kernels themselves.
    pub fn new(weight: &[f32], out_channels: usize, in_channels: usize) -> Self {
        assert_eq!(weight.len(), out_channels * in_channels * 9, "weight size");
        let pair_count = out_channels * in_channels;
        let mut kernels = Vec::<f32>::with_capacity(POINTS * pair_count);
        let dst = SharedPtr(kernels.as_mut_ptr());
        if in_channels > 0 {
            weight
                .par_chunks(in_channels * 9)
                .enumerate()
                .for_each_init(
                    KernelScratch::new,
                    |scratch, (out_channel, kernels_of_channel)| {
                        let chunks = kernels_of_channel.chunks(KERNEL_CHUNK * 9);
                        for (chunk, g) in chunks.enumerate() {
                            let len = scratch.transform(g);
                            let first = out_channel * in_channels + chunk * KERNEL_CHUNK;
                            for (point, values) in scratch.points.iter().enumerate() {
                                // SAFETY: these `len` values of row `out_channel` of point
                                // block `point` lie inside the capacity and are written by this
                                // task alone.
                                unsafe {
                                    let at = dst.get().add(point * pair_count + first);
                                    std::ptr::copy_nonoverlapping(values.as_ptr(), at, len);
                                }
                            }
                        }
                    },
                );
        }
        // SAFETY: the tasks above wrote every row of every point block.
        unsafe { kernels.set_len(POINTS * pair_count) };
        Winograd {
            kernels,
            out_channels,
            in_channels,
        }
    }

    /// Writes `conv(input) + bias` for a batch: `input` `[B, C, H, W]`, `output` `[B, O, H, W]`.
    /// The tiles of all images go through the same 36 products, so a small image (a UNet's
    /// deepest levels) still makes products wide enough for the kernels' speed.
    pub fn forward(
        &self,
        input: &[f32],
        output: &mut [f32],
        bias: &[f32],
        (batch, height, width): (usize, usize, usize),
    ) {
        let (channels, out_channels) = (self.in_channels, self.out_channels);
        let plane = height * width;
        assert_eq!(input.len(), batch * channels * plane, "input size");
        assert_eq!(output.len(), batch * out_channels * plane, "output size");
        assert_eq!(bias.len(), out_channels, "bias size");
        let size = (height, width);
        let tiles_x = width.div_ceil(BLOCK);
        let tiles_y = height.div_ceil(BLOCK);
        // Tile rows of every image in turn: row `g` is tile row `g % tiles_y` of image
        // `g / tiles_y`.
        let all_rows = batch * tiles_y;
        if all_rows == 0 || tiles_x == 0 {
            return;
        }
        let per_tile_row = POINTS * (channels + out_channels) * tiles_x;
        let band_rows = (BAND_BUDGET / per_tile_row).clamp(1, all_rows);
        let mut transformed = vec![0f32; channels * POINTS * band_rows * tiles_x];
        let mut products = vec![0f32; out_channels * POINTS * band_rows * tiles_x];
        let mut first_row = 0;
        while first_row < all_rows {
            let rows = band_rows.min(all_rows - first_row);
            let tiles = rows * tiles_x;
            let transformed = &mut transformed[..channels * POINTS * tiles];
            let products = &mut products[..out_channels * POINTS * tiles];
            transformed
                .par_chunks_mut(POINTS * tiles)
                .enumerate()
                .for_each_init(
                    || InputScratch::new(tiles_x),
                    |scratch, (channel, dst)| {
                        for row in 0..rows {
                            let (image, tile_row) =
                                ((first_row + row) / tiles_y, (first_row + row) % tiles_y);
                            let source = &input[(image * channels + channel) * plane..][..plane];
                            scratch.transform(source, size, tile_row, dst, row * tiles_x);
                        }
                    },
                );
            self.multiply(transformed, products, tiles);
            output.par_chunks_mut(plane).enumerate().for_each_init(
                || OutputScratch::new(tiles_x),
                |scratch, (index, target)| {
                    let (image, out_channel) = (index / out_channels, index % out_channels);
                    let source = &products[out_channel * POINTS * tiles..][..POINTS * tiles];
                    let image_rows = image * tiles_y..(image + 1) * tiles_y;
                    let band = first_row..first_row + rows;
                    for row in image_rows.start.max(band.start)..image_rows.end.min(band.end) {
                        let tile_row = (source, (row - first_row) * tiles_x, tiles);
                        let bias = bias[out_channel];
                        scratch.transform(tile_row, target, size, row - image_rows.start, bias);
                    }
                },
            );
            first_row += rows;
        }
    }

    /// The 36 products `[O, C] x [C, tiles]`, one per transform point, spread over the pool.
    fn multiply(&self, transformed: &[f32], products: &mut [f32], tiles: usize) {
        let (m, k) = (self.out_channels, self.in_channels);
        assert_eq!(transformed.len(), k * POINTS * tiles);
        assert_eq!(products.len(), m * POINTS * tiles);
        let dst = SharedPtr(products.as_mut_ptr());
        (0..POINTS).into_par_iter().for_each(|point| {
            // SAFETY: point `p` reads kernel block `p` ([m, k]) and the `[k, tiles]` matrix at
            // offset `p * tiles` with row stride `POINTS * tiles` inside `transformed`, and
            // writes the `[m, tiles]` matrix at the same offsets inside `products`; the sizes
            // are asserted above and the written matrices of distinct points are disjoint.
            unsafe {
                gemm::gemm(
                    m,
                    tiles,
                    k,
                    dst.get().add(point * tiles),
                    1,
                    (POINTS * tiles) as isize,
                    false,
                    self.kernels.as_ptr().add(point * m * k),
                    1,
                    k as isize,
                    transformed.as_ptr().add(point * tiles),
                    1,
                    (POINTS * tiles) as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    }
}

/// Input channels whose kernels [`KernelScratch`] transforms at a time (its planes, 45 KiB,
/// stay in the first cache levels; whole rows of 1280 channels made the transform 4x slower).
const KERNEL_CHUNK: usize = 64;

/// Work planes of the kernel transform: `G g G^T` of up to [`KERNEL_CHUNK`] 3x3 kernels `g`,
/// computed in f64, one plane per tap or point across the kernels.
struct KernelScratch {
    /// The 9 taps, `[tap][kernel]`.
    taps: [[f64; KERNEL_CHUNK]; 9],
    /// `G g`, `[6 x 3][kernel]`.
    half: [[f64; KERNEL_CHUNK]; PATCH * 3],
    /// `G g G^T` in f32, `[point][kernel]`.
    points: [[f32; KERNEL_CHUNK]; POINTS],
}

impl KernelScratch {
    fn new() -> Self {
        KernelScratch {
            taps: [[0.0; KERNEL_CHUNK]; 9],
            half: [[0.0; KERNEL_CHUNK]; PATCH * 3],
            points: [[0.0; KERNEL_CHUNK]; POINTS],
        }
    }

    /// Transforms the row-major `[n, 3, 3]` kernels `g` (`n` at most [`KERNEL_CHUNK`]) into the
    /// first `n` values of each point's row of [`Self::points`] and returns `n`, with the copy
    /// of the loops compiled for AVX-512 when the CPU has it (the same operations in the same
    /// order, so the same results bit for bit).
    fn transform(&mut self, g: &[f32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if super::kernels::avx512() {
            // SAFETY: the CPU supports the features this copy is compiled for.
            return unsafe { self.transform_avx512(g) };
        }
        self.transform_portable(g)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn transform_avx512(&mut self, g: &[f32]) -> usize {
        self.transform_portable(g)
    }

    #[inline(always)]
    fn transform_portable(&mut self, g: &[f32]) -> usize {
        let n = g.len() / 9;
        assert!(n <= KERNEL_CHUNK && g.len() == n * 9, "kernel chunk");
        for (tap, plane) in self.taps.iter_mut().enumerate() {
            for (value, kernel) in plane.iter_mut().zip(g.chunks_exact(9)) {
                *value = f64::from(kernel[tap]);
            }
        }
        for (a, coefficients) in KERNEL_TRANSFORM.iter().enumerate() {
            for j in 0..3 {
                let (g0, g1, g2) = (&self.taps[j], &self.taps[3 + j], &self.taps[6 + j]);
                let out = &mut self.half[a * 3 + j];
                for c in 0..n {
                    out[c] =
                        coefficients[0] * g0[c] + coefficients[1] * g1[c] + coefficients[2] * g2[c];
                }
            }
        }
        for a in 0..PATCH {
            let (h0, h1, h2) = (
                &self.half[a * 3],
                &self.half[a * 3 + 1],
                &self.half[a * 3 + 2],
            );
            for (b, coefficients) in KERNEL_TRANSFORM.iter().enumerate() {
                let out = &mut self.points[a * PATCH + b][..n];
                for c in 0..n {
                    out[c] = (h0[c] * coefficients[0]
                        + h1[c] * coefficients[1]
                        + h2[c] * coefficients[2]) as f32;
                }
            }
        }
        n
    }
}

/// Work rows of the input transform for one row of tiles.
struct InputScratch {
    /// The 6 zero-padded input rows of the tile row (width `4 * tiles_x + 2`).
    rows: Vec<f32>,
    /// The rows after the vertical transform.
    vertical: Vec<f32>,
    /// One vertical row split into its 4 column phases (`tiles_x + 1` each).
    phases: Vec<f32>,
    tiles_x: usize,
}

impl InputScratch {
    fn new(tiles_x: usize) -> Self {
        let padded = BLOCK * tiles_x + 2;
        InputScratch {
            rows: vec![0.0; PATCH * padded],
            vertical: vec![0.0; PATCH * padded],
            phases: vec![0.0; BLOCK * (tiles_x + 1)],
            tiles_x,
        }
    }

    /// Transforms tile row `tile_row` of one channel `plane`; point `p` of tile `t` goes to
    /// `dst[p * tiles + offset + t]`.
    fn transform(
        &mut self,
        plane: &[f32],
        (height, width): (usize, usize),
        tile_row: usize,
        dst: &mut [f32],
        offset: usize,
    ) {
        let tiles_x = self.tiles_x;
        let padded = BLOCK * tiles_x + 2;
        for (i, row) in self.rows.chunks_mut(padded).enumerate() {
            let y = (tile_row * BLOCK + i) as isize - 1;
            row.fill(0.0);
            if y >= 0 && (y as usize) < height {
                let y = y as usize;
                row[1..=width].copy_from_slice(&plane[y * width..(y + 1) * width]);
            }
        }
        let rows: [&[f32]; PATCH] = split(&self.rows, padded);
        input_1d(rows, split_mut(&mut self.vertical, padded));
        let tiles = dst.len() / POINTS;
        for k in 0..PATCH {
            let source = &self.vertical[k * padded..(k + 1) * padded];
            for (r, phase) in self.phases.chunks_mut(tiles_x + 1).enumerate() {
                for (t, value) in phase.iter_mut().enumerate() {
                    *value = source.get(t * BLOCK + r).copied().unwrap_or(0.0);
                }
            }
            let phase: [&[f32]; BLOCK] = split(&self.phases, tiles_x + 1);
            let patch = [
                &phase[0][..tiles_x],
                &phase[1][..tiles_x],
                &phase[2][..tiles_x],
                &phase[3][..tiles_x],
                &phase[0][1..],
                &phase[1][1..],
            ];
            let block = &mut dst[k * PATCH * tiles..(k + 1) * PATCH * tiles];
            let mut outputs = block.chunks_mut(tiles).map(|c| &mut c[offset..]);
            let outputs: [&mut [f32]; PATCH] = std::array::from_fn(|_| {
                let out = outputs.next().expect("six points per row");
                &mut out[..tiles_x]
            });
            input_1d(patch, outputs);
        }
    }
}

/// Work rows of the output transform for one row of tiles.
struct OutputScratch {
    /// Horizontal transform results: `[6 (vertical point)][4 (column phase)][tiles_x]`.
    horizontal: Vec<f32>,
    /// Final values: `[4 (output row)][4 (column phase)][tiles_x]`.
    block: Vec<f32>,
    tiles_x: usize,
}

impl OutputScratch {
    fn new(tiles_x: usize) -> Self {
        OutputScratch {
            horizontal: vec![0.0; PATCH * BLOCK * tiles_x],
            block: vec![0.0; BLOCK * BLOCK * tiles_x],
            tiles_x,
        }
    }

    /// Turns the products of one row of tiles (`src[p * tiles + offset + t]`) into the output
    /// rows of that tile row in `plane`, adding `bias`.
    fn transform(
        &mut self,
        (src, offset, tiles): (&[f32], usize, usize),
        plane: &mut [f32],
        (height, width): (usize, usize),
        tile_row: usize,
        bias: f32,
    ) {
        let tiles_x = self.tiles_x;
        for (k, horizontal) in self.horizontal.chunks_mut(BLOCK * tiles_x).enumerate() {
            let points: [&[f32]; PATCH] = std::array::from_fn(|l| {
                let start = (k * PATCH + l) * tiles + offset;
                &src[start..start + tiles_x]
            });
            output_1d(points, split_mut(horizontal, tiles_x));
        }
        for r in 0..BLOCK {
            let columns: [&[f32]; PATCH] = std::array::from_fn(|k| {
                let start = (k * BLOCK + r) * tiles_x;
                &self.horizontal[start..start + tiles_x]
            });
            let mut rows = self.block.chunks_mut(BLOCK * tiles_x);
            let outputs: [&mut [f32]; BLOCK] = std::array::from_fn(|_| {
                &mut rows.next().expect("four output rows")[r * tiles_x..(r + 1) * tiles_x]
            });
            output_1d(columns, outputs);
        }
        for s in 0..BLOCK {
            let y = tile_row * BLOCK + s;
            if y >= height {
                break;
            }
            let values = &self.block[s * BLOCK * tiles_x..(s + 1) * BLOCK * tiles_x];
            let row = &mut plane[y * width..(y + 1) * width];
            for (t, chunk) in row.chunks_mut(BLOCK).enumerate() {
                for (r, value) in chunk.iter_mut().enumerate() {
                    *value = values[r * tiles_x + t] + bias;
                }
            }
        }
    }
}

/// Splits `data` into consecutive rows of `len`.
fn split<const N: usize>(data: &[f32], len: usize) -> [&[f32]; N] {
    std::array::from_fn(|i| &data[i * len..(i + 1) * len])
}

/// Splits `data` into consecutive mutable rows of `len`.
fn split_mut<const N: usize>(data: &mut [f32], len: usize) -> [&mut [f32]; N] {
    let mut rows = data.chunks_mut(len);
    std::array::from_fn(|_| rows.next().expect("enough rows"))
}

/// Input transform `B^T d` applied element-wise along six equally long rows.
fn input_1d(d: [&[f32]; PATCH], out: [&mut [f32]; PATCH]) {
    let n = out[0].len();
    let [d0, d1, d2, d3, d4, d5] = d.map(|row| &row[..n]);
    let [o0, o1, o2, o3, o4, o5] = out.map(|row| &mut row[..n]);
    for i in 0..n {
        let (a, b, c, e, f, g) = (d0[i], d1[i], d2[i], d3[i], d4[i], d5[i]);
        o0[i] = 4.0 * a - 5.0 * c + f;
        o1[i] = -4.0 * (b + c) + e + f;
        o2[i] = 4.0 * (b - c) - e + f;
        o3[i] = 2.0 * (e - b) - c + f;
        o4[i] = 2.0 * (b - e) - c + f;
        o5[i] = 4.0 * b - 5.0 * e + g;
    }
}

/// Output transform `A^T m` applied element-wise along six rows into four.
fn output_1d(m: [&[f32]; PATCH], out: [&mut [f32]; BLOCK]) {
    let n = out[0].len();
    let [m0, m1, m2, m3, m4, m5] = m.map(|row| &row[..n]);
    let [o0, o1, o2, o3] = out.map(|row| &mut row[..n]);
    for i in 0..n {
        let (sum12, diff12) = (m1[i] + m2[i], m1[i] - m2[i]);
        let (sum34, diff34) = (m3[i] + m4[i], m3[i] - m4[i]);
        o0[i] = m0[i] + sum12 + sum34;
        o1[i] = diff12 + 2.0 * diff34;
        o2[i] = sum12 + 4.0 * sum34;
        o3[i] = diff12 + 8.0 * diff34 + m5[i];
    }
}
