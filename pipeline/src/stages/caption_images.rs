//! BLIP caption generation as sd-scripts' `make_captions.py` runs it through transformers'
//! `generate`: greedy search, beam search and nucleus sampling, with `max_length`/`min_length`
//! counted over the whole decoder sequence including the 4 prompt tokens, stopping on `[SEP]`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::dataset::imaging::{self, DecodeOptions};
use crate::dataset::shard::Shard;
use crate::dataset::sidecar::{self, Outcome, Owner};
use crate::formats::bookkeeping::Bookkeeping;
use crate::formats::manifest::Manifest;
use crate::formats::schema::CAPTION_INDEX_V1;
use crate::infra::hashing::{self, KeyBuilder};
use crate::infra::report::{Progress, Summary};
use crate::models::blip::{BlipCaptioner, BlipFiles, IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD};
use crate::{dataset, infra::fsio, Error, Result};

/// Tokens kept before nucleus filtering (transformers' default `top_k`, also in effect in
/// sd-scripts' sampling mode).
pub const TOP_K: usize = 50;
/// Repetition penalty of sd-scripts' sampling mode.
pub const SAMPLING_REPETITION_PENALTY: f32 = 1.1;
/// Score transformers gives to beams that must not be chosen.
const DISCARDED: f32 = -1.0e9;

/// How the caption tokens are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoding {
    /// sd-scripts `--beam_search`: greedy for 1 beam, beam search otherwise; no repetition penalty.
    Beam {
        /// Number of beams (`--num_beams`).
        num_beams: usize,
    },
    /// sd-scripts' default: top-k 50, then nucleus (top-p) sampling with repetition penalty 1.1.
    Nucleus {
        /// Cumulative probability kept (`--top_p`).
        top_p: f64,
    },
}

/// Everything that decides which caption is generated for an image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    /// Token selection.
    pub decoding: Decoding,
    /// Longest sequence, prompt tokens included (`--max_length`).
    pub max_length: usize,
    /// `[SEP]` is forbidden while the sequence is shorter than this (`--min_length`).
    pub min_length: usize,
}

/// A generated token sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// All ids: the decoder prompt, the caption tokens and the final `[SEP]` when it stopped there.
    pub ids: Vec<u32>,
    /// Beam search only: sum of log-probabilities divided by the number of generated tokens.
    pub score: Option<f32>,
}

/// Generates the token ids for every image of `image_embeds` (`[B, N, width]` from
/// [`BlipCaptioner::encode_images`]), in image order. `rngs` holds one generator per image and
/// drives sampling; greedy and beam search do not use it.
///
/// Greedy and sampled sequences of all images are decoded side by side (finished ones leave the
/// batch); beam search runs image by image, its beams side by side.
pub fn generate_batch(
    model: &BlipCaptioner,
    image_embeds: &Tensor,
    settings: &GenerationSettings,
    rngs: &mut [StdRng],
) -> Result<Vec<Generated>> {
    let prompt_length = model.prompt_ids().len();
    if settings.max_length <= prompt_length {
        return Err(Error::Usage(format!(
            "--max_length {} leaves no room for a caption: it counts the {prompt_length} prompt \
             tokens, so use at least {}",
            settings.max_length,
            prompt_length + 1
        )));
    }
    let images = image_embeds
        .dim(0)
        .map_err(|e| Error::Model(format!("image embeddings: {e}")))?;
    if rngs.len() != images {
        return Err(Error::Model(format!(
            "{} generators for {images} images",
            rngs.len()
        )));
    }
    match settings.decoding {
        Decoding::Beam { num_beams: 0 } => {
            Err(Error::Usage("--num_beams must be at least 1".into()))
        }
        Decoding::Beam { num_beams: 1 } => decode_side_by_side(model, image_embeds, settings, None),
        Decoding::Beam { num_beams } => (0..images)
            .map(|image| {
                let one = image_embeds
                    .narrow(0, image, 1)
                    .map_err(|e| Error::Model(format!("image embeddings: {e}")))?;
                beam_search(model, &one, settings, num_beams)
            })
            .collect(),
        Decoding::Nucleus { top_p } => {
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::Usage(format!(
                    "--top_p must be in (0, 1], got {top_p}"
                )));
            }
            decode_side_by_side(model, image_embeds, settings, Some((top_p, rngs)))
        }
    }
}

