//! End-to-end tests of `train-lora --network_module lycoris.kohya`: a LoHa and a LoCon with DoRA
//! train with the text encoder and save exactly the keys lycoris-lora saves for the same network
//! (golden/lycoris/loha_keys.json, locon_dora_keys.json), lycoris itself loads the files when the
//! Python reference is installed, runs resume bit for bit, and options lycoris has but lorakit
//! does not implement are refused by name.

use std::path::{Path, PathBuf};

use crate::common;

use common::{fixtures, make_training_caches, run_expect};

fn model() -> PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

/// Loads `file` with lycoris' own loader on diffusers/transformers models of the tiny
/// architecture and prints the number of modules it made; fails on any key the network does not
/// take or lacks.
const LYCORIS_LOAD: &str = r#"
import json, sys
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from lycoris import kohya
arch = json.load(open(sys.argv[1]))
unet = UNet2DConditionModel(**arch["unet"])
te = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
network, weights = kohya.create_network_from_weights(1.0, sys.argv[2], None, te, unet)
network.apply_to(te, unet, True, True)
result = network.load_state_dict(weights, strict=True)
print("modules", len(network.unet_loras), len(network.text_encoder_loras))
"#;

#[test]
fn lycoris_loha_trains_with_the_text_encoder_and_saves_lycoris_keys() {
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
            "--output_name",
            "loha",
            "--network_module",
            "lycoris.kohya",
            "--network_dim",
            "4",
            "--network_alpha",
            "2",
            "--network_args",
            "algo=loha",
            "conv_dim=2",
            "conv_alpha=1",
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "2",
            "--seed",
            "5"
        ],
        0,
    );
    assert!(stderr.contains("training the text encoder"), "{stderr}");
    let path = out.path().join("loha.safetensors");
    let (saved, metadata) = common::safetensors_header(&path);

    let golden = fixtures().join("golden/lycoris/loha_keys.json");
    let (expected, _) = common::golden_keys(&golden);
    assert_eq!(
        saved, expected,
        "the saved keys, shapes and dtypes are lycoris'"
    );
    assert_eq!(metadata["ss_network_module"], "lycoris.kohya");
    assert_eq!(metadata["ss_network_dim"], "4");
    assert_eq!(metadata["ss_network_alpha"], "2.0");
    let args: serde_json::Value =
        serde_json::from_str(metadata["ss_network_args"].as_str().unwrap()).unwrap();
    assert_eq!(args["algo"], "loha");
    assert_eq!(args["conv_dim"], "2");

    // hada_w2_a starts at zero: trained modules moved.
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let moved = |name: &str| {
        let w = &tensors[&format!("{name}.hada_w2_a")];
        w.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    };
    assert!(moved("lora_unet_down_blocks_1_resnets_0_conv1"));
    assert!(moved(
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    ));
    assert!(moved(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    ));

    // A second run starts from the file.
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
            "--output_name",
            "again",
            "--network_module",
            "lycoris.kohya",
            "--network_dim",
            "4",
            "--network_alpha",
            "2",
            "--network_args",
            "algo=loha",
            "conv_dim=2",
            "conv_alpha=1",
            "--network_weights",
            &path,
            "--max_train_steps",
            "1",
            "--seed",
            "5"
        ],
        0,
    );
    assert!(stderr.contains("354 LyCORIS modules loaded"), "{stderr}");

    assert_lycoris_loads(&path);
}

/// lycoris' own loader takes `path` strictly (282 UNet and 72 text-encoder modules), when the
/// reference Python has lycoris-lora.
fn assert_lycoris_loads(path: &Path) {
    assert_lycoris_loads_modules(path, 282, 72);
}

/// lycoris' own loader takes `path` strictly, making `unet` UNet and `text` text-encoder
/// modules, when the reference Python has lycoris-lora.
fn assert_lycoris_loads_modules(path: &Path, unet: usize, text: usize) {
    match common::reference_python("lycoris.kohya, diffusers, transformers") {
        Some(python) => {
            let arch = fixtures().join("sd15-tiny/arch.json");
            let stdout =
                common::run_reference_script(&python, LYCORIS_LOAD, args![arch, path], "lycoris");
            assert!(
                stdout.contains(&format!("modules {unet} {text}")),
                "{stdout}"
            );
        }
        None => eprintln!("lycoris-lora is not installed: the load in lycoris is skipped"),
    }
}

