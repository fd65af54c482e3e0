//! Helpers shared by the unit tests: the fixture folder and tensor comparisons.

use std::path::PathBuf;

use candle_core::Tensor;

/// The bundled fixtures (`tests/fixtures` at the repository root).
pub(crate) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Largest absolute elementwise difference between `a` and `b`.
pub(crate) fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// [`max_difference`] relative to the largest magnitude of `reference`.
pub(crate) fn relative_difference(ours: &Tensor, reference: &Tensor) -> f32 {
    let peak = reference.abs().unwrap().max_all().unwrap();
    max_difference(ours, reference) / peak.to_scalar::<f32>().unwrap()
}
