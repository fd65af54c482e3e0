//! End-to-end tests of `prepare-latents`: sd-scripts' golden metadata and latent caches,
//! incremental re-runs, and bad inputs.

use crate::common;

use std::path::{Path, PathBuf};

use common::{copy_dir, fixtures, run_expect};
use lorakit_pipeline::formats::npz::{self, NpzReader};
use serde_json::Value;

fn model() -> PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The golden metadata file `name` with `{DATA}/` pointing at `data`.
fn golden_metadata(name: &str, data: &Path) -> String {
    let text = std::fs::read_to_string(fixtures().join("golden/metadata").join(name)).unwrap();
    text.replace("{DATA}/", &format!("{}/", data.display()))
}

/// sd-scripts' golden `prepare_buckets_latents.py` settings.
fn golden_settings<'a>(
    data: &'a Path,
    in_json: &'a Path,
    out_json: &'a Path,
) -> Vec<&'a std::ffi::OsStr> {
    let mut args: Vec<&std::ffi::OsStr> =
        vec![data.as_os_str(), in_json.as_os_str(), out_json.as_os_str()];
    args.extend(
        [
            "--batch_size",
            "4",
            "--max_resolution",
            "256,256",
            "--min_bucket_reso",
            "128",
            "--max_bucket_reso",
            "512",
            "--bucket_reso_steps",
            "64",
            "--mixed_precision",
            "no",
            "--full_path",
            "--seed",
            "42",
        ]
        .iter()
        .map(std::ffi::OsStr::new),
    );
    args
}