#[test]
fn a_locon_with_dora_trains_and_saves_lycoris_keys() {
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
            "dora",
            "--network_module",
            "lycoris.kohya",
            "--network_dim",
            "4",
            "--network_alpha",
            "2",
            "--network_args",
            "algo=locon",
            "conv_dim=2",
            "conv_alpha=1",
            "dora_wd=True",
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "2",
            "--seed",
            "5"
        ],
        0,
    );
    let path = out.path().join("dora.safetensors");
    let (saved, metadata) = common::safetensors_header(&path);
    let (expected, _) =
        common::golden_keys(&fixtures().join("golden/lycoris/locon_dora_keys.json"));
    assert_eq!(
        saved, expected,
        "the saved keys, shapes and dtypes are lycoris'"
    );
    let args: serde_json::Value =
        serde_json::from_str(metadata["ss_network_args"].as_str().unwrap()).unwrap();
    assert_eq!(args["dora_wd"], "True");
    // lora_up starts at zero and dora_scale at the frozen rows' norms: both moved.
    let trained = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let module = "lora_unet_down_blocks_1_resnets_0_conv1";
    let up = &trained[&format!("{module}.lora_up.weight")];
    assert!(
        up.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    let golden = candle_core::safetensors::load(
        fixtures().join("golden/lycoris/locon_dora.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        trained[&format!("{module}.dora_scale")].dims(),
        golden[&format!("{module}.dora_scale")].dims()
    );
    assert_lycoris_loads(&path);
}

#[test]
fn lycoris_options_lorakit_lacks_are_refused_by_name() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["--network_args", "algo=ia3"], "algo=ia3"),
        (&["--network_args", "algo=loha", "use_cp=True"], "use_cp"),
        (
            &["--network_args", "algo=full", "rank_dropout=0.1"],
            "algo=full rank_dropout",
        ),
        (
            &["--network_args", "algo=lokr", "decompose_both=False"],
            "decompose_both",
        ),
        (&["--network_args", "preset=ia3"], "preset=ia3"),
        (&["--network_args", "preset=attn"], "preset=attn"),
        (&["--scale_weight_norms", "1"], "--scale_weight_norms"),
    ];
    let (model, meta) = (model(), data.path().join("meta_lat.json"));
    let (data_dir, out_dir) = (data.path().to_path_buf(), out.path().to_path_buf());
    for (flags, named) in cases {
        let mut args = args![
            "--pretrained_model_name_or_path",
            model,
            "--in_json",
            meta,
            "--train_data_dir",
            data_dir,
            "--output_dir",
            out_dir,
            "--network_module",
            "lycoris.kohya"
        ]
        .to_vec();
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        let stderr = run_expect("train-lora", &args, 2);
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
    }
}

#[test]
fn lora_tools_list_lycoris_weights_and_refuse_to_merge_them_naming_lycoris_merge() {
    let loha = fixtures().join("golden/lycoris/loha.safetensors");
    let output = common::run("check-lora", args![loha, "--json"]);
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // Every LoHa factor (4 per module, alpha aside) is listed with its statistics.
    assert_eq!(report["lora_tensors"], 354 * 4);
    let tensors = report["tensors"].as_array().unwrap();
    let conv1 = (tensors.iter())
        .find(|t| t["key"] == "lora_unet_down_blocks_1_resnets_0_conv1.hada_w1_b")
        .unwrap();
    assert_eq!(conv1["shape"], serde_json::json!([2, 288]));
    assert!(conv1["mean_abs"].as_f64().unwrap() > 0.0);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    // LoCon files with DoRA or Tucker tensors too: up · down alone is not their change.
    for name in ["loha", "locon_dora", "locon_tucker"] {
        let file = fixtures().join(format!("golden/lycoris/{name}.safetensors"));
        for (tool, flags) in [
            (
                "merge-lora",
                args!["--save_to", out, "--models", file, "--ratios", "1"],
            ),
            (
                "resize-lora",
                args!["--model", file, "--save_to", out, "--new_rank", "2"],
            ),
        ] {
            let stderr = run_expect(tool, flags, 1);
            assert!(
                stderr.contains("a LyCORIS") && stderr.contains("tools/merge.py"),
                "{name} {tool}: {stderr}"
            );
            assert!(!out.exists());
        }
    }
}

