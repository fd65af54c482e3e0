//! WD14 tagging (sd-scripts `finetune/tag_images_by_wd14_tagger.py`,
//! docs/kohya-compat.md#tagging) through ONNX Runtime, with a tag-probability store that makes
//! re-runs incremental and lets thresholds be changed without running the model again.

pub mod labels;
pub mod onnx;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use image::RgbImage;
use rayon::prelude::*;

use crate::dataset::imaging::{self, DecodeOptions, LoadedImage};
use crate::dataset::relative_name;
use crate::dataset::shard::Shard;
use crate::dataset::sidecar::{self, Outcome, Owner, WrittenSidecars};
use crate::formats::bookkeeping::Bookkeeping;
use crate::formats::schema::TAG_STORE_V1;
use crate::formats::tag_store::{self as store, Entry, ProbabilityStore};
use crate::infra::report::{Progress, Summary};
use crate::{Error, Result};
use labels::{LabelOptions, LabelSet, Layout, Selection};
use onnx::{Device, Tagger};

/// Default `--repo_id`.
pub const DEFAULT_REPO_ID: &str = "SmilingWolf/wd-v1-4-convnext-tagger-v2";
/// The default tag-probability store of a dataset folder: `<dataset>/.lorakit/tag-probs.bin`
/// (formerly `<dataset>/.lorakit-tag-probs.bin`).
pub fn default_store(train_data_dir: &Path) -> Bookkeeping {
    Bookkeeping::new(train_data_dir, "tag-probs.bin", ".lorakit-tag-probs.bin")
}

/// Everything `tag-images` needs to run.
#[derive(Debug, Clone)]
pub struct TagOptions {
    /// Image folder.
    pub train_data_dir: PathBuf,
    /// `--model_dir`.
    pub model_dir: PathBuf,
    /// `--repo_id`.
    pub repo_id: String,
    /// `--batch_size` (a fixed-batch model overrides it).
    pub batch_size: usize,
    /// `--recursive`.
    pub recursive: bool,
    /// `--caption_extension`.
    pub caption_extension: String,
    /// `--output_path`: one JSON / JSONL file instead of tag files.
    pub output_path: Option<PathBuf>,
    /// `--append_tags`: merge the model's tags into tag files the user wrote or edited.
    pub append_tags: bool,
    /// `--overwrite`: replace tag files the user wrote or edited, each after copying it to a
    /// backup ([`crate::dataset::sidecar`]); without it (and without `append_tags`) they are kept.
    pub overwrite: bool,
    /// `--frequency_tags`.
    pub frequency_tags: bool,
    /// `--debug`: log each image's rating, character and general tags.
    pub debug: bool,
    /// Label post-processing.
    pub label_options: LabelOptions,
    /// Per-image selection.
    pub selection: Selection,
    /// Tag-probability store (default `<train_data_dir>/.lorakit/tag-probs.bin`).
    pub store_path: Option<PathBuf>,
    /// Only re-render from the store; never load the model.
    pub from_store: bool,
    /// Inference device.
    pub device: Device,
    /// `--ort-lib`.
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (0 = its default).
    pub threads: usize,
    /// Decompression-bomb limits and EXIF handling.
    pub decode: DecodeOptions,
    /// `--shard i/n`: tag only this part of the images; the store and `--output_path` get
    /// shard-named paths ([`Shard::output_path`]).
    pub shard: Shard,
    /// No progress display.
    pub quiet: bool,
}

/// Model files of a tagger folder.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The ONNX graph.
    pub model: PathBuf,
    /// `selected_tags.csv` or `tag_mapping.json`.
    pub labels: PathBuf,
    /// Which layout.
    pub layout: Layout,
}

