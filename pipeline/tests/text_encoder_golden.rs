//! Parity of tokenisation and CLIP text encoding with the sd-scripts goldens
//! (`tests/fixtures/golden/text_encoder`, see tests/fixtures/README.md §2e).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use lorakit_pipeline::models::clip::{apply_weights, encode_sd};
use lorakit_pipeline::models::text_encoders::{
    load_text_encoders, TextEncoderFamily, TextEncoders,
};
use lorakit_pipeline::tokenize::{ClipTokenizer, MaxTokenLength, Padding, TokenChunks};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

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

/// One array of the golden npz as (values as f64, shape).
fn golden(name: &str) -> (Vec<f64>, Vec<u64>) {
    let path = fixtures().join("golden/text_encoder/text_encoder.npz");
    let mut archive = npyz::npz::NpzArchive::open(&path).expect("golden text_encoder.npz");
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
    assert_eq!(encoders.family, TextEncoderFamily::Sd1);
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
