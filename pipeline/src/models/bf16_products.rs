//! Matrix products of bfloat16 inputs with float32 sums, on CPUs with AVX512-BF16.
//!
//! `vdpbf16ps` adds two bfloat16 products to each of sixteen f32 sums per instruction: twice the
//! multiply-adds of an f32 FMA. Frozen weights stored as bfloat16 or float8 (`--mixed_precision
//! bf16`, `--fp8_base`) multiply this way: their values are exact in bfloat16, and the f32 side
//! (activations, output gradients) is rounded to bfloat16, to nearest even, as PyTorch's autocast
//! rounds the inputs of its bfloat16 matrix products. Both operands are packed into pairs along
//! the summed dimension, so any strides work; the sums stay f32 throughout.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::kernels::Operand;

/// Rows of the result per kernel call.
const TILE_ROWS: usize = 12;
/// Columns of the result per kernel call (two vectors of sixteen lanes).
const TILE_COLUMNS: usize = 32;
/// Pairs of the summed dimension per pass over a tile: a row tile's packed pairs (24 KiB) stay
/// in L1, and each output tile is loaded and stored once per 512 pairs. At 128 pairs (output
/// tiles reloaded four times as often) the products of an SDXL step's shapes took about 3.5%
/// longer at 512² and 7% at 1024².
const PAIRS_PER_PASS: usize = 512;
/// Column tiles sharing one pass over the row tiles: their packed pairs (256 KiB) stay in L2.
const COLUMN_TILES_PER_GROUP: usize = 4;

/// The environment variable that, set to `0`, keeps every product in f32 (narrow weights
/// widened, activations unrounded), as on CPUs without AVX512-BF16.
pub(crate) const DISABLE_VARIABLE: &str = "LORAKIT_BF16_PRODUCTS";

/// Whether narrow weights multiply in bfloat16 in this process: the CPU has AVX512-BF16 and
/// [`DISABLE_VARIABLE`] is not `0`.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let disabled = std::env::var(DISABLE_VARIABLE).is_ok_and(|v| v.trim() == "0");
        !disabled && cpu_has_bf16_pairs()
    })
}

