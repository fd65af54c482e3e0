//! lorakit side of `bench/inference.sh`: per-item compute time of one full-size inference row,
//! on the models and inputs `bench/torch_inference.py` makes and uses.
//!
//! `cargo run --release -p lorakit-pipeline --example inference_bench -- DIR ROW`
//!
//! Prints one JSON line: `{"row", "items", "seconds_per_item", "repeats"}`. The row runs once to
//! warm up, then `REPEATS` times (env, default 2); model loading is not timed. Rows and inputs
//! are those of `bench/torch_inference.py` (same token ids, same pixel and latent ramps).
//! `BENCH_DEVICE=cuda` runs the CLIP and VAE rows on the GPU (a build with `--features
//! candle-cuda`); each timed call then ends by waiting for the GPU.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lorakit_pipeline::models::blip::{BlipCaptioner, BlipFiles};
use lorakit_pipeline::models::checkpoint::Checkpoint;
use lorakit_pipeline::models::text_encoders::load_text_encoders;
use lorakit_pipeline::models::vae::{VaeDecoder, VaeEncoder};
use lorakit_pipeline::stages::caption_images::{generate_batch, Decoding, GenerationSettings};
use rand::SeedableRng;

type Failure = Box<dyn std::error::Error>;

/// Caption tokens generated per image in the BLIP rows (after the 4 prompt tokens).
const BLIP_TOKENS: usize = 30;

/// One benchmark row.
enum Row {
    Clip { encoder: usize, batch: usize },
    VaeEncode { size: usize },
    VaeDecode { size: usize },
    Blip { beams: usize, batch: usize },
}

impl Row {
    fn parse(name: &str) -> Option<Row> {
        let number = |s: &str| s.parse::<usize>().ok();
        let parts: Vec<&str> = name.split('-').collect();
        Some(match parts.as_slice() {
            ["clip", "l", b] => Row::Clip {
                encoder: 0,
                batch: number(b.strip_prefix('b')?)?,
            },
            ["clip", "bigg", b] => Row::Clip {
                encoder: 1,
                batch: number(b.strip_prefix('b')?)?,
            },
            ["vae", "encode", s] => Row::VaeEncode { size: number(s)? },
            ["vae", "decode", s] => Row::VaeDecode { size: number(s)? },
            ["blip", decoding, b] => Row::Blip {
                beams: match *decoding {
                    "greedy" => 1,
                    beam => number(beam.strip_prefix("beam")?)?,
                },
                batch: number(b.strip_prefix('b')?)?,
            },
            _ => return None,
        })
    }
}

/// Token ids `[batch, 77]` as `torch_inference.ids` makes them.
fn token_ids(batch: usize) -> candle_core::Result<Tensor> {
    let mut ids = Vec::with_capacity(batch * 77);
    for b in 0..batch {
        let body = 20 + (b * 7) % 40;
        ids.push(49406u32);
        ids.extend((0..body).map(|j| ((b * 7919 + j * 104729) % 49000 + 200) as u32));
        ids.extend(std::iter::repeat_n(49407u32, 77 - 1 - body));
    }
    Tensor::from_vec(ids, (batch, 77), &bench_device()?)
}

/// Values in [-1, 1] over `shape`, as `torch_inference.ramp` makes them.
fn ramp(shape: &[usize]) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.618033988749895) % 2.0 - 1.0) as f32)
        .collect();
    Tensor::from_vec(values, shape, &bench_device()?)
}

/// `BENCH_DEVICE`: cpu (default) or cuda.
fn bench_device() -> candle_core::Result<Device> {
    match std::env::var("BENCH_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0),
        _ => Ok(Device::Cpu),
    }
}

/// Mean seconds per item of `run` (one warm-up call, then `REPEATS` timed calls of `items`).
fn timed(
    items: usize,
    mut run: impl FnMut() -> Result<(), Failure>,
) -> Result<(f64, usize), Failure> {
    let repeats: usize = std::env::var("REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2)
        .max(1);
    let device = bench_device()?;
    run()?;
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..repeats {
        run()?;
    }
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64() / repeats as f64;
    Ok((seconds / items as f64, repeats))
}

fn bench(dir: &Path, row: &Row) -> Result<(usize, f64, usize), Failure> {
    let sdxl = dir.join("sdxl");
    let cpu = bench_device()?;
    let (items, (per_item, repeats)) = match *row {
        Row::Clip { encoder, batch } => {
            // The row's encoder alone, as a standalone `CLIPTextModel` file (an SD1 model holds
            // only CLIP-L; an SDXL run loads both).
            let folder = ["text_encoder", "text_encoder_2"][encoder];
            let file = sdxl.join(folder).join("model.safetensors");
            let mut encoders = load_text_encoders(&file, DType::F32, &cpu)?;
            encoders.use_inference_layout()?;
            let model = &encoders.encoders[0];
            let ids = token_ids(batch)?;
            let layers = model.config().num_hidden_layers;
            let all: Vec<usize> = (0..=layers).collect();
            (
                batch,
                timed(batch, || {
                    model.hidden_states(&ids, &all)?;
                    Ok(())
                })?,
            )
        }
        Row::VaeEncode { size } => {
            let vae = VaeEncoder::load(&Checkpoint::open(&sdxl)?, DType::F32, &cpu)?;
            let pixels = ramp(&[1, 3, size, size])?;
            (
                1,
                timed(1, || {
                    vae.encode(&pixels)?;
                    Ok(())
                })?,
            )
        }
        Row::VaeDecode { size } => {
            let vae = VaeDecoder::load(&Checkpoint::open(&sdxl)?, DType::F32, &cpu)?;
            let latents = ramp(&[1, 4, size / 8, size / 8])?;
            (
                1,
                timed(1, || {
                    vae.decode(&latents)?;
                    Ok(())
                })?,
            )
        }
        Row::Blip { beams, batch } => {
            let model = BlipCaptioner::load(&BlipFiles::locate(&dir.join("blip"))?, &cpu)?;
            let pixels = ramp(&[batch, 3, 384, 384])?;
            let length = model.prompt_ids().len() + BLIP_TOKENS;
            let settings = GenerationSettings {
                decoding: Decoding::Beam { num_beams: beams },
                max_length: length,
                min_length: length,
            };
            (
                batch,
                timed(batch, || {
                    let embeds = model.encode_images(&pixels)?;
                    let mut rngs: Vec<_> = (0..batch)
                        .map(|_| rand::rngs::StdRng::seed_from_u64(0))
                        .collect();
                    let generated = generate_batch(&model, &embeds, &settings, &mut rngs)?;
                    if generated.iter().any(|g| g.ids.len() + 1 < length) {
                        return Err("a caption stopped early".into());
                    }
                    Ok(())
                })?,
            )
        }
    };
    Ok((items, per_item, repeats))
}

fn main() -> Result<(), Failure> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(name)) = (args.next(), args.next()) else {
        return Err("usage: inference_bench DIR ROW (rows as in bench/torch_inference.py)".into());
    };
    let row = Row::parse(&name).ok_or_else(|| format!("unknown row {name}"))?;
    // As the tools that run these models do.
    lorakit_pipeline::models::tune_process_for_models();
    let (items, per_item, repeats) = bench(&PathBuf::from(dir), &row)?;
    println!(
        "{}",
        serde_json::json!({"row": name, "items": items, "seconds_per_item": per_item, "repeats": repeats})
    );
    Ok(())
}
