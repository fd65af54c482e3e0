//! `check-lora`: sd-scripts' `networks/check_lora_weights.py` (one line per LoRA tensor: key,
//! shape, mean |value|, min |value|) and the header metadata (`ss_*`, `sshs_*`, `modelspec.*`),
//! readable or as JSON.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::tensors::TensorFile;
use super::{not_a_lora, LYCORIS_SUFFIXES};
use crate::infra::report::Summary;
use crate::Result;

/// Options of `check-lora`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The LoRA file.
    pub file: PathBuf,
    /// List every tensor, not only the LoRA weights (`-s/--show_all_keys`).
    pub show_all_keys: bool,
    /// Print one JSON document instead of text.
    pub json: bool,
    /// Leave out the metadata.
    pub no_metadata: bool,
}

/// Whether `key` is one of a LoRA's weights (sd-scripts' test, plus LyCORIS names).
pub fn is_lora_weight(key: &str) -> bool {
    ["lora_up", "lora_down", "lora_A", "lora_B", "oft_"]
        .iter()
        .any(|p| key.contains(p))
        || LYCORIS_SUFFIXES
            .iter()
            .any(|s| key.ends_with(s) || key.ends_with(&format!("{s}.weight")))
}

/// `(key, shape, mean |v|, min |v|)` of the listed tensors and the report as JSON.
pub fn report(options: &Options) -> Result<Value> {
    let file = TensorFile::read(&options.file, "a LoRA")?;
    let lora_keys: Vec<&String> = file.tensors.keys().filter(|k| is_lora_weight(k)).collect();
    if lora_keys.is_empty() {
        return Err(not_a_lora(&file, &options.file));
    }
    let mut keys = lora_keys.clone();
    if options.show_all_keys {
        keys.extend(file.tensors.keys().filter(|k| !is_lora_weight(k)));
    }
    let tensors: Vec<Value> = keys
        .iter()
        .map(|key| {
            let a = &file.tensors[*key];
            let n = a.data.len().max(1) as f64;
            let mean = a.data.iter().map(|v| v.abs() as f64).sum::<f64>() / n;
            let min = a.data.iter().map(|v| v.abs()).fold(f32::INFINITY, f32::min);
            json!({
                "key": key,
                "shape": a.shape,
                "dtype": format!("{:?}", a.dtype),
                "mean_abs": mean,
                "min_abs": if a.data.is_empty() { 0.0 } else { min as f64 },
            })
        })
        .collect();
    let mut out = Map::new();
    out.insert("file".into(), json!(options.file.display().to_string()));
    out.insert("lora_tensors".into(), json!(lora_keys.len()));
    out.insert("tensors".into(), Value::Array(tensors));
    if !options.no_metadata {
        out.insert("metadata".into(), json!(file.metadata));
    }
    Ok(Value::Object(out))
}

/// Runs `check-lora`: prints the report on stdout.
pub fn run(options: &Options) -> Result<Summary> {
    let value = report(options)?;
    if options.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(Summary::default());
    }
    println!("number of LoRA modules: {}", value["lora_tensors"]);
    let tensors = value["tensors"].as_array().cloned().unwrap_or_default();
    if options.show_all_keys {
        println!("number of all modules: {}", tensors.len());
    }
    for t in &tensors {
        let shape: Vec<String> = t["shape"]
            .as_array()
            .map(|s| s.iter().map(|d| d.to_string()).collect())
            .unwrap_or_default();
        let shape = if shape.len() == 1 {
            format!("({},)", shape[0])
        } else {
            format!("({})", shape.join("-"))
        };
        println!(
            "{},{},{},{}",
            t["key"].as_str().unwrap_or(""),
            shape,
            t["mean_abs"].as_f64().unwrap_or(0.0),
            t["min_abs"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(meta) = value.get("metadata").and_then(Value::as_object) {
        println!("metadata ({} entries):", meta.len());
        for (k, v) in meta {
            println!("  {k}: {}", v.as_str().unwrap_or(""));
        }
    }
    Ok(Summary::default())
}
