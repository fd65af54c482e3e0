//! Memory-efficient scaled dot-product attention with an exact backward pass.
//!
//! The attention matrix `softmax(q k^T * scale)` is never kept for the backward pass: the forward
//! computes it in chunks of query rows and keeps only `q`, `k`, `v` and the output; the backward
//! recomputes each chunk. Peak memory for the scores drops from `heads x N x N` per layer for the
//! whole forward pass to one chunk at a time, which is what makes training at 64x64 latents fit.
//! On a CPU with AVX-512F the f32 forward pass without a mask runs as one kernel instead
//! (`models::fused_attention`).

use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D,
};
use rayon::prelude::*;

use crate::models::bf16_products::{self, Side};
use crate::models::frozen::{dense, into_storage, tensor_from_storage};
use crate::models::fused_attention::{self, Rows, Sizes};
use crate::models::kernel_choice::cpu_kernels;
use crate::models::kernels::{
    dot, f32_elements, gemm_into, softmax_rows, with_f32_slices, zeroed, Operand, Threads,
};

/// Score elements of one (batch, head) pair computed at a time by the f32 CPU kernel, per thread
/// (1 MiB: at 4096 keys, 64 query rows per product; with 16 rows the products ran at well under
/// half the speed).
const CPU_CHUNK_ELEMENTS: usize = 1 << 18;

/// Score elements computed per chunk (query rows are grouped to stay near this size).
const CHUNK_ELEMENTS: usize = 1 << 22;

/// How the f32 CPU kernel multiplies its matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// In f32.
    F32,
    /// With bfloat16 inputs and f32 sums ([`bf16_products`]), as PyTorch's autocast runs the
    /// attention of a model whose weights are bf16.
    Bfloat16,
}

impl Products {
    /// [`Products::Bfloat16`] where products with `weight` (a layer of the same model) run in
    /// bfloat16 on this CPU, [`Products::F32`] otherwise.
    pub fn matching(weight: &Tensor) -> Self {
        match bf16_products::with_narrow_weight(weight, |_| ()) {
            Some(()) => Products::Bfloat16,
            None => Products::F32,
        }
    }
}

/// `softmax(q k^T * scale) v` for `q` `[G, Nq, d]`, `k`/`v` `[G, Nk, d]` (G = batch x heads).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let op = ChunkedAttention {
        scale,
        causal: false,
        products: Products::F32,
    };
    dense(q)?.apply_op3(&dense(k)?, &dense(v)?, op)
}

/// Multi-head attention on token-major tensors: `q` `[B, Nq, H·d]`, `k` `[B, Nk, H·d]`, `v`
/// `[B, Nk, H·dv]` (heads side by side in the last dimension, as the projections produce them),
/// returning `[B, Nq, H·dv]`. On the CPU the heads are split and merged inside one op, so the
/// graph keeps no head-major copies of q, k, v or the output; f32 activations multiply as
/// `products` says.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    products: Products,
) -> candle_core::Result<Tensor> {
    token_major_attention(
        q,
        k,
        v,
        heads,
        ChunkedAttention {
            scale,
            causal: false,
            products,
        },
    )
}

/// [`multi_head_attention`] of a sequence with itself where each query sees only the keys at or
/// before its own position (a text encoder's causal mask): masked scores take no part in the
/// softmax and get probability 0.
pub fn causal_multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    token_major_attention(
        q,
        k,
        v,
        heads,
        ChunkedAttention {
            scale,
            causal: true,
            products: Products::F32,
        },
    )
}

fn token_major_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    inner: ChunkedAttention,
) -> candle_core::Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && cpu_kernels(t.device());
    if f32_cpu(q) && f32_cpu(k) && f32_cpu(v) {
        let op = TokenMajorAttention { heads, inner };
        return dense(q)?.apply_op3(&dense(k)?, &dense(v)?, op);
    }
    let (b, nq, _) = q.dims3()?;
    let split = |t: &Tensor| -> candle_core::Result<Tensor> {
        let (_, len, width) = t.dims3()?;
        t.reshape((b, len, heads, width / heads))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, len, width / heads))
    };
    let out = dense(&split(q)?)?.apply_op3(&split(k)?, &split(v)?, inner)?;
    let value_depth = out.dim(2)?;
    out.reshape((b, heads, nq, value_depth))?
        .transpose(1, 2)?
        .reshape((b, nq, heads * value_depth))
}

