//! The SDXL UNet against sd-scripts' own SDXL UNet on the tiny SDXL fixture
//! (tests/fixtures/sdxl-tiny, goldens in tests/fixtures/golden/sdxl, made by
//! tests/fixtures/generate/sdxl_tiny.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use lorakit_pipeline::models::adapter::Adaptable;
use lorakit_pipeline::models::unet::{self, Heads, Unet};
use lorakit_pipeline::models::{Checkpoint, Component, ModelFamily};
use lorakit_pipeline::networks::lora::{Alpha, LoraConfig, LoraNetwork};

use crate::support::{fixtures, max_abs, npz_tensor};

fn golden() -> PathBuf {
    fixtures().join("golden/sdxl/unet.npz")
}

fn model() -> PathBuf {
    fixtures().join("sdxl-tiny/model.safetensors")
}

fn npz(name: &str) -> Tensor {
    npz_tensor(&golden(), name)
}

/// The six size values per sample of conditioning `name` (`a` or `b`).
fn sizes(name: &str) -> Vec<[i64; 6]> {
    let parts = ["original_size_hw", "crop_top_left", "target_size_hw"]
        .map(|part| npz(&format!("{part}_{name}")).to_vec2::<f32>().unwrap());
    (0..parts[0].len())
        .map(|i| {
            let v = |part: usize, k: usize| parts[part][i][k] as i64;
            [v(0, 0), v(0, 1), v(1, 0), v(1, 1), v(2, 0), v(2, 1)]
        })
        .collect()
}

fn load(path: &Path) -> Unet {
    let checkpoint = Checkpoint::open(path).unwrap();
    assert_eq!(checkpoint.family(), ModelFamily::Sdxl);
    let mapping = unet::ldm_mapping(checkpoint.family());
    let vb = checkpoint
        .var_builder(Component::Unet, DType::F32, &Device::Cpu, &mapping)
        .unwrap();
    Unet::load(&vb, DType::F32).unwrap()
}

fn sdxl_unet() -> &'static Unet {
    static UNET: OnceLock<Unet> = OnceLock::new();
    UNET.get_or_init(|| load(&model()))
}

/// `unet`'s output for the golden inputs with `tokens` context tokens and conditioning `sizes`.
fn output(unet: &Unet, tokens: usize, conditioning: &str) -> Tensor {
    let vector = unet::sdxl_vector(&npz("pool2"), &sizes(conditioning)).unwrap();
    unet.forward(
        &npz("latents"),
        &npz("timesteps"),
        &npz(&format!("context_{tokens}")),
        Some(&vector),
    )
    .unwrap()
}

#[test]
fn sdxl_topology_is_read_from_the_weights() {
    let config = &sdxl_unet().config;
    assert_eq!(config.block_channels, [32, 64, 128]);
    assert_eq!(config.down_depth, [0, 1, 2]);
    assert_eq!(config.mid_depth, 2);
    assert_eq!(config.up_depth, [2, 1, 0]);
    assert!(config.linear_projection);
    assert_eq!(config.heads, Heads::Width(64));
    assert_eq!(config.context_dim, 96);
    assert_eq!(config.add_embedding_dim, Some(64 + 6 * 256));
    assert_eq!(config.pool_dim(), Some(64));
    assert!(config.is_sdxl() && !config.is_sd2());
}

/// The size features are `cos`/`sin` of f32 arguments up to 1536 (an f32 step there is 1.2e-4):
/// torch's vectorised `exp`/`sin`/`cos` and Rust's differ by about one step of the argument.
#[test]
fn size_conditioning_vector_matches_sd_scripts() {
    for conditioning in ["a", "b"] {
        let ours = unet::sdxl_vector(&npz("pool2"), &sizes(conditioning)).unwrap();
        let err = max_abs(&ours, &npz(&format!("vector_{conditioning}")));
        eprintln!("vector_{conditioning}: max abs error {err:e}");
        assert!(err <= 1e-4, "vector_{conditioning}: {err}");
    }
}

#[test]
fn sdxl_unet_matches_sd_scripts_for_token_lengths_and_size_conditionings() {
    let unet = sdxl_unet();
    for (tokens, conditioning) in [(77, "a"), (227, "a"), (77, "b"), (227, "b")] {
        let expected = npz(&format!("unet_out_{tokens}_{conditioning}"));
        let err = max_abs(&output(unet, tokens, conditioning), &expected);
        eprintln!("unet_out_{tokens}_{conditioning}: max abs error {err:e}");
        assert!(err <= 1e-4, "unet_out_{tokens}_{conditioning}: {err}");
    }
    // The conditionings differ enough that a wrong size embedding would show.
    let a = npz("unet_out_77_a");
    let b = npz("unet_out_77_b");
    assert!(max_abs(&a, &b) > 1e-3);
}

