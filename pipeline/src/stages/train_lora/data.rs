//! Training data from caches only: the metadata JSON (`--in_json`), the latent caches
//! `<stem>_<WWWW>x<HHHH>_sd.npz` (SDXL: `_sdxl.npz`, docs/kohya-compat.md#latent-cache-files) and
//! the text-encoder caches `<stem>_te_outputs.npz`. SDXL batches also carry the add-embedding
//! input sd-scripts' `sdxl_train_network.py` builds: `pool2` and the size conditioning.
//! When the metadata's manifest comes from `prepare-latents`, each entry's latent cache is the
//! one recording the content key listed there (at sd-scripts' name or under
//! `.lorakit/latents/`, [`crate::formats::latent_cache`]), so metadata prepared at other
//! settings trains from its own caches. When `cache-text-encoder` wrote an index for the
//! metadata (`<in_json stem>_te_cache.json`), each text-encoder cache must record the key its
//! manifest lists: a cache another run (other settings or captions) replaced is refused.
//! Every entry is checked before training starts; all problems are reported together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::dataset::kohya::TagFrequency;
use crate::dataset::shard::Shard;
use crate::dataset::IMAGE_EXTENSIONS;
use crate::formats::latent_cache::{find_by_key, read_latent_cache, sd_scripts_caches, LatentSpec};
use crate::formats::manifest::Manifest;
use crate::formats::metadata::{load_input_metadata, EntrySubset};
use crate::formats::model_family::ModelFamily;
use crate::formats::npz::{stored_key, NpzReader};
use crate::formats::schema::TE_CACHE_V1;
use crate::formats::te_cache::{describe_width, read_cache_file, TeCacheSpec};
use crate::models::unet::{sdxl_vector, SIZE_VALUES};
use crate::stages::cache_text_encoder;
use crate::text::caption_text::{training_caption, CaptionAugmentation, DEFAULT_SEPARATOR};
use crate::{Error, Result};

/// One training image as cached tensors.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Metadata key.
    pub key: String,
    /// Unscaled VAE latents `[4, h, w]` (f32, CPU).
    pub latents: Tensor,
    /// Text-encoder hidden states `[75n+2, D]` (f32, CPU); SDXL: `hidden_state1` and
    /// `hidden_state2` joined along `D`, as sd-scripts joins them. Empty (`[0, 0]`) when the
    /// text encoder runs live ([`Sample::caption`]).
    pub context: Tensor,
    /// The caption text, when the text encoder is trained: encoded live every step (with the
    /// caption augmentation of [`CachedDataset::augmentation`]) instead of a cached context.
    pub caption: Option<String>,
    /// Live text encoder: the augmentation of the sample's `--dataset_config` subset (else the
    /// command line's, [`CachedDataset::augmentation`], applies).
    pub caption_augmentation: Option<CaptionAugmentation>,
    /// SDXL: the cached `pool2` `[P]` (f32, CPU).
    pub pool2: Option<Tensor>,
    /// The latent cache file `latents` was read from (named in messages).
    pub latent_cache: PathBuf,
    /// The text-encoder cache file `context` was read from (named in messages).
    pub text_cache: PathBuf,
    /// The image's alpha at latent resolution `[1, h, w]` (`--alpha_mask`), in `[0, 1]`.
    pub mask: Option<Tensor>,
    /// Latents of the horizontally flipped image (`--flip_aug`).
    pub latents_flipped: Option<Tensor>,
    /// Hidden states of augmented captions `[N, 75n+2, D]` (`cache-text-encoder --variants N`).
    pub context_variants: Option<Tensor>,
    /// SDXL: the `pool2` of each augmented caption `[N, P]`.
    pub pool2_variants: Option<Tensor>,
    /// Times the image is seen per epoch: its subset's `num_repeats` (prepare-dataset's
    /// `lorakit_subset`, regularisation images after sd-scripts' balancing), else
    /// `--dataset_repeats`.
    pub repeats: usize,
    /// A regularisation image.
    pub is_reg: bool,
    /// The image's `(width, height)` the latent cache records (`original_size`), when it does.
    pub original_size: Option<(u32, u32)>,
    /// The crop `[left, top, right, bottom]` the latent cache records (`crop_ltrb`), when it
    /// does.
    pub crop_ltrb: Option<[f64; 4]>,
    /// Index of the image's dataset (a `--dataset_config` can describe several).
    pub dataset: usize,
    /// The random changes training makes to the sample.
    pub augment: Augment,
}

/// The per-step random changes of one sample: the command line's, or with a `--dataset_config`
/// its subset's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Augment {
    /// Flip with probability 0.5 (`flip_aug`).
    pub flip: bool,
    /// Train on one of the cached caption variants (`shuffle_caption`, tag dropout).
    pub caption_variants: bool,
    /// `caption_dropout_rate`.
    pub caption_dropout_rate: f64,
    /// `caption_dropout_every_n_epochs` (0: never).
    pub caption_dropout_every_n_epochs: usize,
}

impl Augment {
    /// The probability of training on the empty caption in `epoch`.
    pub fn caption_dropout_at(&self, epoch: usize) -> f64 {
        let every_n = self.caption_dropout_every_n_epochs;
        if every_n > 0 && epoch % every_n == 0 {
            1.0
        } else {
            self.caption_dropout_rate
        }
    }
}