impl ModelFiles {
    /// sd-scripts' folder naming: `<model_dir>/<owner>_<repo>/` holding `model.onnx` and
    /// `selected_tags.csv`; a repo id with a subfolder (`owner/repo/sub`) uses
    /// `<model_dir>/<owner>_<repo>/<sub>/` with `model_optimized.onnx` and `tag_mapping.json`.
    pub fn locate(model_dir: &Path, repo_id: &str) -> Result<Self> {
        let segments: Vec<&str> = repo_id.split('/').filter(|s| !s.is_empty()).collect();
        let (folder, model, labels, layout) = if segments.len() > 2 {
            (
                model_dir
                    .join(format!("{}_{}", segments[0], segments[1]))
                    .join(segments[2..].join("/")),
                "model_optimized.onnx",
                "tag_mapping.json",
                Layout::TagMapping,
            )
        } else {
            (
                model_dir.join(repo_id.replace('/', "_")),
                "model.onnx",
                "selected_tags.csv",
                Layout::SmilingWolf,
            )
        };
        let files = ModelFiles {
            model: folder.join(model),
            labels: folder.join(labels),
            layout,
        };
        for path in [&files.model, &files.labels] {
            if !path.is_file() {
                return Err(Error::Model(format!(
                    "tagger model file {} not found. lorakit does not download models: put \
                     `{model}` and `{labels}` of {repo_id} (from https://huggingface.co/{}) \
                     into {}",
                    path.display(),
                    segments
                        .iter()
                        .take(2)
                        .copied()
                        .collect::<Vec<_>>()
                        .join("/"),
                    folder.display()
                )));
            }
        }
        Ok(files)
    }

    /// Reads and post-processes the labels.
    pub fn load_labels(&self, options: &LabelOptions) -> Result<LabelSet> {
        let mut labels = match self.layout {
            Layout::SmilingWolf => LabelSet::from_csv(&self.labels)?,
            Layout::TagMapping => LabelSet::from_tag_mapping(&self.labels)?,
        };
        labels.post_process(options);
        Ok(labels)
    }
}

/// The tagger input of one image: alpha composited on white, RGB→BGR, padded to a square with
/// 255, resized to `side` (OpenCV area when shrinking, Pillow Lanczos when enlarging), f32
/// 0..255 NHWC; for tag_mapping models NCHW scaled to -1..1 (still BGR, as sd-scripts).
pub fn preprocess(image: &LoadedImage, side: usize, layout: Layout) -> Vec<f32> {
    let square = pad_to_square(&image.composite_on_white());
    let side32 = side as u32;
    let resized = imaging::resize_sd_scripts(&square, side32, side32);
    let plane = side * side;
    let mut out = vec![0f32; plane * 3];
    for (index, pixel) in resized.pixels().enumerate() {
        let bgr = [pixel[2], pixel[1], pixel[0]];
        for (channel, value) in bgr.into_iter().enumerate() {
            match layout {
                Layout::SmilingWolf => out[index * 3 + channel] = f32::from(value),
                Layout::TagMapping => out[channel * plane + index] = f32::from(value) / 127.5 - 1.0,
            }
        }
    }
    out
}

/// Centres `image` on a white square canvas (extra pixel right/bottom, as `np.pad`).
fn pad_to_square(image: &RgbImage) -> RgbImage {
    let (width, height) = image.dimensions();
    let side = width.max(height);
    if width == height {
        return image.clone();
    }
    let mut canvas = RgbImage::from_pixel(side, side, image::Rgb([255, 255, 255]));
    image::imageops::replace(
        &mut canvas,
        image,
        i64::from((side - width) / 2),
        i64::from((side - height) / 2),
    );
    canvas
}

/// One image of the dataset and what is known about it.
struct Item {
    path: PathBuf,
    relative: String,
    size: u64,
    mtime_ns: u128,
}

/// A decoded, preprocessed image ready for the session.
struct Prepared {
    entry: Entry,
    input: Vec<f32>,
}

