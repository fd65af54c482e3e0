//! The forward pass of f32 attention, `softmax(q kᵀ · scale) v`, in one AVX-512 kernel.
//!
//! Each task takes one (batch, head) group and a block of [`QUERY_BLOCK`] queries, which it holds
//! transposed so that the queries are the lanes of four vectors. It streams the keys in blocks of
//! [`KEY_BLOCK`]: the scores of a block land in a small buffer (with the queries still in the
//! lanes, so every softmax step is a vertical vector operation), the running maximum and sum of
//! each query are updated (the online softmax), and the block's values are added into the
//! transposed output, rescaled where the maximum moved. The output is divided by the sums once at
//! the end. Nothing of size queries × keys is ever written, and q, k and v are read where they
//! lie (head-major or token-major), so no copy splits the heads.
//!
//! The CPU's other paths (no AVX-512, bfloat16 products, causal masks, the backward pass) use
//! [`super::attention`]'s chunked products.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Queries per task: four vectors of sixteen lanes.
const QUERY_BLOCK: usize = 64;
/// Keys per step of the online softmax (their scores, `KEY_BLOCK × QUERY_BLOCK` floats, stay in
/// the first-level cache).
const KEY_BLOCK: usize = 96;
/// Keys (in the score tiles) and value columns (in the output tiles) per register tile: with
/// four query vectors that is 24 accumulators.
const TILE: usize = 6;

/// Where row `row` of group `group` starts in a buffer of several (batch, head) groups:
/// `(group / heads) · batch_stride + (group % heads) · head_stride + row · row_stride`. A
/// head-major `[groups, rows, depth]` tensor is `heads = 1`; a token-major `[batch, rows,
/// heads · depth]` one has `head_stride = depth`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows<'a> {
    /// The buffer.
    pub data: &'a [f32],
    /// Heads per batch entry.
    pub heads: usize,
    /// Elements between batch entries.
    pub batch_stride: usize,
    /// Elements between the heads of one batch entry.
    pub head_stride: usize,
    /// Elements between consecutive rows of one group.
    pub row_stride: usize,
}

impl<'a> Rows<'a> {
    /// The rows of a head-major `[groups, rows, depth]` buffer.
    pub fn head_major(data: &'a [f32], rows: usize, depth: usize) -> Self {
        Rows {
            data,
            heads: 1,
            batch_stride: rows * depth,
            head_stride: 0,
            row_stride: depth,
        }
    }

    fn start(&self, group: usize, row: usize) -> usize {
        (group / self.heads) * self.batch_stride
            + (group % self.heads) * self.head_stride
            + row * self.row_stride
    }

    /// Whether rows `0..rows` of groups `0..groups`, each `width` wide, lie inside the buffer.
    fn holds(&self, groups: usize, rows: usize, width: usize) -> bool {
        groups == 0 || rows == 0 || self.start(groups - 1, rows - 1) + width <= self.data.len()
    }
}

/// Sizes of one attention call over `groups` independent (batch, head) pairs, each with
/// `queries` x `depth` queries, `keys` x `depth` keys and `keys` x `value_depth` values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub groups: usize,
    pub queries: usize,
    pub keys: usize,
    pub depth: usize,
    pub value_depth: usize,
}

/// Whether [`forward`] runs on this CPU (it needs AVX-512F).
pub(crate) fn available() -> bool {
    super::kernels::avx512()
}

