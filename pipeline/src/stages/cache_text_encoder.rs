//! The `cache-text-encoder` stage: every metadata entry's caption through the model's text
//! encoder(s), one `<image stem>_te_outputs.npz` per image, so training never loads a text
//! encoder.
//!
//! Files (format `lorakit.te_cache/v1`, see `schemas/te_cache.v1.schema.json` and
//! docs/formats.md#text-encoder-cache):
//! * SD1.x/SD2.x: `hidden_state` `[75n+2, D]` (float32, float16 under `--mixed_precision fp16`),
//!   `input_ids` int64 `[n, 77]`.
//! * SDXL: sd-scripts' `hidden_state1` `[75n+2, 768]`, `hidden_state2` `[75n+2, 1280]`,
//!   `pool2` `[1280]` (same dtypes rule), plus `input_ids1` / `input_ids2`.
//! * With `--variants N`: `variants_<array>` holding N augmented captions' outputs stacked on a
//!   new first axis (`variants_input_ids...` too).
//! * `lorakit_key`: uint8 bytes of the entry's content key (caption text, text-encoder weights,
//!   tokenizer files and every setting), so a re-run re-encodes only changed captions.
//!
//! Next to the metadata JSON (or in `--cache_dir`) an index `<in_json stem>_te_cache.json`
//! lists every entry's cache file and key, with its sidecar manifest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::dataset::shard::{Shard, ShardRecord};
use crate::formats::manifest::{InputRecord, Manifest};
use crate::formats::metadata::{ensure_in_dataset, resolve_image};
use crate::formats::metadata::{load_input_metadata, EntrySubset};
use crate::formats::model_family::ModelFamily;
use crate::formats::npz::{store_key, stored_key, NpzReader, NpzWriter};
use crate::formats::schema::{self, TE_CACHE_V1};
use crate::formats::te_cache::{output_names, read_cache_file, TeCacheSpec, CACHE_SUFFIX};
use crate::infra::hashing::KeyBuilder;
use crate::infra::report::{Progress, Summary};
use crate::models::clip::{apply_weights, encode_sd, encode_sdxl};
use crate::models::precision::MixedPrecision;
use crate::models::text_encoders::{load_text_encoders, paddings, TextEncoders};
use crate::models::ComputeDevice;
use crate::text::caption_text::{training_caption, CaptionAugmentation};
use crate::text::tokenize::{
    tokenizer_source, ClipTokenizer, MaxTokenLength, TokenChunks, TokenizerSource, CHUNK_LEN,
};
use crate::{infra::fsio, Error, Result};

/// Version of the cache-file layout, part of every content key.
pub const FORMAT_VERSION: u32 = 1;
const TOOL: &str = "cache-text-encoder";

/// The dtype the outputs are stored in: float16 under `--mixed_precision fp16` (as sd-scripts),
/// float32 otherwise (numpy has no bfloat16).
fn stored_dtype(precision: MixedPrecision) -> DType {
    match precision {
        MixedPrecision::Fp16 => DType::F16,
        _ => DType::F32,
    }
}

/// Options of `cache-text-encoder` (sd-scripts flag names).
#[derive(Debug, Clone)]
pub struct TeCacheOptions {
    /// Metadata JSON whose entries are encoded.
    pub in_json: PathBuf,
    /// Checkpoint file or diffusers folder.
    pub model: PathBuf,
    /// Folder with `vocab.json` + `merges.txt` (default: the model's `tokenizer/`).
    pub tokenizer: Option<PathBuf>,
    /// Folder that relative or stem metadata keys are resolved in.
    pub train_data_dir: Option<PathBuf>,
    /// Keys are image paths (`--full_path` metadata); stems are not looked up.
    pub full_path: bool,
    /// Write cache files here (named by image stem) instead of beside the images.
    pub cache_dir: Option<PathBuf>,
    /// `--clip_skip` (SD1/SD2; ignored with a warning for SDXL).
    pub clip_skip: Option<usize>,
    /// `--max_token_length`.
    pub max_token_length: MaxTokenLength,
    /// Captions per encoder call.
    pub batch_size: usize,
    /// `--mixed_precision`.
    pub mixed_precision: MixedPrecision,
    /// `--device`: where the encoders run.
    pub device: ComputeDevice,
    /// `--sdxl`: refuse models that are not SDXL.
    pub require_sdxl: bool,
    /// `--weighted_captions`: A1111 attention syntax.
    pub weighted_captions: bool,
    /// `--caption_separator` between caption and tags (and between tags for augmentation).
    pub caption_separator: String,
    /// `--variants N`: augmented versions per caption stored beside the plain one.
    pub variants: usize,
    /// Augmentation used for the variants.
    pub augmentation: CaptionAugmentation,
    /// `--seed` of the variants.
    pub seed: u64,
    /// Delete orphaned cache files.
    pub prune: bool,
    /// `--shard i/n`: encode only this part of the entries.
    pub shard: Shard,
    /// Hide progress.
    pub quiet: bool,
}

