//! Parity of tokenisation and CLIP text encoding with the sd-scripts goldens
//! (`tests/fixtures/golden/text_encoder`, see tests/fixtures/README.md §2e).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::support::fixtures;

use candle_core::{DType, Device, Tensor};
use lorakit_pipeline::dataset::shard::Shard;
use lorakit_pipeline::formats::te_cache::{read_cache_file, TeCacheSpec};
use lorakit_pipeline::models::adapter::Joined;
use lorakit_pipeline::models::checkpoint::Checkpoint;
use lorakit_pipeline::models::clip::{apply_weights, encode_sd, encode_sdxl};
use lorakit_pipeline::models::precision::MixedPrecision;
use lorakit_pipeline::models::recompute;
use lorakit_pipeline::models::text_encoders::{load_text_encoders, TextEncoders};
use lorakit_pipeline::models::ModelFamily;
use lorakit_pipeline::networks::lora::LoraNetwork;
use lorakit_pipeline::stages::cache_text_encoder::{cache_text_encoder_outputs, TeCacheOptions};
use lorakit_pipeline::stages::train_lora::live_text::LiveText;
use lorakit_pipeline::text::caption_text::CaptionAugmentation;
use lorakit_pipeline::text::tokenize::{ClipTokenizer, MaxTokenLength, Padding, TokenChunks};

/// The golden captions, by name.
fn captions() -> BTreeMap<String, String> {
    let path = fixtures().join("golden/text_encoder/captions.json");
    let text = std::fs::read_to_string(&path).expect("golden captions.json");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["captions"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

/// One array of the text-encoder golden npz as (values as f64, shape).
fn golden(name: &str) -> (Vec<f64>, Vec<u64>) {
    golden_in("golden/text_encoder/text_encoder.npz", name)
}

/// One array of a golden npz under `tests/fixtures` as (values as f64, shape).
fn golden_in(file: &str, name: &str) -> (Vec<f64>, Vec<u64>) {
    let path = fixtures().join(file);
    let mut archive = npyz::npz::NpzArchive::open(&path).expect("golden npz");
    let array = archive
        .by_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("golden array {name} missing"));
    let shape = array.shape().to_vec();
    let values = match array.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Int => array
            .into_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        _ => array
            .into_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
    };
    (values, shape)
}

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixtures().join("sd15-tiny/tokenizer"), Padding::Eos).unwrap()
}

#[test]
fn token_ids_match_sd_scripts_for_every_caption() {
    let tokenizer = tokenizer();
    for (name, caption) in captions() {
        for length in [75, 150, 225] {
            let max_len = MaxTokenLength::new(length).unwrap();
            let chunks = tokenizer.tokenize(&caption, max_len).unwrap();
            let (expected, shape) = golden(&format!("{name}__ids_{length}"));
            assert_eq!(shape, [max_len.chunks() as u64, 77], "{name} {length}");
            let ids: Vec<f64> = chunks.ids.iter().map(|&i| i as f64).collect();
            assert_eq!(ids, expected, "ids of {name} at {length}");

            let weighted = tokenizer.tokenize_weighted(&caption, max_len).unwrap();
            let ids: Vec<f64> = weighted.ids.iter().map(|&i| i as f64).collect();
            let (expected, _) = golden(&format!("{name}__weighted_ids_{length}"));
            assert_eq!(ids, expected, "weighted ids of {name} at {length}");
            let weights: Vec<f64> = weighted.weights.iter().map(|&w| f64::from(w)).collect();
            let (expected, _) = golden(&format!("{name}__weights_{length}"));
            assert_eq!(weights, expected, "weights of {name} at {length}");
        }
    }
}

fn encoders() -> &'static TextEncoders {
    static ENCODERS: OnceLock<TextEncoders> = OnceLock::new();
    ENCODERS.get_or_init(|| {
        load_text_encoders(
            &fixtures().join("sd15-tiny/model.safetensors"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    })
}

fn ids_tensor(chunks: &TokenChunks) -> Tensor {
    Tensor::from_vec(chunks.ids.clone(), (1, chunks.chunks(), 77), &Device::Cpu).unwrap()
}

fn max_abs_diff(actual: &Tensor, expected: &[f64]) -> f64 {
    let actual: Vec<f32> = actual.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(actual.len(), expected.len());
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (f64::from(*a) - e).abs())
        .fold(0.0, f64::max)
}

