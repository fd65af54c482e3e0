//! `prepare-latents`: bucket every image, resize and centre-crop it, encode it with the VAE and
//! cache the latents as `<stem>_<WWWW>x<HHHH>_sd.npz` (sd-scripts' current cache format, see
//! docs/kohya-compat.md#latent-cache-files), then write the metadata JSON with `train_resolution`
//! added (docs/kohya-compat.md#legacy-latent-caches).
//!
//! Every cache file stores the content key that produced it (image bytes, VAE weights, bucket,
//! resize, crop, dtype, flip/alpha flags, seed, format version) and the hash of its image; a
//! re-run encodes only the images whose key changed. Where sd-scripts' name holds the cache of
//! other settings, the cache goes to its keyed location under `.lorakit/latents/`
//! ([`crate::formats::latent_cache`]), so preparations at several settings coexist; `--prune`
//! removes the caches the written metadata does not use.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::dataset::bucket::{BucketManager, BucketSettings, Placement};
use crate::dataset::find_images;
use crate::dataset::imaging::{self, DecodeOptions};
use crate::dataset::shard::Shard;
use crate::formats::bookkeeping::LORAKIT_DIR;
use crate::formats::latent_cache::{
    keyed_path, may_replace, parse_cache_name, read_latent_cache, CacheName, LatentSpec, KEYED_DIR,
};
use crate::formats::manifest::{InputRecord, Manifest};
use crate::formats::metadata::{check_unique_keys, image_key};
use crate::formats::metadata::{load_input_metadata, EntrySubset};
use crate::formats::npz::{self, NpzReader, NpzWriter};
use crate::formats::schema::METADATA_V1;
use crate::infra::hashing::{self, KeyBuilder};
use crate::infra::report::{Progress, Summary};
use crate::models::precision::MixedPrecision;
use crate::models::tune_process_for_models;
use crate::models::vae::VaeEncoder;
use crate::models::{Checkpoint, Component, ComputeDevice, ModelFamily};
use crate::{Error, Result};

/// Tool and content-key stage name.
pub const STAGE: &str = "prepare-latents";
/// Version of the cache layout and key recipe; bump it to invalidate every cache file.
const FORMAT_VERSION: u32 = 1;

/// Everything `prepare-latents` needs.
#[derive(Debug, Clone)]
pub struct LatentOptions {
    /// Folder with the training images.
    pub train_data_dir: PathBuf,
    /// Metadata JSON to read.
    pub in_json: PathBuf,
    /// Metadata JSON to write (with `train_resolution`).
    pub out_json: PathBuf,
    /// Model checkpoint (its family decides `_sd` / `_sdxl`; its VAE is used unless `vae`).
    pub model: PathBuf,
    /// A separate VAE file or folder.
    pub vae: Option<PathBuf>,
    /// Bucket settings.
    pub buckets: BucketSettings,
    /// Images per VAE call.
    pub batch_size: usize,
    /// VAE precision.
    pub precision: MixedPrecision,
    /// `--device`: where the VAE runs.
    pub device: ComputeDevice,
    /// Metadata keys are full image paths.
    pub full_path: bool,
    /// Also cache latents of the horizontally flipped image.
    pub flip_aug: bool,
    /// Also cache the alpha channel as a loss mask.
    pub alpha_mask: bool,
    /// Accept existing valid cache files that carry no (or another) content key.
    pub skip_existing: bool,
    /// Search sub-folders.
    pub recursive: bool,
    /// Decompression-bomb limits and EXIF handling.
    pub decode: DecodeOptions,
    /// Seed of the latent samples.
    pub seed: u64,
    /// Write cache files here (keeping sub-folders) instead of beside the images.
    pub cache_dir: Option<PathBuf>,
    /// Re-encode everything.
    pub force: bool,
    /// After the run, delete the latent caches (ours only) in the images' cache folders that no
    /// entry of the written metadata uses.
    pub prune: bool,
    /// `--shard i/n`: encode only this part of the images; the metadata JSON written holds this
    /// shard's entries only, under a shard-named path ([`Shard::output_path`]).
    pub shard: Shard,
    /// Hide progress.
    pub quiet: bool,
}

/// One image on its way to the cache.
struct Planned {
    key: String,
    image: PathBuf,
    placement: Placement,
    /// Where its cache is (up to date) or goes: `sd_scripts` or `keyed`.
    cache_path: PathBuf,
    /// sd-scripts' name of its cache ([`cache_path`]).
    sd_scripts: PathBuf,
    /// Its keyed location under `.lorakit/latents/` ([`keyed_path`]).
    keyed: PathBuf,
    /// BLAKE3 of the image bytes, recorded in the cache.
    image_hash: String,
    /// Whether the cache also holds the flipped image's latents.
    flip_aug: bool,
    content_key: String,
}