/// One metadata entry to cache.
struct Item {
    key: String,
    cache_path: PathBuf,
    caption: String,
    /// The entry's own augmentation (its `--dataset_config` subset's), else the command line's.
    augmentation: Option<CaptionAugmentation>,
    content_key: String,
}

/// What one caption text encodes to (before stacking variants).
struct Encoded {
    arrays: Vec<(&'static str, Tensor)>,
    ids: Vec<Vec<u32>>,
}

/// The text encoder(s) and tokenizer(s) of a model with sd-scripts' rules for turning captions
/// into UNet conditioning (clip skip, 75-token chunks, caption weights, SDXL's two encoders and
/// `pool2`): what cache-text-encoder stores, and what train-lora computes every step when it
/// trains the text encoder (with LoRA modules attached to the encoders' layers).
pub struct CaptionEncoder {
    /// The loaded encoders.
    pub encoders: TextEncoders,
    /// One tokenizer per encoder.
    pub tokenizers: Vec<ClipTokenizer>,
    /// The effective `--clip_skip` (SD1.x/SD2.x).
    pub clip_skip: usize,
    /// `--max_token_length`.
    pub max_len: MaxTokenLength,
    /// `--weighted_captions`.
    pub weighted: bool,
    /// Where the ids go.
    pub device: Device,
}

impl CaptionEncoder {
    /// Tokenises `text` with each encoder's tokenizer.
    pub fn tokenize(&self, text: &str) -> Result<Vec<TokenChunks>> {
        self.tokenizers
            .iter()
            .map(|t| {
                if self.weighted {
                    t.tokenize_weighted(text, self.max_len)
                } else {
                    t.tokenize(text, self.max_len)
                }
            })
            .collect()
    }

    fn ids_tensor(&self, batch: &[&[TokenChunks]], encoder: usize) -> Result<Tensor> {
        let chunks = self.max_len.chunks();
        let ids: Vec<u32> = batch
            .iter()
            .flat_map(|t| t[encoder].ids.iter().copied())
            .collect();
        Tensor::from_vec(ids, (batch.len(), chunks, CHUNK_LEN), &self.device)
            .map_err(|e| Error::Model(format!("token ids: {e}")))
    }

