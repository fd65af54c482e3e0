//! The latent cache file `<stem>_<WWWW>x<HHHH>_sd.npz` (written by `prepare-latents`, read by
//! training; docs/kohya-compat.md#latent-cache-files), and where it lives.
//!
//! [`read_latent_cache`] is the one statement of what such a file must hold: `prepare-latents`
//! keeps a cache only when it passes, and training loads caches through it, so a file training
//! refuses is always re-encoded by the next `prepare-latents` run.
//!
//! Locations: an image's cache has sd-scripts' name in its cache folder (beside the image, or
//! under `--cache_dir`), unless that name holds the cache of the same unchanged image made with
//! other settings (another bucket, VAE, seed, ...; [`may_replace`]). Then it goes to the keyed
//! location [`keyed_path`], `<cache folder>/.lorakit/latents/<stem>_<key>_<suffix>.npz`, named
//! by the first 16 hex digits of its content key, so the caches of several settings coexist and
//! each run finds its own by key ([`find_by_key`]).

use std::path::{Path, PathBuf};

use crate::formats::bookkeeping::LORAKIT_DIR;
use crate::formats::npz::{stored_key, stored_source, NpzReader};
use crate::{Error, Result};

/// Folder, inside a cache folder's [`LORAKIT_DIR`], of the keyed latent caches.
pub const KEYED_DIR: &str = "latents";

/// Hex digits of the content key in a keyed cache's name.
const KEY_DIGITS: usize = 16;

/// The keyed location of the latent cache of image `stem` whose sd-scripts name lies in
/// `folder`: `<folder>/.lorakit/latents/<stem>_<first 16 hex digits of the key>_<suffix>.npz`.
pub fn keyed_path(folder: &Path, stem: &str, content_key: &str, suffix: &str) -> PathBuf {
    let key = &content_key[..KEY_DIGITS.min(content_key.len())];
    folder
        .join(LORAKIT_DIR)
        .join(KEYED_DIR)
        .join(format!("{stem}_{key}_{suffix}.npz"))
}

/// The name parts of a latent cache file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheName {
    /// sd-scripts' `<stem>_<W>x<H>_<suffix>.npz`, with the image size it records.
    SdScripts {
        /// The image's file stem.
        stem: String,
        /// `(W, H)` of the image the cache was made for.
        size: (u32, u32),
    },
    /// A keyed cache `<stem>_<16 hex digits>_<suffix>.npz` (in `.lorakit/latents/`).
    Keyed {
        /// The image's file stem.
        stem: String,
        /// The first 16 hex digits of its content key.
        key: String,
    },
}

impl CacheName {
    /// The image stem of either kind.
    pub fn stem(&self) -> &str {
        match self {
            CacheName::SdScripts { stem, .. } | CacheName::Keyed { stem, .. } => stem,
        }
    }
}

/// Parses a latent cache file name (`_sd` or `_sdxl`); `None` for any other name. A name of
/// both forms (a stem ending in `_<16 hex digits>`... and a size) reads as sd-scripts'.
pub fn parse_cache_name(name: &str) -> Option<CacheName> {
    let rest = name
        .strip_suffix("_sd.npz")
        .or_else(|| name.strip_suffix("_sdxl.npz"))?;
    let (stem, tail) = rest.rsplit_once('_')?;
    if stem.is_empty() {
        return None;
    }
    if let Some((w, h)) = tail.split_once('x') {
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if digits(w) && digits(h) {
            return Some(CacheName::SdScripts {
                stem: stem.to_string(),
                size: (w.parse().ok()?, h.parse().ok()?),
            });
        }
    }
    let hex = tail.len() == KEY_DIGITS
        && tail
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    hex.then(|| CacheName::Keyed {
        stem: stem.to_string(),
        key: tail.to_string(),
    })
}

/// The sd-scripts-named latent caches (`_<suffix>.npz`) of the image whose path without
/// extension is `base` (in its cache folder), sorted by name.
pub fn sd_scripts_caches(base: &Path, suffix: &str) -> Vec<PathBuf> {
    let (Some(dir), Some(stem)) = (base.parent(), base.file_name().and_then(|s| s.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.ends_with(&format!("_{suffix}.npz"))
                && matches!(parse_cache_name(&name), Some(CacheName::SdScripts { stem: s, .. }) if s == stem)
        })
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found
}

