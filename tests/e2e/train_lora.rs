//! End-to-end tests of `train-lora`: a short run from caches, bad inputs and usage errors.

use crate::common;

use common::{fixtures, make_training_caches, run_expect};
use lorakit_pipeline::networks::lora::LoraFile;

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
            "--network_train_unet_only",
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
            "--network_train_unet_only",
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
fn hostile_arguments_are_refused_before_any_work() {
    // Each would have trained for nothing, written outside --output_dir, or replaced a good
    // LoRA with a useless one: refused with exit 2, naming the flag, and nothing is written.
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let good = out.join("keep.safetensors");
    std::fs::write(&good, b"a LoRA the user keeps").unwrap();
    let cases: [(&[&str], &str); 10] = [
        (&["--max_train_steps", "0"], "--max_train_steps"),
        (&["--max_train_epochs", "0"], "--max_train_epochs"),
        (&["--network_dim", "0"], "--network_dim"),
        (&["--learning_rate=-1e-4"], "--learning_rate"),
        (&["--unet_lr", "NaN"], "--unet_lr"),
        (&["--network_alpha=-1"], "--network_alpha"),
        (&["--output_name", "../escaped"], "--output_name"),
        (&["--output_name", ""], "--output_name"),
        (&["--output_name", "a/b"], "--output_name"),
        // Would need terabytes: refused before allocating, naming the rank.
        (&["--network_dim", "10000000"], "of memory available"),
    ];
    let (model, meta, data_dir) = (model(), data.path().join("meta_lat.json"), data.path());
    let base: &[&std::ffi::OsStr] = args![
        "--pretrained_model_name_or_path",
        model,
        "--in_json",
        meta,
        "--train_data_dir",
        data_dir,
        "--output_dir",
        out,
        "--quiet"
    ];
    for (flags, named) in cases {
        let mut args = base.to_vec();
        if !flags.contains(&"--output_name") {
            args.extend(args!["--output_name", "keep"]);
        }
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        let stderr = run_expect("train-lora", &args, 2);
        // Our own check, not the argument parser's: its messages start with "error:".
        assert!(
            stderr.contains("train-lora: error: ") && stderr.contains(named),
            "{flags:?}: {stderr}"
        );
        assert_eq!(std::fs::read(&good).unwrap(), b"a LoRA the user keeps");
        let written: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert_eq!(written.len(), 1, "{flags:?} wrote into --output_dir");
        let beside: Vec<_> = std::fs::read_dir(parent.path()).unwrap().collect();
        assert_eq!(beside.len(), 1, "{flags:?} wrote beside --output_dir");
    }
    // A folder where the LoRA would go is found before training, not when saving at the end.
    std::fs::create_dir(out.join("blocked.safetensors")).unwrap();
    let mut args = base.to_vec();
    args.extend(args!["--output_name", "blocked", "--max_train_steps", "1"]);
    let stderr = run_expect("train-lora", &args, 1);
    assert!(
        stderr.contains("blocked.safetensors") && stderr.contains("is a folder"),
        "{stderr}"
    );
    assert!(
        !out.join("blocked_loss.jsonl").exists(),
        "trained before failing"
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

/// What a short training run left behind.
struct Trained {
    /// The LoRA file's tensor bytes (everything after the header).
    weights: Vec<u8>,
    metadata: std::collections::BTreeMap<String, String>,
    module_names: Vec<String>,
    /// The dtype of each saved tensor.
    dtypes: Vec<String>,
    /// The loss of each step, from `<name>_loss.jsonl`.
    losses: Vec<f64>,
}

/// Trains 2 steps (learning rate high enough for dropout to show in the weights).
fn train_with(extra: &[&str]) -> Trained {
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
    let file = LoraFile::read(&path).unwrap();
    let module_names = file.module_names().cloned().collect();
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let log = std::fs::read_to_string(out.path().join("drop_loss.jsonl")).unwrap();
    let losses = log
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            row["loss"].as_f64().unwrap()
        })
        .collect();
    Trained {
        weights: bytes[8 + header_len..].to_vec(),
        metadata: file.metadata.into_iter().collect(),
        module_names,
        dtypes: safetensors_dtypes(&bytes),
        losses,
    }
}

