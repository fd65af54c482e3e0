//! f32 CPU building blocks shared by the hand-written layers: slice access to tensors, weights
//! stored in a narrower dtype read as f32 bands, matrix products on slices with arbitrary strides
//! (the `gemm` crate candle itself uses) and a vectorised `exp` for softmax.

use candle_core::{CpuStorage, Layout, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Floats per widened weight band (16 MiB): few enough bands that each product is wide enough
/// for the kernels' speed, small enough that no weight is widened whole.
const BAND_FLOATS: usize = 1 << 22;
/// Floats widened per parallel task.
const WIDEN_CHUNK: usize = 1 << 16;

thread_local! {
    /// The reused buffer of [`widened_bands`] (one per calling thread, as large as its largest band).
    static BAND_BUFFER: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}
/// Fewest rows per widened band (narrower products run below the kernels' speed).
const MIN_BAND_ROWS: usize = 32;

/// Floats zeroed per parallel task by [`zeroed`].
const ZERO_CHUNK: usize = 1 << 16;

/// `vec![0f32; len]`, zeroed by the rayon pool when it is large: layer outputs are megabytes
/// and, with freed memory kept for reuse, the allocator zeroes them on the calling thread alone.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if len <= ZERO_CHUNK {
        return vec![0f32; len];
    }
    filled_in_chunks(len, ZERO_CHUNK, |_| 0.0)
}

/// `len` floats in chunks of `chunk` (the last may be shorter), chunk `i` holding `value(i)`
/// throughout, written by the rayon pool.
pub(crate) fn filled_in_chunks(
    len: usize,
    chunk: usize,
    value: impl Fn(usize) -> f32 + Sync,
) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(len);
    buffer.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, chunk)| {
            let value = value(i);
            chunk.iter_mut().for_each(|x| {
                x.write(value);
            })
        });
    // SAFETY: the first `len` elements were written above.
    unsafe { buffer.set_len(len) };
    buffer
}

/// The elements of a contiguous f32 CPU storage, if it is one.
pub(crate) fn f32_elements<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    let (start, end) = layout.contiguous_offsets()?;
    storage.as_slice::<f32>().ok().map(|data| &data[start..end])
}

/// Runs `f` on the elements of an f32 CPU tensor, without a copy when it is contiguous.
pub(crate) fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_f32_slices([x], |[x]| f(x))
}

/// Runs `f` on the elements of several f32 CPU tensors, without copies of contiguous ones (a
/// custom op's backward pass reads its saved inputs and the output gradient this way).
pub(crate) fn with_f32_slices<const N: usize, R>(
    xs: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<R> {
    let xs = xs.map(|x| x.contiguous());
    let mut tensors = Vec::with_capacity(N);
    for x in xs {
        tensors.push(x?);
    }
    let guards: Vec<_> = tensors.iter().map(|x| x.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("expected a CPU tensor");
        };
        match f32_elements(cpu, layout) {
            Some(data) => slices.push(data),
            None => candle_core::bail!("expected a contiguous f32 tensor"),
        }
    }
    let slices: [&[f32]; N] = slices.try_into().expect("one slice per tensor");
    Ok(f(slices))
}

/// Side of the square tiles [`transpose_matrix`] copies (a tile of f32 fits in L1).
const TRANSPOSE_TILE: usize = 32;

/// The transpose of a 2-D CPU tensor as a new contiguous tensor of the same dtype, copied in
/// cache-sized tiles on the rayon pool (candle's strided copy walks one element at a time, which
/// takes seconds for a full-size model's weights).
pub(crate) fn transpose_matrix(matrix: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, cols) = matrix.dims2()?;
    let matrix = matrix.contiguous()?;
    let (storage, layout) = matrix.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU matrix");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous matrix");
    };
    let device = matrix.device();
    match cpu {
        CpuStorage::F32(data) => transposed_tensor(&data[start..end], rows, cols, device),
        CpuStorage::F16(data) => transposed_tensor(&data[start..end], rows, cols, device),
        CpuStorage::BF16(data) => transposed_tensor(&data[start..end], rows, cols, device),
        CpuStorage::F8E4M3(data) => transposed_tensor(&data[start..end], rows, cols, device),
        _ => matrix.t()?.contiguous(),
    }
}

/// The `[cols, rows]` tensor holding the transpose of the row-major `[rows, cols]` `data`.
fn transposed_tensor<T: candle_core::WithDType>(
    data: &[T],
    rows: usize,
    cols: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(transpose_tiles(data, rows, cols), (cols, rows), device)
}

