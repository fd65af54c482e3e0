//! The text-encoder output cache file `<stem>_te_outputs.npz` (written by `cache-text-encoder`,
//! read by training and lint-dataset): layout in docs/formats.md#text-encoder-cache.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::formats::model_family::ModelFamily;
use crate::formats::npz::{stored_key, NpzReader};
use crate::{Error, Result};

/// Suffix of the cache file that replaces an image's extension (sd-scripts' name).
pub const CACHE_SUFFIX: &str = "_te_outputs.npz";

/// Names of the conditioning arrays of a cache file of `family`, in the order
/// [`read_cache_file`] returns them.
pub fn output_names(family: ModelFamily) -> &'static [&'static str] {
    match family {
        ModelFamily::Sdxl => &["hidden_state1", "hidden_state2", "pool2"],
        _ => &["hidden_state"],
    }
}

/// A conditioning width with the text encoders that produce it (`768 (SD1.x: CLIP ViT-L)`), so
/// that a message about a cache of the wrong width shows which model it came from.
pub fn describe_width(width: usize) -> String {
    let models = match width {
        768 => "SD1.x: CLIP ViT-L",
        1024 => "SD2.x: OpenCLIP ViT-H",
        1280 => "SDXL's second text encoder alone: OpenCLIP ViT-bigG",
        2048 => "SDXL: CLIP ViT-L + OpenCLIP ViT-bigG",
        _ => "not the width of an SD1.x, SD2.x or SDXL text encoder",
    };
    format!("{width} ({models})")
}

/// The text-encoder outputs of one cache file, as training consumes them.
pub struct CachedTextOutputs {
    /// The plain caption's arrays, named and ordered as [`output_names`] (float32 or float16).
    pub arrays: Vec<Tensor>,
    /// With `--variants N`: the same arrays with a leading axis of N.
    pub variants: Option<Vec<Tensor>>,
    /// The stored content key, when the file has one (files written by sd-scripts do not).
    pub key: Option<String>,
}

/// Reads a `<stem>_te_outputs.npz` written by `cache-text-encoder` (or, for SDXL, by sd-scripts):
/// float16 arrays stay float16, everything else is read as float32.
pub fn read_cache_file(
    path: &Path,
    family: ModelFamily,
    device: &Device,
) -> Result<CachedTextOutputs> {
    let mut npz = NpzReader::open(path)?;
    let has_variants = npz.contains(&format!("variants_{}", output_names(family)[0]));
    let key = stored_key(&mut npz);
    let mut read = |name: &str| -> Result<Tensor> {
        let tensor = if npz.dtype(name)? == "<f2" {
            let (values, shape) = npz.read_f16(name)?;
            Tensor::from_vec(values, shape, device)
        } else {
            let (values, shape) = npz.read_f32(name)?;
            Tensor::from_vec(values, shape, device)
        };
        tensor.map_err(|e| Error::Model(format!("{}: {name}: {e}", path.display())))
    };
    let arrays = output_names(family)
        .iter()
        .map(|name| read(name))
        .collect::<Result<Vec<_>>>()?;
    let variants = if has_variants {
        Some(
            output_names(family)
                .iter()
                .map(|name| read(&format!("variants_{name}")))
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    Ok(CachedTextOutputs {
        arrays,
        variants,
        key,
    })
}