    /// The conditioning of a batch of tokenised captions, as sd-scripts names it:
    /// `hidden_state` `[B, 75n+2, D]` (SD1.x/SD2.x), or `hidden_state1`, `hidden_state2` and
    /// `pool2` (SDXL).
    pub fn conditioning(&self, batch: &[&[TokenChunks]]) -> Result<Vec<(&'static str, Tensor)>> {
        let weights = |encoder: usize, hidden: Tensor| -> Result<Tensor> {
            if !self.weighted {
                return Ok(hidden);
            }
            let values: Vec<f32> = batch
                .iter()
                .flat_map(|t| t[encoder].body_weights())
                .collect();
            let weights =
                Tensor::from_vec(values, (batch.len(), self.max_len.tokens()), &self.device)
                    .map_err(|e| Error::Model(format!("caption weights: {e}")))?;
            apply_weights(&hidden, &weights)
        };
        Ok(match self.encoders.family {
            ModelFamily::Sd1 | ModelFamily::Sd2 => {
                let hidden = encode_sd(
                    &self.encoders.encoders[0],
                    &self.ids_tensor(batch, 0)?,
                    self.clip_skip,
                )?;
                vec![("hidden_state", weights(0, hidden)?)]
            }
            ModelFamily::Sdxl => {
                let eos = self.tokenizers[1].eos_id();
                let out = encode_sdxl(
                    &self.encoders.encoders[0],
                    &self.encoders.encoders[1],
                    &self.ids_tensor(batch, 0)?,
                    &self.ids_tensor(batch, 1)?,
                    eos,
                )?;
                vec![
                    ("hidden_state1", weights(0, out.hidden_state1)?),
                    ("hidden_state2", weights(1, out.hidden_state2)?),
                    ("pool2", out.pool2),
                ]
            }
        })
    }
}

/// The caption encoder of one cache-text-encoder run and the dtype its files store.
struct Encoder {
    caption: CaptionEncoder,
    stored_dtype: DType,
}

impl std::ops::Deref for Encoder {
    type Target = CaptionEncoder;
    fn deref(&self) -> &CaptionEncoder {
        &self.caption
    }
}

impl Encoder {
    /// Encodes a batch of tokenised captions; one [`Encoded`] per caption.
    fn encode(&self, batch: &[&[TokenChunks]]) -> Result<Vec<Encoded>> {
        let named = self.caption.conditioning(batch)?;
        let to_store = |t: &Tensor, row: usize| -> candle_core::Result<Tensor> {
            t.get(row)?
                .to_dtype(self.stored_dtype)?
                .to_device(&Device::Cpu)
        };
        (0..batch.len())
            .map(|row| {
                let arrays = named
                    .iter()
                    .map(|(name, t)| Ok((*name, to_store(t, row)?)))
                    .collect::<candle_core::Result<Vec<_>>>()
                    .map_err(|e| Error::Model(format!("collecting outputs: {e}")))?;
                Ok(Encoded {
                    arrays,
                    ids: batch[row].iter().map(|t| t.ids.clone()).collect(),
                })
            })
            .collect()
    }
}

/// A run's text encoder(s), tokenizer(s) and the part of every entry's content key that does
/// not depend on the caption (weights, tokenizer files, every parameter).
pub struct LoadedRun {
    /// The loaded encoders (their family and weights hash included).
    pub encoders: TextEncoders,
    /// One tokenizer per encoder.
    pub tokenizers: Vec<ClipTokenizer>,
    /// Where each tokenizer was read from.
    pub tokenizer_dirs: Vec<TokenizerSource>,
    /// The effective `--clip_skip`.
    pub clip_skip: usize,
    /// Every parameter that changes the cache files' content.
    pub parameters: Value,
    /// Where the encoders run.
    pub device: Device,
    /// The content key so far; [`LoadedRun::entry_key`] adds the caption.
    settings: KeyBuilder,
}

impl LoadedRun {
    /// The content key of the cache file of a caption, augmented for its variants with
    /// `augmentation` when the entry has its own (else with the run's, part of its settings).
    pub fn entry_key(&self, caption: &str, augmentation: Option<&CaptionAugmentation>) -> String {
        let mut key = self.settings.clone();
        key.text("caption", caption);
        if let Some(augmentation) = augmentation {
            key.text("augmentation", &format!("{augmentation:?}"));
        }
        key.finish()
    }
}

/// Checks `options`, loads the text encoder(s) and tokenizer(s) and derives the run's key
/// settings; what `cache-text-encoder` does before encoding (and `lint-dataset` to find stale caches).
pub fn load_run(options: &TeCacheOptions) -> Result<LoadedRun> {
    check_options(options)?;
    crate::models::tune_process_for_models();
    let device = options.device.open(0)?;
    let dtype = options.mixed_precision.compute_dtype(&device);
    let mut encoders = load_text_encoders(&options.model, dtype, &device)?;
    encoders.use_inference_layout()?;
    let family = encoders.family;
    if options.require_sdxl && family != ModelFamily::Sdxl {
        return Err(Error::Usage(format!(
            "--sdxl given, but {} holds {} text encoders",
            options.model.display(),
            family.name()
        )));
    }
    let clip_skip = match (family, options.clip_skip) {
        (ModelFamily::Sdxl, Some(_)) => {
            tracing::warn!("--clip_skip is ignored for SDXL (sd-scripts does the same)");
            1
        }
        (ModelFamily::Sd2, Some(k)) => {
            tracing::warn!(
                "--clip_skip with an SD2 model: layer 23 already is SD2's penultimate layer"
            );
            k
        }
        (_, k) => k.unwrap_or(1),
    };
    let layers = encoders.encoders[0].config().num_hidden_layers;
    if clip_skip == 0 || clip_skip > layers {
        return Err(Error::Usage(format!(
            "--clip_skip must be between 1 and {layers} for this {}-layer text encoder, not {clip_skip}",
            layers
        )));
    }
    let tokenizer_dirs = tokenizer_dirs(options, family)?;
    let tokenizers = paddings(family)
        .iter()
        .zip(&tokenizer_dirs)
        .map(|(&padding, source)| ClipTokenizer::open(source, padding))
        .collect::<Result<Vec<_>>>()?;
    let tokenizer_hash = tokenizers
        .iter()
        .map(|t| t.files_hash().to_string())
        .collect::<Vec<_>>()
        .join("+");
    let parameters = run_parameters(options, family, clip_skip);
    let mut settings = KeyBuilder::new(TOOL, FORMAT_VERSION);
    settings
        .text("text_encoder_weights", &encoders.weights_hash)
        .text("tokenizer", &tokenizer_hash)
        .text("parameters", &parameters.to_string());
    Ok(LoadedRun {
        device,
        encoders,
        tokenizers,
        tokenizer_dirs,
        clip_skip,
        parameters,
        settings,
    })
}

/// Runs `cache-text-encoder`.
pub fn cache_text_encoder_outputs(options: &TeCacheOptions) -> Result<Summary> {
    check_options(options)?;
    let metadata = load_input_metadata(&options.in_json)?;
    // A config file's subsets bring their own caption settings (sd-scripts applies them per
    // subset); otherwise the command line's apply to every entry.
    let per_subset =
        crate::stages::prepare_dataset::dataset_config_behind(&options.in_json)?.is_some();
    let subset_augmentation = |entry: &serde_json::Map<String, Value>| {
        EntrySubset::of(entry)
            .filter(|_| per_subset)
            .map(|subset| CaptionAugmentation {
                shuffle: subset.shuffle_caption,
                keep_tokens: subset.keep_tokens,
                tag_dropout_rate: subset.caption_tag_dropout_rate,
                separator: subset.caption_separator,
            })
    };
    let any_subset_augments = (metadata.iter())
        .filter_map(|(_, entry)| subset_augmentation(entry))
        .any(|augmentation| !augmentation.is_identity());
    check_augmentation(options, per_subset.then_some(any_subset_augments))?;
    if let Some(dir) = &options.cache_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let run = load_run(options)?;
    let family = run.encoders.family;
    tracing::info!(
        "{} text encoder(s) of {}; {} metadata entries",
        family.name(),
        options.model.display(),
        metadata.len()
    );

    let mut summary = Summary::default();
    let mut items = Vec::new();
    let mut targets: HashMap<PathBuf, String> = HashMap::new();
    let mut without_text = 0usize;
    for (key, entry) in metadata.iter() {
        let mine = options.shard.contains(key);
        let cache_path = match cache_path_for(key, options) {
            Ok(path) => path,
            Err(error) => {
                if mine {
                    summary.fail(Path::new(key), &error);
                }
                continue;
            }
        };
        if let Some(first) = targets.insert(cache_path.clone(), key.clone()) {
            if mine {
                summary.fail(
                    Path::new(key),
                    &Error::bad_file(
                        &cache_path,
                        format!("entries {first:?} and {key:?} would share this cache file (same image stem); use distinct file names or no --cache_dir"),
                    ),
                );
            }
            continue;
        }
        if !mine {
            continue;
        }
        let caption = training_caption(entry, &options.caption_separator).unwrap_or_else(|| {
            without_text += 1;
            String::new()
        });
        let augmentation = subset_augmentation(entry);
        let content_key = run.entry_key(&caption, augmentation.as_ref());
        items.push(Item {
            key: key.clone(),
            cache_path,
            caption,
            augmentation,
            content_key,
        });
    }
    if without_text > 0 {
        tracing::warn!(
            "{without_text} entries have neither caption nor tags; encoded as empty captions"
        );
    }

    let spec = TeCacheSpec {
        family,
        sequence_len: Some(options.max_token_length.sequence_len()),
        dtype: Some(match stored_dtype(options.mixed_precision) {
            DType::F16 => "<f2",
            _ => "<f4",
        }),
        variants: Some(options.variants),
    };
    let stale: Vec<&Item> = items
        .iter()
        .filter(|item| !is_current(item, &spec))
        .collect();
    summary.up_to_date = items.len() - stale.len();

    let empty = Item {
        key: String::new(),
        cache_path: empty_caption_path(&options.in_json, options.cache_dir.as_deref()),
        caption: String::new(),
        augmentation: None,
        content_key: run.entry_key("", None),
    };
    let LoadedRun {
        encoders,
        tokenizers,
        tokenizer_dirs,
        clip_skip,
        parameters,
        device,
        ..
    } = run;
    let encoder = Encoder {
        caption: CaptionEncoder {
            encoders,
            tokenizers,
            clip_skip,
            max_len: options.max_token_length,
            weighted: options.weighted_captions,
            device,
        },
        stored_dtype: stored_dtype(options.mixed_precision),
    };
    let mut truncated = 0usize;
    let progress = Progress::new(TOOL, stale.len(), options.quiet);
    for batch in stale.chunks(options.batch_size.max(1)) {
        match encode_and_write(&encoder, options, batch) {
            Ok(outcomes) => {
                for (item, outcome) in batch.iter().zip(outcomes) {
                    match outcome {
                        Ok(cut) => {
                            truncated += usize::from(cut);
                            summary.done += 1;
                        }
                        Err(error) => summary.fail(&item.cache_path, &error),
                    }
                }
            }
            Err(error) => {
                for item in batch {
                    summary.fail(&item.cache_path, &error);
                }
            }
        }
        progress.inc(batch.len() as u64);
    }
    progress.finish();
    if truncated > 0 {
        tracing::warn!(
            "{truncated} caption(s) exceeded --max_token_length {} and were truncated (as sd-scripts does)",
            options.max_token_length.tokens()
        );
    }

    if !is_current(&empty, &spec) {
        if let Some(Err(error)) = encode_and_write(&encoder, options, &[&empty])?.pop() {
            return Err(error);
        }
    }
    report_orphans(options, &items, &targets)?;
    write_index(
        options,
        &parameters,
        &encoder,
        &tokenizer_dirs,
        &items,
        options.shard.record(metadata.iter().map(|(key, _)| key)),
        &summary,
    )?;
    Ok(summary)
}

fn check_options(options: &TeCacheOptions) -> Result<()> {
    if options.batch_size == 0 {
        return Err(Error::Usage("--batch_size must be at least 1".into()));
    }
    if !(0.0..=1.0).contains(&options.augmentation.tag_dropout_rate) {
        return Err(Error::Usage(
            "--caption_tag_dropout_rate must be between 0 and 1".into(),
        ));
    }
    Ok(())
}

/// Checks that `--variants` and the augmentation options go together. `subsets_augment` is
/// `Some` for metadata prepared from a `--dataset_config`: whether any subset shuffles or drops
/// tags, which then decides alone.
fn check_augmentation(options: &TeCacheOptions, subsets_augment: Option<bool>) -> Result<()> {
    let given = !options.augmentation.is_identity() || options.augmentation.keep_tokens > 0;
    if let Some(subsets_augment) = subsets_augment {
        if given {
            return Err(Error::Usage(format!(
                "{} was prepared from a --dataset_config: each subset's shuffle_caption / \
                 keep_tokens / caption_tag_dropout_rate apply (set them in the config file); \
                 leave those options out",
                options.in_json.display()
            )));
        }
        if options.variants == 0 && subsets_augment {
            tracing::warn!(
                "subsets of the dataset config behind {} shuffle captions or drop tags: without \
                 --variants N no caption variants are cached, and train-lora refuses those \
                 subsets",
                options.in_json.display()
            );
        }
        if options.variants > 0 && !subsets_augment {
            return Err(Error::Usage(format!(
                "--variants: no subset of the dataset config behind {} sets shuffle_caption or \
                 caption_tag_dropout_rate, so every variant would equal the caption; leave it out",
                options.in_json.display()
            )));
        }
        return Ok(());
    }
    let augmenting = !options.augmentation.is_identity();
    if options.variants > 0 && !augmenting {
        return Err(Error::Usage(
            "--variants needs --shuffle_caption and/or --caption_tag_dropout_rate (otherwise every variant equals the caption)".into(),
        ));
    }
    if options.variants == 0 && (augmenting || options.augmentation.keep_tokens > 0) {
        return Err(Error::Usage(
            "--shuffle_caption / --keep_tokens / --caption_tag_dropout_rate only apply to --variants N: a cached output cannot be re-shuffled per step".into(),
        ));
    }
    Ok(())
}

fn tokenizer_dirs(options: &TeCacheOptions, family: ModelFamily) -> Result<Vec<TokenizerSource>> {
    Ok(tokenizer_sources(
        &options.model,
        options.tokenizer.as_deref(),
        family,
    ))
}

/// Where each tokenizer of `model` is read from (`explicit`: a `--tokenizer` folder).
pub fn tokenizer_sources(
    model: &Path,
    explicit: Option<&Path>,
    family: ModelFamily,
) -> Vec<TokenizerSource> {
    let first = tokenizer_source(model, explicit);
    if first == TokenizerSource::BuiltIn {
        tracing::info!(
            "no tokenizer folder with {}: using the built-in CLIP vocabulary (--tokenizer DIR \
             chooses another)",
            model.display()
        );
    }
    if family != ModelFamily::Sdxl {
        return vec![first];
    }
    // SDXL's second tokenizer has the same vocabulary; diffusers folders ship it as tokenizer_2/.
    let second = [model.join("tokenizer_2")]
        .into_iter()
        .find(|dir| explicit.is_none() && dir.join("vocab.json").is_file())
        .map_or_else(|| first.clone(), TokenizerSource::Folder);
    vec![first, second]
}

/// Where the cache file of metadata entry `key` goes: in `--cache_dir`, else beside its image,
/// which must lie in `--train_data_dir` when one is given ([`ensure_in_dataset`]); without it,
/// a key with a `..` component is refused.
pub fn cache_path_for(key: &str, options: &TeCacheOptions) -> Result<PathBuf> {
    let stem_name = |path: &Path| {
        let mut name = path.file_stem().unwrap_or_default().to_os_string();
        name.push(CACHE_SUFFIX);
        name
    };
    if let Some(dir) = &options.cache_dir {
        return Ok(dir.join(stem_name(Path::new(key))));
    }
    let image = if options.full_path {
        let as_path = Path::new(key);
        let joined = options.train_data_dir.as_ref().map(|dir| dir.join(key));
        [Some(as_path.to_path_buf()), joined]
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
    } else {
        resolve_image(key, options.train_data_dir.as_deref())
    };
    let image = image.ok_or_else(|| {
        Error::bad_file(
            key,
            "image of this metadata entry not found, so its cache file has no place; pass --train_data_dir (stem or relative keys) or --cache_dir",
        )
    })?;
    match &options.train_data_dir {
        Some(dir) => ensure_in_dataset(key, &image, dir)?,
        // No dataset folder to compare with: a key that climbs out with `..` is still refused
        // (no stage writes such keys; an absolute --full_path key names its folder on purpose).
        None if Path::new(key)
            .components()
            .any(|c| c == std::path::Component::ParentDir) =>
        {
            return Err(Error::bad_file(
                key,
                "metadata key climbs out of its folder with `..`; nothing is written for it \
                 (fix or remove the entry, or pass --train_data_dir)",
            ))
        }
        None => {}
    }
    Ok(image.with_file_name(stem_name(&image)))
}

/// Whether the cache file of `item` is up to date: it carries the item's content key and passes
/// [`read_cache_file`] (the check training reads it with). A file with the right key that fails
/// the check is logged with the reason and encoded again.
fn is_current(item: &Item, spec: &TeCacheSpec) -> bool {
    let key = NpzReader::open(&item.cache_path)
        .ok()
        .and_then(|mut reader| stored_key(&mut reader));
    if key.as_deref() != Some(item.content_key.as_str()) {
        return false;
    }
    match read_cache_file(&item.cache_path, spec, &Device::Cpu) {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!("stale cache replaced: {error}");
            false
        }
    }
}

