//! End-to-end tests of train-lora training the text encoder (sd-scripts' default, without
//! `--network_train_unet_only`): a kohya-style command line saves sd-scripts' full key set, and
//! the text-encoder modules it saves have moved and change the encoder's output.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, make_training_caches, run_expect};
use lorakit_pipeline::models::clip::encode_sd;
use lorakit_pipeline::models::text_encoders::load_text_encoders;
use lorakit_pipeline::networks::lora::{LoraFile, LoraNetwork};

fn model() -> std::path::PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

/// The text states of a fixed caption with the text-encoder modules of `lora` (if any).
fn text_states(lora: Option<&std::path::Path>) -> Tensor {
    let mut loaded = load_text_encoders(&model(), DType::F32, &Device::Cpu).unwrap();
    let encoder = &mut loaded.encoders[0];
    encoder.set_lora_prefix("lora_te");
    if let Some(path) = lora {
        let (network, _) = LoraNetwork::load(encoder, path, 1.0, &Device::Cpu).unwrap();
        assert_eq!(
            network.modules.len(),
            72,
            "every text-encoder module is loaded"
        );
    }
    let ids: Vec<u32> = [49406, 320, 2368, 267, 2368, 49407]
        .into_iter()
        .chain(std::iter::repeat_n(49407, 71))
        .collect();
    let ids = Tensor::from_vec(ids, (1, 1, 77), &Device::Cpu).unwrap();
    encode_sd(encoder, &ids, 2).unwrap()
}

/// Loads `file` strictly with sd-scripts' `networks.lora` (its `create_network_from_weights`,
/// `apply_to` and `load_state_dict(strict=True)`) on diffusers/transformers models of the tiny
/// architecture, and prints the number of UNet and text-encoder modules it made.
const SD_SCRIPTS_LOAD: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[3])
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from networks import lora
arch = json.load(open(sys.argv[1]))
unet = UNet2DConditionModel(**arch["unet"])
te = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
network, weights = lora.create_network_from_weights(1.0, sys.argv[2], None, te, unet, for_inference=True)
network.apply_to(te, unet, True, True)
network.load_state_dict(weights, strict=True)
print("modules", len(network.unet_loras), len(network.text_encoder_loras))
"#;

#[test]
fn kohya_command_line_trains_the_text_encoder_with_sd_scripts_keys() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    // The text-encoder caches are not read in this mode: without them training still runs.
    for stem in ["one", "two"] {
        std::fs::remove_file(data.path().join(format!("{stem}_te_outputs.npz"))).unwrap();
    }
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
            "te",
            "--network_module",
            "networks.lora",
            "--network_dim",
            "4",
            "--learning_rate",
            "1e-3",
            "--unet_lr",
            "1e-3",
            "--text_encoder_lr",
            "5e-4",
            "--shuffle_caption",
            "--keep_tokens",
            "1",
            "--clip_skip",
            "2",
            "--max_train_steps",
            "3",
            "--train_batch_size",
            "2",
            "--seed",
            "5"
        ],
        0,
    );
    assert!(stderr.contains("training the text encoder"), "{stderr}");
    let path = out.path().join("te.safetensors");
    let (saved, _) = common::safetensors_header(&path);

    // sd-scripts' keys for the same network (golden/lora/keys_lierla_dim4_alpha1.json).
    let golden = fixtures().join("golden/lora/keys_lierla_dim4_alpha1.json");
    let (expected, golden) = common::golden_keys(&golden);
    assert_eq!(golden["n_te_modules"], 72);
    assert_eq!(
        saved, expected,
        "the saved keys, shapes and dtypes are sd-scripts'"
    );

    let file = LoraFile::read(&path).unwrap();
    assert_eq!(file.metadata["ss_text_encoder_lr"], "0.0005");
    assert_eq!(file.metadata["ss_unet_lr"], "0.001");

    // Layers 0..=10 take part at clip skip 2: their modules moved from the zero init.
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let moved = |name: &str| {
        let up = &tensors[&format!("{name}.lora_up.weight")];
        up.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    };
    assert!(moved(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    ));
    assert!(moved("lora_te_text_model_encoder_layers_10_mlp_fc2"));
    assert!(!moved("lora_te_text_model_encoder_layers_11_mlp_fc2"));

    let base = text_states(None);
    let trained = text_states(Some(&path));
    let change = (trained - base)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        change > 1e-6,
        "the trained LoRA changes the text states ({change})"
    );

    // sd-scripts loads the file strictly (with LORAKIT_REFERENCE_PYTHON and
    // LORAKIT_SD_SCRIPTS, an sd-scripts checkout, set).
    let python = common::reference_python("diffusers, transformers, torch");
    match (python, std::env::var_os("LORAKIT_SD_SCRIPTS")) {
        (Some(python), Some(sd_scripts)) => {
            let arch = fixtures().join("sd15-tiny/arch.json");
            let args = args![arch, path, sd_scripts];
            let stdout = common::run_reference_script(&python, SD_SCRIPTS_LOAD, args, "sd-scripts");
            assert!(stdout.contains("modules 192 72"), "{stdout}");
        }
        _ => {
            eprintln!("no reference Python / sd-scripts: the strict load in sd-scripts is skipped")
        }
    }
}

