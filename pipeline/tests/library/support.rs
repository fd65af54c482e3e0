//! Helpers shared by the library-level tests.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lorakit_pipeline::formats::npz::NpzReader;

/// The bundled fixtures (`tests/fixtures` at the repository root).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Largest absolute elementwise difference of two tensors of the same shape.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Array `name` of the `.npz` file `path`, read with the project's reader, as a CPU float32
/// tensor (integer arrays converted).
pub fn npz_tensor(path: &Path, name: &str) -> Tensor {
    let mut npz = NpzReader::open(path).unwrap();
    if npz.dtype(name).unwrap() == "<i8" {
        let (values, shape) = npz.read_i64(name).unwrap();
        let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
        return Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
    }
    npz.read_tensor_f32(name, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()))
}

/// `train-lora`'s options as the command line gives them.
#[derive(clap::Parser)]
struct TrainCommand {
    #[command(flatten)]
    args: lorakit_pipeline::stages::train_lora::TrainArgs,
}

/// Checks the LoRA network that the `network_args` of the golden `golden` (a file under the
/// fixtures, written by `lora_block_network.py` or `sdxl_lora_blocks.py`) build on `unet`
/// against sd-scripts' `networks.lora`: module set, shapes, alphas and their dtype, the block of
/// each module and the learning rate of each parameter (per-block weights and LoRA+).
pub fn assert_block_network_matches(
    golden: &str,
    unet: &mut dyn lorakit_pipeline::models::adapter::Adaptable,
    layout: lorakit_pipeline::networks::lora::BlockLayout,
) {
    use clap::Parser;
    use lorakit_pipeline::networks::lora::{Alpha, LoraNetwork};
    use lorakit_pipeline::stages::train_lora::network_args::NetworkOptions;

    let text = std::fs::read_to_string(fixtures().join(golden)).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut command: Vec<String> = [
        "train-lora",
        "--pretrained_model_name_or_path=m",
        "--in_json=j",
        "--output_dir=o",
        "--network_args",
    ]
    .map(String::from)
    .to_vec();
    for (key, value) in golden["network_args"].as_object().unwrap() {
        command.push(format!("{key}={}", value.as_str().unwrap()));
    }
    let args = TrainCommand::try_parse_from(&command).unwrap().args;
    let options = NetworkOptions::from_args(&args, layout).unwrap();
    let network = LoraNetwork::create(unet, &options.lora, 1, &Device::Cpu).unwrap();
    let expected = golden["modules"].as_object().unwrap();
    let mut ours: Vec<&str> = network.modules.iter().map(|m| m.name.as_str()).collect();
    let mut theirs: Vec<&str> = expected.keys().map(String::as_str).collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "module set");

    let unet_lr = golden["unet_lr"].as_f64().unwrap();
    for module in &network.modules {
        let want = &expected[&module.name];
        let dims = |t: &Tensor| serde_json::json!(t.dims());
        assert_eq!(
            dims(module.down.as_tensor()),
            want["down"],
            "{}",
            module.name
        );
        assert_eq!(dims(module.up.as_tensor()), want["up"], "{}", module.name);
        let (value, dtype) = match module.alpha {
            Alpha::Int(v) => (v as f64, "int64"),
            Alpha::Float(v) => (v as f64, "float32"),
        };
        assert_eq!(value, want["alpha"].as_f64().unwrap(), "{}", module.name);
        assert_eq!(dtype, want["alpha_dtype"], "{}", module.name);
        assert_eq!(
            layout.index(&module.name).map(|b| b as i64),
            want["block"].as_i64(),
            "{}",
            module.name
        );
        for (part, is_up) in [("lora_down", false), ("lora_up", true)] {
            let key = format!("{}.{part}.weight", module.name);
            let want_lr = golden["param_lr"][&key]["lr"].as_f64().unwrap();
            let lr = unet_lr * options.lr_factor(&module.name, is_up);
            assert!(
                (lr - want_lr).abs() <= 1e-12 * want_lr.abs(),
                "{key}: lr {lr} vs {want_lr}"
            );
        }
    }
}