/// Tokenises, encodes and writes one batch of items. Per item: whether its caption was
/// truncated, or why it failed (tokenising or writing its file); the outer error (the encoder
/// failed) concerns the whole batch.
fn encode_and_write(
    encoder: &Encoder,
    options: &TeCacheOptions,
    batch: &[&Item],
) -> Result<Vec<Result<bool>>> {
    let variants = options.variants;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut tokens: Vec<Vec<TokenChunks>> = Vec::with_capacity(batch.len() * (1 + variants));
    let mut encoded_items = Vec::with_capacity(batch.len());
    for item in batch {
        let mut texts = vec![item.caption.clone()];
        let mut rng = rand::rngs::StdRng::seed_from_u64(variant_seed(options.seed, &item.key));
        let augmentation = item.augmentation.as_ref().unwrap_or(&options.augmentation);
        for _ in 0..variants {
            texts.push(augmentation.apply(&item.caption, &mut rng));
        }
        match texts
            .iter()
            .map(|text| encoder.tokenize(text))
            .collect::<Result<Vec<_>>>()
        {
            Ok(item_tokens) => {
                outcomes.push(Ok(item_tokens[0].iter().any(|c| c.truncated)));
                encoded_items.push((outcomes.len() - 1, *item));
                tokens.extend(item_tokens);
            }
            Err(error) => outcomes.push(Err(error)),
        }
    }
    let refs: Vec<&[TokenChunks]> = tokens.iter().map(Vec::as_slice).collect();
    let mut encoded = Vec::with_capacity(refs.len());
    for sub_batch in refs.chunks(options.batch_size.max(1)) {
        encoded.extend(encoder.encode(sub_batch)?);
    }
    for ((index, item), outputs) in encoded_items.into_iter().zip(encoded.chunks(1 + variants)) {
        if let Err(error) = write_cache_file(item, outputs, encoder.encoders.family) {
            outcomes[index] = Err(error);
        }
    }
    Ok(outcomes)
}