#[test]
fn network_dropout_is_seeded_and_recorded() {
    let plain = train_with(&[]);
    let dropped = train_with(&["--network_dropout", "0.5"]);
    let again = train_with(&["--network_dropout", "0.5"]);
    assert_eq!(plain.metadata["ss_network_dropout"], "None");
    assert_eq!(dropped.metadata["ss_network_dropout"], "0.5");
    assert!(
        dropped.weights == again.weights,
        "the same seed draws the same dropout masks"
    );
    assert!(
        dropped.weights != plain.weights,
        "dropout changes what is learned"
    );
}

#[test]
fn rank_and_module_dropout_are_seeded_and_recorded() {
    let dropout = ["--network_args", "rank_dropout=0.3", "module_dropout=0.2"];
    let plain = train_with(&[]);
    let dropped = train_with(&dropout);
    let again = train_with(&dropout);
    let args: serde_json::Value =
        serde_json::from_str(&dropped.metadata["ss_network_args"]).unwrap();
    assert_eq!(
        args,
        serde_json::json!({"rank_dropout": "0.3", "module_dropout": "0.2", "dropout": null})
    );
    assert!(
        dropped.weights == again.weights,
        "the same seed draws the same masks"
    );
    assert!(
        dropped.weights != plain.weights,
        "rank and module dropout change what is learned"
    );
}

#[test]
fn block_lr_weights_drop_blocks_and_loraplus_changes_training() {
    let plain = train_with(&[]);
    let in_up_block = |n: &String| n.starts_with("lora_unet_up_blocks_");
    assert!(plain.module_names.iter().any(in_up_block));
    // Up-block weights 0 (below the threshold): no module in any up block.
    let blocked = train_with(&[
        "--network_args",
        "up_lr_weight=zeros+0.05",
        "block_lr_zero_threshold=0.1",
    ]);
    assert!(!blocked.module_names.iter().any(in_up_block));
    assert_eq!(
        blocked.module_names.len(),
        plain
            .module_names
            .iter()
            .filter(|n| !in_up_block(n))
            .count()
    );
    assert!(blocked.metadata["ss_network_args"].contains("up_lr_weight"));
    let plus = train_with(&["--network_args", "loraplus_lr_ratio=16"]);
    assert_eq!(plus.module_names, plain.module_names);
    assert!(
        plus.weights != plain.weights,
        "LoRA+ changes the learning rate of lora_up"
    );
}

#[test]
fn every_precision_trains_saves_and_is_recorded() {
    // The frozen UNet weights are stored in the given precision; the losses stay within that
    // precision's rounding of the float32 run, and the flags land in the ss_* metadata.
    let float32 = train_with(&["--mixed_precision", "no"]);
    assert_eq!(float32.metadata["ss_mixed_precision"], "no");
    let runs: [(&[&str], f64); 5] = [
        (&["--mixed_precision", "fp16"], 1e-2),
        (&["--mixed_precision", "bf16"], 1e-2),
        (&["--mixed_precision", "bf16", "--full_bf16"], 1e-2),
        (&["--mixed_precision", "fp16", "--full_fp16"], 1e-2),
        (&["--mixed_precision", "fp16", "--fp8_base"], 5e-2),
    ];
    for (flags, tolerance) in runs {
        let run = train_with(flags);
        let meta = &run.metadata;
        assert_eq!(meta["ss_mixed_precision"], flags[1], "{flags:?}");
        for (flag, key) in [
            ("--full_fp16", "ss_full_fp16"),
            ("--fp8_base", "ss_fp8_base"),
        ] {
            let given = if flags.contains(&flag) {
                "True"
            } else {
                "False"
            };
            assert_eq!(meta[key], given, "{flags:?} {key}");
        }
        assert_eq!(run.module_names, float32.module_names, "{flags:?}");
        // Without --save_precision the LoRA is saved as it trained, as sd-scripts saves it.
        let saved = match flags.get(2) {
            Some(&"--full_fp16") => "F16",
            Some(&"--full_bf16") => "BF16",
            _ => "F32",
        };
        // (The integer default alpha is an I64 tensor, as sd-scripts stores it.)
        let mut weights = run.dtypes.iter().filter(|d| *d != "I64");
        assert!(weights.all(|d| d == saved), "{flags:?}: {saved}");
        assert_eq!(run.losses.len(), float32.losses.len(), "{flags:?}");
        for (loss, reference) in run.losses.iter().zip(&float32.losses) {
            let off = (loss - reference).abs() / reference.abs();
            assert!(off < tolerance, "{flags:?}: loss {loss} vs {reference}");
        }
    }
}

