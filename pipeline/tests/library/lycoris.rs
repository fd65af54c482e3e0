//! LyCORIS networks against lycoris-lora's `lycoris.kohya` (tests/fixtures/golden/lycoris, made by
//! tests/fixtures/generate/lycoris_networks.py): key names, shapes and dtypes, initialisation,
//! the forward change of single modules and of the whole UNet, DoRA's gradients, the presets' and
//! the SDXL fixture's key sets.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use lorakit_pipeline::models::adapter::{Adaptable, Joined, LayerAdapter};
use lorakit_pipeline::models::frozen::FrozenKind;
use lorakit_pipeline::models::text_encoders::load_text_encoders;
use lorakit_pipeline::models::unet::{self, Unet};
use lorakit_pipeline::models::{Checkpoint, Component};
use lorakit_pipeline::networks::lora::DropoutRates;
use lorakit_pipeline::networks::lycoris::{Algo, LycorisConfig, LycorisNetwork, Preset};

use crate::support::{fixtures, golden_key_shapes, max_abs, npz_tensor, state_key_shapes};

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

/// The golden cases: name and the config `lycoris.kohya` was given.
fn cases() -> Vec<(&'static str, LycorisConfig)> {
    let config = |algo, dim, alpha, conv: Option<(usize, f32)>, factor, decompose_both| {
        let (conv_dim, conv_alpha) = conv.unwrap_or((dim, alpha));
        LycorisConfig {
            algo,
            dim,
            alpha,
            conv_dim,
            conv_alpha,
            factor,
            decompose_both,
            dropout: DropoutRates::default(),
            use_tucker: false,
            weight_decompose: false,
            wd_on_output: true,
            use_scalar: false,
            block_size: 4,
            train_norm: false,
            preset: Preset::builtin("full").unwrap(),
        }
    };
    let tucker = |algo| LycorisConfig {
        use_tucker: true,
        ..config(algo, 4, 2.0, Some((2, 1.0)), -1, false)
    };
    let dora = |algo| LycorisConfig {
        weight_decompose: true,
        ..config(algo, 4, 2.0, Some((2, 1.0)), -1, false)
    };
    let dora_in = |algo| LycorisConfig {
        wd_on_output: false,
        ..dora(algo)
    };
    let scalar = |algo| LycorisConfig {
        use_scalar: true,
        ..config(algo, 4, 2.0, Some((2, 1.0)), -1, false)
    };
    vec![
        (
            "locon",
            config(Algo::Locon, 4, 2.0, Some((2, 1.0)), -1, false),
        ),
        (
            "loha",
            config(Algo::Loha, 4, 2.0, Some((2, 1.0)), -1, false),
        ),
        (
            "lokr",
            config(Algo::Lokr, 4, 2.0, Some((2, 1.0)), -1, false),
        ),
        (
            "lokr_factor8_both",
            config(Algo::Lokr, 2, 1.0, None, 8, true),
        ),
        ("locon_dora", dora(Algo::Locon)),
        ("loha_dora", dora(Algo::Loha)),
        ("lokr_dora", dora(Algo::Lokr)),
        ("locon_tucker", tucker(Algo::Locon)),
        ("loha_tucker", tucker(Algo::Loha)),
        ("lokr_tucker", tucker(Algo::Lokr)),
        ("locon_dora_in", dora_in(Algo::Locon)),
        ("loha_dora_in", dora_in(Algo::Loha)),
        ("locon_scalar", scalar(Algo::Locon)),
        ("loha_scalar", scalar(Algo::Loha)),
        ("lokr_scalar", scalar(Algo::Lokr)),
    ]
}