/// Writes `softmax(q kᵀ · scale) v` of every group into `out`, head-major `[groups, queries,
/// value_depth]`, splitting (group, query block) pairs over the rayon pool. Panics where the
/// CPU lacks AVX-512F (see [`available`]) or a buffer is too short for `sizes`.
pub(crate) fn forward(q: Rows, k: Rows, v: Rows, sizes: Sizes, scale: f32, out: &mut [f32]) {
    let Sizes {
        groups,
        queries,
        keys,
        depth,
        value_depth,
    } = sizes;
    assert!(available(), "fused attention needs AVX-512F");
    assert!(
        q.holds(groups, queries, depth)
            && k.holds(groups, keys, depth)
            && v.holds(groups, keys, value_depth)
            && out.len() == groups * queries * value_depth,
        "fused attention: buffers do not fit {sizes:?}"
    );
    if out.is_empty() {
        return;
    }
    if keys == 0 {
        out.fill(f32::NAN);
        return;
    }
    // Scores are kept in base 2: exp(x · scale) = 2^(x · scale · log2 e).
    let q_scale = scale * std::f32::consts::LOG2_E;
    out.par_chunks_mut(queries * value_depth)
        .enumerate()
        .flat_map(|(group, out)| {
            out.par_chunks_mut(QUERY_BLOCK * value_depth)
                .enumerate()
                .map(move |(block, out)| (group, block * QUERY_BLOCK, out))
        })
        .for_each_init(
            || Scratch::new(depth, value_depth),
            |scratch, (group, first, out)| {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `available()` was checked above, and `holds` bounds every row read.
                unsafe {
                    scratch.query_block(&q, &k, &v, sizes, group, first, q_scale, out)
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("{scratch:?} {group} {first} {}", out.len());
            },
        );
}

/// One task's buffers: the transposed queries (`[depth][64]`), a key block's scores
/// (`[KEY_BLOCK][64]`) and the transposed output (`[value_depth][64]`).
#[derive(Debug)]
struct Scratch {
    queries_t: Vec<f32>,
    scores: Vec<f32>,
    out_t: Vec<f32>,
}

impl Scratch {
    fn new(depth: usize, value_depth: usize) -> Self {
        Scratch {
            queries_t: vec![0.0; depth * QUERY_BLOCK],
            scores: vec![0.0; KEY_BLOCK * QUERY_BLOCK],
            out_t: vec![0.0; value_depth * QUERY_BLOCK],
        }
    }

    /// Attention of queries `first..first + out.len() / value_depth` of `group` into `out`
    /// (their rows of the head-major output).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn query_block(
        &mut self,
        q: &Rows,
        k: &Rows,
        v: &Rows,
        sizes: Sizes,
        group: usize,
        first: usize,
        q_scale: f32,
        out: &mut [f32],
    ) {
        let Sizes {
            keys,
            depth,
            value_depth,
            ..
        } = sizes;
        let len = out.len() / value_depth;
        // Queries transposed and scaled; lanes past the last query hold zeros.
        if len < QUERY_BLOCK {
            self.queries_t.fill(0.0);
        }
        for lane in 0..len {
            let row = &q.data[q.start(group, first + lane)..][..depth];
            for (d, &value) in row.iter().enumerate() {
                self.queries_t[d * QUERY_BLOCK + lane] = value * q_scale;
            }
        }
        let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        let mut sum = [_mm512_setzero_ps(); 4];
        let k_rows = k.data.as_ptr().add(k.start(group, 0));
        let v_rows = v.data.as_ptr().add(v.start(group, 0));
        for block_start in (0..keys).step_by(KEY_BLOCK) {
            let block = KEY_BLOCK.min(keys - block_start);
            let k_block = k_rows.add(block_start * k.row_stride);
            self.block_scores(k_block, k.row_stride, block, depth);
            let rescale = self.block_softmax(block, &mut max, &mut sum);
            let first_block = block_start == 0;
            let v_block = v_rows.add(block_start * v.row_stride);
            self.add_block_values(
                v_block,
                v.row_stride,
                block,
                value_depth,
                rescale,
                first_block,
            );
        }
        let mut inverse = [0f32; QUERY_BLOCK];
        for (part, s) in inverse.chunks_exact_mut(16).zip(sum) {
            _mm512_storeu_ps(part.as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), s));
        }
        for (lane, row) in out.chunks_exact_mut(value_depth).enumerate() {
            for (d, value) in row.iter_mut().enumerate() {
                *value = self.out_t[d * QUERY_BLOCK + lane] * inverse[lane];
            }
        }
    }

    /// The scores of keys `0..block` (rows of `k_block`, `k_stride` apart) against the block's
    /// queries, into `self.scores` (`[block][64]`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_scores(
        &mut self,
        k_block: *const f32,
        k_stride: usize,
        block: usize,
        depth: usize,
    ) {
        let queries_t = self.queries_t.as_ptr();
        let scores = self.scores.as_mut_ptr();
        let mut key = 0;
        while key + TILE <= block {
            score_tile::<TILE>(
                queries_t,
                k_block.add(key * k_stride),
                k_stride,
                depth,
                scores.add(key * QUERY_BLOCK),
            );
            key += TILE;
        }
        let rest = (k_block.add(key * k_stride), scores.add(key * QUERY_BLOCK));
        match block - key {
            0 => {}
            1 => score_tile::<1>(queries_t, rest.0, k_stride, depth, rest.1),
            2 => score_tile::<2>(queries_t, rest.0, k_stride, depth, rest.1),
            3 => score_tile::<3>(queries_t, rest.0, k_stride, depth, rest.1),
            4 => score_tile::<4>(queries_t, rest.0, k_stride, depth, rest.1),
            _ => score_tile::<5>(queries_t, rest.0, k_stride, depth, rest.1),
        }
    }

    /// Turns the block's scores into `2^(score − max)` with each query's running `max` updated
    /// to include them, adds them to the running `sum` (first rescaled to the new maximum), and
    /// returns the factor by which the output so far must be rescaled.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_softmax(
        &mut self,
        block: usize,
        max: &mut [__m512; 4],
        sum: &mut [__m512; 4],
    ) -> [__m512; 4] {
        let scores = self.scores.as_mut_ptr();
        let mut block_max = *max;
        for key in 0..block {
            for (c, m) in block_max.iter_mut().enumerate() {
                *m = _mm512_max_ps(*m, _mm512_loadu_ps(scores.add(key * QUERY_BLOCK + 16 * c)));
            }
        }
        let rescale: [__m512; 4] =
            std::array::from_fn(|c| exp2(_mm512_sub_ps(max[c], block_max[c])));
        let mut block_sum = [_mm512_setzero_ps(); 4];
        for key in 0..block {
            for (c, s) in block_sum.iter_mut().enumerate() {
                let at = scores.add(key * QUERY_BLOCK + 16 * c);
                let e = exp2(_mm512_sub_ps(_mm512_loadu_ps(at), block_max[c]));
                _mm512_storeu_ps(at, e);
                *s = _mm512_add_ps(*s, e);
            }
        }
        for c in 0..4 {
            sum[c] = _mm512_fmadd_ps(sum[c], rescale[c], block_sum[c]);
        }
        *max = block_max;
        rescale
    }

    /// `out_t = out_t · rescale + vᵀ p` over the block's keys (`out_t = vᵀ p` for the first
    /// block), `TILE` value columns at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_block_values(
        &mut self,
        v_block: *const f32,
        v_stride: usize,
        block: usize,
        value_depth: usize,
        rescale: [__m512; 4],
        first_block: bool,
    ) {
        let p = self.scores.as_ptr();
        let out_t = self.out_t.as_mut_ptr();
        let mut column = 0;
        while column + TILE <= value_depth {
            let at = (v_block.add(column), out_t.add(column * QUERY_BLOCK));
            value_tile::<TILE>(p, block, at.0, v_stride, at.1, rescale, first_block);
            column += TILE;
        }
        let at = (v_block.add(column), out_t.add(column * QUERY_BLOCK));
        match value_depth - column {
            0 => {}
            1 => value_tile::<1>(p, block, at.0, v_stride, at.1, rescale, first_block),
            2 => value_tile::<2>(p, block, at.0, v_stride, at.1, rescale, first_block),
            3 => value_tile::<3>(p, block, at.0, v_stride, at.1, rescale, first_block),
            4 => value_tile::<4>(p, block, at.0, v_stride, at.1, rescale, first_block),
            _ => value_tile::<5>(p, block, at.0, v_stride, at.1, rescale, first_block),
        }
    }
}