/// Checks that gradient checkpointing changes neither the output of `unet` (C3Lier LoRA with
/// random weights and all three dropouts attached here) nor the gradients of its LoRA tensors and
/// of the text context, for the given inputs.
pub fn assert_checkpointing_changes_nothing(
    unet: &lorakit_pipeline::models::unet::Unet,
    latents: &Tensor,
    context: &Tensor,
    vector: Option<&Tensor>,
) {
    use lorakit_pipeline::models::recompute;
    use lorakit_pipeline::networks::lora::{DropoutRates, LoraConfig, LoraNetwork};

    let mut unet = unet.clone();
    let config = LoraConfig {
        conv_dim: Some(4),
        ..LoraConfig::default()
    };
    let mut network = LoraNetwork::create(&mut unet, &config, 5, &Device::Cpu).unwrap();
    // Fresh LoRA-up weights are zero, which would hide the LoRA-down gradients.
    for var in network.vars() {
        let shape = var.as_tensor().shape().clone();
        var.set(&Tensor::randn(0f32, 0.05, shape, &Device::Cpu).unwrap())
            .unwrap();
    }
    let rates = DropoutRates {
        neuron: 0.1,
        rank: 0.1,
        module: 0.1,
    };
    network.enable_dropout(&mut unet, rates);
    network.set_dropout_stream(Some(11));
    let batch = latents.dim(0).unwrap();
    let timesteps = Tensor::new(&[10f32, 500.0, 999.0][..batch], &Device::Cpu).unwrap();
    let context = candle_core::Var::from_tensor(context).unwrap();
    let mut vars = network.vars();
    vars.push(context.clone());
    let run = |unet: &lorakit_pipeline::models::unet::Unet| {
        let out = unet
            .forward(latents, &timesteps, context.as_tensor(), vector)
            .unwrap();
        let grads = recompute::backward(&out.sqr().unwrap().mean_all().unwrap()).unwrap();
        // Module dropout skips some modules: those get no gradient.
        let grads: Vec<Option<Tensor>> = (vars.iter())
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        (out, grads)
    };
    let (plain_out, plain_grads) = run(&unet);
    // One level (checkpointed and plain blocks meet) and every level.
    for levels in [1, usize::MAX] {
        unet.set_gradient_checkpointing(levels);
        let (out, grads) = run(&unet);
        assert_eq!(max_abs(&out, &plain_out), 0.0, "output changed");
        compare_gradients(&grads, &plain_grads);
    }
}

fn compare_gradients(grads: &[Option<Tensor>], plain_grads: &[Option<Tensor>]) {
    let reached = plain_grads.iter().flatten().count();
    let count = plain_grads.len();
    assert!(
        reached > count / 2,
        "only {reached} of {count} tensors reached"
    );
    assert!(
        plain_grads.last().unwrap().is_some(),
        "the context got no gradient"
    );
    for (i, (grad, plain)) in grads.iter().zip(plain_grads).enumerate() {
        let (Some(grad), Some(plain)) = (grad, plain) else {
            assert_eq!(
                grad.is_some(),
                plain.is_some(),
                "tensor {i}: reached in one run only"
            );
            continue;
        };
        let scale = plain
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(scale > 0.0, "tensor {i} has an all-zero gradient");
        let diff = max_abs(grad, plain);
        // The absolute floor covers gradients that are zero but for rounding (a time-embedding
        // shift that a one-channel GroupNorm group removes).
        assert!(
            diff <= 1e-5 * scale + 1e-8,
            "gradient {i} of {count}: differs by {diff} (scale {scale})"
        );
    }
}

/// A state dict's keys with their shapes and dtypes.
pub type KeyShapes = std::collections::BTreeMap<String, (Vec<usize>, candle_core::DType)>;

/// The keys, shapes and dtypes of a network's saved tensors.
pub fn state_key_shapes(state: &[(String, Tensor)]) -> KeyShapes {
    (state.iter())
        .map(|(k, t)| (k.clone(), (t.dims().to_vec(), t.dtype())))
        .collect()
}

/// The keys and shapes of a golden's `keys` object (`{key: {shape, dtype}}`), every dtype
/// asserted float32.
pub fn golden_key_shapes(keys: &serde_json::Value) -> KeyShapes {
    (keys.as_object().unwrap().iter())
        .map(|(k, v)| {
            let shape = (v["shape"].as_array().unwrap().iter())
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(v["dtype"], "float32", "{k}");
            (k.clone(), (shape, candle_core::DType::F32))
        })
        .collect()
}