/// One sequence per image, decoded token by token: argmax, or a draw from the nucleus with the
/// image's own generator when `sampling`.
fn decode_side_by_side(
    model: &BlipCaptioner,
    image_embeds: &Tensor,
    settings: &GenerationSettings,
    mut sampling: Option<(f64, &mut [StdRng])>,
) -> Result<Vec<Generated>> {
    let sep = model.sep_token_id();
    let mut cache = model.start(image_embeds, 1)?;
    let mut sequences = vec![model.prompt_ids().to_vec(); cache.sequences()];
    // The image of every cache row still decoding.
    let mut active: Vec<usize> = (0..sequences.len()).collect();
    let mut feed = sequences.clone();
    while !active.is_empty() {
        let logits = model.next_token_logits(&mut cache, &feed)?;
        let mut kept_rows = Vec::with_capacity(active.len());
        for (row, (mut logits, &image)) in logits.into_iter().zip(&active).enumerate() {
            let ids = &mut sequences[image];
            let next = match &mut sampling {
                None => {
                    forbid_early_end(&mut logits, ids.len(), settings.min_length, sep);
                    argmax(&logits)
                }
                Some((top_p, rngs)) => {
                    penalise_repetitions(&mut logits, ids, SAMPLING_REPETITION_PENALTY);
                    forbid_early_end(&mut logits, ids.len(), settings.min_length, sep);
                    draw(&nucleus(&logits, TOP_K, *top_p), &mut rngs[image])
                }
            };
            ids.push(next);
            if next != sep && ids.len() < settings.max_length {
                kept_rows.push(row);
            }
        }
        if kept_rows.len() != active.len() {
            active = kept_rows.iter().map(|&row| active[row]).collect();
            if !active.is_empty() {
                cache.reorder(&kept_rows)?;
            }
        }
        feed = active
            .iter()
            .map(|&image| vec![*sequences[image].last().expect("non-empty")])
            .collect();
    }
    Ok(sequences
        .into_iter()
        .map(|ids| Generated { ids, score: None })
        .collect())
}

/// Sets the `[SEP]` logit to -inf while the sequence is shorter than `min_length`.
fn forbid_early_end(logits: &mut [f32], length: usize, min_length: usize, sep: u32) {
    if length < min_length {
        if let Some(value) = logits.get_mut(sep as usize) {
            *value = f32::NEG_INFINITY;
        }
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &value) in values.iter().enumerate() {
        if value > values[best] {
            best = index;
        }
    }
    best as u32
}

/// transformers' repetition penalty: every id already in the sequence (prompt included) gets its
/// logit divided by `penalty` when positive, multiplied when negative.
fn penalise_repetitions(logits: &mut [f32], ids: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::new();
    for &id in ids {
        if seen.insert(id) {
            if let Some(value) = logits.get_mut(id as usize) {
                *value = if *value < 0.0 {
                    *value * penalty
                } else {
                    *value / penalty
                };
            }
        }
    }
}

/// The tokens a top-k then top-p filter keeps, with their renormalised probabilities, most
/// probable first.
///
/// Top-k keeps every logit not below the k-th largest. Top-p sorts the survivors by ascending
/// probability and drops those whose cumulative probability is at most `1 - top_p`, always
/// keeping the most probable one.
pub fn nucleus(logits: &[f32], top_k: usize, top_p: f64) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize] > f32::NEG_INFINITY)
        .collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if let Some(&kth) = order.get(top_k.max(1) - 1) {
        let threshold = logits[kth as usize];
        order.retain(|&i| logits[i as usize] >= threshold);
    }
    let probabilities = softmax(order.iter().map(|&i| logits[i as usize]));
    // transformers compares the float32 cumulative sum with `1 - top_p` as float32.
    let dropped_mass = (1.0 - top_p) as f32;
    let mut cut = order.len();
    let mut cumulative = 0.0f64;
    for position in (1..order.len()).rev() {
        cumulative += f64::from(probabilities[position]);
        if cumulative as f32 <= dropped_mass {
            cut = position;
        } else {
            break;
        }
    }
    let survivors = &order[..cut];
    let renormalised = softmax(survivors.iter().map(|&i| logits[i as usize]));
    survivors.iter().copied().zip(renormalised).collect()
}

/// Softmax of a sequence of logits, in float32 with a float64 sum.
fn softmax(logits: impl Iterator<Item = f32> + Clone) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.map(|x| (x - max).exp()).collect();
    let total: f64 = exps.iter().map(|&e| f64::from(e)).sum();
    exps.iter()
        .map(|&e| (f64::from(e) / total) as f32)
        .collect()
}

/// Draws one token from `(id, probability)` pairs.
fn draw(choices: &[(u32, f32)], rng: &mut StdRng) -> u32 {
    let total: f64 = choices.iter().map(|&(_, p)| f64::from(p)).sum();
    let mut target = rng.random::<f64>() * total;
    for &(id, p) in choices {
        target -= f64::from(p);
        if target < 0.0 {
            return id;
        }
    }
    choices.last().map_or(0, |&(id, _)| id)
}

/// A finished beam-search hypothesis.
struct Hypothesis {
    ids: Vec<u32>,
    score: f32,
}