/// Runs `tag-images`.
pub fn run(options: &TagOptions) -> Result<Summary> {
    if options.batch_size == 0 {
        return Err(Error::Usage("--batch_size must be at least 1".to_string()));
    }
    let files = ModelFiles::locate(&options.model_dir, &options.repo_id)?;
    let labels = files.load_labels(&options.label_options)?;
    let mut discovery = crate::dataset::find_images(&options.train_data_dir, options.recursive)?;
    let shard_record = options
        .shard
        .retain_images(&mut discovery, &options.train_data_dir);
    let mut summary = Summary::default();
    for path in &discovery.not_files {
        summary.fail(path, &crate::dataset::not_a_file(path));
    }
    tracing::info!("found {} images", discovery.images.len());

    let store_path = store_path(options)?;
    let model_hash = crate::infra::hashing::memoised(
        std::slice::from_ref(&files.model),
        "tagger-model",
        || crate::infra::hashing::hash_file(&files.model),
    )?;
    let mut store = match ProbabilityStore::load(&store_path)? {
        Some(store) if store.model_hash() == model_hash => store,
        Some(_) => {
            tracing::info!(
                "{} was computed with another model; recomputing",
                store_path.display()
            );
            ProbabilityStore::new(&model_hash, labels.required_outputs())
        }
        None => ProbabilityStore::new(&model_hash, labels.required_outputs()),
    };

    let mut items = Vec::with_capacity(discovery.images.len());
    for path in &discovery.images {
        match store::file_stamp(path) {
            Ok((size, mtime_ns)) => items.push(Item {
                relative: relative_name(&options.train_data_dir, path),
                path: path.clone(),
                size,
                mtime_ns,
            }),
            Err(e) => summary.fail(path, &e),
        }
    }

    // Images whose stored row is still valid (same file stamp, same content key) are skipped.
    let pending: Vec<&Item> = items
        .iter()
        .filter(|item| match store.get(&item.relative) {
            Some((entry, _)) => {
                entry.size != item.size
                    || entry.mtime_ns != item.mtime_ns
                    || entry.key
                        != ProbabilityStore::content_key(
                            &model_hash,
                            &entry.image_hash,
                            &options.decode,
                        )
            }
            None => true,
        })
        .collect();
    summary.up_to_date = items.len() - pending.len();

    if !pending.is_empty() {
        if options.from_store {
            for item in &pending {
                summary.fail(
                    &item.path,
                    &Error::bad_file(
                        &item.path,
                        "not in the tag-probability store (new or changed since it was \
                         computed); run without --from_store to tag it",
                    ),
                );
            }
        } else {
            let mut tagging = Tagging {
                options,
                labels: &labels,
                model_hash: &model_hash,
                store: &mut store,
                summary: &mut summary,
            };
            tagging.infer(&files, &pending)?;
        }
    }
    if !options.from_store {
        let present: HashSet<String> = items.iter().map(|i| i.relative.clone()).collect();
        store.retain_paths(&present);
        store.save(&store_path)?;
    }

    let previous = match crate::formats::manifest::Manifest::read_for(&store_path) {
        Ok(manifest) => manifest,
        Err(error) => {
            tracing::warn!("ignoring the previous run's manifest: {error}");
            None
        }
    };
    let previous_sidecars = previous
        .as_ref()
        .map(|m| m.sidecars.clone())
        .unwrap_or_default();
    let sidecars = render(
        options,
        &labels,
        &store,
        &items,
        &previous_sidecars,
        &mut summary,
    )?;
    if !options.from_store {
        write_manifest(
            options,
            &files,
            &store_path,
            &store,
            sidecars,
            &summary,
            shard_record,
        )?;
    } else if let Some(mut manifest) = previous {
        // The store is unchanged; only the record of the tag files written from it is updated.
        if manifest.sidecars != sidecars {
            manifest.sidecars = sidecars;
            manifest.write_for(&store_path)?;
        }
    }
    Ok(summary)
}

/// The tag-probability store of a run: `--probs_store` or the [`default_store`], shard-named
/// under `--shard`. The default store of an older layout is moved into `.lorakit/` first.
fn store_path(options: &TagOptions) -> Result<PathBuf> {
    match &options.store_path {
        Some(path) => Ok(options.shard.output_path(path)),
        None => Ok(default_store(&options.train_data_dir)
            .map(|path| options.shard.output_path(path))
            .migrate()?
            .to_path_buf()),
    }
}

