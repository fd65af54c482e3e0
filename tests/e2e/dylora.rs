//! End-to-end tests of `train-lora --network_module networks.dylora`: a DyLoRA trains with the
//! text encoder and saves exactly the keys sd-scripts' DyLoRA saves for the same network
//! (golden/dylora/dylora_keys.json), only whole `unit` blocks of ranks move, a second run loads
//! the file, resize-lora reduces it, a resumed run equals a straight one bit for bit, and what DyLoRA lacks is refused.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::common;

use common::{fixtures, make_training_caches, run_expect};

fn model() -> PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

/// The golden network: dim 4, alpha 2, conv_dim 4, unit 2.
const NETWORK: [&str; 9] = [
    "--network_module",
    "networks.dylora",
    "--network_dim",
    "4",
    "--network_alpha",
    "2",
    "--network_args",
    "conv_dim=4",
    "unit=2",
];

/// train-lora on the training caches in `data` with `flags` after the common ones.
fn train(data: &Path, out: &Path, flags: &[&OsStr], code: i32) -> String {
    let mut args: Vec<OsString> = vec![
        "--pretrained_model_name_or_path".into(),
        model().into(),
        "--in_json".into(),
        data.join("meta_lat.json").into(),
        "--train_data_dir".into(),
        data.into(),
        "--output_dir".into(),
        out.into(),
    ];
    args.extend(flags.iter().map(|f| f.to_os_string()));
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    run_expect("train-lora", &args, code)
}

#[test]
fn dylora_trains_with_the_text_encoder_saves_sd_scripts_keys_and_moves_whole_units() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let mut flags: Vec<&OsStr> = NETWORK.iter().map(OsStr::new).collect();
    flags.extend_from_slice(args![
        "--output_name",
        "dylora",
        "--learning_rate",
        "1e-3",
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "2",
        "--seed",
        "5"
    ]);
    let stderr = train(data.path(), out.path(), &flags, 0);
    assert!(stderr.contains("training the text encoder"), "{stderr}");
    let path = out.path().join("dylora.safetensors");
    let (saved, metadata) = common::safetensors_header(&path);
    let (expected, _) = common::golden_keys(&fixtures().join("golden/dylora/dylora_keys.json"));
    assert_eq!(
        saved, expected,
        "the saved keys, shapes and dtypes are sd-scripts'"
    );
    assert_eq!(metadata["ss_network_module"], "networks.dylora");
    assert_eq!(metadata["ss_network_dim"], "4");
    let args: serde_json::Value =
        serde_json::from_str(metadata["ss_network_args"].as_str().unwrap()).unwrap();
    assert_eq!(args["unit"], "2");

    // lora_up starts at zero; a rank moves only in a step that drew its unit, so the two ranks
    // of a unit move together, and with two draws per module some units stay at zero.
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let (mut moved, mut still) = (0, 0);
    for (key, up) in tensors
        .iter()
        .filter(|(k, _)| k.ends_with(".lora_up.weight"))
    {
        let up = up.flatten_from(1).unwrap();
        let columns: Vec<bool> = (0..4)
            .map(|i| {
                let column = up.narrow(1, i, 1).unwrap().abs().unwrap();
                column.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
            })
            .collect();
        for unit in columns.chunks(2) {
            assert_eq!(unit[0], unit[1], "{key}: {columns:?}");
            match unit[0] {
                true => moved += 1,
                false => still += 1,
            }
        }
    }
    assert!(moved > 0 && still > 0, "units moved {moved}, still {still}");

    // A second run starts from the file.
    let mut again: Vec<&OsStr> = NETWORK.iter().map(OsStr::new).collect();
    again.extend_from_slice(args![
        "--output_name",
        "again",
        "--network_weights",
        path,
        "--max_train_steps",
        "1",
        "--seed",
        "5"
    ]);
    let stderr = train(data.path(), out.path(), &again, 0);
    assert!(stderr.contains("350 DyLoRA modules loaded"), "{stderr}");

    // The file is a LoRA file to the LoRA tools.
    let resized = out.path().join("resized.safetensors");
    run_expect(
        "resize-lora",
        args!["--model", path, "--save_to", resized, "--new_rank", "2"],
        0,
    );
    let (keys, _) = common::safetensors_header(&resized);
    let down = &keys["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"];
    assert_eq!(down.0, [2, 32, 3, 3]);
}

#[test]
fn dylora_resumes_bit_for_bit() {
    // Two steps, then two more from the saved state, against four straight: the per-rank
    // variables, their optimizer state (steps counted per rank) and the rank draws continue
    // exactly.
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let (resumed, straight) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut flags: Vec<&OsStr> = NETWORK.iter().map(OsStr::new).collect();
    flags.extend_from_slice(args![
        "--output_name",
        "dylora",
        "--network_train_unet_only",
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--seed",
        "9",
        "--save_state",
        "--quiet"
    ]);
    let run = |dir: &Path, steps: &str| {
        let mut all = flags.clone();
        all.extend_from_slice(args!["--max_train_steps", steps]);
        train(data.path(), dir, &all, 0);
    };
    run(resumed.path(), "2");
    run_expect(
        "train-lora",
        args![
            "--resume",
            "latest",
            "--output_dir",
            resumed.path(),
            "--max_train_steps",
            "4"
        ],
        0,
    );
    run(straight.path(), "4");
    let tensors = |dir: &Path| {
        candle_core::safetensors::load(dir.join("dylora.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (a, b) = (tensors(resumed.path()), tensors(straight.path()));
    assert_eq!(a.len(), 278 * 3);
    assert_eq!(a.len(), b.len());
    for (name, tensor) in &a {
        let x: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{name} differs after resuming");
    }
}

#[test]
fn dylora_options_it_lacks_are_refused_by_name() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--network_args", "conv_dim=2"], "conv_dim"),
        (&["--network_args", "unit=3"], "unit=3"),
        (&["--network_args", "conv_alpha=1"], "conv_alpha"),
        (&["--network_args", "rank_dropout=0.1"], "rank_dropout"),
        (&["--network_dropout", "0.1"], "--network_dropout"),
        (&["--scale_weight_norms", "1"], "--scale_weight_norms"),
    ];
    for (extra, named) in cases {
        let mut flags: Vec<&OsStr> = args![
            "--network_module",
            "networks.dylora",
            "--network_dim",
            "4",
            "--network_alpha",
            "2"
        ]
        .to_vec();
        flags.extend(extra.iter().map(OsStr::new));
        let stderr = train(data.path(), out.path(), &flags, 2);
        assert!(stderr.contains(named), "{extra:?}: {stderr}");
    }
}
