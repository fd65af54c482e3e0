//! End-to-end tests of `train-lora`: a short run from caches, bad inputs and usage errors.

mod common;

use common::{fixtures, make_training_caches, run_expect};
use lorakit_pipeline::lora::LoraFile;

fn model() -> std::path::PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

#[test]
fn trains_and_writes_a_kohya_lora() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model(),
            "--in_json",
            data.path().join("meta_lat.json"),
            "--train_data_dir",
            data.path(),
            "--output_dir",
            out.path(),
            "--output_name",
            "e2e",
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "2",
            "--learning_rate",
            "1e-3",
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            "1",
            "--min_snr_gamma",
            "5",
            "--seed",
            "1",
            "--save_precision",
            "fp16",
            "--quiet"
        ],
        0,
    );
    let file = LoraFile::read(&out.path().join("e2e.safetensors")).unwrap();
    assert_eq!(file.module_names().count(), 192);
    assert_eq!(file.metadata["ss_output_name"], "e2e");
    assert_eq!(file.metadata["ss_min_snr_gamma"], "5.0");
    assert_eq!(file.metadata["ss_lr_scheduler"], "cosine");
    let log = std::fs::read_to_string(out.path().join("e2e_loss.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);
    let bytes = std::fs::read(out.path().join("e2e.safetensors")).unwrap();
    let tensors = safetensors_dtypes(&bytes);
    assert!(
        tensors.iter().all(|d| d == "F16"),
        "--save_precision fp16 casts every tensor: {tensors:?}"
    );
}

fn safetensors_dtypes(bytes: &[u8]) -> Vec<String> {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn missing_caches_are_listed_before_training_and_nothing_is_written() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    std::fs::remove_file(data.path().join("two_te_outputs.npz")).unwrap();
    std::fs::write(data.path().join("one_0512x0512_sd.npz"), b"not a zip").unwrap();
    let out = tempfile::tempdir().unwrap();
    let stderr = run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model(),
            "--in_json",
            data.path().join("meta_lat.json"),
            "--train_data_dir",
            data.path(),
            "--output_dir",
            out.path(),
            "--quiet"
        ],
        1,
    );
    assert!(
        stderr.contains("two_te_outputs.npz") && stderr.contains("one_0512x0512_sd.npz"),
        "{stderr}"
    );
    assert!(stderr.contains("2 of 2 entries"), "{stderr}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn usage_errors_exit_2_and_help_says_unet_only() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let stderr = run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model(),
            "--in_json",
            data.path().join("meta_lat.json"),
            "--train_data_dir",
            data.path(),
            "--output_dir",
            out.path(),
            "--lr_scheduler",
            "constant",
            "--lr_warmup_steps",
            "3",
            "--quiet"
        ],
        2,
    );
    assert!(stderr.contains("constant_with_warmup"), "{stderr}");
    let help = std::process::Command::new(common::tool("train-lora"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("UNet") && help.contains("--network_dim") && help.contains("--in_json"),
        "{help}"
    );
}

#[test]
fn a_checkpoint_without_a_unet_is_rejected() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let stderr = run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            fixtures().join("golden/lora/trained_lora_dim4_alpha1.safetensors"),
            "--in_json",
            data.path().join("meta_lat.json"),
            "--train_data_dir",
            data.path(),
            "--output_dir",
            out.path(),
            "--quiet"
        ],
        1,
    );
    assert!(
        stderr.contains("trained_lora_dim4_alpha1.safetensors"),
        "{stderr}"
    );
}

/// Trains 2 steps (learning rate high enough for dropout to show in the weights) and returns the
/// LoRA file's tensor data (everything after the header) and its metadata.
fn train_with(extra: &[&str]) -> (Vec<u8>, std::collections::BTreeMap<String, String>) {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let (model, meta) = (model(), data.path().join("meta_lat.json"));
    let (data_dir, out_dir) = (data.path(), out.path());
    let mut args: Vec<&std::ffi::OsStr> = args![
        "--pretrained_model_name_or_path",
        model,
        "--in_json",
        meta,
        "--train_data_dir",
        data_dir,
        "--output_dir",
        out_dir,
        "--output_name",
        "drop",
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--seed",
        "3",
        "--quiet"
    ]
    .to_vec();
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    run_expect("train-lora", &args, 0);
    let path = out.path().join("drop.safetensors");
    let metadata = LoraFile::read(&path).unwrap().metadata;
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        bytes[8 + header_len..].to_vec(),
        metadata.into_iter().collect(),
    )
}

#[test]
fn network_dropout_is_seeded_and_recorded() {
    let (plain, plain_meta) = train_with(&[]);
    let (dropped, meta) = train_with(&["--network_dropout", "0.5"]);
    let (again, _) = train_with(&["--network_dropout", "0.5"]);
    assert_eq!(plain_meta["ss_network_dropout"], "None");
    assert_eq!(meta["ss_network_dropout"], "0.5");
    assert!(
        dropped == again,
        "the same seed draws the same dropout masks"
    );
    assert!(dropped != plain, "dropout changes what is learned");
}