/// sd-scripts' diffusers-to-SGM names (golden/sdxl/unet_names.json).
fn sgm_names() -> HashMap<String, String> {
    let text = std::fs::read_to_string(fixtures().join("golden/sdxl/unet_names.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn sdxl_names_map_as_sd_scripts_converts_them() {
    let names = sgm_names();
    assert!(names.len() > 500, "{}", names.len());
    for (diffusers, sgm) in &names {
        assert_eq!(&unet::sdxl_ldm_name(diffusers), sgm, "{diffusers}");
    }
}

#[test]
fn a_diffusers_unet_folder_loads_to_the_same_model() {
    let checkpoint = Checkpoint::open(&model()).unwrap();
    let tensors: HashMap<String, Tensor> = sgm_names()
        .into_iter()
        .map(|(diffusers, sgm)| {
            let tensor = checkpoint.tensor(Component::Unet, &sgm).unwrap();
            (diffusers, tensor)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let unet_dir = dir.path().join("unet");
    std::fs::create_dir_all(&unet_dir).unwrap();
    candle_core::safetensors::save(
        &tensors,
        unet_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let unet = load(dir.path());
    assert_eq!(unet.config, sdxl_unet().config);
    let err = max_abs(&output(&unet, 77, "a"), &npz("unet_out_77_a"));
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn sd_scripts_sdxl_lora_reproduces_its_output() {
    let mut unet = sdxl_unet().clone();
    let path = fixtures().join("golden/sdxl/lora_dim4_alpha1.safetensors");
    let (network, report) = LoraNetwork::load(&mut unet, &path, 1.0, &Device::Cpu).unwrap();
    assert!(report.unknown.is_empty(), "{:?}", report.unknown);
    let expected_modules = golden_modules("lierla_dim4_alpha1").len();
    assert_eq!(report.applied, expected_modules);
    assert_eq!(network.modules.len(), expected_modules);
    let base = npz("unet_out_77_a");
    let expected = npz("unet_out_77_a_lora");
    let out = output(&unet, 77, "a");
    let err = max_abs(&out, &expected);
    let effect = max_abs(&(&out - &base).unwrap(), &(&expected - &base).unwrap());
    eprintln!("unet_out_77_a_lora: max abs error {err:e}, LoRA effect error {effect:e}");
    assert!(err <= 1e-4 && effect <= 1e-4, "{err} {effect}");
    assert!(
        max_abs(&expected, &base) > 1e-3,
        "the LoRA changes the output"
    );
}

/// The UNet modules sd-scripts' networks.lora creates (golden/sdxl/lora_keys.json).
fn golden_modules(variant: &str) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("golden/sdxl/lora_keys.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["variants"][variant].as_object().unwrap().clone()
}

/// Per-block ranks, alphas, conv ranks, learning-rate weights and LoRA+ on SDXL's 23 blocks, as
/// sd-scripts' `networks.lora` builds them (`sdxl_lora_blocks.py`).
#[test]
fn sdxl_block_dims_lr_weights_and_loraplus_match_sd_scripts() {
    let mut unet = sdxl_unet().clone();
    crate::support::assert_block_network_matches(
        "golden/sdxl/network_blocks.json",
        &mut unet,
        lorakit_pipeline::networks::lora::BlockLayout::Sdxl,
    );
}

#[test]
fn sdxl_lora_modules_match_sd_scripts_for_lierla_and_c3lier() {
    let c3lier = LoraConfig {
        conv_dim: Some(4),
        conv_alpha: 1.0,
        ..LoraConfig::default()
    };
    for (variant, config) in [
        ("lierla_dim4_alpha1", LoraConfig::default()),
        ("c3lier_dim4_alpha1_conv4_convalpha1", c3lier),
    ] {
        let mut unet = sdxl_unet().clone();
        let network =
            LoraNetwork::create(&mut unet as &mut dyn Adaptable, &config, 1, &Device::Cpu).unwrap();
        let ours: serde_json::Map<String, serde_json::Value> = network
            .modules
            .iter()
            .map(|m| {
                let (alpha, dtype) = match m.alpha {
                    Alpha::Int(v) => (v as f64, "int64"),
                    Alpha::Float(v) => (v as f64, "float32"),
                };
                let value = serde_json::json!({
                    "down": m.down.as_tensor().dims(),
                    "up": m.up.as_tensor().dims(),
                    "alpha": alpha,
                    "alpha_dtype": dtype,
                });
                (m.name.clone(), value)
            })
            .collect();
        let theirs = golden_modules(variant);
        let names = |map: &serde_json::Map<String, serde_json::Value>| {
            let mut names: Vec<String> = map.keys().cloned().collect();
            names.sort();
            names
        };
        assert_eq!(names(&ours), names(&theirs), "{variant}: module names");
        assert_eq!(ours, theirs, "{variant}: shapes and alphas");
    }
}

#[test]
fn every_sdxl_c3lier_tensor_gets_a_gradient() {
    let mut unet = sdxl_unet().clone();
    let config = LoraConfig {
        conv_dim: Some(4),
        conv_alpha: 1.0,
        ..LoraConfig::default()
    };
    let network =
        LoraNetwork::create(&mut unet as &mut dyn Adaptable, &config, 1, &Device::Cpu).unwrap();
    // `lora_up` starts at zero, which would leave every `lora_down` without a gradient.
    for module in &network.modules {
        let up = module.up.as_tensor();
        module
            .up
            .set(&(up.ones_like().unwrap() * 0.01).unwrap())
            .unwrap();
    }
    let loss = output(&unet, 77, "a").sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for module in &network.modules {
        for (part, var) in [("down", &module.down), ("up", &module.up)] {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{}.{part}: no gradient", module.name));
            let size = grad
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                size > 0.0 && size.is_finite(),
                "{}.{part}: {size}",
                module.name
            );
        }
    }
}

#[test]
fn sdxl_gradient_checkpointing_keeps_outputs_and_gradients() {
    let vector = unet::sdxl_vector(&npz("pool2"), &sizes("a")).unwrap();
    crate::support::assert_checkpointing_changes_nothing(
        sdxl_unet(),
        &npz("latents"),
        &npz("context_77"),
        Some(&vector),
    );
}

/// The loss and the gradients of every LoRA tensor and of the text context match torch autograd
/// through sd-scripts' SDXL UNet with a C3Lier network (golden/sdxl/lora_grads.npz, made by
/// tests/fixtures/generate/sdxl_lora_grads.py), without gradient checkpointing, with it on the
/// first level and on every level.
#[test]
fn sdxl_lora_gradients_match_torch_autograd() {
    use lorakit_pipeline::models::recompute;
    let golden = fixtures().join("golden/sdxl/lora_grads.npz");
    let expected = |name: &str| npz_tensor(&golden, name);
    let mut unet = sdxl_unet().clone();
    let path = fixtures().join("golden/sdxl/lora_c3lier_grads.safetensors");
    let (network, report) = LoraNetwork::load(&mut unet, &path, 1.0, &Device::Cpu).unwrap();
    assert!(report.unknown.is_empty(), "{:?}", report.unknown);
    assert_eq!(network.modules.len(), 258);
    let vector = unet::sdxl_vector(&npz("pool2"), &sizes("a")).unwrap();
    let context = candle_core::Var::from_tensor(&npz("context_77")).unwrap();
    let target = expected("target");
    for checkpointing in [0, 1, usize::MAX] {
        unet.set_gradient_checkpointing(checkpointing);
        let out = unet
            .forward(
                &npz("latents"),
                &npz("timesteps"),
                context.as_tensor(),
                Some(&vector),
            )
            .unwrap();
        let loss = (out - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        let golden_loss = expected("loss").to_scalar::<f32>().unwrap();
        let ours = loss.to_scalar::<f32>().unwrap();
        assert!(
            (ours - golden_loss).abs() <= 1e-5 * golden_loss,
            "loss {ours} vs {golden_loss}"
        );
        let grads = recompute::backward(&loss).unwrap();
        let mut checked = vec![("context".to_string(), context.as_tensor().clone())];
        for module in &network.modules {
            for (part, var) in [("lora_down", &module.down), ("lora_up", &module.up)] {
                checked.push((
                    format!("{}.{part}.weight", module.name),
                    var.as_tensor().clone(),
                ));
            }
        }
        for (name, tensor) in checked {
            let want = expected(&format!("grad.{name}"));
            let got = grads
                .get(&tensor)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let got = got.reshape(want.shape()).unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let err = max_abs(&got, &want);
            // Relative to the tensor's largest gradient; the floor covers gradients that are zero
            // but for rounding (time-embedding LoRAs before a one-channel GroupNorm group).
            assert!(
                err <= 1e-3 * scale + 1e-9,
                "{name} (checkpointed levels {checkpointing}): max abs error {err:e}, scale {scale:e}"
            );
        }
    }
}