#[test]
fn lycoris_lokr_with_rank_and_module_dropout_resumes_bit_for_bit() {
    // The LoKr factors, their optimizer state and the dropout draws continue exactly.
    let args = ["algo=lokr", "rank_dropout=0.3", "module_dropout=0.2"];
    assert_resumes_bit_for_bit(&args, ".lokr_w2_b");
}

#[test]
fn lycoris_locon_with_dora_resumes_bit_for_bit() {
    assert_resumes_bit_for_bit(&["algo=locon", "dora_wd=True"], ".lora_up.weight");
}

#[test]
fn lycoris_dora_by_input_column_resumes_bit_for_bit() {
    let args = ["algo=locon", "dora_wd=True", "wd_on_output=False"];
    assert_resumes_bit_for_bit(&args, ".lora_up.weight");
}

#[test]
fn lycoris_loha_with_use_scalar_resumes_bit_for_bit() {
    // The state keeps the scalar apart; the file's hada_w1_a holds it multiplied in (0 at first).
    assert_resumes_bit_for_bit(&["algo=loha", "use_scalar=True"], ".hada_w1_a");
}

/// Two steps with `network_args`, then two more from the saved state, against four straight:
/// every saved tensor equal, and the zero-initialised tensors ending in `moved` moved.
fn assert_resumes_bit_for_bit(network_args: &[&str], moved_suffix: &str) {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let (resumed, straight) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (model, meta) = (model(), data.path().join("meta_lat.json"));
    let data_dir = data.path();
    let mut flags: Vec<&std::ffi::OsStr> = args![
        "--pretrained_model_name_or_path",
        model,
        "--in_json",
        meta,
        "--train_data_dir",
        data_dir,
        "--output_name",
        "lycoris",
        "--network_train_unet_only",
        "--network_module",
        "lycoris.kohya",
        "--train_batch_size",
        "1",
        "--learning_rate",
        "1e-3",
        "--seed",
        "9",
        "--save_state",
        "--quiet",
        "--network_args"
    ]
    .to_vec();
    flags.extend(network_args.iter().map(std::ffi::OsStr::new));
    let (resumed_dir, straight_dir) = (resumed.path(), straight.path());
    let run = |dir: &Path, steps: &str| {
        let args: Vec<std::ffi::OsString> = (flags.iter().map(|s| s.to_os_string()))
            .chain(["--output_dir".into(), dir.into()])
            .chain(["--max_train_steps".into(), steps.into()])
            .collect();
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_os_str()).collect();
        run_expect("train-lora", &args, 0);
    };
    run(resumed_dir, "2");
    run_expect(
        "train-lora",
        args![
            "--resume",
            "latest",
            "--output_dir",
            resumed_dir,
            "--max_train_steps",
            "4"
        ],
        0,
    );
    run(straight_dir, "4");
    let tensors = |dir: &Path| {
        candle_core::safetensors::load(dir.join("lycoris.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (a, b) = (tensors(resumed_dir), tensors(straight_dir));
    assert!(a.keys().all(|k| k.starts_with("lora_unet_")));
    assert!(a.keys().any(|k| k.ends_with(moved_suffix)));
    assert_eq!(a.len(), b.len());
    let mut moved = 0;
    for (name, tensor) in &a {
        let x: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{name} differs after resuming");
        if name.ends_with(moved_suffix) && x.iter().any(|&v| v != 0.0) {
            moved += 1;
        }
    }
    assert!(moved > 0, "training moved the zero-initialised factors");
}

#[test]
fn loha_and_dora_files_are_merged_as_base_weights() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    for file in ["loha", "locon_dora"] {
        let weights = fixtures().join(format!("golden/lycoris/{file}.safetensors"));
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
                "--base_weights",
                weights,
                "--base_weights_multiplier",
                "0.5",
                "--max_train_steps",
                "1",
                "--seed",
                "5"
            ],
            0,
        );
        assert!(
            stderr.contains("354 modules merged into the base model at 0.5"),
            "{file}: {stderr}"
        );
    }
}