impl Sample {
    /// SDXL's six size values `[original height, original width, crop top, crop left, target
    /// height, target width]`, as sd-scripts' dataset derives them from a latent cache: the
    /// target is the bucket (the latents' size x 8), and for the flipped latents the crop's left
    /// edge is `target width - crop right`. Values are truncated to integers, as Python's
    /// `int()` does.
    pub fn size_values(&self, flipped: bool) -> Result<[i64; SIZE_VALUES]> {
        let (Some((width, height)), Some(crop)) = (self.original_size, self.crop_ltrb) else {
            return Err(Error::bad_file(
                &self.latent_cache,
                "has no original_size / crop_ltrb, which SDXL training is conditioned on; \
                 re-run prepare-latents with the SDXL checkpoint",
            ));
        };
        let (_, h, w) = self.latents.dims3()?;
        let (target_w, target_h) = (8 * w as i64, 8 * h as i64);
        let left = if flipped {
            target_w as f64 - crop[2]
        } else {
            crop[0]
        };
        Ok([
            height as i64,
            width as i64,
            crop[1] as i64,
            left as i64,
            target_h,
            target_w,
        ])
    }
}

/// One batch on the training device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Unscaled latents `[B, 4, h, w]`.
    pub latents: Tensor,
    /// Text-encoder hidden states `[B, T, D]`.
    pub context: Tensor,
    /// SDXL: the add-embedding input `[B, P + 1536]` (pool2 and the size conditioning,
    /// [`sdxl_vector`]).
    pub vector: Option<Tensor>,
    /// Loss masks `[B, 1, h, w]`, when the samples carry alpha masks.
    pub mask: Option<Tensor>,
    /// Per-sample loss weights `[B]` (`--prior_loss_weight` for regularisation images), when the
    /// batch holds one.
    pub loss_weights: Option<Tensor>,
    /// Live text encoder: each sample's caption after caption dropout and augmentation, to be
    /// encoded by the trained text encoder (then `context` is empty and `vector` unset).
    pub captions: Option<Vec<String>>,
    /// Live text encoder with SDXL: each sample's six size values (the add-embedding input
    /// besides the live `pool2`).
    pub sizes: Option<Vec<[i64; SIZE_VALUES]>>,
}

/// The seeds of one micro-batch's random choices (none for validation); which samples they
/// apply to, and with what rates, is each sample's [`Augment`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Draws {
    /// The training epoch (1-based), for `caption_dropout_every_n_epochs`.
    pub epoch: usize,
    /// Flips: a flipping sample uses its cached flipped latents (and mirrored mask) with
    /// probability 0.5.
    pub flip_seed: Option<u64>,
    /// Caption augmentation: the context is one of the sample's cached caption variants, drawn
    /// uniformly.
    pub variant_seed: Option<u64>,
    /// Caption dropout: the sample trains on the empty caption with its dropout probability.
    pub caption_dropout_seed: Option<u64>,
}

/// The cached training set, grouped into buckets by latent size.
#[derive(Debug, Clone)]
pub struct CachedDataset {
    /// All samples, in metadata order.
    pub samples: Vec<Sample>,
    /// Sample indices per bucket `(width, height)` in pixels.
    pub buckets: BTreeMap<(usize, usize), Vec<usize>>,
    /// Repeats per epoch of entries without their own (`--dataset_repeats`).
    pub repeats: usize,
    /// Where the images came from, as the LoRA metadata records it.
    pub dirs: DatasetDirs,
    /// Width of the text context of every sample.
    pub context_dim: usize,
    /// The encoded empty caption (caption dropout).
    pub empty_caption: Option<EncodedCaption>,
    /// The loss weight of regularisation images (`--prior_loss_weight`).
    pub prior_loss_weight: f32,
    /// The datasets of the `--dataset_config` the metadata was prepared from.
    pub config: Option<ConfigDatasets>,
    /// Live text encoder: the command line's per-step caption augmentation
    /// (`--shuffle_caption`, `--keep_tokens`, `--caption_tag_dropout_rate`), for samples
    /// without their own ([`Sample::caption_augmentation`]); drawn from [`Draws::variant_seed`].
    pub augmentation: Option<CaptionAugmentation>,
}

/// One caption's text-encoder outputs as training conditions on them.
#[derive(Debug, Clone)]
pub struct EncodedCaption {
    /// Hidden states `[75n+2, D]` (SDXL: both encoders' joined along `D`).
    pub context: Tensor,
    /// SDXL: `pool2` `[P]`.
    pub pool2: Option<Tensor>,
}