/// [`multi_head_attention`]'s f32 CPU op: [`ChunkedAttention`] between a split of the heads and
/// a merge, both inside the op.
#[derive(Debug, Clone, Copy)]
struct TokenMajorAttention {
    heads: usize,
    inner: ChunkedAttention,
}

/// The layout of one token-major tensor `[batch, tokens, heads · depth]`.
#[derive(Debug, Clone, Copy)]
struct TokenMajor {
    batch: usize,
    tokens: usize,
    heads: usize,
    depth: usize,
}

impl TokenMajor {
    fn of(shape: &Shape, heads: usize) -> candle_core::Result<Self> {
        let (batch, tokens, width) = shape.dims3()?;
        if heads == 0 || !width.is_multiple_of(heads) {
            candle_core::bail!("attention: width {width} does not split into {heads} heads")
        }
        Ok(TokenMajor {
            batch,
            tokens,
            heads,
            depth: width / heads,
        })
    }

    /// The head-major shape `[batch · heads, tokens, depth]`.
    fn head_major(&self) -> Shape {
        Shape::from((self.batch * self.heads, self.tokens, self.depth))
    }

    /// The rows of each (batch, head) group where they lie in `x`.
    fn rows<'a>(&self, x: &'a [f32]) -> Rows<'a> {
        let width = self.heads * self.depth;
        Rows {
            data: x,
            heads: self.heads,
            batch_stride: self.tokens * width,
            head_stride: self.depth,
            row_stride: width,
        }
    }

    /// `[B, N, H·d]` -> `[B·H, N, d]`, a head per rayon task.
    fn split(&self, x: &[f32]) -> Vec<f32> {
        let (n, h, d) = (self.tokens, self.heads, self.depth);
        let mut out = zeroed(x.len());
        out.par_chunks_mut(n * d)
            .enumerate()
            .for_each(|(bh, group)| {
                let (b, head) = (bh / h, bh % h);
                for (i, row) in group.chunks_mut(d).enumerate() {
                    let start = (b * n + i) * h * d + head * d;
                    row.copy_from_slice(&x[start..start + d]);
                }
            });
        out
    }

    /// `[B·H, N, d]` -> `[B, N, H·d]`, a token per rayon task.
    fn merge(&self, x: &[f32]) -> Vec<f32> {
        let (n, h, d) = (self.tokens, self.heads, self.depth);
        let mut out = zeroed(x.len());
        out.par_chunks_mut(h * d)
            .enumerate()
            .for_each(|(token, row)| {
                let (b, i) = (token / n, token % n);
                for (head, part) in row.chunks_mut(d).enumerate() {
                    let start = ((b * h + head) * n + i) * d;
                    part.copy_from_slice(&x[start..start + d]);
                }
            });
        out
    }
}

/// The token-major layouts of one call's q, k, v and output, and the head-major sizes of the
/// kernel between split and merge.
struct CallLayouts {
    q: TokenMajor,
    k: TokenMajor,
    v: TokenMajor,
    out: TokenMajor,
    sizes: Sizes,
}