/// Pixels ready for the VAE: the cropped RGB bucket image (HWC) and the optional alpha mask.
struct Prepared {
    rgb: Vec<u8>,
    alpha: Option<Vec<f32>>,
}

/// Runs the stage; per-image problems become failures in the returned summary.
pub fn prepare_latents(options: &LatentOptions) -> Result<Summary> {
    if options.recursive && !options.full_path {
        return Err(Error::Usage(
            "--recursive requires --full_path (stem keys of subfolders would collide)".into(),
        ));
    }
    if options.batch_size == 0 {
        return Err(Error::Usage("--batch_size must be at least 1".into()));
    }
    if options.prune && options.shard != Shard::ALL {
        return Err(Error::Usage(
            "--prune cannot be combined with --shard: a shard sees only its own images; prune \
             in an unsharded run (every cache is then up to date) after merge-shards"
                .into(),
        ));
    }
    let mut metadata = load_input_metadata(&options.in_json)?;
    let (mut discovery, dataset_buckets) =
        match listed_images(&options.in_json, &metadata, options.full_path)? {
            Some((listed, buckets)) => (listed, Some(buckets)),
            None => (
                find_images(&options.train_data_dir, options.recursive)?,
                None,
            ),
        };
    check_unique_keys(&discovery.images, options.full_path)?;
    // Keys of every shard's images (names only): an entry without an image is not mistaken
    // for one whose image another shard owns.
    let found: HashSet<String> = discovery
        .images
        .iter()
        .filter_map(|image| image_key(image, options.full_path).ok())
        .collect();
    let shard_record = options
        .shard
        .retain_images(&mut discovery, &options.train_data_dir);
    let (family, vae_source, vae_hash) = open_vae(options)?;
    let mut summary = Summary::default();
    for path in &discovery.not_files {
        summary.fail(path, &crate::dataset::not_a_file(path));
    }

    let sizes: Vec<Result<(u32, u32)>> = discovery
        .images
        .par_iter()
        .map(|image| imaging::image_size(image, options.decode.exif_transpose))
        .collect();
    let described = dataset_buckets.is_some();
    let mut managers = match dataset_buckets {
        Some(buckets) => {
            tracing::info!(
                "bucket settings of each of the {} dataset(s) prepare-dataset described (the \
                 command line's are not used)",
                buckets.managers.len()
            );
            buckets
        }
        None => DatasetBuckets::one(BucketManager::new(options.buckets)?),
    };
    let mut placed = Vec::new();
    for (image, size) in discovery.images.iter().zip(sizes) {
        let placed_item = size.and_then(|size| {
            let key = image_key(image, options.full_path)?;
            let manager = managers.of(&key);
            let placement = manager.place(size).ok_or_else(|| {
                Error::bad_file(
                    image,
                    format!(
                        "image {}x{} has a side shorter than --bucket_reso_steps {}: no bucket \
                         fits it; enlarge or remove it",
                        size.0,
                        size.1,
                        manager.settings().bucket_reso_steps
                    ),
                )
            })?;
            Ok((key, placement))
        });
        match placed_item {
            Ok((key, placement)) => placed.push((image.clone(), key, placement)),
            Err(error) => summary.fail(image, &error),
        }
    }
    managers.report(&placed);

    // An entry without an image belongs to the shard of its key.
    let orphan_here = |key: &str| !found.contains(key) && options.shard.contains(key);
    for (key, _) in metadata.iter() {
        if orphan_here(key) {
            summary.fail(
                Path::new(key),
                &Error::bad_file(
                    key,
                    "metadata entry has no readable image in train_data_dir; its entry is kept \
                     unchanged",
                ),
            );
        }
    }

    let planned: Vec<Result<(Planned, bool)>> = placed
        .into_par_iter()
        .map(|(image, key, placement)| {
            let flip_aug = options.flip_aug || managers.flipped.contains(&key);
            plan(
                options,
                family.latent_suffix(),
                &vae_hash,
                image,
                key,
                (placement, flip_aug),
            )
        })
        .collect();
    let mut to_encode = Vec::new();
    let mut ready = Vec::new();
    for result in planned {
        match result {
            Ok((item, true)) => {
                summary.up_to_date += 1;
                ready.push(item);
            }
            Ok((item, false)) => to_encode.push(item),
            Err(error) => summary.fail(error.path().unwrap_or(Path::new("?")), &error),
        }
    }
    tracing::info!(
        "{} images: {} up to date, {} to encode",
        ready.len() + to_encode.len(),
        ready.len(),
        to_encode.len()
    );
    if !to_encode.is_empty() {
        tune_process_for_models();
        let device = options.device.open(0)?;
        let dtype = options.precision.compute_dtype(&device);
        let encoder = VaeEncoder::load(&vae_source, dtype, &device)?;
        let encoded = encode_all(options, &encoder, to_encode, &mut summary);
        summary.done += encoded.len();
        let keyed = encoded.iter().filter(|i| i.cache_path == i.keyed).count();
        if keyed > 0 {
            tracing::info!(
                "{keyed} cache(s) written under {LORAKIT_DIR}/{KEYED_DIR}/: their sd-scripts names \
                 hold the caches of other settings (kept for the metadata made with those)"
            );
        }
        ready.extend(encoded);
    }

    let out_json = options.shard.output_path(&options.out_json);
    let mut parameters = parameters(options, family.name());
    if described {
        parameters["dataset_buckets"] = managers
            .managers
            .iter()
            .map(|manager| bucket_settings_json(manager.settings()))
            .collect();
    }
    let mut manifest = Manifest::new(STAGE, &out_json, METADATA_V1, parameters);
    if options.shard != Shard::ALL {
        let mine: HashSet<String> = discovery
            .images
            .iter()
            .filter_map(|image| image_key(image, options.full_path).ok())
            .collect();
        metadata.retain(|key| mine.contains(key) || orphan_here(key));
    }
    ready.sort_by(|a, b| a.image.cmp(&b.image));
    for item in &ready {
        let (w, h) = item.placement.train_resolution();
        metadata
            .entry_mut(&item.key)
            .insert("train_resolution".into(), json!([w, h]));
        manifest
            .items
            .insert(item.key.clone(), item.content_key.clone());
    }
    metadata.save(&out_json)?;
    if options.in_json != out_json {
        manifest.add_input_file("in_json", &options.in_json)?;
    }
    manifest.inputs.push(InputRecord {
        role: "vae".into(),
        path: Some(
            options
                .vae
                .as_ref()
                .unwrap_or(&options.model)
                .display()
                .to_string(),
        ),
        blake3: vae_hash,
        items: None,
    });
    manifest.summary = summary.clone();
    manifest.shard = shard_record;
    manifest.write_for(&out_json)?;
    if options.prune {
        prune(options, &discovery.images, &mut ready, &summary)?;
    }
    Ok(summary)
}

