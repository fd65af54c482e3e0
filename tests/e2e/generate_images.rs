//! End-to-end tests of `generate-images` on the sd15-tiny and sdxl-tiny fixtures: deterministic
//! pixels per seed, independence of the batch, a LoRA at multiplier 0 equals no LoRA, the PNG
//! text chunks, prompt files, and refused inputs.

use crate::common;

use std::path::{Path, PathBuf};

use common::{fixtures, run_expect};

fn sd15() -> PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

fn lora() -> PathBuf {
    fixtures().join("golden/lora/trained_lora_dim4_alpha1.safetensors")
}

/// Runs generate-images with `extra` flags into `outdir` and returns the PNGs it wrote, sorted.
fn generate(outdir: &Path, model: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--ckpt".into(),
        model.into(),
        "--outdir".into(),
        outdir.into(),
        "--sequential_file_name".into(),
        "--quiet".into(),
    ];
    args.extend(extra.iter().map(|a| a.into()));
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run_expect("generate-images", &refs, 0);
    let mut files: Vec<PathBuf> = std::fs::read_dir(outdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn pixels(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

/// Text chunks of a PNG file (tEXt and uncompressed iTXt).
fn texts(path: &Path) -> Vec<(String, String)> {
    lorakit_pipeline::stages::generate_images::png::read_png_texts(&std::fs::read(path).unwrap())
}

#[test]
fn same_seed_same_pixels_and_the_batch_does_not_change_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--prompt",
        "a photo of a cat --n blurry --d 11,12,13",
        "--W",
        "64",
        "--H",
        "64",
        "--steps",
        "4",
        "--sampler",
        "euler_a",
        "--images_per_prompt",
        "3",
    ];
    let alone = generate(&dir.path().join("alone"), &sd15(), &flags);
    let again = generate(&dir.path().join("again"), &sd15(), &flags);
    let mut batched_flags = flags.to_vec();
    batched_flags.extend(["--batch_size", "3"]);
    let batched = generate(&dir.path().join("batched"), &sd15(), &batched_flags);
    assert_eq!(alone.len(), 3);
    for ((a, b), c) in alone.iter().zip(&again).zip(&batched) {
        assert_eq!(pixels(a), pixels(b), "{}", a.display());
        // Batched UNet calls may round differently: at most one level per channel.
        let (pa, pc) = (pixels(a), pixels(c));
        let worst = pa
            .as_raw()
            .iter()
            .zip(pc.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        assert!(
            worst <= 1,
            "{}: batched image differs by {worst}",
            c.display()
        );
    }
    // Different seeds give different images.
    assert_ne!(pixels(&alone[0]), pixels(&alone[1]));
    let seeds: Vec<String> = alone
        .iter()
        .map(|p| texts(p).into_iter().find(|(k, _)| k == "seed").unwrap().1)
        .collect();
    assert_eq!(seeds, ["11", "12", "13"]);
}

#[test]
fn a_lora_at_multiplier_zero_equals_no_lora_and_changes_the_image_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--prompt",
        "a red house",
        "--W",
        "64",
        "--H",
        "64",
        "--steps",
        "3",
        "--seed",
        "9",
        "--sampler",
        "euler",
    ];
    let plain = generate(&dir.path().join("plain"), &sd15(), &flags);
    let lora = lora();
    let lora = lora.to_str().unwrap();
    let mut zero = flags.to_vec();
    zero.extend(["--network_weights", lora, "--network_mul", "0"]);
    let zero = generate(&dir.path().join("zero"), &sd15(), &zero);
    let mut full = flags.to_vec();
    full.extend(["--network_weights", lora]);
    let full = generate(&dir.path().join("full"), &sd15(), &full);
    assert_eq!(pixels(&plain[0]), pixels(&zero[0]));
    assert_ne!(pixels(&plain[0]), pixels(&full[0]));
    let parameters = texts(&full[0])
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .unwrap()
        .1;
    assert!(
        parameters.contains("<lora:trained_lora_dim4_alpha1:1>"),
        "{parameters}"
    );
    // A1111's LoRA hash: 12 hex digits of the SHA-256 of the tensor data (after the header).
    let bytes = std::fs::read(lora).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let lora_hash = &sha256_hex(&bytes[8 + header_len..])[..12];
    assert!(
        parameters.ends_with(&format!(
            ", Lora hashes: \"trained_lora_dim4_alpha1: {lora_hash}\""
        )),
        "{parameters}"
    );
}