impl CallLayouts {
    fn of(heads: usize, q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Self> {
        let q = TokenMajor::of(q, heads)?;
        let k = TokenMajor::of(k, heads)?;
        let v = TokenMajor::of(v, heads)?;
        let sizes = Sizes::of(&q.head_major(), &k.head_major(), &v.head_major())?;
        let out = TokenMajor {
            depth: v.depth,
            ..q
        };
        Ok(CallLayouts {
            q,
            k,
            v,
            out,
            sizes,
        })
    }
}

impl CustomOp3 for TokenMajorAttention {
    fn name(&self) -> &'static str {
        "token-major-attention"
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
        let (Some(q), Some(k), Some(v)) = (
            f32_elements(s1, l1),
            f32_elements(s2, l2),
            f32_elements(s3, l3),
        ) else {
            candle_core::bail!("attention: expected contiguous f32 inputs")
        };
        let layouts = CallLayouts::of(self.heads, l1.shape(), l2.shape(), l3.shape())?;
        let out = if self.inner.fused() {
            let s = layouts.sizes;
            let mut out = zeroed(s.groups * s.queries * s.value_depth);
            let (q, k, v) = (layouts.q.rows(q), layouts.k.rows(k), layouts.v.rows(v));
            fused_attention::forward(q, k, v, s, self.inner.scale as f32, &mut out);
            out
        } else {
            self.inner.forward_f32(
                &layouts.q.split(q),
                &layouts.k.split(k),
                &layouts.v.split(v),
                layouts.sizes,
            )
        };
        let out_layout = layouts.out;
        let shape = Shape::from((
            out_layout.batch,
            out_layout.tokens,
            out_layout.heads * out_layout.depth,
        ));
        Ok((CpuStorage::F32(out_layout.merge(&out)), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let layouts = CallLayouts::of(self.heads, q.shape(), k.shape(), v.shape())?;
        let inputs = [q, k, v, grad].map(Tensor::detach);
        let (grad_q, grad_k, grad_v) = with_f32_slices(inputs.each_ref(), |[q, k, v, grad]| {
            self.inner.backward_f32(
                (
                    &layouts.q.split(q),
                    &layouts.k.split(k),
                    &layouts.v.split(v),
                ),
                &layouts.out.split(grad),
                layouts.sizes,
            )
        })?;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(
                layouts.q.merge(&grad_q),
                q.shape(),
                device,
            )?),
            Some(Tensor::from_vec(
                layouts.k.merge(&grad_k),
                k.shape(),
                device,
            )?),
            Some(Tensor::from_vec(
                layouts.v.merge(&grad_v),
                v.shape(),
                device,
            )?),
        ))
    }
}

#[derive(Debug, Clone, Copy)]
struct ChunkedAttention {
    scale: f64,
    /// Query `i` sees keys `0..=i` only (self-attention).
    causal: bool,
    /// How the f32 CPU kernel multiplies.
    products: Products,
}

impl ChunkedAttention {
    /// Whether the f32 CPU forward pass runs as [`fused_attention`] (f32 products, no mask, a
    /// CPU with AVX-512F).
    fn fused(&self) -> bool {
        self.products == Products::F32 && !self.causal && fused_attention::available()
    }

    /// Query rows per chunk.
    fn rows(&self, groups: usize, keys: usize) -> usize {
        (CHUNK_ELEMENTS / (groups * keys).max(1)).max(1)
    }

    /// The softmax runs in f32 whatever the activations' dtype, as PyTorch's attention does: in
    /// bf16 the row sum over hundreds of keys loses several percent.
    fn probabilities(
        &self,
        q_chunk: &Tensor,
        k: &Tensor,
        first_query: usize,
    ) -> candle_core::Result<Tensor> {
        let mut scores = (q_chunk.matmul(&k.t()?)?.to_dtype(DType::F32)? * self.scale)?;
        if self.causal {
            let (len, keys) = (q_chunk.dim(1)?, k.dim(1)?);
            let mask: Vec<f32> = (first_query..first_query + len)
                .flat_map(|i| (0..keys).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (len, keys), k.device())?)?;
        }
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .to_dtype(q_chunk.dtype())
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let (groups, queries, _) = q.dims3()?;
        let rows = self.rows(groups, k.dim(1)?);
        let mut outputs = Vec::with_capacity(queries.div_ceil(rows));
        let mut start = 0;
        while start < queries {
            let len = rows.min(queries - start);
            let p = self.probabilities(&q.narrow(1, start, len)?, k, start)?;
            outputs.push(p.matmul(v)?);
            start += len;
        }
        Tensor::cat(&outputs, 1)
    }

    fn run(&self, inputs: [(Storage, &Layout); 3]) -> candle_core::Result<(Storage, Shape)> {
        let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
        let q = tensor_from_storage(s1, l1)?;
        let k = tensor_from_storage(s2, l2)?;
        let v = tensor_from_storage(s3, l3)?;
        into_storage(self.forward(&q, &k, &v)?)
    }
}