/// Whether this CPU has the AVX512-BF16 instructions the products need.
fn cpu_has_bf16_pairs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The elements of a weight stored as bfloat16 or float8.
#[derive(Clone, Copy)]
pub(crate) enum NarrowElements<'a> {
    /// bfloat16 values.
    Bf16(&'a [bf16]),
    /// float8 e4m3 values (exact in bfloat16).
    F8(&'a [float8::F8E4M3]),
}

/// One side of a product: f32 values (rounded to bfloat16 when packed) or a narrow weight, with
/// element `(i, j)` at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) enum Side<'a> {
    /// An f32 matrix.
    F32(Operand<'a>),
    /// A narrow weight's elements seen as a matrix.
    Narrow {
        /// The elements.
        elements: NarrowElements<'a>,
        /// Distance between rows.
        row_stride: usize,
        /// Distance between columns.
        col_stride: usize,
    },
}

impl<'a> Side<'a> {
    /// The row-major matrix of a narrow weight whose rows are `row_stride` apart.
    pub(crate) fn row_major(elements: NarrowElements<'a>, row_stride: usize) -> Self {
        Side::Narrow {
            elements,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of the row-major narrow matrix whose rows are `row_stride` apart.
    pub(crate) fn transposed(elements: NarrowElements<'a>, row_stride: usize) -> Self {
        Side::Narrow {
            elements,
            row_stride: 1,
            col_stride: row_stride,
        }
    }
}

/// Runs `f` on the elements of `weight` when products with it run in bfloat16 here: a
/// contiguous bfloat16 or float8 CPU tensor, on a CPU with AVX512-BF16. `None` otherwise.
pub(crate) fn with_narrow_weight<R>(
    weight: &Tensor,
    f: impl FnOnce(NarrowElements) -> R,
) -> Option<R> {
    if !matches!(weight.dtype(), DType::BF16 | DType::F8E4M3) || !available() {
        return None;
    }
    let (storage, layout) = weight.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    match cpu {
        CpuStorage::BF16(data) => Some(f(NarrowElements::Bf16(&data[start..end]))),
        CpuStorage::F8E4M3(data) => Some(f(NarrowElements::F8(&data[start..end]))),
        _ => None,
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, for `lhs` `[m, k]`, `rhs`
/// `[k, n]` and a row-major `dst` `[m, n]` whose rows are `dst_stride` apart, with bfloat16
/// inputs and f32 sums, split over the rayon pool. Call only where [`available`] holds.
pub(crate) fn product(
    dst: &mut [f32],
    dst_stride: usize,
    lhs: Side,
    rhs: Side,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(
        m == 0 || n == 0 || dst.len() > (m - 1) * dst_stride + n - 1,
        "output too small"
    );
    // SAFETY: `dst` holds the output, as asserted.
    unsafe {
        write_product(
            dst.as_mut_ptr(),
            dst_stride,
            lhs,
            rhs,
            (m, n, k),
            accumulate,
        )
    }
}

/// `lhs · rhs` as a new row-major `[m, n]` matrix, as [`product`] computes it. The product
/// sets every element, so the buffer is not zeroed first.
pub(crate) fn product_new(lhs: Side, rhs: Side, (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: the capacity holds the output; a product that does not accumulate writes every
    // element of it and reads none (the tests start such products from NaN).
    unsafe {
        write_product(dst.as_mut_ptr(), n, lhs, rhs, (m, n, k), false);
        dst.set_len(m * n);
    }
    dst
}

/// [`product`] on the output at `dst`.
///
/// # Safety
/// `dst` must be valid for writes (and reads when `accumulate`) of the `m` rows of `n` elements
/// `dst_stride` apart, and no other thread may access them meanwhile.
unsafe fn write_product(
    dst: *mut f32,
    dst_stride: usize,
    lhs: Side,
    rhs: Side,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(available(), "bfloat16 products need AVX512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst.add(row * dst_stride).write_bytes(0, n);
            }
        }
        return;
    }
    let pairs = k.div_ceil(2);
    // Columns of rhs as tiles of TILE_COLUMNS columns stored pair by pair, `[tile][pair][lane]`,
    // a lane holding two bfloat16 values; rows of lhs the same way, or, when its rows are
    // contiguous, as bfloat16 rows (the kernel reads pairs from either). The buffers are reused
    // from call to call (taken out of the thread-local meanwhile, so a product run by another
    // pool task on this thread makes its own).
    let (mut lhs_tiles, mut rhs_tiles) = PACKED.take();
    let lhs_layout = pack_lhs(lhs, (m, k), &mut lhs_tiles);
    pack(rhs, (n, k), true, TILE_COLUMNS, &mut rhs_tiles);
    let (row_tiles, column_tiles) = (m.div_ceil(TILE_ROWS), n.div_ceil(TILE_COLUMNS));
    let parts = rayon::current_num_threads().max(1);
    let output = OutputTiles {
        dst,
        stride: dst_stride,
        rows: m,
        columns: n,
    };
    // Threads take disjoint ranges of the more numerous tiles.
    let split_columns = column_tiles >= row_tiles;
    let tiles_to_split = if split_columns {
        column_tiles
    } else {
        row_tiles
    };
    let per_part = tiles_to_split.div_ceil(parts);
    (0..tiles_to_split.div_ceil(per_part))
        .into_par_iter()
        .for_each(|part| {
            let range = part * per_part..((part + 1) * per_part).min(tiles_to_split);
            let (rows, columns) = if split_columns {
                (0..row_tiles, range)
            } else {
                (range, 0..column_tiles)
            };
            let output = &output;
            for first_pair in (0..pairs).step_by(PAIRS_PER_PASS) {
                let pass = PAIRS_PER_PASS.min(pairs - first_pair);
                let load = accumulate || first_pair > 0;
                for group in columns.clone().step_by(COLUMN_TILES_PER_GROUP) {
                    let group = group..(group + COLUMN_TILES_PER_GROUP).min(columns.end);
                    for row_tile in rows.clone() {
                        let a = &lhs_tiles[row_tile * lhs_layout.tile_stride
                            + first_pair * lhs_layout.pair_step..];
                        for column_tile in group.clone() {
                            let b = &rhs_tiles[(column_tile * pairs + first_pair) * TILE_COLUMNS..];
                            // SAFETY: each part writes only its own tiles of `dst`, inside the
                            // bounds asserted above; `available()` holds.
                            unsafe {
                                let a = (a, lhs_layout.pair_step, lhs_layout.lane_step);
                                output.update(row_tile, column_tile, a, b, pass, load)
                            };
                        }
                    }
                }
            }
        });
    PACKED.set((lhs_tiles, rhs_tiles));
}

thread_local! {
    /// The packed operands of [`product`], kept for the next call on this thread.
    static PACKED: std::cell::Cell<(Vec<u32>, Vec<u32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// The output matrix of [`product`], written tile by tile from several threads.
struct OutputTiles {
    dst: *mut f32,
    stride: usize,
    rows: usize,
    columns: usize,
}

// SAFETY: the threads of `product` write disjoint tiles.
unsafe impl Sync for OutputTiles {}

impl OutputTiles {
    /// Adds the products of `pairs` packed pairs to one tile (or sets it, unless `load`).
    ///
    /// # Safety
    /// No other thread may touch this tile meanwhile, and AVX512-BF16 must be available.
    unsafe fn update(
        &self,
        row_tile: usize,
        column_tile: usize,
        (a, pair_step, lane_step): (&[u32], usize, usize),
        b: &[u32],
        pairs: usize,
        load: bool,
    ) {
        let a_end = (pairs - 1) * pair_step + (TILE_ROWS - 1) * lane_step + 1;
        assert!(a.len() >= a_end && b.len() >= pairs * TILE_COLUMNS);
        let a = (a.as_ptr(), pair_step, lane_step);
        let (row, column) = (row_tile * TILE_ROWS, column_tile * TILE_COLUMNS);
        let (rows, columns) = (
            TILE_ROWS.min(self.rows - row),
            TILE_COLUMNS.min(self.columns - column),
        );
        let corner = self.dst.add(row * self.stride + column);
        if (rows, columns) == (TILE_ROWS, TILE_COLUMNS) {
            kernel(a, b.as_ptr(), pairs, corner, self.stride, load);
            return;
        }
        // An edge tile goes through a full-size buffer.
        let mut tile = [0f32; TILE_ROWS * TILE_COLUMNS];
        if load {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(
                    corner.add(r * self.stride),
                    tile.as_mut_ptr().add(r * TILE_COLUMNS),
                    columns,
                );
            }
        }
        kernel(a, b.as_ptr(), pairs, tile.as_mut_ptr(), TILE_COLUMNS, true);
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(
                tile.as_ptr().add(r * TILE_COLUMNS),
                corner.add(r * self.stride),
                columns,
            );
        }
    }
}

/// The tile kernel: `c[r][j] (+)= Σ_p a[p][r] · b[p][j]` over `pairs` packed pairs, for the
/// `TILE_ROWS x TILE_COLUMNS` tile at `c` (rows `c_stride` apart), held in 24 vector registers;
/// pair `p` of row `r` of `a` lies at `p * pair_step + r * lane_step`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    (a, pair_step, lane_step): (*const u32, usize, usize),
    b: *const u32,
    pairs: usize,
    c: *mut f32,
    c_stride: usize,
    load: bool,
) {
    use std::arch::x86_64::*;
    let mut sums = [[_mm512_setzero_ps(); 2]; TILE_ROWS];
    if load {
        for (r, row) in sums.iter_mut().enumerate() {
            row[0] = _mm512_loadu_ps(c.add(r * c_stride));
            row[1] = _mm512_loadu_ps(c.add(r * c_stride + 16));
        }
    }
    for p in 0..pairs {
        let b_low: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(b.add(p * TILE_COLUMNS).cast()));
        let b_high: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(b.add(p * TILE_COLUMNS + 16).cast()));
        for (r, row) in sums.iter_mut().enumerate() {
            let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                *a.add(p * pair_step + r * lane_step) as i32,
            ));
            row[0] = _mm512_dpbf16_ps(row[0], pair, b_low);
            row[1] = _mm512_dpbf16_ps(row[1], pair, b_high);
        }
    }
    for (r, row) in sums.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * c_stride), row[0]);
        _mm512_storeu_ps(c.add(r * c_stride + 16), row[1]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(
    _: (*const u32, usize, usize),
    _: *const u32,
    _: usize,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("bfloat16 products need AVX512-BF16")
}

/// The bfloat16 bits of `x` rounded to nearest even (NaN stays NaN), branch-free so that the
/// packing loops vectorise.
#[inline(always)]
fn f32_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    (if x.is_nan() { quiet_nan } else { rounded }) as u16
}