/// State of the inference part of a run.
struct Tagging<'a> {
    options: &'a TagOptions,
    labels: &'a LabelSet,
    model_hash: &'a str,
    store: &'a mut ProbabilityStore,
    summary: &'a mut Summary,
}

impl Tagging<'_> {
    /// Runs the model on `pending`: a producer thread decodes and preprocesses each batch on
    /// the rayon pool while this thread runs the session on the previous one.
    fn infer(&mut self, files: &ModelFiles, pending: &[&Item]) -> Result<()> {
        let options = self.options;
        let runtime = onnx::load_runtime(options.ort_lib.as_deref())?;
        let mut tagger = Tagger::open(runtime, &files.model, options.device, options.threads)?;
        tracing::info!(
            "ONNX Runtime {} on {} ({}), input {}x{}",
            runtime.library.display(),
            tagger.provider,
            files.model.display(),
            tagger.shape.input_size,
            tagger.shape.input_size
        );
        let batch_size = match tagger.shape.fixed_batch {
            Some(fixed) if fixed != options.batch_size => {
                tracing::warn!(
                    "batch size {} does not match the model's fixed batch size {fixed}; using {fixed}",
                    options.batch_size
                );
                fixed
            }
            _ => options.batch_size,
        };
        let side = tagger.shape.input_size;
        let layout = files.layout;
        let decode = options.decode;
        let model_hash = self.model_hash.to_string();
        let progress = Progress::new("tag-images", pending.len(), options.quiet);
        let started = std::time::Instant::now();
        let mut session_time = std::time::Duration::ZERO;
        let mut inferred = 0usize;
        let (sender, receiver) = mpsc::sync_channel::<Vec<(usize, Result<Prepared>)>>(2);
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || {
                for (chunk_index, chunk) in pending.chunks(batch_size).enumerate() {
                    let prepared = chunk
                        .par_iter()
                        .enumerate()
                        .map(|(offset, item)| {
                            let index = chunk_index * batch_size + offset;
                            (index, prepare(item, &model_hash, side, layout, &decode))
                        })
                        .collect();
                    if sender.send(prepared).is_err() {
                        break;
                    }
                }
            });
            for batch in receiver {
                let mut entries = Vec::with_capacity(batch.len());
                let mut input = Vec::with_capacity(batch.len() * side * side * 3);
                for (index, prepared) in batch {
                    match prepared {
                        Ok(prepared) => {
                            input.extend_from_slice(&prepared.input);
                            entries.push(prepared.entry);
                        }
                        Err(e) => self.summary.fail(&pending[index].path, &e),
                    }
                }
                let count = entries.len();
                if count > 0 {
                    let session_started = std::time::Instant::now();
                    let rows = if tagger.shape.fixed_batch.is_some_and(|b| b > count) {
                        let fixed = batch_size;
                        input.resize(fixed * side * side * 3, 0.0);
                        tagger.run(input, fixed)?
                    } else {
                        tagger.run(input, count)?
                    };
                    session_time += session_started.elapsed();
                    inferred += count;
                    self.store_rows(layout, entries, rows)?;
                }
                progress.inc(count as u64);
            }
            Ok(())
        })?;
        progress.finish();
        let wall = started.elapsed().as_secs_f64();
        let session = session_time.as_secs_f64();
        tracing::info!(
            "inference: {inferred} images in {wall:.2} s ({:.1} images/s); ONNX session {session:.2} s \
             ({:.0}% of the time, the rest waits on decoding)",
            inferred as f64 / wall.max(1e-9),
            100.0 * session / wall.max(1e-9)
        );
        Ok(())
    }

    fn store_rows(
        &mut self,
        layout: Layout,
        entries: Vec<Entry>,
        rows: Vec<Vec<f32>>,
    ) -> Result<()> {
        let needed = self.labels.required_outputs();
        for (entry, mut row) in entries.into_iter().zip(rows) {
            if row.len() < needed {
                return Err(Error::Model(format!(
                    "the model has {} outputs but its label file names {needed}; the label file \
                     does not belong to this model",
                    row.len()
                )));
            }
            if layout == Layout::TagMapping {
                for value in &mut row {
                    *value = 1.0 / (1.0 + (-*value).exp());
                }
            }
            self.store.insert(entry, row);
            self.summary.done += 1;
        }
        Ok(())
    }
}