/// Beam search as transformers 4.54 runs it (length penalty 1, `early_stopping=False`).
fn beam_search(
    model: &BlipCaptioner,
    image_embeds: &Tensor,
    settings: &GenerationSettings,
    num_beams: usize,
) -> Result<Generated> {
    let sep = model.sep_token_id();
    let prompt = model.prompt_ids();
    let vocab = model.vocab_size();
    let candidates_kept = 2 * num_beams;
    let mut running: Vec<Vec<u32>> = vec![prompt.to_vec(); num_beams];
    let mut running_scores: Vec<f32> = (0..num_beams)
        .map(|b| if b == 0 { 0.0 } else { DISCARDED })
        .collect();
    let mut finished: Vec<Hypothesis> = Vec::new();
    let mut cache = model.start(image_embeds, num_beams)?;
    let mut feed = running.clone();
    let mut length = prompt.len();
    loop {
        let logits = model.next_token_logits(&mut cache, &feed)?;
        // (accumulated score, beam, token) of every continuation, best first.
        let mut candidates: Vec<(f32, usize, u32)> =
            Vec::with_capacity(candidates_kept * num_beams);
        for (beam, row) in logits.iter().enumerate() {
            let mut log_probs = log_softmax(row);
            forbid_early_end(&mut log_probs, length, settings.min_length, sep);
            let mut best: Vec<(f32, usize, u32)> = log_probs
                .iter()
                .enumerate()
                .map(|(token, &lp)| (lp + running_scores[beam], beam, token as u32))
                .collect();
            let keep = candidates_kept.min(best.len());
            best.select_nth_unstable_by(keep - 1, |a, b| b.0.total_cmp(&a.0));
            best.truncate(keep);
            candidates.extend(best);
        }
        candidates.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then((a.1 * vocab + a.2 as usize).cmp(&(b.1 * vocab + b.2 as usize)))
        });
        candidates.truncate(candidates_kept);
        let hits_stop =
            |&(_, _, token): &(f32, usize, u32)| token == sep || length + 1 >= settings.max_length;
        // Only the best `num_beams` candidates may enter the finished pool.
        let generated = (length + 1 - prompt.len()) as f32;
        for candidate in candidates.iter().take(num_beams).filter(|c| hits_stop(c)) {
            let mut ids = running[candidate.1].clone();
            ids.push(candidate.2);
            finished.push(Hypothesis {
                ids,
                score: candidate.0 / generated,
            });
        }
        finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        finished.truncate(num_beams);
        // The best candidates that did not stop continue.
        let mut next: Vec<(f32, usize, u32)> = candidates
            .iter()
            .copied()
            .filter(|c| !hits_stop(c))
            .collect();
        next.truncate(num_beams);
        length += 1;
        if next.len() < num_beams {
            break;
        }
        // transformers' early_stopping=False heuristic: stop once the best running beam, at its
        // current length, cannot beat the worst finished hypothesis.
        let best_running = next[0].0 / (length - prompt.len()) as f32;
        let pool_full = finished.len() == num_beams;
        if pool_full && best_running <= finished[num_beams - 1].score {
            break;
        }
        let sources: Vec<usize> = next.iter().map(|c| c.1).collect();
        running = next
            .iter()
            .map(|&(_, beam, token)| {
                let mut ids = running[beam].clone();
                ids.push(token);
                ids
            })
            .collect();
        running_scores = next.iter().map(|c| c.0).collect();
        cache.reorder(&sources)?;
        feed = next.iter().map(|&(_, _, token)| vec![token]).collect();
    }
    let best = finished
        .into_iter()
        .next()
        .ok_or_else(|| Error::Model("beam search finished without a hypothesis".into()))?;
    Ok(Generated {
        ids: best.ids,
        score: Some(best.score),
    })
}

/// `log_softmax` of one row, in float32 with a float64 sum.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = row.iter().map(|&x| f64::from((x - max).exp())).sum();
    let log_total = total.ln() as f32;
    row.iter().map(|&x| x - max - log_total).collect()
}

/// The caption sd-scripts writes: the decoded text without its first `len(PROMPT)` characters.
pub fn caption_text(model: &BlipCaptioner, ids: &[u32]) -> Result<String> {
    let text = model.decode(ids)?;
    let prompt_chars = crate::models::blip::PROMPT.chars().count();
    Ok(text.chars().skip(prompt_chars).collect())
}

/// The sampling generator for one image: seeded from `--seed` and the image's content hash, so a
/// caption does not depend on which other images are in the run.
pub fn image_rng(seed: u64, image_hash: &str) -> StdRng {
    let key = crate::infra::hashing::KeyBuilder::new("caption-sampling", 1)
        .field("seed", &seed.to_le_bytes())
        .text("image", image_hash)
        .finish();
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&key[2 * i..2 * i + 2], 16).expect("hex key");
    }
    StdRng::from_seed(bytes)
}

