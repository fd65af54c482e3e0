//! kohya LoRA `.safetensors` files: reading their modules and metadata, and writing the bytes
//! with the sd-webui hashes (docs/kohya-compat.md#lora-tensors-and-alpha,
//! docs/kohya-compat.md#lora-file-hashes).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::Alpha;
use crate::{Error, Result};

/// One module as read from a file.
#[derive(Debug, Clone)]
pub(crate) struct FileModule {
    pub(crate) down: Tensor,
    pub(crate) up: Tensor,
    pub(crate) alpha: Option<Alpha>,
}

/// `lora_down`, `lora_up` and alpha of one module while a file is read.
type PartialModule = (Option<Tensor>, Option<Tensor>, Option<Alpha>);

/// The modules and metadata of a kohya LoRA `.safetensors` file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub(crate) modules: BTreeMap<String, FileModule>,
    /// Header `__metadata__`.
    pub metadata: HashMap<String, String>,
}

impl LoraFile {
    /// Reads a LoRA file (any of F32/F16/BF16 weights, alpha of any float type or I64).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| Error::BadFile {
            path: path.to_path_buf(),
            message,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            bad(format!(
                "not a safetensors file ({e}); pass a LoRA .safetensors file"
            ))
        })?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read tensors ({e})")))?;
        let mut parts: BTreeMap<String, PartialModule> = BTreeMap::new();
        for (key, tensor) in tensors {
            let (module, field) = if let Some(m) = key.strip_suffix(".lora_down.weight") {
                (m, 0)
            } else if let Some(m) = key.strip_suffix(".lora_up.weight") {
                (m, 1)
            } else if let Some(m) = key.strip_suffix(".alpha") {
                (m, 2)
            } else {
                return Err(bad(format!(
                    "unexpected key {key}: not a kohya LoRA (lora_down/lora_up/alpha) file"
                )));
            };
            let slot = parts.entry(module.to_string()).or_default();
            match field {
                0 => slot.0 = Some(tensor),
                1 => slot.1 = Some(tensor),
                _ => {
                    let alpha = if tensor.dtype() == DType::I64 {
                        Alpha::Int(tensor.to_scalar::<i64>()?)
                    } else {
                        Alpha::Float(tensor.to_dtype(DType::F32)?.to_scalar::<f32>()?)
                    };
                    slot.2 = Some(alpha);
                }
            }
        }
        let mut modules = BTreeMap::new();
        for (name, (down, up, alpha)) in parts {
            match (down, up) {
                (Some(down), Some(up)) => {
                    modules.insert(name, FileModule { down, up, alpha });
                }
                _ => {
                    return Err(bad(format!(
                        "module {name} lacks lora_down or lora_up weights"
                    )))
                }
            }
        }
        Ok(Self { modules, metadata })
    }

    /// Module names in the file.
    pub fn module_names(&self) -> impl Iterator<Item = &String> {
        self.modules.keys()
    }
}

/// Safetensors bytes of `tensors` with `metadata` plus the two sd-webui hashes.
pub(crate) fn serialize_with_hashes(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(name, t)| (name.as_str(), t)).collect();
    let ss_only: HashMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let hashing =
        safetensors::serialize(views.iter().copied(), Some(ss_only)).map_err(|e| e.to_string())?;
    let header_len =
        u64::from_le_bytes(hashing[..8].try_into().expect("8-byte header length")) as usize;
    let model_hash = sha256_hex(&hashing[8 + header_len..]);
    let legacy_slice = if hashing.len() > 0x100000 {
        &hashing[0x100000..hashing.len().min(0x110000)]
    } else {
        &[][..]
    };
    let legacy_hash = sha256_hex(legacy_slice)[..8].to_string();
    let mut full: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    full.insert("sshs_model_hash".into(), model_hash);
    full.insert("sshs_legacy_hash".into(), legacy_hash);
    safetensors::serialize(views.iter().copied(), Some(full)).map_err(|e| e.to_string())
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