/// Reads, hashes, decodes and preprocesses one image.
fn prepare(
    item: &Item,
    model_hash: &str,
    side: usize,
    layout: Layout,
    decode: &DecodeOptions,
) -> Result<Prepared> {
    let bytes = std::fs::read(&item.path).map_err(|e| Error::io(&item.path, e))?;
    let image_hash = crate::infra::hashing::hash_bytes(&bytes);
    let image = imaging::decode(&item.path, &bytes, decode)?;
    let input = preprocess(&image, side, layout);
    Ok(Prepared {
        entry: Entry {
            path: item.relative.clone(),
            size: item.size,
            mtime_ns: item.mtime_ns,
            key: ProbabilityStore::content_key(model_hash, &image_hash, decode),
            image_hash,
            image_size: image.original_size(),
        },
        input,
    })
}

/// Turns the stored probabilities into tag files (or the `--output_path` file); returns the
/// tag files this stage now owns (see [`crate::dataset::sidecar`]), given those it owned before.
fn render(
    options: &TagOptions,
    labels: &LabelSet,
    store: &ProbabilityStore,
    items: &[Item],
    previous_sidecars: &WrittenSidecars,
    summary: &mut Summary,
) -> Result<WrittenSidecars> {
    let separator = &options.label_options.caption_separator;
    let mut frequencies: Vec<(String, usize)> = Vec::new();
    let mut frequency_index: HashMap<String, usize> = HashMap::new();
    let mut records: Vec<(String, String, (u32, u32))> = Vec::new();
    let mut tag_files: Vec<(&Path, Vec<&str>)> = Vec::new();
    for item in items {
        let Some((entry, probs)) = store.get(&item.relative) else {
            continue;
        };
        let selected = options.selection.select(labels, probs);
        for tag in &selected.emitted {
            match frequency_index.get(*tag) {
                Some(&index) => frequencies[index].1 += 1,
                None => {
                    frequency_index.insert(tag.to_string(), frequencies.len());
                    frequencies.push((tag.to_string(), 1));
                }
            }
        }
        if options.debug {
            tracing::info!("{}: {}", item.path.display(), selected.tags.join(separator));
        }
        if options.output_path.is_some() {
            records.push((
                item.path.to_string_lossy().into_owned(),
                selected.tags.join(separator),
                entry.image_size,
            ));
        } else {
            tag_files.push((&item.path, selected.tags));
        }
    }
    // Tag files are independent: write them in parallel (each write is synced to disk).
    let root = &options.train_data_dir;
    let results: Vec<(&Path, String, Result<TagFileWrite>)> = tag_files
        .par_iter()
        .map(|(image, tags)| {
            let path = crate::dataset::sidecar_path(image, &options.caption_extension);
            let name = relative_name(root, &path);
            let recorded = previous_sidecars.get(&name).map(String::as_str);
            (
                *image,
                name.clone(),
                write_tag_file(options, &path, tags, recorded),
            )
        })
        .collect();
    // With `--output_path` no tag file is touched, so the previous record still holds.
    let mut sidecars = if options.output_path.is_some() {
        previous_sidecars.clone()
    } else {
        WrittenSidecars::new()
    };
    for (image, name, result) in results {
        match result {
            Ok(TagFileWrite::Owned(hash)) => {
                sidecars.insert(name, hash);
            }
            Ok(TagFileWrite::Kept) => summary.kept += 1,
            Ok(TagFileWrite::Appended) => {}
            Err(error) => summary.fail(image, &error),
        }
    }
    if let Some(output) = &options.output_path {
        write_output_file(&options.shard.output_path(output), &records)?;
    }
    if options.frequency_tags {
        // Stable sort: ties keep first-seen order, as Python's sorted().
        frequencies.sort_by_key(|&(_, count)| std::cmp::Reverse(count));
        let mut text = String::from("Tag frequencies:\n");
        for (tag, count) in &frequencies {
            text.push_str(&format!("{tag}: {count}\n"));
        }
        print!("{text}");
    }
    Ok(sidecars)
}