/// Version of the per-image content key; bump it when the same inputs give another caption.
const KEY_VERSION: u32 = 1;

/// Options of the caption stage (`caption-images`, sd-scripts' `make_captions.py`).
#[derive(Debug, Clone)]
pub struct CaptionOptions {
    /// Folder of training images.
    pub train_data_dir: PathBuf,
    /// Hugging Face BLIP captioning folder (`--caption_weights`).
    pub caption_weights: PathBuf,
    /// Token selection and length limits.
    pub generation: GenerationSettings,
    /// Seed of the sampling mode (`--seed`).
    pub seed: u64,
    /// Images per vision-encoder batch (`--batch_size`).
    pub batch_size: usize,
    /// Extension of the caption files (`--caption_extension`, e.g. `.caption`).
    pub caption_extension: String,
    /// Also caption images in subfolders (`--recursive`).
    pub recursive: bool,
    /// Print every caption (`--debug`).
    pub debug: bool,
    /// Caption every image again, even when its caption is up to date (`--force`). Caption
    /// files the user wrote are still kept unless `overwrite`.
    pub force: bool,
    /// Replace caption files the user wrote or edited (`--overwrite`), each after copying it to
    /// a backup ([`crate::dataset::sidecar`]); without it they are kept and counted as kept.
    pub overwrite: bool,
    /// Decompression-bomb limits and EXIF handling.
    pub decode: DecodeOptions,
    /// `--shard i/n`: caption only this part of the images; the caption index gets a
    /// shard-named path ([`Shard::output_path`]).
    pub shard: Shard,
    /// Hide the progress bar.
    pub quiet: bool,
}

impl CaptionOptions {
    /// The parameters that change captions, as recorded in the manifest and content keys.
    fn parameters(&self) -> serde_json::Value {
        let (mode, num_beams, top_p, repetition_penalty) = match self.generation.decoding {
            Decoding::Beam { num_beams } => ("beam_search", Some(num_beams), None, 1.0),
            Decoding::Nucleus { top_p } => (
                "nucleus",
                None,
                Some(top_p),
                f64::from(SAMPLING_REPETITION_PENALTY),
            ),
        };
        serde_json::json!({
            "mode": mode,
            "num_beams": num_beams,
            "top_p": top_p,
            "top_k": if num_beams.is_none() { Some(TOP_K) } else { None },
            "repetition_penalty": repetition_penalty,
            "max_length": self.generation.max_length,
            "min_length": self.generation.min_length,
            "seed": if num_beams.is_none() { Some(self.seed) } else { None },
            "prompt": crate::models::blip::PROMPT,
            "caption_extension": self.caption_extension,
            "decode": self.decode.key_text(),
        })
    }

    /// Checks the numbers before anything is loaded.
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::Usage("--batch_size must be at least 1".into()));
        }
        if let Decoding::Beam { num_beams: 0 } = self.generation.decoding {
            return Err(Error::Usage("--num_beams must be at least 1".into()));
        }
        if let Decoding::Nucleus { top_p } = self.generation.decoding {
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::Usage(format!(
                    "--top_p must be in (0, 1], got {top_p}"
                )));
            }
        }
        if !self.caption_extension.starts_with('.') || self.caption_extension.contains(['/', '\\'])
        {
            return Err(Error::Usage(format!(
                "--caption_extension must look like .caption, got {:?}",
                self.caption_extension
            )));
        }
        Ok(())
    }
}

/// The caption index of a dataset: `<train_data_dir>/.lorakit/caption-images<ext>.json` (a JSON
/// object from image path, relative to the folder, to caption), with its manifest beside it;
/// formerly `<train_data_dir>/caption-images<ext>.json`.
pub fn caption_index(train_data_dir: &Path, caption_extension: &str) -> Bookkeeping {
    let name = format!("caption-images{caption_extension}.json");
    Bookkeeping::new(train_data_dir, &name, &name)
}

/// One image waiting for its caption.
struct PendingImage {
    path: PathBuf,
    item: String,
    image_hash: String,
    key: String,
    /// The caption file's path relative to the dataset folder, as recorded in the manifest.
    sidecar_name: String,
    /// What is at the caption file's path now.
    existing: sidecar::Existing,
}