/// The row-major `[cols, rows]` transpose of the row-major `[rows, cols]` `data`.
fn transpose_tiles<T: Copy + Send + Sync>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    let Some(&fill) = data.first() else {
        return Vec::new();
    };
    let mut out = vec![fill; rows * cols];
    out.par_chunks_mut(TRANSPOSE_TILE * rows)
        .enumerate()
        .for_each(|(block, out_rows)| {
            let first_col = block * TRANSPOSE_TILE;
            let width = out_rows.len() / rows;
            for row_start in (0..rows).step_by(TRANSPOSE_TILE) {
                for row in row_start..(row_start + TRANSPOSE_TILE).min(rows) {
                    let source = &data[row * cols + first_col..][..width];
                    for (c, &value) in source.iter().enumerate() {
                        out_rows[c * rows + row] = value;
                    }
                }
            }
        });
    out
}

/// Calls `f(first_row, band)` over the rows of a contiguous CPU weight seen as a row-major
/// `[rows, cols]` matrix (`rows` = its first dimension), with `band` the f32 values of rows
/// `first_row..first_row + band.len() / cols`. An f32 weight comes as one band without a copy;
/// float16, bfloat16 and float8 weights are widened a few rows at a time into one reused buffer
/// that stays in cache, so a narrow weight is never copied whole to f32.
pub(crate) fn for_each_f32_band(
    weight: &Tensor,
    mut f: impl FnMut(usize, &[f32]),
) -> candle_core::Result<()> {
    let rows = weight.dim(0)?;
    let cols = weight.elem_count() / rows.max(1);
    let (storage, layout) = weight.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU weight");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous weight");
    };
    let band_rows = (BAND_FLOATS / cols.max(1))
        .max(MIN_BAND_ROWS)
        .min(rows.max(1));
    match cpu {
        CpuStorage::F32(data) => f(0, &data[start..end]),
        CpuStorage::BF16(data) => widened_bands(&data[start..end], cols, band_rows, f, |s, d| {
            s.convert_to_f32_slice(d)
        }),
        CpuStorage::F16(data) => widened_bands(&data[start..end], cols, band_rows, f, |s, d| {
            s.convert_to_f32_slice(d)
        }),
        CpuStorage::F8E4M3(data) => widened_bands(&data[start..end], cols, band_rows, f, |s, d| {
            d.iter_mut().zip(s).for_each(|(d, s)| *d = s.to_f32())
        }),
        _ => candle_core::bail!("weights of dtype {:?} are not supported", weight.dtype()),
    }
    Ok(())
}

/// The bands of [`for_each_f32_band`] for a narrow `data`, widened by `widen`.
fn widened_bands<T: Sync>(
    data: &[T],
    cols: usize,
    band_rows: usize,
    mut f: impl FnMut(usize, &[f32]),
    widen: impl Fn(&[T], &mut [f32]) + Sync,
) {
    // Taken out of the thread-local for the loop: a product that runs other pool tasks on this
    // thread meanwhile finds an empty buffer and makes its own.
    let mut buffer = BAND_BUFFER.take();
    let floats = (band_rows * cols).min(data.len());
    if buffer.len() < floats {
        buffer.resize(floats, 0.0);
    }
    for (band, narrow) in data.chunks(band_rows * cols).enumerate() {
        let wide = &mut buffer[..narrow.len()];
        wide.par_chunks_mut(WIDEN_CHUNK)
            .zip(narrow.par_chunks(WIDEN_CHUNK))
            .for_each(|(wide, narrow)| widen(narrow, wide));
        f(band * band_rows, wide);
    }
    BAND_BUFFER.set(buffer);
}