fn golden_json(case: &str) -> serde_json::Value {
    let path = fixtures().join(format!("golden/lycoris/{case}_keys.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `algo=dylora` as the golden was made: dim 4 / alpha 2, conv_dim 4 / conv_alpha 1, blocks of
/// 2 ranks.
fn dylora_config() -> LycorisConfig {
    let locon = &cases()[0].1;
    LycorisConfig {
        algo: Algo::Dylora,
        conv_dim: 4,
        conv_alpha: 1.0,
        block_size: 2,
        ..locon.clone()
    }
}

#[test]
fn lycoris_keys_shapes_alphas_and_initialisation_match_lycoris() {
    let norm = LycorisConfig {
        train_norm: true,
        ..cases()[0].1.clone()
    };
    let extra = [("dylora", dylora_config()), ("locon_norm", norm)];
    for (case, config) in cases().into_iter().chain(extra) {
        let golden = golden_json(case);
        let mut unet = base_unet().clone();
        let model = fixtures().join("sd15-tiny/model.safetensors");
        let mut encoders = load_text_encoders(&model, DType::F32, &Device::Cpu).unwrap();
        let text = &mut encoders.encoders[0];
        text.set_lora_prefix("lora_te");
        let mut models = Joined(vec![text as &mut dyn Adaptable, &mut unet]);
        let network = LycorisNetwork::create(&mut models, &config, 3, &Device::Cpu).unwrap();
        assert_eq!(
            (network.modules.len() + network.norms.len()) as u64,
            golden["modules"].as_u64().unwrap(),
            "{case}"
        );
        let state = network.state_dict(None).unwrap();
        let ours = state_key_shapes(&state);
        let theirs = golden_key_shapes(&golden["keys"]);
        assert_eq!(ours, theirs, "{case}: keys, shapes and dtypes");
        for (key, tensor) in &state {
            if let Some(module) = key.strip_suffix(".alpha") {
                let want = golden["alphas"][module].as_f64().unwrap();
                let got = tensor.to_scalar::<f32>().unwrap() as f64;
                assert_eq!(got, want, "{case}: {key}");
            }
        }
        // Initialisation: per tensor name, the same spread and centre (zeros exactly zero); the
        // largest values are only reported (a few small tensors decide them).
        let mut values: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        for (key, tensor) in &state {
            let part = key.split_once('.').unwrap().1;
            if part != "alpha" {
                let flat = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                values.entry(part.to_string()).or_default().extend(flat);
            }
        }
        for (part, stats) in golden["init"].as_object().unwrap() {
            let v = &values[part];
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            let max_abs = v.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            let (want_std, want_max) = (
                stats["std"].as_f64().unwrap(),
                stats["max_abs"].as_f64().unwrap(),
            );
            assert_eq!(n as u64, stats["count"].as_u64().unwrap(), "{case} {part}");
            if part == "dora_scale" {
                // The norms of the frozen weight's rows: the same values, not only the same spread.
                for (stat, got) in [("mean", mean), ("std", std), ("max_abs", max_abs)] {
                    let want = stats[stat].as_f64().unwrap();
                    assert!(
                        (got / want - 1.0).abs() < 1e-4,
                        "{case} {part} {stat}: {got} vs {want}"
                    );
                }
                continue;
            }
            eprintln!("{case} {part}: std {std:.4} (lycoris {want_std:.4}), max {max_abs:.4} (lycoris {want_max:.4})");
            if want_std == 0.0 {
                assert_eq!(max_abs, 0.0, "{case} {part}");
            } else {
                assert!(
                    (std / want_std - 1.0).abs() < 0.05,
                    "{case} {part}: std {std} vs {want_std}"
                );
                assert!(mean.abs() < 0.05 * want_std, "{case} {part}: mean {mean}");
            }
        }
    }
}

#[test]
fn lycoris_files_load_and_reproduce_the_module_and_unet_changes_of_lycoris() {
    let latents = npz_tensor(&fixtures().join("golden/unet/unet.npz"), "latents");
    let timesteps = npz_tensor(&fixtures().join("golden/unet/unet.npz"), "timesteps");
    let context = npz_tensor(
        &fixtures().join("golden/unet/unet.npz"),
        "encoder_hidden_states_77",
    );
    let base = base_unet()
        .forward(&latents, &timesteps, &context, None)
        .unwrap();
    for (case, _) in cases() {
        let file = fixtures().join(format!("golden/lycoris/{case}.safetensors"));
        let npz = fixtures().join(format!("golden/lycoris/{case}.npz"));
        let mut unet = base_unet().clone();
        let (network, unknown) = LycorisNetwork::load(&mut unet, &file, 1.0, &Device::Cpu).unwrap();
        assert_eq!(network.modules.len(), 282, "{case}: UNet modules");
        assert_eq!(
            unknown.len(),
            72,
            "{case}: the text-encoder modules are left"
        );
        assert!(unknown.iter().all(|n| n.starts_with("lora_te_")));
        // Single modules: the adapter's change op(x, ΔW) against lycoris' module(x) - org_forward(x).
        let names: Vec<String> = {
            let reader = npyz::npz::NpzArchive::open(&npz).unwrap();
            reader
                .array_names()
                .filter_map(|n| n.strip_prefix("delta__").map(str::to_string))
                .collect()
        };
        let mut checked = 0;
        for name in names.iter().filter(|n| n.starts_with("lora_unet_")) {
            let module = network.modules.iter().find(|m| &m.name == name).unwrap();
            let x = npz_tensor(&npz, &format!("x__{name}"));
            let want = npz_tensor(&npz, &format!("delta__{name}"));
            let delta = module.weight_delta().unwrap();
            let kind = match delta.rank() {
                2 => FrozenKind::Linear,
                _ => FrozenKind::Conv2d {
                    stride: if name.contains("downsamplers") { 2 } else { 1 },
                    padding: delta.dim(2).unwrap() / 2,
                },
            };
            let got = module.delta(&x, kind).unwrap().unwrap();
            let err = max_abs(&got, &want);
            let scale = max_abs(&want, &Tensor::zeros_like(&want).unwrap());
            eprintln!("{case} {name}: max abs error {err:e} (change up to {scale:.3})");
            assert!(scale > 1e-3 && err <= 1e-5, "{case} {name}: {err}");
            checked += 1;
        }
        assert!(checked >= 7, "{case}: {checked} modules checked");
        // The whole UNet: output change with the network against lycoris'.
        let out = unet.forward(&latents, &timesteps, &context, None).unwrap();
        let delta = (out - &base).unwrap();
        let want = npz_tensor(&npz, "unet_delta");
        let err = max_abs(&delta, &want);
        let scale = max_abs(&want, &Tensor::zeros_like(&want).unwrap());
        eprintln!("{case}: UNet output change max abs error {err:e} (change up to {scale:.3})");
        assert!(err <= 1e-4 * scale.max(1.0), "{case}: {err}");
    }
}

#[test]
fn lycoris_files_merged_into_the_weights_change_the_unet_as_lycoris_forward() {
    // What generate-images and --base_weights do with a LyCORIS file: ΔW merged into the frozen
    // weights gives the UNet output change of lycoris' own forward pass.
    let golden = fixtures().join("golden/unet/unet.npz");
    let latents = npz_tensor(&golden, "latents");
    let timesteps = npz_tensor(&golden, "timesteps");
    let context = npz_tensor(&golden, "encoder_hidden_states_77");
    let base = base_unet()
        .forward(&latents, &timesteps, &context, None)
        .unwrap();
    for (case, _) in cases() {
        let file = fixtures().join(format!("golden/lycoris/{case}.safetensors"));
        let mut unet = base_unet().clone();
        let report = lorakit_pipeline::networks::merge_file(&mut unet, &file, 1.0).unwrap();
        assert_eq!(report.applied, 282, "{case}");
        assert_eq!(report.ignored_text_encoder, 72, "{case}");
        let mut attached = 0;
        unet.visit_layers(&mut |layer| attached += usize::from(layer.adapter.is_some()));
        assert_eq!(attached, 0, "{case}: merged, not attached");
        let out = unet.forward(&latents, &timesteps, &context, None).unwrap();
        let delta = (out - &base).unwrap();
        let npz = fixtures().join(format!("golden/lycoris/{case}.npz"));
        let want = npz_tensor(&npz, "unet_delta");
        let err = max_abs(&delta, &want);
        let scale = max_abs(&want, &Tensor::zeros_like(&want).unwrap());
        eprintln!(
            "{case} merged: UNet output change max abs error {err:e} (change up to {scale:.3})"
        );
        assert!(err <= 1e-4 * scale.max(1.0), "{case}: {err}");
        // DoRA at multiplier 0.5: lycoris scales the norm ratio, not ΔW.
        if case.contains("_dora") {
            let mut unet = base_unet().clone();
            lorakit_pipeline::networks::merge_file(&mut unet, &file, 0.5).unwrap();
            let out = unet.forward(&latents, &timesteps, &context, None).unwrap();
            let delta = (out - &base).unwrap();
            let want = npz_tensor(&npz, "unet_delta_m05");
            let err = max_abs(&delta, &want);
            let scale = max_abs(&want, &Tensor::zeros_like(&want).unwrap());
            eprintln!("{case} merged at 0.5: max abs error {err:e} (change up to {scale:.3})");
            assert!(err <= 1e-4 * scale.max(1.0), "{case} at 0.5: {err}");
        }
    }
}

#[test]
fn dora_gradients_match_torch_autograd() {
    // The gradients of sum(change · grad_out) for each parameter of single DoRA modules (a
    // Linear, 1x1, 3x3 and strided convolutions), against lycoris' module under torch autograd.
    for case in [
        "locon_dora",
        "loha_dora",
        "lokr_dora",
        "locon_dora_in",
        "loha_dora_in",
    ] {
        let file = fixtures().join(format!("golden/lycoris/{case}.safetensors"));
        let npz = fixtures().join(format!("golden/lycoris/{case}.npz"));
        let mut unet = base_unet().clone();
        let (network, _) = LycorisNetwork::load(&mut unet, &file, 1.0, &Device::Cpu).unwrap();
        let names: Vec<String> = npyz::npz::NpzArchive::open(&npz)
            .unwrap()
            .array_names()
            .filter_map(|n| n.strip_prefix("grad_out__").map(str::to_string))
            .filter(|n| n.starts_with("lora_unet_"))
            .collect();
        let mut checked = 0;
        for name in &names {
            let module = network.modules.iter().find(|m| &m.name == name).unwrap();
            let grad_out = npz_tensor(&npz, &format!("grad_out__{name}"));
            let x = npz_tensor(&npz, &format!("x__{name}"));
            let kind = match module.weight_delta().unwrap().rank() {
                2 => FrozenKind::Linear,
                _ => FrozenKind::Conv2d {
                    stride: if name.contains("downsamplers") { 2 } else { 1 },
                    padding: module.weight_delta().unwrap().dim(2).unwrap() / 2,
                },
            };
            let change = module.delta(&x, kind).unwrap().unwrap();
            let grads = (change * grad_out)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (part, var) in module.named_vars() {
                let want = npz_tensor(&npz, &format!("grad__{name}__{part}"));
                let got = grads.get(var.as_tensor()).unwrap();
                let err = max_abs(got, &want);
                let scale = max_abs(&want, &Tensor::zeros_like(&want).unwrap());
                eprintln!(
                    "{case} {name} {part}: gradient max abs error {err:e} (up to {scale:.3e})"
                );
                assert!(
                    err <= 1e-4 * scale.max(1e-3),
                    "{case} {name} {part}: {err} of {scale}"
                );
            }
            checked += 1;
        }
        assert!(checked >= 7, "{case}: {checked} modules checked");
    }
}

/// The state dict of a fresh `config` network on the SD1.5 fixture's text encoder and UNet.
fn fresh_sd15_state(config: &LycorisConfig) -> Vec<(String, Tensor)> {
    let mut unet = base_unet().clone();
    let model = fixtures().join("sd15-tiny/model.safetensors");
    let mut encoders = load_text_encoders(&model, DType::F32, &Device::Cpu).unwrap();
    let text = &mut encoders.encoders[0];
    text.set_lora_prefix("lora_te");
    let mut models = Joined(vec![text as &mut dyn Adaptable, &mut unet]);
    let network = LycorisNetwork::create(&mut models, config, 3, &Device::Cpu).unwrap();
    network.state_dict(None).unwrap()
}

#[test]
fn lycoris_presets_select_the_layers_lycoris_selects() {
    // LoCon dim 4 / alpha 2 under the built-in presets and a preset file (golden/lycoris/
    // preset.toml: target classes, a class excluded by a matching name, names and regexes).
    let locon = |preset: Preset, conv_dim| LycorisConfig {
        algo: Algo::Locon,
        dim: 4,
        alpha: 2.0,
        conv_dim,
        conv_alpha: 2.0,
        factor: -1,
        decompose_both: false,
        dropout: DropoutRates::default(),
        use_tucker: false,
        weight_decompose: false,
        wd_on_output: true,
        use_scalar: false,
        block_size: 4,
        train_norm: false,
        preset,
    };
    let preset_file = fixtures().join("golden/lycoris/preset.toml");
    // With train_norm, whole CLIP encoder layers as targets: their layer norms get modules.
    let norm_te_file = fixtures().join("golden/lycoris/norm_te.toml");
    let cases = [
        ("preset_attn_mlp", Preset::builtin("attn-mlp").unwrap(), 4),
        ("preset_attn_only", Preset::builtin("attn-only").unwrap(), 4),
        (
            "preset_unet_transformer_only",
            Preset::builtin("unet-transformer-only").unwrap(),
            4,
        ),
        ("preset_full_lin", Preset::builtin("full-lin").unwrap(), 4),
        ("preset_unet_only", Preset::builtin("unet-only").unwrap(), 4),
        (
            "preset_unet_convblock_only",
            Preset::builtin("unet-convblock-only").unwrap(),
            4,
        ),
        ("preset_file", Preset::from_file(&preset_file).unwrap(), 2),
        ("norm_te", Preset::from_file(&norm_te_file).unwrap(), 4),
    ];
    for (case, preset, conv_dim) in cases {
        let golden = golden_json(case);
        let config = LycorisConfig {
            train_norm: case == "norm_te",
            ..locon(preset, conv_dim)
        };
        let state = fresh_sd15_state(&config);
        let modules = (state.iter().map(|(k, _)| k.split_once('.').unwrap().0))
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        assert_eq!(
            modules as u64,
            golden["modules"].as_u64().unwrap(),
            "{case}"
        );
        assert_eq!(
            state_key_shapes(&state),
            golden_key_shapes(&golden["keys"]),
            "{case}: keys, shapes and dtypes"
        );
    }
}

#[test]
fn algo_maps_give_each_module_lycoris_algorithm_and_options() {
    // golden/lycoris/algo_map.toml: module_algo_map entries for a target class, nested classes
    // (one with options only, inheriting the enclosing algorithm) and Conv2d, and name_algo_map
    // entries by name and by pattern; LoCon dim 4 / alpha 2, conv 2 / 1 otherwise.
    let preset = Preset::from_file(&fixtures().join("golden/lycoris/algo_map.toml")).unwrap();
    let config = LycorisConfig {
        conv_dim: 2,
        conv_alpha: 1.0,
        preset,
        ..cases()[0].1.clone()
    };
    let golden = golden_json("algo_map");
    let state = fresh_sd15_state(&config);
    assert_eq!(
        state_key_shapes(&state),
        golden_key_shapes(&golden["keys"]),
        "keys, shapes and dtypes"
    );
    let mut alphas = 0;
    for (key, tensor) in &state {
        if let Some(module) = key.strip_suffix(".alpha") {
            let want = golden["alphas"][module].as_f64().unwrap();
            assert_eq!(tensor.to_scalar::<f32>().unwrap() as f64, want, "{key}");
            alphas += 1;
        }
    }
    assert_eq!(alphas as u64, golden["modules"].as_u64().unwrap());
    // Every algorithm of the map is there, DoRA's norms included.
    for part in [".hada_w1_a", ".lokr_w1", ".lora_mid.weight", ".dora_scale"] {
        assert!(state.iter().any(|(k, _)| k.ends_with(part)), "{part}");
    }
}

#[test]
fn dylora_blocks_change_the_layer_as_lycoris_truncated_ranks() {
    // The golden file (lycoris' dylora network, random factors) loads into a fresh network
    // block by block and saves back the same tensors. While training, a module uses its first k
    // blocks (k drawn per forward pass): lycoris' `get_diff_weight(rank=(k-1)·s)` with its
    // scale alpha / k, where lorakit scales by alpha / (k·s), the scale a loader applies to the
    // whole file at k = all blocks. Only block k gets a gradient.
    let config = dylora_config();
    let file = fixtures().join("golden/lycoris/dylora.safetensors");
    let npz = fixtures().join("golden/lycoris/dylora.npz");
    let mut unet = base_unet().clone();
    let model = fixtures().join("sd15-tiny/model.safetensors");
    let mut encoders = load_text_encoders(&model, DType::F32, &Device::Cpu).unwrap();
    let text = &mut encoders.encoders[0];
    text.set_lora_prefix("lora_te");
    let mut models = Joined(vec![text as &mut dyn Adaptable, &mut unet]);
    let network = LycorisNetwork::create(&mut models, &config, 3, &Device::Cpu).unwrap();
    assert_eq!(network.load_weights(&file).unwrap(), 354);
    let saved = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    for (key, tensor) in network.state_dict(None).unwrap() {
        assert_eq!(max_abs(&tensor, &saved[&key]), 0.0, "{key}");
    }
    let block_size = config.block_size;
    let names: Vec<String> = (npyz::npz::NpzArchive::open(&npz).unwrap().array_names())
        .filter_map(|n| n.strip_prefix("x__").map(str::to_string))
        .collect();
    assert_eq!(names.len(), 9, "modules with golden inputs");
    for name in &names {
        let module = network.modules.iter().find(|m| &m.name == name).unwrap();
        let x = npz_tensor(&npz, &format!("x__{name}"));
        let lycoris: Vec<Tensor> = (0..2)
            .map(|k| npz_tensor(&npz, &format!("delta__{name}__{}", k * block_size)))
            .collect();
        let kind = golden_kind(name, &module.weight_delta().unwrap());
        let mut seen = [false; 2];
        for stream in 1..=12u64 {
            network.set_dropout_stream(Some(stream));
            let got = module.delta(&x, kind).unwrap().unwrap();
            let got = got.affine(block_size as f64, 0.0).unwrap();
            let (blocks, err) = (lycoris.iter().enumerate())
                .map(|(k, want)| (k + 1, max_abs(&got, want)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            let scale = max_abs(
                &lycoris[blocks - 1],
                &lycoris[blocks - 1].zeros_like().unwrap(),
            );
            assert!(
                scale > 1e-3 && err <= 1e-5 * scale.max(1.0),
                "{name} stream {stream}: {err}"
            );
            seen[blocks - 1] = true;
            // The gradient reaches the last block used, and only it.
            let grads = got.sum_all().unwrap().backward().unwrap();
            for (part, var) in module.named_vars() {
                let block: usize = part.rsplit('.').next().unwrap().parse().unwrap();
                assert_eq!(
                    grads.get(var.as_tensor()).is_some(),
                    block + 1 == blocks,
                    "{name} {part} with {blocks} blocks"
                );
            }
        }
        assert_eq!(seen, [true, true], "{name}: both block counts drawn");
        // Outside training: every block, at alpha / dim.
        network.set_dropout_stream(None);
        let got = module.delta(&x, kind).unwrap().unwrap();
        let err = max_abs(&got.affine(block_size as f64, 0.0).unwrap(), &lycoris[1]);
        assert!(err <= 1e-5, "{name} at full rank: {err}");
    }
}

#[test]
fn norm_modules_change_the_norms_and_the_unet_as_lycoris() {
    // golden/lycoris/locon_norm: LoCon with train_norm (w_norm / b_norm on every GroupNorm and
    // LayerNorm inside the target classes), random factors.
    let file = fixtures().join("golden/lycoris/locon_norm.safetensors");
    let npz = fixtures().join("golden/lycoris/locon_norm.npz");
    let unet_npz = fixtures().join("golden/unet/unet.npz");
    let latents = npz_tensor(&unet_npz, "latents");
    let timesteps = npz_tensor(&unet_npz, "timesteps");
    let context = npz_tensor(&unet_npz, "encoder_hidden_states_77");
    let base = base_unet()
        .forward(&latents, &timesteps, &context, None)
        .unwrap();
    let want = npz_tensor(&npz, "unet_delta");
    let scale = max_abs(&want, &want.zeros_like().unwrap());
    let mut unet = base_unet().clone();
    let (network, unknown) = LycorisNetwork::load(&mut unet, &file, 1.0, &Device::Cpu).unwrap();
    assert_eq!((network.modules.len(), network.norms.len()), (282, 108));
    assert_eq!(unknown.len(), 72, "the text-encoder modules are left");
    // Single norm layers: the output with the module minus without, against lycoris'.
    let names: Vec<String> = (npyz::npz::NpzArchive::open(&npz).unwrap().array_names())
        .filter_map(|n| n.strip_prefix("x__").map(str::to_string))
        .collect();
    assert_eq!(names.len(), 4);
    let mut checked = 0;
    unet.visit_norms(&mut |norm| {
        let name = norm.lora_name();
        if !names.contains(&name) {
            return;
        }
        let x = candle_core::Var::from_tensor(&npz_tensor(&npz, &format!("x__{name}"))).unwrap();
        let with = norm.forward(x.as_tensor()).unwrap();
        let mut plain = norm.clone();
        plain.adapter = None;
        let got = (with - plain.forward(x.as_tensor()).unwrap()).unwrap();
        let want = npz_tensor(&npz, &format!("delta__{name}"));
        let err = max_abs(&got, &want);
        eprintln!("{name}: max abs error {err:e}");
        assert!(err <= 1e-5, "{name}: {err}");
        // Gradients of sum(delta * grad_out) against torch autograd.
        let grad_out = npz_tensor(&npz, &format!("grad_out__{name}"));
        let grads = (got * grad_out)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let module = network.norms.iter().find(|m| m.name == name).unwrap();
        for (part, tensor) in [
            ("w_norm", module.weight.as_tensor()),
            ("b_norm", module.bias.as_tensor()),
            ("x", x.as_tensor()),
        ] {
            let want = npz_tensor(&npz, &format!("grad__{name}__{part}"));
            let got = grads.get(tensor).unwrap();
            let err = max_abs(got, &want);
            let scale = max_abs(&want, &want.zeros_like().unwrap());
            eprintln!("{name} {part}: gradient max abs error {err:e} (up to {scale:.3})");
            assert!(err <= 1e-4 * scale.max(1.0), "{name} {part}: {err}");
        }
        checked += 1;
    });
    assert_eq!(checked, 4);
    // The whole UNet, attached and merged.
    let attached = (unet.forward(&latents, &timesteps, &context, None).unwrap() - &base).unwrap();
    let err = max_abs(&attached, &want);
    eprintln!("attached: UNet output change max abs error {err:e} (change up to {scale:.3})");
    assert!(scale > 1e-2 && err <= 1e-4 * scale.max(1.0), "{err}");
    let mut merged = base_unet().clone();
    let report = LycorisNetwork::merge_file(&mut merged, &file, 1.0).unwrap();
    assert_eq!(report.applied, 282 + 108);
    let merged = (merged
        .forward(&latents, &timesteps, &context, None)
        .unwrap()
        - &base)
        .unwrap();
    let err = max_abs(&merged, &want);
    eprintln!("merged: UNet output change max abs error {err:e}");
    assert!(err <= 1e-4 * scale.max(1.0), "{err}");
    // Saving gives the file's tensors back.
    let saved = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let state = network.state_dict(None).unwrap();
    assert_eq!(state.len(), saved.len() - 72 * 3);
    for (key, tensor) in state {
        assert!(max_abs(&tensor, &saved[&key]) <= 1e-6, "{key}");
    }
}

#[test]
fn lycoris_locon_on_the_sdxl_fixture_has_lycoris_keys() {
    // Both text encoders (lora_te1 / lora_te2) and the SDXL UNet, whose conv_in / time_embed
    // layers have other names than the full preset lists, so they get no module.
    let model = fixtures().join("sdxl-tiny/model.safetensors");
    let checkpoint = Checkpoint::open(&model).unwrap();
    let mapping = unet::ldm_mapping(checkpoint.family());
    let vb = checkpoint
        .var_builder(Component::Unet, DType::F32, &Device::Cpu, &mapping)
        .unwrap();
    let mut unet = Unet::load(&vb, DType::F32).unwrap();
    let mut encoders = load_text_encoders(&model, DType::F32, &Device::Cpu).unwrap();
    let family = encoders.family;
    let mut models: Vec<&mut dyn Adaptable> = Vec::new();
    for (encoder, prefix) in (encoders.encoders.iter_mut()).zip(family.text_encoder_lora_prefixes())
    {
        encoder.set_lora_prefix(prefix);
        models.push(encoder);
    }
    models.push(&mut unet);
    let config = LycorisConfig {
        algo: Algo::Locon,
        dim: 4,
        alpha: 2.0,
        conv_dim: 2,
        conv_alpha: 1.0,
        factor: -1,
        decompose_both: false,
        dropout: DropoutRates::default(),
        use_tucker: false,
        weight_decompose: false,
        wd_on_output: true,
        use_scalar: false,
        block_size: 4,
        train_norm: false,
        preset: Preset::builtin("full").unwrap(),
    };
    let mut models = Joined(models);
    // Plain, and with train_norm (the SDXL UNet's norms under sd-scripts' SDXL names).
    for (case, train_norm) in [("sdxl_locon", false), ("sdxl_locon_norm", true)] {
        let config = LycorisConfig {
            train_norm,
            ..config.clone()
        };
        let network = LycorisNetwork::create(&mut models, &config, 3, &Device::Cpu).unwrap();
        let golden = golden_json(case);
        assert_eq!(
            (network.modules.len() + network.norms.len()) as u64,
            golden["modules"].as_u64().unwrap(),
            "{case}"
        );
        let state = network.state_dict(None).unwrap();
        assert_eq!(
            state_key_shapes(&state),
            golden_key_shapes(&golden["keys"]),
            "{case}: keys, shapes and dtypes"
        );
        for (key, tensor) in &state {
            if let Some(module) = key.strip_suffix(".alpha") {
                let want = golden["alphas"][module].as_f64().unwrap();
                assert_eq!(tensor.to_scalar::<f32>().unwrap() as f64, want, "{key}");
            }
        }
    }
}

/// The layer kind of a golden module, from its weight change's rank and name.
fn golden_kind(name: &str, delta: &Tensor) -> FrozenKind {
    match delta.rank() {
        2 => FrozenKind::Linear,
        _ => FrozenKind::Conv2d {
            stride: if name.contains("downsamplers") { 2 } else { 1 },
            padding: delta.dim(2).unwrap() / 2,
        },
    }
}

#[test]
fn use_scalar_initialises_multiplies_and_saves_as_lycoris() {
    for (case, algo) in [
        ("locon_scalar", Algo::Locon),
        ("loha_scalar", Algo::Loha),
        ("lokr_scalar", Algo::Lokr),
    ] {
        let config = cases().into_iter().find(|(c, _)| *c == case).unwrap().1;
        assert_eq!((config.algo, config.use_scalar), (algo, true));
        let golden = golden_json(case);
        // The trainable tensors of a fresh network (the file's are multiplied by the scalar 0):
        // the factor that is otherwise zero is drawn, the scalar is exactly 0.
        let mut unet = base_unet().clone();
        let model = fixtures().join("sd15-tiny/model.safetensors");
        let mut encoders = load_text_encoders(&model, DType::F32, &Device::Cpu).unwrap();
        let text = &mut encoders.encoders[0];
        text.set_lora_prefix("lora_te");
        let mut models = Joined(vec![text as &mut dyn Adaptable, &mut unet]);
        let network = LycorisNetwork::create(&mut models, &config, 3, &Device::Cpu).unwrap();
        let mut values: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        for module in &network.modules {
            for (part, var) in module.named_vars() {
                let flat = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                values.entry(part.into_owned()).or_default().extend(flat);
            }
        }
        let want_parts: Vec<&str> = (golden["param_init"].as_object().unwrap().keys())
            .map(String::as_str)
            .collect();
        assert_eq!(
            values.keys().map(String::as_str).collect::<Vec<_>>(),
            want_parts,
            "{case}"
        );
        for (part, stats) in golden["param_init"].as_object().unwrap() {
            let v = &values[part.as_str()];
            let n = v.len() as f64;
            assert_eq!(n as u64, stats["count"].as_u64().unwrap(), "{case} {part}");
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            let want_std = stats["std"].as_f64().unwrap();
            eprintln!("{case} {part}: std {std:.4} (lycoris {want_std:.4})");
            if want_std == 0.0 {
                let want_max = stats["max_abs"].as_f64().unwrap();
                let max_abs = v.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                assert_eq!(max_abs, want_max, "{case} {part}");
            } else {
                assert!((std / want_std - 1.0).abs() < 0.05, "{case} {part}: {std}");
                assert!(mean.abs() < 0.05 * want_std, "{case} {part}: mean {mean}");
            }
        }
        // lycoris' trained tensors (scalar apart) set into lorakit's modules: the same change,
        // and the same saved tensors (the scalar multiplied into the first factor).
        let npz = fixtures().join(format!("golden/lycoris/{case}.npz"));
        let file = fixtures().join(format!("golden/lycoris/{case}.safetensors"));
        let saved = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let mut unet = base_unet().clone();
        let network = LycorisNetwork::create(&mut unet, &config, 3, &Device::Cpu).unwrap();
        let names: Vec<String> = npyz::npz::NpzArchive::open(&npz)
            .unwrap()
            .array_names()
            .filter_map(|n| n.strip_prefix("delta__").map(str::to_string))
            .filter(|n| n.starts_with("lora_unet_"))
            .collect();
        for name in &names {
            let module = network.modules.iter().find(|m| &m.name == name).unwrap();
            for (part, var) in module.named_vars() {
                var.set(&npz_tensor(&npz, &format!("param__{name}__{part}")))
                    .unwrap();
            }
            let want = npz_tensor(&npz, &format!("delta__{name}"));
            let x = npz_tensor(&npz, &format!("x__{name}"));
            let kind = golden_kind(name, &module.weight_delta().unwrap());
            let got = module.delta(&x, kind).unwrap().unwrap();
            let err = max_abs(&got, &want);
            eprintln!("{case} {name}: max abs error {err:e}");
            assert!(err <= 1e-5, "{case} {name}: {err}");
        }
        let state = network.state_dict(None).unwrap();
        let mut compared = 0;
        for (key, tensor) in &state {
            let module = key.split_once('.').unwrap().0;
            if names.iter().any(|n| n == module) {
                let err = max_abs(tensor, &saved[key]);
                assert!(err <= 1e-6, "{case} {key}: {err}");
                compared += 1;
            }
        }
        assert!(compared >= 3 * names.len(), "{case}: {compared} tensors");
        assert!(!state.iter().any(|(k, _)| k.ends_with(".scalar")));
    }
}

#[test]
fn full_modules_save_diff_and_change_the_unet_as_lycoris_merges_them() {
    // algo=full with the attn-mlp preset. lycoris 3.4.0's own forward pass of a full module
    // fails (its apply_to deletes the layer's weight, recorded in the golden); the changes come
    // from its get_merged_weight.
    let golden = golden_json("full");
    assert!(golden["forward_error"]
        .as_str()
        .unwrap()
        .contains("has no attribute 'weight'"));
    let config = LycorisConfig {
        algo: Algo::Full,
        dim: 4,
        alpha: 2.0,
        conv_dim: 4,
        conv_alpha: 2.0,
        factor: -1,
        decompose_both: false,
        dropout: DropoutRates::default(),
        use_tucker: false,
        weight_decompose: false,
        wd_on_output: true,
        use_scalar: false,
        block_size: 4,
        train_norm: false,
        preset: Preset::builtin("attn-mlp").unwrap(),
    };
    // A fresh network: lycoris' keys (diff, diff_b; no alpha), all zero.
    let state = fresh_sd15_state(&config);
    assert_eq!(
        state_key_shapes(&state),
        golden_key_shapes(&golden["keys"]),
        "keys, shapes and dtypes"
    );
    for (key, tensor) in &state {
        let zero = Tensor::zeros_like(tensor).unwrap();
        assert_eq!(max_abs(tensor, &zero), 0.0, "{key}");
    }
    // lycoris' file: single modules and the whole UNet, attached and merged.
    let file = fixtures().join("golden/lycoris/full.safetensors");
    let npz = fixtures().join("golden/lycoris/full.npz");
    let unet_golden = fixtures().join("golden/unet/unet.npz");
    let latents = npz_tensor(&unet_golden, "latents");
    let timesteps = npz_tensor(&unet_golden, "timesteps");
    let context = npz_tensor(&unet_golden, "encoder_hidden_states_77");
    let base = base_unet()
        .forward(&latents, &timesteps, &context, None)
        .unwrap();
    let mut unet = base_unet().clone();
    let (network, unknown) = LycorisNetwork::load(&mut unet, &file, 1.0, &Device::Cpu).unwrap();
    let te_modules = unknown.len();
    assert!(unknown.iter().all(|n| n.starts_with("lora_te_")));
    assert_eq!(
        network.modules.len() + te_modules,
        golden["modules"].as_u64().unwrap() as usize
    );
    let names: Vec<String> = npyz::npz::NpzArchive::open(&npz)
        .unwrap()
        .array_names()
        .filter_map(|n| n.strip_prefix("delta__").map(str::to_string))
        .filter(|n| n.starts_with("lora_unet_"))
        .collect();
    assert_eq!(names.len(), 3);
    for name in &names {
        let module = network.modules.iter().find(|m| &m.name == name).unwrap();
        let x = npz_tensor(&npz, &format!("x__{name}"));
        let want = npz_tensor(&npz, &format!("delta__{name}"));
        let kind = golden_kind(name, &module.weight_delta().unwrap());
        let got = module.delta(&x, kind).unwrap().unwrap();
        let err = max_abs(&got, &want);
        let scale = max_abs(&want, &Tensor::zeros_like(&want).unwrap());
        eprintln!("full {name}: max abs error {err:e} (change up to {scale:.3})");
        assert!(scale > 1e-3 && err <= 1e-5, "{name}: {err}");
    }
    // The saved tensors are the file's.
    let saved = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    for (key, tensor) in network.state_dict(None).unwrap() {
        let err = max_abs(&tensor, &saved[&key]);
        assert!(err <= 1e-6, "{key}: {err}");
    }
    let want = npz_tensor(&npz, "unet_delta");
    let scale = max_abs(&want, &Tensor::zeros_like(&want).unwrap());
    let attached = (unet.forward(&latents, &timesteps, &context, None).unwrap() - &base).unwrap();
    let mut merged_unet = base_unet().clone();
    let report = lorakit_pipeline::networks::merge_file(&mut merged_unet, &file, 1.0).unwrap();
    assert_eq!(report.applied, network.modules.len());
    let merged = (merged_unet
        .forward(&latents, &timesteps, &context, None)
        .unwrap()
        - &base)
        .unwrap();
    for (how, delta) in [("attached", attached), ("merged", merged)] {
        let err = max_abs(&delta, &want);
        eprintln!("full {how}: UNet output change max abs error {err:e} (change up to {scale:.3})");
        assert!(err <= 1e-4 * scale.max(1.0), "{how}: {err}");
    }
}