/// `--prune`: deletes the latent caches in the cache folders of `images` (sd-scripts names and
/// `.lorakit/latents/`) that no item of `ready` (every entry of the written metadata) uses,
/// printing each. Only files named like latent caches that hold `latents` and a lorakit content
/// key are touched. Afterwards a keyed cache whose sd-scripts name has become free moves there.
fn prune(
    options: &LatentOptions,
    images: &[PathBuf],
    ready: &mut [Planned],
    summary: &Summary,
) -> Result<()> {
    if !summary.failures.is_empty() {
        tracing::warn!(
            "--prune skipped: {} item(s) failed, and their caches may still be wanted; fix them \
             and run again",
            summary.failures.len()
        );
        return Ok(());
    }
    let in_use: HashSet<&Path> = ready.iter().map(|i| i.cache_path.as_path()).collect();
    let folders: std::collections::BTreeSet<PathBuf> = images
        .iter()
        .map(|image| cache_folder(image, &options.train_data_dir, options.cache_dir.as_deref()))
        .flat_map(|folder| [folder.join(LORAKIT_DIR).join(KEYED_DIR), folder])
        .collect();
    let mut removed = 0usize;
    for folder in &folders {
        let keyed_folder = folder.ends_with(Path::new(LORAKIT_DIR).join(KEYED_DIR));
        let Ok(entries) = std::fs::read_dir(folder) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in names {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let ours_by_name = match parse_cache_name(&name) {
                Some(CacheName::Keyed { .. }) => keyed_folder,
                Some(CacheName::SdScripts { .. }) => !keyed_folder,
                None => false,
            };
            if !ours_by_name || in_use.contains(path.as_path()) || !path.is_file() {
                continue;
            }
            let ours = NpzReader::open(&path)
                .is_ok_and(|mut r| r.contains("latents") && npz::stored_key(&mut r).is_some());
            if !ours {
                continue;
            }
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            println!("pruned {}", path.display());
            removed += 1;
        }
    }
    tracing::info!("--prune: removed {removed} latent cache(s) no metadata entry uses");
    for item in ready.iter_mut() {
        settle(item)?;
    }
    Ok(())
}

