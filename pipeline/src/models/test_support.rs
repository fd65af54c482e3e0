//! Comparisons shared by the unit tests of the hand-written layers.

use candle_core::Tensor;

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
