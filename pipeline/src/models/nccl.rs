//! Data-parallel gradient sums on NVIDIA GPUs over NCCL (feature `nccl`): the ranks meet over
//! TCP ([`TcpGroup`]), rank 0 creates the NCCL id and sends it to the others, and tensors on the
//! GPU are summed by `ncclAllReduce` without passing through host memory. Host values (the
//! agreement checks, the stop flag) still go over TCP.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, Device, Layout, Shape, Tensor};

use crate::infra::collective::{self, Collective, Patience, TcpGroup};
use crate::{Error, Result};

/// An NCCL communicator; NCCL calls on it are made by one thread at a time (the mutex).
struct Communicator(Comm);

// SAFETY: the communicator is only used behind a mutex, by one thread at a time, which NCCL
// allows for a communicator.
unsafe impl Send for Communicator {}

/// The ranks of a run on GPUs: TCP for host values, NCCL for GPU tensors.
pub struct NcclGroup {
    tcp: TcpGroup,
    comm: Arc<Mutex<Communicator>>,
}

impl NcclGroup {
    /// Sets up NCCL between the ranks of `tcp`, on `device` (this rank's GPU).
    pub fn new(tcp: TcpGroup, device: &Device) -> Result<NcclGroup> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::Usage(
                "NCCL sums gradients on GPUs: use --device cuda".into(),
            ));
        };
        let failed = |e| Error::Group(format!("rank {}: NCCL: {e:?}", tcp.rank()));
        let mut id_bytes = vec![0f32; 128];
        let own_id = if collective::is_main(&tcp) {
            let id = Id::new().map_err(failed)?;
            for (value, byte) in id_bytes.iter_mut().zip(id.internal()) {
                *value = *byte as u8 as f32;
            }
            Some(id)
        } else {
            None
        };
        tcp.all_reduce_sum(&mut id_bytes, Patience::Timeout)?;
        let id = own_id.unwrap_or_else(|| {
            Id::uninit(std::array::from_fn(|i| {
                id_bytes[i] as u8 as std::ffi::c_char
            }))
        });
        let comm = Comm::from_rank(cuda.cuda_stream(), tcp.rank(), tcp.world_size(), id)
            .map_err(failed)?;
        Ok(NcclGroup {
            tcp,
            comm: Arc::new(Mutex::new(Communicator(comm))),
        })
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }

    fn all_reduce_sum(&self, values: &mut [f32], patience: Patience) -> Result<()> {
        self.tcp.all_reduce_sum(values, patience)
    }

    fn all_reduce_tensor_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        if !tensor.device().is_cuda() {
            let mut values = tensor.to_vec1::<f32>()?;
            self.tcp.all_reduce_sum(&mut values, Patience::Timeout)?;
            return Ok(Tensor::from_vec(values, tensor.dims(), tensor.device())?);
        }
        let op = AllReduce {
            comm: self.comm.clone(),
        };
        Ok(tensor.contiguous()?.apply_op1_no_bwd(&op)?)
    }
}

/// `ncclAllReduce` (sum) of a contiguous f32 tensor, as a candle op.
struct AllReduce {
    comm: Arc<Mutex<Communicator>>,
}

impl candle_core::CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("nccl-all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let count = layout.shape().elem_count();
        let source = storage.as_cuda_slice::<f32>()?;
        let source = match layout.contiguous_offsets() {
            Some((0, end)) if end == count => source.slice(0..count),
            _ => candle_core::bail!("nccl-all-reduce: the tensor must be contiguous"),
        };
        let device: CudaDevice = storage.device().clone();
        // SAFETY: every element is written by the all-reduce before it is read.
        let mut sum = unsafe { device.alloc::<f32>(count) }?;
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        comm.0
            .all_reduce(&source, &mut sum, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        comm.0.stream().synchronize().w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(sum, device),
            layout.shape().clone(),
        ))
    }
}
