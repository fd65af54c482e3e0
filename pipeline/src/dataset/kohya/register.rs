//! A description resolved into images as sd-scripts' `DreamBoothDataset` / `FineTuningDataset`
//! register them, then `make_buckets()`: captions, repeats, the regularisation balancing, image
//! sizes, buckets with their contents, `bucket_info`, tag frequencies and folder statistics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use super::config::{Dataset, DatasetKind, Description, DescriptionSource, Subset, SubsetSource};
use crate::dataset::bucket::{BucketManager, BucketSettings, Size};
use crate::dataset::{first_line, imaging, list_images, read_text, sidecar_path};
use crate::infra::pyjson;
use crate::text::caption_text::training_caption;
use crate::{Error, Result};

/// One registered image (sd-scripts' `ImageInfo` after `make_buckets()`).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// The image key: the path as listed (DreamBooth) or the metadata key (fine-tune).
    pub key: String,
    /// The image file.
    pub absolute_path: PathBuf,
    /// The caption as loaded: the caption file's first line, the class tokens, or the
    /// fine-tune `caption` + `caption_separator` + `tags` (before prefix, shuffle or dropout).
    pub caption: String,
    /// The fine-tune entry's `caption`, when it had a string there.
    pub metadata_caption: Option<String>,
    /// The fine-tune entry's `tags`, when it had a string there.
    pub tags: Option<String>,
    /// Repeats per epoch (regularisation images: after the balancing).
    pub num_repeats: u32,
    /// A regularisation image.
    pub is_reg: bool,
    /// The subset's `caption_dropout_rate`.
    pub caption_dropout_rate: f64,
    /// Index of its subset in [`ResolvedDataset::subsets`].
    pub subset_index: usize,
    /// Size (W, H) from the file header, or from the metadata's `image_size`.
    pub image_size: Size,
    /// Its bucket (W, H).
    pub bucket_reso: Size,
    /// The size it is resized to before the centre crop.
    pub resized_size: Size,
    /// Bucket aspect ratio minus image aspect ratio.
    pub ar_error: f64,
}

/// A subset that registered images, with their count (`img_count`).
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredSubset {
    /// The subset's settings.
    pub subset: Subset,
    /// Images registered from it (regularisation images: listed, whether used or not).
    pub img_count: usize,
}

/// One bucket: its resolution and image keys, one entry per repeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// (W, H).
    pub resolution: Size,
    /// Keys in sd-scripts' order before any shuffle: images in registration order, each
    /// repeated `num_repeats` times in a row.
    pub image_keys: Vec<String>,
}

/// Tag counts per folder (or metadata file), in sd-scripts' insertion order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TagFrequency {
    folders: Vec<(String, Vec<(String, usize)>)>,
    index: HashMap<String, (usize, HashMap<String, usize>)>,
}

impl TagFrequency {
    /// sd-scripts' `set_tag_frequency`: every `,`-separated piece of each caption, stripped and
    /// lower-cased, counted under `folder` (empty pieces are not counted).
    pub fn add(&mut self, folder: &str, captions: &[&str]) {
        let (slot, tags) = match self.index.get_mut(folder) {
            Some(entry) => entry,
            None => {
                self.folders.push((folder.to_string(), Vec::new()));
                self.index
                    .entry(folder.to_string())
                    .or_insert((self.folders.len() - 1, HashMap::new()))
            }
        };
        let counts = &mut self.folders[*slot].1;
        for caption in captions {
            for piece in caption.split(',') {
                let piece = piece.trim();
                if piece.is_empty() {
                    continue;
                }
                let tag = piece.to_lowercase();
                match tags.get(&tag) {
                    Some(&i) => counts[i].1 += 1,
                    None => {
                        tags.insert(tag.clone(), counts.len());
                        counts.push((tag, 1));
                    }
                }
            }
        }
    }

    /// `(folder, [(tag, count)])` in insertion order.
    pub fn folders(&self) -> &[(String, Vec<(String, usize)>)] {
        &self.folders
    }

    /// As sd-scripts saves it (`ss_tag_frequency`): `{folder: {tag: count}}`.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.folders
                .iter()
                .map(|(folder, counts)| (folder.clone(), counts_json(counts)))
                .collect(),
        )
    }
}

fn counts_json(counts: &[(String, usize)]) -> Value {
    Value::Object(
        counts
            .iter()
            .map(|(tag, n)| (tag.clone(), json!(n)))
            .collect(),
    )
}

/// sd-scripts' `bucket_info` of a bucketed dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketInfo {
    /// `(index in the sorted bucket list, resolution, images incl. repeats)`, non-empty only.
    pub buckets: Vec<(usize, Size, usize)>,
    /// Mean |bucket aspect - image aspect| over the registered images, without repeats.
    pub mean_img_ar_error: f64,
}