/// Moves a keyed cache to its sd-scripts name when [`may_replace`] allows it, so the
/// sd-scripts layout holds a cache wherever no other settings' cache occupies the name.
fn settle(item: &mut Planned) -> Result<()> {
    if item.cache_path != item.keyed
        || !may_replace(&item.sd_scripts, &item.content_key, &item.image_hash)
    {
        return Ok(());
    }
    std::fs::rename(&item.keyed, &item.sd_scripts).map_err(|e| {
        Error::bad_file(
            &item.keyed,
            format!("cannot move it to {}: {e}", item.sd_scripts.display()),
        )
    })?;
    tracing::info!(
        "moved {} to its sd-scripts name {}",
        item.keyed.display(),
        item.sd_scripts.display()
    );
    item.cache_path = item.sd_scripts.clone();
    Ok(())
}

/// The images of a metadata file prepare-dataset wrote: its keys, absolute paths that may lie in
/// several folders (training and regularisation images); `None` for other metadata, whose
/// images are found in `train_data_dir`.
fn listed_images(
    in_json: &Path,
    metadata: &crate::formats::metadata::Metadata,
    full_path: bool,
) -> Result<Option<(crate::dataset::Discovery, DatasetBuckets)>> {
    let Some(manifest) = Manifest::read_for(in_json)?
        .filter(|manifest| manifest.tool == crate::stages::prepare_dataset::STAGE)
    else {
        return Ok(None);
    };
    if !full_path {
        return Err(Error::Usage(format!(
            "{} was written by prepare-dataset: its keys are image paths, so give --full_path",
            in_json.display()
        )));
    }
    let mut listed = crate::dataset::Discovery::default();
    for (key, _) in metadata.iter() {
        let path = PathBuf::from(key);
        if path.is_file() {
            listed.images.push(path);
        } else if path.exists() {
            listed.not_files.push(path);
        }
    }
    listed.images.sort();
    let buckets = DatasetBuckets::described(in_json, &manifest, metadata)?;
    Ok(Some((listed, buckets)))
}

/// The bucket managers images are placed with: one from the command line, or one per dataset
/// that prepare-dataset described (its resolution and bucket settings, as sd-scripts buckets
/// each dataset of a `--dataset_config` on its own), with the dataset of each metadata key.
struct DatasetBuckets {
    managers: Vec<BucketManager>,
    dataset_of: HashMap<String, usize>,
    /// Keys of the entries whose `--dataset_config` subset sets `flip_aug`.
    flipped: HashSet<String>,
}

impl DatasetBuckets {
    /// Every image bucketed with `manager`.
    fn one(manager: BucketManager) -> Self {
        DatasetBuckets {
            managers: vec![manager],
            dataset_of: HashMap::new(),
            flipped: HashSet::new(),
        }
    }

    /// The datasets of prepare-dataset's `manifest` (its `parameters.datasets`) and the dataset
    /// index of each entry of `metadata` (its `lorakit_subset.dataset`).
    fn described(
        in_json: &Path,
        manifest: &Manifest,
        metadata: &crate::formats::metadata::Metadata,
    ) -> Result<Self> {
        let bad = |what: String| {
            Error::bad_file(
                in_json,
                format!("{what}; run prepare-dataset again to rewrite it"),
            )
        };
        let datasets = manifest.parameters["datasets"]
            .as_array()
            .ok_or_else(|| bad("its manifest lists no datasets".into()))?;
        let mut managers = Vec::new();
        for (index, dataset) in datasets.iter().enumerate() {
            let number = |name: &str| -> Result<u32> {
                dataset[name]
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(format!("dataset {index} of its manifest has no `{name}`")))
            };
            let resolution = match dataset["resolution"].as_array().map(Vec::as_slice) {
                Some([w, h]) => (
                    w.as_u64().unwrap_or(0) as u32,
                    h.as_u64().unwrap_or(0) as u32,
                ),
                _ => {
                    return Err(bad(format!(
                        "dataset {index} of its manifest has no resolution"
                    )))
                }
            };
            let manager = if dataset["enable_bucket"].as_bool() == Some(true) {
                BucketManager::new(BucketSettings {
                    max_resolution: resolution,
                    min_bucket_reso: number("min_bucket_reso")?,
                    max_bucket_reso: number("max_bucket_reso")?,
                    bucket_reso_steps: number("bucket_reso_steps")?,
                    no_upscale: dataset["bucket_no_upscale"].as_bool() == Some(true),
                })?
            } else {
                BucketManager::fixed(resolution)?
            };
            managers.push(manager);
        }
        let mut dataset_of = HashMap::new();
        let mut flipped = HashSet::new();
        // A config file's subsets flip as they say (sd-scripts applies them per subset).
        let from_config = manifest.parameters["dataset_config"].is_string();
        for (key, entry) in metadata.iter() {
            if from_config && EntrySubset::of(entry).is_some_and(|subset| subset.flip_aug) {
                flipped.insert(key.to_string());
            }
            let index = entry
                .get("lorakit_subset")
                .and_then(|subset| subset["dataset"].as_u64())
                .map(|d| d as usize)
                .filter(|d| *d < managers.len())
                .ok_or_else(|| {
                    bad(format!(
                        "entry {key:?} names no dataset of its manifest (lorakit_subset.dataset)"
                    ))
                })?;
            dataset_of.insert(key.to_string(), index);
        }
        Ok(DatasetBuckets {
            managers,
            dataset_of,
            flipped,
        })
    }

    /// The manager the image of metadata key `key` is placed with.
    fn of(&mut self, key: &str) -> &mut BucketManager {
        let index = self.dataset_of.get(key).copied().unwrap_or(0);
        &mut self.managers[index]
    }

    /// Logs each manager's bucket statistics.
    fn report(&self, placed: &[(PathBuf, String, Placement)]) {
        for (index, manager) in self.managers.iter().enumerate() {
            let mine: Vec<_> = placed
                .iter()
                .filter(|(_, key, _)| self.dataset_of.get(key).copied().unwrap_or(0) == index)
                .cloned()
                .collect();
            if self.managers.len() > 1 {
                tracing::info!("dataset {index}:");
            }
            report_buckets(manager, &mine);
        }
    }
}