/// What [`write_tag_file`] did with one tag file.
enum TagFileWrite {
    /// The file holds the stage's tags (written, unchanged or replaced after a backup); the
    /// BLAKE3 of its bytes is recorded as the stage's own.
    Owned(String),
    /// The user's file was kept as it is.
    Kept,
    /// The model's tags were merged into the user's file (`--append_tags`); it stays the user's.
    Appended,
}

/// Writes the tag file at `path` under the ownership rules of [`crate::dataset::sidecar`]: files this
/// stage wrote (`recorded` is their hash) are regenerated, the user's are kept, merged with the
/// model's tags under `--append_tags` (sd-scripts' behaviour, without duplicates), or replaced
/// after a backup under `--overwrite`.
fn write_tag_file(
    options: &TagOptions,
    path: &Path,
    tags: &[&str],
    recorded: Option<&str>,
) -> Result<TagFileWrite> {
    let separator = &options.label_options.caption_separator;
    let existing = sidecar::inspect(path, recorded)?;
    if options.append_tags && !options.overwrite && existing.owner == Owner::User {
        let bytes = existing.bytes.as_deref().unwrap_or_default();
        let content = std::str::from_utf8(bytes).map_err(|_| {
            Error::bad_file(
                path,
                "not UTF-8 text; fix or delete it before --append_tags",
            )
        })?;
        let stripped_separator = separator.trim();
        let old: Vec<&str> = content
            .trim_matches('\n')
            .split(stripped_separator)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let mut merged: Vec<&str> = old.clone();
        merged.extend(tags.iter().filter(|t| !old.contains(t)));
        let text = format!("{}\n", merged.join(separator));
        if text.as_bytes() != bytes {
            crate::infra::fsio::write_atomic(path, text.as_bytes())?;
        }
        return Ok(TagFileWrite::Appended);
    }
    let text = format!("{}\n", tags.join(separator));
    match sidecar::write(path, text.as_bytes(), &existing, options.overwrite)? {
        Outcome::Kept => Ok(TagFileWrite::Kept),
        outcome => {
            if let Outcome::Replaced(backup) = outcome {
                tracing::info!(
                    "{}: replaced the user's tags (--overwrite), kept as {}",
                    path.display(),
                    backup.display()
                );
            }
            Ok(TagFileWrite::Owned(crate::infra::hashing::hash_bytes(
                text.as_bytes(),
            )))
        }
    }
}

/// `--output_path`: JSON Lines when the name ends in `.jsonl`, else one JSON object.
fn write_output_file(output: &Path, records: &[(String, String, (u32, u32))]) -> Result<()> {
    let lines = output.extension().is_some_and(|e| e == "jsonl");
    let mut bytes = Vec::new();
    if lines {
        for (path, tags, (width, height)) in records {
            let quote = |s: &str| serde_json::to_string(s).expect("string serialises");
            bytes.extend_from_slice(
                format!(
                    "{{\"image_path\": {}, \"caption\": {}, \"image_size\": [{width}, {height}]}}\n",
                    quote(path),
                    quote(tags)
                )
                .as_bytes(),
            );
        }
    } else {
        let mut object = serde_json::Map::new();
        for (path, tags, (width, height)) in records {
            object.insert(
                path.clone(),
                serde_json::json!({"tags": tags, "image_size": [width, height]}),
            );
        }
        bytes = crate::infra::pyjson::document_bytes(&object);
    }
    crate::infra::fsio::write_atomic(output, &bytes)
}