impl BucketInfo {
    /// As sd-scripts saves it (`ss_bucket_info`).
    pub fn to_json(&self) -> Value {
        let buckets: Map<String, Value> = self
            .buckets
            .iter()
            .map(|(i, (w, h), count)| {
                (i.to_string(), json!({"resolution": [w, h], "count": count}))
            })
            .collect();
        json!({"buckets": buckets, "mean_img_ar_error": self.mean_img_ar_error})
    }
}

/// A dataset resolved into images and buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedDataset {
    /// DreamBooth or fine-tune.
    pub kind: DatasetKind,
    /// (W, H).
    pub resolution: Size,
    /// Images per batch.
    pub batch_size: usize,
    /// Whether images are bucketed (else one bucket of `resolution`).
    pub enable_bucket: bool,
    /// `(min_bucket_reso, max_bucket_reso, bucket_reso_steps)` after sd-scripts rounds them to
    /// the steps; `None` without buckets.
    pub bucket_range: Option<(u32, u32, u32)>,
    /// `bucket_no_upscale` (always false without buckets).
    pub bucket_no_upscale: bool,
    /// `prior_loss_weight` (DreamBooth datasets only).
    pub prior_loss_weight: Option<f64>,
    /// The predefined bucket list (`None` with `bucket_no_upscale`).
    pub predefined_resos: Option<Vec<Size>>,
    /// Subsets that registered images, in order.
    pub subsets: Vec<RegisteredSubset>,
    /// Registered images in sd-scripts' order: training images by subset, then the
    /// regularisation images the balancing kept.
    pub images: Vec<Image>,
    /// The buckets sorted by resolution.
    pub buckets: Vec<Bucket>,
    /// `bucket_info` (bucketed datasets only).
    pub bucket_info: Option<BucketInfo>,
    /// Tag frequency per folder or metadata file.
    pub tag_frequency: TagFrequency,
    /// Training images times repeats.
    pub num_train_images: usize,
    /// Regularisation images times their folder's repeats, before the balancing.
    pub num_reg_images: usize,
    /// `resize_interpolation` of the dataset.
    pub resize_interpolation: Option<String>,
}

impl ResolvedDataset {
    /// Batches per epoch: the sum over buckets of ceil(entries / batch size).
    pub fn length(&self) -> usize {
        self.buckets
            .iter()
            .map(|b| b.image_keys.len().div_ceil(self.batch_size))
            .sum()
    }
}

/// `n_repeats` and `img_count` of one folder or metadata file (`ss_dataset_dirs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirInfo {
    /// The subset's repeats.
    pub n_repeats: i64,
    /// Its image count.
    pub img_count: usize,
}

/// A subset's folder name in sd-scripts' metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetDirName {
    /// The name (`name (2)` for a repeated one with `--dataset_config`).
    pub name: String,
    /// Whether `ss_dataset_dirs` / `ss_reg_dataset_dirs` list it.
    pub listed: bool,
}

/// Folder (or metadata file) names with their [`DirInfo`], in sd-scripts' order.
pub type DirList = Vec<(String, DirInfo)>;

/// Every dataset of a description, resolved.
#[derive(Debug)]
pub struct ResolvedGroup {
    /// How the description was given.
    pub source: DescriptionSource,
    /// The datasets, in order.
    pub datasets: Vec<ResolvedDataset>,
    /// Warnings (skipped folders and subsets, adjusted bucket sizes, unused reg images).
    pub warnings: Vec<String>,
    /// Images left out because of an error (unreadable image or caption, bad metadata entry).
    pub failures: Vec<(PathBuf, Error)>,
}

impl ResolvedGroup {
    /// Batches per epoch over all datasets.
    pub fn length(&self) -> usize {
        self.datasets.iter().map(ResolvedDataset::length).sum()
    }

    /// Training images times repeats over all datasets.
    pub fn num_train_images(&self) -> usize {
        self.datasets.iter().map(|d| d.num_train_images).sum()
    }

    /// Regularisation images times repeats over all datasets (before the balancing).
    pub fn num_reg_images(&self) -> usize {
        self.datasets.iter().map(|d| d.num_reg_images).sum()
    }