/// The model's family (it names the cache files), the checkpoint the VAE is read from
/// (`--vae` or the model) and the hash of the VAE weights that goes into every content key.
pub fn open_vae(options: &LatentOptions) -> Result<(ModelFamily, Checkpoint, String)> {
    let model = Checkpoint::open(&options.model)?;
    let family = model.family();
    let vae_source = match &options.vae {
        Some(path) => Checkpoint::open(path)?,
        None => model,
    };
    let vae_hash = vae_source.component_hash(Component::Vae)?;
    Ok((family, vae_source, vae_hash))
}

/// Logs the bucket statistics sd-scripts prints (images per bucket, mean |aspect error|).
fn report_buckets(manager: &BucketManager, placed: &[(PathBuf, String, Placement)]) {
    for bucket in manager.used_sorted() {
        let count = placed.iter().filter(|(_, _, p)| p.bucket == bucket).count();
        tracing::info!("bucket {}x{}: {count} images", bucket.0, bucket.1);
    }
    if !placed.is_empty() {
        let mean =
            placed.iter().map(|(_, _, p)| p.ar_error.abs()).sum::<f64>() / placed.len() as f64;
        tracing::info!("mean aspect-ratio error: {mean:.4}");
    }
}

/// Bucket settings as the manifest records them.
fn bucket_settings_json(settings: &BucketSettings) -> Value {
    json!({
        "max_resolution": [settings.max_resolution.0, settings.max_resolution.1],
        "min_bucket_reso": settings.min_bucket_reso,
        "max_bucket_reso": settings.max_bucket_reso,
        "bucket_reso_steps": settings.bucket_reso_steps,
        "bucket_no_upscale": settings.no_upscale,
    })
}

fn parameters(options: &LatentOptions, family: &str) -> Value {
    let buckets = &options.buckets;
    json!({
        "train_data_dir": options.train_data_dir.display().to_string(),
        "model_family": family,
        "max_resolution": [buckets.max_resolution.0, buckets.max_resolution.1],
        "min_bucket_reso": buckets.min_bucket_reso,
        "max_bucket_reso": buckets.max_bucket_reso,
        "bucket_reso_steps": buckets.bucket_reso_steps,
        "bucket_no_upscale": buckets.no_upscale,
        "mixed_precision": options.precision.dtype_name(),
        "full_path": options.full_path,
        "flip_aug": options.flip_aug,
        "alpha_mask": options.alpha_mask,
        "recursive": options.recursive,
        "seed": options.seed,
        "cache_dir": options.cache_dir.as_ref().map(|d| d.display().to_string()),
    })
}

/// The folder of `image`'s cache files: its own folder, or its subfolder of `cache_dir`.
pub fn cache_folder(image: &Path, train_data_dir: &Path, cache_dir: Option<&Path>) -> PathBuf {
    let parent = image.parent().unwrap_or(Path::new(""));
    match cache_dir {
        None => parent.to_path_buf(),
        Some(dir) => dir.join(parent.strip_prefix(train_data_dir).unwrap_or(Path::new(""))),
    }
}