#[test]
fn hidden_states_match_sd_scripts() {
    let encoders = encoders();
    assert_eq!(encoders.family, ModelFamily::Sd1);
    let tokenizer = tokenizer();
    let mut worst: f64 = 0.0;
    for (name, caption) in captions() {
        for length in [75, 225] {
            let chunks = tokenizer
                .tokenize(&caption, MaxTokenLength::new(length).unwrap())
                .unwrap();
            for clip_skip in [1, 2] {
                let hidden =
                    encode_sd(&encoders.encoders[0], &ids_tensor(&chunks), clip_skip).unwrap();
                let (expected, shape) =
                    golden(&format!("{name}__hidden_{length}_clipskip{clip_skip}"));
                assert_eq!(hidden.dims()[1..], [shape[0] as usize, shape[1] as usize]);
                let diff = max_abs_diff(&hidden, &expected);
                assert!(
                    diff <= 1e-4,
                    "{name} L{length} skip{clip_skip}: max abs {diff}"
                );
                worst = worst.max(diff);
            }
        }
    }
    eprintln!("worst max abs difference: {worst:e}");
}

#[test]
fn weighted_hidden_states_match_sd_scripts() {
    let encoders = encoders();
    let tokenizer = tokenizer();
    let caption = &captions()["weighted"];
    for length in [75, 225] {
        let chunks = tokenizer
            .tokenize_weighted(caption, MaxTokenLength::new(length).unwrap())
            .unwrap();
        for clip_skip in [1, 2] {
            let hidden = encode_sd(&encoders.encoders[0], &ids_tensor(&chunks), clip_skip).unwrap();
            let weights =
                Tensor::from_vec(chunks.body_weights(), (1, length), &Device::Cpu).unwrap();
            let weighted = apply_weights(&hidden, &weights).unwrap();
            let (expected, _) = golden(&format!(
                "weighted__weighted_hidden_{length}_clipskip{clip_skip}"
            ));
            let diff = max_abs_diff(&weighted, &expected);
            assert!(
                diff <= 1e-4,
                "weighted L{length} skip{clip_skip}: max abs {diff}"
            );
        }
    }
}

#[test]
fn live_weighted_captions_match_sd_scripts() {
    // train-lora --weighted_captions while training the text encoder: the live conditioning of
    // a weighted caption equals sd-scripts' weighted hidden states (clip skip 1, 75 tokens).
    let path = fixtures().join("sd15-tiny/model.safetensors");
    let checkpoint = Checkpoint::open(&path).unwrap();
    let text = LiveText::load(&checkpoint, DType::F32, &Device::Cpu, None, None, true).unwrap();
    let caption = captions()["weighted"].clone();
    let (context, vector) = text.encode(&[caption], None).unwrap();
    assert!(vector.is_none());
    let (expected, _) = golden("weighted__weighted_hidden_75_clipskip1");
    let diff = max_abs_diff(&context, &expected);
    assert!(diff <= 1e-4, "live weighted caption: max abs {diff}");
}

