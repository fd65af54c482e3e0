//! prepare-dataset on the layout of a real sd-scripts run (fixtures README 2k,
//! `dreambooth_reg`): the written entries carry sd-scripts' captions, repeats (reg images after
//! the balancing) and reg flags; an unchanged re-run is up to date; sd-scripts-style mistakes
//! are refused by name.

use std::path::Path;

use serde_json::Value;

use crate::common::{fixtures, run_expect};

/// Recreates the `dreambooth_reg` layout under `work`; returns the golden with `{DATA}`,
/// `{REG}` and `{WORK}` substituted.
pub fn dreambooth_reg(work: &Path) -> Value {
    golden_layout("dreambooth_reg", work)
}

/// Recreates the layout of the sd-scripts run `case` (golden/sd_scripts_runs/<case>.json) under
/// `work`; returns the golden with `{DATA}`, `{REG}` and `{WORK}` substituted as its
/// `placeholders` say.
pub fn golden_layout(case: &str, work: &Path) -> Value {
    let path = fixtures().join(format!("golden/sd_scripts_runs/{case}.json"));
    let text = std::fs::read_to_string(path).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    let work_text = work.display().to_string();
    let mut text = text;
    for name in ["{DATA}", "{REG}"] {
        if let Some(place) = golden["settings"]["placeholders"][name].as_str() {
            text = text.replace(name, &place.replace("{WORK}", &work_text));
        }
    }
    let golden: Value = serde_json::from_str(&text.replace("{WORK}", &work_text)).unwrap();
    for file in golden["layout"]["files"].as_array().unwrap() {
        let path = work.join(file["path"].as_str().unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match file["source"].as_str() {
            Some(source) => {
                std::fs::copy(fixtures().join(source), &path).unwrap();
            }
            None => std::fs::write(&path, file["content"].as_str().unwrap()).unwrap(),
        }
    }
    golden
}

#[test]
fn dreambooth_folders_with_reg_images_are_written_as_sd_scripts_registers_them() {
    let work = tempfile::tempdir().unwrap();
    let golden = dreambooth_reg(work.path());
    let out = work.path().join("meta_dataset.json");
    let (img, reg) = (work.path().join("img"), work.path().join("reg"));
    let command = args![
        "--train_data_dir",
        img,
        "--reg_data_dir",
        reg,
        "--caption_extension",
        ".txt",
        "--shuffle_caption",
        "--keep_tokens",
        "1",
        "--resolution",
        "256,256",
        "--enable_bucket",
        "--min_bucket_reso",
        "128",
        "--max_bucket_reso",
        "512",
        "--bucket_reso_steps",
        "64",
        "--train_batch_size",
        "2",
        "--out_json",
        out
    ];
    let stderr = run_expect("prepare-dataset", command, 0);
    assert!(stderr.contains("11 done, 0 up to date"), "{stderr}");
    let written: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let written = written.as_object().unwrap();
    let images = golden["dataset"]["datasets"][0]["image_data"]
        .as_array()
        .unwrap();
    assert_eq!(written.len(), images.len());
    for (image, (key, entry)) in images.iter().zip(written) {
        assert_eq!(key, image["absolute_path"].as_str().unwrap());
        assert_eq!(entry["caption"], image["caption"], "{key}");
        let subset = &entry["lorakit_subset"];
        assert_eq!(subset["num_repeats"], image["num_repeats"], "{key}");
        assert_eq!(subset["is_reg"], image["is_reg"], "{key}");
        assert_eq!(subset["shuffle_caption"], true);
        assert_eq!(subset["keep_tokens"], 1);
    }
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(lorakit_pipeline::formats::manifest::Manifest::path_for(
            &out,
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["output_schema"], "lorakit.metadata/v2");
    assert_eq!(
        manifest["parameters"]["datasets"][0]["batches_per_epoch"],
        golden["dataset"]["length"]
    );

    let again = run_expect("prepare-dataset", command, 0);
    assert!(again.contains("0 done, 11 up to date"), "{again}");
    // The written file is a metadata JSON the other stages read.
    let cleaned = work.path().join("meta_clean.json");
    run_expect("clean-captions", args![out, cleaned], 0);
}

#[test]
fn mistakes_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    dreambooth_reg(work.path());
    let out = work.path().join("meta.json");
    let img = work.path().join("img");
    let config = work.path().join("dataset.toml");
    std::fs::write(
        &config,
        "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = 'img'\nrepeats = 3\n",
    )
    .unwrap();
    let stderr = run_expect(
        "prepare-dataset",
        args!["--dataset_config", config, "--out_json", out],
        1,
    );
    assert!(
        stderr.contains("dataset.toml")
            && stderr.contains("unknown key `repeats`")
            && stderr.contains("num_repeats"),
        "{stderr}"
    );
    let stderr = run_expect(
        "prepare-dataset",
        args!["--train_data_dir", img, "--out_json", out],
        2,
    );
    assert!(stderr.contains("resolution is required"), "{stderr}");
    std::fs::create_dir(work.path().join("img/no_prefix")).unwrap();
    let stderr = run_expect(
        "prepare-dataset",
        args![
            "--train_data_dir",
            img,
            "--resolution",
            "256",
            "--out_json",
            out
        ],
        0,
    );
    assert!(
        stderr.contains("no_prefix") && stderr.contains("prefix"),
        "{stderr}"
    );
}

/// The whole flow from DreamBooth folders with regularisation images: prepare-dataset,
/// prepare-latents, cache-text-encoder, then train-lora trains each image its subset's repeats
/// times (regularisation images as balanced) and records sd-scripts' counts and buckets for the
/// same dataset: `ss_num_train_images`, `ss_num_reg_images`, `ss_num_batches_per_epoch`,
/// `ss_bucket_info`, `ss_dataset_dirs`, `ss_reg_dataset_dirs` and `ss_tag_frequency` equal the
/// real run's. `--prior_loss_weight` weights the regularisation
/// images' loss.
#[test]
fn dreambooth_folders_train_with_sd_scripts_repeats_and_regularisation() {
    let work = tempfile::tempdir().unwrap();
    let golden = dreambooth_reg(work.path());
    let (img, reg) = (work.path().join("img"), work.path().join("reg"));
    let described = work.path().join("meta_dataset.json");
    let meta = work.path().join("meta_lat.json");
    let model = fixtures().join("sd15-tiny/model.safetensors");
    let buckets = args![
        "--min_bucket_reso",
        "128",
        "--max_bucket_reso",
        "512",
        "--bucket_reso_steps",
        "64"
    ];
    let describe: &[&std::ffi::OsStr] = args![
        "--train_data_dir",
        img,
        "--reg_data_dir",
        reg,
        "--caption_extension",
        ".txt",
        "--resolution",
        "256,256",
        "--enable_bucket",
        "--train_batch_size",
        "2",
        "--out_json",
        described,
        "--quiet"
    ];
    run_expect("prepare-dataset", &[describe, buckets].concat(), 0);
    // The images are the metadata's: the regularisation folder lies outside `img/`.
    let prepare: &[&std::ffi::OsStr] = args![
        img,
        described,
        meta,
        model,
        "--full_path",
        "--max_resolution",
        "256,256",
        "--quiet"
    ];
    run_expect("prepare-latents", &[prepare, buckets].concat(), 0);
    run_expect("cache-text-encoder", args![meta, model, "--quiet"], 0);
    let train = |out: &Path, prior: &str| {
        run_expect(
            "train-lora",
            args![
                "--pretrained_model_name_or_path",
                model,
                "--in_json",
                meta,
                "--output_dir",
                out,
                "--output_name",
                "db",
                "--max_train_steps",
                "4",
                "--train_batch_size",
                "2",
                "--seed",
                "42",
                "--learning_rate",
                "1e-3",
                "--prior_loss_weight",
                prior,
                "--quiet"
            ],
            0,
        );
        let metadata =
            lorakit_pipeline::networks::lora::LoraFile::read(&out.join("db.safetensors"))
                .unwrap()
                .metadata;
        let log = std::fs::read_to_string(out.join("db_loss.jsonl")).unwrap();
        (metadata, log)
    };
    let (metadata, weighted) = train(&work.path().join("out"), "1.0");
    let theirs = &golden["lora_metadata"];
    for key in [
        "ss_num_train_images",
        "ss_num_reg_images",
        "ss_num_batches_per_epoch",
        "ss_bucket_info",
        "ss_prior_loss_weight",
        "ss_dataset_dirs",
        "ss_reg_dataset_dirs",
        "ss_tag_frequency",
    ] {
        assert_eq!(metadata[key], theirs[key].as_str().unwrap(), "{key}");
    }
    let (_, unweighted) = train(&work.path().join("out0"), "0");
    assert_ne!(
        weighted, unweighted,
        "the regularisation images' loss is weighted"
    );
}

/// `train_network.py`'s own argv of the golden run, placeholders filled in.
fn golden_argv(golden: &Value, work: &Path, out: &Path) -> Vec<std::ffi::OsString> {
    golden["settings"]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|arg| {
            arg.as_str()
                .unwrap()
                .replace("{OUT}", &out.display().to_string())
                .replace("{FIXTURES}", &fixtures().display().to_string())
                .replace("{WORK}", &work.display().to_string())
                .into()
        })
        .collect()
}