/// The sd-scripts name of `image`'s cache file: `<stem>_<WWWW>x<HHHH>_<suffix>.npz` in its
/// [`cache_folder`].
pub fn cache_path(
    image: &Path,
    original: (u32, u32),
    suffix: &str,
    train_data_dir: &Path,
    cache_dir: Option<&Path>,
) -> PathBuf {
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    let name = format!("{stem}_{:04}x{:04}_{suffix}.npz", original.0, original.1);
    cache_folder(image, train_data_dir, cache_dir).join(name)
}

/// Both locations of `image`'s cache with `content_key`: sd-scripts' name ([`cache_path`]) and
/// the keyed one ([`keyed_path`]) in the same cache folder.
pub fn cache_locations(
    image: &Path,
    original: (u32, u32),
    suffix: &str,
    content_key: &str,
    train_data_dir: &Path,
    cache_dir: Option<&Path>,
) -> (PathBuf, PathBuf) {
    let sd_scripts = cache_path(image, original, suffix, train_data_dir, cache_dir);
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    let folder = sd_scripts.parent().unwrap_or(Path::new(""));
    let keyed = keyed_path(folder, &stem, content_key, suffix);
    (sd_scripts, keyed)
}

/// Computes an image's content key and whether a cache file of it, at sd-scripts' name or at
/// its keyed location, is already up to date; if not, where the new one goes (sd-scripts' name
/// unless that holds another setting's cache of this image, see [`may_replace`]).
fn plan(
    options: &LatentOptions,
    suffix: &str,
    vae_hash: &str,
    image: PathBuf,
    key: String,
    (placement, flip_aug): (Placement, bool),
) -> Result<(Planned, bool)> {
    let image_hash = hashing::hash_file(&image)?;
    let content_key = content_key(options, vae_hash, &image_hash, &placement, flip_aug);
    let (sd_scripts, keyed) = cache_locations(
        &image,
        placement.original,
        suffix,
        &content_key,
        &options.train_data_dir,
        options.cache_dir.as_deref(),
    );
    let mut item = Planned {
        key,
        image,
        placement,
        cache_path: sd_scripts.clone(),
        sd_scripts,
        keyed,
        image_hash,
        flip_aug,
        content_key,
    };
    if !options.force {
        for location in [item.sd_scripts.clone(), item.keyed.clone()] {
            item.cache_path = location;
            let current = cache_is_current(options, &item).unwrap_or_else(|error| {
                tracing::warn!("stale cache replaced: {error}");
                false
            });
            if current {
                settle(&mut item)?;
                return Ok((item, true));
            }
        }
    }
    item.cache_path = if may_replace(&item.sd_scripts, &item.content_key, &item.image_hash) {
        item.sd_scripts.clone()
    } else {
        item.keyed.clone()
    };
    Ok((item, false))
}

/// The content key of the cache file of an image whose bytes hash to `image_hash`, placed in
/// its bucket as `placement`, encoded by the VAE whose weights hash to `vae_hash`, with the
/// flipped image's latents when `flip_aug`.
pub fn content_key(
    options: &LatentOptions,
    vae_hash: &str,
    image_hash: &str,
    placement: &Placement,
    flip_aug: bool,
) -> String {
    let crop = placement.crop_offset();
    let mut builder = KeyBuilder::new(STAGE, FORMAT_VERSION);
    builder
        .text("image", image_hash)
        .text("vae", vae_hash)
        .text("bucket", &format!("{:?}", placement.bucket))
        .text("resized", &format!("{:?}", placement.resized))
        .text("crop", &format!("{crop:?}"))
        .text(
            "resize_filter",
            "sd-scripts: area when shrinking, else lanczos",
        )
        .text("decode", options.decode.key_text())
        .text("dtype", options.precision.dtype_name())
        .text("flip_aug", &flip_aug.to_string())
        .text("alpha_mask", &options.alpha_mask.to_string())
        .text("seed", &options.seed.to_string());
    builder.finish()
}

/// Whether the cache file can be kept: it carries `item`'s key (or, with `--skip_existing`, any
/// key) and passes [`read_latent_cache`], the check training loads it with. `Ok(false)`: missing
/// or made from other inputs; `Err`: unusable although its key matches (the reason).
fn cache_is_current(options: &LatentOptions, item: &Planned) -> Result<bool> {
    let mut reader = match NpzReader::open(&item.cache_path) {
        Ok(reader) => reader,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(false)
        }
        Err(error) => return Err(error),
    };
    let key_matches = npz::stored_key(&mut reader).as_deref() == Some(item.content_key.as_str());
    if !key_matches && !options.skip_existing {
        return Ok(false);
    }
    let (bw, bh) = item.placement.bucket;
    let spec = LatentSpec {
        bucket: Some((bw as usize, bh as usize)),
        flip_aug: item.flip_aug,
        alpha_mask: options.alpha_mask,
        complete: true,
    };
    match read_latent_cache(&mut reader, &spec) {
        Ok(_) => Ok(true),
        Err(error) if key_matches => Err(error),
        Err(_) => Ok(false),
    }
}

