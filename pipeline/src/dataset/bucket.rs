//! Aspect-ratio buckets (docs/kohya-compat.md#buckets): the bucket list, the bucket an image goes
//! to, the size it is resized to before the centre crop, and sd-scripts' `crop_ltrb` value.
//!
//! All arithmetic mirrors sd-scripts' `BucketManager` exactly (integer maths where it uses
//! integers, f64 where it uses Python floats) so bucket choices are bit-identical.

use crate::{Error, Result};

/// A width/height pair in pixels.
pub type Size = (u32, u32);

/// Bucket options as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketSettings {
    /// `--max_resolution` / `--resolution` (W, H): its area bounds every bucket.
    pub max_resolution: Size,
    /// `--min_bucket_reso`: smallest bucket side (ignored with `no_upscale`).
    pub min_bucket_reso: u32,
    /// `--max_bucket_reso`: largest bucket side (ignored with `no_upscale`).
    pub max_bucket_reso: u32,
    /// `--bucket_reso_steps`: bucket sides are multiples of this.
    pub bucket_reso_steps: u32,
    /// `--bucket_no_upscale`: per-image buckets, images are never enlarged.
    pub no_upscale: bool,
}

impl BucketSettings {
    /// Rejects settings that cannot produce buckets.
    pub fn validate(&self) -> Result<()> {
        let (w, h) = self.max_resolution;
        if w == 0 || h == 0 || self.bucket_reso_steps == 0 {
            return Err(Error::Usage(
                "--max_resolution and --bucket_reso_steps must be positive".into(),
            ));
        }
        if u64::from(w) * u64::from(h) < u64::from(self.bucket_reso_steps).pow(2) {
            return Err(Error::Usage(format!(
                "--max_resolution {w},{h} is smaller than one --bucket_reso_steps {} square",
                self.bucket_reso_steps
            )));
        }
        if !self.no_upscale && self.min_bucket_reso > self.max_bucket_reso {
            return Err(Error::Usage(format!(
                "--min_bucket_reso {} is larger than --max_bucket_reso {}",
                self.min_bucket_reso, self.max_bucket_reso
            )));
        }
        Ok(())
    }
}

/// Parses `"W,H"` or `"S"` (square) as sd-scripts does for `--max_resolution`.
pub fn parse_resolution(text: &str) -> Result<Size> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let number = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| Error::Usage(format!("resolution `{text}` is not `W,H` or `SIZE`")))
    };
    match parts.as_slice() {
        [side] => Ok((number(side)?, number(side)?)),
        [w, h] => Ok((number(w)?, number(h)?)),
        _ => Err(Error::Usage(format!(
            "resolution `{text}` is not `W,H` or `SIZE`"
        ))),
    }
}

/// sd-scripts' `make_bucket_resolutions`: every bucket whose area fits `max_reso`, sorted by
/// (width, height).
pub fn make_bucket_resolutions(
    max_reso: Size,
    min_size: u32,
    max_size: u32,
    divisible: u32,
) -> Vec<Size> {
    let area = u64::from(max_reso.0) * u64::from(max_reso.1);
    let divisible64 = u64::from(divisible);
    let square = ((area as f64).sqrt() / f64::from(divisible)).floor() as u32 * divisible;
    let mut buckets = vec![(square, square)];
    let mut width = min_size;
    while width <= max_size {
        let height =
            (area / u64::from(width) / divisible64 * divisible64).min(u64::from(max_size)) as u32;
        if height >= min_size {
            buckets.push((width, height));
            buckets.push((height, width));
        }
        width += divisible;
    }
    buckets.sort_unstable();
    buckets.dedup();
    buckets
}

/// Where one image goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placement {
    /// Size of the image file (W, H).
    pub original: Size,
    /// The bucket (W, H) the image is cropped to.
    pub bucket: Size,
    /// The size the image is resized to before the centre crop.
    pub resized: Size,
    /// Bucket aspect ratio minus image aspect ratio (for statistics).
    pub ar_error: f64,
}

impl Placement {
    /// sd-scripts' `crop_ltrb` for this image (see [`crop_ltrb`]).
    pub fn crop_ltrb(&self) -> [f64; 4] {
        crop_ltrb(self.bucket, self.original)
    }

    /// `train_resolution` of the metadata JSON: bucket sides rounded down to multiples of 8.
    pub fn train_resolution(&self) -> Size {
        (
            self.bucket.0 - self.bucket.0 % 8,
            self.bucket.1 - self.bucket.1 % 8,
        )
    }

    /// Offsets (left, top) of the centre crop of the resized image to the bucket.
    pub fn crop_offset(&self) -> Size {
        (
            self.resized.0.saturating_sub(self.bucket.0) / 2,
            self.resized.1.saturating_sub(self.bucket.1) / 2,
        )
    }
}

