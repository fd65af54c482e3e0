//! sd-scripts' dataset forms against real sd-scripts runs (tests/fixtures/golden/sd_scripts_runs,
//! fixtures README section 2k): each golden layout is recreated from `images/`, described from
//! the run's own command line (and TOML), resolved, and every dataset field compared.
//!
//! The goldens' bucket lists are in the order `make_buckets()` left them, already shuffled with
//! Python's `random`: lorakit's lists (unshuffled) are compared with them as multisets, and
//! exactly with the unshuffled order the fixtures README derives from `image_data`.

use std::path::Path;

use clap::{CommandFactory, Parser};
use lorakit_pipeline::cli::prepare_dataset::DatasetArgs;
use lorakit_pipeline::dataset::kohya::{self, DatasetKind, DirInfo, ResolvedGroup};
use serde_json::{json, Value};

use crate::support::fixtures;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    dataset: DatasetArgs,
}

/// The dataset flags of a `train_network.py` argv (the others are training options; one of
/// those takes a value when the next word is not a flag).
fn dataset_argv(argv: &[String]) -> Vec<String> {
    let command = Wrapper::command();
    let mut kept = vec!["x".to_string()];
    let mut i = 0;
    while i < argv.len() {
        let name = argv[i].trim_start_matches("--");
        let known = command.get_arguments().find(|a| a.get_long() == Some(name));
        let takes_value = match known {
            Some(arg) => arg.get_action().takes_values(),
            None => argv.get(i + 1).is_some_and(|v| !v.starts_with("--")),
        };
        let width = if takes_value { 2 } else { 1 };
        if known.is_some() {
            kept.extend(argv[i..(i + width).min(argv.len())].iter().cloned());
        }
        i += width;
    }
    kept
}

