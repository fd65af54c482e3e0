//! Parity of tokenisation and CLIP text encoding with the sd-scripts goldens
//! (`tests/fixtures/golden/text_encoder`, see tests/fixtures/README.md §2e).

use std::collections::BTreeMap;
use std::path::PathBuf;

use lorakit_pipeline::tokenize::{ClipTokenizer, MaxTokenLength, Padding};

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
