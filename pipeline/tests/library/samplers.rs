//! Samplers against diffusers (golden/samplers/samplers.npz, tests/fixtures/generate/samplers.py):
//! timesteps, sigmas and the initial-noise factor, then a whole sampling loop on a synthetic model
//! with the same initial noise and the same injected per-step noise (ancestral samplers).

use lorakit_pipeline::formats::npz::NpzReader;
use lorakit_pipeline::models::samplers::{Prediction, Sampler, SamplerConfig, SamplerKind};

use crate::support::{fixtures, max_abs, npz_tensor};

/// Final latents (values of order 1) within this of diffusers'.
const LATENT_TOLERANCE: f32 = 1e-4;
/// dpm_2_a in 2 steps: its one second stage evaluates at sigma 0.029 and moves the sample from
/// sigma 14.6, so float32 rounding of that start (about 1e-6 of 14.6) is divided by 0.029 on
/// both sides (2.3e-4 measured); held to the 1e-3.
const ILL_CONDITIONED_CASE: (&str, f32) = ("dpm_2_a_epsilon_gen_2", 1e-3);

fn cases(npz: &mut NpzReader) -> Vec<String> {
    let mut names: Vec<String> = npz
        .keys()
        .into_iter()
        .filter_map(|n| n.strip_suffix(".latents").map(str::to_string))
        .collect();
    names.sort();
    names
}

#[test]
fn samplers_match_diffusers_schedulers() {
    let path = fixtures().join("golden/samplers/samplers.npz");
    let mut npz = NpzReader::open(&path).unwrap();
    let noise = npz_tensor(&path, "noise");
    let c = npz_tensor(&path, "c");
    let step_noise = npz_tensor(&path, "step_noise");
    let names = cases(&mut npz);
    assert!(names.len() >= 38, "{names:?}");
    // Every sampler sd-scripts accepts has cases.
    for kind in SamplerKind::accepted() {
        let canonical = SamplerKind::parse(kind).unwrap().name();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with(&format!("{canonical}_"))),
            "no case for {canonical}"
        );
    }
    for case in names {
        // <sampler>_<prediction>_<gen|train>_<steps>
        let parts: Vec<&str> = case.rsplitn(4, '_').collect();
        let (steps, config, prediction, sampler) = (parts[0], parts[1], parts[2], parts[3]);
        let (sampler, prediction) = match prediction {
            "epsilon" => (sampler, Prediction::Epsilon),
            "prediction" => (sampler.strip_suffix("_v").unwrap(), Prediction::V),
            other => panic!("{case}: {other}"),
        };
        let kind = SamplerKind::parse(sampler).unwrap();
        let config = match config {
            "gen" => SamplerConfig::gen_img(kind, prediction),
            _ => SamplerConfig::training_samples(kind, prediction),
        };
        let mut ours = Sampler::new(config, steps.parse().unwrap()).unwrap();

        let (timesteps, _) = npz.read_f64(&format!("{case}.timesteps")).unwrap();
        assert_eq!(ours.timesteps().len(), timesteps.len(), "{case}");
        for (a, b) in ours.timesteps().iter().zip(&timesteps) {
            assert!(
                (a - b).abs() < 1e-3,
                "{case} timesteps {:?} vs {timesteps:?}",
                ours.timesteps()
            );
        }
        if npz.contains(&format!("{case}.sigmas")) {
            let (sigmas, _) = npz.read_f64(&format!("{case}.sigmas")).unwrap();
            assert_eq!(ours.sigmas().len(), sigmas.len(), "{case}");
            for (a, b) in ours.sigmas().iter().zip(&sigmas) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.max(1.0),
                    "{case} sigmas {:?} vs {sigmas:?}",
                    ours.sigmas()
                );
            }
        }
        let (init, _) = npz.read_f64(&format!("{case}.init_noise_sigma")).unwrap();
        assert!(
            (ours.init_noise_sigma() - init[0]).abs() <= 1e-5 * init[0],
            "{case}"
        );

        let mut drawn = 0usize;
        let mut next_noise = |shape: &[usize]| {
            let n = step_noise.get(drawn).unwrap().reshape(shape).unwrap();
            drawn += 1;
            Ok(n)
        };
        let mut latents = (&noise * ours.init_noise_sigma()).unwrap();
        let timesteps = ours.timesteps().to_vec();
        let mut first = None;
        for t in timesteps {
            let input = ours.scale_model_input(&latents).unwrap();
            let output =
                ((input * (0.2 + 0.6 * t / 1000.0)).unwrap() + (&c * 0.1).unwrap()).unwrap();
            latents = ours.step(&output, &latents, &mut next_noise).unwrap();
            first.get_or_insert_with(|| latents.clone());
        }
        let expected_first = npz_tensor(&path, &format!("{case}.first"));
        let first_error = max_abs(&first.unwrap(), &expected_first);
        let expected = npz_tensor(&path, &format!("{case}.latents"));
        let error = max_abs(&latents, &expected);
        let tolerance = if case == ILL_CONDITIONED_CASE.0 {
            ILL_CONDITIONED_CASE.1
        } else {
            LATENT_TOLERANCE
        };
        assert!(
            first_error <= tolerance && error <= tolerance,
            "{case}: max abs difference {first_error} after one step, {error} at the end"
        );
    }
}
