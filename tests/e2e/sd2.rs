//! End-to-end SD2.x flow on the tiny SD2 fixture (tests/fixtures/sd2-tiny, v-prediction):
//! prepare-latents, cache-text-encoder and train-lora `--v2 --v_parameterization` with sample
//! images during training, then generate-images with the LoRA; `--v2` is required as sd-scripts
//! requires it.

use crate::common;

use std::path::{Path, PathBuf};

use common::{fixtures, run_expect};
use lorakit_pipeline::networks::lora::LoraFile;

fn model() -> PathBuf {
    fixtures().join("sd2-tiny/model.safetensors")
}

/// Two photographs with their captions in `<root>/data`, and a metadata file listing them.
fn dataset(root: &Path) -> (PathBuf, PathBuf) {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut meta = serde_json::Map::new();
    for stem in ["astronaut", "chelsea"] {
        let image = data.join(format!("{stem}.png"));
        std::fs::copy(fixtures().join(format!("images/{stem}.png")), &image).unwrap();
        let caption =
            std::fs::read_to_string(fixtures().join(format!("images/{stem}.caption"))).unwrap();
        meta.insert(
            image.display().to_string(),
            serde_json::json!({ "caption": caption.trim() }),
        );
    }
    let in_json = root.join("meta_clean.json");
    std::fs::write(&in_json, serde_json::to_string_pretty(&meta).unwrap()).unwrap();
    (data, in_json)
}

#[test]
fn sd2_v_prediction_flow_trains_samples_and_generates() {
    let root = tempfile::tempdir().unwrap();
    let (data, in_json) = dataset(root.path());
    let meta_lat = root.path().join("meta_lat.json");
    run_expect(
        "prepare-latents",
        args![
            data,
            in_json,
            meta_lat,
            model(),
            "--v2",
            "--max_resolution",
            "64,64",
            "--min_bucket_reso",
            "32",
            "--max_bucket_reso",
            "128",
            "--bucket_reso_steps",
            "32",
            "--full_path"
        ],
        0,
    );
    run_expect("cache-text-encoder", args![meta_lat, model()], 0);
    let prompts = root.path().join("prompts.txt");
    std::fs::write(&prompts, "a cat --w 64 --h 64 --s 2 --d 5\n").unwrap();
    let out = root.path().join("out");
    let train = |extra: &[&str], code: i32| {
        let mut command: Vec<std::ffi::OsString> = common::os(&[
            &"--pretrained_model_name_or_path",
            &model(),
            &"--in_json",
            &meta_lat,
            &"--train_data_dir",
            &data,
            &"--output_dir",
            &out,
            &"--output_name",
            &"sd2",
            &"--max_train_steps",
            &"2",
            &"--train_batch_size",
            &"1",
            &"--learning_rate",
            &"1e-3",
            &"--seed",
            &"1",
            &"--network_train_unet_only",
            &"--quiet",
        ]);
        command.extend(extra.iter().map(Into::into));
        let command: Vec<&std::ffi::OsStr> = command.iter().map(|a| a.as_os_str()).collect();
        run_expect("train-lora", &command, code)
    };
    // The UNet is SD2's: without --v2 the run is refused, as sd-scripts' loader would fail.
    let refused = train(&[], 2);
    assert!(refused.contains("--v2"), "{refused}");
    let stderr = train(
        &[
            "--v2",
            "--v_parameterization",
            "--sample_prompts",
            prompts.to_str().unwrap(),
            "--sample_every_n_steps",
            "2",
            "--sample_sampler",
            "euler",
        ],
        0,
    );
    assert!(!stderr.contains("training goes on"), "{stderr}");
    let lora = out.join("sd2.safetensors");
    let file = LoraFile::read(&lora).unwrap();
    assert!(file.module_names().count() > 0);
    let metadata = &file.metadata;
    assert_eq!(metadata["ss_v2"], "True");
    assert_eq!(metadata["ss_base_model_version"], "sd_v2_v");
    assert_eq!(metadata["modelspec.prediction_type"], "v");
    let samples: Vec<String> = std::fs::read_dir(out.join("sample"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("sd2_000002_00_") && n.ends_with("_5.png"))
        .collect();
    assert_eq!(samples.len(), 1, "{samples:?}");

    // generate-images with the LoRA: v-prediction images; without --v2 a usage error.
    let images = root.path().join("images");
    let generate = |extra: &[&str], code: i32| {
        let mut command: Vec<std::ffi::OsString> = common::os(&[
            &"--ckpt",
            &model(),
            &"--outdir",
            &images,
            &"--prompt",
            &"a cat --w 64 --h 64 --d 5",
            &"--steps",
            &"2",
            &"--sampler",
            &"euler",
            &"--scale",
            &"7.5",
            &"--network_weights",
            &lora,
            &"--sequential_file_name",
            &"--quiet",
        ]);
        command.extend(extra.iter().map(Into::into));
        let command: Vec<&std::ffi::OsStr> = command.iter().map(|a| a.as_os_str()).collect();
        run_expect("generate-images", &command, code)
    };
    let refused = generate(&["--v_parameterization"], 2);
    assert!(refused.contains("add --v2"), "{refused}");
    generate(&["--v2", "--v_parameterization"], 0);
    let image = image::open(images.join("im_000001.png")).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (64, 64));
}
