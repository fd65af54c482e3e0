//! Memory-efficient scaled dot-product attention with an exact backward pass.
//!
//! The attention matrix `softmax(q k^T * scale)` is never kept for the backward pass: the forward
//! computes it in chunks of query rows and keeps only `q`, `k`, `v` and the output; the backward
//! recomputes each chunk. Peak memory for the scores drops from `heads x N x N` per layer for the
//! whole forward pass to one chunk at a time, which is what makes training at 64x64 latents fit.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Storage, Tensor, D};

use crate::models::frozen::{dense, into_storage, tensor_from_storage};

/// Score elements computed per chunk (query rows are grouped to stay near this size).
const CHUNK_ELEMENTS: usize = 1 << 22;

/// `softmax(q k^T * scale) v` for `q` `[G, Nq, d]`, `k`/`v` `[G, Nk, d]` (G = batch x heads).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    dense(q)?.apply_op3(&dense(k)?, &dense(v)?, ChunkedAttention { scale })
}

#[derive(Debug, Clone, Copy)]
struct ChunkedAttention {
    scale: f64,
}

impl ChunkedAttention {
    /// Query rows per chunk.
    fn rows(&self, groups: usize, keys: usize) -> usize {
        (CHUNK_ELEMENTS / (groups * keys).max(1)).max(1)
    }

    fn probabilities(&self, q_chunk: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        let scores = (q_chunk.matmul(&k.t()?)? * self.scale)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let (groups, queries, _) = q.dims3()?;
        let rows = self.rows(groups, k.dim(1)?);
        let mut outputs = Vec::with_capacity(queries.div_ceil(rows));
        let mut start = 0;
        while start < queries {
            let len = rows.min(queries - start);
            let p = self.probabilities(&q.narrow(1, start, len)?, k)?;
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
            let p = self.probabilities(&q_chunk, &k)?;
            grad_v = (grad_v + p.t()?.matmul(&g_chunk)?)?;
            let grad_p = g_chunk.matmul(&v.t()?)?;
            let row_dot = (&grad_p * &p)?.sum_keepdim(D::Minus1)?;
            let grad_scores = (p * grad_p.broadcast_sub(&row_dot)?)?;
            grad_q.push((grad_scores.matmul(&k)? * self.scale)?);
            grad_k = (grad_k + (grad_scores.t()?.matmul(&q_chunk)? * self.scale)?)?;
            start += len;
        }
        Ok((Some(Tensor::cat(&grad_q, 1)?), Some(grad_k), Some(grad_v)))
    }
}