/// [`Sizes`] as the chunked kernel reads and splits them.
impl Sizes {
    fn of(q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Self> {
        let (groups, queries, depth) = q.dims3()?;
        let (k_groups, keys, k_depth) = k.dims3()?;
        let (v_groups, v_keys, value_depth) = v.dims3()?;
        if (k_groups, v_groups, k_depth, v_keys) != (groups, groups, depth, keys) {
            candle_core::bail!("attention: q {q:?}, k {k:?} and v {v:?} do not fit together")
        }
        Ok(Sizes {
            groups,
            queries,
            keys,
            depth,
            value_depth,
        })
    }

    fn rows_per_chunk(&self) -> usize {
        (CPU_CHUNK_ELEMENTS / self.keys.max(1)).clamp(1, self.queries.max(1))
    }

    /// Query rows `start..start + len` of one group's queries, as chunks of the kernel.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (rows, queries) = (self.rows_per_chunk(), self.queries);
        (0..queries)
            .step_by(rows)
            .map(move |start| (start, rows.min(queries - start)))
    }
}

/// The f32 CPU kernel: one (batch, head) pair per rayon task, query rows in chunks, matrix
/// products by `gemm` on the task's thread and the softmax in place, so no score matrix outlives
/// its chunk and no elementwise pass allocates.
impl ChunkedAttention {
    /// `dst = lhs · rhs` (or `+=` when `accumulate`) as [`Self::products`] says: f32 on the
    /// calling thread, or bfloat16 split over the pool.
    fn multiply(
        &self,
        dst: &mut [f32],
        dst_stride: usize,
        lhs: Operand,
        rhs: Operand,
        shape: (usize, usize, usize),
        accumulate: bool,
    ) {
        match self.products {
            Products::Bfloat16 => {
                let (lhs, rhs) = (Side::F32(lhs), Side::F32(rhs));
                bf16_products::product(dst, dst_stride, lhs, rhs, shape, accumulate)
            }
            Products::F32 => gemm_into(
                dst,
                dst_stride,
                lhs,
                rhs,
                shape,
                accumulate,
                Threads::Current,
            ),
        }
    }

    /// Writes `softmax(q_rows kᵀ · scale)` for the `len` query rows from `first` on into `p`
    /// (`[len, keys]`); causal rows end in zeros.
    fn probabilities_f32(
        &self,
        p: &mut [f32],
        q_rows: &[f32],
        k: &[f32],
        first: usize,
        len: usize,
        s: Sizes,
    ) {
        let q_rows = Operand::row_major(q_rows, s.depth);
        let k_t = Operand::transposed(k, s.depth);
        let shape = (len, s.keys, s.depth);
        self.multiply(p, s.keys, q_rows, k_t, shape, false);
        if !self.causal {
            softmax_rows(p, s.keys, self.scale as f32);
            return;
        }
        for (i, row) in (first..).zip(p.chunks_mut(s.keys)) {
            let (seen, masked) = row.split_at_mut((i + 1).min(s.keys));
            softmax_rows(seen, seen.len(), self.scale as f32);
            masked.fill(0.0);
        }
    }

    fn forward_f32(&self, q: &[f32], k: &[f32], v: &[f32], s: Sizes) -> Vec<f32> {
        let mut out = zeroed(s.groups * s.queries * s.value_depth);
        if out.is_empty() {
            return out;
        }
        if self.fused() {
            let (q, k, v) = (
                Rows::head_major(q, s.queries, s.depth),
                Rows::head_major(k, s.keys, s.depth),
                Rows::head_major(v, s.keys, s.value_depth),
            );
            fused_attention::forward(q, k, v, s, self.scale as f32, &mut out);
            return out;
        }
        out.par_chunks_mut(s.queries * s.value_depth)
            .enumerate()
            .for_each(|(g, out)| {
                let q = &q[g * s.queries * s.depth..(g + 1) * s.queries * s.depth];
                let k = &k[g * s.keys * s.depth..(g + 1) * s.keys * s.depth];
                let v = &v[g * s.keys * s.value_depth..(g + 1) * s.keys * s.value_depth];
                let mut scores = vec![0f32; s.rows_per_chunk() * s.keys];
                for (start, len) in s.chunks() {
                    let p = &mut scores[..len * s.keys];
                    self.probabilities_f32(p, &q[start * s.depth..], k, start, len, s);
                    let (p, v) = (
                        Operand::row_major(p, s.keys),
                        Operand::row_major(v, s.value_depth),
                    );
                    let dst = &mut out[start * s.value_depth..];
                    let shape = (len, s.value_depth, s.keys);
                    self.multiply(dst, s.value_depth, p, v, shape, false);
                }
            });
        out
    }

