//! Stale and orphaned cache files: the content key each cache stage would give an item today
//! (computed by the stages' own key functions) against the key recorded in its cache file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{finding, Code, Finding, LintOptions, Severity, SkippedCheck};
use crate::dataset::bucket::BucketManager;
use crate::dataset::shard::Shard;
use crate::formats::bookkeeping::LORAKIT_DIR;
use crate::formats::latent_cache::{holds_key, recorded_source, KEYED_DIR};
use crate::formats::metadata::load_input_metadata;
use crate::formats::npz::{stored_key, NpzReader};
use crate::formats::te_cache::CACHE_SUFFIX;
use crate::models::precision::MixedPrecision;
use crate::stages::cache_text_encoder::{self, TeCacheOptions};
use crate::stages::prepare_latents::{self, LatentOptions};
use crate::text::caption_text::{training_caption, CaptionAugmentation};
use crate::{dataset::imaging, infra::hashing, Result};

/// The model and the settings `prepare-latents` and `cache-text-encoder` ran with (their flags).
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Model checkpoint file or diffusers folder.
    pub model: PathBuf,
    /// Separate VAE given to `prepare-latents`.
    pub vae: Option<PathBuf>,
    /// `--cache_dir` of the cache stages (default: beside the images).
    pub cache_dir: Option<PathBuf>,
    /// Metadata keys are full image paths.
    pub full_path: bool,
    /// `--mixed_precision` of `prepare-latents`.
    pub latent_precision: MixedPrecision,
    /// `--mixed_precision` of `cache-text-encoder`.
    pub text_precision: MixedPrecision,
    /// `--flip_aug` of `prepare-latents`.
    pub flip_aug: bool,
    /// `--alpha_mask` of `prepare-latents`.
    pub alpha_mask: bool,
    /// `--seed` of `prepare-latents`.
    pub latent_seed: u64,
    /// `--clip_skip` of `cache-text-encoder`.
    pub clip_skip: Option<usize>,
    /// `--weighted_captions` of `cache-text-encoder`.
    pub weighted_captions: bool,
    /// `--caption_separator` of `cache-text-encoder`.
    pub caption_separator: String,
    /// `--seed` of `cache-text-encoder`.
    pub text_seed: u64,
}

/// One kind of cache checked against its expected keys.
struct KindResult {
    /// Cache files that exist where the stage would write them.
    checked: usize,
    /// `(cache file, what it belongs to)` whose recorded key differs from the expected one.
    stale: Vec<(PathBuf, String)>,
}

/// Checks every latent and text-encoder cache file against the key its stage would compute
/// now; reports stale files, files without a key, and cache files in the cache folders that no
/// image or metadata entry owns. `known` lists cache files other checks already reported.
pub(super) fn check_stale(
    options: &LintOptions,
    settings: Option<&CacheSettings>,
    images: &[PathBuf],
    caches: &[PathBuf],
    known: &HashSet<String>,
    findings: &mut Vec<Finding>,
    skipped: &mut Vec<SkippedCheck>,
) -> Result<()> {
    let Some(settings) = settings else {
        skipped.push(SkippedCheck {
            check: "stale_caches".into(),
            reason: "give --model (and the flags prepare-latents and cache-text-encoder ran with) to recompute every cache file's content key and find stale caches".into(),
        });
        return Ok(());
    };
    let mut owned: HashSet<PathBuf> = HashSet::new();
    let mut checked_kinds: Vec<&str> = Vec::new();
    match options.buckets {
        Some(_) => {
            let result = check_latents(options, settings, images, &mut owned, findings)?;
            report_stale(
                &result,
                "latent",
                "its image changed since the cache was written",
                "the VAE or a prepare-latents setting (--resolution and bucket flags, --mixed_precision, --flip_aug, --alpha_mask, --seed) differs from the run that wrote them",
                "prepare-latents",
                findings,
            );
            checked_kinds.push("latent");
        }
        None => skipped.push(SkippedCheck {
            check: "stale_latent_caches".into(),
            reason: "give --resolution (and the bucket flags prepare-latents ran with) to recompute the latent caches' keys".into(),
        }),
    }
    match &options.in_json {
        Some(in_json) => {
            if let Some(result) = check_text(options, settings, in_json, &mut owned, findings)? {
                report_stale(
                    &result,
                    "text-encoder",
                    "the caption or tags of its metadata entry changed since the cache was written",
                    "the text encoder, the tokenizer or a cache-text-encoder setting (--clip_skip, --max_token_length, --mixed_precision, --weighted_captions, --caption_separator) differs from the run that wrote them",
                    "cache-text-encoder",
                    findings,
                );
                checked_kinds.push("text-encoder");
            }
        }
        None => skipped.push(SkippedCheck {
            check: "stale_text_encoder_caches".into(),
            reason: "give --in_json (the metadata cache-text-encoder read) to recompute the text-encoder caches' keys".into(),
        }),
    }
    let mut candidates: Vec<PathBuf> = caches.to_vec();
    if let Some(dir) = &settings.cache_dir {
        candidates.extend(
            walkdir::WalkDir::new(dir)
                .into_iter()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_file())
                .map(|e| e.into_path())
                .filter(|p| p.extension().is_some_and(|e| e == "npz"))
                // Keyed latent caches: another setting's, checked by name and image hash.
                .filter(|p| !p.components().any(|c| c.as_os_str() == LORAKIT_DIR)),
        );
    }
    candidates.sort();
    candidates.dedup();
    for cache in candidates {
        if owned.contains(&cache) || known.contains(&cache.display().to_string()) {
            continue;
        }
        let is_text = cache
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(CACHE_SUFFIX));
        let kind = if is_text { "text-encoder" } else { "latent" };
        if checked_kinds.contains(&kind) {
            findings.push(finding(
                Severity::Warning,
                Code::OrphanedCache,
                &cache,
                format!("no {} owns this {kind} cache file under the given settings: never used; delete it (or re-run the stage, whose key check ignores it)",
                    if is_text { "metadata entry" } else { "image" }),
            ));
        }
    }
    Ok(())
}

