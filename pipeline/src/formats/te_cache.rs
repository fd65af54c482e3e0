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

/// What a text-encoder cache file must hold; see [`read_cache_file`].
#[derive(Debug, Clone, Copy)]
pub struct TeCacheSpec {
    /// The family, which names the arrays ([`output_names`]).
    pub family: ModelFamily,
    /// Positions of every hidden state (`75n + 2`); `None` accepts any `75n + 2`, the same in
    /// every array of the file.
    pub sequence_len: Option<usize>,
    /// The stored dtype (`<f4` or `<f2`); `None` accepts either.
    pub dtype: Option<&'static str>,
    /// `Some(n)`: exactly `n` caption variants stored (`variants_<array>` with a leading axis of
    /// `n`; none for 0); `None`: whatever the file holds.
    pub variants: Option<usize>,
}

impl TeCacheSpec {
    /// Any valid cache of `family` (what training accepts, sd-scripts' files included).
    pub fn any(family: ModelFamily) -> Self {
        TeCacheSpec {
            family,
            sequence_len: None,
            dtype: None,
            variants: None,
        }
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

/// Reads a `<stem>_te_outputs.npz` written by `cache-text-encoder` (or, for SDXL, by
/// sd-scripts) after checking it against `spec`: every array present with a float dtype,
/// hidden states `[75n+2, D]` (one length), `pool2` `[D]`, variants `[N, ...]` of the plain
/// shapes (all from the headers, before any data is read), then every value finite. Float16
/// arrays stay float16, everything else is read as float32. This is the one check of the
/// format: `cache-text-encoder` re-encodes a file that fails it, training refuses it.
pub fn read_cache_file(
    path: &Path,
    spec: &TeCacheSpec,
    device: &Device,
) -> Result<CachedTextOutputs> {
    let bad = |message: String| {
        Error::bad_file(
            path,
            format!("{message}; re-run cache-text-encoder (it replaces such files)"),
        )
    };
    let mut npz = NpzReader::open(path)?;
    let names = output_names(spec.family);
    let variant_count = match spec.variants {
        Some(n) => n,
        None if npz.contains(&format!("variants_{}", names[0])) => npz
            .shape(&format!("variants_{}", names[0]))?
            .first()
            .copied()
            .unwrap_or(0),
        None => 0,
    };
    let mut sequence_len = spec.sequence_len;
    let mut checked = Vec::new();
    for name in names {
        if !npz.contains(name) {
            return Err(bad(format!("has no array `{name}`")));
        }
        let shape = npz.shape(name)?;
        let ok = match (name.starts_with("hidden_state"), shape.as_slice()) {
            (true, &[len, width]) => {
                let expected = *sequence_len.get_or_insert(len);
                len == expected && len % 75 == 2 && width > 0
            }
            (false, &[width]) => width > 0,
            _ => false,
        };
        if !ok {
            let expected = if name.starts_with("hidden_state") {
                format!(
                    "[{}, D]",
                    sequence_len.map_or("75n+2".into(), |l| l.to_string())
                )
            } else {
                "[D]".into()
            };
            return Err(bad(format!(
                "{name} has shape {shape:?}, expected {expected}"
            )));
        }
        checked.push((name.to_string(), shape.clone()));
        let variant = format!("variants_{name}");
        if variant_count > 0 {
            let mut stacked = vec![variant_count];
            stacked.extend(&shape);
            let found = if npz.contains(&variant) {
                Some(npz.shape(&variant)?)
            } else {
                None
            };
            if found.as_ref() != Some(&stacked) {
                return Err(bad(format!(
                    "{variant} has shape {found:?}, expected {stacked:?}"
                )));
            }
            checked.push((variant, stacked));
        } else if npz.contains(&variant) {
            return Err(bad(format!("holds {variant} but no variants are expected")));
        }
    }
    let mut tensors = Vec::with_capacity(checked.len());
    for (name, _) in &checked {
        let dtype = npz.dtype(name)?;
        let allowed = match spec.dtype {
            Some(wanted) => dtype == wanted,
            None => dtype == "<f4" || dtype == "<f2",
        };
        if !allowed {
            let wanted = spec.dtype.unwrap_or("<f4 or <f2");
            return Err(bad(format!("{name} has dtype {dtype}, expected {wanted}")));
        }
        let non_finite = || bad(format!("{name} contains NaN or infinite values"));
        let tensor = if dtype == "<f2" {
            let (values, shape) = npz.read_f16(name)?;
            if !values.iter().all(|v| v.is_finite()) {
                return Err(non_finite());
            }
            Tensor::from_vec(values, shape, device)
        } else {
            let (values, shape) = npz.read_f32(name)?;
            if !values.iter().all(|v| v.is_finite()) {
                return Err(non_finite());
            }
            Tensor::from_vec(values, shape, device)
        };
        tensors.push(tensor.map_err(|e| Error::Model(format!("{}: {name}: {e}", path.display())))?);
    }
    let key = stored_key(&mut npz);
    let (arrays, variants) = if variant_count > 0 {
        let (plain, stacked): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .enumerate()
            .partition(|(index, _)| index % 2 == 0);
        (
            plain.into_iter().map(|(_, t)| t).collect(),
            Some(stacked.into_iter().map(|(_, t)| t).collect()),
        )
    } else {
        (tensors, None)
    };
    Ok(CachedTextOutputs {
        arrays,
        variants,
        key,
    })
}
