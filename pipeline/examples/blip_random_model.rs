//! Writes a BLIP-large-shaped captioning folder with random weights, for benchmarks:
//! `cargo run -p lorakit-pipeline --example blip_random_model -- OUT_DIR`.
//!
//! The architecture is that of `Salesforce/blip-image-captioning-large` (ViT-L/16 at 384 px,
//! BERT-base decoder); the tokenizer is the fixture's real bert-base-uncased one. Random weights
//! give near-uniform logits, so captions run to `--max_length`: the slowest case.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::blip::BlipForConditionalGeneration;
use lorakit_pipeline::models::blip::BlipConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: blip_random_model OUT_DIR")?,
    );
    std::fs::create_dir_all(&out)?;
    let config = serde_json::json!({
        "text_config": {
            "vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "bos_token_id": 30522, "sep_token_id": 102, "pad_token_id": 0
        },
        "vision_config": {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 384, "patch_size": 16,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5
        },
        "projection_dim": 512,
        "image_text_hidden_size": 256
    });
    let config_path = out.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/blip-tiny");
    std::fs::copy(fixture.join("tokenizer.json"), out.join("tokenizer.json"))?;

    let blip = BlipConfig::load(&config_path)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    BlipForConditionalGeneration::new(&blip.model, vb)?;
    let mut parameters = 0;
    for var in varmap.data().lock().expect("var map").values() {
        parameters += var.elem_count();
        if var.rank() >= 2 {
            var.set(&Tensor::randn(0f32, 0.02, var.shape(), &Device::Cpu)?)?;
        }
    }
    varmap.save(out.join("model.safetensors"))?;
    eprintln!("wrote {} ({parameters} parameters)", out.display());
    Ok(())
}
