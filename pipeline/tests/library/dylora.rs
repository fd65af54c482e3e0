//! DyLoRA against sd-scripts' `networks.dylora` (tests/fixtures/golden/dylora, made by
//! tests/fixtures/generate/dylora_network.py): key names, shapes, dtypes and alphas; the forward
//! change of single modules at fixed trained ranks and which ranks get gradients; and the whole
//! UNet's change at full rank.

use candle_core::{DType, Device, Tensor};
use lorakit_pipeline::models::adapter::{Adaptable, Joined};
use lorakit_pipeline::models::frozen::FrozenKind;
use lorakit_pipeline::models::text_encoders::load_text_encoders;
use lorakit_pipeline::models::unet::{self, Unet};
use lorakit_pipeline::models::{Checkpoint, Component};
use lorakit_pipeline::networks::dylora::DyloraNetwork;
use lorakit_pipeline::networks::lora::{Alpha, LoraConfig};

use crate::support::{fixtures, golden_key_shapes, max_abs, npz_tensor, state_key_shapes};

const UNIT: usize = 2;

fn model_path() -> std::path::PathBuf {
    fixtures().join("sd15-tiny/model.safetensors")
}

fn base_unet() -> Unet {
    let checkpoint = Checkpoint::open(&model_path()).unwrap();
    let vb = checkpoint
        .var_builder(Component::Unet, DType::F32, &Device::Cpu, &unet::ldm_name)
        .unwrap();
    Unet::load(&vb, DType::F32).unwrap()
}

