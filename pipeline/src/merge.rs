//! The metadata stages: `merge-captions`, `merge-tags` (sidecar files → metadata JSON) and
//! `clean-captions` (metadata JSON → cleaned metadata JSON).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::clean::{clean_caption, clean_tags, UserFilter};
use crate::dataset::{find_images, read_sidecar, sidecar_path};
use crate::manifest::{InputRecord, Manifest};
use crate::metadata::{check_unique_keys, image_key, Metadata};
use crate::report::{Progress, Summary};
use crate::schema::METADATA_V1;
use crate::{hashing, Error, Result};

/// Which metadata field a merge fills from sidecar files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarField {
    /// `caption`, from `.caption` files (BLIP captions).
    Caption,
    /// `tags`, from `.txt` files (WD14 tags).
    Tags,
}

impl SidecarField {
    /// The metadata field name.
    pub fn name(self) -> &'static str {
        match self {
            SidecarField::Caption => "caption",
            SidecarField::Tags => "tags",
        }
    }

    /// The tool that merges this field.
    pub fn tool(self) -> &'static str {
        match self {
            SidecarField::Caption => "merge-captions",
            SidecarField::Tags => "merge-tags",
        }
    }
}

/// Options of `merge-captions` / `merge-tags` (sd-scripts flag names).
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The folder of training images.
    pub train_data_dir: PathBuf,
    /// The metadata JSON to write.
    pub out_json: PathBuf,
    /// Base metadata (default: `out_json` when it exists).
    pub in_json: Option<PathBuf>,
    /// Sidecar extension, with its dot.
    pub caption_extension: String,
    /// Key images by path instead of stem.
    pub full_path: bool,
    /// Search subfolders (requires `full_path`).
    pub recursive: bool,
    /// Print every merged entry.
    pub debug: bool,
    /// Hide progress.
    pub quiet: bool,
    /// The field to fill.
    pub field: SidecarField,
}

/// Loads a metadata JSON a stage reads: its manifest (if any) must declare
/// `lorakit.metadata/v1`, and the document must follow that schema.
pub fn load_input_metadata(path: &Path) -> Result<Metadata> {
    Manifest::check_input(path, METADATA_V1)?;
    Metadata::load(path)
}

/// Runs `merge-captions` or `merge-tags`.
pub fn merge_sidecars(options: &MergeOptions) -> Result<Summary> {
    if options.recursive && !options.full_path {
        return Err(Error::Usage(
            "--recursive requires --full_path (stem keys of subfolders would collide)".into(),
        ));
    }
    let field = options.field.name();
    let discovery = find_images(&options.train_data_dir, options.recursive)?;
    check_unique_keys(&discovery.images, options.full_path)?;
    let base_path = options
        .in_json
        .clone()
        .or_else(|| options.out_json.exists().then(|| options.out_json.clone()));
    let mut metadata = match &base_path {
        Some(path) => load_input_metadata(path)?,
        None => Metadata::new(),
    };
    tracing::info!(
        "found {} images; merging {field}s from *{}",
        discovery.images.len(),
        options.caption_extension
    );

    let progress = Progress::new(options.field.tool(), discovery.images.len(), options.quiet);
    let texts: Vec<Result<(String, String)>> = discovery
        .images
        .par_iter()
        .map(|image| {
            let key = image_key(image, options.full_path)?;
            let text = read_sidecar(&sidecar_path(image, &options.caption_extension));
            progress.inc(1);
            Ok((key, text?))
        })
        .collect();
    progress.finish();

    let mut summary = Summary::default();
    for path in &discovery.not_files {
        summary.fail(
            path,
            &Error::bad_file(
                path,
                "named like an image but is not a regular file; skipped",
            ),
        );
    }
    let mut digest = hashing::KeyBuilder::new(options.field.tool(), 1);
    for (image, result) in discovery.images.iter().zip(texts) {
        match result {
            Ok((key, text)) => {
                if options.debug {
                    eprintln!("{key} {text}");
                }
                digest.text("key", &key).text(field, &text);
                metadata
                    .entry_mut(&key)
                    .insert(field.to_string(), Value::String(text));
                summary.done += 1;
            }
            Err(error) => summary.fail(image, &error),
        }
    }

    metadata.save(&options.out_json)?;
    let parameters = json!({
        "train_data_dir": options.train_data_dir.display().to_string(),
        "caption_extension": options.caption_extension,
        "full_path": options.full_path,
        "recursive": options.recursive,
    });
    let mut manifest = Manifest::new(
        options.field.tool(),
        &options.out_json,
        METADATA_V1,
        parameters,
    );
    if let Some(path) = &base_path {
        if path != &options.out_json {
            manifest.add_input_file("in_json", path)?;
        }
    }
    manifest.inputs.push(InputRecord {
        role: format!("{field} sidecars"),
        path: None,
        blake3: digest.finish(),
        items: Some(summary.done),
    });
    manifest.summary = summary.clone();
    manifest.write_for(&options.out_json)?;
    Ok(summary)
}

/// Options of `clean-captions`.
#[derive(Debug, Clone)]
pub struct CleanOptions {
    /// The metadata JSON to clean.
    pub in_json: PathBuf,
    /// Where to write the cleaned metadata.
    pub out_json: PathBuf,
    /// Optional user filter list applied after the built-in rules.
    pub filter: Option<PathBuf>,
    /// Print every cleaned entry.
    pub debug: bool,
}

/// Runs `clean-captions`: the sd-scripts cleaning rules on every entry, then the user filter.
pub fn clean_metadata(options: &CleanOptions) -> Result<Summary> {
    let mut metadata = load_input_metadata(&options.in_json)?;
    let filter = options
        .filter
        .as_deref()
        .map(UserFilter::load)
        .transpose()?;
    let mut entries: Vec<_> = metadata.iter_mut().collect();
    entries
        .par_iter_mut()
        .for_each(|(key, entry)| clean_entry(key, entry, filter.as_ref(), options.debug));
    let summary = Summary {
        done: entries.len(),
        ..Summary::default()
    };
    metadata.save(&options.out_json)?;
    let parameters = json!({ "filter": options.filter.as_ref().map(|p| p.display().to_string()) });
    let mut manifest = Manifest::new("clean-captions", &options.out_json, METADATA_V1, parameters);
    manifest.add_input_file("in_json", &options.in_json)?;
    if let Some(path) = &options.filter {
        manifest.add_input_file("filter", path)?;
    }
    manifest.summary = summary.clone();
    manifest.write_for(&options.out_json)?;
    Ok(summary)
}

/// Cleans the `tags` and `caption` of one metadata entry in place (a missing field is logged).
fn clean_entry(
    key: &str,
    entry: &mut Map<String, Value>,
    filter: Option<&UserFilter>,
    debug: bool,
) {
    match entry.get("tags").and_then(Value::as_str) {
        Some(tags) => {
            let mut cleaned = clean_tags(key, tags);
            if let Some(filter) = filter {
                cleaned = filter.apply_to_tags(&cleaned);
            }
            entry.insert("tags".into(), Value::String(cleaned));
        }
        None => tracing::info!("{key}: no tags"),
    }
    match entry.get("caption").and_then(Value::as_str) {
        Some(caption) => {
            let mut cleaned = clean_caption(caption);
            if let Some(filter) = filter {
                cleaned = filter.apply_to_caption(&cleaned);
            }
            entry.insert("caption".into(), Value::String(cleaned));
        }
        None => tracing::info!("{key}: no caption"),
    }
    if debug {
        eprintln!("{key} {}", Value::Object(entry.clone()));
    }
}
