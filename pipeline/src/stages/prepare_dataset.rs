//! `prepare-dataset`: any sd-scripts dataset form (DreamBooth folders with regularisation
//! images, fine-tune metadata, `--dataset_config`) written as one metadata JSON
//! (`lorakit.metadata/v2`): per image its caption (fine-tune: `caption` and `tags` as given),
//! `image_size` and `lorakit_subset` (dataset, subset, repeats after the regularisation
//! balancing, `is_reg` and the subset's settings). sd-scripts' fine-tune path reads the file
//! and ignores `lorakit_subset`.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::dataset::kohya::{self, CommandLine, DescriptionSource, ResolvedGroup, SubsetSource};
use crate::formats::manifest::{InputRecord, Manifest};
use crate::formats::metadata::{load_input_metadata, Metadata};
use crate::formats::schema::METADATA_V2;
use crate::infra::{fsio, hashing, report::Summary};
use crate::{Error, Result};

/// The tool name in the manifests prepare-dataset writes.
pub const STAGE: &str = "prepare-dataset";

/// Options of `prepare-dataset`.
#[derive(Debug, Clone)]
pub struct PrepareDatasetOptions {
    /// The dataset options of the command line (`--dataset_config`, `--train_data_dir`, ...).
    pub dataset: CommandLine,
    /// The metadata JSON to write.
    pub out_json: PathBuf,
    /// Hide warnings.
    pub quiet: bool,
}

/// The metadata entry of every registered image, keyed by its path: `caption`, `tags` (fine-tune
/// entries that had them), `image_size` and `lorakit_subset`. An image two datasets both hold
/// is written once (the first) and the later one reported as a failure.
pub fn entries(group: &ResolvedGroup) -> (Metadata, Vec<(PathBuf, Error)>) {
    let mut metadata = Metadata::new();
    let mut failures = Vec::new();
    let dir_names = group.subset_dir_names();
    for (d, dataset) in group.datasets.iter().enumerate() {
        for image in &dataset.images {
            let key = image.absolute_path.to_string_lossy().into_owned();
            if metadata.get(&key).is_some() {
                failures.push((
                    image.absolute_path.clone(),
                    Error::bad_file(
                        &image.absolute_path,
                        format!(
                            "also in an earlier dataset; dataset {d} is not written for it (the \
                             metadata JSON holds one entry per image)"
                        ),
                    ),
                ));
                continue;
            }
            let registered = &dataset.subsets[image.subset_index];
            let entry = metadata.entry_mut(&key);
            let fine_tune = matches!(registered.subset.source, SubsetSource::FineTuning { .. });
            if fine_tune && (image.metadata_caption.is_some() || image.tags.is_some()) {
                if let Some(caption) = &image.metadata_caption {
                    entry.insert("caption".into(), json!(caption));
                }
                if let Some(tags) = &image.tags {
                    entry.insert("tags".into(), json!(tags));
                }
            } else {
                entry.insert("caption".into(), json!(image.caption));
            }
            entry.insert(
                "image_size".into(),
                json!([image.image_size.0, image.image_size.1]),
            );
            let mut subset = Map::new();
            subset.insert("dataset".into(), json!(d));
            subset.insert("subset".into(), json!(image.subset_index));
            subset.insert("num_repeats".into(), json!(image.num_repeats));
            subset.insert("is_reg".into(), json!(image.is_reg));
            let dir = &dir_names[d][image.subset_index];
            let mut dataset_dir = json!({
                "name": dir.name,
                "n_repeats": registered.subset.num_repeats,
                "img_count": registered.img_count,
            });
            if !dir.listed {
                dataset_dir["listed"] = json!(false);
            }
            if fine_tune {
                // sd-scripts counts a fine-tune subset's `tags` in ss_tag_frequency, a
                // DreamBooth subset's captions.
                dataset_dir["tags_from"] = json!("tags");
            }
            subset.insert("dataset_dir".into(), dataset_dir);
            for (name, value) in registered.subset.settings_json(registered.img_count) {
                if !matches!(
                    name.as_str(),
                    "image_dir" | "metadata_file" | "img_count" | "num_repeats" | "is_reg"
                ) {
                    subset.insert(name, value);
                }
            }
            entry.insert("lorakit_subset".into(), Value::Object(subset));
        }
    }
    (metadata, failures)
}

