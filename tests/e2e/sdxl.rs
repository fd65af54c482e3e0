//! End-to-end SDXL flow on the tiny SDXL fixture (tests/fixtures/sdxl-tiny): prepare-latents,
//! cache-text-encoder and train-lora, then the LoRA's keys against sd-scripts' networks.lora.

use crate::common;

use std::path::{Path, PathBuf};

use common::{fixtures, run_expect};
use lorakit_pipeline::networks::lora::LoraFile;

fn model() -> PathBuf {
    fixtures().join("sdxl-tiny/model.safetensors")
}

/// Three photographs with their captions in `data`, and a metadata file listing them.
fn dataset(root: &Path) -> (PathBuf, PathBuf) {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut meta = serde_json::Map::new();
    for stem in ["astronaut", "chelsea", "cell"] {
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

/// The UNet module names of sd-scripts' network `variant` on the tiny SDXL
/// (golden/sdxl/lora_keys.json), sorted.
fn golden_modules(variant: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("golden/sdxl/lora_keys.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut names: Vec<String> = json["variants"][variant]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

fn module_names(file: &LoraFile) -> Vec<String> {
    let mut names: Vec<String> = file.module_names().map(|n| n.to_string()).collect();
    names.sort();
    names
}

#[test]
fn sdxl_flow_trains_a_lora_with_sd_scripts_sdxl_keys_and_metadata() {
    let root = tempfile::tempdir().unwrap();
    let (data, in_json) = dataset(root.path());
    let meta_lat = root.path().join("meta_lat.json");
    let stderr = run_expect(
        "prepare-latents",
        args![
            data,
            in_json,
            meta_lat,
            model(),
            "--max_resolution",
            "128,128",
            "--min_bucket_reso",
            "64",
            "--max_bucket_reso",
            "256",
            "--bucket_reso_steps",
            "32",
            "--batch_size",
            "4",
            "--flip_aug",
            "--full_path",
            "--seed",
            "1"
        ],
        0,
    );
    assert!(stderr.contains("3 done"), "{stderr}");
    let caches: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".npz"))
        .collect();
    assert_eq!(caches.len(), 3, "{caches:?}");
    assert!(
        caches.iter().all(|n| n.ends_with("_sdxl.npz")),
        "{caches:?}"
    );
    run_expect("cache-text-encoder", args![meta_lat, model(), "--sdxl"], 0);

    let out = tempfile::tempdir().unwrap();
    let train = |name: &str, extra: &[&str]| {
        let mut command: Vec<std::ffi::OsString> = [
            "--pretrained_model_name_or_path".into(),
            model().into_os_string(),
            "--in_json".into(),
            meta_lat.clone().into_os_string(),
            "--output_dir".into(),
            out.path().as_os_str().to_os_string(),
            "--output_name".into(),
            name.into(),
            "--max_train_steps".into(),
            "2".into(),
            "--train_batch_size".into(),
            "1".into(),
            "--learning_rate".into(),
            "1e-3".into(),
            "--seed".into(),
            "1".into(),
            "--network_train_unet_only".into(),
            "--quiet".into(),
        ]
        .into();
        command.extend(extra.iter().map(Into::into));
        let command: Vec<&std::ffi::OsStr> = command.iter().map(|a| a.as_os_str()).collect();
        run_expect("train-lora", &command, 0);
        LoraFile::read(&out.path().join(format!("{name}.safetensors"))).unwrap()
    };
    let file = train("sdxl", &["--flip_aug"]);
    assert_eq!(module_names(&file), golden_modules("lierla_dim4_alpha1"));
    let c3lier = train(
        "sdxl_c3lier",
        &["--network_args", "conv_dim=4", "conv_alpha=1"],
    );
    assert_eq!(
        module_names(&c3lier),
        golden_modules("c3lier_dim4_alpha1_conv4_convalpha1")
    );
    assert_eq!(file.metadata["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(file.metadata["ss_v2"], "False");
    assert_eq!(
        file.metadata["modelspec.architecture"],
        "stable-diffusion-xl-v1-base/lora"
    );
    assert_eq!(
        file.metadata["modelspec.implementation"],
        "https://github.com/Stability-AI/generative-models"
    );
    let log = std::fs::read_to_string(out.path().join("sdxl_loss.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 2);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );

    // SD1-only settings are refused for SDXL before any work, naming what to drop.
    let stderr = run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model(),
            "--in_json",
            meta_lat,
            "--output_dir",
            out.path(),
            "--v2",
            "--quiet"
        ],
        2,
    );
    assert!(stderr.contains("remove --v2"), "{stderr}");
}

/// An `sdxl_train_network.py`-style command line on DreamBooth folders with the GUI's default
/// optimizer (AdamW8bit), shuffled captions and caption dropout trains straight from the
/// folders: train-lora prepares the SDXL caches (`_sdxl.npz`, both text encoders with caption
/// variants, `pool2` included) and writes an SDXL LoRA.
#[test]
fn an_sdxl_dreambooth_command_line_prepares_and_trains() {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("img/2_sks cat");
    std::fs::create_dir_all(&folder).unwrap();
    for stem in ["astronaut", "chelsea"] {
        let name = format!("{stem}.png");
        std::fs::copy(fixtures().join("images").join(&name), folder.join(name)).unwrap();
    }
    let (img, out) = (root.path().join("img"), root.path().join("out"));
    run_expect(
        "train-lora",
        args![
            "--pretrained_model_name_or_path",
            model(),
            "--train_data_dir",
            img,
            "--resolution",
            "256",
            "--enable_bucket",
            "--min_bucket_reso",
            "128",
            "--max_bucket_reso",
            "512",
            "--output_dir",
            out,
            "--output_name",
            "sdxl",
            "--max_train_steps",
            "2",
            "--optimizer_type",
            "AdamW8bit",
            "--caption_extension",
            ".txt",
            "--shuffle_caption",
            "--keep_tokens",
            "1",
            "--caption_dropout_rate",
            "0.5",
            "--quiet"
        ],
        0,
    );
    let text_cache = folder.join("astronaut_te_outputs.npz");
    let mut reader = lorakit_pipeline::formats::npz::NpzReader::open(&text_cache).unwrap();
    let (_, shape) = reader.read_f32("variants_pool2").unwrap();
    assert_eq!(
        shape[0], 8,
        "the default 8 caption variants, pool2 included"
    );
    assert!(
        std::fs::read_dir(&folder).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with("_sdxl.npz")),
        "SDXL latent caches beside the images"
    );
    let lora = LoraFile::read(&out.join("sdxl.safetensors")).unwrap();
    assert_eq!(lora.metadata["ss_base_model_version"], "sdxl_base_v1-0");
    assert!(lora.metadata["ss_optimizer"].contains("AdamW8bit"));
    assert_eq!(lora.metadata["ss_shuffle_caption"], "True");
    assert_eq!(lora.metadata["ss_caption_dropout_rate"], "0.5");
    // Without --network_train_unet_only sd-scripts trains both text encoders too.
    let names = module_names(&lora);
    for prefix in ["lora_te1_", "lora_te2_", "lora_unet_"] {
        assert!(
            names.iter().any(|name| name.starts_with(prefix)),
            "{prefix}"
        );
    }
    assert!(names.iter().all(|name| name.starts_with("lora_te1_")
        || name.starts_with("lora_te2_")
        || name.starts_with("lora_unet_")));
}