/// The bfloat16 bits of a float8 e4m3 value (exact: its f32 has 16 zero low bits), from a
/// table of all 256 values.
#[inline(always)]
fn f8_bits(x: float8::F8E4M3) -> u16 {
    static TABLE: std::sync::OnceLock<[u16; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        std::array::from_fn(|b| {
            (float8::F8E4M3::from_bits(b as u8).to_f32().to_bits() >> 16) as u16
        })
    });
    table[x.to_bits() as usize]
}

/// Where [`product`]'s kernel finds pair `p` of row `r` of row tile `t` of the packed lhs:
/// `t * tile_stride + p * pair_step + r * lane_step`.
struct LhsLayout {
    tile_stride: usize,
    pair_step: usize,
    lane_step: usize,
}

/// Packs the `[m, k]` lhs into `packed`: as bfloat16 rows (pairs side by side, converted a row
/// at a time) when its rows are contiguous, else as the tiles of [`pack`].
fn pack_lhs(lhs: Side, (m, k): (usize, usize), packed: &mut Vec<u32>) -> LhsLayout {
    let pairs = k.div_ceil(2);
    let rows = m.div_ceil(TILE_ROWS) * TILE_ROWS;
    let rows_of = |row_stride: usize, col_stride: usize| (col_stride == 1).then_some(row_stride);
    let contiguous_rows = match lhs {
        Side::F32(operand) => {
            let (data, row_stride, col_stride) = operand.parts();
            rows_of(row_stride, col_stride).map(|stride| {
                convert_rows(data, f32_bits, (stride, m, k), rows, packed);
            })
        }
        Side::Narrow {
            elements,
            row_stride,
            col_stride,
        } => rows_of(row_stride, col_stride).map(|stride| match elements {
            NarrowElements::Bf16(data) => {
                convert_rows(data, bf16::to_bits, (stride, m, k), rows, packed)
            }
            NarrowElements::F8(data) => convert_rows(data, f8_bits, (stride, m, k), rows, packed),
        }),
    };
    match contiguous_rows {
        Some(()) => LhsLayout {
            tile_stride: TILE_ROWS * pairs,
            pair_step: 1,
            lane_step: pairs,
        },
        None => {
            pack(lhs, (m, k), false, TILE_ROWS, packed);
            LhsLayout {
                tile_stride: pairs * TILE_ROWS,
                pair_step: TILE_ROWS,
                lane_step: 1,
            }
        }
    }
}