/// The tiny SD1 text encoder's tensors under their Hugging Face names.
fn hf_tensors() -> HashMap<String, Tensor> {
    let all = candle_core::safetensors::load(
        fixtures().join("sd15-tiny/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    all.into_iter()
        .filter_map(|(name, t)| {
            let hf = name.strip_prefix("cond_stage_model.transformer.")?;
            (!hf.ends_with("position_ids")).then(|| (hf.to_string(), t))
        })
        .collect()
}

/// The same weights in OpenCLIP layout (fused q/k/v), under `prefix`, as `resblocks` resblocks:
/// resblock N takes the weights of layer N mod the layer count (SD2 files carry one more layer
/// than the model runs; tests/fixtures/generate/sd2_te_lora.py builds its 24 the same way).
fn open_clip_tensors(
    hf: &HashMap<String, Tensor>,
    prefix: &str,
    resblocks: usize,
) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let layers = (0..)
        .take_while(|i| {
            hf.contains_key(&format!("text_model.encoder.layers.{i}.layer_norm1.weight"))
        })
        .count();
    let put = |out: &mut HashMap<String, Tensor>, name: &str, t: &Tensor| {
        out.insert(format!("{prefix}{name}"), t.clone());
    };
    put(
        &mut out,
        "token_embedding.weight",
        &hf["text_model.embeddings.token_embedding.weight"],
    );
    put(
        &mut out,
        "positional_embedding",
        &hf["text_model.embeddings.position_embedding.weight"],
    );
    for suffix in ["weight", "bias"] {
        put(
            &mut out,
            &format!("ln_final.{suffix}"),
            &hf[&format!("text_model.final_layer_norm.{suffix}")],
        );
    }
    for target in 0..resblocks {
        let source = target % layers;
        let src = |name: &str| hf[&format!("text_model.encoder.layers.{source}.{name}")].clone();
        let dst = format!("transformer.resblocks.{target}.");
        for suffix in ["weight", "bias"] {
            for (hf_name, open) in [
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
                ("self_attn.out_proj", "attn.out_proj"),
            ] {
                put(
                    &mut out,
                    &format!("{dst}{open}.{suffix}"),
                    &src(&format!("{hf_name}.{suffix}")),
                );
            }
            let fused = Tensor::cat(
                &["q_proj", "k_proj", "v_proj"].map(|p| src(&format!("self_attn.{p}.{suffix}"))),
                0,
            )
            .unwrap();
            put(&mut out, &format!("{dst}attn.in_proj_{suffix}"), &fused);
        }
    }
    out
}

/// Saves `tensors` as `dir/model.safetensors` with an `arch.json` giving each of `sections` the
/// tiny encoder's 4 heads and the activation `hidden_act`.
fn write_model(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    sections: &[&str],
    hidden_act: &str,
) -> PathBuf {
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(tensors, &path).unwrap();
    let hints = serde_json::json!({"num_attention_heads": 4, "hidden_act": hidden_act});
    let arch: serde_json::Map<String, serde_json::Value> = sections
        .iter()
        .map(|s| (s.to_string(), hints.clone()))
        .collect();
    std::fs::write(dir.join("arch.json"), serde_json::to_vec(&arch).unwrap()).unwrap();
    path
}

#[test]
fn sd2_open_clip_layout_loads_to_the_same_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = open_clip_tensors(&hf_tensors(), "cond_stage_model.model.", 13);
    let model = write_model(dir.path(), &tensors, &["text_encoder"], "quick_gelu");
    let loaded = load_text_encoders(&model, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.family, ModelFamily::Sd2);
    assert_eq!(
        loaded.encoders[0].config().num_hidden_layers,
        12,
        "the extra layer is dropped"
    );
    let chunks = tokenizer()
        .tokenize(&captions()["t100"], MaxTokenLength::new(225).unwrap())
        .unwrap();
    let hidden = encode_sd(&loaded.encoders[0], &ids_tensor(&chunks), 2).unwrap();
    let diff = max_abs_diff(&hidden, &golden("t100__hidden_225_clipskip2").0);
    assert!(diff <= 1e-4, "max abs {diff}");
}

#[test]
fn sdxl_single_file_encodes_both_encoders_and_pools_at_first_eos() {
    let dir = tempfile::tempdir().unwrap();
    let hf = hf_tensors();
    let mut tensors = open_clip_tensors(&hf, "conditioner.embedders.1.model.", 12);
    for (name, t) in &hf {
        tensors.insert(
            format!("conditioner.embedders.0.transformer.{name}"),
            t.clone(),
        );
    }
    // A non-symmetric projection, so that a transposed use would be caught.
    let projection = Tensor::arange(0f32, 64.0 * 64.0, &Device::Cpu)
        .unwrap()
        .reshape((64, 64))
        .unwrap();
    let projection = ((projection / 4096.0).unwrap().sin().unwrap() * 0.5).unwrap();
    tensors.insert(
        "conditioner.embedders.1.model.text_projection".into(),
        projection.clone(),
    );
    let model = write_model(
        dir.path(),
        &tensors,
        &["text_encoder", "text_encoder_2"],
        "quick_gelu",
    );
    let loaded = load_text_encoders(&model, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.family, ModelFamily::Sdxl);

    let tokenizer = tokenizer();
    for (name, length) in [("short", 75), ("t200", 225)] {
        let chunks = tokenizer
            .tokenize(&captions()[name], MaxTokenLength::new(length).unwrap())
            .unwrap();
        let ids = ids_tensor(&chunks);
        let out = encode_sdxl(
            &loaded.encoders[0],
            &loaded.encoders[1],
            &ids,
            &ids,
            tokenizer.eos_id(),
        )
        .unwrap();
        let penultimate = golden(&format!("{name}__hidden_{length}_clipskip2")).0;
        for (label, hidden, encoder) in [
            ("hidden_state1", &out.hidden_state1, 0),
            ("hidden_state2", &out.hidden_state2, 1),
        ] {
            let normed = loaded.encoders[encoder].final_layer_norm(hidden).unwrap();
            let diff = max_abs_diff(&normed, &penultimate);
            assert!(diff <= 1e-4, "{name} {label}: max abs {diff}");
        }
        // pool2: last layer (final norm) at chunk 0's first EOS, times projectionᵀ (as sd-scripts
        // uses the single-file matrix).
        // Chunk 0 of any length is the 75-token encoding of the same caption.
        let last = golden(&format!("{name}__hidden_75_clipskip1")).0;
        let eos = chunks.ids[..77]
            .iter()
            .position(|&id| id == tokenizer.eos_id())
            .unwrap();
        let pooled = Tensor::from_vec(
            last[eos * 64..(eos + 1) * 64]
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>(),
            (1, 64),
            &Device::Cpu,
        )
        .unwrap();
        let expected: Vec<f64> = pooled
            .matmul(&projection.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let diff = max_abs_diff(&out.pool2, &expected);
        assert!(diff <= 1e-4, "{name} pool2: max abs {diff}");
    }
}

/// A diffusers-style model folder: `text_encoder/` (and `text_encoder_2/` with a projection)
/// holding the tiny weights under Hugging Face names, plus `tokenizer/`.
fn diffusers_folder(root: &Path, sdxl: bool) -> (PathBuf, Tensor) {
    let model = root.join("model");
    let hf = hf_tensors();
    let config = serde_json::json!({"num_attention_heads": 4, "hidden_act": "quick_gelu"});
    let projection = (Tensor::arange(0f32, 4096.0, &Device::Cpu)
        .unwrap()
        .reshape((64, 64))
        .unwrap()
        / 1000.0)
        .unwrap()
        .cos()
        .unwrap();
    let folders: &[&str] = if sdxl {
        &["text_encoder", "text_encoder_2"]
    } else {
        &["text_encoder"]
    };
    for folder in folders {
        let dir = model.join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        let mut tensors = hf.clone();
        if *folder == "text_encoder_2" {
            tensors.insert("text_projection.weight".into(), projection.clone());
        }
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    }
    let tokenizer = model.join("tokenizer");
    std::fs::create_dir_all(&tokenizer).unwrap();
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(
            fixtures().join("sd15-tiny/tokenizer").join(file),
            tokenizer.join(file),
        )
        .unwrap();
    }
    (model, projection)
}