/// Recreates the layout of `case` in a temp folder; returns it with the golden, placeholders
/// substituted.
fn recreate(case: &str) -> (tempfile::TempDir, Value) {
    let text =
        std::fs::read_to_string(fixtures().join(format!("golden/sd_scripts_runs/{case}.json")))
            .unwrap();
    let work = tempfile::tempdir().unwrap();
    let raw: Value = serde_json::from_str(&text).unwrap();
    let placeholder = |name: &str| {
        raw["settings"]["placeholders"][name]
            .as_str()
            .map(|p| p.replace("{WORK}", &work.path().display().to_string()))
    };
    let data = placeholder("{DATA}").unwrap();
    let reg = placeholder("{REG}").unwrap_or_else(|| "{REG}".into());
    let text = text
        .replace("{DATA}", &data)
        .replace("{REG}", &reg)
        .replace("{WORK}", &work.path().display().to_string())
        .replace("{OUT}", &work.path().join("out").display().to_string())
        .replace("{FIXTURES}", &fixtures().display().to_string());
    let golden: Value = serde_json::from_str(&text).unwrap();
    for file in golden["layout"]["files"].as_array().unwrap() {
        let path = work.path().join(file["path"].as_str().unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match (file.get("source"), file.get("content")) {
            (Some(source), _) => {
                std::fs::copy(fixtures().join(source.as_str().unwrap()), &path).unwrap();
            }
            (_, Some(content)) => std::fs::write(&path, content.as_str().unwrap()).unwrap(),
            _ => panic!("layout file without source or content: {file}"),
        }
    }
    (work, golden)
}

fn resolve(golden: &Value) -> ResolvedGroup {
    let argv: Vec<String> = golden["settings"]["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let args = Wrapper::try_parse_from(dataset_argv(&argv)).unwrap();
    let description = kohya::describe(&args.dataset.command_line().unwrap()).unwrap();
    let group = kohya::resolve(&description).unwrap();
    assert!(group.failures.is_empty(), "{:?}", group.failures);
    group
}

fn pair(size: (u32, u32)) -> Value {
    json!([size.0, size.1])
}

fn dirs(list: &[(String, DirInfo)]) -> Value {
    Value::Object(
        list.iter()
            .map(|(name, info)| {
                (
                    name.clone(),
                    json!({"n_repeats": info.n_repeats, "img_count": info.img_count}),
                )
            })
            .collect(),
    )
}

/// Equal including the order of object keys.
fn same(ours: &Value, theirs: &Value, what: &str) {
    assert_eq!(
        serde_json::to_string(ours).unwrap(),
        serde_json::to_string(theirs).unwrap(),
        "{what}"
    );
}

fn check(case: &str) {
    let (_work, golden) = recreate(case);
    let group = resolve(&golden);
    let expected = &golden["dataset"];
    assert_eq!(
        group.length(),
        expected["length"].as_u64().unwrap() as usize
    );
    assert_eq!(
        group.num_train_images(),
        expected["num_train_images"].as_u64().unwrap() as usize
    );
    assert_eq!(
        group.num_reg_images(),
        expected["num_reg_images"].as_u64().unwrap() as usize
    );
    let (train_dirs, reg_dirs) = group.dataset_dirs();
    same(
        &dirs(&train_dirs),
        &expected["dataset_dirs_info"],
        "dataset_dirs_info",
    );
    match expected.get("reg_dataset_dirs_info") {
        Some(reg) => same(
            &dirs(reg_dirs.as_deref().unwrap()),
            reg,
            "reg_dataset_dirs_info",
        ),
        None => assert!(reg_dirs.is_none()),
    }
    let datasets = expected["datasets"].as_array().unwrap();
    assert_eq!(group.datasets.len(), datasets.len());
    for (ours, theirs) in group.datasets.iter().zip(datasets) {
        let class = match ours.kind {
            DatasetKind::DreamBooth => "DreamBoothDataset",
            DatasetKind::FineTuning => "FineTuningDataset",
        };
        assert_eq!(class, theirs["class"]);
        assert_eq!(json!(ours.batch_size), theirs["batch_size"]);
        assert_eq!(pair(ours.resolution), theirs["resolution"]);
        assert_eq!(json!(ours.enable_bucket), theirs["enable_bucket"]);
        let range = ours.bucket_range;
        assert_eq!(json!(range.map(|r| r.0)), theirs["min_bucket_reso"]);
        assert_eq!(json!(range.map(|r| r.1)), theirs["max_bucket_reso"]);
        assert_eq!(json!(range.map(|r| r.2)), theirs["bucket_reso_steps"]);
        assert_eq!(json!(ours.bucket_no_upscale), theirs["bucket_no_upscale"]);
        assert_eq!(json!(ours.prior_loss_weight), theirs["prior_loss_weight"]);
        assert_eq!(json!(ours.num_train_images), theirs["num_train_images"]);
        assert_eq!(json!(ours.num_reg_images), theirs["num_reg_images"]);
        assert_eq!(json!(ours.length()), theirs["length"]);
        let predefined = ours
            .predefined_resos
            .as_ref()
            .map(|list| list.iter().map(|&s| pair(s)).collect::<Vec<_>>());
        assert_eq!(json!(predefined), theirs["predefined_resos"]);

        let info = ours.bucket_info.as_ref().unwrap().to_json();
        same(
            &info["buckets"],
            &theirs["bucket_info"]["buckets"],
            "bucket_info.buckets",
        );
        let (a, b) = (
            info["mean_img_ar_error"].as_f64().unwrap(),
            theirs["bucket_info"]["mean_img_ar_error"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-12 * b.abs(),
            "mean_img_ar_error {a} vs {b}"
        );
        same(
            &ours.tag_frequency.to_json(),
            &theirs["tag_frequency"],
            "tag_frequency",
        );

        let subsets: Vec<Value> = ours
            .subsets
            .iter()
            .map(|s| Value::Object(s.subset.settings_json(s.img_count)))
            .collect();
        same(&json!(subsets), &theirs["subsets"], "subsets");

        let images: Vec<Value> = ours
            .images
            .iter()
            .map(|i| {
                json!({
                    "key": i.key,
                    "absolute_path": i.absolute_path.display().to_string(),
                    "caption": i.caption,
                    "num_repeats": i.num_repeats,
                    "is_reg": i.is_reg,
                    "caption_dropout_rate": i.caption_dropout_rate,
                    "image_size": pair(i.image_size),
                    "bucket_reso": pair(i.bucket_reso),
                    "resized_size": pair(i.resized_size),
                    "subset_index": i.subset_index,
                })
            })
            .collect();
        let golden_images = theirs["image_data"].as_array().unwrap();
        assert_eq!(images.len(), golden_images.len());
        for (mine, golden) in images.iter().zip(golden_images) {
            same(mine, golden, "image_data entry");
        }

        // Buckets: the same resolutions in order; contents as multisets against the shuffled
        // golden, and exactly against the unshuffled order derived from image_data.
        let golden_buckets = theirs["buckets"].as_array().unwrap();
        assert_eq!(ours.buckets.len(), golden_buckets.len());
        for (bucket, golden) in ours.buckets.iter().zip(golden_buckets) {
            assert_eq!(pair(bucket.resolution), golden["resolution"]);
            let mut mine = bucket.image_keys.clone();
            let mut theirs: Vec<String> = golden["image_keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string())
                .collect();
            let unshuffled: Vec<String> = golden_images
                .iter()
                .filter(|i| i["bucket_reso"] == golden["resolution"])
                .flat_map(|i| {
                    let n = i["num_repeats"].as_u64().unwrap() as usize;
                    std::iter::repeat_n(i["key"].as_str().unwrap().to_string(), n)
                })
                .collect();
            assert_eq!(
                mine, unshuffled,
                "unshuffled bucket {:?}",
                bucket.resolution
            );
            mine.sort();
            theirs.sort();
            assert_eq!(mine, theirs, "bucket {:?} as a multiset", bucket.resolution);
        }
    }
}

#[test]
fn dreambooth_folders_with_regularisation_images_match_sd_scripts() {
    check("dreambooth_reg");
}

#[test]
fn dataset_config_toml_matches_sd_scripts() {
    check("dataset_config");
}

#[test]
fn fine_tune_metadata_matches_sd_scripts() {
    check("finetune_256");
}

#[test]
fn written_entries_carry_captions_repeats_and_reg_flags() {
    let (_work, golden) = recreate("dreambooth_reg");
    let group = resolve(&golden);
    let (metadata, duplicates) = lorakit_pipeline::stages::prepare_dataset::entries(&group);
    assert!(duplicates.is_empty());
    let image_data = golden["dataset"]["datasets"][0]["image_data"]
        .as_array()
        .unwrap();
    assert_eq!(metadata.len(), image_data.len());
    for image in image_data {
        let entry = metadata
            .get(image["absolute_path"].as_str().unwrap())
            .unwrap();
        assert_eq!(entry["caption"], image["caption"]);
        assert_eq!(entry["image_size"], image["image_size"]);
        assert_eq!(entry["lorakit_subset"]["num_repeats"], image["num_repeats"]);
        assert_eq!(entry["lorakit_subset"]["is_reg"], image["is_reg"]);
    }
    assert!(Path::new(metadata.iter().next().unwrap().0).is_absolute());
}