/// Captions every image of `train_data_dir` that has no up-to-date caption file.
///
/// Writes `<stem><caption_extension>` per image (caption + newline, atomically), skips images
/// whose content key (image bytes, model, parameters) matches the previous run's manifest and
/// whose caption file is still the one this stage wrote, keeps caption files the user wrote or
/// edited (unless `overwrite`, see [`crate::dataset::sidecar`]), and reports unreadable images as
/// per-file failures.
pub fn run(options: &CaptionOptions) -> Result<Summary> {
    options.validate()?;
    let files = BlipFiles::locate(&options.caption_weights)?;
    let discovery = dataset::find_images(&options.train_data_dir, options.recursive)?;
    let index = caption_index(&options.train_data_dir, &options.caption_extension)
        .map(|path| options.shard.output_path(path))
        .migrate()?
        .to_path_buf();
    let parameters = options.parameters();
    let (previous, previous_sidecars) = match Manifest::read_for(&index) {
        Ok(manifest) => manifest.map(|m| (m.items, m.sidecars)).unwrap_or_default(),
        Err(error) => {
            tracing::warn!("ignoring the previous run's manifest: {error}");
            Default::default()
        }
    };
    // Caption indexes written before the manifest recorded sidecar hashes still tell which
    // caption files this stage wrote: those holding the indexed caption.
    let previous_captions = read_index(&index);
    let model_hash = files.hash()?;
    let mut summary = Summary::default();
    let mine = |path: &Path| options.shard.contains_image(&options.train_data_dir, path);
    for path in discovery.not_files.iter().filter(|p| mine(p)) {
        summary.fail(path, &dataset::not_a_file(path));
    }
    let mut manifest = Manifest::new(
        "caption-images",
        &index,
        CAPTION_INDEX_V1,
        parameters.clone(),
    );
    manifest.shard = options
        .shard
        .record_images(&options.train_data_dir, &discovery.images);
    manifest.add_input_file("model_config", &files.config)?;
    manifest.add_input_hash("model", &options.caption_weights, &model_hash);
    let mut captions: BTreeMap<String, String> = BTreeMap::new();
    let mut pending = Vec::new();
    let mut sidecar_owner: HashMap<PathBuf, PathBuf> = HashMap::new();
    for path in &discovery.images {
        let sidecar = dataset::sidecar_path(path, &options.caption_extension);
        // Checked over every shard's images (names only), so each shard skips the same ones.
        if let Some(first) = sidecar_owner.insert(sidecar.clone(), path.clone()) {
            if !mine(path) {
                continue;
            }
            summary.fail(
                path,
                &Error::bad_file(
                    path,
                    format!(
                        "would write the same caption file {} as {}; rename one of them",
                        sidecar.display(),
                        first.display()
                    ),
                ),
            );
            continue;
        }
        if !mine(path) {
            continue;
        }
        let item = dataset::relative_name(&options.train_data_dir, path);
        let image_hash = match hashing::hash_file(path) {
            Ok(hash) => hash,
            Err(error) => {
                summary.fail(path, &error);
                continue;
            }
        };
        let sidecar_name = dataset::relative_name(&options.train_data_dir, &sidecar);
        let recorded = previous_sidecars.get(&sidecar_name).cloned().or_else(|| {
            previous_captions
                .get(&item)
                .map(|caption| hashing::hash_bytes(format!("{caption}\n").as_bytes()))
        });
        let existing = match sidecar::inspect(&sidecar, recorded.as_deref()) {
            Ok(existing) => existing,
            Err(error) => {
                summary.fail(path, &error);
                continue;
            }
        };
        if existing.owner == Owner::User && !options.overwrite {
            tracing::debug!("{}: kept (user-written)", sidecar.display());
            summary.kept += 1;
            continue;
        }
        let key = KeyBuilder::new("caption-images", KEY_VERSION)
            .text("image", &image_hash)
            .text("model", &model_hash)
            .text("parameters", &parameters.to_string())
            .finish();
        if !options.force && existing.owner == Owner::Stage && previous.get(&item) == Some(&key) {
            if let (Ok(text), Some(hash)) = (dataset::read_sidecar(&sidecar), recorded) {
                captions.insert(item.clone(), text);
                manifest.items.insert(item, key);
                manifest.sidecars.insert(sidecar_name, hash);
                summary.up_to_date += 1;
                continue;
            }
        }
        pending.push(PendingImage {
            path: path.clone(),
            item,
            image_hash,
            key,
            sidecar_name,
            existing,
        });
    }
    if !pending.is_empty() {
        let started = std::time::Instant::now();
        crate::models::tune_process_for_models();
        let model = BlipCaptioner::load(&files, &Device::Cpu)?;
        tracing::debug!("model loaded in {:.2} s", started.elapsed().as_secs_f64());
        let progress = Progress::new("caption-images", pending.len(), options.quiet);
        for batch in pending.chunks(options.batch_size) {
            caption_batch(
                &model,
                options,
                batch,
                &mut summary,
                &mut captions,
                &mut manifest,
                &progress,
            )?;
        }
        progress.finish();
    }
    fsio::write_atomic(&index, &crate::infra::pyjson::document_bytes(&captions))?;
    manifest.summary = summary.clone();
    manifest.write_for(&index)?;
    Ok(summary)
}