/// The key recorded in a cache file: `Some(None)` when it has none, `None` when unreadable.
fn recorded_key(path: &Path) -> Option<Option<String>> {
    let mut reader = NpzReader::open(path).ok()?;
    Some(stored_key(&mut reader))
}

/// Compares one existing cache file with its expected key; returns whether it is stale.
fn compare(path: &Path, expected: &str, findings: &mut Vec<Finding>) -> bool {
    match recorded_key(path) {
        None => {
            findings.push(finding(
                Severity::Error,
                Code::StaleCache,
                path,
                "cannot be read as an npz archive (damaged or cut off): the stage re-creates it; training from it fails",
            ));
            false
        }
        Some(None) => {
            findings.push(finding(
                Severity::Info,
                Code::StaleCache,
                path,
                "records no content key (written by sd-scripts or another tool): whether it is current cannot be checked; re-run the stage to be sure",
            ));
            false
        }
        Some(Some(recorded)) => recorded != expected,
    }
}

fn check_latents(
    options: &LintOptions,
    settings: &CacheSettings,
    images: &[PathBuf],
    owned: &mut HashSet<PathBuf>,
    findings: &mut Vec<Finding>,
) -> Result<KindResult> {
    let buckets = options.buckets.expect("bucket settings given");
    let latent_options = LatentOptions {
        train_data_dir: options.train_data_dir.clone(),
        in_json: options.in_json.clone().unwrap_or_default(),
        out_json: options.in_json.clone().unwrap_or_default(),
        model: settings.model.clone(),
        vae: settings.vae.clone(),
        buckets,
        batch_size: 1,
        device: crate::models::ComputeDevice::Cpu,
        precision: settings.latent_precision,
        full_path: settings.full_path,
        flip_aug: settings.flip_aug,
        alpha_mask: settings.alpha_mask,
        skip_existing: false,
        recursive: options.recursive,
        decode: options.image,
        seed: settings.latent_seed,
        cache_dir: settings.cache_dir.clone(),
        force: false,
        prune: false,
        shard: crate::dataset::shard::Shard::ALL,
        quiet: true,
    };
    let (family, _, vae_hash) = prepare_latents::open_vae(&latent_options)?;
    let mut manager = BucketManager::new(buckets)?;
    let mut result = KindResult {
        checked: 0,
        stale: Vec::new(),
    };
    for image in images {
        let Ok(size) = imaging::image_size(image, options.image.exif_transpose) else {
            continue;
        };
        let Some(placement) = manager.place(size) else {
            continue;
        };
        let Ok(image_hash) = hashing::hash_file(image) else {
            continue;
        };
        let expected = prepare_latents::content_key(
            &latent_options,
            &vae_hash,
            &image_hash,
            &placement,
            latent_options.flip_aug,
        );
        let (cache, keyed) = prepare_latents::cache_locations(
            image,
            placement.original,
            family.latent_suffix(),
            &expected,
            &options.train_data_dir,
            settings.cache_dir.as_deref(),
        );
        owned.insert(cache.clone());
        if holds_key(&keyed, &expected) {
            result.checked += 1;
            continue;
        }
        if !cache.is_file() {
            continue;
        }
        if recorded_source(&cache).is_some_and(|source| source == image_hash)
            && !holds_key(&cache, &expected)
        {
            findings.push(finding(
                Severity::Info,
                Code::StaleCache,
                &cache,
                format!("holds the latents of image {} made with other prepare-latents settings (the image is unchanged, so the metadata made with those still trains from it); the settings given to lint have no cache for this image: prepare-latents with them writes one under {LORAKIT_DIR}/{KEYED_DIR}/", image.display()),
            ));
            continue;
        }
        result.checked += 1;
        if compare(&cache, &expected, findings) {
            result
                .stale
                .push((cache, format!("image {}", image.display())));
        }
    }
    Ok(result)
}