#[test]
fn golden_metadata_and_caches_then_incremental_reruns() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    copy_dir(&fixtures().join("images"), &data);
    let in_json = root.path().join("meta_clean.json");
    std::fs::write(&in_json, golden_metadata("meta_clean.json", &data)).unwrap();
    let out_json = root.path().join("meta_lat.json");
    let model = model();
    let mut args = golden_settings(&data, &in_json, &out_json);
    args.insert(3, model.as_os_str());

    let stderr = run_expect("prepare-latents", &args, 0);
    assert!(stderr.contains("12 done, 0 up to date"), "{stderr}");
    let expected: Value = serde_json::from_str(&golden_metadata("meta_lat.json", &data)).unwrap();
    assert_eq!(json(&out_json), expected);
    let manifest = json(&root.path().join("meta_lat.json.manifest.json"));
    assert_eq!(manifest["summary"]["done"], 12);
    assert_eq!(manifest["items"].as_object().unwrap().len(), 12);

    // Format, names, shapes and values of the caches against sd-scripts' and the reference VAE.
    let mut z_scores = Vec::new();
    for stem in ["astronaut", "chelsea", "cell", "text"] {
        let golden_dir = fixtures().join("golden/vae");
        let name = std::fs::read_dir(&golden_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.starts_with(&format!("{stem}_")) && n.ends_with("_sd.npz"))
            .unwrap();
        let mut ours = NpzReader::open(&data.join(&name)).unwrap();
        let mut theirs = NpzReader::open(&golden_dir.join(&name)).unwrap();
        let mut reference = NpzReader::open(&golden_dir.join(format!("{stem}_vae.npz"))).unwrap();
        for (key, dtype) in [
            ("latents", "<f4"),
            ("original_size", "<i8"),
            ("crop_ltrb", "<f8"),
        ] {
            assert_eq!(ours.dtype(key).unwrap(), dtype, "{name} {key}");
            assert_eq!(
                ours.shape(key).unwrap(),
                theirs.shape(key).unwrap(),
                "{name} {key}"
            );
        }
        assert_eq!(
            ours.read_i64("original_size").unwrap(),
            theirs.read_i64("original_size").unwrap()
        );
        assert_eq!(
            ours.read_f64("crop_ltrb").unwrap(),
            theirs.read_f64("crop_ltrb").unwrap()
        );
        assert!(npz::stored_key(&mut ours).is_some());
        for (key, golden_key) in [
            ("latents_mean", "posterior_mean"),
            ("latents_std", "posterior_std"),
        ] {
            let (values, _) = ours.read_f32(key).unwrap();
            let (expected, _) = reference.read_f32(golden_key).unwrap();
            let max = values
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max <= 1e-4, "{name} {key}: max abs error {max}");
        }
        let (latents, _) = ours.read_f32("latents").unwrap();
        let (mean, _) = ours.read_f32("latents_mean").unwrap();
        let (std, _) = ours.read_f32("latents_std").unwrap();
        z_scores.extend(
            latents
                .iter()
                .zip(&mean)
                .zip(&std)
                .map(|((x, m), s)| f64::from((x - m) / s)),
        );
    }
    let n = z_scores.len() as f64;
    let z_mean = z_scores.iter().sum::<f64>() / n;
    let z_std = (z_scores.iter().map(|z| (z - z_mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        z_mean.abs() < 0.05 && (z_std - 1.0).abs() < 0.05,
        "z mean {z_mean}, std {z_std}"
    );

    // Nothing changed: nothing is encoded.
    let stderr = run_expect("prepare-latents", &args, 0);
    assert!(stderr.contains("0 done, 12 up to date"), "{stderr}");

    // One image's pixels change: exactly that image is encoded again.
    let edited = data.join("chelsea.png");
    let mut pixels = image::open(&edited).unwrap().to_rgb8();
    let pixel = pixels.get_pixel_mut(10, 10);
    pixel.0[0] = pixel.0[0].wrapping_add(128);
    pixels.save(&edited).unwrap();
    let before = std::fs::read(data.join("cell_0550x0660_sd.npz")).unwrap();
    let stderr = run_expect("prepare-latents", &args, 0);
    assert!(stderr.contains("1 done, 11 up to date"), "{stderr}");
    assert_eq!(
        std::fs::read(data.join("cell_0550x0660_sd.npz")).unwrap(),
        before
    );
}

/// A minimal safetensors file holding one tensor (to stand for a VAE with missing weights).
fn write_partial_vae(path: &Path) {
    let mut header = br#"{"encoder.down.0.block.0.conv1.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.to_vec();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(0f32.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_images_are_skipped_per_file_and_bad_models_are_fatal() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for good in ["microaneurysms.png", "coins.png"] {
        std::fs::copy(fixtures().join("images").join(good), data.join(good)).unwrap();
    }
    std::fs::write(data.join("empty.png"), b"").unwrap();
    std::fs::write(data.join("notes.jpg"), b"this is text, not a JPEG").unwrap();
    let astronaut = std::fs::read(fixtures().join("images/astronaut.png")).unwrap();
    std::fs::write(
        data.join("truncated.png"),
        &astronaut[..astronaut.len() / 3],
    )
    .unwrap();
    let in_json = root.path().join("in.json");
    std::fs::write(
        &in_json,
        r#"{"coins": {"caption": "coins"}, "ghost": {"caption": "gone"}}"#,
    )
    .unwrap();
    let out_json = root.path().join("out.json");
    let small = [
        "--max_resolution",
        "128,128",
        "--min_bucket_reso",
        "64",
        "--max_bucket_reso",
        "256",
    ];
    let model = model();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        data.as_os_str(),
        in_json.as_os_str(),
        out_json.as_os_str(),
        model.as_os_str(),
    ];
    args.extend(small.iter().map(std::ffi::OsStr::new));

    let stderr = run_expect("prepare-latents", &args, 3);
    for bad in ["empty.png", "notes.jpg", "truncated.png", "ghost"] {
        assert!(stderr.contains(bad), "{bad} not reported:\n{stderr}");
    }
    assert!(stderr.contains("2 done"), "{stderr}");
    let out = json(&out_json);
    assert_eq!(
        out["coins"]["train_resolution"],
        serde_json::json!([128, 128])
    );
    assert_eq!(
        out["microaneurysms"]["train_resolution"],
        serde_json::json!([128, 128])
    );
    assert!(out.get("empty").is_none());
    assert_eq!(out["ghost"], serde_json::json!({"caption": "gone"}));
    let caches: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".npz"))
        .collect();
    assert_eq!(caches.len(), 2, "{caches:?}");

    // Models that cannot be used stop the run with a message naming the problem.
    let pickle = root.path().join("model.ckpt");
    std::fs::write(&pickle, b"PK\x03\x04 a torch zip").unwrap();
    let partial_vae = root.path().join("vae.safetensors");
    write_partial_vae(&partial_vae);
    for (model, vae, message) in [
        (&pickle, None, "pickle"),
        (&data.join("coins.png"), None, "not a readable .safetensors"),
        (
            &root.path().join("missing.safetensors"),
            None,
            "missing.safetensors",
        ),
        (&model, Some(&partial_vae), "encoder.conv_in.weight"),
    ] {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            data.as_os_str(),
            in_json.as_os_str(),
            out_json.as_os_str(),
            model.as_os_str(),
            "--force".as_ref(),
        ];
        if let Some(vae) = vae {
            args.extend(["--vae".as_ref(), vae.as_os_str()]);
        }
        let stderr = run_expect("prepare-latents", &args, 1);
        assert!(stderr.contains(message), "{message}:\n{stderr}");
    }
    run_expect(
        "prepare-latents",
        &[data.as_os_str(), in_json.as_os_str()],
        2,
    );
}