/// Converts the `lines` rows (`row_stride` apart, `len` long) of `data` into `padded_lines`
/// rows of `len.div_ceil(2)` bfloat16 pairs in `packed`, the rows past `lines` zero.
fn convert_rows<T: Copy + Sync>(
    data: &[T],
    bits: impl Fn(T) -> u16 + Sync + Copy,
    (row_stride, lines, len): (usize, usize, usize),
    padded_lines: usize,
    packed: &mut Vec<u32>,
) {
    let pairs = len.div_ceil(2);
    sized(packed, padded_lines * pairs)
        .par_chunks_mut(pairs)
        .enumerate()
        .for_each(|(line, out)| match line < lines {
            // SAFETY: `product` runs only where `available()` holds, which checks these features.
            true => unsafe { convert_row(&data[line * row_stride..][..len], out, bits) },
            false => out.fill(0),
        });
}

/// The first `len` elements of `buffer`, grown (never shrunk) to hold them. The packing writes
/// every element it hands out, so the buffer is zeroed only where it grows: a product smaller
/// than an earlier one on this thread fills nothing serially.
fn sized(buffer: &mut Vec<u32>, len: usize) -> &mut [u32] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

/// One row of [`convert_rows`], compiled for AVX-512 so that the conversion vectorises.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn convert_row<T: Copy>(source: &[T], out: &mut [u32], bits: impl Fn(T) -> u16) {
    let pair = |low: T, high: T| bits(low) as u32 | (bits(high) as u32) << 16;
    let whole = source.chunks_exact(2);
    let last = whole.remainder().first().copied();
    for (o, two) in out.iter_mut().zip(whole) {
        *o = pair(two[0], two[1]);
    }
    if let Some(last) = last {
        out[source.len() / 2] = bits(last) as u32;
    }
}