/// The argv sd-scripts' `train_network.py` ran on the `dreambooth_reg` layout (training images,
/// regularisation images, shuffled captions) runs unchanged: train-lora prepares the dataset
/// with the sibling tools, printing each command, and its LoRA's `ss_*` metadata equals
/// sd-scripts' key by key (except what differs between any two runs, and the reasons listed).
/// The same command again does no model work; `--no_prepare` trains only from what a run
/// prepared, and otherwise lists the commands.
#[test]
fn an_sd_scripts_dreambooth_command_line_prepares_and_trains_unchanged() {
    let work = tempfile::tempdir().unwrap();
    let golden = dreambooth_reg(work.path());
    let out = work.path().join("out");
    let argv = golden_argv(&golden, work.path(), &out);
    let argv: Vec<&std::ffi::OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
    let stderr = run_expect("train-lora", &argv, 0);
    for tool in ["prepare-dataset", "prepare-latents", "cache-text-encoder"] {
        assert!(
            stderr.contains(&format!("train-lora: preparing: {tool} ")),
            "{tool} is printed before it runs:\n{stderr}"
        );
    }
    let ours =
        lorakit_pipeline::networks::lora::LoraFile::read(&out.join("golden_lora.safetensors"))
            .unwrap()
            .metadata;
    let differences = crate::common::sd_scripts_metadata_differences(&golden, &ours);
    assert!(differences.is_empty(), "{}", differences.join("\n"));

    let again = run_expect("train-lora", &argv, 0);
    for tool in ["prepare-dataset", "prepare-latents", "cache-text-encoder"] {
        assert!(
            again.contains(&format!("{tool}: 0 done")),
            "an unchanged dataset is not prepared again by {tool}:\n{again}"
        );
    }
    assert!(again.contains("is up to date"), "{again}");

    let mut no_prepare: Vec<&std::ffi::OsStr> = argv.clone();
    no_prepare.push("--no_prepare".as_ref());
    no_prepare.push("--output_name=other".as_ref());
    let refused = run_expect("train-lora", &no_prepare, 2);
    assert!(
        refused.contains("--no_prepare") && refused.contains("prepare-dataset --"),
        "{refused}"
    );
    assert!(!out.join("other.safetensors").exists());
    let reused = out.join(".lorakit/golden_lora-dataset/meta_lat.json");
    let mut from_prepared: Vec<&std::ffi::OsStr> = argv.clone();
    from_prepared.extend([
        "--no_prepare".as_ref(),
        "--in_json".as_ref(),
        reused.as_os_str(),
    ]);
    from_prepared.push("--output_name=other".as_ref());
    let trained = run_expect("train-lora", &from_prepared, 0);
    assert!(!trained.contains("preparing:"), "{trained}");
    assert!(out.join("other.safetensors").is_file());
}

