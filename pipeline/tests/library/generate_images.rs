//! generate-images against diffusers on the sd15-tiny, sd2-tiny and sdxl-tiny checkpoints
//! (golden/generate_images/, tests/fixtures/generate/generate_images.py): the VAE decoder,
//! whole StableDiffusionPipeline generations (CFG with negative prompts, a batch, euler / ddim /
//! euler_a / pndm / dpmsingle, v-prediction with euler and dpm_2_a, a LoRA at multiplier 0.7)
//! from the same stored initial noise and per-step noise, and whole StableDiffusionXLPipeline
//! generations with size conditioning (original size and crop) and CFG, and v-prediction
//! generations on the sd2-tiny checkpoint (tests/fixtures/generate/sd2_tiny.py).

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

fn engine(checkpoint: &str, networks: Vec<(std::path::PathBuf, f64)>) -> Engine {
    engine_with(checkpoint, networks, false)
}

/// The engine of a fixture checkpoint; `v2` as generate-images' `--v2`.
fn engine_with(checkpoint: &str, networks: Vec<(std::path::PathBuf, f64)>, v2: bool) -> Engine {
    Engine::load(&EngineOptions {
        ckpt: fixtures().join(checkpoint),
        // sd15-tiny's folder holds the CLIP vocabulary; the SD2 and SDXL goldens use it too.
        tokenizer: Some(fixtures().join("sd15-tiny/tokenizer")),
        vae: None,
        networks,
        clip_skip: None,
        prediction: Prediction::Epsilon,
        dtype: DType::F32,
        max_embeddings_multiples: 1,
        v2,
        require_sdxl: false,
        device: lorakit_pipeline::models::ComputeDevice::Cpu,
    })
    .unwrap()
}

fn cases(file: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("golden/generate_images").join(file));
    let cases: serde_json::Value = serde_json::from_str(&text.unwrap()).unwrap();
    cases.as_array().unwrap().clone()
}

/// Runs one golden case (`cases.json` / `sdxl_cases.json`) from its stored noise and compares
/// the final latents and the decoded image with diffusers'.
fn check_case(engine: &Engine, golden: &std::path::Path, case: &serde_json::Value) {
    let name = case["name"].as_str().unwrap();
    let batch = case["batch"].as_u64().unwrap() as usize;
    let prompt = case["prompt"].as_str().unwrap();
    let negative = case["negative_prompt"].as_str().unwrap();
    let encoded = engine.encode(&[prompt, negative]).unwrap();
    let pair = |key: &str| -> [i64; 2] {
        let values = case[key].as_array().unwrap();
        [values[0].as_i64().unwrap(), values[1].as_i64().unwrap()]
    };
    // SDXL: original (h, w), crop (top, left), target (h, w), as diffusers' add_time_ids.
    let sizes = if case.get("original_size").is_some() {
        let ([oh, ow], [top, left]) = (pair("original_size"), pair("crop_top_left"));
        let (h, w) = (
            case["height"].as_i64().unwrap(),
            case["width"].as_i64().unwrap(),
        );
        [oh, ow, top, left, h, w]
    } else {
        [0; 6]
    };
    let requests: Vec<ImageRequest> = (0..batch)
        .map(|_| ImageRequest {
            cond: encoded[0].clone(),
            uncond: encoded[1].clone(),
            sizes,
        })
        .collect();
    let noise = npz_tensor(golden, &format!("{name}.noise"));
    let kind = SamplerKind::parse(case["sampler"].as_str().unwrap()).unwrap();
    let prediction = match case.get("prediction").and_then(|p| p.as_str()) {
        None | Some("epsilon") => Prediction::Epsilon,
        Some("v_prediction") => Prediction::V,
        Some(other) => panic!("{name}: prediction {other}"),
    };
    let step_noise = kind
        .is_ancestral()
        .then(|| npz_tensor(golden, &format!("{name}.step_noise")));
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
    let expected = npz_tensor(golden, &format!("{name}.latents"));
    let latent_error = max_abs(&latents, &expected);
    let image = engine.decode(&latents).unwrap();
    let expected_image = npz_tensor(golden, &format!("{name}.image"));
    let image_error = max_abs(&image, &expected_image);
    eprintln!("{name}: latents {latent_error}, image {image_error}");
    assert!(
        latent_error <= LATENT_TOLERANCE && image_error <= IMAGE_TOLERANCE,
        "{name}: max abs difference {latent_error} (latents), {image_error} (image)"
    );
}

#[test]
fn whole_generations_match_diffusers_pipeline() {
    let plain = engine("sd15-tiny/model.safetensors", Vec::new());
    for case in cases("cases.json") {
        // A LoRA merged at its multiplier against sd-scripts' networks.lora applied at run time.
        let with_lora = case.get("lora").map(|path| {
            let multiplier = case["lora_multiplier"].as_f64().unwrap();
            let lora = fixtures().join(path.as_str().unwrap());
            engine("sd15-tiny/model.safetensors", vec![(lora, multiplier)])
        });
        check_case(with_lora.as_ref().unwrap_or(&plain), &golden(), &case);
    }
}

#[test]
fn sdxl_generations_with_size_conditioning_match_diffusers_pipeline() {
    let sdxl = engine("sdxl-tiny/model.safetensors", Vec::new());
    let golden = fixtures().join("golden/generate_images/sdxl_tiny.npz");
    let cases = cases("sdxl_cases.json");
    assert_eq!(cases.len(), 2);
    for case in cases {
        check_case(&sdxl, &golden, &case);
    }
}

#[test]
fn sd2_v_prediction_generations_match_diffusers_pipeline() {
    // sd2-tiny: SD2's layout (OpenCLIP text encoder read to its penultimate layer, linear
    // projections, 64-channel heads) generating as `--v2 --v_parameterization`.
    let sd2 = engine_with("sd2-tiny/model.safetensors", Vec::new(), true);
    let golden = fixtures().join("golden/generate_images/sd2_tiny.npz");
    let cases = cases("sd2_cases.json");
    assert_eq!(cases.len(), 3);
    for case in cases {
        assert_eq!(case["prediction"], "v_prediction");
        check_case(&sd2, &golden, &case);
    }
}
