//! UNet and LoRA parity with the sd-scripts goldens (tests/fixtures/golden/unet, golden/lora).

use std::path::PathBuf;

use crate::support::{fixtures, max_abs, npz_tensor};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use lorakit_pipeline::models::adapter::Adaptable;
use lorakit_pipeline::models::unet::{self, Unet};
use lorakit_pipeline::models::{Checkpoint, Component};
use lorakit_pipeline::networks::lora::{Alpha, LoraConfig, LoraNetwork};

fn base_unet() -> &'static Unet {
    static UNET: OnceLock<Unet> = OnceLock::new();
    UNET.get_or_init(|| {
        let path = fixtures().join("sd15-tiny/model.safetensors");
        let checkpoint = Checkpoint::open(&path).unwrap();
        let vb = checkpoint
            .var_builder(Component::Unet, DType::F32, &Device::Cpu, &unet::ldm_name)
            .unwrap();
        Unet::load(&vb, DType::F32).unwrap()
    })
}

fn golden() -> PathBuf {
    fixtures().join("golden/unet/unet.npz")
}

#[test]
fn unet_matches_sd_scripts_for_both_context_lengths() {
    let unet = base_unet();
    let latents = npz_tensor(&golden(), "latents");
    let timesteps = npz_tensor(&golden(), "timesteps");
    for tokens in ["77", "227"] {
        let context = npz_tensor(&golden(), &format!("encoder_hidden_states_{tokens}"));
        let expected = npz_tensor(&golden(), &format!("unet_out_{tokens}"));
        let out = unet.forward(&latents, &timesteps, &context, None).unwrap();
        let err = max_abs(&out, &expected);
        eprintln!("unet_out_{tokens}: max abs error {err:e}");
        assert!(err <= 1e-4, "unet_out_{tokens}: max abs error {err}");
    }
}

#[test]
fn trained_kohya_lora_reproduces_golden_output() {
    let mut unet = base_unet().clone();
    let path = fixtures().join("golden/lora/trained_lora_dim4_alpha1.safetensors");
    let (network, report) = LoraNetwork::load(&mut unet, &path, 1.0, &Device::Cpu).unwrap();
    assert_eq!(report.applied, 192);
    assert_eq!(report.ignored_text_encoder, 72);
    assert!(report.unknown.is_empty(), "{:?}", report.unknown);
    assert_eq!(network.modules.len(), 192);
    let (err, effect_err) = golden_lora_errors(&unet);
    eprintln!(
        "unet_out_77_lora_unet_only: max abs error {err:e}, LoRA effect error {effect_err:e}"
    );
    assert!(err <= 1e-4 && effect_err <= 1e-4);
}

fn key_list(name: &str) -> Vec<(String, Vec<usize>, String)> {
    let text = std::fs::read_to_string(fixtures().join(format!("golden/lora/{name}"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut keys: Vec<_> = json["keys"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("lora_unet_"))
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), shape, v["dtype"].as_str().unwrap().to_string())
        })
        .collect();
    keys.sort();
    keys
}

fn our_keys(config: &LoraConfig) -> Vec<(String, Vec<usize>, String)> {
    let mut unet = base_unet().clone();
    let network =
        LoraNetwork::create(&mut unet as &mut dyn Adaptable, config, 1, &Device::Cpu).unwrap();
    let mut keys: Vec<_> = network
        .state_dict(None)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let dtype = match t.dtype() {
                DType::I64 => "int64",
                _ => "float32",
            };
            (k, t.dims().to_vec(), dtype.to_string())
        })
        .collect();
    keys.sort();
    keys
}

#[test]
fn lora_keys_match_sd_scripts_for_lierla_and_c3lier() {
    assert_eq!(
        our_keys(&LoraConfig::default()),
        key_list("keys_unet_only_dim4_alpha1.json")
    );
    assert_eq!(
        our_keys(&LoraConfig::default()),
        key_list("keys_lierla_dim4_alpha1.json")
    );
    let c3lier = LoraConfig {
        conv_dim: Some(4),
        conv_alpha: 1.0,
        ..LoraConfig::default()
    };
    assert_eq!(
        our_keys(&c3lier),
        key_list("keys_c3lier_dim4_alpha1_conv4_convalpha1.json")
    );
    assert_eq!(LoraConfig::default().network_alpha, Alpha::Int(1));
}

#[test]
fn merged_kohya_lora_equals_the_applied_one() {
    let mut unet = base_unet().clone();
    let path = fixtures().join("golden/lora/trained_lora_dim4_alpha1.safetensors");
    let report = LoraNetwork::merge_file(&mut unet, &path, 1.0).unwrap();
    assert_eq!(report.applied, 192);
    assert_eq!(report.ignored_text_encoder, 72);
    assert!(report.unknown.is_empty());
    let (_, effect_err) = golden_lora_errors(&unet);
    eprintln!("merged LoRA: effect error {effect_err:e}");
    assert!(effect_err <= 1e-4);
    // At multiplier 0 nothing changes.
    let mut unchanged = base_unet().clone();
    LoraNetwork::merge_file(&mut unchanged, &path, 0.0).unwrap();
    let base = npz_tensor(&golden(), "unet_out_77");
    assert!(max_abs(&golden_lora_output(&unchanged), &base) <= 1e-4);
}

/// `unet`'s output on the golden LoRA inputs (77-token context).
fn golden_lora_output(unet: &Unet) -> Tensor {
    let latents = npz_tensor(&golden(), "latents");
    let timesteps = npz_tensor(&golden(), "timesteps");
    let context = npz_tensor(&golden(), "encoder_hidden_states_77");
    unet.forward(&latents, &timesteps, &context, None).unwrap()
}

/// Max abs error of `unet` (carrying the golden LoRA) against sd-scripts' output with that LoRA,
/// and the error of the LoRA's effect (output minus the base UNet's).
fn golden_lora_errors(unet: &Unet) -> (f32, f32) {
    let expected = npz_tensor(&golden(), "unet_out_77_lora_unet_only");
    let base = npz_tensor(&golden(), "unet_out_77");
    let out = golden_lora_output(unet);
    let effect = max_abs(&(&out - &base).unwrap(), &(&expected - &base).unwrap());
    (max_abs(&out, &expected), effect)
}

#[test]
fn block_dims_lr_weights_and_loraplus_match_sd_scripts() {
    let mut unet = base_unet().clone();
    crate::support::assert_block_network_matches(
        "golden/lora/network_blocks_loraplus.json",
        &mut unet,
        lorakit_pipeline::networks::lora::BlockLayout::Sd,
    );
}
