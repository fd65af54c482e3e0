//! `merge-shards`: joins the run outputs of a stage run with `--shard i/n` on several machines
//! (and their manifests) into the output one unsharded run writes.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::formats::manifest::Manifest;
use crate::formats::metadata::Metadata;
use crate::formats::schema::{CAPTION_INDEX_V1, METADATA_V1, TAG_STORE_V1};
use crate::formats::tag_store::ProbabilityStore;
use crate::infra::pyjson;
use crate::infra::report::Summary;
use crate::{infra::fsio, Error, Result};

/// Joins the run outputs of a sharded stage (and their manifests) into one output.
///
/// By the schema id in the shards' manifests: metadata JSON (`lorakit.metadata/v1`, e.g.
/// `prepare-latents` with `train_resolution`) is merged entry by entry; a caption index
/// (`caption-images`) key by key; tag-probability stores (`tag-images`) row by row, refusing
/// stores of another model; other stage documents (the `cache-text-encoder` index) merge their
/// `entries` object, and every other field must be equal across shards. Metadata entries keep
/// the order of `order_like` (e.g. the stage's input metadata) when given, else sorted by key,
/// which is the order an unsharded run writes. Returns the combined summary of the shard runs.
pub fn merge_shard_outputs(
    shards: &[PathBuf],
    output: &Path,
    order_like: Option<&Path>,
) -> Result<Summary> {
    let Some(first) = shards.first() else {
        return Err(Error::Usage(
            "give at least one shard output to merge".into(),
        ));
    };
    let mut manifests: Vec<Manifest> = Vec::with_capacity(shards.len());
    for shard in shards {
        let manifest = Manifest::read_for(shard)?.ok_or_else(|| {
            Error::bad_file(
                shard,
                "has no manifest: only outputs of lorakit stages run with --shard can be merged",
            )
        })?;
        if let Some(seen) = manifests.first() {
            if manifest.output_schema != seen.output_schema {
                return Err(Error::schema(
                    shard,
                    format!(
                        "is a {} document, unlike {} ({})",
                        manifest.output_schema,
                        first.display(),
                        seen.output_schema
                    ),
                ));
            }
        }
        manifests.push(manifest);
    }
    let order = match order_like {
        Some(path) => Some(
            Metadata::load(path)?
                .iter()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>(),
        ),
        None => None,
    };

    match manifests[0].output_schema.as_str() {
        METADATA_V1 => fsio::write_atomic(output, &join_metadata(shards, order.as_deref())?)?,
        CAPTION_INDEX_V1 => fsio::write_atomic(output, &join_caption_indexes(shards)?)?,
        TAG_STORE_V1 => join_tag_stores(shards)?.save(output)?,
        _ => fsio::write_atomic(output, &join_entry_documents(shards, order.as_deref())?)?,
    }

    let mut manifest = manifests[0].clone();
    manifest.output = output
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    manifest.summary = Summary::default();
    manifest.items.clear();
    manifest.sidecars.clear();
    for part in &manifests {
        manifest.items.extend(part.items.clone());
        manifest.sidecars.extend(part.sidecars.clone());
        manifest.summary.done += part.summary.done;
        manifest.summary.kept += part.summary.kept;
        manifest.summary.up_to_date += part.summary.up_to_date;
        manifest
            .summary
            .failures
            .extend(part.summary.failures.iter().cloned());
        for input in &part.inputs {
            if !manifest.inputs.contains(input) {
                manifest.inputs.push(input.clone());
            }
        }
    }
    manifest.write_for(output)?;
    Ok(manifest.summary)
}

/// Metadata JSON shards, entry by entry, written as sd-scripts writes metadata.
fn join_metadata(shards: &[PathBuf], order: Option<&[String]>) -> Result<Vec<u8>> {
    let mut entries = Map::new();
    for shard in shards {
        for (key, entry) in Metadata::load(shard)?.iter() {
            entries.insert(key.clone(), Value::Object(entry.clone()));
        }
    }
    Ok(Metadata::from_value(Value::Object(reorder(entries, order)))
        .map_err(|m| Error::schema(&shards[0], m))?
        .to_bytes())
}

