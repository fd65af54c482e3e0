//! End-to-end tests of train-lora training the text encoder (sd-scripts' default, without
//! `--network_train_unet_only`): a kohya-style command line saves sd-scripts' full key set, and
//! the text-encoder modules it saves have moved and change the encoder's output; trained files
//! (SD1, SDXL) load in diffusers with every key used and the same text-encoder states as ours.

use crate::common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, make_training_caches, run_expect};
use lorakit_pipeline::formats::npz::NpzReader;
use lorakit_pipeline::models::adapter::{Adaptable, Joined};
use lorakit_pipeline::models::clip::{encode_sd, ClipTextModel};
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

/// Loads a kohya LoRA file with diffusers' own loader (`load_lora_weights` on a
/// `StableDiffusionPipeline`, or `StableDiffusionXLPipeline` for `sdxl`, whose kohya converter
/// maps `lora_unet_*`, `lora_te_*` / `lora_te1_*` / `lora_te2_*`). The pipeline's text encoders
/// carry the single file's weights (diffusers' own single-file converters); the UNet and VAE are
/// random, as only the LoRA keys matter there. It asserts that every module of the file sits in
/// exactly one injected LoRA layer with the file's down and up weights and scale alpha / rank,
/// and that every injected layer comes from the file; prints the injected layers per prefix and
/// writes the token ids and the text encoders' states without and with the LoRA to an npz.
/// Arguments: family (`sd1` / `sdxl`), model file, arch.json, tokenizer folder, LoRA, output.
const DIFFUSERS_LOAD: &str = r#"
import json, sys
import numpy as np
import torch
from safetensors.torch import load_file
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

family, model, arch_path, tokenizer_dir, lora_path, out_path = sys.argv[1:7]
arch = json.load(open(arch_path))
checkpoint = load_file(model)