#[test]
fn png_text_chunks_carry_the_settings_and_a1111_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let files = generate(
        dir.path(),
        &sd15(),
        &[
            "--prompt",
            "a (cat:1.2) --n lowres --s 3 --l 5.5 --w 72 --h 64",
            "--seed",
            "4",
            "--sampler",
            "ddim",
        ],
    );
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].file_name().unwrap(), "im_000001.png");
    let image = pixels(&files[0]);
    assert_eq!((image.width(), image.height()), (72, 64));
    let texts: std::collections::HashMap<String, String> = texts(&files[0]).into_iter().collect();
    assert_eq!(texts["prompt"], "a (cat:1.2)");
    assert_eq!(texts["negative-prompt"], "lowres");
    assert_eq!(texts["seed"], "4");
    assert_eq!(texts["steps"], "3");
    assert_eq!(texts["scale"], "5.5");
    assert_eq!(texts["sampler"], "ddim");
    // A1111's short model hash: the first 10 hex digits of the checkpoint file's SHA-256.
    let model_hash = &sha256_hex(&std::fs::read(sd15()).unwrap())[..10];
    assert_eq!(
        texts["parameters"],
        format!("a (cat:1.2)\nNegative prompt: lowres\nSteps: 3, Sampler: DDIM, CFG scale: 5.5, Seed: 4, Size: 72x64, Model hash: {model_hash}, Model: model")
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn prompt_files_and_sdxl_with_size_conditioning() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.toml");
    std::fs::write(
        &prompts,
        "[prompt]\nwidth = 64\nheight = 64\nsample_steps = 2\n\n[[prompt.subset]]\nprompt = \"a dog\"\nseed = 1\n\n\
         [[prompt.subset]]\nprompt = \"a cat\"\nnegative_prompt = \"blurry\"\nseed = 2\nsample_sampler = \"dpmsolver++\"\n",
    )
    .unwrap();
    let files = generate(
        &dir.path().join("out"),
        &fixtures().join("sdxl-tiny/model.safetensors"),
        &[
            "--from_file",
            prompts.to_str().unwrap(),
            "--original_width",
            "512",
            "--original_height",
            "384",
        ],
    );
    assert_eq!(files.len(), 2);
    let texts: std::collections::HashMap<String, String> = texts(&files[1]).into_iter().collect();
    assert_eq!(texts["sampler"], "dpmsolver++");
    assert_eq!(texts["original-width"], "512");
    assert_eq!(texts["original-height"], "384");
    assert_eq!(pixels(&files[0]).dimensions(), (64, 64));
}

#[test]
fn unknown_samplers_missing_prompts_and_an_unbuilt_device_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = sd15();
    let out = dir.path().join("out");
    let os = std::ffi::OsStr::new;
    let base = [
        os("--ckpt"),
        model.as_os_str(),
        os("--outdir"),
        out.as_os_str(),
    ];
    let mut args = base.to_vec();
    args.extend([os("--prompt"), os("x"), os("--sampler"), os("k_dpm_9")]);
    let stderr = run_expect("generate-images", &args, 2);
    for name in ["ddim", "euler_a", "dpmsolver++", "heun", "lms"] {
        assert!(stderr.contains(name), "{stderr}");
    }
    let stderr = run_expect("generate-images", &base, 2);
    assert!(stderr.contains("--prompt"), "{stderr}");
    // --device cuda in a build without the feature names it.
    let mut args = base.to_vec();
    args.extend([os("--prompt"), os("x"), os("--device"), os("cuda")]);
    let stderr = run_expect("generate-images", &args, 2);
    assert!(stderr.contains("--features cuda"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn a_loha_file_merges_like_a_lora() {
    // A LyCORIS LoHa (lycoris-lora's file): at multiplier 0 the image equals no network, at 1 it
    // changes. That the merged LoHa changes the UNet as lycoris' forward does is checked in
    // pipeline/tests/library/lycoris.rs.
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--prompt",
        "a red house",
        "--W",
        "64",
        "--H",
        "64",
        "--steps",
        "3",
        "--seed",
        "9",
        "--sampler",
        "euler",
    ];
    let plain = generate(&dir.path().join("plain"), &sd15(), &flags);
    let loha = fixtures().join("golden/lycoris/loha.safetensors");
    let loha = loha.to_str().unwrap();
    let mut zero = flags.to_vec();
    zero.extend(["--network_weights", loha, "--network_mul", "0"]);
    let zero = generate(&dir.path().join("zero"), &sd15(), &zero);
    let mut full = flags.to_vec();
    full.extend(["--network_weights", loha]);
    let full = generate(&dir.path().join("full"), &sd15(), &full);
    assert_eq!(pixels(&plain[0]), pixels(&zero[0]));
    assert_ne!(pixels(&plain[0]), pixels(&full[0]));
}
