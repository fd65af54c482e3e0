//! Helpers shared by the library-level tests.

use std::path::PathBuf;

use candle_core::Tensor;

/// The bundled fixtures (`tests/fixtures` at the repository root).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Largest absolute elementwise difference of two tensors of the same shape.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
