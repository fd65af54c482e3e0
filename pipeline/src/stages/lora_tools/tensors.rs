//! Whole `.safetensors` files as named f32 arrays: what the LoRA tools read, change and write
//! (sd-scripts' `load_file` / `save_file` with a dtype conversion on each side).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::View;
use safetensors::Dtype;

use crate::{Error, Result};

/// A precision flag of sd-scripts' scripts (`float`, `fp16`, `bf16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// float32.
    Float,
    /// float16.
    Fp16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// The stored dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            Precision::Float => Dtype::F32,
            Precision::Fp16 => Dtype::F16,
            Precision::Bf16 => Dtype::BF16,
        }
    }
}

/// One tensor: float values held as f32 (with the dtype they are written in), or the raw bytes
/// of a tensor of another type (integers), kept as they are.
#[derive(Debug, Clone)]
pub struct Array {
    /// Shape.
    pub shape: Vec<usize>,
    /// Dtype written on save.
    pub dtype: Dtype,
    /// Values (floats and integers up to 2^24 exactly), row-major.
    pub data: Vec<f32>,
    /// Original bytes of a non-float tensor (written back unchanged unless `data` is used).
    raw: Option<Vec<u8>>,
}

impl Array {
    /// A float tensor.
    pub fn new(shape: Vec<usize>, data: Vec<f32>, dtype: Dtype) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self {
            shape,
            dtype,
            data,
            raw: None,
        }
    }

    /// A 0-dimensional float tensor.
    pub fn scalar(value: f32, dtype: Dtype) -> Self {
        Self::new(Vec::new(), vec![value], dtype)
    }

    /// Whether the tensor holds floats.
    pub fn is_float(&self) -> bool {
        is_float(self.dtype)
    }

    /// The first value (alpha tensors).
    pub fn item(&self) -> f32 {
        self.data.first().copied().unwrap_or(0.0)
    }

    /// Values rounded to `dtype` and the array marked to be written in it (no-op for non-float
    /// tensors).
    pub fn cast(&mut self, dtype: Dtype) {
        if !self.is_float() || !is_float(dtype) {
            return;
        }
        round_to(dtype, &mut self.data);
        self.dtype = dtype;
    }

    /// Rows x columns of the weight as a matrix: `[out, in * kh * kw]`.
    pub fn matrix_dims(&self) -> (usize, usize) {
        let rows = self.shape.first().copied().unwrap_or(1);
        (rows, self.data.len() / rows.max(1))
    }

    fn bytes(&self) -> Vec<u8> {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        match self.dtype {
            Dtype::F32 => self.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => self
                .data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => self
                .data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::F64 => self
                .data
                .iter()
                .flat_map(|v| (*v as f64).to_le_bytes())
                .collect(),
            Dtype::I64 => self
                .data
                .iter()
                .flat_map(|v| (*v as i64).to_le_bytes())
                .collect(),
            _ => self
                .data
                .iter()
                .flat_map(|v| (*v as i32).to_le_bytes())
                .collect(),
        }
    }
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Rounds `values` to the precision of `dtype` (f16/bf16; nothing for f32).
pub fn round_to(dtype: Dtype, values: &mut [f32]) {
    match dtype {
        Dtype::F16 => values
            .iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
        Dtype::BF16 => values
            .iter_mut()
            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        _ => {}
    }
}