/// Batches of the same bucket (ordered by bucket area like sd-scripts), decoded and resized on
/// the thread pool while the previous batch runs through the VAE. Returns the items written.
fn encode_all(
    options: &LatentOptions,
    encoder: &VaeEncoder,
    mut items: Vec<Planned>,
    summary: &mut Summary,
) -> Vec<Planned> {
    items.sort_by(|a, b| {
        let area = |p: &Planned| p.placement.bucket.0 * p.placement.bucket.1;
        (area(a), a.placement.bucket, &a.image).cmp(&(area(b), b.placement.bucket, &b.image))
    });
    let mut batches: Vec<Vec<Planned>> = Vec::new();
    for item in items {
        match batches.last_mut() {
            Some(batch)
                if batch.len() < options.batch_size
                    && batch[0].placement.bucket == item.placement.bucket =>
            {
                batch.push(item)
            }
            _ => batches.push(vec![item]),
        }
    }
    let total = batches.iter().map(Vec::len).sum();
    let progress = Progress::new(STAGE, total, options.quiet);
    let mut written = Vec::new();
    std::thread::scope(|scope| {
        let (sender, receiver) = mpsc::sync_channel::<(Vec<Planned>, Vec<Result<Prepared>>)>(1);
        scope.spawn(move || {
            for batch in batches {
                let prepared = batch
                    .par_iter()
                    .map(|item| prepare_pixels(options, item))
                    .collect();
                if sender.send((batch, prepared)).is_err() {
                    break;
                }
            }
        });
        for (batch, prepared) in receiver {
            let mut ok_items = Vec::new();
            let mut ok_pixels = Vec::new();
            for (item, pixels) in batch.into_iter().zip(prepared) {
                match pixels {
                    Ok(pixels) => {
                        ok_items.push(item);
                        ok_pixels.push(pixels);
                    }
                    Err(error) => {
                        summary.fail(&item.image, &error);
                        progress.inc(1);
                    }
                }
            }
            if ok_items.is_empty() {
                continue;
            }
            match encode_batch(encoder, &ok_items, &ok_pixels) {
                Ok(results) => {
                    for (item, result) in ok_items.into_iter().zip(results) {
                        match result {
                            Ok(()) => written.push(item),
                            Err(error) => summary.fail(&item.image, &error),
                        }
                    }
                }
                Err(error) => {
                    for item in &ok_items {
                        summary.fail(&item.image, &error);
                    }
                }
            }
            progress.inc(ok_pixels.len() as u64);
        }
    });
    progress.finish();
    written
}

/// Decodes, resizes (area when shrinking, Lanczos otherwise) and centre-crops one image.
fn prepare_pixels(options: &LatentOptions, item: &Planned) -> Result<Prepared> {
    let loaded = imaging::open(&item.image, &options.decode)?;
    let placement = &item.placement;
    if loaded.original_size() != placement.original {
        return Err(Error::bad_file(
            &item.image,
            "image changed while being processed; run again",
        ));
    }
    let (rw, rh) = placement.resized;
    let (bw, bh) = placement.bucket;
    let (left, top) = placement.crop_offset();
    if options.alpha_mask {
        let rgba = loaded.to_rgba8();
        let resized = if (rw, rh) == placement.original {
            rgba
        } else {
            imaging::resize_sd_scripts(&rgba, rw, rh)
        };
        let cropped = image::imageops::crop_imm(&resized, left, top, bw, bh).to_image();
        let mut rgb = Vec::with_capacity(bw as usize * bh as usize * 3);
        let mut alpha = Vec::with_capacity(bw as usize * bh as usize);
        for pixel in cropped.pixels() {
            rgb.extend_from_slice(&pixel.0[..3]);
            alpha.push(f32::from(pixel.0[3]) / 255.0);
        }
        return Ok(Prepared {
            rgb,
            alpha: Some(alpha),
        });
    }
    let rgb = loaded.to_rgb8();
    let resized = if (rw, rh) == placement.original {
        rgb
    } else {
        imaging::resize_sd_scripts(&rgb, rw, rh)
    };
    let cropped = image::imageops::crop_imm(&resized, left, top, bw, bh).to_image();
    Ok(Prepared {
        rgb: cropped.into_raw(),
        alpha: None,
    })
}