fn check_text(
    options: &LintOptions,
    settings: &CacheSettings,
    in_json: &Path,
    owned: &mut HashSet<PathBuf>,
    findings: &mut Vec<Finding>,
) -> Result<Option<KindResult>> {
    let Ok(metadata) = load_input_metadata(in_json) else {
        return Ok(None);
    };
    let text_options = TeCacheOptions {
        in_json: in_json.to_path_buf(),
        model: settings.model.clone(),
        tokenizer: options.tokenizer.clone(),
        train_data_dir: Some(options.train_data_dir.clone()),
        full_path: settings.full_path,
        cache_dir: settings.cache_dir.clone(),
        clip_skip: settings.clip_skip,
        max_token_length: options.max_token_length,
        batch_size: 1,
        mixed_precision: settings.text_precision,
        device: crate::models::ComputeDevice::Cpu,
        require_sdxl: false,
        weighted_captions: settings.weighted_captions,
        caption_separator: settings.caption_separator.clone(),
        variants: 0,
        augmentation: CaptionAugmentation {
            shuffle: false,
            keep_tokens: 0,
            tag_dropout_rate: 0.0,
            separator: settings.caption_separator.clone(),
        },
        seed: settings.text_seed,
        prune: false,
        shard: Shard::ALL,
        quiet: true,
    };
    let run = cache_text_encoder::load_run(&text_options)?;
    let mut result = KindResult {
        checked: 0,
        stale: Vec::new(),
    };
    for (key, entry) in metadata.iter() {
        let Ok(cache) = cache_text_encoder::cache_path_for(key, &text_options) else {
            continue;
        };
        owned.insert(cache.clone());
        if !cache.is_file() {
            continue;
        }
        result.checked += 1;
        let caption = training_caption(entry, &settings.caption_separator).unwrap_or_default();
        if compare(&cache, &run.entry_key(&caption, None), findings) {
            result
                .stale
                .push((cache, format!("metadata entry {key:?}")));
        }
    }
    Ok(Some(result))
}

/// One finding per stale file, saying which input most likely changed: when every checked
/// file of the kind is stale, the model or a setting; when only some are, their own input.
fn report_stale(
    result: &KindResult,
    kind: &str,
    input_changed: &str,
    settings_changed: &str,
    stage: &str,
    findings: &mut Vec<Finding>,
) {
    let all_stale = result.stale.len() == result.checked;
    for (cache, owner) in &result.stale {
        let why = if result.checked == 1 {
            format!("its input, the model or a setting changed since it was written ({input_changed}, or {settings_changed})")
        } else if all_stale {
            format!(
                "all {} {kind} caches are stale, so {settings_changed}",
                result.checked
            )
        } else {
            format!(
                "{input_changed} ({} of {} {kind} caches still match, so the model and the settings are the same)",
                result.checked - result.stale.len(),
                result.checked
            )
        };
        findings.push(finding(
            Severity::Warning,
            Code::StaleCache,
            cache,
            format!("stale {kind} cache of {owner}: its recorded content key differs from the one {stage} computes now: {why}; re-run {stage} (it re-encodes only stale items), or pass lint the settings the stage ran with"),
        ));
    }
}