/// All tensors and the header metadata of a `.safetensors` file.
#[derive(Debug, Clone, Default)]
pub struct TensorFile {
    /// Tensors by name.
    pub tensors: BTreeMap<String, Array>,
    /// Header `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Reads every tensor of `path`; `what` names the expected content in messages.
    pub fn read(path: &Path, what: &str) -> Result<Self> {
        refuse_pickle(path, what)?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |m: String| Error::bad_file(path, m);
        let loaded = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            bad(format!(
                "not a safetensors file ({e}); pass {what} in .safetensors format"
            ))
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("unreadable safetensors header ({e})")))?;
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut tensors = BTreeMap::new();
        for (name, view) in loaded.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let (values, raw): (Vec<f32>, Option<Vec<u8>>) = match view.dtype() {
                Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect(),
                    None,
                ),
                Dtype::F16 => (
                    data.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    None,
                ),
                Dtype::BF16 => (
                    data.chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    None,
                ),
                Dtype::F64 => (
                    data.chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                        .collect(),
                    None,
                ),
                Dtype::I64 => (
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                        .collect(),
                    Some(data.to_vec()),
                ),
                Dtype::I32 => (
                    data.chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32)
                        .collect(),
                    Some(data.to_vec()),
                ),
                Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::I16 | Dtype::U16 | Dtype::U32 => {
                    (Vec::new(), Some(data.to_vec()))
                }
                other => {
                    return Err(bad(format!(
                        "tensor {name} has dtype {other:?}; expected F32/F16/BF16 weights"
                    )))
                }
            };
            tensors.insert(
                name,
                Array {
                    shape,
                    dtype: view.dtype(),
                    data: values,
                    raw,
                },
            );
        }
        Ok(Self { tensors, metadata })
    }

    /// The file's bytes; with `hashes`, the two sd-webui hashes are added to the metadata
    /// (sd-scripts' `precalculate_safetensors_hashes`: over the file written with only the
    /// `ss_*` metadata).
    pub fn to_bytes(&self, hashes: bool) -> Result<Vec<u8>> {
        let views: Vec<(String, Raw)> = self
            .tensors
            .iter()
            .map(|(name, a)| {
                (
                    name.clone(),
                    Raw {
                        dtype: a.dtype,
                        shape: a.shape.clone(),
                        bytes: a.bytes(),
                    },
                )
            })
            .collect();
        let serialize = |meta: HashMap<String, String>| {
            safetensors::serialize(
                views.iter().map(|(n, v)| (n.as_str(), v)),
                (!meta.is_empty()).then_some(meta),
            )
            .map_err(|e| Error::Model(format!("cannot serialise tensors: {e}")))
        };
        let mut metadata: HashMap<String, String> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if hashes {
            let ss_only: HashMap<String, String> = metadata
                .iter()
                .filter(|(k, _)| k.starts_with("ss_"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let hashing = serialize(ss_only)?;
            let header_len =
                u64::from_le_bytes(hashing[..8].try_into().expect("8-byte header")) as usize;
            let model_hash = crate::networks::lora::sha256_hex(&hashing[8 + header_len..]);
            let legacy = if hashing.len() > 0x100000 {
                &hashing[0x100000..hashing.len().min(0x110000)]
            } else {
                &[][..]
            };
            let legacy_hash = crate::networks::lora::sha256_hex(legacy)[..8].to_string();
            metadata.insert("sshs_model_hash".into(), model_hash);
            metadata.insert("sshs_legacy_hash".into(), legacy_hash);
        }
        serialize(metadata)
    }

    /// Writes the file atomically (see [`TensorFile::to_bytes`]).
    pub fn write(&self, path: &Path, hashes: bool) -> Result<()> {
        let bytes = self.to_bytes(hashes)?;
        crate::infra::fsio::write_atomic(path, &bytes)
    }
}

/// PyTorch pickle files are refused with advice (the tools read `.safetensors` only).
fn refuse_pickle(path: &Path, what: &str) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
        return Err(Error::bad_file(
            path,
            format!(
                "a PyTorch pickle file; pass {what} in .safetensors format (convert it first, \
                 e.g. with sd-scripts' tools/convert_diffusers20_original_sd.py)"
            ),
        ));
    }
    Ok(())
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Output paths must end in `.safetensors` (pickle output is not written).
pub fn check_output(path: &Path) -> Result<()> {
    let ok = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !ok {
        return Err(Error::Usage(format!(
            "--save_to {}: give a .safetensors file name (lorakit writes no pickle files)",
            path.display()
        )));
    }
    crate::infra::fsio::check_writable(path)
}