/// A `--dataset_config` of two datasets (DreamBooth subsets with regularisation images at 256
/// px and batch size 2, a fine-tune subset at 320x192 with bucket_no_upscale and batch size 3;
/// per-subset caption prefix, flips, keep_tokens and caption dropout), with sd-scripts' own argv
/// unchanged: prepare-latents buckets each image with its own dataset's settings, into the
/// bucket sd-scripts chose, and the LoRA records what sd-scripts recorded, `ss_datasets` and
/// the per-dataset batch count included.
#[test]
fn an_sd_scripts_dataset_config_trains_unchanged_with_per_subset_settings() {
    let work = tempfile::tempdir().unwrap();
    let golden = golden_layout("dataset_config", work.path());
    let out = work.path().join("out");
    let argv = golden_argv(&golden, work.path(), &out);
    let argv: Vec<&std::ffi::OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
    let stderr = run_expect("train-lora", &argv, 0);
    assert!(
        stderr.contains("preparing: cache-text-encoder ") && stderr.contains("--variants 8"),
        "the subsets shuffle captions, so variants are cached:\n{stderr}"
    );

    let prepared_json = out.join(".lorakit/golden_lora-dataset/meta_lat.json");
    let prepared: Value = serde_json::from_slice(&std::fs::read(&prepared_json).unwrap()).unwrap();
    let mut compared = 0;
    for dataset in golden["dataset"]["datasets"].as_array().unwrap() {
        for image in dataset["image_data"].as_array().unwrap() {
            let key = image["absolute_path"].as_str().unwrap();
            assert_eq!(
                prepared[key]["train_resolution"], image["bucket_reso"],
                "{key}: the bucket sd-scripts chose"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, prepared.as_object().unwrap().len());
    // The flipping subset's caches hold the flipped latents; the others' do not.
    for key in prepared.as_object().unwrap().keys() {
        let flips = key.contains("/sks/");
        let image = std::path::Path::new(key);
        let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
        let cache = std::fs::read_dir(image.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(&format!("{stem}_")) && name.ends_with("_sd.npz")
            })
            .unwrap_or_else(|| panic!("{key}: no latent cache"));
        let mut reader = lorakit_pipeline::formats::npz::NpzReader::open(&cache).unwrap();
        assert_eq!(
            reader.read_f32("latents_flipped").is_ok(),
            flips,
            "{key}: flipped latents only for the flip_aug subset"
        );
    }

    let ours =
        lorakit_pipeline::networks::lora::LoraFile::read(&out.join("golden_lora.safetensors"))
            .unwrap()
            .metadata;
    let differences = crate::common::sd_scripts_metadata_differences(&golden, &ours);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    for single_dataset_key in [
        "ss_resolution",
        "ss_batch_size_per_device",
        "ss_bucket_info",
    ] {
        assert!(
            !ours.contains_key(single_dataset_key),
            "{single_dataset_key}: sd-scripts leaves it out of dataset-config runs"
        );
    }
}