impl EncodedCaption {
    /// The outputs of a cache file's arrays (`hidden_state`, or SDXL's `hidden_state1`,
    /// `hidden_state2` and `pool2`) as f32, with a leading variant axis or without.
    pub fn from_arrays(arrays: &[Tensor]) -> Result<Self> {
        let arrays = (arrays.iter())
            .map(|a| a.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(match arrays.as_slice() {
            [hidden_state1, hidden_state2, pool2] => {
                let last = hidden_state1.rank() - 1;
                EncodedCaption {
                    context: Tensor::cat(&[hidden_state1, hidden_state2], last)?,
                    pool2: Some(pool2.clone()),
                }
            }
            _ => EncodedCaption {
                context: arrays[0].clone(),
                pool2: None,
            },
        })
    }
}

/// The datasets of a `--dataset_config` (prepare-dataset's record of them).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigDatasets {
    /// Images per batch of each dataset.
    pub batch_sizes: Vec<usize>,
    /// What sd-scripts saves as `ss_datasets` for them.
    pub sd_scripts_datasets: serde_json::Value,
}

impl ConfigDatasets {
    /// Reads prepare-dataset's record (its manifest parameters).
    fn from_record(in_json: &Path, record: &serde_json::Value) -> Result<Self> {
        let batch_sizes: Option<Vec<usize>> = record["datasets"].as_array().and_then(|datasets| {
            (datasets.iter())
                .map(|d| d["batch_size"].as_u64().map(|n| n as usize))
                .collect()
        });
        match batch_sizes {
            Some(batch_sizes) if !batch_sizes.is_empty() && !batch_sizes.contains(&0) => Ok(Self {
                batch_sizes,
                sd_scripts_datasets: record["sd_scripts_datasets"].clone(),
            }),
            _ => Err(Error::bad_file(
                in_json,
                "the prepare-dataset manifest behind it records no batch size per dataset; run \
                 prepare-dataset again",
            )),
        }
    }
}