/// Captions one batch: images decoded in parallel, one vision pass, then one decode per image.
fn caption_batch(
    model: &BlipCaptioner,
    options: &CaptionOptions,
    batch: &[PendingImage],
    summary: &mut Summary,
    captions: &mut BTreeMap<String, String>,
    manifest: &mut Manifest,
    progress: &Progress,
) -> Result<()> {
    let loaded: Vec<Result<Tensor>> = batch
        .par_iter()
        .map(|image| load_pixels(&image.path, &options.decode))
        .collect();
    let mut ready = Vec::with_capacity(batch.len());
    let mut pixels = Vec::with_capacity(batch.len());
    for (image, result) in batch.iter().zip(loaded) {
        match result {
            Ok(tensor) => {
                ready.push(image);
                pixels.push(tensor);
            }
            Err(error) => {
                summary.fail(&image.path, &error);
                progress.inc(1);
            }
        }
    }
    if ready.is_empty() {
        return Ok(());
    }
    let pixels =
        Tensor::stack(&pixels, 0).map_err(|e| Error::Model(format!("batching images: {e}")))?;
    let started = std::time::Instant::now();
    let embeds = model.encode_images(&pixels)?;
    tracing::debug!(
        "vision encoder: {} images in {:.2} s",
        pixels.dim(0).unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    let mut rngs: Vec<StdRng> = ready
        .iter()
        .map(|image| image_rng(options.seed, &image.image_hash))
        .collect();
    let started = std::time::Instant::now();
    let generated = generate_batch(model, &embeds, &options.generation, &mut rngs)?;
    tracing::debug!(
        "decoder: {} images in {:.2} s",
        ready.len(),
        started.elapsed().as_secs_f64()
    );
    for (image, generated) in ready.into_iter().zip(generated) {
        let caption = caption_text(model, &generated.ids)?;
        let sidecar = dataset::sidecar_path(&image.path, &options.caption_extension);
        let bytes = format!("{caption}\n");
        match sidecar::write(
            &sidecar,
            bytes.as_bytes(),
            &image.existing,
            options.overwrite,
        ) {
            Ok(Outcome::Kept) => summary.kept += 1,
            Ok(outcome) => {
                if let Outcome::Replaced(backup) = &outcome {
                    tracing::info!(
                        "{}: replaced the user's caption (--overwrite), kept as {}",
                        sidecar.display(),
                        backup.display()
                    );
                }
                if options.debug {
                    println!("{} {caption}", image.path.display());
                }
                tracing::debug!("{}: {caption}", image.path.display());
                captions.insert(image.item.clone(), caption);
                manifest.items.insert(image.item.clone(), image.key.clone());
                manifest.sidecars.insert(
                    image.sidecar_name.clone(),
                    hashing::hash_bytes(bytes.as_bytes()),
                );
                summary.done += 1;
            }
            Err(error) => summary.fail(&image.path, &error),
        }
        progress.inc(1);
    }
    Ok(())
}

/// The captions of a previous run's index (empty when there is none or it cannot be read).
fn read_index(index: &Path) -> BTreeMap<String, String> {
    std::fs::read(index)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Decodes an image and turns it into BLIP's input `[3, 384, 384]`: RGB with any alpha channel
/// dropped, resized to 384x384 with Pillow's bicubic filter ignoring the aspect ratio.
fn load_pixels(path: &Path, decode: &DecodeOptions) -> Result<Tensor> {
    let rgb = imaging::open(path, decode)?.to_rgb8();
    let resized = imaging::resize_bicubic(&rgb, IMAGE_SIZE, IMAGE_SIZE);
    pixel_values(&resized)
}

/// Normalises a 384x384 RGB image with the CLIP mean/std into a `[3, H, W]` float32 tensor.
pub fn pixel_values(image: &image::RgbImage) -> Result<Tensor> {
    let (width, height) = image.dimensions();
    let plane = (width * height) as usize;
    let mut values = vec![0f32; 3 * plane];
    for (index, pixel) in image.pixels().enumerate() {
        for channel in 0..3 {
            let unit = f32::from(pixel[channel]) / 255.0;
            values[channel * plane + index] = (unit - PIXEL_MEAN[channel]) / PIXEL_STD[channel];
        }
    }
    Tensor::from_vec(values, (3, height as usize, width as usize), &Device::Cpu)
        .map_err(|e| Error::Model(format!("building the pixel tensor: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::blip::fixture;

    fn golden_json() -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(fixture::dir().join("golden.json")).unwrap()).unwrap()
    }

    /// Row `image` of a padded golden id array, cut to its length.
    fn golden_ids(name: &str, image: usize) -> Vec<u32> {
        let (ids, shape) = fixture::i64_array(&format!("{name}_ids"));
        let (lengths, _) = fixture::i64_array(&format!("{name}_len"));
        let row = &ids[image * shape[1]..(image + 1) * shape[1]];
        row[..lengths[image] as usize]
            .iter()
            .map(|&id| id as u32)
            .collect()
    }

    fn embeds(image: usize) -> Tensor {
        fixture::model()
            .encode_images(&fixture::pixels(image))
            .unwrap()
    }

    fn run(image: usize, decoding: Decoding, max_length: usize) -> Generated {
        let settings = GenerationSettings {
            decoding,
            max_length,
            min_length: 5,
        };
        let mut rngs = [image_rng(42, "x")];
        generate_batch(fixture::model(), &embeds(image), &settings, &mut rngs)
            .unwrap()
            .remove(0)
    }

    /// The 4 golden images encoded as one batch.
    fn all_embeds() -> Tensor {
        let (pixels, _) = fixture::f32_array("pixel_values");
        let pixels = Tensor::from_vec(pixels, (4, 3, 384, 384), &Device::Cpu).unwrap();
        fixture::model().encode_images(&pixels).unwrap()
    }

    #[test]
    fn greedy_and_beam_ids_and_captions_match_golden() {
        let model = fixture::model();
        let golden = golden_json();
        for image in 0..4 {
            let cases = [
                ("greedy30", Decoding::Beam { num_beams: 1 }, 30),
                ("greedy75", Decoding::Beam { num_beams: 1 }, 75),
                ("beam3", Decoding::Beam { num_beams: 3 }, 30),
            ];
            for (name, decoding, max_length) in cases {
                let generated = run(image, decoding, max_length);
                assert_eq!(
                    generated.ids,
                    golden_ids(name, image),
                    "{name}, image {image}"
                );
                let expected = &golden["images"][image][name];
                assert_eq!(
                    caption_text(model, &generated.ids).unwrap(),
                    expected["sd_scripts_caption"].as_str().unwrap(),
                    "{name}, image {image}"
                );
                if name == "beam3" {
                    let (scores, _) = fixture::f32_array("beam3_sequence_scores");
                    let error = (generated.score.unwrap() - scores[image]).abs();
                    eprintln!("beam3 score, image {image}: error {error:e}");
                    assert!(
                        error < 1e-4,
                        "beam score of image {image} differs by {error}"
                    );
                }
            }
        }
    }

    #[test]
    fn batches_decode_like_single_images() {
        let model = fixture::model();
        let embeds = all_embeds();
        let greedy = GenerationSettings {
            decoding: Decoding::Beam { num_beams: 1 },
            max_length: 30,
            min_length: 5,
        };
        let mut rngs: Vec<StdRng> = (0..4).map(|i| image_rng(42, &i.to_string())).collect();
        let batch = generate_batch(model, &embeds, &greedy, &mut rngs).unwrap();
        for (image, generated) in batch.iter().enumerate() {
            assert_eq!(
                generated.ids,
                golden_ids("greedy30", image),
                "image {image}"
            );
        }
        let beams = GenerationSettings {
            decoding: Decoding::Beam { num_beams: 3 },
            ..greedy.clone()
        };
        let batch = generate_batch(model, &embeds, &beams, &mut rngs).unwrap();
        for (image, generated) in batch.iter().enumerate() {
            assert_eq!(generated.ids, golden_ids("beam3", image), "image {image}");
        }
        let sampling = GenerationSettings {
            decoding: Decoding::Nucleus { top_p: 0.9 },
            ..greedy
        };
        let mut rngs: Vec<StdRng> = (0..4).map(|i| image_rng(42, &i.to_string())).collect();
        let batch = generate_batch(model, &embeds, &sampling, &mut rngs).unwrap();
        for (image, generated) in batch.iter().enumerate() {
            let mut rng = [image_rng(42, &image.to_string())];
            let single = generate_batch(
                model,
                &embeds.narrow(0, image, 1).unwrap(),
                &sampling,
                &mut rng,
            )
            .unwrap()
            .remove(0);
            assert_eq!(generated.ids, single.ids, "image {image}");
        }
    }

    #[test]
    fn first_nucleus_step_keeps_the_golden_tokens() {
        let model = fixture::model();
        let (kept_ids, shape) = fixture::i64_array("nucleus_step1_kept_ids");
        let (kept_probs, _) = fixture::f32_array("nucleus_step1_kept_probs");
        for image in 0..4 {
            let mut cache = model.start(&embeds(image), 1).unwrap();
            let prompt = model.prompt_ids().to_vec();
            let mut logits = model
                .next_token_logits(&mut cache, &[prompt.clone()])
                .unwrap()
                .remove(0);
            penalise_repetitions(&mut logits, &prompt, SAMPLING_REPETITION_PENALTY);
            forbid_early_end(&mut logits, prompt.len(), 5, model.sep_token_id());
            let kept = nucleus(&logits, TOP_K, 0.9);
            let row = image * shape[1]..(image + 1) * shape[1];
            let expected: Vec<(u32, f32)> = kept_ids[row.clone()]
                .iter()
                .zip(&kept_probs[row])
                .filter(|(&id, _)| id >= 0)
                .map(|(&id, &p)| (id as u32, p))
                .collect();
            let ids = |v: &[(u32, f32)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
            assert_eq!(ids(&kept), ids(&expected), "image {image}");
            for ((_, actual), (_, wanted)) in kept.iter().zip(&expected) {
                assert!(
                    (actual - wanted).abs() < 1e-5,
                    "image {image}: {actual} vs {wanted}"
                );
            }
        }
    }

    #[test]
    fn sampling_is_reproducible_and_respects_the_limits() {
        let sample = |seed| {
            let settings = GenerationSettings {
                decoding: Decoding::Nucleus { top_p: 0.9 },
                max_length: 30,
                min_length: 5,
            };
            let mut rngs = [image_rng(seed, "image-hash")];
            generate_batch(fixture::model(), &embeds(3), &settings, &mut rngs)
                .unwrap()
                .remove(0)
                .ids
        };
        let first = sample(42);
        assert_eq!(first, sample(42));
        assert_eq!(&first[..4], fixture::model().prompt_ids());
        assert!(first.len() <= 30 && first.len() > 5);
        assert!(first[4..first.len() - 1].iter().all(|&id| id != 102));
        let others: Vec<_> = (0..4).map(|seed| sample(seed)).collect();
        assert!(
            others.iter().any(|ids| ids != &first),
            "the seed changes nothing"
        );
    }

    #[test]
    fn preprocessing_matches_golden_pixels() {
        let (expected, _) = fixture::f32_array("pixel_values");
        let images = fixture::dir().join("../images");
        let size = 3 * 384 * 384;
        for (index, name) in ["astronaut", "chelsea", "coins", "text"].iter().enumerate() {
            let pixels = load_pixels(
                &images.join(format!("{name}.png")),
                &DecodeOptions::default(),
            )
            .unwrap();
            let actual: Vec<f32> = pixels.flatten_all().unwrap().to_vec1().unwrap();
            let golden = &expected[index * size..(index + 1) * size];
            let error = fixture::max_abs_diff(&actual, golden);
            let differing = actual
                .iter()
                .zip(golden)
                .filter(|(a, b)| (*a - *b).abs() > 1e-6)
                .count();
            assert!(
                error < 1e-6,
                "{name}: pixels differ by up to {error} ({differing} values)"
            );
        }
    }

    #[test]
    fn normalisation_matches_golden_pixels() {
        // The golden resized image is recoverable from its pixels; normalising it again must
        // give the same values.
        let (expected, _) = fixture::f32_array("pixel_values");
        let plane = 384 * 384;
        let golden = &expected[..3 * plane];
        let bytes: Vec<u8> = (0..plane)
            .flat_map(|i| {
                (0..3).map(move |c| {
                    let unit = golden[c * plane + i] * PIXEL_STD[c] + PIXEL_MEAN[c];
                    (unit * 255.0).round() as u8
                })
            })
            .collect();
        let image = image::RgbImage::from_raw(384, 384, bytes).unwrap();
        let actual: Vec<f32> = pixel_values(&image)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let error = fixture::max_abs_diff(&actual, golden);
        assert!(error < 1e-6, "normalisation differs by {error}");
    }

    #[test]
    fn nucleus_filter_rules() {
        // top-k keeps ties with the k-th value; top-p keeps at least the best token.
        let kept = nucleus(&[1.0, 3.0, 2.0, 2.0, f32::NEG_INFINITY], 2, 1.0);
        assert_eq!(kept.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3]);
        let kept = nucleus(&[0.0, 10.0, 0.0], 50, 0.5);
        assert_eq!(kept, [(1, 1.0)]);
        let mut logits = vec![2.0, -2.0, 1.0];
        penalise_repetitions(&mut logits, &[0, 1, 1], 2.0);
        assert_eq!(logits, [1.0, -4.0, 1.0]);
    }

    #[test]
    fn too_short_max_length_is_a_usage_error() {
        let settings = GenerationSettings {
            decoding: Decoding::Beam { num_beams: 1 },
            max_length: 4,
            min_length: 5,
        };
        let error = generate_batch(
            fixture::model(),
            &embeds(0),
            &settings,
            &mut [image_rng(1, "x")],
        )
        .unwrap_err();
        assert!(matches!(error, Error::Usage(_)), "{error}");
    }
}