#[test]
fn tensorboard_events_carry_the_loss_log_under_kohya_tags() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let logs = out.path().join("logs");
    let (model, meta) = (model(), data.path().join("meta_lat.json"));
    let (data_dir, out_dir) = (data.path(), out.path());
    let base: &[&std::ffi::OsStr] = args![
        "--pretrained_model_name_or_path",
        model,
        "--in_json",
        meta,
        "--train_data_dir",
        data_dir,
        "--output_dir",
        out_dir,
        "--max_train_steps",
        "3",
        "--train_batch_size",
        "1",
        "--quiet"
    ];
    let refused = run_expect(
        "train-lora",
        &[base, args!["--log_with", "wandb"]].concat(),
        2,
    );
    assert!(refused.contains("--log_with tensorboard"), "{refused}");
    // --logging_dir alone means TensorBoard, as in sd-scripts.
    let flags: &[&std::ffi::OsStr] = args!["--logging_dir", logs, "--log_prefix", "kohya-"];
    run_expect("train-lora", &[base, flags].concat(), 0);
    let runs: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    let run_name = runs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        run_name.starts_with("kohya-") && run_name.len() == "kohya-".len() + 14,
        "{run_name}"
    );
    let events: Vec<_> = std::fs::read_dir(runs[0].join("network_train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1);
    assert!(events[0].to_string_lossy().contains("events.out.tfevents."));
    let scalars = lorakit_pipeline::formats::tfevents::read_scalars(&events[0]).unwrap();
    let log = std::fs::read_to_string(out.path().join("last_loss.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    assert_eq!(steps.len(), 3);
    for line in &steps {
        let step = line["step"].as_i64().unwrap();
        let find = |tag: &str| {
            scalars
                .iter()
                .find(|(s, t, _)| *s == step && t == tag)
                .map(|(_, _, v)| *v)
        };
        assert_eq!(
            find("loss/current"),
            Some(line["loss"].as_f64().unwrap() as f32)
        );
        assert_eq!(
            find("loss/average"),
            Some(line["loss_average"].as_f64().unwrap() as f32)
        );
        assert_eq!(find("lr/unet"), Some(line["lr"].as_f64().unwrap() as f32));
    }
    assert!(scalars
        .iter()
        .any(|(_, tag, _)| tag == "loss/epoch_average"));
}

#[test]
fn resume_restores_the_run_settings_and_refuses_changed_ones_by_name() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let (out, straight) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (model, meta) = (model(), data.path().join("meta_lat.json"));
    let data_dir = data.path();
    let run_flags: &[&std::ffi::OsStr] = args![
        "--pretrained_model_name_or_path",
        model,
        "--in_json",
        meta,
        "--train_data_dir",
        data_dir,
        "--output_name",
        "resume",
        "--train_batch_size",
        "2",
        "--network_dim",
        "4",
        "--learning_rate",
        "1e-3",
        "--save_state",
        "--quiet"
    ];
    let (out_dir, straight_dir) = (out.path(), straight.path());
    let first: &[&std::ffi::OsStr] = &[
        run_flags,
        args!["--output_dir", out_dir, "--max_train_steps", "1"],
    ]
    .concat();
    run_expect("train-lora", first, 0);
    // No --seed: the run drew one, and the state keeps it with the other settings.
    let resumed = args![
        "--resume",
        "latest",
        "--output_dir",
        out_dir,
        "--max_train_steps",
        "2"
    ];
    let stderr = run_expect("train-lora", resumed, 0);
    assert!(
        stderr.contains("settings, restored from the state:") && stderr.contains("--network_dim 4"),
        "{stderr}"
    );
    let restored = LoraFile::read(&out_dir.join("resume.safetensors"))
        .unwrap()
        .metadata;
    for (key, value) in [
        ("ss_network_dim", "4"),
        ("ss_learning_rate", "0.001"),
        ("ss_batch_size_per_device", "2"),
        ("ss_max_train_steps", "2"),
        ("ss_steps", "2"),
    ] {
        assert_eq!(restored[key], value, "{key}");
    }
    let seed = restored["ss_seed"].as_str();
    let whole: &[&std::ffi::OsStr] = &[
        run_flags,
        args![
            "--output_dir",
            straight_dir,
            "--max_train_steps",
            "2",
            "--seed",
            seed
        ],
    ]
    .concat();
    run_expect("train-lora", whole, 0);
    assert_eq!(
        tensor_data(&out_dir.join("resume.safetensors")),
        tensor_data(&straight_dir.join("resume.safetensors")),
        "a resume without the original flags trains what the uninterrupted run trains"
    );

    let changed = args![
        "--resume",
        "latest",
        "--output_dir",
        out_dir,
        "--network_dim",
        "8",
        "--flip_aug"
    ];
    let stderr = run_expect("train-lora", changed, 2);
    for part in [
        "--network_dim 8 (the run used --network_dim 4)",
        "--flip_aug (the run used the default)",
    ] {
        assert!(stderr.contains(part), "{part}:\n{stderr}");
    }
    let stderr = run_expect("train-lora", args!["--resume", "latest"], 2);
    assert!(stderr.contains("give --output_dir"), "{stderr}");
}

/// The tensor bytes of a safetensors file: everything after its JSON header (which holds the
/// run's times).
fn tensor_data(path: &std::path::Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..].to_vec()
}

#[test]
fn resuming_with_other_network_flags_says_what_the_state_was_saved_with() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let (model, meta) = (model(), data.path().join("meta_lat.json"));
    let (data_dir, out_dir) = (data.path(), out.path());
    let base = args![
        "--pretrained_model_name_or_path",
        model,
        "--in_json",
        meta,
        "--train_data_dir",
        data_dir,
        "--output_dir",
        out_dir,
        "--output_name",
        "resume",
        "--train_batch_size",
        "2",
        "--seed",
        "1",
        "--save_state",
        "--quiet"
    ];
    let mut first = base.to_vec();
    first.extend(args!["--max_train_steps", "1", "--network_dim", "4"]);
    run_expect("train-lora", &first, 0);
    // A state saved before states kept the run's settings: the weights themselves are checked.
    let state_file = out_dir.join("resume-state/train_state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    state
        .as_object_mut()
        .unwrap()
        .remove("lorakit_settings")
        .unwrap();
    std::fs::write(&state_file, state.to_string()).unwrap();
    let mut resumed = base.to_vec();
    resumed.extend(args![
        "--max_train_steps",
        "2",
        "--network_dim",
        "8",
        "--resume",
        "latest"
    ]);
    let stderr = run_expect("train-lora", &resumed, 2);
    for part in [
        "saved with network_dim 4",
        "asks for network_dim 8",
        "--output_dir",
    ] {
        assert!(stderr.contains(part), "{part}:\n{stderr}");
    }
    assert!(!stderr.contains("corrupt"), "{stderr}");
}

/// `stems` of the fixture photos in `work/data`, their golden metadata (captions and tags), latent
/// caches at `resolution` (buckets 128..512) by prepare-latents, and `work/meta_lat.json`.
fn prepare_photos(work: &std::path::Path, stems: &[&str], resolution: &str) -> std::path::PathBuf {
    let data = work.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let golden = std::fs::read_to_string(fixtures().join("golden/metadata/meta_lat.json")).unwrap();
    let golden: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&golden.replace("{DATA}", data.to_str().unwrap())).unwrap();
    let mut chosen = serde_json::Map::new();
    for (key, entry) in golden {
        let path = std::path::Path::new(&key);
        let stem = path.file_stem().unwrap().to_str().unwrap();
        if stems.is_empty() || stems.contains(&stem) {
            let name = path.file_name().unwrap();
            std::fs::copy(fixtures().join("images").join(name), data.join(name)).unwrap();
            chosen.insert(key, entry);
        }
    }
    let source = work.join("meta_in.json");
    std::fs::write(&source, serde_json::to_string_pretty(&chosen).unwrap()).unwrap();
    let meta = work.join("meta_lat.json");
    run_expect(
        "prepare-latents",
        args![
            data,
            source,
            meta,
            model(),
            "--full_path",
            "--max_resolution",
            resolution,
            "--min_bucket_reso",
            "128",
            "--max_bucket_reso",
            "512",
            "--bucket_reso_steps",
            "64",
            "--quiet"
        ],
        0,
    );
    meta
}