impl CachedDataset {
    /// Loads every entry of `in_json`; images are resolved like sd-scripts (absolute keys as they
    /// are, relative keys under `train_data_dir`), and only their cache files are read. With
    /// `options`, every latent cache must hold the image's `alpha_mask` / `latents_flipped`.
    pub fn load(
        in_json: &Path,
        train_data_dir: Option<&Path>,
        repeats: usize,
        options: CacheOptions,
    ) -> Result<Self> {
        let metadata = load_input_metadata(in_json)?;
        let config = crate::stages::prepare_dataset::dataset_config_behind(in_json)?
            .map(|record| ConfigDatasets::from_record(in_json, &record))
            .transpose()?;
        let latent_keys = Manifest::read_for(in_json)?
            .filter(|manifest| manifest.tool == crate::stages::prepare_latents::STAGE)
            .map(|manifest| manifest.items)
            .unwrap_or_default();
        let text_index = cache_text_encoder::index_path(in_json, None, Shard::ALL);
        let text_keys = Manifest::read_for(&text_index)?
            .filter(|manifest| manifest.output_schema == TE_CACHE_V1)
            .map(|manifest| manifest.items)
            .unwrap_or_default();
        if metadata.is_empty() {
            return Err(Error::bad_file(
                in_json,
                "the metadata file has no entries; nothing to train on",
            ));
        }
        let mut samples = Vec::new();
        let mut problems = Vec::new();
        for (key, entry) in metadata.iter() {
            let base = cache_base(key, train_data_dir);
            let keys = CacheKeys {
                latent: latent_keys.get(key).map(String::as_str),
                text: text_keys
                    .get(key)
                    .map(|k| (k.as_str(), text_index.as_path())),
            };
            // A config file's subset settings win over the command line's, as in sd-scripts.
            let settings = config.as_ref().and_then(|_| EntrySubset::of(entry));
            let augment = match &settings {
                Some(subset) => Augment {
                    flip: subset.flip_aug,
                    caption_variants: subset.augments_captions(),
                    caption_dropout_rate: subset.caption_dropout_rate,
                    caption_dropout_every_n_epochs: subset.caption_dropout_every_n_epochs,
                },
                None => options.augment,
            };
            match load_sample(
                key,
                &base,
                entry.get("train_resolution"),
                keys,
                options,
                augment,
            ) {
                Ok(mut sample) => {
                    if options.live_captions {
                        // sd-scripts trains an entry without caption or tags on "".
                        let caption = training_caption(entry, DEFAULT_SEPARATOR);
                        sample.caption = Some(caption.unwrap_or_default());
                        sample.caption_augmentation =
                            settings.as_ref().map(|subset| CaptionAugmentation {
                                shuffle: subset.shuffle_caption,
                                keep_tokens: subset.keep_tokens,
                                tag_dropout_rate: subset.caption_tag_dropout_rate,
                                separator: subset.caption_separator.clone(),
                            });
                    }
                    let subset = entry.get("lorakit_subset");
                    let subset_repeats = subset.and_then(|s| s["num_repeats"].as_u64());
                    sample.repeats = subset_repeats.map_or(repeats, |n| n as usize);
                    sample.is_reg = subset.is_some_and(|s| s["is_reg"] == true);
                    sample.dataset = settings.map_or(0, |s| s.dataset);
                    samples.push(sample)
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        let dirs = DatasetDirs::of(in_json, &metadata, repeats);
        if !problems.is_empty() {
            return Err(Error::bad_file(
                in_json,
                format!(
                    "{} of {} entries cannot be trained on; run prepare-latents / cache-text-encoder for them (or remove them from the metadata):\n  {}",
                    problems.len(),
                    metadata.len(),
                    problems.join("\n  ")
                ),
            ));
        }
        let mut widths: BTreeMap<usize, Vec<&Path>> = BTreeMap::new();
        let mut lengths: BTreeMap<usize, Vec<&Path>> = BTreeMap::new();
        for sample in samples.iter().filter(|s| s.caption.is_none()) {
            let (tokens, width) = sample.context.dims2()?;
            widths.entry(width).or_default().push(&sample.text_cache);
            lengths.entry(tokens).or_default().push(&sample.text_cache);
        }
        if widths.len() > 1 {
            return Err(Error::bad_file(
                in_json,
                format!(
                    "the text-encoder caches have different widths, so they were made with \
                     different models: {}; re-run cache-text-encoder for every entry with the \
                     training checkpoint",
                    files_per_value(&widths, |width| describe_width(*width))
                ),
            ));
        }
        if lengths.len() > 1 {
            return Err(Error::bad_file(
                in_json,
                format!(
                    "the text-encoder caches hold different numbers of tokens: {}; re-run \
                     cache-text-encoder with one --max_token_length for all images",
                    files_per_value(&lengths, |tokens| format!("{tokens} tokens"))
                ),
            ));
        }
        let context_dim = widths.keys().next().copied().unwrap_or_default();
        if let Some(config) = &config {
            if let Some(sample) = (samples.iter()).find(|s| s.dataset >= config.batch_sizes.len()) {
                return Err(Error::bad_file(
                    in_json,
                    format!(
                        "entry {:?} names dataset {} of {} in its lorakit_subset; run \
                         prepare-dataset again",
                        sample.key,
                        sample.dataset,
                        config.batch_sizes.len()
                    ),
                ));
            }
        }
        let mut dataset = Self::from_samples(samples, repeats, dirs, context_dim)?;
        dataset.prior_loss_weight = options.prior_loss_weight;
        dataset.config = config;
        Ok(dataset)
    }

    /// A dataset of `samples` grouped into buckets.
    fn from_samples(
        samples: Vec<Sample>,
        repeats: usize,
        dirs: DatasetDirs,
        context_dim: usize,
    ) -> Result<Self> {
        let mut buckets: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
        for (i, s) in samples.iter().enumerate() {
            let (_, h, w) = s.latents.dims3()?;
            buckets.entry((w * 8, h * 8)).or_default().push(i);
        }
        Ok(Self {
            samples,
            buckets,
            repeats: repeats.max(1),
            dirs,
            context_dim,
            empty_caption: None,
            prior_loss_weight: 1.0,
            config: None,
            augmentation: None,
        })
    }

    /// Splits off `fraction` of the images (rounded; chosen by a shuffle seeded with `seed`) as
    /// a validation set without repeats (`--validation_split`). The two sets never share an
    /// image; `None` when the fraction rounds to no image.
    pub fn split_validation(self, fraction: f64, seed: u64) -> Result<(Self, Option<Self>)> {
        let total = self.samples.len();
        let count = (total as f64 * fraction).round() as usize;
        if count == 0 {
            return Ok((self, None));
        }
        if count >= total {
            return Err(Error::Usage(format!(
                "--validation_split {fraction}: leaves no training image of {total}"
            )));
        }
        let mut order: Vec<usize> = (0..total).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix(
            seed,
            0x0da1_1da7,
            0,
        )));
        let held_out: std::collections::BTreeSet<usize> =
            order[total - count..].iter().copied().collect();
        let (mut train, mut validation) = (Vec::new(), Vec::new());
        for (i, mut sample) in self.samples.into_iter().enumerate() {
            if held_out.contains(&i) {
                sample.repeats = 1;
                validation.push(sample);
            } else {
                train.push(sample);
            }
        }
        let context_dim = self.context_dim;
        let mut train = Self::from_samples(train, self.repeats, self.dirs, context_dim)?;
        train.prior_loss_weight = self.prior_loss_weight;
        train.config = self.config;
        Ok((
            train,
            Some(Self::from_samples(
                validation,
                1,
                DatasetDirs::default(),
                context_dim,
            )?),
        ))
    }

    /// Training images × repeats, regularisation images left out (sd-scripts'
    /// `num_train_images`).
    pub fn num_train_images(&self) -> usize {
        (self.samples.iter())
            .filter(|s| !s.is_reg)
            .map(|s| s.repeats)
            .sum()
    }

    /// Regularisation images, each counted once (sd-scripts' `num_reg_images` for the usual
    /// one repeat per regularisation folder).
    pub fn num_reg_images(&self) -> usize {
        self.samples.iter().filter(|s| s.is_reg).count()
    }

    /// Images × repeats in bucket `members` (sd-scripts' bucket length).
    pub fn bucket_len(&self, members: &[usize]) -> usize {
        members.iter().map(|&i| self.samples[i].repeats).sum()
    }

    /// The groups batches are cut from, with their batch size: each bucket's samples, split
    /// by dataset when a `--dataset_config` gives each dataset its own batch size (as
    /// sd-scripts batches each dataset on its own); `batch_size` otherwise.
    fn batch_groups(&self, batch_size: usize) -> Vec<(Vec<usize>, usize)> {
        let Some(config) = &self.config else {
            return (self.buckets.values())
                .map(|members| (members.clone(), batch_size))
                .collect();
        };
        let mut groups = Vec::new();
        for members in self.buckets.values() {
            let mut by_dataset: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for &i in members {
                by_dataset
                    .entry(self.samples[i].dataset)
                    .or_default()
                    .push(i);
            }
            for (dataset, members) in by_dataset {
                groups.push((members, config.batch_sizes[dataset]));
            }
        }
        groups
    }

    /// Number of batches in an epoch.
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        (self.batch_groups(batch_size).iter())
            .map(|(members, size)| self.bucket_len(members).div_ceil(*size))
            .sum()
    }