    /// Gradients of q, k and v from the gradient of the output, recomputing each chunk's
    /// probabilities: `dV = Pᵀ dO`, `dS = P ∘ (dO Vᵀ − rowsum(P ∘ dO Vᵀ)) · scale`,
    /// `dQ = dS K`, `dK = dSᵀ Q`.
    fn backward_f32(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        grad_out: &[f32],
        s: Sizes,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut grad_q = zeroed(s.groups * s.queries * s.depth);
        let mut grad_k = zeroed(s.groups * s.keys * s.depth);
        let mut grad_v = zeroed(s.groups * s.keys * s.value_depth);
        if grad_q.is_empty() || grad_k.is_empty() || grad_v.is_empty() {
            return (grad_q, grad_k, grad_v);
        }
        let scale = self.scale as f32;
        grad_q
            .par_chunks_mut(s.queries * s.depth)
            .zip(grad_k.par_chunks_mut(s.keys * s.depth))
            .zip(grad_v.par_chunks_mut(s.keys * s.value_depth))
            .enumerate()
            .for_each(|(g, ((grad_q, grad_k), grad_v))| {
                let q = &q[g * s.queries * s.depth..(g + 1) * s.queries * s.depth];
                let k = &k[g * s.keys * s.depth..(g + 1) * s.keys * s.depth];
                let v = &v[g * s.keys * s.value_depth..(g + 1) * s.keys * s.value_depth];
                let grad_out =
                    &grad_out[g * s.queries * s.value_depth..(g + 1) * s.queries * s.value_depth];
                let chunk = s.rows_per_chunk() * s.keys;
                let (mut probabilities, mut grad_scores) = (vec![0f32; chunk], vec![0f32; chunk]);
                for (start, len) in s.chunks() {
                    let p = &mut probabilities[..len * s.keys];
                    let ds = &mut grad_scores[..len * s.keys];
                    let q_rows = &q[start * s.depth..(start + len) * s.depth];
                    let go_rows = &grad_out[start * s.value_depth..(start + len) * s.value_depth];
                    self.probabilities_f32(p, q_rows, k, start, len, s);
                    let go = Operand::row_major(go_rows, s.value_depth);
                    let (m, n, inner) = (s.keys, s.value_depth, len);
                    let p_t = Operand::transposed(p, s.keys);
                    self.multiply(grad_v, n, p_t, go, (m, n, inner), true);
                    let v_t = Operand::transposed(v, s.value_depth);
                    let shape = (len, s.keys, s.value_depth);
                    self.multiply(ds, s.keys, go, v_t, shape, false);
                    for (p_row, ds_row) in p.chunks(s.keys).zip(ds.chunks_mut(s.keys)) {
                        let row_dot = dot(p_row, ds_row);
                        for (value, &prob) in ds_row.iter_mut().zip(p_row) {
                            *value = prob * (*value - row_dot) * scale;
                        }
                    }
                    let (ds_rows, ds_t) = (
                        Operand::row_major(ds, s.keys),
                        Operand::transposed(ds, s.keys),
                    );
                    let dst = &mut grad_q[start * s.depth..];
                    let shape = (len, s.depth, s.keys);
                    let k_rows = Operand::row_major(k, s.depth);
                    self.multiply(dst, s.depth, ds_rows, k_rows, shape, false);
                    let q_rows = Operand::row_major(q_rows, s.depth);
                    let shape = (s.keys, s.depth, len);
                    self.multiply(grad_k, s.depth, ds_t, q_rows, shape, true);
                }
            });
        (grad_q, grad_k, grad_v)
    }
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "chunked-attention"
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
        let elements = (
            f32_elements(s1, l1),
            f32_elements(s2, l2),
            f32_elements(s3, l3),
        );
        // Forced onto the generic path, the CPU runs the candle-op version below.
        if let ((Some(q), Some(k), Some(v)), true) = (elements, cpu_kernels(&Device::Cpu)) {
            let sizes = Sizes::of(l1.shape(), l2.shape(), l3.shape())?;
            let out = self.forward_f32(q, k, v, sizes);
            let shape = Shape::from((sizes.groups, sizes.queries, sizes.value_depth));
            return Ok((CpuStorage::F32(out), shape));
        }
        let inputs = [
            (Storage::Cpu(s1.clone()), l1),
            (Storage::Cpu(s2.clone()), l2),
            (Storage::Cpu(s3.clone()), l3),
        ];
        match self.run(inputs)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("chunked attention: device changed during the forward pass"),
        }
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let inputs = [
            (Storage::Cuda(s1.try_clone(l1)?), l1),
            (Storage::Cuda(s2.try_clone(l2)?), l2),
            (Storage::Cuda(s3.try_clone(l3)?), l3),
        ];
        match self.run(inputs)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("chunked attention: device changed during the forward pass"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && cpu_kernels(t.device());
        if [&q, &k, &v, grad].into_iter().all(f32_cpu) {
            let sizes = Sizes::of(q.shape(), k.shape(), v.shape())?;
            let (grad_q, grad_k, grad_v) =
                with_f32_slices([&q, &k, &v, &grad.detach()], |[qs, ks, vs, grads]| {
                    self.backward_f32((qs, ks, vs), grads, sizes)
                })?;
            let device = q.device();
            return Ok((
                Some(Tensor::from_vec(grad_q, q.shape(), device)?),
                Some(Tensor::from_vec(grad_k, k.shape(), device)?),
                Some(Tensor::from_vec(grad_v, v.shape(), device)?),
            ));
        }
        let (groups, queries, _) = q.dims3()?;
        let rows = self.rows(groups, k.dim(1)?);
        let mut grad_q = Vec::with_capacity(queries.div_ceil(rows));
        let mut grad_k = k.zeros_like()?;
        let mut grad_v = v.zeros_like()?;
        let mut start = 0;
        while start < queries {
            let len = rows.min(queries - start);
            let q_chunk = q.narrow(1, start, len)?;
            let g_chunk = grad.narrow(1, start, len)?;
            let p = self.probabilities(&q_chunk, &k, start)?;
            grad_v = (grad_v + p.t()?.matmul(&g_chunk)?)?;
            let grad_p = g_chunk.matmul(&v.t()?)?;
            let row_dot = (grad_p.to_dtype(DType::F32)? * p.to_dtype(DType::F32)?)?
                .sum_keepdim(D::Minus1)?
                .to_dtype(p.dtype())?;
            let grad_scores = (p * grad_p.broadcast_sub(&row_dot)?)?;
            grad_q.push((grad_scores.matmul(&k)? * self.scale)?);
            grad_k = (grad_k + (grad_scores.t()?.matmul(&q_chunk)? * self.scale)?)?;
            start += len;
        }
        Ok((Some(Tensor::cat(&grad_q, 1)?), Some(grad_k), Some(grad_v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::relative_difference;
    use candle_core::{Device, Var};

    /// [`multi_head_attention`] of token-major variables.
    fn heads_of(qkv: [&Var; 3], heads: usize, scale: f64, products: Products) -> Tensor {
        let [q, k, v] = qkv.map(Var::as_tensor);
        multi_head_attention(q, k, v, heads, scale, products).unwrap()
    }

    /// Plain candle ops, differentiated by candle's autograd.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(v).unwrap()
    }

    #[test]
    fn output_and_gradients_match_plain_attention() {
        // Self-attention long enough to span several chunks, and cross-attention with a short
        // context and a different value width.
        let device = Device::Cpu;
        for (groups, queries, keys, depth, value_depth) in [(2, 2000, 300, 8, 8), (2, 40, 7, 5, 3)]
        {
            let scale = 1.0 / (depth as f64).sqrt();
            let make = |rows, cols| {
                Var::from_tensor(&Tensor::randn(0f32, 1.5, (groups, rows, cols), &device).unwrap())
                    .unwrap()
            };
            let (q, k, v) = (
                make(queries, depth),
                make(keys, depth),
                make(keys, value_depth),
            );
            let weights =
                Tensor::randn(0f32, 1.0, (groups, queries, value_depth), &device).unwrap();
            let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
            let expected = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale);
            assert!(relative_difference(&ours, &expected) < 1e-5);
            let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
            let ours_grads = loss(&ours).backward().unwrap();
            let expected_grads = loss(&expected).backward().unwrap();
            for input in [&q, &k, &v] {
                let difference = relative_difference(
                    ours_grads.get(input.as_tensor()).unwrap(),
                    expected_grads.get(input.as_tensor()).unwrap(),
                );
                assert!(difference < 1e-5, "gradient off by {difference}");
            }
        }
    }

    #[test]
    fn causal_attention_matches_plain_attention_with_a_mask() {
        // 1100 tokens span several chunks of the kernel; the reference adds the text encoders'
        // additive mask (f32::MIN above the diagonal) before a plain softmax.
        let device = Device::Cpu;
        let (batch, heads, tokens, depth) = (2, 2, 1100, 4);
        let make = || {
            let t = Tensor::randn(0f32, 1.5, (batch, tokens, heads * depth), &device).unwrap();
            Var::from_tensor(&t).unwrap()
        };
        let (q, k, v) = (make(), make(), make());
        let scale = 0.5;
        let ours =
            causal_multi_head_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, scale)
                .unwrap();
        let split = |t: &Tensor| {
            t.reshape((batch, tokens, heads, depth))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch * heads, tokens, depth))
                .unwrap()
        };
        let mask: Vec<f32> = (0..tokens)
            .flat_map(|i| (0..tokens).map(move |j| if j > i { f32::MIN } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (tokens, tokens), &device).unwrap();
        let scores = (split(q.as_tensor())
            .matmul(&split(k.as_tensor()).t().unwrap())
            .unwrap()
            * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let expected = p
            .matmul(&split(v.as_tensor()))
            .unwrap()
            .reshape((batch, heads, tokens, depth))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((batch, tokens, heads * depth))
            .unwrap();
        assert!(relative_difference(&ours, &expected) < 1e-5);
        let unmasked = heads_of([&q, &k, &v], heads, scale, Products::F32);
        assert!(
            relative_difference(&unmasked, &expected) > 1e-2,
            "the mask matters"
        );
        let weights = Tensor::randn(0f32, 1.0, ours.shape(), &device).unwrap();
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let ours_grads = loss(&ours).backward().unwrap();
        let expected_grads = loss(&expected).backward().unwrap();
        for input in [&q, &k, &v] {
            let difference = relative_difference(
                ours_grads.get(input.as_tensor()).unwrap(),
                expected_grads.get(input.as_tensor()).unwrap(),
            );
            assert!(difference < 1e-5, "gradient off by {difference}");
        }
    }

    #[test]
    fn token_major_heads_match_head_major_attention() {
        // [B, N, H·d] inputs against the head split done by hand, with gradients; cross-attention
        // with a different value width.
        let device = Device::Cpu;
        let (batch, heads, queries, keys, depth, value_depth) = (2, 3, 37, 11, 4, 5);
        let make = |rows, width| {
            Var::from_tensor(&Tensor::randn(0f32, 1.5, (batch, rows, width), &device).unwrap())
                .unwrap()
        };
        let (q, k, v) = (
            make(queries, heads * depth),
            make(keys, heads * depth),
            make(keys, heads * value_depth),
        );
        let scale = 0.4;
        let ours = heads_of([&q, &k, &v], heads, scale, Products::F32);
        let split = |t: &Tensor| {
            let (_, len, width) = t.dims3().unwrap();
            t.reshape((batch, len, heads, width / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch * heads, len, width / heads))
                .unwrap()
        };
        let expected = reference(
            &split(q.as_tensor()),
            &split(k.as_tensor()),
            &split(v.as_tensor()),
            scale,
        )
        .reshape((batch, heads, queries, value_depth))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((batch, queries, heads * value_depth))
        .unwrap();
        assert!(relative_difference(&ours, &expected) < 1e-5);
        let weights = Tensor::randn(0f32, 1.0, ours.shape(), &device).unwrap();
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let ours_grads = loss(&ours).backward().unwrap();
        let expected_grads = loss(&expected).backward().unwrap();
        for input in [&q, &k, &v] {
            let difference = relative_difference(
                ours_grads.get(input.as_tensor()).unwrap(),
                expected_grads.get(input.as_tensor()).unwrap(),
            );
            assert!(difference < 1e-5, "gradient off by {difference}");
        }
    }

    #[test]
    fn bfloat16_products_round_the_inputs_of_each_product() {
        if !bf16_products::available() {
            eprintln!("no AVX512-BF16 on this CPU: attention multiplies in f32");
            return;
        }
        let device = Device::Cpu;
        let (heads, queries, keys, depth) = (2, 70, 40, 32);
        // Fixed values, so that the rare probability that rounds the other way (our exp and
        // candle's differ in the last bits) is the same in every run.
        let make = |rows: usize, seed: f32| {
            let values: Vec<f32> = (0..rows * heads * depth)
                .map(|i| (i as f32 * 0.618_034 + seed).sin() * 1.5)
                .collect();
            let t = Tensor::from_vec(values, (1, rows, heads * depth), &device).unwrap();
            Var::from_tensor(&t).unwrap()
        };
        let (q, k, v) = (make(queries, 0.1), make(keys, 0.2), make(keys, 0.3));
        let scale = 1.0 / (depth as f64).sqrt();
        let run = |products| heads_of([&q, &k, &v], heads, scale, products);
        let (ours, f32_out) = (run(Products::Bfloat16), run(Products::F32));
        // The same attention with every product's inputs rounded to bfloat16: q and k for the
        // scores, the probabilities and v for the output.
        let rounded = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let split = |t: &Tensor| {
            let (_, len, width) = t.dims3().unwrap();
            t.reshape((len, heads, width / heads))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q_h, k_h, v_h) = (
            split(&rounded(q.as_tensor())),
            split(&rounded(k.as_tensor())),
            split(&rounded(v.as_tensor())),
        );
        let scores = (q_h.matmul(&k_h.t().unwrap()).unwrap() * scale).unwrap();
        let p = rounded(&candle_nn::ops::softmax(&scores, D::Minus1).unwrap());
        let expected = p
            .matmul(&v_h)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((1, queries, heads * depth))
            .unwrap();
        // Mean differences relative to the mean magnitude: a probability rounded the other way
        // moves a few outputs by its last bit; f32 products move every output.
        let mean_off = |a: &Tensor, b: &Tensor| {
            let difference = (a - b).unwrap().abs().unwrap().mean_all().unwrap();
            let magnitude = b.abs().unwrap().mean_all().unwrap();
            (difference / magnitude)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let (off, f32_off) = (mean_off(&ours, &expected), mean_off(&f32_out, &expected));
        assert!(off < 2e-5 && f32_off > 10.0 * off, "{off} {f32_off}");
        // Gradients stay within bfloat16 precision of the f32 attention's (on average: where
        // the softmax's gradient cancels, single elements move by a few percent).
        let weights = make(queries, 0.4).as_tensor().clone();
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let (ours_grads, f32_grads) = (
            loss(&ours).backward().unwrap(),
            loss(&f32_out).backward().unwrap(),
        );
        for input in [&q, &k, &v] {
            let difference = mean_off(
                ours_grads.get(input.as_tensor()).unwrap(),
                f32_grads.get(input.as_tensor()).unwrap(),
            );
            assert!(difference < 1e-2, "gradient off by {difference}");
        }
    }
}