/// `--shuffle_caption` / `--keep_tokens` train each step on one of the caption variants
/// cache-text-encoder made with the same settings (seeded: a rerun gives the same losses), and
/// are refused with the command to run when the caches hold none or were made otherwise;
/// `--caption_dropout_rate` / `--caption_dropout_every_n_epochs` train on the cached empty
/// caption.
#[test]
fn caption_augmentation_trains_on_cached_variants_and_the_cached_empty_caption() {
    let work = tempfile::tempdir().unwrap();
    let meta = prepare_photos(
        work.path(),
        &["astronaut", "chelsea", "coins", "cell"],
        "128,128",
    );
    let data = work.path().join("data");
    let model = model();
    let augmented: &[&std::ffi::OsStr] = args!["--shuffle_caption", "--keep_tokens", "1"];
    let encode = |extra: &[&std::ffi::OsStr]| {
        let base: &[&std::ffi::OsStr] = args![meta, model, "--quiet"];
        run_expect("cache-text-encoder", &[base, extra].concat(), 0);
    };
    encode(&[augmented, args!["--variants", "4", "--seed", "3"]].concat());
    let train = |name: &str, extra: &[&std::ffi::OsStr], code: i32| {
        let out = work.path().join(name);
        let base: &[&std::ffi::OsStr] = args![
            "--pretrained_model_name_or_path",
            model,
            "--in_json",
            meta,
            "--train_data_dir",
            data,
            "--output_dir",
            out,
            "--output_name",
            "lora",
            "--max_train_steps",
            "4",
            "--train_batch_size",
            "2",
            "--learning_rate",
            "1e-3",
            "--seed",
            "5",
            "--network_train_unet_only",
            "--quiet"
        ];
        let stderr = run_expect("train-lora", &[base, extra].concat(), code);
        (out, stderr)
    };
    let log = |out: &std::path::Path| std::fs::read_to_string(out.join("lora_loss.jsonl")).unwrap();
    let (plain, _) = train("plain", &[], 0);
    let (shuffled, _) = train("shuffled", augmented, 0);
    let (again, _) = train("again", augmented, 0);
    assert_ne!(
        log(&plain),
        log(&shuffled),
        "variants change what is trained"
    );
    assert_eq!(log(&shuffled), log(&again), "variant choices are seeded");
    let metadata = LoraFile::read(&shuffled.join("lora.safetensors"))
        .unwrap()
        .metadata;
    assert_eq!(metadata["ss_shuffle_caption"], "True");
    assert_eq!(metadata["ss_keep_tokens"], "1");

    // Caption dropout trains on the empty caption cache-text-encoder stored beside its index.
    let empty = work.path().join("meta_lat_te_cache_empty.npz");
    assert!(empty.is_file());
    let (dropped, _) = train("dropped", args!["--caption_dropout_rate", "0.5"], 0);
    let (all_dropped, _) = train("all", args!["--caption_dropout_every_n_epochs", "1"], 0);
    assert_ne!(log(&plain), log(&dropped), "some captions are dropped");
    assert_ne!(log(&dropped), log(&all_dropped), "every caption is dropped");
    let metadata = LoraFile::read(&dropped.join("lora.safetensors"))
        .unwrap()
        .metadata;
    assert_eq!(metadata["ss_caption_dropout_rate"], "0.5");
    std::fs::rename(&empty, work.path().join("moved.npz")).unwrap();
    let (_, stderr) = train("no-empty", args!["--caption_dropout_rate", "0.5"], 2);
    assert!(stderr.contains("run cache-text-encoder on"), "{stderr}");
    std::fs::rename(work.path().join("moved.npz"), &empty).unwrap();

    let (_, stderr) = train("other", args!["--shuffle_caption", "--keep_tokens", "2"], 2);
    assert!(
        stderr.contains("--keep_tokens (the variants were made with 1)"),
        "{stderr}"
    );
    encode(&[]);
    let (_, stderr) = train("none", augmented, 2);
    assert!(
        stderr.contains("4 of 4 text-encoder caches hold none")
            && stderr.contains("--shuffle_caption --keep_tokens 1 --variants N"),
        "{stderr}"
    );
}