    /// The batches of `epoch` (1-based): each bucket's images × repeats shuffled and cut into
    /// batches, then the batch order shuffled; deterministic in `(seed, epoch)`.
    pub fn epoch_batches(&self, seed: u64, epoch: usize, batch_size: usize) -> Vec<Vec<usize>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, 0x5eed_da7a, epoch as u64));
        let mut batches = Vec::new();
        for (members, size) in self.batch_groups(batch_size) {
            let mut items: Vec<usize> = members
                .iter()
                .flat_map(|&i| std::iter::repeat_n(i, self.samples[i].repeats))
                .collect();
            items.shuffle(&mut rng);
            batches.extend(items.chunks(size).map(|c| c.to_vec()));
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// Stacks the latents, contexts and masks of `batch` on `device`, with the random choices of
    /// `draws` (none for validation).
    pub fn collate(&self, batch: &[usize], device: &Device, draws: &Draws) -> Result<Batch> {
        let mut rng = draws.flip_seed.map(rand::rngs::StdRng::seed_from_u64);
        let mut variant_rng = draws.variant_seed.map(rand::rngs::StdRng::seed_from_u64);
        let mut dropout_rng = draws
            .caption_dropout_seed
            .map(rand::rngs::StdRng::seed_from_u64);
        let (mut latents, mut contexts, mut masks) = (Vec::new(), Vec::new(), Vec::new());
        let (mut pools, mut sizes) = (Vec::new(), Vec::new());
        let (mut captions, mut live_sizes) = (Vec::new(), Vec::new());
        for &i in batch {
            let sample = &self.samples[i];
            let augment = &sample.augment;
            let dropout_rate = augment.caption_dropout_at(draws.epoch);
            // sd-scripts' order: caption dropout first (the empty caption), else the tags
            // shuffled / dropped.
            let dropped = match &mut dropout_rng {
                Some(rng) if dropout_rate > 0.0 => rng.random::<f64>() < dropout_rate,
                _ => false,
            };
            if let Some(caption) = &sample.caption {
                let augmentation = (sample.caption_augmentation.as_ref())
                    .or(self.augmentation.as_ref())
                    .filter(|_| augment.caption_variants);
                captions.push(match (augmentation, &mut variant_rng) {
                    _ if dropped => String::new(),
                    (Some(augmentation), Some(rng)) => augmentation.apply(caption, rng),
                    _ => caption.clone(),
                });
            }
            let dropped = match &self.empty_caption {
                Some(empty) if dropped => Some(empty.clone()),
                _ => None,
            };
            let caption = match (dropped, &mut variant_rng, &sample.context_variants) {
                (Some(empty), _, _) => empty,
                (None, Some(rng), Some(variants)) if augment.caption_variants => {
                    let index = rng.random_range(0..variants.dim(0)?);
                    EncodedCaption {
                        context: variants.get(index)?,
                        pool2: (sample.pool2_variants.as_ref())
                            .map(|pools| pools.get(index))
                            .transpose()?,
                    }
                }
                _ => EncodedCaption {
                    context: sample.context.clone(),
                    pool2: sample.pool2.clone(),
                },
            };
            let flipped = match (&mut rng, &sample.latents_flipped) {
                (Some(rng), Some(flipped)) if augment.flip => {
                    rng.random_bool(0.5).then_some(flipped)
                }
                _ => None,
            };
            if let Some(pool2) = caption.pool2 {
                pools.push(pool2);
                sizes.push(sample.size_values(flipped.is_some())?);
            }
            if sample.caption.is_some() {
                live_sizes.push(sample.size_values(flipped.is_some()).ok());
            }
            latents.push(flipped.unwrap_or(&sample.latents).clone());
            contexts.push(caption.context);
            masks.push(match (&sample.mask, flipped) {
                (Some(mask), Some(_)) => Some(mirror(mask)?),
                (mask, None) => mask.clone(),
                (None, Some(_)) => None,
            });
        }
        let masks: Option<Vec<Tensor>> = masks.into_iter().collect();
        let weights: Vec<f32> = (batch.iter())
            .map(|&i| match self.samples[i].is_reg {
                true => self.prior_loss_weight,
                false => 1.0,
            })
            .collect();
        let vector = if pools.is_empty() {
            None
        } else {
            Some(sdxl_vector(&Tensor::stack(&pools, 0)?, &sizes)?.to_device(device)?)
        };
        let live = !captions.is_empty();
        let context = match live {
            true => Tensor::zeros((batch.len(), 0, 0), DType::F32, device)?,
            false => Tensor::stack(&contexts, 0)?.to_device(device)?,
        };
        Ok(Batch {
            latents: Tensor::stack(&latents, 0)?.to_device(device)?,
            context,
            captions: live.then_some(captions),
            sizes: live_sizes.into_iter().collect(),
            vector,
            mask: match masks {
                Some(masks) => Some(Tensor::stack(&masks, 0)?.to_device(device)?),
                None => None,
            },
            loss_weights: weights
                .iter()
                .any(|&w| w != 1.0)
                .then(|| Tensor::new(weights.as_slice(), device))
                .transpose()?,
        })
    }
}