#[test]
fn lycoris_full_trains_saves_diff_resumes_and_merges_as_base_weights() {
    // algo=full with the attn-mlp preset and the text encoder: lycoris' keys (diff, diff_b).
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
            "full",
            "--network_module",
            "lycoris.kohya",
            "--network_args",
            "algo=full",
            "preset=attn-mlp",
            "--learning_rate",
            "1e-4",
            "--max_train_steps",
            "1",
            "--seed",
            "5"
        ],
        0,
    );
    let path = out.path().join("full.safetensors");
    let (saved, _) = common::safetensors_header(&path);
    let (expected, _) = common::golden_keys(&fixtures().join("golden/lycoris/full_keys.json"));
    assert_eq!(
        saved, expected,
        "the saved keys, shapes and dtypes are lycoris'"
    );
    // Options lycoris' full module would ignore are refused.
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
            "--network_module",
            "lycoris.kohya",
            "--network_args",
            "algo=full",
            "dora_wd=True"
        ],
        2,
    );
    assert!(stderr.contains("algo=full dora_wd"), "{stderr}");
    // The golden file as base weights: every UNet and text-encoder module merged.
    let golden = fixtures().join("golden/lycoris/full.safetensors");
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
            "--base_weights",
            golden,
            "--base_weights_multiplier",
            "0.5",
            "--max_train_steps",
            "1",
            "--seed",
            "5"
        ],
        0,
    );
    assert!(
        stderr.contains("264 modules merged into the base model at 0.5"),
        "{stderr}"
    );
    // merge-lora and resize-lora refuse it, naming lycoris' merge.
    let merged = out.path().join("merged.safetensors");
    let stderr = run_expect(
        "merge-lora",
        args!["--save_to", merged, "--models", golden, "--ratios", "1"],
        1,
    );
    assert!(stderr.contains("tools/merge.py"), "{stderr}");
    assert!(!merged.exists());
    assert_resumes_bit_for_bit(&["algo=full", "preset=attn-mlp"], ".diff");
}

#[test]
fn lycoris_dylora_trains_saves_lycoris_keys_resumes_and_merges_as_base_weights() {
    // algo=dylora with the text encoder: lycoris' keys (blocks saved as one lora_up / lora_down,
    // lora_up [out, dim] for convolutions too), ss_network_args as given.
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let (model, meta, data_dir) = (model(), data.path().join("meta_lat.json"), data.path());
    let out_dir = out.path();
    let base: Vec<&std::ffi::OsStr> = args![
        "--pretrained_model_name_or_path",
        model,
        "--in_json",
        meta,
        "--train_data_dir",
        data_dir,
        "--output_dir",
        out_dir,
        "--network_module",
        "lycoris.kohya",
        "--network_dim",
        "4",
        "--network_alpha",
        "2",
        "--learning_rate",
        "1e-3",
        "--train_batch_size",
        "2",
        "--seed",
        "5"
    ]
    .to_vec();
    let with = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        (base.iter().map(|s| s.to_os_string()))
            .chain(extra.iter().map(|s| s.into()))
            .collect()
    };
    let train = |extra: &[&str], code: i32| {
        let args = with(extra);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_os_str()).collect();
        run_expect("train-lora", &args, code)
    };
    let network = [
        "--network_args",
        "algo=dylora",
        "conv_dim=4",
        "conv_alpha=1",
        "block_size=2",
    ];
    let mut first = network.to_vec();
    first.extend(["--output_name", "dylora", "--max_train_steps", "2"]);
    train(&first, 0);
    let path = out.path().join("dylora.safetensors");
    let (saved, metadata) = common::safetensors_header(&path);
    let (expected, _) = common::golden_keys(&fixtures().join("golden/lycoris/dylora_keys.json"));
    assert_eq!(
        saved, expected,
        "the saved keys, shapes and dtypes are lycoris'"
    );
    let args: serde_json::Value =
        serde_json::from_str(metadata["ss_network_args"].as_str().unwrap()).unwrap();
    assert_eq!(args["algo"], "dylora");
    assert_eq!(args["block_size"], "2");
    // lora_up starts at zero: some block of each trained module moved.
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    for module in [
        "lora_unet_down_blocks_1_resnets_0_conv1",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    ] {
        let up = &tensors[&format!("{module}.lora_up.weight")];
        let moved = up.abs().unwrap().max_all().unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "{module}");
    }
    // A second run starts from the file: every module takes its blocks.
    let mut second = network.to_vec();
    second.extend([
        "--network_weights",
        path.to_str().unwrap(),
        "--max_train_steps",
        "1",
    ]);
    let stderr = train(&second, 0);
    assert!(stderr.contains("354 LyCORIS modules loaded"), "{stderr}");
    // The file as base weights (a LoRA layout to every reader): all modules merged.
    let stderr = train(
        &[
            "--base_weights",
            path.to_str().unwrap(),
            "--base_weights_multiplier",
            "0.5",
            "--max_train_steps",
            "1",
        ],
        0,
    );
    assert!(
        stderr.contains("354 modules merged into the base model at 0.5"),
        "{stderr}"
    );
    // A dim that is not a multiple of block_size, and options lycoris' dylora ignores.
    for (extra, named) in [
        (
            &["--network_args", "algo=dylora", "block_size=3"][..],
            "block_size 3",
        ),
        (
            &["--network_args", "algo=dylora", "dora_wd=True"][..],
            "algo=dylora dora_wd",
        ),
    ] {
        let stderr = train(extra, 2);
        assert!(stderr.contains(named), "{extra:?}: {stderr}");
    }
    assert_resumes_bit_for_bit(
        &["algo=dylora", "conv_dim=4", "block_size=2"],
        ".lora_up.weight",
    );
}