/// The `ss_*` / `modelspec.*` metadata of a LoRA trained on the 12 fixture photos prepared at
/// `--resolution 256,256` with buckets 128..512 equals what sd-scripts' `train_network.py` wrote
/// for the same dataset and settings (`golden/sd_scripts_runs/finetune_256.json`), key by key,
/// except the values that differ between any two runs and the ones that differ on purpose
/// ([`crate::common::sd_scripts_metadata_differences`]).
#[test]
fn lora_metadata_matches_sd_scripts_for_the_same_dataset_and_settings() {
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("golden/sd_scripts_runs/finetune_256.json")).unwrap(),
    )
    .unwrap();
    // The layout of the golden run: the 12 photos and golden/metadata/meta_lat.json.
    let work = tempfile::tempdir().unwrap();
    let meta = prepare_photos(work.path(), &[], "256,256");
    let (data, model) = (work.path().join("data"), model());
    let out = work.path().join("out");
    run_expect("cache-text-encoder", args![meta, model, "--quiet"], 0);
    run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model,
            "--in_json",
            meta,
            "--train_data_dir",
            data,
            "--output_dir",
            out,
            "--output_name",
            "golden_lora",
            "--resolution",
            "256,256",
            "--enable_bucket",
            "--min_bucket_reso",
            "128",
            "--max_bucket_reso",
            "512",
            "--bucket_reso_steps",
            "64",
            "--train_batch_size",
            "2",
            "--network_dim",
            "4",
            "--network_alpha",
            "1",
            "--save_precision",
            "float",
            "--max_train_steps",
            "1",
            "--cache_latents",
            "--mixed_precision",
            "no",
            "--seed",
            "42",
            "--learning_rate",
            "1e-4",
            "--optimizer_type",
            "AdamW",
            "--max_data_loader_n_workers",
            "0",
            "--quiet"
        ],
        0,
    );
    let ours = LoraFile::read(&out.join("golden_lora.safetensors"))
        .unwrap()
        .metadata;
    let differences = crate::common::sd_scripts_metadata_differences(&golden, &ours);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// `--output_config --config_file F` writes the command line's options as TOML (numbers as