/// What the manifest records about the datasets: per dataset its kind, resolution, batch
/// size, bucket settings, image counts, batches per epoch and `bucket_info`.
fn datasets_json(group: &ResolvedGroup) -> Value {
    let datasets: Vec<Value> = group
        .datasets
        .iter()
        .map(|d| {
            json!({
                "kind": match d.kind {
                    kohya::DatasetKind::DreamBooth => "dreambooth",
                    kohya::DatasetKind::FineTuning => "fine_tuning",
                },
                "resolution": [d.resolution.0, d.resolution.1],
                "batch_size": d.batch_size,
                "enable_bucket": d.enable_bucket,
                "min_bucket_reso": d.bucket_range.map(|r| r.0),
                "max_bucket_reso": d.bucket_range.map(|r| r.1),
                "bucket_reso_steps": d.bucket_range.map(|r| r.2),
                "bucket_no_upscale": d.bucket_no_upscale,
                "prior_loss_weight": d.prior_loss_weight,
                "num_train_images": d.num_train_images,
                "num_reg_images": d.num_reg_images,
                "batches_per_epoch": d.length(),
                "bucket_info": d.bucket_info.as_ref().map(kohya::BucketInfo::to_json),
            })
        })
        .collect();
    Value::Array(datasets)
}

/// The datasets of a `--dataset_config` behind the metadata `in_json` (prepare-dataset's
/// manifest parameters, found through the manifests of the stages after it), whose per-subset
/// settings (`lorakit_subset`) and per-dataset batch sizes apply as sd-scripts applies a config
/// file's; `None` for metadata from a command-line dataset or another tool.
pub fn dataset_config_behind(in_json: &Path) -> Result<Option<Value>> {
    let Some((_, manifest)) = Manifest::upstream(in_json, STAGE)? else {
        return Ok(None);
    };
    Ok(manifest.parameters["dataset_config"]
        .is_string()
        .then_some(manifest.parameters))
}

/// Runs `prepare-dataset`.
pub fn run(options: &PrepareDatasetOptions) -> Result<Summary> {
    fsio::check_writable(&options.out_json)?;
    let description = kohya::describe(&options.dataset)?;
    let group = kohya::resolve(&description)?;
    if !options.quiet {
        for warning in &group.warnings {
            tracing::warn!("{warning}");
        }
    }
    let (metadata, duplicates) = entries(&group);
    let previous = options
        .out_json
        .is_file()
        .then(|| load_input_metadata(&options.out_json).ok())
        .flatten();
    let mut summary = Summary::default();
    for (path, error) in group.failures.iter().chain(&duplicates) {
        summary.fail(path, error);
    }
    let mut digest = hashing::KeyBuilder::new("prepare-dataset", 1);
    for (key, entry) in metadata.iter() {
        digest
            .text("key", key)
            .text("entry", &Value::Object(entry.clone()).to_string());
        if previous.as_ref().and_then(|p| p.get(key)) == Some(entry) {
            summary.up_to_date += 1;
        } else {
            summary.done += 1;
        }
    }
    tracing::info!(
        "{} dataset(s), {} images, {} batches per epoch",
        group.datasets.len(),
        metadata.len(),
        group.length()
    );
    metadata.save(&options.out_json)?;

    let (dirs, reg_dirs) = group.dataset_dirs();
    let dirs_json = |list: &[(String, kohya::DirInfo)]| -> Value {
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
    };
    let args = &options.dataset;
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let parameters = json!({
        "dataset_config": path(&args.dataset_config),
        "train_data_dir": path(&args.train_data_dir),
        "reg_data_dir": path(&args.reg_data_dir),
        "in_json": path(&args.in_json),
        "datasets": datasets_json(&group),
        "dataset_dirs": dirs_json(&dirs),
        "reg_dataset_dirs": reg_dirs.as_deref().map(dirs_json),
        "tag_frequency": group.tag_frequency(),
        "sd_scripts_datasets": group.sd_scripts_datasets(),
    });
    let mut manifest = Manifest::new(STAGE, &options.out_json, METADATA_V2, parameters);
    if let DescriptionSource::ConfigFile(file) = &group.source {
        manifest.add_input_file("dataset_config", file)?;
    }
    manifest.inputs.push(InputRecord {
        role: "images".into(),
        path: None,
        blake3: digest.finish(),
        items: Some(metadata.len()),
    });
    manifest.summary = summary.clone();
    manifest.write_for(&options.out_json)?;
    Ok(summary)
}