    /// The `ss_dataset_dirs` / `ss_reg_dataset_dirs` name of every subset, per dataset; a
    /// subset sd-scripts leaves out of both (regularisation subsets of a `--dataset_config`)
    /// has its folder's name, under which its tags are still counted.
    pub fn subset_dir_names(&self) -> Vec<Vec<SubsetDirName>> {
        let (train, reg) = self.dataset_dirs();
        let mut unclaimed: Vec<&String> = train
            .iter()
            .chain(reg.iter().flatten())
            .map(|(name, _)| name)
            .collect();
        let name = |path: &Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        self.datasets
            .iter()
            .map(|dataset| {
                dataset
                    .subsets
                    .iter()
                    .map(|subset| {
                        let base = match &subset.subset.source {
                            SubsetSource::FineTuning { metadata_file } => name(metadata_file),
                            SubsetSource::DreamBooth { .. } => {
                                name(subset.subset.image_dir.as_deref().unwrap_or(Path::new("")))
                            }
                        };
                        // With --dataset_config a repeated name is listed as `name (2)`, ...;
                        // each subset takes the first listed name of its base left.
                        let position = unclaimed.iter().position(|listed| {
                            **listed == base || listed.starts_with(&format!("{base} ("))
                        });
                        match position {
                            Some(position) => SubsetDirName {
                                name: unclaimed.remove(position).clone(),
                                listed: true,
                            },
                            None => SubsetDirName {
                                name: base,
                                listed: false,
                            },
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// sd-scripts' `ss_dataset_dirs` and `ss_reg_dataset_dirs` (the latter `None` with
    /// `--dataset_config`, where reg folders are left out and repeated names get ` (2)`).
    pub fn dataset_dirs(&self) -> (DirList, Option<DirList>) {
        let name = |path: &Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let info = |s: &RegisteredSubset| DirInfo {
            n_repeats: s.subset.num_repeats,
            img_count: s.img_count,
        };
        let mut train: Vec<(String, DirInfo)> = Vec::new();
        let mut reg: Vec<(String, DirInfo)> = Vec::new();
        let set = |list: &mut Vec<(String, DirInfo)>, key: String, value: DirInfo| match list
            .iter_mut()
            .find(|(k, _)| *k == key)
        {
            Some(slot) => slot.1 = value,
            None => list.push((key, value)),
        };
        let subsets = self.datasets.iter().flat_map(|d| d.subsets.iter());
        match self.source {
            DescriptionSource::ConfigFile(_) => {
                for subset in subsets {
                    let base = match &subset.subset.source {
                        SubsetSource::FineTuning { metadata_file } => name(metadata_file),
                        SubsetSource::DreamBooth { is_reg: true, .. } => continue,
                        SubsetSource::DreamBooth { .. } => match &subset.subset.image_dir {
                            Some(dir) => name(dir),
                            None => continue,
                        },
                    };
                    let mut key = base.clone();
                    let mut i = 2;
                    while train.iter().any(|(k, _)| *k == key) {
                        key = format!("{base} ({i})");
                        i += 1;
                    }
                    train.push((key, info(subset)));
                }
                (train, None)
            }
            DescriptionSource::Folders | DescriptionSource::Metadata => {
                for subset in subsets {
                    match &subset.subset.source {
                        SubsetSource::FineTuning { metadata_file } => {
                            set(&mut train, name(metadata_file), info(subset))
                        }
                        SubsetSource::DreamBooth { is_reg, .. } => {
                            let dir =
                                name(subset.subset.image_dir.as_deref().unwrap_or(Path::new("")));
                            let list = if *is_reg { &mut reg } else { &mut train };
                            set(list, dir, info(subset));
                        }
                    }
                }
                (train, Some(reg))
            }
        }
    }

    /// sd-scripts' `ss_tag_frequency`: the one dataset's, or with `--dataset_config` the
    /// datasets' merged (a folder counted in several datasets keeps its first counts).
    pub fn tag_frequency(&self) -> Value {
        let mut merged = Map::new();
        for dataset in &self.datasets {
            for (folder, counts) in dataset.tag_frequency.folders() {
                if !merged.contains_key(folder) {
                    merged.insert(folder.clone(), counts_json(counts));
                }
            }
        }
        Value::Object(merged)
    }

    /// What sd-scripts saves as `ss_datasets` for a `--dataset_config` run (before its
    /// `json.dumps`): per dataset its batch size, image counts, resolution, bucket settings,
    /// tag frequency and `bucket_info`, and per subset its caption and augmentation settings
    /// with the folder (or metadata file) name.
    pub fn sd_scripts_datasets(&self) -> Value {
        let base_name = |path: &Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let datasets = self.datasets.iter().map(|dataset| {
            let subsets: Vec<Value> = dataset
                .subsets
                .iter()
                .map(|registered| {
                    let s = &registered.subset;
                    let mut subset = json!({
                        "img_count": registered.img_count,
                        "num_repeats": s.num_repeats,
                        "color_aug": s.color_aug,
                        "flip_aug": s.flip_aug,
                        "random_crop": s.random_crop,
                        "shuffle_caption": s.shuffle_caption,
                        "keep_tokens": s.keep_tokens,
                        "keep_tokens_separator": s.keep_tokens_separator,
                        "secondary_separator": s.secondary_separator,
                        "enable_wildcard": s.enable_wildcard,
                        "caption_prefix": s.caption_prefix,
                        "caption_suffix": s.caption_suffix,
                        "resize_interpolation": s.resize_interpolation,
                    });
                    if let Some(dir) = &s.image_dir {
                        subset["image_dir"] = json!(base_name(dir));
                    }
                    match &s.source {
                        SubsetSource::DreamBooth {
                            class_tokens,
                            is_reg,
                            ..
                        } => {
                            subset["class_tokens"] = json!(class_tokens);
                            subset["is_reg"] = json!(is_reg);
                        }
                        SubsetSource::FineTuning { metadata_file } => {
                            subset["metadata_file"] = json!(base_name(metadata_file));
                        }
                    }
                    subset
                })
                .collect();
            json!({
                "is_dreambooth": dataset.kind == DatasetKind::DreamBooth,
                "batch_size_per_device": dataset.batch_size,
                "num_train_images": dataset.num_train_images,
                "num_reg_images": dataset.num_reg_images,
                "resolution": [dataset.resolution.0, dataset.resolution.1],
                "enable_bucket": dataset.enable_bucket,
                "min_bucket_reso": dataset.bucket_range.map(|r| r.0),
                "max_bucket_reso": dataset.bucket_range.map(|r| r.1),
                "tag_frequency": dataset.tag_frequency.to_json(),
                "bucket_info": dataset.bucket_info.as_ref().map(BucketInfo::to_json),
                "resize_interpolation": dataset.resize_interpolation,
                "subsets": subsets,
            })
        });
        Value::Array(datasets.collect())
    }
}

/// Resolves every dataset of `description` into images and buckets, as sd-scripts'
/// `generate_dataset_group_by_blueprint` does up to `make_buckets()`.
///
/// Errors in the description (no resolution, a bucket range that excludes the resolution, a
/// missing metadata file) are fatal; an unreadable image, caption file or metadata entry leaves
/// that image out and is listed in [`ResolvedGroup::failures`].
pub fn resolve(description: &Description) -> Result<ResolvedGroup> {
    let mut group = ResolvedGroup {
        source: description.source.clone(),
        datasets: Vec::new(),
        warnings: description.warnings.clone(),
        failures: Vec::new(),
    };
    for (index, dataset) in description.datasets.iter().enumerate() {
        let resolved = resolve_dataset(index, dataset, &mut group)?;
        group.datasets.push(resolved);
    }
    Ok(group)
}

/// An image found for a subset, before registration.
struct Candidate {
    key: String,
    path: PathBuf,
    caption: String,
    metadata_caption: Option<String>,
    tags: Option<String>,
    size: Size,
}

fn usage(index: usize, message: String) -> Error {
    Error::Usage(format!("dataset {index}: {message}"))
}

fn positive(index: usize, name: &str, value: i64) -> Result<u32> {
    u32::try_from(value).ok().filter(|&v| v > 0).ok_or_else(|| {
        usage(
            index,
            format!("{name} must be a positive integer, not {value}"),
        )
    })
}

/// sd-scripts' `adjust_min_max_bucket_reso_by_steps` and its checks.
fn bucket_range(
    index: usize,
    dataset: &Dataset,
    resolution: Size,
    warnings: &mut Vec<String>,
) -> Result<(u32, u32, u32)> {
    let steps = positive(index, "bucket_reso_steps", dataset.bucket_reso_steps)?;
    let mut min = positive(index, "min_bucket_reso", dataset.min_bucket_reso)?;
    let mut max = positive(index, "max_bucket_reso", dataset.max_bucket_reso)?;
    if min % steps != 0 {
        let adjusted = min - min % steps;
        warnings.push(format!(
            "dataset {index}: min_bucket_reso adjusted to a multiple of bucket_reso_steps: {min} -> {adjusted}"
        ));
        min = adjusted;
    }
    if max % steps != 0 {
        let adjusted = max + steps - max % steps;
        warnings.push(format!(
            "dataset {index}: max_bucket_reso adjusted to a multiple of bucket_reso_steps: {max} -> {adjusted}"
        ));
        max = adjusted;
    }
    if resolution.0.min(resolution.1) < min {
        return Err(usage(
            index,
            format!(
                "min_bucket_reso {min} is larger than the resolution's shorter side {}; \
                 lower min_bucket_reso or raise the resolution",
                resolution.0.min(resolution.1)
            ),
        ));
    }
    if resolution.0.max(resolution.1) > max {
        return Err(usage(
            index,
            format!(
                "max_bucket_reso {max} is smaller than the resolution's longer side {}; \
                 raise max_bucket_reso or lower the resolution",
                resolution.0.max(resolution.1)
            ),
        ));
    }
    Ok((min, max, steps))
}

fn resolve_dataset(
    index: usize,
    dataset: &Dataset,
    group: &mut ResolvedGroup,
) -> Result<ResolvedDataset> {
    let resolution = dataset.resolution.ok_or_else(|| {
        usage(
            index,
            "resolution is required (`resolution` in the dataset config, or --resolution)".into(),
        )
    })?;
    let batch_size = positive(index, "batch_size", dataset.batch_size)? as usize;
    let (bucket_range, no_upscale) = if dataset.enable_bucket {
        let range = bucket_range(index, dataset, resolution, &mut group.warnings)?;
        (Some(range), dataset.bucket_no_upscale)
    } else {
        (None, false)
    };
    let manager = || -> Result<BucketManager> {
        match bucket_range {
            Some((min, max, steps)) => BucketManager::new(BucketSettings {
                max_resolution: resolution,
                min_bucket_reso: min,
                max_bucket_reso: max,
                bucket_reso_steps: steps,
                no_upscale,
            }),
            None => BucketManager::fixed(resolution),
        }
    };
    let mut probe = manager()?;
    if no_upscale {
        group.warnings.push(format!(
            "dataset {index}: min_bucket_reso and max_bucket_reso are ignored with \
             bucket_no_upscale (buckets follow the image sizes)"
        ));
    }

    let mut resolved = ResolvedDataset {
        kind: dataset.kind,
        resolution,
        batch_size,
        enable_bucket: dataset.enable_bucket,
        bucket_range,
        bucket_no_upscale: no_upscale,
        prior_loss_weight: (dataset.kind == DatasetKind::DreamBooth)
            .then_some(dataset.prior_loss_weight),
        predefined_resos: (!no_upscale).then(|| probe.predefined().to_vec()),
        subsets: Vec::new(),
        images: Vec::new(),
        buckets: Vec::new(),
        bucket_info: None,
        tag_frequency: TagFrequency::default(),
        num_train_images: 0,
        num_reg_images: 0,
        resize_interpolation: dataset.resize_interpolation.clone(),
    };
    let mut reg_images: Vec<Image> = Vec::new();
    for subset in &dataset.subsets {
        let described = subset_name(subset);
        if subset.num_repeats < 1 {
            group.warnings.push(format!(
                "dataset {index}: subset {described} ignored: num_repeats {} is less than 1",
                subset.num_repeats
            ));
            continue;
        }
        let duplicate = resolved
            .subsets
            .iter()
            .any(|r| match (&r.subset.source, &subset.source) {
                (
                    SubsetSource::FineTuning { metadata_file: a },
                    SubsetSource::FineTuning { metadata_file: b },
                ) => a == b,
                (SubsetSource::DreamBooth { .. }, SubsetSource::DreamBooth { .. }) => {
                    r.subset.image_dir == subset.image_dir
                }
                _ => false,
            });
        if duplicate {
            group.warnings.push(format!(
                "dataset {index}: duplicated subset {described} ignored: the first one is used"
            ));
            continue;
        }
        let candidates = match &subset.source {
            SubsetSource::DreamBooth { .. } => {
                dreambooth_candidates(subset, &mut probe, &mut resolved.tag_frequency, group)?
            }
            SubsetSource::FineTuning { metadata_file } => fine_tuning_candidates(
                subset,
                metadata_file,
                &mut probe,
                &mut resolved.tag_frequency,
                group,
            )?,
        };
        if candidates.is_empty() {
            group.warnings.push(format!(
                "dataset {index}: subset {described} ignored: no images found"
            ));
            continue;
        }
        let repeats = subset.num_repeats as usize;
        let is_reg = subset.is_reg();
        if is_reg {
            resolved.num_reg_images += repeats * candidates.len();
        } else {
            resolved.num_train_images += repeats * candidates.len();
        }
        let subset_index = resolved.subsets.len();
        resolved.subsets.push(RegisteredSubset {
            subset: subset.clone(),
            img_count: candidates.len(),
        });
        for candidate in candidates {
            let image = Image {
                key: candidate.key,
                absolute_path: candidate.path,
                caption: candidate.caption,
                metadata_caption: candidate.metadata_caption,
                tags: candidate.tags,
                num_repeats: subset.num_repeats.min(u32::MAX as i64) as u32,
                is_reg,
                caption_dropout_rate: subset.caption_dropout_rate,
                subset_index,
                image_size: candidate.size,
                bucket_reso: (0, 0),
                resized_size: (0, 0),
                ar_error: 0.0,
            };
            if is_reg {
                reg_images.push(image);
            } else {
                register(&mut resolved.images, image);
            }
        }
    }
    balance_reg_images(index, &mut resolved, reg_images, &mut group.warnings);
    make_buckets(&mut resolved, manager()?);
    Ok(resolved)
}

/// sd-scripts' `register_image`: `image_data[key] = info` (a repeated key keeps its place and
/// takes the new image).
fn register(images: &mut Vec<Image>, image: Image) {
    match images.iter_mut().find(|i| i.key == image.key) {
        Some(slot) => *slot = image,
        None => images.push(image),
    }
}

/// sd-scripts' regularisation balancing: reg images are registered in order until their
/// repeats reach the training images × repeats, then their repeats are raised one by one,
/// round robin, until the total is reached. Reg images beyond it are not used.
fn balance_reg_images(
    index: usize,
    dataset: &mut ResolvedDataset,
    reg_images: Vec<Image>,
    warnings: &mut Vec<String>,
) {
    let target = dataset.num_train_images;
    if dataset.num_train_images < dataset.num_reg_images {
        warnings.push(format!(
            "dataset {index}: more regularisation images than training images (with repeats); \
             some are not used"
        ));
    }
    if dataset.num_reg_images == 0 {
        return;
    }
    let mut total = 0usize;
    let mut first_loop = true;
    while total < target && !reg_images.is_empty() {
        for image in &reg_images {
            if first_loop {
                register(&mut dataset.images, image.clone());
                total += image.num_repeats as usize;
            } else {
                if let Some(slot) = dataset.images.iter_mut().find(|r| r.key == image.key) {
                    slot.num_repeats += 1;
                }
                total += 1;
            }
            if total >= target {
                break;
            }
        }
        first_loop = false;
    }
}

/// sd-scripts' `make_buckets()`: bucket of each image, the sorted bucket list filled with
/// every image's key `num_repeats` times in registration order, and `bucket_info`.
fn make_buckets(dataset: &mut ResolvedDataset, mut manager: BucketManager) {
    let mut errors = Vec::with_capacity(dataset.images.len());
    for image in &mut dataset.images {
        if let Some(placement) = manager.place(image.image_size) {
            image.bucket_reso = placement.bucket;
            image.resized_size = placement.resized;
            image.ar_error = placement.ar_error;
            errors.push(placement.ar_error.abs());
        }
    }
    let resolutions = manager.used_sorted();
    let mut buckets: Vec<Bucket> = resolutions
        .iter()
        .map(|&resolution| Bucket {
            resolution,
            image_keys: Vec::new(),
        })
        .collect();
    for image in &dataset.images {
        if let Some(bucket) = buckets
            .iter_mut()
            .find(|b| b.resolution == image.bucket_reso)
        {
            for _ in 0..image.num_repeats {
                bucket.image_keys.push(image.key.clone());
            }
        }
    }
    if dataset.enable_bucket {
        dataset.bucket_info = Some(BucketInfo {
            buckets: buckets
                .iter()
                .enumerate()
                .filter(|(_, b)| !b.image_keys.is_empty())
                .map(|(i, b)| (i, b.resolution, b.image_keys.len()))
                .collect(),
            mean_img_ar_error: if errors.is_empty() {
                0.0
            } else {
                errors.iter().sum::<f64>() / errors.len() as f64
            },
        });
    }
    dataset.buckets = buckets;
}

fn subset_name(subset: &Subset) -> String {
    match (&subset.source, &subset.image_dir) {
        (SubsetSource::FineTuning { metadata_file }, _) => {
            format!("with metadata_file {}", metadata_file.display())
        }
        (_, Some(dir)) => format!("with image_dir {}", dir.display()),
        (_, None) => "without image_dir".into(),
    }
}

/// Checks that an image of `size` at `path` gets a bucket.
fn sized(path: &Path, size: Size, probe: &mut BucketManager) -> Result<Size> {
    if size.0 == 0 || size.1 == 0 {
        return Err(Error::bad_file(path, "image has a zero width or height"));
    }
    probe.place(size).ok_or_else(|| {
        Error::bad_file(
            path,
            format!(
                "{}x{} is smaller than one bucket_reso_steps square, so bucket_no_upscale gives \
                 it no bucket; remove it or upscale it",
                size.0, size.1
            ),
        )
    })?;
    Ok(size)
}

/// sd-scripts' DreamBooth `read_caption`: `<image stem><ext>`, else the face-crop name (a path
/// with 5 or more `_` pieces, less the last 4); the first line stripped, or with
/// `enable_wildcard` every non-empty line stripped, joined by newlines. `None` when no file.
fn read_caption(image: &Path, extension: &str, wildcard: bool) -> Result<Option<String>> {
    let direct = sidecar_path(image, extension);
    let mut candidates = vec![direct.clone()];
    let base = direct.to_string_lossy();
    let base = &base[..base.len() - extension.len()];
    let pieces: Vec<&str> = base.split('_').collect();
    if pieces.len() >= 5 {
        candidates.push(PathBuf::from(format!(
            "{}{extension}",
            pieces[..pieces.len() - 4].join("_")
        )));
    }
    for candidate in candidates {
        if !candidate.is_file() {
            continue;
        }
        let text = read_text(&candidate)?;
        if text.is_empty() {
            return Err(Error::bad_file(
                &candidate,
                "caption file is empty (sd-scripts stops on it); write a caption or delete the file",
            ));
        }
        return Ok(Some(if wildcard {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            first_line(&text).to_string()
        }));
    }
    Ok(None)
}

fn dreambooth_candidates(
    subset: &Subset,
    probe: &mut BucketManager,
    tag_frequency: &mut TagFrequency,
    group: &mut ResolvedGroup,
) -> Result<Vec<Candidate>> {
    let SubsetSource::DreamBooth {
        class_tokens,
        caption_extension,
        ..
    } = &subset.source
    else {
        return Ok(Vec::new());
    };
    let Some(dir) = &subset.image_dir else {
        return Ok(Vec::new());
    };
    if !dir.is_dir() {
        group
            .warnings
            .push(format!("{}: not a folder", dir.display()));
        return Ok(Vec::new());
    }
    let found = list_images(dir, false)?;
    for path in &found.not_files {
        group
            .failures
            .push((path.clone(), crate::dataset::not_a_file(path)));
    }
    let read: Vec<Result<(Option<String>, Size)>> = found
        .images
        .par_iter()
        .map(|path| {
            let caption = read_caption(path, caption_extension, subset.enable_wildcard)?;
            let size = match path.to_str() {
                Some(_) => imaging::image_size(path, false)?,
                None => {
                    return Err(Error::bad_file(
                        path,
                        "the path is not valid UTF-8 and cannot be an image key; rename it",
                    ))
                }
            };
            Ok((caption, size))
        })
        .collect();
    let mut candidates = Vec::new();
    let mut missing = 0usize;
    for (path, result) in found.images.iter().zip(read) {
        let checked = result.and_then(|(caption, size)| Ok((caption, sized(path, size, probe)?)));
        match checked {
            Ok((caption, size)) => {
                let caption = caption.unwrap_or_else(|| {
                    missing += 1;
                    class_tokens.clone().unwrap_or_default()
                });
                candidates.push(Candidate {
                    key: path.to_string_lossy().into_owned(),
                    path: path.clone(),
                    caption,
                    metadata_caption: None,
                    tags: None,
                    size,
                });
            }
            Err(error) => group.failures.push((path.clone(), error)),
        }
    }
    if missing > 0 {
        group.warnings.push(format!(
            "{}: {missing} image(s) without a {caption_extension} caption file use {}",
            dir.display(),
            match class_tokens {
                Some(tokens) => format!("the class tokens {tokens:?}"),
                None => "an empty caption (no class tokens)".into(),
            }
        ));
    }
    let folder = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let captions: Vec<&str> = candidates.iter().map(|c| c.caption.as_str()).collect();
    tag_frequency.add(&folder, &captions);
    Ok(candidates)
}

/// Entries of a fine-tune metadata file in file order: `(key, entry)`.
fn read_metadata_entries(file: &Path) -> Result<Vec<(String, Map<String, Value>)>> {
    if !file.is_file() {
        return Err(Error::bad_file(
            file,
            "metadata file not found (metadata_file / --in_json)",
        ));
    }
    if file.to_string_lossy().ends_with(".jsonl") {
        let text = read_text(file)?;
        let mut entries = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let value: Value = serde_json::from_str(line).map_err(|e| {
                Error::bad_file(file, format!("line {}: not valid JSON: {e}", n + 1))
            })?;
            let Some(key) = value.get("image_path").and_then(Value::as_str) else {
                return Err(Error::bad_file(
                    file,
                    format!("line {}: no \"image_path\" string", n + 1),
                ));
            };
            let mut entry = Map::new();
            entry.insert(
                "caption".into(),
                value.get("caption").cloned().unwrap_or(json!("")),
            );
            for field in ["image_size", "tags"] {
                if let Some(v) = value.get(field) {
                    entry.insert(field.into(), v.clone());
                }
            }
            entries.push((key.to_string(), entry));
        }
        return Ok(entries);
    }
    match pyjson::read_document(file)? {
        Value::Object(map) => map
            .into_iter()
            .map(|(key, value)| match value {
                Value::Object(entry) => Ok((key, entry)),
                _ => Err(Error::bad_file(
                    file,
                    format!("entry {key:?} is not an object"),
                )),
            })
            .collect(),
        _ => Err(Error::bad_file(
            file,
            "metadata JSON must be an object keyed by image",
        )),
    }
}

/// A fine-tune entry before its image size is known.
struct Prepared {
    key: String,
    path: PathBuf,
    caption: String,
    metadata_caption: Option<String>,
    tags: Option<String>,
    size: Option<Size>,
}

fn fine_tuning_candidates(
    subset: &Subset,
    metadata_file: &Path,
    probe: &mut BucketManager,
    tag_frequency: &mut TagFrequency,
    group: &mut ResolvedGroup,
) -> Result<Vec<Candidate>> {
    let mut entries = read_metadata_entries(metadata_file)?;
    // Longest key first (stable for ties), as sd-scripts matches cache files by prefix.
    entries.sort_by_key(|(key, _)| std::cmp::Reverse(key.chars().count()));
    let separator = subset.caption_separator.as_str();
    let prepared: Vec<Prepared> = entries
        .into_iter()
        .map(|(key, entry)| {
            let path = if Path::new(&key).is_absolute() {
                PathBuf::from(&key)
            } else {
                match &subset.image_dir {
                    Some(dir) => dir.join(&key),
                    None => {
                        return Err(Error::bad_file(
                            metadata_file,
                            format!(
                                "key {key:?} is a relative path: give image_dir \
                                 (--train_data_dir) to resolve it"
                            ),
                        ))
                    }
                }
            };
            let text = |field: &str| entry.get(field).and_then(Value::as_str).map(str::to_string);
            let (metadata_caption, tags) = (text("caption"), text("tags"));
            let caption = if subset.enable_wildcard {
                wildcard_caption(&entry, separator)
            } else {
                training_caption(&entry, separator).unwrap_or_default()
            };
            let size = match entry.get("image_size") {
                None | Some(Value::Null) => None,
                Some(value) => Some(metadata_size(value).ok_or_else(|| {
                    Error::bad_file(
                        metadata_file,
                        format!("entry {key:?}: image_size must be [width, height], not {value}"),
                    )
                })?),
            };
            Ok(Prepared {
                key,
                path,
                caption,
                metadata_caption,
                tags,
                size,
            })
        })
        .collect::<Result<_>>()?;
    let sizes: Vec<Result<Size>> = prepared
        .par_iter()
        .map(|entry| match entry.size {
            Some(size) => Ok(size),
            None => imaging::image_size(&entry.path, false),
        })
        .collect();
    let mut candidates = Vec::new();
    let mut tag_lists: Vec<String> = Vec::new();
    for (entry, size) in prepared.into_iter().zip(sizes) {
        let Prepared {
            key,
            path,
            caption,
            metadata_caption,
            tags,
            ..
        } = entry;
        match size.and_then(|size| sized(&path, size, probe)) {
            Ok(size) => {
                if let Some(tags) = &tags {
                    if subset.enable_wildcard {
                        tag_lists.push(tags.replace('\n', separator));
                    } else if !tags.is_empty() {
                        tag_lists.push(tags.clone());
                    }
                }
                candidates.push(Candidate {
                    key,
                    path,
                    caption,
                    metadata_caption,
                    tags,
                    size,
                });
            }
            Err(error) => group.failures.push((path, error)),
        }
    }
    let name = metadata_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lists: Vec<&str> = tag_lists.iter().map(String::as_str).collect();
    tag_frequency.add(&name, &lists);
    Ok(candidates)
}

/// The fine-tune caption with `enable_wildcard`: tags (newlines turned into the separator)
/// appended to every non-empty caption line.
fn wildcard_caption(entry: &Map<String, Value>, separator: &str) -> String {
    let caption = entry.get("caption").and_then(Value::as_str).unwrap_or("");
    match entry.get("tags").and_then(Value::as_str) {
        None => caption.to_string(),
        Some(tags) => {
            let tags = tags.replace('\n', separator);
            caption
                .split('\n')
                .filter(|line| !line.trim().is_empty())
                .map(|line| format!("{line}{separator}{tags}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
    }
}

fn metadata_size(value: &Value) -> Option<Size> {
    let pair = value.as_array()?;
    let side = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match pair.as_slice() {
        [w, h] => Some((side(w)?, side(h)?)),
        _ => None,
    }
}