/// sd-scripts' `get_crop_ltrb` **[QUIRK]**: the box of the original image fitted *inside* the
/// bucket, from aspect ratios only (not the pixels actually trimmed).
pub fn crop_ltrb(bucket: Size, original: Size) -> [f64; 4] {
    let (bw, bh) = (f64::from(bucket.0), f64::from(bucket.1));
    let bucket_ar = bw / bh;
    let image_ar = f64::from(original.0) / f64::from(original.1);
    let (fitted_w, fitted_h) = if bucket_ar > image_ar {
        (bh * image_ar, bh)
    } else {
        (bw, bw / image_ar)
    };
    let left = ((bw - fitted_w) / 2.0).floor();
    let top = ((bh - fitted_h) / 2.0).floor();
    [left, top, left + fitted_w, top + fitted_h]
}

/// Assigns images to buckets and remembers which buckets were used, in first-seen order.
pub struct BucketManager {
    settings: BucketSettings,
    predefined: Vec<Size>,
    used: Vec<Size>,
}

impl BucketManager {
    /// Buckets for `settings` (the predefined list is empty with `no_upscale`).
    pub fn new(settings: BucketSettings) -> Result<Self> {
        settings.validate()?;
        let predefined = if settings.no_upscale {
            Vec::new()
        } else {
            make_bucket_resolutions(
                settings.max_resolution,
                settings.min_bucket_reso,
                settings.max_bucket_reso,
                settings.bucket_reso_steps,
            )
        };
        Ok(BucketManager {
            settings,
            predefined,
            used: Vec::new(),
        })
    }

    /// One fixed bucket of `resolution` (sd-scripts without `--enable_bucket`): every image is
    /// resized to cover it and centre-cropped.
    pub fn fixed(resolution: Size) -> Result<Self> {
        if resolution.0 == 0 || resolution.1 == 0 {
            return Err(Error::Usage(format!(
                "resolution {}x{} must be positive",
                resolution.0, resolution.1
            )));
        }
        Ok(BucketManager {
            settings: BucketSettings {
                max_resolution: resolution,
                min_bucket_reso: resolution.0.min(resolution.1),
                max_bucket_reso: resolution.0.max(resolution.1),
                bucket_reso_steps: 1,
                no_upscale: false,
            },
            predefined: vec![resolution],
            used: Vec::new(),
        })
    }

    /// The settings the buckets are made from.
    pub fn settings(&self) -> &BucketSettings {
        &self.settings
    }

    /// The predefined bucket list in sd-scripts' order (empty with `no_upscale`).
    pub fn predefined(&self) -> &[Size] {
        &self.predefined
    }

    /// Buckets used so far, in the order images first reached them.
    pub fn used_first_seen(&self) -> &[Size] {
        &self.used
    }

    /// Buckets used so far, sorted by (width, height).
    pub fn used_sorted(&self) -> Vec<Size> {
        let mut sorted = self.used.clone();
        sorted.sort_unstable();
        sorted
    }

    /// Places an image of `original` size. `None` when `no_upscale` would give it a zero-sized
    /// bucket (a side smaller than `--bucket_reso_steps`).
    pub fn place(&mut self, original: Size) -> Option<Placement> {
        let placement = if self.settings.no_upscale {
            self.place_no_upscale(original)?
        } else {
            self.place_predefined(original)
        };
        if !self.used.contains(&placement.bucket) {
            self.used.push(placement.bucket);
        }
        Some(placement)
    }

    fn place_predefined(&self, original: Size) -> Placement {
        let (w, h) = original;
        let aspect = f64::from(w) / f64::from(h);
        let bucket = if self.predefined.contains(&original) {
            original
        } else {
            let mut best = self.predefined[0];
            let mut best_error = f64::INFINITY;
            for &(bw, bh) in &self.predefined {
                let error = (f64::from(bw) / f64::from(bh) - aspect).abs();
                if error < best_error {
                    best_error = error;
                    best = (bw, bh);
                }
            }
            best
        };
        let bucket_ar = f64::from(bucket.0) / f64::from(bucket.1);
        let scale = if aspect > bucket_ar {
            f64::from(bucket.1) / f64::from(h)
        } else {
            f64::from(bucket.0) / f64::from(w)
        };
        let resized = (
            (f64::from(w) * scale + 0.5) as u32,
            (f64::from(h) * scale + 0.5) as u32,
        );
        Placement {
            original,
            bucket,
            resized,
            ar_error: bucket_ar - aspect,
        }
    }