/// The VAE input of one bucket image: NCHW float32, `x/255` then `(x - 0.5) / 0.5`.
fn vae_input(rgb: &[u8], (width, height): (u32, u32), flip: bool) -> Vec<f32> {
    let (w, h) = (width as usize, height as usize);
    let mut out = vec![0f32; 3 * w * h];
    for y in 0..h {
        for x in 0..w {
            let source = if flip { w - 1 - x } else { x };
            for c in 0..3 {
                let value = f32::from(rgb[(y * w + source) * 3 + c]) / 255.0;
                out[c * w * h + y * w + x] = (value - 0.5) / 0.5;
            }
        }
    }
    out
}

/// Encodes one batch and writes each item's cache file; the outer error fails the whole batch.
fn encode_batch(
    encoder: &VaeEncoder,
    items: &[Planned],
    pixels: &[Prepared],
) -> Result<Vec<Result<()>>> {
    let bucket = items[0].placement.bucket;
    let (bw, bh) = (bucket.0 as usize, bucket.1 as usize);
    // Each item's views (the image, and its mirror image when it flips), one after another.
    let views = |item: &Planned| if item.flip_aug { 2 } else { 1 };
    let first_view: Vec<usize> = (items.iter())
        .scan(0, |next, item| {
            let first = *next;
            *next += views(item);
            Some(first)
        })
        .collect();
    let total_views: usize = items.iter().map(views).sum();
    let mut input = Vec::with_capacity(total_views * 3 * bw * bh);
    for (item, prepared) in items.iter().zip(pixels) {
        input.extend(vae_input(&prepared.rgb, bucket, false));
        if item.flip_aug {
            input.extend(vae_input(&prepared.rgb, bucket, true));
        }
    }
    let input = Tensor::from_vec(input, (total_views, 3, bh, bw), &Device::Cpu)
        .map_err(|e| Error::Model(e.to_string()))?;
    let posterior = encoder.encode(&input)?;
    let to_vec = |t: &Tensor| -> Result<Vec<f32>> {
        t.flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| Error::Model(e.to_string()))
    };
    let means = to_vec(&posterior.mean)?;
    let stds = to_vec(&posterior.std)?;
    let channels = encoder.latent_channels();
    let latent_shape = [channels, bh / 8, bw / 8];
    let per_view = channels * (bh / 8) * (bw / 8);
    Ok(items
        .iter()
        .zip(pixels)
        .enumerate()
        .map(|(index, (item, prepared))| {
            let mut writer = NpzWriter::new();
            let mut rng = rand::rngs::StdRng::seed_from_u64(sample_seed(&item.content_key));
            for view in 0..views(item) {
                let start = (first_view[index] + view) * per_view;
                let mean = &means[start..start + per_view];
                let std = &stds[start..start + per_view];
                if mean.iter().chain(std).any(|v| !v.is_finite()) {
                    return Err(Error::bad_file(
                        &item.image,
                        "the VAE produced NaN/Inf latents (try --mixed_precision no); nothing written",
                    ));
                }
                let sample: Vec<f32> = mean
                    .iter()
                    .zip(std)
                    .map(|(m, s)| m + s * standard_normal(&mut rng))
                    .collect();
                let name = if view == 0 { "latents" } else { "latents_flipped" };
                writer.add_f32(name, sample, &latent_shape)?;
                writer.add_f32(&format!("{name}_mean"), mean.to_vec(), &latent_shape)?;
                writer.add_f32(&format!("{name}_std"), std.to_vec(), &latent_shape)?;
            }
            let (ow, oh) = item.placement.original;
            writer.add_i64("original_size", vec![i64::from(ow), i64::from(oh)], &[2])?;
            writer.add_f64("crop_ltrb", item.placement.crop_ltrb().to_vec(), &[4])?;
            if let Some(alpha) = &prepared.alpha {
                writer.add_f32("alpha_mask", alpha.clone(), &[bh, bw])?;
            }
            npz::store_key(&mut writer, &item.content_key)?;
            npz::store_source(&mut writer, &item.image_hash)?;
            if let Some(dir) = item.cache_path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            writer.write(&item.cache_path)?;
            Ok(())
        })
        .collect())
}

/// The per-image sampling seed: taken from the content key (which includes `--seed`), so a
/// sample does not depend on batch order or on which other images are encoded.
fn sample_seed(content_key: &str) -> u64 {
    u64::from_str_radix(&content_key[..16], 16).unwrap_or(0)
}

/// One draw from N(0, 1) (Box–Muller).
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