#[test]
fn unet_only_keeps_the_cached_mode_and_its_keys() {
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
            "--text_encoder_lr",
            "5e-4",
            "--max_train_steps",
            "1",
            "--seed",
            "5"
        ],
        0,
    );
    assert!(stderr.contains("training the UNet only"), "{stderr}");
    let file = LoraFile::read(&out.path().join("last.safetensors")).unwrap();
    assert_eq!(file.module_names().count(), 192);
    assert!(file.module_names().all(|n| n.starts_with("lora_unet_")));
    // sd-scripts records --text_encoder_lr even when the text encoder is not trained.
    assert_eq!(file.metadata["ss_text_encoder_lr"], "0.0005");
}

#[test]
fn text_encoder_training_resumes_bit_for_bit() {
    // Two steps, then two more from the saved state, against four straight: the text-encoder
    // modules, their optimizer state and the caption shuffles continue exactly.
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let (resumed, straight) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (model, meta) = (model(), data.path().join("meta_lat.json"));
    let data_dir = data.path();
    let flags: &[&std::ffi::OsStr] = args![
        "--pretrained_model_name_or_path",
        model,
        "--in_json",
        meta,
        "--train_data_dir",
        data_dir,
        "--output_name",
        "te",
        "--train_batch_size",
        "1",
        "--learning_rate",
        "1e-3",
        "--text_encoder_lr",
        "2e-3",
        "--shuffle_caption",
        "--caption_dropout_rate",
        "0.3",
        "--seed",
        "9",
        "--save_state",
        "--quiet"
    ];
    let (resumed_dir, straight_dir) = (resumed.path(), straight.path());
    let first: Vec<std::ffi::OsString> = (flags.iter().map(|s| s.to_os_string()))
        .chain(["--output_dir".into(), resumed_dir.into()])
        .chain(["--max_train_steps".into(), "2".into()])
        .collect();
    let first: Vec<&std::ffi::OsStr> = first.iter().map(|s| s.as_os_str()).collect();
    run_expect("train-lora", &first, 0);
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
    let whole: Vec<std::ffi::OsString> = (flags.iter().map(|s| s.to_os_string()))
        .chain(["--output_dir".into(), straight_dir.into()])
        .chain(["--max_train_steps".into(), "4".into()])
        .collect();
    let whole: Vec<&std::ffi::OsStr> = whole.iter().map(|s| s.as_os_str()).collect();
    run_expect("train-lora", &whole, 0);
    let tensors = |dir: &std::path::Path| {
        candle_core::safetensors::load(dir.join("te.safetensors"), &Device::Cpu).unwrap()
    };
    let (a, b) = (tensors(resumed_dir), tensors(straight_dir));
    assert_eq!(a.len(), 792);
    for (name, tensor) in &a {
        let (x, y) = (
            tensor.to_dtype(DType::F64).unwrap(),
            b[name].to_dtype(DType::F64).unwrap(),
        );
        let x: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{name} differs after resuming");
    }
}

#[test]
fn text_encoder_only_saves_trained_text_encoder_modules_only() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let out = tempfile::tempdir().unwrap();
    let base = [
        "--pretrained_model_name_or_path".into(),
        model().into_os_string(),
        "--in_json".into(),
        data.path().join("meta_lat.json").into_os_string(),
        "--train_data_dir".into(),
        data.path().as_os_str().to_os_string(),
        "--output_dir".into(),
        out.path().as_os_str().to_os_string(),
        "--network_train_text_encoder_only".into(),
        "--learning_rate".into(),
        "1e-3".into(),
        "--max_train_steps".into(),
        "2".into(),
        "--seed".into(),
        "5".into(),
        "--gradient_checkpointing".into(),
    ];
    let with = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        base.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.into()))
            .collect()
    };
    let refused = with(&["--network_train_unet_only"]);
    let refused: Vec<&std::ffi::OsStr> = refused.iter().map(|s| s.as_os_str()).collect();
    let stderr = run_expect("train-lora", &refused, 2);
    assert!(stderr.contains("give one or the other"), "{stderr}");
    let run = with(&[]);
    let run: Vec<&std::ffi::OsStr> = run.iter().map(|s| s.as_os_str()).collect();
    run_expect("train-lora", &run, 0);
    let path = out.path().join("last.safetensors");
    let file = LoraFile::read(&path).unwrap();
    assert_eq!(file.module_names().count(), 72);
    assert!(file.module_names().all(|n| n.starts_with("lora_te_")));
    assert_eq!(file.metadata["ss_gradient_checkpointing"], "True");
    let change = (text_states(Some(&path)) - text_states(None))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(change > 1e-6, "the text-encoder modules moved ({change})");
}