/// The cache of the image whose path without extension is `base` that records `content_key`:
/// one of its sd-scripts-named caches or its keyed cache.
pub fn find_by_key(base: &Path, content_key: &str, suffix: &str) -> Option<PathBuf> {
    let stem = base.file_name()?.to_str()?;
    let folder = base.parent().unwrap_or(Path::new(""));
    sd_scripts_caches(base, suffix)
        .into_iter()
        .chain([keyed_path(folder, stem, content_key, suffix)])
        .find(|path| holds_key(path, content_key))
}

/// Whether the file at `path` is an npz archive recording `content_key`.
pub fn holds_key(path: &Path, content_key: &str) -> bool {
    NpzReader::open(path)
        .ok()
        .and_then(|mut reader| stored_key(&mut reader))
        .is_some_and(|key| key == content_key)
}

/// The source hash (BLAKE3 of the image bytes) recorded in the cache at `path`, when it is a
/// readable lorakit cache that records one (`prepare-latents` writes it since caches coexist).
pub fn recorded_source(path: &Path) -> Option<String> {
    let mut reader = NpzReader::open(path).ok()?;
    stored_key(&mut reader)?;
    stored_source(&mut reader)
}

/// Whether a new cache (`content_key`) of the image whose bytes hash to `image_hash` may take
/// the sd-scripts name `path`: yes unless the file there is a cache of the same, unchanged image
/// made with other settings, which then keeps its name. A missing, damaged, sd-scripts-written
/// or stale file (its image changed, or it predates source hashes) is replaced.
pub fn may_replace(path: &Path, content_key: &str, image_hash: &str) -> bool {
    match recorded_source(path) {
        Some(source) => source != image_hash || holds_key(path, content_key),
        None => true,
    }
}

/// Channels of SD1/SD2/SDXL VAE latents.
pub const LATENT_CHANNELS: usize = 4;

/// What a latent cache must hold.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatentSpec {
    /// Bucket `(width, height)` in pixels: the latents are `[4, height/8, width/8]`; `None`
    /// accepts any size.
    pub bucket: Option<(usize, usize)>,
    /// `latents_flipped` with the latents' shape (`--flip_aug`).
    pub flip_aug: bool,
    /// `alpha_mask` `[height, width]` (`--alpha_mask`).
    pub alpha_mask: bool,
    /// Also what sd-scripts reads and checks: `original_size` `[2]` and `crop_ltrb` `[4]`, and no
    /// `alpha_mask` unless asked for (what `prepare-latents` writes).
    pub complete: bool,
}

/// The float32 arrays of a latent cache that passed [`read_latent_cache`].
#[derive(Debug, Clone)]
pub struct LatentArrays {
    /// `latents`, C order.
    pub latents: Vec<f32>,
    /// Their shape `[4, h, w]`.
    pub shape: [usize; 3],
    /// `latents_flipped` (with [`LatentSpec::flip_aug`]).
    pub latents_flipped: Option<Vec<f32>>,
    /// `alpha_mask` `[8h, 8w]` (with [`LatentSpec::alpha_mask`]).
    pub alpha_mask: Option<Vec<f32>>,
}

