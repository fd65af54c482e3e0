//! generate-images against diffusers on the sd15-tiny checkpoint
//! (golden/generate_images/, tests/fixtures/generate/generate_images.py): the VAE decoder, and
//! whole StableDiffusionPipeline generations (CFG with negative prompts, a batch, euler / ddim /
//! euler_a / pndm / dpmsingle, v-prediction with euler and dpm_2_a, a LoRA at multiplier 0.7)
//! from the same stored initial noise and per-step noise.

use candle_core::{DType, Device};
use lorakit_pipeline::models::checkpoint::Checkpoint;
use lorakit_pipeline::models::samplers::{Prediction, SamplerConfig, SamplerKind};
use lorakit_pipeline::models::vae::VaeDecoder;
use lorakit_pipeline::stages::generate_images::engine::{Engine, EngineOptions, ImageRequest};

use crate::support::{fixtures, max_abs, npz_tensor};

/// VAE decoder output (values of order 1) within this of diffusers'.
const DECODE_TOLERANCE: f32 = 1e-4;
/// Final latents of a whole generation within this of diffusers'.
const LATENT_TOLERANCE: f32 = 1e-3;
/// Decoded images (in [0, 1]) within this of diffusers'.
const IMAGE_TOLERANCE: f32 = 1e-3;

fn golden() -> std::path::PathBuf {
    fixtures().join("golden/generate_images/sd15_tiny.npz")
}

#[test]
fn vae_decoder_matches_diffusers() {
    let checkpoint = Checkpoint::open(&fixtures().join("sd15-tiny/model.safetensors")).unwrap();
    let decoder = VaeDecoder::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let latents = npz_tensor(&golden(), "decode_latents");
    let expected = npz_tensor(&golden(), "decode_images");
    let ours = decoder.decode(&latents).unwrap();
    assert_eq!(ours.dims(), expected.dims());
    let error = max_abs(&ours, &expected);
    assert!(error <= DECODE_TOLERANCE, "max abs difference {error}");
}

fn engine(networks: Vec<(std::path::PathBuf, f64)>) -> Engine {
    Engine::load(&EngineOptions {
        ckpt: fixtures().join("sd15-tiny/model.safetensors"),
        vae: None,
        tokenizer: None,
        networks,
        clip_skip: None,
        prediction: Prediction::Epsilon,
        dtype: DType::F32,
        max_embeddings_multiples: 1,
        v2: false,
        require_sdxl: false,
    })
    .unwrap()
}

#[test]
fn whole_generations_match_diffusers_pipeline() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/generate_images/cases.json")).unwrap(),
    )
    .unwrap();
    let plain = engine(Vec::new());
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        // A LoRA merged at its multiplier against sd-scripts' networks.lora applied at run time.
        let with_lora = case.get("lora").map(|path| {
            let multiplier = case["lora_multiplier"].as_f64().unwrap();
            engine(vec![(fixtures().join(path.as_str().unwrap()), multiplier)])
        });
        let engine = with_lora.as_ref().unwrap_or(&plain);
        let batch = case["batch"].as_u64().unwrap() as usize;
        let prompt = case["prompt"].as_str().unwrap();
        let negative = case["negative_prompt"].as_str().unwrap();
        let encoded = engine.encode(&[prompt, negative]).unwrap();
        let requests: Vec<ImageRequest> = (0..batch)
            .map(|_| ImageRequest {
                cond: encoded[0].clone(),
                uncond: encoded[1].clone(),
                sizes: [0; 6],
            })
            .collect();
        let noise = npz_tensor(&golden(), &format!("{name}.noise"));
        let kind = SamplerKind::parse(case["sampler"].as_str().unwrap()).unwrap();
        let prediction = match case.get("prediction").and_then(|p| p.as_str()) {
            None | Some("epsilon") => Prediction::Epsilon,
            Some("v_prediction") => Prediction::V,
            Some(other) => panic!("{name}: prediction {other}"),
        };
        let step_noise = kind
            .is_ancestral()
            .then(|| npz_tensor(&golden(), &format!("{name}.step_noise")));
        let mut drawn = 0;
        let mut next_noise = |shape: &[usize]| {
            let n = step_noise
                .as_ref()
                .unwrap()
                .get(drawn)
                .unwrap()
                .reshape(shape)
                .unwrap();
            drawn += 1;
            Ok(n)
        };
        let latents = engine
            .sample(
                &requests,
                &noise,
                SamplerConfig::gen_img(kind, prediction),
                case["steps"].as_u64().unwrap() as usize,
                case["scale"].as_f64().unwrap(),
                None,
                &mut next_noise,
                &mut |_, _| {},
            )
            .unwrap();
        let expected = npz_tensor(&golden(), &format!("{name}.latents"));
        let latent_error = max_abs(&latents, &expected);
        let image = engine.decode(&latents).unwrap();
        let expected_image = npz_tensor(&golden(), &format!("{name}.image"));
        let image_error = max_abs(&image, &expected_image);
        eprintln!("{name}: latents {latent_error}, image {image_error}");
        assert!(
            latent_error <= LATENT_TOLERANCE && image_error <= IMAGE_TOLERANCE,
            "{name}: max abs difference {latent_error} (latents), {image_error} (image)"
        );
    }
}