    fn place_no_upscale(&self, original: Size) -> Option<Placement> {
        let (w, h) = original;
        let steps = self.settings.bucket_reso_steps;
        let aspect = f64::from(w) / f64::from(h);
        let max_area =
            f64::from(self.settings.max_resolution.0) * f64::from(self.settings.max_resolution.1);
        let resized = if f64::from(w) * f64::from(h) > max_area {
            let round_to_steps = |x: f64| {
                let q = (x + 0.5) as u32;
                q - q % steps
            };
            let rw = (max_area * aspect).sqrt();
            let rh = max_area / rw;
            let bw_a = round_to_steps(rw);
            let bh_a = round_to_steps(f64::from(bw_a) / aspect);
            let ar_a = f64::from(bw_a) / f64::from(bh_a);
            let bh_b = round_to_steps(rh);
            let bw_b = round_to_steps(f64::from(bh_b) * aspect);
            let ar_b = f64::from(bw_b) / f64::from(bh_b);
            if (ar_a - aspect).abs() < (ar_b - aspect).abs() {
                (bw_a, (f64::from(bw_a) / aspect + 0.5) as u32)
            } else {
                ((f64::from(bh_b) * aspect + 0.5) as u32, bh_b)
            }
        } else {
            original
        };
        let bucket = (resized.0 - resized.0 % steps, resized.1 - resized.1 % steps);
        if bucket.0 == 0 || bucket.1 == 0 {
            return None;
        }
        Some(Placement {
            original,
            bucket,
            resized,
            ar_error: f64::from(bucket.0) / f64::from(bucket.1) - aspect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn pair(value: &Value) -> Size {
        (
            value[0].as_u64().unwrap() as u32,
            value[1].as_u64().unwrap() as u32,
        )
    }

    fn pairs(value: &Value) -> Vec<Size> {
        value.as_array().unwrap().iter().map(pair).collect()
    }

    /// Equal up to the last-digit rounding of serde_json's fast float parser (it is not
    /// correctly rounded without its `float_roundtrip` feature); the maths itself is exact.
    fn assert_same_float(ours: f64, golden: f64, context: &str) {
        let tolerance = 4.0 * f64::EPSILON * golden.abs().max(1.0);
        assert!(
            (ours - golden).abs() <= tolerance,
            "{context}: {ours} != {golden}"
        );
    }

    #[test]
    fn equals_golden_buckets_for_every_setting() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/golden/buckets.json"
        );
        let golden: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let settings = golden["settings"].as_array().unwrap();
        assert_eq!(settings.len(), 5);
        for setting in settings {
            let name = setting["name"].as_str().unwrap();
            let mut manager = BucketManager::new(BucketSettings {
                max_resolution: pair(&setting["resolution"]),
                min_bucket_reso: setting["min_bucket_reso"].as_u64().unwrap() as u32,
                max_bucket_reso: setting["max_bucket_reso"].as_u64().unwrap() as u32,
                bucket_reso_steps: setting["bucket_reso_steps"].as_u64().unwrap() as u32,
                no_upscale: setting["no_upscale"].as_bool().unwrap(),
            })
            .unwrap();
            match &setting["predefined_buckets"] {
                Value::Null => assert!(manager.predefined().is_empty()),
                list => assert_eq!(manager.predefined(), pairs(list).as_slice(), "{name}"),
            }
            let images = setting["images"].as_object().unwrap();
            let mut names: Vec<&String> = images.keys().collect();
            names.sort();
            for image in names {
                let expected = &images[image];
                let placement = manager.place(pair(&expected["original_size"])).unwrap();
                let context = format!("{name} {image}");
                assert_eq!(placement.bucket, pair(&expected["bucket"]), "{context}");
                assert_eq!(
                    placement.resized,
                    pair(&expected["resized_size"]),
                    "{context}"
                );
                assert_same_float(
                    placement.ar_error,
                    expected["ar_error"].as_f64().unwrap(),
                    &context,
                );
                let crop: Vec<f64> = expected["crop_ltrb"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                for (ours, theirs) in placement.crop_ltrb().into_iter().zip(crop) {
                    assert_same_float(ours, theirs, &context);
                }
                assert_eq!(
                    placement.train_resolution(),
                    pair(&expected["train_resolution"]),
                    "{context}"
                );
            }
            assert_eq!(
                manager.used_first_seen(),
                pairs(&setting["used_buckets_first_seen_order"]).as_slice(),
                "{name}"
            );
            assert_eq!(
                manager.used_sorted(),
                pairs(&setting["used_buckets_sorted"]),
                "{name}"
            );
        }
    }

    #[test]
    fn spec_appendix_examples() {
        assert_eq!(make_bucket_resolutions((512, 512), 256, 1024, 64).len(), 17);
        assert_eq!(
            make_bucket_resolutions((1024, 1024), 256, 2048, 64).len(),
            41
        );
        let settings = BucketSettings {
            max_resolution: (512, 512),
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            no_upscale: false,
        };
        let mut manager = BucketManager::new(settings).unwrap();
        let p = manager.place((1000, 1500)).unwrap();
        assert_eq!((p.bucket, p.resized), ((384, 640), (427, 640)));
        assert_eq!(p.crop_ltrb(), [0.0, 32.0, 384.0, 608.0]);
        assert_eq!(p.crop_offset(), (21, 0));
        let p = manager.place((300, 200)).unwrap();
        assert_eq!((p.bucket, p.resized), ((640, 384), (640, 427)));
        let mut no_upscale = BucketManager::new(BucketSettings {
            no_upscale: true,
            ..settings
        })
        .unwrap();
        let p = no_upscale.place((500, 700)).unwrap();
        assert_eq!((p.bucket, p.resized), ((384, 512), (384, 538)));
        assert!(no_upscale.place((40, 300)).is_none());
        assert_eq!(parse_resolution("512").unwrap(), (512, 512));
        assert_eq!(parse_resolution("768,512").unwrap(), (768, 512));
        assert!(parse_resolution("a,b").is_err());
    }
}