/// Records model, parameters, per-image content keys and the shard next to the store.
fn write_manifest(
    options: &TagOptions,
    files: &ModelFiles,
    store_path: &Path,
    store: &ProbabilityStore,
    sidecars: WrittenSidecars,
    summary: &Summary,
    shard: Option<crate::dataset::shard::ShardRecord>,
) -> Result<()> {
    let selection = &options.selection;
    let thresholds = &selection.thresholds;
    let parameters = serde_json::json!({
        "repo_id": options.repo_id,
        "batch_size": options.batch_size,
        "recursive": options.recursive,
        "caption_extension": options.caption_extension,
        "output_path": options.output_path.as_ref().map(|p| p.display().to_string()),
        "general_threshold": thresholds.general,
        "character_threshold": thresholds.character,
        "copyright_threshold": thresholds.copyright,
        "artist_threshold": thresholds.artist,
        "meta_threshold": thresholds.meta,
        "model_threshold": thresholds.model,
        "undesired_tags": selection.undesired.iter().collect::<std::collections::BTreeSet<_>>(),
        "always_first_tags": selection.always_first,
        "rating": format!("{:?}", selection.rating),
        "quality": format!("{:?}", selection.quality),
        "character_tags_first": selection.character_tags_first,
        "character_tag_expand": options.label_options.character_tag_expand,
        "remove_underscore": options.label_options.remove_underscore,
        "tag_replacement": options.label_options.replacements,
        "caption_separator": options.label_options.caption_separator,
        "append_tags": options.append_tags,
        "device": format!("{:?}", options.device),
    });
    let mut manifest =
        crate::formats::manifest::Manifest::new("tag-images", store_path, TAG_STORE_V1, parameters);
    manifest.add_input_hash("model", &files.model, store.model_hash());
    manifest.add_input_file("labels", &files.labels)?;
    manifest.items = store.keys();
    manifest.sidecars = sidecars;
    manifest.summary = summary.clone();
    manifest.shard = shard;
    manifest.write_for(store_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing_matches_sd_scripts_inputs() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let golden = fixtures.join("golden/wd14/preprocessed_inputs.npz");
        let mut archive = npyz::npz::NpzArchive::open(&golden).expect("golden npz present");
        // Downscale (area), white padding (wide and tall), alpha on white, upscale (Lanczos).
        for stem in [
            "astronaut",
            "cell",
            "chelsea",
            "logo",
            "microaneurysms",
            "text",
        ] {
            let image = imaging::open(
                &fixtures.join(format!("images/{stem}.png")),
                &DecodeOptions::default(),
            )
            .unwrap();
            let ours = preprocess(&image, 448, Layout::SmilingWolf);
            let array = archive
                .by_name(&format!("{stem}__bgr_uint8"))
                .unwrap()
                .expect("golden key");
            let expected: Vec<f32> = array
                .into_vec::<u8>()
                .unwrap()
                .into_iter()
                .map(f32::from)
                .collect();
            assert_eq!(ours, expected, "{stem}");
        }
    }

    #[test]
    fn model_folder_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let error = ModelFiles::locate(dir.path(), DEFAULT_REPO_ID).unwrap_err();
        assert!(error
            .to_string()
            .contains("SmilingWolf_wd-v1-4-convnext-tagger-v2"));
        let nested = dir.path().join("owner_repo/sub");
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::write(nested.join("model_optimized.onnx"), b"x").unwrap();
        std::fs::write(nested.join("tag_mapping.json"), b"{}").unwrap();
        let files = ModelFiles::locate(dir.path(), "owner/repo/sub").unwrap();
        assert_eq!(files.layout, Layout::TagMapping);
        assert_eq!(files.model, nested.join("model_optimized.onnx"));
    }
}