/// Reads the arrays `spec` asks for, checking names, shapes (from the headers, before any data
/// is read), float dtypes and finite values; the error names the file and what is wrong.
pub fn read_latent_cache(reader: &mut NpzReader, spec: &LatentSpec) -> Result<LatentArrays> {
    let path = reader.path().to_path_buf();
    let bad = |message: String| Error::bad_file(&path, message);
    let shape = if reader.contains("latents") {
        reader.shape("latents")?
    } else {
        return Err(bad("has no array `latents`; re-run prepare-latents".into()));
    };
    let &[channels, h, w] = shape.as_slice() else {
        return Err(bad(format!(
            "latents have shape {shape:?}, expected [{LATENT_CHANNELS}, h, w]; re-run prepare-latents"
        )));
    };
    if channels != LATENT_CHANNELS || h == 0 || w == 0 {
        return Err(bad(format!(
            "latents have shape {shape:?}, expected [{LATENT_CHANNELS}, h, w]; re-run prepare-latents"
        )));
    }
    if let Some((bw, bh)) = spec.bucket {
        if (w * 8, h * 8) != (bw, bh) {
            return Err(bad(format!(
                "latents are for {}x{} but {bw}x{bh} is expected (bucket / train_resolution); re-run prepare-latents",
                w * 8,
                h * 8
            )));
        }
    }
    if spec.complete {
        for (name, len) in [("original_size", 2), ("crop_ltrb", 4)] {
            if !reader.contains(name) || reader.shape(name)? != [len] {
                return Err(bad(format!(
                    "has no array `{name}` of shape [{len}] (sd-scripts reads it); re-run prepare-latents"
                )));
            }
        }
        if !spec.alpha_mask && reader.contains("alpha_mask") {
            return Err(bad(
                "holds an alpha_mask but --alpha_mask is off (sd-scripts refuses it)".into(),
            ));
        }
    }
    let latents = float_array(reader, "latents", &shape, "")?;
    let latents_flipped = spec
        .flip_aug
        .then(|| float_array(reader, "latents_flipped", &shape, " with --flip_aug"))
        .transpose()?;
    let alpha_mask = spec
        .alpha_mask
        .then(|| float_array(reader, "alpha_mask", &[h * 8, w * 8], " with --alpha_mask"))
        .transpose()?;
    Ok(LatentArrays {
        latents,
        shape: [channels, h, w],
        latents_flipped,
        alpha_mask,
    })
}

/// Float array `name` of exactly `shape`, all finite; `flag` ends the "re-run" advice.
fn float_array(
    reader: &mut NpzReader,
    name: &str,
    shape: &[usize],
    flag: &str,
) -> Result<Vec<f32>> {
    let path = reader.path().to_path_buf();
    let bad = |message: String| Error::bad_file(&path, message);
    if !reader.contains(name) {
        return Err(bad(format!(
            "has no array `{name}`; re-run prepare-latents{flag}"
        )));
    }
    let found = reader.shape(name)?;
    if found != shape {
        return Err(bad(format!(
            "{name} has shape {found:?}, expected {shape:?}; re-run prepare-latents{flag}"
        )));
    }
    let dtype = reader.dtype(name)?;
    if dtype != "<f4" && dtype != "<f2" {
        return Err(bad(format!(
            "{name} has dtype {dtype}, expected float32; re-run prepare-latents{flag}"
        )));
    }
    let (values, _) = reader.read_f32(name)?;
    if !values.iter().all(|v| v.is_finite()) {
        return Err(bad(format!(
            "{name} contains NaN or infinite values (a VAE run in fp16?); re-run prepare-latents (with --mixed_precision no)"
        )));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_parse_both_forms() {
        assert_eq!(
            parse_cache_name("a_b_0512x0384_sd.npz"),
            Some(CacheName::SdScripts {
                stem: "a_b".into(),
                size: (512, 384)
            })
        );
        assert_eq!(
            parse_cache_name("cat_0123456789abcdef_sdxl.npz"),
            Some(CacheName::Keyed {
                stem: "cat".into(),
                key: "0123456789abcdef".into()
            })
        );
        for other in [
            "cat.npz",
            "cat_te_outputs.npz",
            "_0512x0384_sd.npz",
            "cat_0123456789ABCDEF_sd.npz",
            "cat_12x_sd.npz",
        ] {
            assert_eq!(parse_cache_name(other), None, "{other}");
        }
        let keyed = keyed_path(Path::new("d"), "cat", &"ab".repeat(32), "sd");
        assert_eq!(
            keyed,
            Path::new("d/.lorakit/latents/cat_abababababababab_sd.npz")
        );
        assert_eq!(
            parse_cache_name(&keyed.file_name().unwrap().to_string_lossy())
                .unwrap()
                .stem(),
            "cat"
        );
    }
}