/// Packs the `lines` lines of `side` (its rows, or its columns when `by_columns`), each `len`
/// long, into `packed` as tiles of `tile` lines: `[tile][pair][lane]`, lane `l` of pair `p`
/// holding elements `2p` and `2p + 1` of line `tile * t + l` (zeros past the ends).
fn pack(
    side: Side,
    (lines, len): (usize, usize),
    by_columns: bool,
    tile: usize,
    packed: &mut Vec<u32>,
) {
    let shape = (lines, len);
    match side {
        Side::F32(operand) => {
            let (data, row_stride, col_stride) = operand.parts();
            let strides = (row_stride, col_stride);
            pack_from(data, f32_bits, strides, shape, (by_columns, tile), packed)
        }
        Side::Narrow {
            elements,
            row_stride,
            col_stride,
        } => {
            let strides = (row_stride, col_stride);
            match elements {
                NarrowElements::Bf16(data) => pack_from(
                    data,
                    bf16::to_bits,
                    strides,
                    shape,
                    (by_columns, tile),
                    packed,
                ),
                NarrowElements::F8(data) => {
                    pack_from(data, f8_bits, strides, shape, (by_columns, tile), packed)
                }
            }
        }
    }
}

/// [`pack`] for one element type, `bits` giving an element's bfloat16 bits. Lines that lie
/// side by side in memory are packed a pair of elements across all lanes at a time, other lines
/// one line at a time, so that reads stay sequential either way.
fn pack_from<T: Copy + Sync>(
    data: &[T],
    bits: impl Fn(T) -> u16 + Sync + Copy,
    (row_stride, col_stride): (usize, usize),
    (lines, len): (usize, usize),
    (by_columns, tile): (bool, usize),
    packed: &mut Vec<u32>,
) {
    let (line_stride, step) = if by_columns {
        (col_stride, row_stride)
    } else {
        (row_stride, col_stride)
    };
    let pair = move |low: T, high: T| bits(low) as u32 | (bits(high) as u32) << 16;
    let pairs = len.div_ceil(2);
    sized(packed, lines.div_ceil(tile) * pairs * tile)
        .par_chunks_mut(pairs * tile)
        .enumerate()
        // SAFETY: `product` runs only where `available()` holds, which checks these features.
        .for_each(|(t, panel)| unsafe {
            fill_panel(
                data,
                pair,
                (line_stride, step),
                (lines, len),
                (t, tile),
                panel,
            )
        });
}

/// Tile `t` of [`pack_from`] into `panel`, compiled for AVX-512 so that the loops vectorise.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn fill_panel<T: Copy>(
    data: &[T],
    pair: impl Fn(T, T) -> u32,
    (line_stride, step): (usize, usize),
    (lines, len): (usize, usize),
    (t, tile): (usize, usize),
    panel: &mut [u32],
) {
    let pairs = len.div_ceil(2);
    // An odd length's last element alone, its partner zero.
    let single = |x: T| pair(x, x) & 0xffff;
    let first = t * tile;
    let lanes = tile.min(lines - first);
    if lanes < tile {
        // The lanes past the last line (the buffer holds an earlier call's values).
        panel
            .chunks_exact_mut(tile)
            .for_each(|pair| pair[lanes..].fill(0));
    }
    if line_stride == 1 {
        for (p, out) in panel.chunks_exact_mut(tile).enumerate() {
            let out = &mut out[..lanes];
            let low = &data[first + 2 * p * step..][..lanes];
            if 2 * p + 1 < len {
                let high = &data[first + (2 * p + 1) * step..][..lanes];
                for ((o, &l), &h) in out.iter_mut().zip(low).zip(high) {
                    *o = pair(l, h);
                }
            } else {
                for (o, &l) in out.iter_mut().zip(low) {
                    *o = single(l);
                }
            }
        }
    } else {
        // Lines whose elements are side by side: blocks of BLOCK lines x BLOCK pairs are
        // converted row by row and transposed in registers; the rest one element pair at a time.
        let block_pairs = if step == 1 && cfg!(target_arch = "x86_64") {
            len / 2 / BLOCK * BLOCK
        } else {
            0
        };
        let block_lanes = lanes / BLOCK * BLOCK;
        for lane0 in (0..block_lanes).step_by(BLOCK) {
            for p0 in (0..block_pairs).step_by(BLOCK) {
                let mut block = [[0u32; BLOCK]; BLOCK];
                for (i, row) in block.iter_mut().enumerate() {
                    let source = &data[(first + lane0 + i) * line_stride + 2 * p0..][..2 * BLOCK];
                    for (o, two) in row.iter_mut().zip(source.chunks_exact(2)) {
                        *o = pair(two[0], two[1]);
                    }
                }
                transpose_block(&block, &mut panel[p0 * tile + lane0..], tile);
            }
        }
        for lane in 0..lanes {
            let start = (first + lane) * line_stride;
            let done = if lane < block_lanes { block_pairs } else { 0 };
            for p in done..len / 2 {
                let at = start + 2 * p * step;
                panel[p * tile + lane] = pair(data[at], data[at + step]);
            }
            if len % 2 == 1 {
                panel[(pairs - 1) * tile + lane] = single(data[start + (len - 1) * step]);
            }
        }
    }
}