#[test]
fn a_preset_with_algo_maps_trains_each_module_with_its_algorithm() {
    // golden/lycoris/algo_map.toml: LoHa, LoKr (DoRA on the text encoder's MLPs) and Tucker
    // LoCon modules by class and by name, as lycoris builds them.
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let preset = fixtures().join("golden/lycoris/algo_map.toml");
    let preset_arg = format!("preset={}", preset.display());
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
            "mapped",
            "--network_module",
            "lycoris.kohya",
            "--network_dim",
            "4",
            "--network_alpha",
            "2",
            "--network_args",
            "algo=locon",
            "conv_dim=2",
            "conv_alpha=1",
            preset_arg,
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "1",
            "--seed",
            "5"
        ],
        0,
    );
    let path = out.path().join("mapped.safetensors");
    let (saved, _) = common::safetensors_header(&path);
    let (expected, _) = common::golden_keys(&fixtures().join("golden/lycoris/algo_map_keys.json"));
    assert_eq!(
        saved, expected,
        "the saved keys, shapes and dtypes are lycoris'"
    );
    assert_lycoris_loads(&path);
}

#[test]
fn lycoris_train_norm_trains_the_norms_resumes_and_merges_as_base_weights() {
    // LoCon with train_norm and the text encoder: lycoris' keys (w_norm / b_norm on the UNet's
    // 108 GroupNorm and LayerNorm layers inside the targets).
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let (model, meta, data_dir, out_dir) = (
        model(),
        data.path().join("meta_lat.json"),
        data.path(),
        out.path(),
    );
    run_expect(
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
            "norm",
            "--network_module",
            "lycoris.kohya",
            "--network_dim",
            "4",
            "--network_alpha",
            "2",
            "--network_args",
            "algo=locon",
            "conv_dim=2",
            "conv_alpha=1",
            "train_norm=True",
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "2",
            "--seed",
            "5"
        ],
        0,
    );
    let path = out_dir.join("norm.safetensors");
    let (saved, _) = common::safetensors_header(&path);
    let (expected, _) =
        common::golden_keys(&fixtures().join("golden/lycoris/locon_norm_keys.json"));
    assert_eq!(
        saved, expected,
        "the saved keys, shapes and dtypes are lycoris'"
    );
    // w_norm and b_norm start at zero: they moved.
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    for part in ["w_norm", "b_norm"] {
        let key = format!("lora_unet_down_blocks_1_resnets_0_norm1.{part}");
        let moved = tensors[&key].abs().unwrap().max_all().unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "{key}");
    }
    assert_lycoris_loads_modules(&path, 390, 72);
    // check-lora lists the norm weights; merge-lora refuses the file, naming them.
    let output = common::run("check-lora", args![path, "--json"]);
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["lora_tensors"], 354 * 2 + 108 * 2);
    let merged = out_dir.join("merged.safetensors");
    let stderr = run_expect(
        "merge-lora",
        args!["--save_to", merged, "--models", path, "--ratios", "1"],
        1,
    );
    assert!(stderr.contains("w_norm"), "{stderr}");
    assert!(!merged.exists());
    // The golden file as base weights: every module, norms included, merged.
    let golden = fixtures().join("golden/lycoris/locon_norm.safetensors");
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
            "--base_weights",
            golden,
            "--base_weights_multiplier",
            "0.5",
            "--max_train_steps",
            "1",
            "--seed",
            "5"
        ],
        0,
    );
    assert!(
        stderr.contains("462 modules merged into the base model at 0.5"),
        "{stderr}"
    );
    assert_resumes_bit_for_bit(&["train_norm=True", "rank_dropout=0.3"], ".w_norm");
}