/// A read-only matrix operand: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix whose rows start `row_stride` elements apart.
    pub(crate) fn row_major(data: &'a [f32], row_stride: usize) -> Self {
        Operand {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of the row-major matrix in `data` whose rows are `row_stride` apart.
    pub(crate) fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        Operand {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    /// The elements, the distance between rows and the distance between columns.
    pub(crate) fn parts(self) -> (&'a [f32], usize, usize) {
        (self.data, self.row_stride, self.col_stride)
    }

    /// This matrix transposed (no copy).
    pub(crate) fn t(self) -> Self {
        Operand {
            data: self.data,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Whether every element of a `rows` x `cols` matrix lies inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || self.data.len() > (rows - 1) * self.row_stride + (cols - 1) * self.col_stride
    }
}

/// How a matrix product uses the rayon pool.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Split the product over every rayon thread.
    Pool,
    /// Stay on the calling thread (the caller already runs products in parallel).
    Current,
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, for `lhs` `[m, k]`, `rhs`
/// `[k, n]` and a row-major `dst` `[m, n]` whose rows are `dst_stride` apart. The result does
/// not depend on the number of threads (data-parallel ranks that split the cores between them
/// train exactly what one process trains).
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: Operand,
    rhs: Operand,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
) {
    assert!(lhs.covers(m, k), "left matrix too small");
    assert!(rhs.covers(k, n), "right matrix too small");
    assert!(
        Operand::row_major(dst, dst_stride).covers(m, n),
        "output too small"
    );
    if m <= SMALL_PRODUCT_ROWS && rhs.col_stride == 1 {
        small_rows_product(dst, dst_stride, lhs, rhs, (m, n, k), accumulate, threads);
        return;
    }
    let pool = rayon::current_num_threads();
    let parallel = threads == Threads::Pool && pool > 1;
    if m > COLUMN_SPLIT_ROWS || n < 2 * COLUMN_BAND {
        let threads = parallel.then_some(pool);
        // SAFETY: the assertions above keep every accessed element inside the three slices, and
        // `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`.
        unsafe {
            gemm_raw(
                dst.as_mut_ptr(),
                dst_stride,
                lhs,
                rhs,
                (m, n, k),
                accumulate,
                threads,
            )
        };
        return;
    }
    // Few rows: bands of columns, each a single-threaded product of its own, so that a thread
    // packs only its own bands of `rhs` (the `gemm` crate's own split has each thread pack all of
    // it, which costs more than the arithmetic here). The bands are the same whatever the
    // number of threads.
    let band = COLUMN_BAND;
    let dst_address = dst.as_mut_ptr() as usize;
    let product = |part: usize| {
        let first = part * band;
        let rhs_band = Operand {
            data: &rhs.data[first * rhs.col_stride..],
            ..rhs
        };
        let shape = (m, band.min(n - first), k);
        // SAFETY: as above; the bands write disjoint columns of `dst`, whose address is passed
        // as an integer only to cross into the pool's threads.
        let dst = unsafe { (dst_address as *mut f32).add(first) };
        unsafe { gemm_raw(dst, dst_stride, lhs, rhs_band, shape, accumulate, None) };
    };
    if parallel {
        (0..n.div_ceil(band)).into_par_iter().for_each(product);
    } else {
        (0..n.div_ceil(band)).for_each(product);
    }
}

/// Most rows of a product that [`gemm_into`] splits into bands of columns itself.
const COLUMN_SPLIT_ROWS: usize = 128;
/// Columns of a band of a product that [`gemm_into`] splits into bands of columns.
const COLUMN_BAND: usize = 192;

/// The `gemm` crate's product `dst = lhs · rhs` (`dst +=` when `accumulate`) for a row-major
/// `dst` whose rows are `dst_stride` apart, on `threads` rayon threads or the calling one.
///
/// # Safety
/// `dst` must be valid for writes of the `m` x `n` matrix, `lhs` and `rhs` must cover their
/// `m` x `k` and `k` x `n` matrices, and no other thread may access those `dst` elements.
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_stride: usize,
    lhs: Operand,
    rhs: Operand,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Option<usize>,
) {
    let parallelism = match threads {
        Some(pool) => gemm::Parallelism::Rayon(pool),
        None => gemm::Parallelism::None,
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_stride as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// Most rows of a product that [`small_rows_product`] computes (one decoding step of a few
/// beams): there the `gemm` crate's packing costs far more than the arithmetic.
const SMALL_PRODUCT_ROWS: usize = 4;
/// Rows of the right-hand side per task of [`small_rows_product`].
const SMALL_PRODUCT_BAND_ROWS: usize = 128;
/// Fewest elements of the right-hand side for which [`small_rows_product`] splits the work
/// (below this, starting the tasks costs more than the arithmetic).
const SMALL_PRODUCT_SPLIT_ELEMENTS: usize = 1 << 16;

/// [`gemm_into`] for at most [`SMALL_PRODUCT_ROWS`] rows and a row-major `rhs`. The product is
/// bound by reading `rhs` once from memory, so `rhs` is read as it lies: each task (split over
/// the rayon pool with [`Threads::Pool`]) takes a contiguous band of `rhs`'s rows and sums them,
/// four at a time and weighted by the matching entries of `lhs`, into its own partial result;
/// the partial results are then added up, in order. Within a task every element is one chain of
/// multiply-adds in the order of `rhs`'s rows, so an undivided product sums exactly as one
/// multiply-add per row would. The bands are the same whatever the number of threads.
fn small_rows_product(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: Operand,
    rhs: Operand,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
) {
    let weight = |row: usize, inner: usize| lhs.data[row * lhs.row_stride + inner * lhs.col_stride];
    let rhs_row = |inner: usize| &rhs.data[inner * rhs.row_stride..][..n];
    let band = match k * n >= SMALL_PRODUCT_SPLIT_ELEMENTS {
        true => SMALL_PRODUCT_BAND_ROWS,
        false => k.max(1),
    };
    let partial = |first: usize| -> Vec<f32> {
        let last = (first + band).min(k);
        let mut rows = vec![0f32; m * n];
        let mut inner = first;
        while inner + 4 <= last {
            let values = [0, 1, 2, 3].map(|j| rhs_row(inner + j));
            for (row, out) in rows.chunks_exact_mut(n).enumerate() {
                let weights = [0, 1, 2, 3].map(|j| weight(row, inner + j));
                multiply_add_four(out, weights, values);
            }
            inner += 4;
        }
        for inner in inner..last {
            for (row, out) in rows.chunks_exact_mut(n).enumerate() {
                // The last (at most three) rows of a band.
                let w = weight(row, inner);
                (out.iter_mut().zip(rhs_row(inner))).for_each(|(o, v)| *o = w.mul_add(*v, *o));
            }
        }
        rows
    };
    let firsts = (0..k.max(1)).step_by(band);
    let partials: Vec<Vec<f32>> = if threads == Threads::Pool && band < k {
        firsts
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(partial)
            .collect()
    } else {
        firsts.map(partial).collect()
    };
    for row in 0..m {
        let out = &mut dst[row * dst_stride..][..n];
        if !accumulate {
            out.fill(0.0);
        }
        for rows in &partials {
            out.iter_mut()
                .zip(&rows[row * n..][..n])
                .for_each(|(o, v)| *o += v);
        }
    }
}

/// `out += Σ weights[j] · values[j]` over four rows of values (`out` is read and written once
/// for four rows), compiled for AVX2 + FMA when the CPU has them.
#[inline(always)]
fn multiply_add_four(out: &mut [f32], weights: [f32; 4], values: [&[f32]; 4]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports the features this copy of the loop is compiled for.
        unsafe { multiply_add_four_avx2(out, weights, values) };
        return;
    }
    multiply_add_four_lanes(out, weights, values);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn multiply_add_four_avx2(out: &mut [f32], weights: [f32; 4], values: [&[f32]; 4]) {
    multiply_add_four_lanes(out, weights, values);
}

/// The portable loop of [`multiply_add_four`].
#[inline(always)]
fn multiply_add_four_lanes(out: &mut [f32], weights: [f32; 4], values: [&[f32]; 4]) {
    let [w0, w1, w2, w3] = weights;
    let n = out.len();
    let [v0, v1, v2, v3] = values.map(|v| &v[..n]);
    for i in 0..n {
        // In order of the rows, as one multiply-add per row would sum them.
        let sum = w1.mul_add(v1[i], w0.mul_add(v0[i], out[i]));
        out[i] = w3.mul_add(v3[i], w2.mul_add(v2[i], sum));
    }
}

/// Turns every row of `scores` (rows of length `row_len`) into `softmax(row * scale)`, in place;
/// compiled for AVX-512 or AVX2 + FMA when the CPU has them (the same sums either way).
pub(crate) fn softmax_rows(scores: &mut [f32], row_len: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports the features this copy of the loop is compiled for.
        unsafe { softmax_rows_avx512(scores, row_len, scale) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: as above.
        unsafe { softmax_rows_avx2(scores, row_len, scale) };
        return;
    }
    softmax_rows_portable(scores, row_len, scale);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_rows_avx512(scores: &mut [f32], row_len: usize, scale: f32) {
    softmax_rows_portable(scores, row_len, scale);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(scores: &mut [f32], row_len: usize, scale: f32) {
    softmax_rows_portable(scores, row_len, scale);
}

/// The portable loops of [`softmax_rows`].
#[inline(always)]
fn softmax_rows_portable(scores: &mut [f32], row_len: usize, scale: f32) {
    for row in scores.chunks_mut(row_len) {
        let max = lane_fold(row, f32::NEG_INFINITY, f32::max);
        for value in row.iter_mut() {
            *value = (*value - max) * scale;
        }
        exp_in_place(row);
        let inverse = 1.0 / lane_fold(row, 0.0, |a, b| a + b);
        for value in row.iter_mut() {
            *value *= inverse;
        }
    }
}

/// `Σ a_i b_i` accumulated in eight lanes (so the compiler can vectorise it).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_of_pairs(a, b, |x, y| x * y)
}

/// `Σ f(a_i, b_i)` accumulated in eight lanes (so the compiler can vectorise it).
#[inline(always)]
pub(crate) fn sum_of_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_body, a_tail) = a.split_at(a.len() - a.len() % LANES);
    for (a8, b8) in a_body.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for lane in 0..LANES {
            lanes[lane] += f(a8[lane], b8[lane]);
        }
    }
    let tail: f32 = a_tail
        .iter()
        .zip(&b[a_body.len()..])
        .map(|(&x, &y)| f(x, y))
        .sum();
    lanes.iter().sum::<f32>() + tail
}

const LANES: usize = 8;

/// `Σ f(x)` over `values`, accumulated in eight lanes (so the compiler can vectorise it).
#[inline(always)]
pub(crate) fn sum_of(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            lanes[lane] += f(chunk[lane]);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Whether the CPU has AVX-512 (F) besides AVX2 and FMA, for which the element-wise loops here
/// have a compiled copy with sixteen lanes. Each element is computed by the same operations
/// either way, so the results are the same bit for bit (docs/benchmarks.md gives the speed-up
/// measured on an AMD Zen 4 CPU).
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f") && avx2_fma();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX2 and FMA, for which the vectorised loops here have a compiled copy.
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Folds `values` with `f` in eight independent lanes, then folds the lanes.
#[inline(always)]
fn lane_fold(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            lanes[lane] = f(lanes[lane], chunk[lane]);
        }
    }
    let partial = chunks.remainder().iter().fold(init, |acc, &x| f(acc, x));
    lanes.into_iter().fold(partial, f)
}