/// Lines and pairs of one block transposed in registers by [`fill_panel`].
const BLOCK: usize = 16;

/// Stores the transpose of `block` (pairs of BLOCK lines) into `panel`: pair `p` of line `l`
/// goes to `panel[p * tile + l]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_block(block: &[[u32; BLOCK]; BLOCK], panel: &mut [u32], tile: usize) {
    use std::arch::x86_64::*;
    assert!(panel.len() >= (BLOCK - 1) * tile + BLOCK);
    let rows: [__m512i; BLOCK] =
        std::array::from_fn(|i| _mm512_loadu_si512(block[i].as_ptr().cast()));
    // Within each 128-bit lane: pairs of rows interleaved by 32 bits, then by 64 bits, which
    // leaves in lane q of `quads[4 * g + c]` column 4q + c of rows 4g..4g + 4.
    let pairs: [__m512i; BLOCK] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    let quads: [__m512i; BLOCK] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (pairs[4 * g + c / 2], pairs[4 * g + c / 2 + 2]);
        if c % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // Then the 128-bit lanes: column 4q + c gathers lane q of quads[c], [4 + c], [8 + c], [12 + c].
    for c in 0..4 {
        let (p, q, r, s) = (quads[c], quads[4 + c], quads[8 + c], quads[12 + c]);
        let low = (
            _mm512_shuffle_i32x4::<0x44>(p, q),
            _mm512_shuffle_i32x4::<0x44>(r, s),
        );
        let high = (
            _mm512_shuffle_i32x4::<0xee>(p, q),
            _mm512_shuffle_i32x4::<0xee>(r, s),
        );
        let columns = [
            _mm512_shuffle_i32x4::<0x88>(low.0, low.1),
            _mm512_shuffle_i32x4::<0xdd>(low.0, low.1),
            _mm512_shuffle_i32x4::<0x88>(high.0, high.1),
            _mm512_shuffle_i32x4::<0xdd>(high.0, high.1),
        ];
        for (quarter, column) in columns.into_iter().enumerate() {
            let pair = 4 * quarter + c;
            _mm512_storeu_si512(panel.as_mut_ptr().add(pair * tile).cast(), column);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose_block(_: &[[u32; BLOCK]; BLOCK], _: &mut [u32], _: usize) {
    unreachable!("blocks are transposed only on x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 products of the bfloat16-rounded inputs.
    fn reference(lhs: &[f32], rhs: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let round = |x: f32| bf16::from_f32(x).to_f32() as f64;
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| round(lhs[i * k + p]) * round(rhs[p * n + j]))
                    .sum();
            }
        }
        out
    }

    fn values(count: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn products_equal_the_sums_of_the_rounded_inputs_for_every_side_and_stride() {
        if !available() {
            eprintln!("no AVX512-BF16 on this CPU: the f32 kernels are used instead");
            assert!(with_narrow_weight(
                &Tensor::zeros(4, DType::BF16, &candle_core::Device::Cpu).unwrap(),
                |_| ()
            )
            .is_none());
            return;
        }
        // Full tiles, edges in every dimension, an odd summed length, several passes.
        for (m, n, k) in [(24, 64, 256), (13, 33, 7), (1, 5, 1), (30, 70, 1101)] {
            let lhs = values(m * k, 1);
            let rhs = values(k * n, 2);
            let expected = reference(&lhs, &rhs, (m, n, k));
            let scale = expected.iter().fold(0f64, |a, v| a.max(v.abs()));
            let check = |got: &[f32], stride: usize, base: f32, case: &str| {
                for i in 0..m {
                    for j in 0..n {
                        let off =
                            (got[i * stride + j] as f64 - base as f64 - expected[i * n + j]).abs();
                        assert!(
                            off <= 2e-6 * scale * (k as f64).sqrt(),
                            "{case} {m}x{n}x{k} ({i},{j}): {off}"
                        );
                    }
                }
            };
            // f32 on both sides, row-major and transposed storage.
            let rhs_t: Vec<f32> = (0..n * k).map(|x| rhs[(x % k) * n + x / k]).collect();
            for (right, case) in [
                (Operand::row_major(&rhs, n), "row-major"),
                (Operand::transposed(&rhs_t, k), "transposed"),
            ] {
                let stride = n + 3;
                let mut dst = vec![0.5f32; m * stride];
                product(
                    &mut dst,
                    stride,
                    Side::F32(Operand::row_major(&lhs, k)),
                    Side::F32(right),
                    (m, n, k),
                    true,
                );
                check(&dst, stride, 0.5, case);
                product(
                    &mut dst,
                    stride,
                    Side::F32(Operand::row_major(&lhs, k)),
                    Side::F32(right),
                    (m, n, k),
                    false,
                );
                check(&dst, stride, 0.0, case);
            }
            // A bfloat16 weight on either side: stored as [n, k] (rhs transposed), [m, k], or
            // [k, m] (lhs transposed). Each product starts from NaN, so one that leaves its
            // output unwritten fails.
            let rhs_bf16: Vec<bf16> = rhs_t.iter().map(|&x| bf16::from_f32(x)).collect();
            let lhs_bf16: Vec<bf16> = lhs.iter().map(|&x| bf16::from_f32(x)).collect();
            let lhs_t: Vec<bf16> = (0..m * k).map(|x| lhs_bf16[(x % m) * k + x / m]).collect();
            let (f32_lhs, f32_rhs) = (
                Side::F32(Operand::row_major(&lhs, k)),
                Side::F32(Operand::row_major(&rhs, n)),
            );
            let cases = [
                (
                    f32_lhs,
                    Side::transposed(NarrowElements::Bf16(&rhs_bf16), k),
                    "bf16 rhs",
                ),
                (
                    Side::row_major(NarrowElements::Bf16(&lhs_bf16), k),
                    f32_rhs,
                    "bf16 lhs",
                ),
                (
                    Side::transposed(NarrowElements::Bf16(&lhs_t), m),
                    f32_rhs,
                    "bf16 lhs stored transposed",
                ),
            ];
            for (left, right, case) in cases {
                let mut dst = vec![f32::NAN; m * n];
                product(&mut dst, n, left, right, (m, n, k), false);
                check(&dst, n, 0.0, case);
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_as_the_half_crate() {
        let special = [
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            1e-40,
        ];
        let ties = [f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)];
        for x in special
            .into_iter()
            .chain(ties)
            .chain(values(10_000, 5).iter().map(|v| v * 1e3))
        {
            let expected = bf16::from_f32(x);
            let got = bf16::from_bits(f32_bits(x));
            assert!(
                got == expected || (got.is_nan() && expected.is_nan()),
                "{x}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn float8_weights_enter_exactly() {
        if !available() {
            let weight = Tensor::zeros(4, DType::F8E4M3, &candle_core::Device::Cpu).unwrap();
            assert!(with_narrow_weight(&weight, |_| ()).is_none());
            return;
        }
        let (m, n, k) = (5, 40, 51);
        let lhs = values(m * k, 3);
        let weight: Vec<float8::F8E4M3> = values(n * k, 4)
            .iter()
            .map(|&x| float8::F8E4M3::from_f32(x))
            .collect();
        let widened: Vec<f32> = (0..k * n)
            .map(|x| weight[(x % n) * k + x / n].to_f32())
            .collect();
        let expected = reference(&lhs, &widened, (m, n, k));
        let mut dst = vec![f32::NAN; m * n];
        let side = Side::transposed(NarrowElements::F8(&weight), k);
        product(
            &mut dst,
            n,
            Side::F32(Operand::row_major(&lhs, k)),
            side,
            (m, n, k),
            false,
        );
        for (got, want) in dst.iter().zip(&expected) {
            assert!((*got as f64 - want).abs() < 1e-5, "{got} {want}");
        }
    }
}