/// Scores of `N` keys (rows `k_stride` apart) against the 64 transposed queries: `scores[key][lane]
/// = Σ_d k[key][d] · queries_t[d][lane]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn score_tile<const N: usize>(
    queries_t: *const f32,
    k: *const f32,
    k_stride: usize,
    depth: usize,
    scores: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; N];
    for d in 0..depth {
        let lanes: [__m512; 4] =
            std::array::from_fn(|c| _mm512_loadu_ps(queries_t.add(d * QUERY_BLOCK + 16 * c)));
        for (key, row) in acc.iter_mut().enumerate() {
            let weight = _mm512_set1_ps(*k.add(key * k_stride + d));
            for (sum, lane) in row.iter_mut().zip(lanes) {
                *sum = _mm512_fmadd_ps(weight, lane, *sum);
            }
        }
    }
    for (key, row) in acc.iter().enumerate() {
        for (c, sum) in row.iter().enumerate() {
            _mm512_storeu_ps(scores.add(key * QUERY_BLOCK + 16 * c), *sum);
        }
    }
}

/// `N` columns of the transposed output: `out_t[col][lane] = out_t[col][lane] · rescale[lane] +
/// Σ_key v[key][col] · p[key][lane]` (without the first term for the first key block).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn value_tile<const N: usize>(
    p: *const f32,
    block: usize,
    v: *const f32,
    v_stride: usize,
    out_t: *mut f32,
    rescale: [__m512; 4],
    first_block: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; N];
    if !first_block {
        for (col, row) in acc.iter_mut().enumerate() {
            for (c, sum) in row.iter_mut().enumerate() {
                let at = out_t.add(col * QUERY_BLOCK + 16 * c);
                *sum = _mm512_mul_ps(_mm512_loadu_ps(at), rescale[c]);
            }
        }
    }
    for key in 0..block {
        let lanes: [__m512; 4] =
            std::array::from_fn(|c| _mm512_loadu_ps(p.add(key * QUERY_BLOCK + 16 * c)));
        for (col, row) in acc.iter_mut().enumerate() {
            let weight = _mm512_set1_ps(*v.add(key * v_stride + col));
            for (sum, lane) in row.iter_mut().zip(lanes) {
                *sum = _mm512_fmadd_ps(weight, lane, *sum);
            }
        }
    }
    for (col, row) in acc.iter().enumerate() {
        for (c, sum) in row.iter().enumerate() {
            _mm512_storeu_ps(out_t.add(col * QUERY_BLOCK + 16 * c), *sum);
        }
    }
}

