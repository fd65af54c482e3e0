//! `clean-captions`: sd-scripts' caption and tag cleaning rules (`clean_captions_and_tags.py`),
//! then the user's own filter, on every entry of a metadata JSON.

use std::path::PathBuf;

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::formats::manifest::Manifest;
use crate::formats::metadata::load_input_metadata;
use crate::formats::schema::METADATA_V1;
use crate::infra::report::Summary;
use crate::text::clean::{clean_caption, clean_tags, UserFilter};
use crate::Result;

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
pub fn run(options: &CleanOptions) -> Result<Summary> {
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
        let entry = Value::Object(entry.clone());
        tracing::info!("{key} {entry}");
    }
}