/// Seed of one entry's variants: independent of batch order and of the other entries.
fn variant_seed(seed: u64, key: &str) -> u64 {
    let digest = KeyBuilder::new("caption-variants", 1)
        .field("seed", &seed.to_le_bytes())
        .text("key", key)
        .finish();
    u64::from_str_radix(&digest[..16], 16).expect("hex digest")
}

/// Names of the token-id arrays per encoder.
fn ids_names(family: ModelFamily) -> &'static [&'static str] {
    match family {
        ModelFamily::Sdxl => &["input_ids1", "input_ids2"],
        _ => &["input_ids"],
    }
}

fn write_cache_file(item: &Item, outputs: &[Encoded], family: ModelFamily) -> Result<()> {
    let mut npz = NpzWriter::new();
    let (plain, variants) = outputs.split_first().expect("at least the plain caption");
    for (name, tensor) in &plain.arrays {
        npz.add_tensor(name, tensor)?;
    }
    let as_i64 = |ids: &[u32]| ids.iter().map(|&id| i64::from(id)).collect::<Vec<_>>();
    for (name, ids) in ids_names(family).iter().zip(&plain.ids) {
        npz.add_i64(name, as_i64(ids), &[ids.len() / CHUNK_LEN, CHUNK_LEN])?;
    }
    if !variants.is_empty() {
        for (index, (name, _)) in plain.arrays.iter().enumerate() {
            let stacked = Tensor::stack(
                &variants
                    .iter()
                    .map(|v| v.arrays[index].1.clone())
                    .collect::<Vec<_>>(),
                0,
            )
            .map_err(|e| Error::Model(format!("stacking variants: {e}")))?;
            npz.add_tensor(&format!("variants_{name}"), &stacked)?;
        }
        for (encoder, name) in ids_names(family).iter().enumerate() {
            let ids: Vec<u32> = variants
                .iter()
                .flat_map(|v| v.ids[encoder].iter().copied())
                .collect();
            let chunks = plain.ids[encoder].len() / CHUNK_LEN;
            npz.add_i64(
                &format!("variants_{name}"),
                as_i64(&ids),
                &[variants.len(), chunks, CHUNK_LEN],
            )?;
        }
    }
    store_key(&mut npz, &item.content_key)?;
    npz.write(&item.cache_path)
}