fn stage_options(root: &Path, model: PathBuf) -> TeCacheOptions {
    let entries: serde_json::Map<String, serde_json::Value> = captions()
        .into_iter()
        .map(|(name, text)| (name, serde_json::json!({ "caption": text })))
        .collect();
    let meta = root.join("meta.json");
    std::fs::write(&meta, serde_json::to_vec(&entries).unwrap()).unwrap();
    TeCacheOptions {
        in_json: meta,
        model,
        tokenizer: None,
        train_data_dir: None,
        full_path: false,
        cache_dir: Some(root.to_path_buf()),
        clip_skip: None,
        max_token_length: MaxTokenLength::default(),
        batch_size: 4,
        mixed_precision: MixedPrecision::No,
        device: lorakit_pipeline::models::ComputeDevice::Cpu,
        require_sdxl: false,
        weighted_captions: false,
        caption_separator: ",".into(),
        variants: 0,
        augmentation: CaptionAugmentation {
            shuffle: false,
            keep_tokens: 0,
            tag_dropout_rate: 0.0,
            separator: ",".into(),
        },
        seed: 0,
        prune: false,
        quiet: true,
        shard: Shard::ALL,
    }
}

#[test]
fn diffusers_sd1_folder_caches_sd_scripts_states() {
    let root = tempfile::tempdir().unwrap();
    let (model, _) = diffusers_folder(root.path(), false);
    let mut options = stage_options(root.path(), model);
    options.clip_skip = Some(2);
    let summary = cache_text_encoder_outputs(&options).unwrap();
    assert_eq!((summary.done, summary.failures.len()), (8, 0));
    for name in captions().keys() {
        let file = root.path().join(format!("{name}_te_outputs.npz"));
        let cached =
            read_cache_file(&file, &TeCacheSpec::any(ModelFamily::Sd1), &Device::Cpu).unwrap();
        assert_eq!(cached.arrays.len(), 1);
        assert!(cached.key.is_some() && cached.variants.is_none());
        let diff = max_abs_diff(
            &cached.arrays[0],
            &golden(&format!("{name}__hidden_75_clipskip2")).0,
        );
        assert!(diff <= 1e-4, "{name}: max abs {diff}");
    }
}

