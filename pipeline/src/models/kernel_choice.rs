//! Which implementation a custom op runs: its CPU kernel for CPU tensors, else its
//! device-generic path, built only from candle tensor ops (differentiated by candle's autograd or
//! by candle ops in the op's backward pass). CUDA tensors take the generic path; the tests force
//! it on the CPU ([`with_generic_ops`]) to check it against the kernels, forward and backward
//! (`models::device_parity`).

use std::cell::Cell;

use candle_core::Device;

thread_local! {
    /// Set while [`with_generic_ops`] runs on this thread.
    static FORCED_GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Whether tensors on `device` take the CPU kernels (the generic path otherwise).
pub(crate) fn cpu_kernels(device: &Device) -> bool {
    device.is_cpu() && !FORCED_GENERIC.with(Cell::get)
}

/// Runs `f` (forward and backward passes) with every op on its device-generic path, CPU tensors
/// included, on this thread.
#[cfg(test)]
pub(crate) fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED_GENERIC.with(|forced| forced.set(self.0));
        }
    }
    let _restore = Restore(FORCED_GENERIC.with(|forced| forced.replace(true)));
    f()
}