/// numbers) and trains nothing; `--config_file F` then gives them, the command line overrides
/// them (here with an abbreviated option name, as argparse allows), and an unknown key is
/// refused by name.
#[test]
fn config_files_are_written_and_read_as_sd_scripts_does() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let (out, configs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (model, meta) = (model(), data.path().join("meta_lat.json"));
    let (data_dir, out_dir) = (data.path(), out.path());
    let config = configs.path().join("run");
    let written = config.with_extension("toml");
    let stderr = run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model,
            "--in_json",
            meta,
            "--train_data_dir",
            data_dir,
            "--output_dir",
            out_dir,
            "--output_name",
            "configured",
            "--network_dim",
            "8",
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "1",
            "--train_batch_size",
            "2",
            "--save_state",
            "--output_config",
            "--config_file",
            config
        ],
        0,
    );
    assert!(stderr.contains("wrote the settings"), "{stderr}");
    assert!(!out_dir.join("configured.safetensors").exists());
    let text = std::fs::read_to_string(&written).unwrap();
    for line in [
        "network_dim = 8",
        "learning_rate = 0.001",
        "max_train_steps = 1",
        "save_state = true",
        "output_name = \"configured\"",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    // Options that change nothing here are named in the log, with why.
    let stderr = run_expect(
        "train-lora",
        args![
            "--config_file",
            written,
            "--network_di",
            "4",
            "--torch_compile",
            "--text_encoder_lr",
            "1e-5"
        ],
        0,
    );
    for said in [
        "--torch_compile is accepted and has no effect here: changes only how PyTorch runs",
        "training the text encoder and the UNet",
        "text-encoder learning rate 0.00001",
    ] {
        assert!(stderr.contains(said), "{said}:\n{stderr}");
    }
    let metadata = LoraFile::read(&out_dir.join("configured.safetensors"))
        .unwrap()
        .metadata;
    assert_eq!(metadata["ss_network_dim"], "4");
    assert_eq!(metadata["ss_learning_rate"], "0.001");
    assert!(out_dir.join("configured-state").is_dir());

    let bad = configs.path().join("bad.toml");
    std::fs::write(&bad, "[training]\nnetwork_dims = 4\n").unwrap();
    let stderr = run_expect("train-lora", args!["--config_file", bad], 1);
    assert!(
        stderr.contains("`network_dims` is not an option"),
        "{stderr}"
    );
}