/// Every parameter that changes the cache files' content.
fn run_parameters(options: &TeCacheOptions, family: ModelFamily, clip_skip: usize) -> Value {
    json!({
        "family": family.name(),
        "clip_skip": clip_skip,
        "max_token_length": options.max_token_length.tokens(),
        "mixed_precision": options.mixed_precision.name(),
        "weighted_captions": options.weighted_captions,
        "caption_separator": options.caption_separator,
        "variants": options.variants,
        "shuffle_caption": options.augmentation.shuffle,
        "keep_tokens": options.augmentation.keep_tokens,
        "caption_tag_dropout_rate": options.augmentation.tag_dropout_rate,
        "seed": options.seed,
    })
}

/// Reports (and with `--prune` deletes) cache files in the output folders that no current
/// metadata entry owns. Temporary files of an interrupted write are not caches; lint-dataset
/// reports those.
fn report_orphans(
    options: &TeCacheOptions,
    items: &[Item],
    targets: &HashMap<PathBuf, String>,
) -> Result<()> {
    let folders: BTreeMap<PathBuf, ()> = match &options.cache_dir {
        Some(dir) => [(dir.clone(), ())].into(),
        None => items
            .iter()
            .filter_map(|item| item.cache_path.parent().map(|p| (p.to_path_buf(), ())))
            .collect(),
    };
    let mut orphans = Vec::new();
    for folder in folders.keys() {
        let Ok(entries) = std::fs::read_dir(folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_cache = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(CACHE_SUFFIX) && !n.starts_with(fsio::TEMP_PREFIX));
            if is_cache && !targets.contains_key(&path) {
                orphans.push(path);
            }
        }
    }
    if orphans.is_empty() {
        return Ok(());
    }
    orphans.sort();
    if options.prune {
        for path in &orphans {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
        tracing::info!("removed {} orphaned cache file(s) (--prune)", orphans.len());
    } else {
        tracing::warn!(
            "{} cache file(s) belong to no metadata entry (e.g. {}); --prune removes them",
            orphans.len(),
            orphans[0].display()
        );
    }
    Ok(())
}

