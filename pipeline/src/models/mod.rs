//! Stable Diffusion networks (candle) and the checkpoint loader they share.
//!
//! `checkpoint` opens weights in every supported layout; each network module owns the mapping
//! from its diffusers/HF tensor names to the original LDM names.

pub mod adapter;
pub mod attention;
pub(crate) mod bf16_products;
pub mod blip;
pub mod checkpoint;
pub mod clip;
pub mod conv;
#[cfg(test)]
pub(crate) mod device_parity;
pub mod frozen;
pub(crate) mod fused_attention;
pub mod geglu;
pub(crate) mod kernel_choice;
pub(crate) mod kernels;
pub mod low_rank;
#[cfg(feature = "nccl")]
pub mod nccl;
pub(crate) mod norm;
pub mod precision;
pub mod recompute;
pub mod samplers;
pub mod text_encoders;
pub mod trainable_conv;
pub mod unet;
pub mod vae;
pub mod winograd;

pub use checkpoint::{Checkpoint, Component, ModelFamily};

/// `--device`: where a tool's models compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ComputeDevice {
    /// The CPU kernels.
    #[default]
    Cpu,
    /// An NVIDIA GPU through candle's CUDA backend (a build with the `cuda` feature).
    Cuda,
}

impl ComputeDevice {
    /// The candle device: the CPU, or GPU `ordinal`.
    pub fn open(self, ordinal: usize) -> crate::Result<candle_core::Device> {
        match self {
            ComputeDevice::Cpu => Ok(candle_core::Device::Cpu),
            ComputeDevice::Cuda => candle_core::Device::new_cuda(ordinal).map_err(|e| {
                crate::Error::Usage(format!("--device cuda: {e} (build with --features cuda)"))
            }),
        }
    }
}

/// Prepares this process for running networks on the CPU. Call it once, before candle runs an
/// operation and while no other thread reads the environment.
///
/// - The C allocator keeps freed memory for reuse instead of handing large blocks back to the
///   system. Networks allocate and free activations of up to hundreds of MB per layer; with
///   glibc's defaults each is a fresh mapping whose pages the kernel zeroes again (a quarter of
///   the VAE's CPU time at 512x512, half of a training step's). No effect outside Linux/glibc.
/// - candle's element-wise worker threads spin 200 times instead of 25,000 waiting for the next
///   operation before they sleep: during the matrix products, which run on the rayon pool, that
///   spinning took a core's time from them (a tenth of a full-size SDXL training step's CPU
///   time). The user's own `CANDLE_BARRIER_POOL_SPIN_LIMIT` is kept.
pub fn tune_process_for_models() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; memory already mapped is still
    // released correctly when freed.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if std::env::var_os(SPIN_LIMIT_VARIABLE).is_none() {
        std::env::set_var(SPIN_LIMIT_VARIABLE, "200");
    }
}

/// [`tune_process_for_models`] for training, and candle's element-wise operations run on the
/// calling thread alone (`CANDLE_NUM_THREADS=1`, unless the user set it). A training step's
/// matrix products keep the rayon pool busy; between them the backward pass's gradient sums, on
/// candle's own worker thread as well, made that thread, the pool's and the caller's wait on
/// each other: a full-size SDXL step at 512² took 18.8 and 19.2 s that way, 18.2 and 18.1 s with
/// one thread.
pub fn tune_process_for_training() {
    tune_process_for_models();
    if std::env::var_os(CANDLE_THREADS_VARIABLE).is_none() {
        std::env::set_var(CANDLE_THREADS_VARIABLE, "1");
    }
}

/// How many times candle's idle worker threads spin before they sleep.
const SPIN_LIMIT_VARIABLE: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// How many threads candle's element-wise operations use (the caller included).
const CANDLE_THREADS_VARIABLE: &str = "CANDLE_NUM_THREADS";
