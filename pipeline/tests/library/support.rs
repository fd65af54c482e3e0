//! Helpers shared by the library-level tests.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lorakit_pipeline::formats::npz::NpzReader;

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

/// Array `name` of the `.npz` file `path`, read with the project's reader, as a CPU float32
/// tensor (integer arrays converted).
pub fn npz_tensor(path: &Path, name: &str) -> Tensor {
    let mut npz = NpzReader::open(path).unwrap();
    if npz.dtype(name).unwrap() == "<i8" {
        let (values, shape) = npz.read_i64(name).unwrap();
        let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
        return Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
    }
    npz.read_tensor_f32(name, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()))
}