/// Caption indexes (image -> caption objects), sorted by image as `caption-images` writes them.
fn join_caption_indexes(shards: &[PathBuf]) -> Result<Vec<u8>> {
    let mut entries = Map::new();
    for shard in shards {
        match pyjson::read_document(shard)? {
            Value::Object(part) => entries.extend(part),
            _ => {
                return Err(Error::schema(
                    shard,
                    "a caption index must be a JSON object",
                ))
            }
        }
    }
    Ok(pyjson::document_bytes(&Value::Object(reorder(
        entries, None,
    ))))
}

/// Tag-probability stores of one model, row by row.
fn join_tag_stores(shards: &[PathBuf]) -> Result<ProbabilityStore> {
    let mut joined: Option<ProbabilityStore> = None;
    for shard in shards {
        let store = ProbabilityStore::load(shard)?
            .ok_or_else(|| Error::bad_file(shard, "tag-probability store not found"))?;
        match &mut joined {
            None => joined = Some(store),
            Some(joined) => joined.absorb(store).map_err(|m| Error::schema(shard, m))?,
        }
    }
    Ok(joined.expect("at least one shard"))
}

/// Documents with an `entries` object (the text-encoder cache index): entries joined, every
/// other field equal across shards.
fn join_entry_documents(shards: &[PathBuf], order: Option<&[String]>) -> Result<Vec<u8>> {
    let mut document: Option<Value> = None;
    let mut entries = Map::new();
    for shard in shards {
        let mut value = pyjson::read_document(shard)?;
        let Some(Value::Object(part)) = value.as_object_mut().and_then(|o| o.remove("entries"))
        else {
            return Err(Error::schema(shard, "has no \"entries\" object to merge"));
        };
        entries.extend(part);
        match &document {
            None => document = Some(value),
            Some(seen) if *seen == value => {}
            Some(_) => {
                return Err(Error::schema(
                    shard,
                    format!(
                        "was made with other settings or models than {}; re-run the shards alike",
                        shards[0].display()
                    ),
                ))
            }
        }
    }
    let mut document = document.expect("at least one shard");
    document["entries"] = Value::Object(reorder(entries, order));
    Ok(pyjson::document_bytes(&document))
}

/// Puts `entries` in the order of `order` (unknown keys last, sorted), or sorted by key.
fn reorder(mut entries: Map<String, Value>, order: Option<&[String]>) -> Map<String, Value> {
    let mut ordered = Map::with_capacity(entries.len());
    for key in order.unwrap_or_default() {
        if let Some(value) = entries.remove(key) {
            ordered.insert(key.clone(), value);
        }
    }
    let mut rest: Vec<_> = entries.into_iter().collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    ordered.extend(rest);
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::shard::Shard;

    #[test]
    fn merging_metadata_shards_restores_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut whole = Metadata::new();
        let mut parts = vec![Metadata::new(), Metadata::new(), Metadata::new()];
        for n in 0..20 {
            let key = format!("img_{n:02}.png");
            let shard = (0..3)
                .find(|i| {
                    Shard {
                        index: *i,
                        count: 3,
                    }
                    .contains(&key)
                })
                .unwrap();
            for doc in [&mut whole, &mut parts[shard as usize]] {
                doc.entry_mut(&key)
                    .insert("caption".into(), Value::String(format!("c{n}")));
            }
        }
        let mut paths = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let path = dir.path().join(format!("meta.shard{i}.json"));
            part.save(&path).unwrap();
            let mut manifest = Manifest::new("test", &path, METADATA_V1, serde_json::json!({}));
            manifest.summary.done = part.len();
            manifest.write_for(&path).unwrap();
            paths.push(path);
        }
        let out = dir.path().join("meta.json");
        let summary = merge_shard_outputs(&paths, &out, None).unwrap();
        assert_eq!(summary.done, 20);
        assert_eq!(std::fs::read(&out).unwrap(), whole.to_bytes());
    }
}