def text_encoder(cls, config, state):
    encoder = cls(CLIPTextConfig(**config))
    state = {k: v.float() for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return encoder.eval()

torch.manual_seed(0)
tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
parts = dict(unet=UNet2DConditionModel(**arch["unet"]), vae=AutoencoderKL(**arch["vae"]),
             scheduler=DDPMScheduler(clip_sample=False), tokenizer=tokenizer)
te1 = text_encoder(CLIPTextModel, arch["text_encoder"], convert_ldm_clip_checkpoint(checkpoint))
if family == "sdxl":
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_encoder_2"]))
    te2 = text_encoder(CLIPTextModelWithProjection, arch["text_encoder_2"],
                       convert_open_clip_checkpoint(te2, checkpoint, "conditioner.embedders.1.model."))
    pipe = StableDiffusionXLPipeline(text_encoder=te1, text_encoder_2=te2,
                                     tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!"),
                                     **parts)
    models = {"lora_unet_": pipe.unet, "lora_te1_": pipe.text_encoder, "lora_te2_": pipe.text_encoder_2}
else:
    pipe = StableDiffusionPipeline(text_encoder=te1, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **parts)
    models = {"lora_unet_": pipe.unet, "lora_te_": pipe.text_encoder}

ids = tokenizer("a photo of a cat, sitting on a red chair", padding="max_length", max_length=77,
                return_tensors="pt").input_ids

@torch.no_grad()
def states():
    out = dict()
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    if family == "sdxl":
        out["te1_hidden11"] = hidden[11]
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
        out["te2_penultimate"] = second.hidden_states[-2]
        out["te2_last"] = second.last_hidden_state
    else:
        final_norm = pipe.text_encoder.text_model.final_layer_norm
        out["te_penultimate"] = final_norm(hidden[-2])
        out["te_last"] = final_norm(hidden[-1])
    return out

base = states()
lora = load_file(lora_path)
pipe.load_lora_weights(dict(lora))
loaded = states()

# Every module of the file must sit in exactly one injected LoRA layer with its own down and up
# weights and scale alpha / rank; every injected layer must come from the file.
modules = {k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
by_down = {lora[f"{m}.lora_down.weight"].float().numpy().tobytes(): m for m in modules}
found, report = set(), {}
for prefix, net in models.items():
    count = 0
    for name, layer in net.named_modules():
        if not hasattr(layer, "lora_A") or len(layer.lora_A) == 0:
            continue
        count += 1
        (adapter,) = layer.lora_A.keys()
        down = layer.lora_A[adapter].weight.detach().float()
        module = by_down.get(down.numpy().tobytes())
        assert module is not None and module.startswith(prefix), f"{prefix} {name}: no module of the file"
        assert module not in found, f"{module} applied twice"
        found.add(module)
        up = lora[f"{module}.lora_up.weight"].float()
        assert torch.equal(layer.lora_B[adapter].weight.detach().float(), up), module
        rank = up.shape[1]
        alpha = float(lora[f"{module}.alpha"]) if f"{module}.alpha" in lora else rank
        assert abs(layer.scaling[adapter] - alpha / rank) < 1e-6, (module, layer.scaling, alpha)
    report[prefix] = count
unused = sorted(modules - found)
assert not unused, f"modules diffusers did not apply: {unused}"

arrays = {"ids": ids.numpy().astype(np.int64)}
for name in base:
    arrays[f"{name}_base"] = base[name].numpy()
    arrays[f"{name}_lora"] = loaded[name].numpy()
np.savez(out_path, **arrays)
print(json.dumps({"modules": report}))
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

/// The states diffusers' script writes, ours computed on the same ids: per name, (ours without
/// the LoRA, ours with it). SD1: final-normed last and penultimate layers; SDXL: encoder 1's
/// hidden state 11, encoder 2's penultimate state and its final-normed last state.
fn our_states(model: &Path, lora: &Path, ids: &[i64]) -> Vec<(&'static str, Tensor, Tensor)> {
    let mut loaded = load_text_encoders(model, DType::F32, &Device::Cpu).unwrap();
    let family = loaded.family;
    for (encoder, prefix) in (loaded.encoders.iter_mut()).zip(family.text_encoder_lora_prefixes()) {
        encoder.set_lora_prefix(prefix);
    }
    let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
    let ids = Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap();
    let states = |encoders: &[ClipTextModel]| -> Vec<(&'static str, Tensor)> {
        let last_two = |encoder: &ClipTextModel| {
            let layers = encoder.config().num_hidden_layers;
            let mut states = encoder.hidden_states(&ids, &[layers - 1, layers]).unwrap();
            let last = encoder.final_layer_norm(&states.remove(1)).unwrap();
            (states.remove(0), last)
        };
        match encoders {
            [encoder] => {
                let (penultimate, last) = last_two(encoder);
                let penultimate = encoder.final_layer_norm(&penultimate).unwrap();
                vec![("te_penultimate", penultimate), ("te_last", last)]
            }
            [first, second] => {
                let hidden11 = first.hidden_states(&ids, &[11]).unwrap().remove(0);
                let (penultimate, last) = last_two(second);
                vec![
                    ("te1_hidden11", hidden11),
                    ("te2_penultimate", penultimate),
                    ("te2_last", last),
                ]
            }
            _ => unreachable!("one or two text encoders"),
        }
    };
    let base = states(&loaded.encoders);
    let models = loaded.encoders.iter_mut().map(|e| e as &mut dyn Adaptable);
    let (network, _) =
        LoraNetwork::load(&mut Joined(models.collect()), lora, 1.0, &Device::Cpu).unwrap();
    assert!(!network.modules.is_empty());
    let with_lora = states(&loaded.encoders);
    (base.into_iter().zip(with_lora))
        .map(|((name, base), (_, lora))| (name, base, lora))
        .collect()
}

/// Loads `lora` (trained on `family`'s tiny fixture `model`) into diffusers with
/// [`DIFFUSERS_LOAD`] and checks that every module is applied, with the counts `expected`
/// (`"lora_unet_": N, ...`), and that the text encoders' states with the LoRA equal ours within
/// 1e-4 while the LoRA moves them by more than 1e-2. Skipped without `LORAKIT_REFERENCE_PYTHON`
/// (a Python with diffusers, transformers, torch and peft).
fn check_diffusers_load(family: &str, model: &Path, lora: &Path, expected: &str) {
    let Some(python) = common::reference_python("diffusers, transformers, torch, peft") else {
        eprintln!("no reference Python with diffusers and peft: the diffusers load is skipped");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let npz = out.path().join("states.npz");
    let arch = model.with_file_name("arch.json");
    let tokenizer = fixtures().join("sd15-tiny/tokenizer");
    let args = args![family, model, arch, tokenizer, lora, npz];
    let stdout = common::run_reference_script(&python, DIFFUSERS_LOAD, args, "diffusers");
    assert!(stdout.contains(expected), "{stdout}");
    let mut reader = NpzReader::open(&npz).unwrap();
    let (ids, _) = reader.read_i64("ids").unwrap();
    let max_abs = |a: &Tensor, b: &[f32]| {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        (a.iter().zip(b)).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
    };
    for (name, base, with_lora) in our_states(model, lora, &ids) {
        let (theirs_base, _) = reader.read_f32(&format!("{name}_base")).unwrap();
        let (theirs, _) = reader.read_f32(&format!("{name}_lora")).unwrap();
        let effect = max_abs(&with_lora, &theirs_base);
        let (base_diff, lora_diff) = (max_abs(&base, &theirs_base), max_abs(&with_lora, &theirs));
        eprintln!("{family} {name}: LoRA effect {effect:.3e}, ours against diffusers {base_diff:.2e} without, {lora_diff:.2e} with the LoRA");
        assert!(
            base_diff <= 1e-4,
            "{name} without the LoRA: max abs {base_diff}"
        );
        assert!(
            lora_diff <= 1e-4,
            "{name} with the LoRA: max abs {lora_diff}"
        );
        assert!(
            effect > 1e-2,
            "{name}: the LoRA moves the states ({effect})"
        );
    }
}

#[test]
fn a_trained_unet_and_text_encoder_file_loads_in_diffusers_sd1() {
    // Trained with a high text-encoder rate, so that its modules move the states well past the
    // comparison's tolerance.
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
            "--network_dim",
            "4",
            "--network_alpha",
            "2",
            "--unet_lr",
            "1e-3",
            "--text_encoder_lr",
            "2e-2",
            "--max_train_steps",
            "3",
            "--seed",
            "5",
            "--quiet"
        ],
        0,
    );
    let lora = out.path().join("last.safetensors");
    assert_eq!(LoraFile::read(&lora).unwrap().module_names().count(), 264);
    check_diffusers_load(
        "sd1",
        &model(),
        &lora,
        r#""lora_unet_": 192, "lora_te_": 72"#,
    );
}

#[test]
fn a_trained_sdxl_unet_and_text_encoders_file_loads_in_diffusers() {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("img/2_sks cat");
    std::fs::create_dir_all(&folder).unwrap();
    for stem in ["astronaut", "chelsea"] {
        let name = format!("{stem}.png");
        std::fs::copy(fixtures().join("images").join(&name), folder.join(name)).unwrap();
    }
    let (img, out) = (root.path().join("img"), root.path().join("out"));
    let model = fixtures().join("sdxl-tiny/model.safetensors");
    run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model,
            "--train_data_dir",
            img,
            "--resolution",
            "128",
            "--output_dir",
            out,
            "--network_dim",
            "4",
            "--network_alpha",
            "2",
            "--unet_lr",
            "1e-3",
            "--text_encoder_lr",
            "2e-2",
            "--max_train_steps",
            "3",
            "--seed",
            "5",
            "--quiet"
        ],
        0,
    );
    let lora = out.join("last.safetensors");
    let file = LoraFile::read(&lora).unwrap();
    let count = |prefix: &str| {
        file.module_names()
            .filter(|n| n.starts_with(prefix))
            .count()
    };
    let (unet, te1, te2) = (count("lora_unet_"), count("lora_te1_"), count("lora_te2_"));
    assert_eq!((te1, te2), (72, 24));
    let expected = format!(r#""lora_unet_": {unet}, "lora_te1_": 72, "lora_te2_": 24"#);
    check_diffusers_load("sdxl", &model, &lora, &expected);
}