#[test]
fn a_torch_scheduler_class_runs_with_its_rates_and_refuses_a_warmup() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], code: i32| {
        let mut argv: Vec<std::ffi::OsString> = vec![
            "--pretrained_model_name_or_path".into(),
            model().into(),
            "--in_json".into(),
            data.path().join("meta_lat.json").into(),
            "--train_data_dir".into(),
            data.path().into(),
            "--output_dir".into(),
            out.path().into(),
        ];
        let fixed = [
            "--output_name",
            "sched",
            "--max_train_steps",
            "3",
            "--learning_rate",
            "1e-3",
            "--network_train_unet_only",
            "--quiet",
        ];
        argv.extend(fixed.iter().chain(extra).map(std::ffi::OsString::from));
        let argv: Vec<&std::ffi::OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
        run_expect("train-lora", &argv, code)
    };
    // As corpus line 11 writes it (`--option=value`).
    let stderr = run(
        &[
            "--lr_scheduler_type=CosineAnnealingLR",
            "--lr_scheduler_args=T_max=4",
            "--lr_warmup_steps",
            "1",
        ],
        2,
    );
    assert!(
        stderr.contains("--lr_warmup_steps: --lr_scheduler_type CosineAnnealingLR takes no warmup"),
        "{stderr}"
    );
    run(
        &[
            "--lr_scheduler_type=torch.optim.lr_scheduler.CosineAnnealingLR",
            "--lr_scheduler_args",
            "T_max=4",
            "eta_min=1e-5",
        ],
        0,
    );
    let file = LoraFile::read(&out.path().join("sched.safetensors")).unwrap();
    assert_eq!(
        file.metadata["ss_lr_scheduler"], "constant",
        "as sd-scripts writes it"
    );
    let log = std::fs::read_to_string(out.path().join("sched_loss.jsonl")).unwrap();
    let lrs: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(lrs.len(), 3);
    for (s, lr) in lrs.iter().enumerate() {
        let torch =
            1e-5 + (1e-3 - 1e-5) * (1.0 + (std::f64::consts::PI * s as f64 / 4.0).cos()) / 2.0;
        assert!(
            (lr - torch).abs() <= 1e-6 * torch,
            "step {s}: {lr} vs {torch}"
        );
    }
}

/// `--output_config` also writes a command line whose dataset is kohya folders (no `--in_json`:
/// train-lora would prepare them), and writes nothing else; `--config_file` reads it back.
#[test]
fn a_kohya_folder_command_line_is_written_as_a_config_file() {
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    crate::common::copy_dir(&fixtures().join("images"), &img.join("2_cat"));
    let config = work.path().join("kohya.toml");
    let out = work.path().join("out");
    let stderr = run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model(),
            "--train_data_dir",
            img,
            "--output_dir",
            out,
            "--resolution",
            "256,256",
            "--max_train_steps",
            "2",
            "--output_config",
            "--config_file",
            config
        ],
        0,
    );
    assert!(stderr.contains("wrote the settings"), "{stderr}");
    assert!(
        !out.exists(),
        "--output_config prepared or trained something"
    );
    let table: toml::Table = std::fs::read_to_string(&config).unwrap().parse().unwrap();
    assert_eq!(table["max_train_steps"].as_integer(), Some(2));
    assert_eq!(table["train_data_dir"].as_str(), img.to_str());
    assert!(!table.contains_key("in_json"));
}

#[test]
fn device_cuda_in_a_build_without_the_feature_is_refused_naming_it() {
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
            "--device",
            "cuda"
        ],
        2,
    );
    assert!(stderr.contains("--features cuda"), "{stderr}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

/// `--recorded_noise` holds the final noise: options that would change it are refused by name.
#[test]
fn recorded_noise_is_refused_with_the_options_that_change_the_noise() {
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
            "--network_train_unet_only",
            "--recorded_noise",
            fixtures().join("golden/sdxl_train_run/noise.npz"),
            "--noise_offset",
            "0.1",
            "--quiet"
        ],
        2,
    );
    assert!(
        stderr.contains("--noise_offset with --recorded_noise"),
        "{stderr}"
    );
    assert!(
        !out.path().join("last.safetensors").exists(),
        "nothing trained"
    );
}