/// `2^x` for `x ≤ 0` (a score minus its running maximum), within about 2e-7 relative: `x = n +
/// f` with `n` the nearest integer, a degree-6 polynomial for `2^f` on `|f| ≤ 1/2`, and `2^n`
/// applied by `vscalefps`. Arguments below −126 (and −∞) give at most 2^−126.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp2(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    // Taylor coefficients of 2^f = e^(f ln 2): (ln 2)^i / i!.
    let mut p = _mm512_set1_ps(1.540_353_1e-4);
    for c in [
        1.333_355_8e-3,
        9.618_129_1e-3,
        5.550_410_9e-2,
        2.402_265_1e-1,
        6.931_471_8e-1,
        1.0,
    ] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `softmax(q kᵀ · scale) v` of one group in f64, from row-major `[rows, depth]` slices,
    /// and the largest `|score · scale|`.
    fn plain(q: &[f32], k: &[f32], v: &[f32], sizes: Sizes, scale: f64) -> (Vec<f64>, f64) {
        let Sizes {
            queries,
            keys,
            depth,
            value_depth,
            ..
        } = sizes;
        let mut out = vec![0f64; queries * value_depth];
        let mut largest = 0f64;
        for i in 0..queries {
            let scores: Vec<f64> = (0..keys)
                .map(|j| {
                    let dot: f64 = (0..depth)
                        .map(|d| q[i * depth + d] as f64 * k[j * depth + d] as f64)
                        .sum();
                    dot * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            largest = scores.iter().fold(largest, |l, s| l.max(s.abs()));
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for (j, p) in e.iter().enumerate() {
                for d in 0..value_depth {
                    out[i * value_depth + d] += p / total * v[j * value_depth + d] as f64;
                }
            }
        }
        (out, largest)
    }

    /// Deterministic values in `[-spread, spread)`.
    fn values(len: usize, seed: u64, spread: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * spread
            })
            .collect()
    }

    #[test]
    fn matches_plain_attention_for_head_major_and_token_major_layouts() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        // Partial query blocks, key blocks and register tiles on both sides of every size, and
        // scores spread wide enough that the running maximum moves between key blocks.
        let cases = [
            (1, 1, 1, 1, 0.5),
            (63, 5, 7, 6, 0.3),
            (64, 96, 40, 40, 0.16),
            (65, 97, 8, 13, 2.0),
            (130, 200, 16, 5, 1.0),
            (3, 300, 80, 80, 0.11),
        ];
        for (queries, keys, depth, value_depth, scale) in cases {
            let (batch, heads) = (2, 3);
            let groups = batch * heads;
            let sizes = Sizes {
                groups,
                queries,
                keys,
                depth,
                value_depth,
            };
            let q = values(groups * queries * depth, 1, 3.0);
            let k = values(groups * keys * depth, 2, 3.0);
            let v = values(groups * keys * value_depth, 3, 1.0);
            let mut head_major = vec![0f32; groups * queries * value_depth];
            let (q_rows, k_rows, v_rows) = (
                Rows::head_major(&q, queries, depth),
                Rows::head_major(&k, keys, depth),
                Rows::head_major(&v, keys, value_depth),
            );
            forward(q_rows, k_rows, v_rows, sizes, scale, &mut head_major);
            for g in 0..groups {
                let part = |x: &[f32], rows: usize, width: usize| {
                    x[g * rows * width..(g + 1) * rows * width].to_vec()
                };
                let (expected, largest_score) = plain(
                    &part(&q, queries, depth),
                    &part(&k, keys, depth),
                    &part(&v, keys, value_depth),
                    sizes,
                    scale as f64,
                );
                let ours = part(&head_major, queries, value_depth);
                // A score of size s carries a float32 rounding error of about s · 6e-8, which
                // the exponential turns into a relative error of the same size (values ≤ 1).
                let tolerance = 4e-7 * (1.0 + largest_score);
                for (i, (&o, &e)) in ours.iter().zip(&expected).enumerate() {
                    assert!(
                        (o as f64 - e).abs() < tolerance,
                        "{sizes:?}, group {g}, element {i}: {o} against {e}"
                    );
                }
            }
            // The same data laid out token-major, `[batch, rows, heads · width]`.
            let token_major = |x: &[f32], rows: usize, width: usize| {
                let mut t = vec![0f32; x.len()];
                for g in 0..groups {
                    let (b, h) = (g / heads, g % heads);
                    for r in 0..rows {
                        let from = (g * rows + r) * width;
                        let to = (b * rows + r) * heads * width + h * width;
                        t[to..to + width].copy_from_slice(&x[from..from + width]);
                    }
                }
                t
            };
            let token_rows = |data, rows: usize, width: usize| Rows {
                data,
                heads,
                batch_stride: rows * heads * width,
                head_stride: width,
                row_stride: heads * width,
            };
            let (tq, tk, tv) = (
                token_major(&q, queries, depth),
                token_major(&k, keys, depth),
                token_major(&v, keys, value_depth),
            );
            let mut from_tokens = vec![0f32; head_major.len()];
            forward(
                token_rows(&tq, queries, depth),
                token_rows(&tk, keys, depth),
                token_rows(&tv, keys, value_depth),
                sizes,
                scale,
                &mut from_tokens,
            );
            assert_eq!(from_tokens, head_major, "{sizes:?}: layouts disagree");
        }
    }
}