#[test]
fn exif_orientation_is_ignored_unless_asked_for() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Stored 192 wide and 128 high; orientation 6 shows it 128 wide and 192 high.
    let picture = image::RgbImage::from_fn(192, 128, |x, y| image::Rgb([x as u8, y as u8, 90]));
    std::fs::write(
        data.join("phone.jpg"),
        lorakit_tests::corpus::jpeg_bytes(&picture, Some(6)),
    )
    .unwrap();
    let in_json = root.path().join("in.json");
    std::fs::write(&in_json, r#"{"phone": {"caption": "a phone photo"}}"#).unwrap();
    for (extra, stored_name, resolution) in [
        (None, "phone_0192x0128_sd.npz", [192, 128]),
        (
            Some("--exif_transpose"),
            "phone_0128x0192_sd.npz",
            [128, 192],
        ),
    ] {
        let out_json = root.path().join("out.json");
        let mut flags = vec!["--max_resolution", "256,256", "--bucket_no_upscale"];
        flags.extend(extra);
        encode(&data, &in_json, &out_json, &flags);
        assert!(
            data.join(stored_name).is_file(),
            "{extra:?}: no {stored_name}"
        );
        let entry = &json(&out_json)["phone"];
        assert_eq!(entry["train_resolution"], serde_json::json!(resolution));
        let mut latents = NpzReader::open(&data.join(stored_name)).unwrap();
        let shape = latents.shape("latents").unwrap();
        assert_eq!(shape, vec![4, resolution[1] / 8, resolution[0] / 8]);
    }
}

/// Runs prepare-latents on `data` with the tiny model and `flags`, expecting success.
fn encode(data: &Path, in_json: &Path, out_json: &Path, flags: &[&str]) {
    let model = model();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        data.as_os_str(),
        in_json.as_os_str(),
        out_json.as_os_str(),
        model.as_os_str(),
    ];
    args.extend(flags.iter().map(std::ffi::OsStr::new));
    run_expect("prepare-latents", &args, 0);
}

/// Runs prepare-latents on `data` at 128x128 buckets with `extra` flags.
fn encode_small(data: &Path, in_json: &Path, out_json: &Path, extra: &[&str]) {
    let mut flags = vec![
        "--max_resolution",
        "128,128",
        "--min_bucket_reso",
        "64",
        "--force",
    ];
    flags.extend(extra);
    encode(data, in_json, out_json, &flags);
}

#[test]
fn flip_aug_alpha_mask_and_half_precision() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A photo and its mirror image: 512x512 shrinks to the 128x128 bucket by exact 4x4 area
    // averages, so the mirror's latents equal the photo's flipped latents.
    let photo = image::open(fixtures().join("images/astronaut.png"))
        .unwrap()
        .to_rgb8();
    photo.save(data.join("photo.png")).unwrap();
    image::imageops::flip_horizontal(&photo)
        .save(data.join("mirror.png"))
        .unwrap();
    // An RGBA image whose right half is transparent.
    let half = image::RgbaImage::from_fn(256, 256, |x, _| {
        image::Rgba([200, 100, 50, if x < 128 { 255 } else { 0 }])
    });
    half.save(data.join("half.png")).unwrap();
    let in_json = root.path().join("in.json");
    std::fs::write(
        &in_json,
        r#"{"photo": {"caption": "a"}, "mirror": {"caption": "b"}, "half": {"caption": "c"}}"#,
    )
    .unwrap();
    let out_json = root.path().join("out.json");
    encode_small(&data, &in_json, &out_json, &["--flip_aug", "--alpha_mask"]);

    let read = |stem: &str, key: &str| {
        let name = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.starts_with(&format!("{stem}_")) && n.ends_with("_sd.npz"))
            .unwrap_or_else(|| panic!("no latent cache for {stem}"));
        NpzReader::open(&data.join(name))
            .unwrap()
            .read_f32(key)
            .unwrap()
    };
    let (flipped, shape) = read("photo", "latents_flipped_mean");
    let (mirror, mirror_shape) = read("mirror", "latents_mean");
    assert_eq!(shape, vec![4, 16, 16]);
    assert_eq!(shape, mirror_shape);
    let gap = flipped
        .iter()
        .zip(&mirror)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        gap < 1e-4,
        "flipped latents differ from the mirror's by {gap}"
    );
    let (unflipped, _) = read("photo", "latents_mean");
    assert!(
        unflipped
            .iter()
            .zip(&flipped)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "flipped latents equal the original"
    );

    // Alpha mask: bucket-sized, opaque left half 1, transparent right half 0; photos all 1.
    let (mask, mask_shape) = read("half", "alpha_mask");
    assert_eq!(mask_shape, vec![128, 128]);
    assert!(mask.iter().step_by(128).all(|&v| v == 1.0));
    assert!(mask.iter().skip(127).step_by(128).all(|&v| v == 0.0));
    let (photo_mask, _) = read("photo", "alpha_mask");
    assert!(photo_mask.iter().all(|&v| v == 1.0));

    // --mixed_precision fp16 is accepted and stays within a half-precision tolerance of float32
    // (the CPU VAE computes in float32).
    encode_small(&data, &in_json, &out_json, &["--mixed_precision", "fp16"]);
    let (half_mean, _) = read("photo", "latents_mean");
    let scale = unflipped.iter().fold(0f32, |m, v| m.max(v.abs()));
    let gap = half_mean
        .iter()
        .zip(&unflipped)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        gap <= 1e-2 * scale.max(1.0),
        "fp16 differs by {gap} (scale {scale})"
    );
}