#[test]
fn diffusers_sdxl_folder_writes_sd_scripts_keys() {
    let root = tempfile::tempdir().unwrap();
    let (model, projection) = diffusers_folder(root.path(), true);
    let mut options = stage_options(root.path(), model.clone());
    options.require_sdxl = true;
    let summary = cache_text_encoder_outputs(&options).unwrap();
    assert_eq!((summary.done, summary.failures.len()), (8, 0));
    let loaded = load_text_encoders(&model, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = tokenizer();
    for name in ["short", "t100", "empty"] {
        let file = root.path().join(format!("{name}_te_outputs.npz"));
        let cached =
            read_cache_file(&file, &TeCacheSpec::any(ModelFamily::Sdxl), &Device::Cpu).unwrap();
        let dims: Vec<Vec<usize>> = cached.arrays.iter().map(|t| t.dims().to_vec()).collect();
        assert_eq!(dims, [vec![77, 64], vec![77, 64], vec![64]]);
        let normed = loaded.encoders[0]
            .final_layer_norm(&cached.arrays[0])
            .unwrap();
        let diff = max_abs_diff(&normed, &golden(&format!("{name}__hidden_75_clipskip2")).0);
        assert!(diff <= 1e-4, "{name} hidden_state1: max abs {diff}");
        // Encoder 2 pads with 0 after EOS; causal attention keeps the first EOS state equal.
        let eos = tokenizer
            .tokenize(&captions()[name], MaxTokenLength::default())
            .unwrap()
            .ids
            .iter()
            .position(|&id| id == tokenizer.eos_id())
            .unwrap();
        let last = golden(&format!("{name}__hidden_75_clipskip1")).0;
        let pooled = Tensor::from_vec(
            last[eos * 64..(eos + 1) * 64]
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>(),
            (1, 64),
            &Device::Cpu,
        )
        .unwrap();
        let expected: Vec<f64> = pooled
            .matmul(&projection.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let diff = max_abs_diff(&cached.arrays[2], &expected);
        assert!(diff <= 1e-4, "{name} pool2: max abs {diff}");
    }
}

#[test]
fn zero_padding_applies_sd_scripts_chunk_fixups() {
    let tokenizer =
        ClipTokenizer::from_dir(&fixtures().join("sd15-tiny/tokenizer"), Padding::Zero).unwrap();
    let (bos, eos) = (49406, tokenizer.eos_id());
    let len = MaxTokenLength::new(150).unwrap();

    // Short caption: chunk 0 ends in padding; the empty chunk 1 becomes BOS EOS 0...
    let short = tokenizer.tokenize("a photo of a cat", len).unwrap();
    assert_eq!(&short.ids[..8], &[bos, 320, 1125, 539, 320, 2368, eos, 0]);
    assert_eq!(short.ids[76], 0);
    assert_eq!(&short.ids[77..80], &[bos, eos, 0]);
    assert_eq!(short.ids[153], 0);

    // 100 tokens: text runs past chunk 0, so its last id becomes EOS; chunk 1 holds tokens
    // 76..100, EOS, then zeros.
    let long = tokenizer.tokenize(&captions()["t100"], len).unwrap();
    let plain = tokenizer.body_ids(&captions()["t100"]).unwrap();
    assert_eq!(long.ids[76], eos);
    assert_eq!(&long.ids[78..103], &plain[75..100]);
    assert_eq!(&long.ids[103..105], &[eos, 0]);
    assert_eq!(long.ids[153], 0);
}

#[test]
fn text_encoder_lora_modules_reproduce_sd_scripts() {
    // The golden LoRA's 72 `lora_te_*` modules, attached by the network loader to a fresh
    // encoder, against sd-scripts' text states with the LoRA applied.
    let path = fixtures().join("golden/lora/trained_lora_dim4_alpha1.safetensors");
    let mut loaded = load_text_encoders(
        &fixtures().join("sd15-tiny/model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let model = &mut loaded.encoders[0];
    model.set_lora_prefix("lora_te");
    let (network, report) = LoraNetwork::load(model, &path, 1.0, &Device::Cpu).unwrap();
    assert_eq!(report.applied, 72);
    assert_eq!(network.modules.len(), 72);
    assert!(network.modules[0]
        .name
        .starts_with("lora_te_text_model_encoder_layers_0_"));
    for length in [77, 227] {
        let (ids, shape) = golden_in("golden/unet/unet.npz", &format!("input_ids_{length}"));
        let ids: Vec<u32> = ids.into_iter().map(|v| v as u32).collect();
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let ids = Tensor::from_vec(ids, dims, &Device::Cpu).unwrap();
        let base = encode_sd(&encoders().encoders[0], &ids, 1).unwrap();
        let expected = golden_in(
            "golden/unet/unet.npz",
            &format!("encoder_hidden_states_{length}"),
        )
        .0;
        assert!(max_abs_diff(&base, &expected) <= 1e-4);
        let with_lora = encode_sd(model, &ids, 1).unwrap();
        let expected = golden_in(
            "golden/unet/unet.npz",
            &format!("encoder_hidden_states_{length}_lora"),
        )
        .0;
        let diff = max_abs_diff(&with_lora, &expected);
        assert!(diff <= 1e-4, "LoRA text states at {length}: max abs {diff}");
    }
}

#[test]
fn text_encoder_lora_gradients_match_torch_autograd_with_and_without_checkpointing() {
    // tests/fixtures/generate/te_lora.py: sd-scripts' LoRA on the tiny text encoder with random
    // non-zero modules, a two-chunk caption at clip skip 2, loss sum(hidden * W).
    let file = "golden/lora/te_lora_grad.npz";
    let mut loaded = load_text_encoders(
        &fixtures().join("sd15-tiny/model.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let model = &mut loaded.encoders[0];
    model.set_lora_prefix("lora_te");
    let input = fixtures().join("golden/lora/te_lora_input.safetensors");
    let (network, report) = LoraNetwork::load(model, &input, 1.0, &Device::Cpu).unwrap();
    assert_eq!(report.applied, 72);
    let (ids, shape) = golden_in(file, "input_ids");
    assert_eq!(shape, [1, 2, 77]);
    let ids: Vec<u32> = ids.into_iter().map(|v| v as u32).collect();
    let ids = Tensor::from_vec(ids, (1, 2, 77), &Device::Cpu).unwrap();
    // Without and with gradient checkpointing of the encoder layers: the same golden.
    for checkpointing in [false, true] {
        model.set_gradient_checkpointing(checkpointing);
        let hidden = encode_sd(model, &ids, 2).unwrap();
        assert_eq!(hidden.dims(), [1, 152, 64]);
        let diff = max_abs_diff(&hidden, &golden_in(file, "hidden").0);
        assert!(diff <= 1e-4, "hidden states with the LoRA: max abs {diff}");

        let (weights, _) = golden_in(file, "loss_weights");
        let weights: Vec<f32> = weights.into_iter().map(|v| v as f32).collect();
        let weights = Tensor::from_vec(weights, (1, 152, 64), &Device::Cpu).unwrap();
        let grads = recompute::backward(&(hidden * weights).unwrap().sum_all().unwrap()).unwrap();
        let mut compared = 0;
        for module in &network.modules {
            let recorded = ["layers_0_", "layers_10_"]
                .iter()
                .any(|layer| module.name.contains(layer));
            for (part, var) in [("lora_down", &module.down), ("lora_up", &module.up)] {
                let grad = grads.get(var.as_tensor());
                if module.name.contains("layers_11_") {
                    // Clip skip 2 never runs the last layer: no gradient, as in torch.
                    assert!(grad.is_none(), "{} {part}", module.name);
                }
                if !recorded {
                    continue;
                }
                let expected = golden_in(file, &format!("grad__{}__{part}", module.name)).0;
                let grad = grad.unwrap_or_else(|| panic!("no gradient for {} {part}", module.name));
                let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let diff = max_abs_diff(grad, &expected);
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "{} {part} (checkpointing {checkpointing}): max abs {diff} (largest {scale})",
                    module.name
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 24);
    }
}

#[test]
fn text_encoder_lora_merged_at_a_multiplier_reproduces_sd_scripts() {
    // generate-images merges a LoRA's `lora_te_*` modules into the text encoder: merged at 1,
    // the golden LoRA of te_lora.py gives sd-scripts' text states with the LoRA applied; merged
    // at 0.5, the same states as the modules attached at multiplier 0.5 (the training path).
    let file = "golden/lora/te_lora_grad.npz";
    let lora = fixtures().join("golden/lora/te_lora_input.safetensors");
    let (ids, _) = golden_in(file, "input_ids");
    let ids: Vec<u32> = ids.into_iter().map(|v| v as u32).collect();
    let ids = Tensor::from_vec(ids, (1, 2, 77), &Device::Cpu).unwrap();
    let encoder = |merged: Option<f64>| {
        let mut loaded = load_text_encoders(
            &fixtures().join("sd15-tiny/model.safetensors"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let mut model = loaded.encoders.remove(0);
        model.set_lora_prefix("lora_te");
        if let Some(multiplier) = merged {
            let report = LoraNetwork::merge_file(&mut model, &lora, multiplier).unwrap();
            assert_eq!((report.applied, report.applied_text_encoder), (72, 72));
        }
        model
    };
    let merged = encode_sd(&encoder(Some(1.0)), &ids, 2).unwrap();
    let diff = max_abs_diff(&merged, &golden_in(file, "hidden").0);
    assert!(diff <= 1e-4, "merged at 1: max abs {diff} from sd-scripts");

    let mut attached = encoder(None);
    LoraNetwork::load(&mut attached, &lora, 0.5, &Device::Cpu).unwrap();
    let expected = encode_sd(&attached, &ids, 2).unwrap();
    let half = encode_sd(&encoder(Some(0.5)), &ids, 2).unwrap();
    let expected: Vec<f64> = (expected.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .into_iter()
        .map(f64::from)
        .collect();
    let diff = max_abs_diff(&half, &expected);
    assert!(
        diff <= 1e-5,
        "merged at 0.5 against attached at 0.5: max abs {diff}"
    );
    let plain = encode_sd(&encoder(None), &ids, 2).unwrap();
    assert!(
        max_abs_diff(&plain, &expected) > 1e-2,
        "the LoRA changes the states"
    );
}

#[test]
fn sdxl_text_encoder_lora_gradients_match_torch_autograd() {
    // tests/fixtures/generate/sdxl_lora_grads.py (text_encoder part): sd-scripts' lora_te1_* and
    // lora_te2_* modules with random weights on the tiny SDXL's two encoders, two captions at
    // --max_token_length 150, loss sum(context * W) + sum(pool2 * P) with the context joined
    // from both encoders as the trainer joins it. Encoded through train-lora's own live path.
    let file = "golden/sdxl/te_lora_grads.npz";
    let checkpoint = Checkpoint::open(&fixtures().join("sdxl-tiny/model.safetensors")).unwrap();
    let mut live = LiveText::load(
        &checkpoint,
        DType::F32,
        &Device::Cpu,
        None,
        Some(150),
        false,
    )
    .unwrap();
    let input = fixtures().join("golden/sdxl/te_lora_grads.safetensors");
    let (network, report) =
        LoraNetwork::load(&mut Joined(live.models()), &input, 1.0, &Device::Cpu).unwrap();
    assert_eq!((report.applied, report.unknown.len()), (96, 0));
    let names = captions();
    let captions = [names["t100"].clone(), names["short"].clone()];
    for (index, caption) in captions.iter().enumerate() {
        let tokens = live.encoder.tokenize(caption).unwrap();
        for (encoder, chunks) in tokens.iter().enumerate() {
            let (expected, shape) = golden_in(file, &format!("ids{}", encoder + 1));
            assert_eq!(shape, [2, 2, 77]);
            let ids: Vec<f64> = chunks.ids.iter().map(|&i| f64::from(i)).collect();
            let row = &expected[index * 154..(index + 1) * 154];
            assert_eq!(ids, row, "caption {index}, tokenizer {}", encoder + 1);
        }
    }
    let sizes = [[128, 192, 0, 0, 128, 192]; 2];
    let weights = |name: &str, dims: &[usize]| {
        let values: Vec<f32> = golden_in(file, name).0.iter().map(|&v| v as f32).collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    };
    let context_weights = weights("context_weights", &[2, 152, 96]);
    let pool2_weights = weights("pool2_weights", &[2, 64]);
    for checkpointing in [false, true] {
        live.set_gradient_checkpointing(checkpointing);
        let (context, vector) = live.encode(&captions, Some(&sizes)).unwrap();
        let pool2 = vector.unwrap().narrow(1, 0, 64).unwrap();
        let diff = max_abs_diff(&context, &golden_in(file, "context").0);
        assert!(diff <= 1e-4, "context with the LoRA: max abs {diff}");
        let diff = max_abs_diff(&pool2, &golden_in(file, "pool2").0);
        assert!(diff <= 1e-4, "pool2 with the LoRA: max abs {diff}");
        let loss = ((context * &context_weights).unwrap().sum_all().unwrap()
            + (pool2 * &pool2_weights).unwrap().sum_all().unwrap())
        .unwrap();
        let expected_loss = golden_in(file, "loss").0[0];
        let value = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((value - expected_loss).abs() <= 1e-5 * expected_loss.abs());

        let grads = recompute::backward(&loss).unwrap();
        let (mut compared, mut worst) = (0, 0.0f64);
        for module in &network.modules {
            for (part, var) in [("lora_down", &module.down), ("lora_up", &module.up)] {
                let grad = grads.get(var.as_tensor());
                if module
                    .name
                    .starts_with("lora_te1_text_model_encoder_layers_11_")
                {
                    // Hidden state 11 of encoder 1 never runs its last layer: no gradient, as
                    // in torch (the golden stores none).
                    assert!(grad.is_none(), "{} {part}", module.name);
                    continue;
                }
                let expected = golden_in(file, &format!("grad.{}.{part}.weight", module.name)).0;
                let grad = grad.unwrap_or_else(|| panic!("no gradient for {} {part}", module.name));
                let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let relative = max_abs_diff(grad, &expected) / scale;
                assert!(
                    relative <= 1e-4,
                    "{} {part} (checkpointing {checkpointing}): max abs error {relative} of the \
                     largest gradient {scale}",
                    module.name
                );
                worst = worst.max(relative);
                compared += 1;
            }
        }
        assert_eq!(compared, 180);
        eprintln!("checkpointing {checkpointing}: worst relative gradient error {worst:.2e}");
    }
}

#[test]
fn sd2_text_encoder_lora_gradients_match_torch_autograd() {
    // tests/fixtures/generate/sd2_te_lora.py: sd-scripts' lora_te_* modules with random weights on
    // a tiny SD2 text encoder (24 OpenCLIP resblocks in SD2's single-file layout, built here as
    // there, gelu; sd-scripts runs 23 of them), two captions at --max_token_length 150 with
    // SD2's zero padding, the final-normed last layer, loss sum(hidden * W). Encoded through
    // train-lora's own live path, with and without gradient checkpointing.
    let file = "golden/lora/sd2_te_lora_grad.npz";
    let dir = tempfile::tempdir().unwrap();
    let tensors = open_clip_tensors(&hf_tensors(), "cond_stage_model.model.", 24);
    let model = write_model(dir.path(), &tensors, &["text_encoder"], "gelu");
    let checkpoint = Checkpoint::open(&model).unwrap();
    let mut live = LiveText::load(
        &checkpoint,
        DType::F32,
        &Device::Cpu,
        None,
        Some(150),
        false,
    )
    .unwrap();
    assert_eq!(live.family(), ModelFamily::Sd2);
    assert_eq!(
        live.encoder.encoders.encoders[0].config().num_hidden_layers,
        23
    );
    let input = fixtures().join("golden/lora/sd2_te_lora_input.safetensors");
    let (network, report) =
        LoraNetwork::load(&mut Joined(live.models()), &input, 1.0, &Device::Cpu).unwrap();
    assert_eq!((report.applied, report.unknown.len()), (138, 0));
    let names = captions();
    let captions = [names["t100"].clone(), names["short"].clone()];
    let (expected_ids, shape) = golden_in(file, "input_ids");
    assert_eq!(shape, [2, 2, 77]);
    for (index, caption) in captions.iter().enumerate() {
        let tokens = live.encoder.tokenize(caption).unwrap();
        let ids: Vec<f64> = tokens[0].ids.iter().map(|&i| f64::from(i)).collect();
        assert_eq!(
            ids,
            &expected_ids[index * 154..(index + 1) * 154],
            "caption {index}"
        );
    }
    let (weights, _) = golden_in(file, "loss_weights");
    let weights: Vec<f32> = weights.into_iter().map(|v| v as f32).collect();
    let weights = Tensor::from_vec(weights, (2, 152, 64), &Device::Cpu).unwrap();
    for checkpointing in [false, true] {
        live.set_gradient_checkpointing(checkpointing);
        let (hidden, vector) = live.encode(&captions, None).unwrap();
        assert!(vector.is_none());
        let diff = max_abs_diff(&hidden, &golden_in(file, "hidden").0);
        assert!(diff <= 1e-4, "hidden states with the LoRA: max abs {diff}");
        let loss = (hidden * &weights).unwrap().sum_all().unwrap();
        let expected_loss = golden_in(file, "loss").0[0];
        let value = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((value - expected_loss).abs() <= 1e-5 * expected_loss.abs());

        let grads = recompute::backward(&loss).unwrap();
        let (mut compared, mut worst) = (0, 0.0f64);
        for module in &network.modules {
            for (part, var) in [("lora_down", &module.down), ("lora_up", &module.up)] {
                let expected = golden_in(file, &format!("grad.{}.{part}.weight", module.name)).0;
                let grad = (grads.get(var.as_tensor()))
                    .unwrap_or_else(|| panic!("no gradient for {} {part}", module.name));
                let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let relative = max_abs_diff(grad, &expected) / scale;
                assert!(
                    relative <= 1e-4,
                    "{} {part} (checkpointing {checkpointing}): max abs error {relative} of the \
                     largest gradient {scale}",
                    module.name
                );
                worst = worst.max(relative);
                compared += 1;
            }
        }
        assert_eq!(compared, 276);
        eprintln!("checkpointing {checkpointing}: worst relative gradient error {worst:.2e}");
    }
}
