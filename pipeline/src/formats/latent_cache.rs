//! The latent cache file `<stem>_<WWWW>x<HHHH>_sd.npz` (written by `prepare-latents`, read by
//! training; docs/kohya-compat.md#latent-cache-files).
//!
//! [`read_latent_cache`] is the one statement of what such a file must hold: `prepare-latents`
//! keeps a cache only when it passes, and training loads caches through it, so a file training
//! refuses is always re-encoded by the next `prepare-latents` run.

use crate::formats::npz::NpzReader;
use crate::{Error, Result};

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