fn golden_json() -> serde_json::Value {
    let path = fixtures().join("golden/dylora/dylora_keys.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn dylora_keys_shapes_and_alphas_match_sd_scripts() {
    let golden = golden_json();
    let mut unet = base_unet();
    let mut encoders = load_text_encoders(&model_path(), DType::F32, &Device::Cpu).unwrap();
    let text = &mut encoders.encoders[0];
    text.set_lora_prefix("lora_te");
    let mut models = Joined(vec![text as &mut dyn Adaptable, &mut unet]);
    let config = LoraConfig {
        network_dim: 4,
        network_alpha: Alpha::Float(2.0),
        conv_dim: Some(4),
        conv_alpha: 2.0,
        blocks: None,
    };
    let network = DyloraNetwork::create(&mut models, &config, UNIT, 3, &Device::Cpu).unwrap();
    assert_eq!(
        network.modules.len() as u64,
        golden["modules"].as_u64().unwrap()
    );
    let te = (network.modules.iter())
        .filter(|m| m.name.starts_with("lora_te"))
        .count();
    assert_eq!(te as u64, golden["text_encoder_modules"].as_u64().unwrap());
    let state = network.state_dict(None).unwrap();
    let ours = state_key_shapes(&state);
    let theirs = golden_key_shapes(&golden["keys"]);
    assert_eq!(ours, theirs, "keys, shapes and dtypes");
    for (key, tensor) in &state {
        if let Some(module) = key.strip_suffix(".alpha") {
            let want = golden["alphas"][module].as_f64().unwrap();
            assert_eq!(tensor.to_scalar::<f32>().unwrap() as f64, want, "{key}");
        } else if key.ends_with("lora_up.weight") {
            assert_eq!(max_abs(tensor, &tensor.zeros_like().unwrap()), 0.0, "{key}");
        }
    }
    // One variable per rank row of lora_down and column of lora_up, as sd-scripts' lora_A.i /
    // lora_B.i.
    assert_eq!(network.named_vars().len(), network.modules.len() * 2 * 4);
}

#[test]
fn dylora_modules_match_sd_scripts_at_fixed_ranks_and_train_only_the_drawn_block() {
    let file = fixtures().join("golden/dylora/dylora.safetensors");
    let npz = fixtures().join("golden/dylora/dylora.npz");
    let mut unet = base_unet();
    let mut encoders = load_text_encoders(&model_path(), DType::F32, &Device::Cpu).unwrap();
    let text = &mut encoders.encoders[0];
    text.set_lora_prefix("lora_te");
    let mut models = Joined(vec![text as &mut dyn Adaptable, &mut unet]);
    let (network, unused) = DyloraNetwork::load(&mut models, &file, UNIT, &Device::Cpu).unwrap();
    assert_eq!(network.modules.len(), 350);
    assert!(unused.is_empty(), "{unused:?}");
    let names: Vec<String> = {
        let reader = npyz::npz::NpzArchive::open(&npz).unwrap();
        reader
            .array_names()
            .filter_map(|n| n.strip_prefix("x__").map(str::to_string))
            .collect()
    };
    assert_eq!(names.len(), 8);
    for name in &names {
        let module = network.modules.iter().find(|m| &m.name == name).unwrap();
        let x = npz_tensor(&npz, &format!("x__{name}"));
        let g = npz_tensor(&npz, &format!("g__{name}"));
        let down = module.down().unwrap();
        let kind = match down.rank() {
            2 => FrozenKind::Linear,
            _ => FrozenKind::Conv2d {
                stride: if name.contains("downsamplers") { 2 } else { 1 },
                padding: down.dim(2).unwrap() / 2,
            },
        };
        for rank in [0, 2] {
            let got = module.delta_at(&x, kind, Some(rank)).unwrap();
            let want = npz_tensor(&npz, &format!("delta__{name}__{rank}"));
            let err = max_abs(&got, &want);
            let scale = max_abs(&want, &want.zeros_like().unwrap());
            eprintln!("{name} rank {rank}: max abs error {err:e} (change up to {scale:.3})");
            assert!(scale > 1e-3 && err <= 1e-5, "{name} rank {rank}: {err}");
            let grads = (got * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for i in 0..module.rank() {
                let trained = (rank..rank + UNIT).contains(&i);
                let down = grads.get(module.down_rows[i].as_tensor());
                let up = grads.get(module.up_columns[i].as_tensor());
                assert_eq!(down.is_some(), trained, "{name} rank {rank}: lora_A.{i}");
                assert_eq!(up.is_some(), trained, "{name} rank {rank}: lora_B.{i}");
            }
            let block = |vars: &[candle_core::Var], axis| {
                let parts: Vec<Tensor> = (rank..rank + UNIT)
                    .map(|i| grads.get(vars[i].as_tensor()).unwrap().clone())
                    .collect();
                Tensor::cat(&parts, axis).unwrap()
            };
            for (part, got) in [
                ("down", block(&module.down_rows, 0)),
                ("up", block(&module.up_columns, 1)),
            ] {
                let want = npz_tensor(&npz, &format!("grad_{part}__{name}__{rank}"));
                let got = got.reshape(want.shape()).unwrap();
                let err = max_abs(&got, &want);
                let scale = max_abs(&want, &want.zeros_like().unwrap());
                assert!(
                    err <= 1e-4 * scale.max(1.0),
                    "{name} rank {rank} {part}: {err} of {scale}"
                );
            }
        }
    }
}

#[test]
fn a_dylora_file_outside_training_changes_the_unet_as_sd_scripts_at_full_rank() {
    let golden = fixtures().join("golden/unet/unet.npz");
    let latents = npz_tensor(&golden, "latents");
    let timesteps = npz_tensor(&golden, "timesteps");
    let context = npz_tensor(&golden, "encoder_hidden_states_77");
    let unet = base_unet();
    let base = unet.forward(&latents, &timesteps, &context, None).unwrap();
    let mut with = unet.clone();
    let file = fixtures().join("golden/dylora/dylora.safetensors");
    let (network, unused) = DyloraNetwork::load(&mut with, &file, UNIT, &Device::Cpu).unwrap();
    assert_eq!((network.modules.len(), unused.len()), (278, 72));
    network.set_stream(None);
    let out = with.forward(&latents, &timesteps, &context, None).unwrap();
    let delta = (out - &base).unwrap();
    let want = npz_tensor(&fixtures().join("golden/dylora/dylora.npz"), "unet_delta");
    let err = max_abs(&delta, &want);
    let scale = max_abs(&want, &want.zeros_like().unwrap());
    eprintln!("UNet output change: max abs error {err:e} (change up to {scale:.3})");
    assert!(err <= 1e-4 * scale.max(1.0), "{err}");
}