/// `tensor` mirrored along its last (width) axis.
fn mirror(tensor: &Tensor) -> Result<Tensor> {
    let width = tensor.dim(tensor.rank() - 1)?;
    let reversed: Vec<u32> = (0..width as u32).rev().collect();
    let index = Tensor::from_vec(reversed, width, tensor.device())?;
    Ok(tensor.index_select(&index, tensor.rank() - 1)?)
}

/// Which caches training reads, and which of their optional parts.
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    /// The base model's family: SDXL reads `_sdxl.npz` latents and both text encoders' outputs.
    pub family: ModelFamily,
    /// `alpha_mask` (`--alpha_mask`).
    pub alpha_mask: bool,
    /// The command line's per-step changes, for entries without a config file's subset
    /// settings; a flipping entry's cache must hold `latents_flipped`.
    pub augment: Augment,
    /// The text encoder is trained: read each entry's caption instead of its text-encoder
    /// cache.
    pub live_captions: bool,
    /// The loss weight of regularisation entries (`--prior_loss_weight`).
    pub prior_loss_weight: f32,
}

/// Mixes a seed with a stream id and a counter into an RNG seed.
pub fn mix(seed: u64, stream: u64, counter: u64) -> u64 {
    let mut z = seed ^ stream.rotate_left(17) ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// sd-scripts' `ss_dataset_dirs`, `ss_reg_dataset_dirs` and `ss_tag_frequency` of a training
/// metadata file.
#[derive(Debug, Clone, Default)]
pub struct DatasetDirs {
    /// `{folder: {"n_repeats", "img_count"}}` of the training images.
    pub dataset_dirs: serde_json::Map<String, serde_json::Value>,
    /// The same for regularisation images.
    pub reg_dataset_dirs: serde_json::Map<String, serde_json::Value>,
    /// `{folder: {tag: count}}`.
    pub tag_frequency: serde_json::Value,
}

impl DatasetDirs {
    /// Entries prepare-dataset wrote (`lorakit_subset.dataset_dir`) count under their folder, as
    /// sd-scripts counts the folder or metadata file they came from: the caption's pieces, or
    /// only the `tags` of a fine-tune subset's entries (`tags_from`), in metadata order; a
    /// folder sd-scripts does not list (`listed: false`) has its tags counted only. Other entries count under the metadata
    /// file's name, as sd-scripts' fine-tune path: their `tags` only, keys longest first, with
    /// `--dataset_repeats`.
    pub fn of(
        in_json: &Path,
        metadata: &crate::formats::metadata::Metadata,
        repeats: usize,
    ) -> Self {
        let mut dirs = DatasetDirs::default();
        let mut tags = TagFrequency::default();
        let mut plain = Vec::new();
        for (key, entry) in metadata.iter() {
            let subset = entry.get("lorakit_subset");
            let Some(dir) = subset.and_then(|s| s.get("dataset_dir")) else {
                plain.push((key, entry));
                continue;
            };
            let name = dir["name"].as_str().unwrap_or_default().to_string();
            let list = if subset.is_some_and(|s| s["is_reg"] == true) {
                &mut dirs.reg_dataset_dirs
            } else {
                &mut dirs.dataset_dirs
            };
            if dir["listed"] != false {
                list.entry(name.clone()).or_insert_with(|| {
                    serde_json::json!({"n_repeats": dir["n_repeats"], "img_count": dir["img_count"]})
                });
            }
            let text = match dir["tags_from"].as_str() {
                Some("tags") => entry.get("tags"),
                _ => entry.get("tags").or_else(|| entry.get("caption")),
            };
            tags.add(&name, &[text.and_then(|t| t.as_str()).unwrap_or_default()]);
        }
        if !plain.is_empty() {
            let name = in_json
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            plain.sort_by_key(|(key, _)| std::cmp::Reverse(key.chars().count()));
            let listed: Vec<&str> = (plain.iter())
                .filter_map(|(_, entry)| entry.get("tags").and_then(|t| t.as_str()))
                .filter(|t| !t.is_empty())
                .collect();
            tags.add(&name, &listed);
            dirs.dataset_dirs.insert(
                name,
                serde_json::json!({"n_repeats": repeats, "img_count": plain.len()}),
            );
        }
        dirs.tag_frequency = tags.to_json();
        dirs
    }
}

/// Image path without extension for a metadata key (the prefix of both cache files).
fn cache_base(key: &str, train_data_dir: Option<&Path>) -> PathBuf {
    let path = Path::new(key);
    let full = match train_data_dir {
        Some(dir) if !path.is_absolute() => dir.join(path),
        _ => path.to_path_buf(),
    };
    let is_image = full
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
    if is_image {
        full.with_extension("")
    } else {
        full
    }
}

/// The latent cache of the image `base` (its path without extension) for a model whose latent
/// caches end in `suffix` (`sd`, `sdxl`): the one recording `content_key` when it is known (from
/// the metadata's `prepare-latents` manifest) and found; otherwise the last of its
/// `<base>_<W>x<H>_<suffix>.npz` files, else legacy `<base>.npz`.
pub fn find_latent_cache(base: &Path, content_key: Option<&str>, suffix: &str) -> Option<PathBuf> {
    if let Some(found) = content_key.and_then(|key| find_by_key(base, key, suffix)) {
        return Some(found);
    }
    sd_scripts_caches(base, suffix).pop().or_else(|| {
        let legacy = base.with_extension("npz");
        legacy.is_file().then_some(legacy)
    })
}

/// `768 (SD1.x: CLIP ViT-L) in a_te_outputs.npz and 2 more files; ...`: the cache files
/// grouped by a value they differ in, each group named by its first file.
fn files_per_value<T>(groups: &BTreeMap<T, Vec<&Path>>, describe: impl Fn(&T) -> String) -> String {
    groups
        .iter()
        .map(|(value, files)| {
            let more = match files.len() - 1 {
                0 => String::new(),
                1 => " and 1 more file".into(),
                n => format!(" and {n} more files"),
            };
            format!("{} in {}{more}", describe(value), files[0].display())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The content keys an entry's caches must record, where the metadata's manifests list them.
#[derive(Debug, Clone, Copy)]
struct CacheKeys<'a> {
    /// From the metadata's `prepare-latents` manifest.
    latent: Option<&'a str>,
    /// From the manifest of the metadata's `cache-text-encoder` index, with the index's path.
    text: Option<(&'a str, &'a Path)>,
}

fn load_sample(
    key: &str,
    base: &Path,
    train_resolution: Option<&serde_json::Value>,
    keys: CacheKeys,
    options: CacheOptions,
    augment: Augment,
) -> Result<Sample> {
    let suffix = options.family.latent_suffix();
    let latent_path = find_latent_cache(base, keys.latent, suffix).ok_or_else(|| {
        Error::bad_file(
            base,
            format!(
                "entry {key:?}: no latent cache {}_WWWWxHHHH_{suffix}.npz",
                base.display()
            ),
        )
    })?;
    let bucket = train_resolution
        .and_then(|v| v.as_array())
        .and_then(|res| match res.as_slice() {
            [w, h] => Some((w.as_u64()? as usize, h.as_u64()? as usize)),
            _ => None,
        });
    let spec = LatentSpec {
        bucket,
        flip_aug: augment.flip,
        alpha_mask: options.alpha_mask,
        complete: false,
    };
    let mut reader = NpzReader::open(&latent_path)?;
    let arrays = read_latent_cache(&mut reader, &spec)?;
    let original_size = match reader.read_i64("original_size").map(|(size, _)| size) {
        Ok(size) => match size[..] {
            [w, h] => u32::try_from(w).ok().zip(u32::try_from(h).ok()),
            _ => None,
        },
        Err(_) => None,
    };
    let crop_ltrb = reader
        .read_f64("crop_ltrb")
        .or_else(|_| {
            let (values, shape) = reader.read_i64("crop_ltrb")?;
            Ok::<_, Error>((values.into_iter().map(|v| v as f64).collect(), shape))
        })
        .ok()
        .and_then(|(values, _)| <[f64; 4]>::try_from(values).ok());
    let [_, h, w] = arrays.shape;
    let latents = Tensor::from_vec(arrays.latents, arrays.shape.to_vec(), &Device::Cpu)?;
    let latents_flipped = arrays
        .latents_flipped
        .map(|flipped| Tensor::from_vec(flipped, arrays.shape.to_vec(), &Device::Cpu))
        .transpose()?;
    // The pixel-resolution mask averaged over each 8x8 block to the latents' `[1, h, w]` (the
    // "area" resize sd-scripts applies to the loss mask).
    let mask = arrays
        .alpha_mask
        .map(|mask| {
            Tensor::from_vec(mask, (1, 1, h * 8, w * 8), &Device::Cpu)?
                .avg_pool2d(8)?
                .reshape((1, h, w))
        })
        .transpose()?;
    let te_path = PathBuf::from(format!("{}_te_outputs.npz", base.display()));
    if options.live_captions {
        return Ok(Sample {
            key: key.to_string(),
            latents,
            context: Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?,
            caption: None,
            caption_augmentation: None,
            pool2: None,
            mask,
            latents_flipped,
            context_variants: None,
            pool2_variants: None,
            latent_cache: latent_path,
            text_cache: te_path,
            repeats: 1,
            is_reg: false,
            original_size,
            crop_ltrb,
            dataset: 0,
            augment,
        });
    }
    if !te_path.is_file() {
        return Err(Error::bad_file(
            &te_path,
            format!("entry {key:?}: text-encoder cache missing"),
        ));
    }
    if let Some((expected, index)) = keys.text {
        let recorded = NpzReader::open(&te_path)
            .ok()
            .and_then(|mut reader| stored_key(&mut reader));
        if recorded.as_deref() != Some(expected) {
            return Err(Error::bad_file(
                &te_path,
                format!(
                    "entry {key:?}: not the text-encoder cache {} lists for it (a \
                     cache-text-encoder run with other settings or captions replaced it); re-run \
                     cache-text-encoder with this metadata",
                    index.display()
                ),
            ));
        }
    }
    // SD 1.x and 2.x caches share one layout (a single `hidden_state`), so either family reads it.
    let cache_family = match options.family {
        ModelFamily::Sdxl => ModelFamily::Sdxl,
        _ => ModelFamily::Sd1,
    };
    let cached = read_cache_file(&te_path, &TeCacheSpec::any(cache_family), &Device::Cpu)?;
    let EncodedCaption { context, pool2 } = EncodedCaption::from_arrays(&cached.arrays)?;
    let variants = (cached.variants.as_deref())
        .map(EncodedCaption::from_arrays)
        .transpose()?;
    let (context_variants, pool2_variants) = match variants {
        Some(variants) => (Some(variants.context), variants.pool2),
        None => (None, None),
    };
    Ok(Sample {
        key: key.to_string(),
        latents,
        context,
        caption: None,
        caption_augmentation: None,
        pool2,
        mask,
        latents_flipped,
        context_variants,
        pool2_variants,
        latent_cache: latent_path,
        text_cache: te_path,
        repeats: 1,
        is_reg: false,
        original_size,
        crop_ltrb,
        dataset: 0,
        augment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SDXL sample whose plain caption, variants and the empty caption are told apart by
    /// their `pool2` (1.0, 10.0 + variant, -1.0) and contexts alike.
    fn sdxl_dataset(augment: Augment) -> CachedDataset {
        let cpu = &Device::Cpu;
        let filled = |value: f32, shape: &[usize]| Tensor::full(value, shape, cpu).unwrap();
        let variants = [10f32, 11.0, 12.0];
        let stack = |shape: &[usize]| {
            let each: Vec<Tensor> = variants.iter().map(|&v| filled(v, shape)).collect();
            Tensor::stack(&each, 0).unwrap()
        };
        let sample = Sample {
            key: "a".into(),
            latents: filled(0.0, &[4, 2, 2]),
            context: filled(1.0, &[77, 8]),
            caption: None,
            caption_augmentation: None,
            pool2: Some(filled(1.0, &[4])),
            latent_cache: "a.npz".into(),
            text_cache: "a_te_outputs.npz".into(),
            mask: None,
            latents_flipped: None,
            context_variants: Some(stack(&[77, 8])),
            pool2_variants: Some(stack(&[4])),
            repeats: 1,
            is_reg: false,
            original_size: Some((16, 16)),
            crop_ltrb: Some([0.0, 0.0, 16.0, 16.0]),
            dataset: 0,
            augment,
        };
        let mut dataset =
            CachedDataset::from_samples(vec![sample], 1, DatasetDirs::default(), 8).unwrap();
        dataset.empty_caption = Some(EncodedCaption {
            context: filled(-1.0, &[77, 8]),
            pool2: Some(filled(-1.0, &[4])),
        });
        dataset
    }

    /// The first value of a batch's context and of its pool2 (the vector's first columns).
    fn drawn(dataset: &CachedDataset, draws: &Draws) -> (f32, f32) {
        let batch = dataset.collate(&[0], &Device::Cpu, draws).unwrap();
        let context = batch
            .context
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let pool = batch
            .vector
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        (context, pool)
    }

    #[test]
    fn sdxl_draws_take_the_pool2_of_the_caption_they_train_on() {
        let seeds = |seed: u64| Draws {
            epoch: 1,
            flip_seed: Some(seed),
            variant_seed: Some(seed),
            caption_dropout_seed: Some(seed),
        };
        let plain = sdxl_dataset(Augment::default());
        assert_eq!(
            drawn(&plain, &seeds(1)),
            (1.0, 1.0),
            "no augmentation: the caption"
        );

        let varied = sdxl_dataset(Augment {
            caption_variants: true,
            ..Augment::default()
        });
        let picks: std::collections::BTreeSet<i32> = (0..32)
            .map(|seed| {
                let (context, pool) = drawn(&varied, &seeds(seed));
                assert_eq!(context, pool, "context and pool2 of the same variant");
                context as i32
            })
            .collect();
        assert_eq!(picks, [10, 11, 12].into(), "every variant is drawn");
        assert_eq!(drawn(&varied, &Draws::default()), (1.0, 1.0), "validation");

        let dropped = sdxl_dataset(Augment {
            caption_variants: true,
            caption_dropout_every_n_epochs: 1,
            ..Augment::default()
        });
        assert_eq!(
            drawn(&dropped, &seeds(3)),
            (-1.0, -1.0),
            "the empty caption"
        );
    }

    #[test]
    fn mirror_reverses_the_width_axis() {
        let mask = Tensor::new(&[[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]]], &Device::Cpu).unwrap();
        let mirrored = mirror(&mask).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(mirrored, [[[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]]);
    }
}
