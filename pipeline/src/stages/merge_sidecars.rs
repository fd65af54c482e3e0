//! `merge-captions` and `merge-tags`: caption or tag files beside the images into the metadata
//! JSON (sd-scripts' `merge_captions_to_metadata.py`, `merge_dd_tags_to_metadata.py`).

use std::path::PathBuf;

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::dataset::{find_images, read_sidecar, sidecar_path};
use crate::formats::manifest::{InputRecord, Manifest};
use crate::formats::metadata::{check_unique_keys, image_key, load_input_metadata, Metadata};
use crate::formats::schema::METADATA_V1;
use crate::infra::report::{Progress, Summary};
use crate::{infra::hashing, Error, Result};

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
    // What the last run wrote: an entry whose text it already holds is up to date.
    let previous = match &base_path {
        Some(path) if path == &options.out_json => Some(metadata.clone()),
        _ if options.out_json.is_file() => load_input_metadata(&options.out_json).ok(),
        _ => None,
    };
    tracing::info!(
        "found {} images; merging {} from *{}",
        discovery.images.len(),
        match options.field {
            SidecarField::Caption => "captions",
            SidecarField::Tags => "tags",
        },
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
        summary.fail(path, &crate::dataset::not_a_file(path));
    }
    let mut digest = hashing::KeyBuilder::new(options.field.tool(), 1);
    for (image, result) in discovery.images.iter().zip(texts) {
        match result {
            Ok((key, text)) => {
                if options.debug {
                    tracing::info!("{key} {text}");
                }
                digest.text("key", &key).text(field, &text);
                let unchanged = (previous.as_ref())
                    .and_then(|p| p.get(&key)?.get(field)?.as_str())
                    .is_some_and(|old| old == text);
                metadata
                    .entry_mut(&key)
                    .insert(field.to_string(), Value::String(text));
                if unchanged {
                    summary.up_to_date += 1;
                } else {
                    summary.done += 1;
                }
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
        items: Some(summary.done + summary.up_to_date),
    });
    manifest.summary = summary.clone();
    manifest.write_for(&options.out_json)?;
    Ok(summary)
}