/// The encoded empty caption of a run (what a caption dropped by `--caption_dropout_rate`
/// trains on): `<in_json stem>_te_cache_empty.npz` beside the index, in the cache file layout.
pub fn empty_caption_path(in_json: &Path, cache_dir: Option<&Path>) -> PathBuf {
    let mut name = in_json.file_stem().unwrap_or_default().to_os_string();
    name.push("_te_cache_empty.npz");
    index_path(in_json, cache_dir, Shard::ALL).with_file_name(name)
}

/// Where the index of a run is written: `<in_json stem>_te_cache.json` in `--cache_dir`, else
/// beside the metadata JSON; a sharded run writes `<in_json stem>_te_cache.shard-<i>-of-<n>.json`.
pub fn index_path(in_json: &Path, cache_dir: Option<&Path>, shard: Shard) -> PathBuf {
    let mut name = in_json.file_stem().unwrap_or_default().to_os_string();
    name.push("_te_cache.json");
    let whole = match cache_dir {
        Some(dir) => dir.join(name),
        None => in_json.with_file_name(name),
    };
    shard.output_path(&whole)
}

fn write_index(
    options: &TeCacheOptions,
    parameters: &Value,
    encoder: &Encoder,
    tokenizer_dirs: &[TokenizerSource],
    items: &[Item],
    shard: Option<ShardRecord>,
    summary: &Summary,
) -> Result<()> {
    let failed: HashSet<&str> = summary.failures.iter().map(|f| f.path.as_str()).collect();
    let family = encoder.encoders.family;
    let mut arrays = output_names(family).to_vec();
    arrays.extend(ids_names(family));
    let entries: serde_json::Map<String, Value> = items
        .iter()
        .filter(|item| !failed.contains(item.cache_path.display().to_string().as_str()))
        .map(|item| {
            (
                item.key.clone(),
                json!({"file": item.cache_path.display().to_string(), "key": item.content_key}),
            )
        })
        .collect();
    let index = json!({
        "schema": TE_CACHE_V1,
        "format_version": FORMAT_VERSION,
        "family": family.name(),
        "model": options.model.display().to_string(),
        "text_encoder_weights": encoder.encoders.weights_hash,
        "tokenizers": tokenizer_dirs.iter().zip(&encoder.tokenizers).map(|(source, t)| json!({
            "dir": source.describe(),
            "files_hash": t.files_hash(),
        })).collect::<Vec<_>>(),
        "parameters": parameters,
        "arrays": arrays,
        "entries": entries,
    });
    if let Err(problems) = schema::validate(TE_CACHE_V1, &index) {
        panic!("te_cache index does not follow its own schema: {problems}");
    }
    let path = index_path(
        &options.in_json,
        options.cache_dir.as_deref(),
        options.shard,
    );
    fsio::write_atomic(&path, &crate::infra::pyjson::document_bytes(&index))?;

    let mut manifest = Manifest::new(TOOL, &path, TE_CACHE_V1, parameters.clone());
    manifest.add_input_file("in_json", &options.in_json)?;
    manifest.inputs.push(InputRecord {
        role: "text_encoder_weights".into(),
        path: Some(options.model.display().to_string()),
        blake3: encoder.encoders.weights_hash.clone(),
        items: None,
    });
    for (source, tokenizer) in tokenizer_dirs.iter().zip(&encoder.tokenizers) {
        manifest.inputs.push(InputRecord {
            role: "tokenizer".into(),
            path: match source {
                TokenizerSource::Folder(dir) => Some(dir.display().to_string()),
                TokenizerSource::BuiltIn => None,
            },
            blake3: tokenizer.files_hash().to_string(),
            items: None,
        });
    }
    manifest.items = items
        .iter()
        .filter(|item| !failed.contains(item.cache_path.display().to_string().as_str()))
        .map(|item| (item.key.clone(), item.content_key.clone()))
        .collect();
    manifest.summary = summary.clone();
    manifest.shard = shard;
    manifest.write_for(&path)?;
    Ok(())
}