/// Rewrites the latent cache at `path` with its own content key and `latents` (as float64 when
/// `as_f64`), keeping `original_size` and `crop_ltrb`: a cache whose key says "up to date".
fn write_lying_cache(path: &Path, latents: Vec<f32>, shape: &[usize], as_f64: bool) {
    let mut reader = NpzReader::open(path).unwrap();
    let key = npz::stored_key(&mut reader).unwrap();
    let mut writer = npz::NpzWriter::new();
    if as_f64 {
        let values = latents.into_iter().map(f64::from).collect();
        writer.add_f64("latents", values, shape).unwrap();
    } else {
        writer.add_f32("latents", latents, shape).unwrap();
    }
    let (size, _) = reader.read_i64("original_size").unwrap();
    writer.add_i64("original_size", size, &[2]).unwrap();
    let (crop, _) = reader.read_f64("crop_ltrb").unwrap();
    writer.add_f64("crop_ltrb", crop, &[4]).unwrap();
    npz::store_key(&mut writer, &key).unwrap();
    writer.write(path).unwrap();
}

#[test]
fn caches_with_the_right_key_but_bad_arrays_are_re_encoded() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for good in ["microaneurysms.png", "coins.png"] {
        std::fs::copy(fixtures().join("images").join(good), data.join(good)).unwrap();
    }
    let in_json = root.path().join("in.json");
    std::fs::write(
        &in_json,
        r#"{"coins": {"caption": "coins"}, "microaneurysms": {"caption": "eye"}}"#,
    )
    .unwrap();
    let out_json = root.path().join("out.json");
    let model = model();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        data.as_os_str(),
        in_json.as_os_str(),
        out_json.as_os_str(),
        model.as_os_str(),
    ];
    args.extend(
        ["--max_resolution", "128,128", "--min_bucket_reso", "64"]
            .iter()
            .map(std::ffi::OsStr::new),
    );
    run_expect("prepare-latents", &args, 0);
    let cache = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("coins_") && p.extension().unwrap() == "npz")
        .unwrap();
    let shape = NpzReader::open(&cache).unwrap().shape("latents").unwrap();
    let count: usize = shape.iter().product();
    let lies: [(Vec<f32>, Vec<usize>, bool, &str); 3] = [
        (vec![f32::NAN; count], shape.clone(), false, "NaN"),
        (vec![0.5; 4 * 4 * 4], vec![4, 4, 4], false, "is expected"),
        (vec![0.5; count], shape.clone(), true, "dtype"),
    ];
    for (latents, lie_shape, as_f64, reason) in lies {
        write_lying_cache(&cache, latents, &lie_shape, as_f64);
        let stderr = run_expect("prepare-latents", &args, 0);
        assert!(
            stderr.contains("1 done, 1 up to date"),
            "{reason}: {stderr}"
        );
        let line = stderr
            .lines()
            .find(|l| l.contains("stale cache replaced"))
            .unwrap_or_else(|| panic!("{reason}: no reason given:\n{stderr}"));
        assert!(line.contains("coins_") && line.contains(reason), "{line}");
        let mut fixed = NpzReader::open(&cache).unwrap();
        assert_eq!(fixed.dtype("latents").unwrap(), "<f4");
        let (values, fixed_shape) = fixed.read_f32("latents").unwrap();
        assert_eq!(fixed_shape, shape);
        assert!(values.iter().all(|v| v.is_finite()));
    }
    let stderr = run_expect("prepare-latents", &args, 0);
    assert!(stderr.contains("0 done, 2 up to date"), "{stderr}");
}

/// `--device cuda` in a build without the feature is a usage error naming it; no cache and no
/// metadata are written.
#[test]
fn device_cuda_in_a_build_without_the_feature_is_refused_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(
        fixtures().join("images/astronaut.png"),
        data.join("photo.png"),
    )
    .unwrap();
    let (in_json, out_json) = (root.path().join("in.json"), root.path().join("out.json"));
    std::fs::write(&in_json, r#"{"photo": {"caption": "a"}}"#).unwrap();
    let stderr = run_expect(
        "prepare-latents",
        args![data, in_json, out_json, model(), "--device", "cuda"],
        2,
    );
    assert!(stderr.contains("--features cuda"), "{stderr}");
    assert!(!out_json.exists());
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
}