/// `e^x` for every element, in place; within 2 ulp of the exact value for -87 <= x <= 88.3
/// (smaller inputs give at most 1.2e-38 instead of their tiny true value, larger ones e^88.37).
/// Uses AVX2 + FMA when the CPU has them.
pub(crate) fn exp_in_place(values: &mut [f32]) {
    map_in_place(values, exp_approx);
}

/// Replaces every element `x` by `f(x)`, a vector of lanes at a time so that the loop
/// vectorises; compiled for AVX-512 (sixteen lanes) or AVX2 + FMA (eight) when the CPU has them.
#[inline(always)]
fn map_in_place(values: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU supports the features this copy of the loop is compiled for.
        unsafe { map_in_place_avx512(values, f) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: as above.
        unsafe { map_in_place_avx2(values, f) };
        return;
    }
    map_lanes::<LANES>(values, f);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn map_in_place_avx512(values: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    map_lanes::<WIDE_LANES>(values, f);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_in_place_avx2(values: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    map_lanes::<LANES>(values, f);
}

/// Lanes of one AVX-512 vector: the chunk [`map_in_place`] maps at a time there (wider chunks
/// vectorise worse).
const WIDE_LANES: usize = 16;

/// The portable loop of [`map_in_place`], `W` elements at a time.
#[inline(always)]
fn map_lanes<const W: usize>(values: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    let mut chunks = values.chunks_exact_mut(W);
    for chunk in &mut chunks {
        let lanes: &mut [f32; W] = chunk.try_into().expect("chunks of W");
        for value in lanes.iter_mut() {
            *value = f(*value);
        }
    }
    for value in chunks.into_remainder() {
        *value = f(*value);
    }
}

/// Cephes-style `expf`: `x = n ln2 + r` with `|r| <= ln2 / 2`, a degree-6 polynomial for `e^r`,
/// and `2^n` built in the exponent bits. Branch-free so that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let x = x.max(-87.336_54).min(88.376_26);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e_r = p * r * r + r + 1.0;
    // The bits of `shifted` minus those of ROUND are n; wrapping ops keep the loop free of
    // overflow checks (n + 127 is in 1..=254 after the clamp).
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    e_r * f32::from_bits(biased << 23)
}

/// Exact (erf) GELU, `x Φ(x)`, of every element in place, split over the rayon pool; within
/// 4e-7 · max(|x|, 1) of the exact value. Uses AVX2 + FMA when the CPU has them.
pub(crate) fn gelu_erf_in_place(values: &mut [f32]) {
    values
        .par_chunks_mut(GELU_CHUNK)
        .for_each(|chunk| map_in_place(chunk, gelu_erf_approx));
}

/// GEGLU on the elements of rows `[h, g]` of `width` (two halves): the rows `h · gelu(g)`,
/// `gelu` as [`gelu_erf_in_place`], rows split over the rayon pool.
pub(crate) fn gated_gelu_erf_rows(projected: &[f32], width: usize) -> Vec<f32> {
    let half = width / 2;
    let mut out = zeroed(projected.len() / 2);
    out.par_chunks_mut(half)
        .zip(projected.par_chunks(width))
        .for_each(|(out, row)| {
            let (hidden, gate) = row.split_at(half);
            out.copy_from_slice(gate);
            map_in_place(out, gelu_erf_approx);
            out.iter_mut().zip(hidden).for_each(|(o, h)| *o = h * *o);
        });
    out
}

/// Elements per parallel task of [`gelu_erf_in_place`].
const GELU_CHUNK: usize = 1 << 14;

/// `Φ(x) = 1 - erfc(x / √2) / 2`, with `erfc(|z|)` from the Chebyshev fit of Numerical
/// Recipes (`t e^(-z² + P(t))`, `t = 1 / (1 + |z| / 2)`, relative error below 1.2e-7) and
/// `erfc(-z) = 2 - erfc(z)`. Branch-free so that loops over it vectorise.
#[inline(always)]
fn normal_cdf_approx(x: f32) -> f32 {
    const COEFFICIENTS: [f32; 10] = [
        -1.265_512_2,
        1.000_023_7,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = COEFFICIENTS[9];
    for &c in COEFFICIENTS[..9].iter().rev() {
        p = p * t + c;
    }
    let half_erfc = 0.5 * t * exp_approx(p - z * z);
    if x >= 0.0 {
        1.0 - half_erfc
    } else {
        half_erfc
    }
}

/// `x Φ(x)`, the exact (erf) GELU through [`normal_cdf_approx`].
#[inline(always)]
fn gelu_erf_approx(x: f32) -> f32 {
    x * normal_cdf_approx(x)
}

/// GEGLU's gradient on one row: `[dy · gelu(g), dy · h · gelu'(g)]` into `out` for the row
/// `[h, g]` of `projected`, with `gelu'(g) = Φ(g) + g φ(g)` (normal CDF and density).
#[inline(always)]
fn gated_gelu_gradient_row(out: &mut [f32], projected: &[f32], dy: &[f32]) {
    const DENSITY_SCALE: f32 = 0.398_942_3; // 1 / √(2π)
    let (hidden, gate) = projected.split_at(dy.len());
    let (hidden_grad, gate_grad) = out.split_at_mut(dy.len());
    let rows = hidden_grad.iter_mut().zip(gate_grad.iter_mut());
    for (((hidden_grad, gate_grad), (&h, &g)), &dy) in rows.zip(hidden.iter().zip(gate)).zip(dy) {
        let cdf = normal_cdf_approx(g);
        let density = exp_approx(-0.5 * g * g) * DENSITY_SCALE;
        *hidden_grad = dy * (g * cdf);
        *gate_grad = dy * h * (cdf + g * density);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gated_gelu_gradient_row_avx512(out: &mut [f32], projected: &[f32], dy: &[f32]) {
    gated_gelu_gradient_row(out, projected, dy);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_gelu_gradient_row_avx2(out: &mut [f32], projected: &[f32], dy: &[f32]) {
    gated_gelu_gradient_row(out, projected, dy);
}

/// The gradient of [`gated_gelu_erf_rows`] for its input rows `projected` (`width` wide) and
/// the output gradient rows `grad` (`width / 2` wide), rows split over the rayon pool.
pub(crate) fn gated_gelu_erf_gradient_rows(
    projected: &[f32],
    grad: &[f32],
    width: usize,
) -> Vec<f32> {
    let mut out = zeroed(projected.len());
    #[cfg(target_arch = "x86_64")]
    let (wide, avx2) = (avx512(), avx2_fma());
    out.par_chunks_mut(width)
        .zip(projected.par_chunks(width))
        .zip(grad.par_chunks(width / 2))
        .for_each(|((out, row), dy)| {
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the CPU supports the features this copy of the loop is compiled for.
                unsafe { gated_gelu_gradient_row_avx512(out, row, dy) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports the features this copy of the loop is compiled for.
                unsafe { gated_gelu_gradient_row_avx2(out, row, dy) };
                return;
            }
            gated_gelu_gradient_row(out, row, dy);
        });
    out
}

/// Exact (erf) GELU of `x`: the vectorised kernel for an f32 CPU tensor outside any graph,
/// candle's `gelu_erf` otherwise (it has the backward pass).
pub(crate) fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    let kernel =
        x.dtype() == candle_core::DType::F32 && super::kernel_choice::cpu_kernels(x.device());
    if !kernel || x.track_op() {
        return x.gelu_erf();
    }
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    gelu_erf_in_place(&mut values);
    Tensor::from_vec(values, x.shape(), x.device())
}

/// OpenAI CLIP's quick GELU, `x σ(1.702 x)`: the vectorised kernel (split over the rayon pool)
/// for an f32 CPU tensor outside any graph, candle's ops otherwise (they have the backward pass).
pub(crate) fn quick_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    let kernel =
        x.dtype() == candle_core::DType::F32 && super::kernel_choice::cpu_kernels(x.device());
    if !kernel || x.track_op() {
        return x * candle_nn::ops::sigmoid(&(x * 1.702)?)?;
    }
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    values
        .par_chunks_mut(GELU_CHUNK)
        .for_each(|chunk| map_in_place(chunk, quick_gelu_approx));
    Tensor::from_vec(values, x.shape(), x.device())
}

/// `x / (1 + e^(-1.702 x))` with [`exp_approx`] (whose clamp keeps both tails finite).
#[inline(always)]
fn quick_gelu_approx(x: f32) -> f32 {
    x / (1.0 + exp_approx(-1.702 * x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_is_within_4e7_of_the_exact_erf_form() {
        let inputs: Vec<f32> = (0..400_001)
            .map(|i| -20.0 + 40.0 * i as f32 / 400_000.0)
            .chain([0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0])
            .collect();
        let mut ours = inputs.clone();
        gelu_erf_in_place(&mut ours);
        let mut portable = inputs.clone();
        map_lanes::<LANES>(&mut portable, gelu_erf_approx);
        for ((&x, &fast), &plain) in inputs.iter().zip(&ours).zip(&portable) {
            let exact = 0.5 * x as f64 * libm_erfc(-(x as f64) / std::f64::consts::SQRT_2);
            let bound = 4e-7 * (x.abs() as f64).max(1.0);
            assert!(
                (fast as f64 - exact).abs() <= bound,
                "gelu({x}) = {fast}, exact {exact}"
            );
            assert_eq!(
                fast.to_bits(),
                plain.to_bits(),
                "gelu({x}): SIMD and portable loops differ"
            );
        }
    }

    /// `erfc` in f64 by its continued fraction / series (reference for the test only).
    fn libm_erfc(z: f64) -> f64 {
        // erfc(z) = 1 - erf(z); erf by the Maclaurin series for |z| < 3, the asymptotic
        // continued fraction otherwise (both far more exact than f32).
        if z.abs() < 3.0 {
            let mut term = z;
            let mut sum = z;
            for n in 1..200 {
                term *= -z * z / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            1.0 - sum * 2.0 / std::f64::consts::PI.sqrt()
        } else if z > 0.0 {
            let mut fraction = 0.0;
            for k in (1..60).rev() {
                fraction = (k as f64 / 2.0) / (z + fraction);
            }
            (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + fraction)
        } else {
            2.0 - libm_erfc(-z)
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut inputs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_000.0)
            .collect();
        inputs.extend([0.0, -0.0, 1e-30, -1e-30, 88.3, -87.3]);
        let mut ours = inputs.clone();
        exp_in_place(&mut ours);
        let mut portable = inputs.clone();
        map_lanes::<LANES>(&mut portable, exp_approx);
        for ((&x, &got), &plain) in inputs.iter().zip(&ours).zip(&portable) {
            assert_eq!(
                got.to_bits(),
                plain.to_bits(),
                "exp({x}): SIMD and portable differ"
            );
            let exact = (x as f64).exp();
            let ulp = (exact as f32).abs() * f32::EPSILON;
            for value in [got, plain] {
                let error = (value as f64 - exact).abs() / ulp as f64;
                assert!(
                    error <= 2.0,
                    "exp({x}) = {value}, exact {exact}: {error} ulp"
                );
            }
        }
        let mut tiny = [-100.0f32, -1000.0];
        exp_in_place(&mut tiny);
        assert!(tiny.iter().all(|&v| (0.0..=1.2e-38).contains(&v)));
    }

    #[test]
    fn softmax_rows_match_the_definition() {
        let row_len = 37;
        let scores: Vec<f32> = (0..3 * row_len)
            .map(|i| ((i * 7919) % 113) as f32 / 9.0 - 6.0)
            .collect();
        let mut ours = scores.clone();
        softmax_rows(&mut ours, row_len, 0.5);
        let mut portable = scores.clone();
        softmax_rows_portable(&mut portable, row_len, 0.5);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&ours),
            bits(&portable),
            "SIMD and portable loops differ"
        );
        for (row, got_row) in scores.chunks(row_len).zip(ours.chunks(row_len)) {
            let exps: Vec<f64> = row.iter().map(|&s| (s as f64 * 0.5).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for (e, &got) in exps.iter().zip(got_row) {
                assert!((e / sum - got as f64).abs() < 1e-7, "{} vs {got}", e / sum);
            }
        }
    }

    #[test]
    fn quick_gelu_matches_candles_sigmoid_form() {
        let inputs: Vec<f32> = (0..20_001)
            .map(|i| -60.0 + 120.0 * i as f32 / 20_000.0)
            .collect();
        let x = Tensor::new(inputs.as_slice(), &candle_core::Device::Cpu).unwrap();
        let ours = quick_gelu(&x).unwrap().to_vec1::<f32>().unwrap();
        let candle = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut portable = inputs.clone();
        map_lanes::<LANES>(&mut portable, quick_gelu_approx);
        for ((&x, &fast), (&reference, &portable)) in
            inputs.iter().zip(&ours).zip(candle.iter().zip(&portable))
        {
            assert!(
                (fast - reference).abs() <= 1e-6 * x.abs().max(1.0),
                "quick_gelu({x}) = {fast}, candle {reference}"
            );
            assert_eq!(
                fast, portable,
                "quick_gelu({x}): SIMD and portable loops differ"
            );
        }
    }

    #[test]
    fn tiled_transpose_equals_candles() {
        let device = candle_core::Device::Cpu;
        for (rows, cols) in [(45, 70), (1, 5), (100, 33), (64, 64)] {
            let matrix = Tensor::randn(0f32, 1.0, (rows, cols), &device).unwrap();
            for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
                let matrix = matrix.to_dtype(dtype).unwrap();
                let ours = transpose_matrix(&matrix).unwrap();
                let reference = matrix.t().unwrap().contiguous().unwrap();
                assert_eq!(ours.dims(), [cols, rows]);
                assert_eq!(ours.dtype(), dtype);
                let difference = (ours.to_dtype(candle_core::DType::F32).unwrap()
                    - reference.to_dtype(candle_core::DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
                assert_eq!(difference, 0.0, "{rows}x{cols} {dtype:?}");
            }
        }
    }

    #[test]
    fn few_row_products_match_the_gemm_kernels() {
        // 1 to 4 rows against a row-major right-hand side of several bands of rows (with a tail
        // that is not a multiple of four), with a strided left side and output, overwritten and
        // accumulated.
        let (k, n) = (302, 1100);
        let rhs: Vec<f32> = (0..k * n)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        for m in 1..=SMALL_PRODUCT_ROWS {
            let lhs: Vec<f32> = (0..m * (k + 3))
                .map(|i| ((i * 13) % 29) as f32 / 14.0 - 1.0)
                .collect();
            let expected: Vec<f32> = (0..m * n)
                .map(|i| {
                    (0..k)
                        .map(|j| lhs[(i / n) * (k + 3) + j] * rhs[j * n + i % n])
                        .sum()
                })
                .collect();
            let outputs = [Threads::Pool, Threads::Current].map(|threads| {
                let mut out = vec![1.0f32; m * (n + 5)];
                let (a, b) = (Operand::row_major(&lhs, k + 3), Operand::row_major(&rhs, n));
                gemm_into(&mut out, n + 5, a, b, (m, n, k), false, threads);
                gemm_into(&mut out, n + 5, a, b, (m, n, k), true, threads);
                for (i, &value) in expected.iter().enumerate() {
                    let got = out[(i / n) * (n + 5) + i % n];
                    assert!((got - 2.0 * value).abs() < 1e-4, "{m} rows, element {i}");
                }
                assert_eq!(out[n], 1.0, "padding between output rows untouched");
                out
            });
            assert!(
                outputs[0] == outputs[1],
                "{m} rows: the same sums on any number of threads"
            );
        }
    }

    #[test]
    fn products_of_few_rows_split_by_columns_match_the_sums() {
        // 20 rows (split into bands of columns, over the pool or not), a strided output, the
        // right side row-major and transposed, overwritten and accumulated.
        let (m, n, k) = (20, 1100, 37);
        let lhs: Vec<f32> = (0..m * k)
            .map(|i| ((i * 13) % 29) as f32 / 14.0 - 1.0)
            .collect();
        let rhs: Vec<f32> = (0..k * n)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let rhs_t: Vec<f32> = (0..n * k).map(|i| rhs[(i % k) * n + i / k]).collect();
        let expected = |row: usize, col: usize| -> f32 {
            (0..k).map(|j| lhs[row * k + j] * rhs[j * n + col]).sum()
        };
        let a = Operand::row_major(&lhs, k);
        for b in [Operand::row_major(&rhs, n), Operand::transposed(&rhs_t, k)] {
            let outputs = [Threads::Pool, Threads::Current].map(|threads| {
                let mut out = vec![1.0f32; m * (n + 3)];
                gemm_into(&mut out, n + 3, a, b, (m, n, k), false, threads);
                gemm_into(&mut out, n + 3, a, b, (m, n, k), true, threads);
                for row in 0..m {
                    for col in 0..n {
                        let got = out[row * (n + 3) + col];
                        let want = 2.0 * expected(row, col);
                        assert!((got - want).abs() < 1e-4, "element ({row}, {col})");
                    }
                    assert_eq!(out[row * (n + 3) + n], 1.0, "padding untouched");
                }
                out
            });
            assert!(
                outputs[0] == outputs[1],
                "the same sums on any number of threads"
            );
        }
    }

    #[test]
    fn gemm_reads_transposed_operands() {
        // a [2, 3] row-major; b^T given as b [2, 3] read transposed: a · b^T is [2, 2].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut out = [10.0f32; 4];
        let shape = (2, 2, 3);
        let (lhs, rhs) = (Operand::row_major(&a, 3), Operand::transposed(&b, 3));
        gemm_into(&mut out, 2, lhs, rhs, shape, false, Threads::Current);
        assert_eq!(out, [-2.0, 4.0, -2.0, 13.0]);
        gemm_into(&mut out, 2, lhs, rhs, shape, true, Threads::Current);
        assert_eq!(out, [-4.0, 8.0, -4.0, 26.0]);
        assert_eq!(dot(&a, &b), 1.0 - 3.0 + 8.0 + 5.0);
    }
}
