//! `merge-shards`: joins the run outputs of a stage run with `--shard i/n` on several machines
//! (and their manifests) into the output one unsharded run writes.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::dataset::shard::Shard;
use crate::formats::manifest::Manifest;
use crate::formats::metadata::Metadata;
use crate::formats::schema::{CAPTION_INDEX_V1, METADATA_V1, TAG_STORE_V1};
use crate::formats::tag_store::ProbabilityStore;
use crate::infra::pyjson;
use crate::infra::report::Summary;
use crate::{infra::fsio, Error, Result};

/// Joins the run outputs of a sharded stage (and their manifests) into one output.
///
/// First checks that `shards` are every part of one run, each once ([`check_one_whole_run`]):
/// a missing or repeated shard is a usage error, an output that is no shard or belongs to
/// another run (another stage, dataset, parameters or model) is refused naming it. Then, by
/// the schema id in the shards' manifests: metadata JSON (`lorakit.metadata/v1`, e.g.
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
    if shards.is_empty() {
        return Err(Error::Usage(
            "give at least one shard output to merge".into(),
        ));
    }
    let mut manifests: Vec<Manifest> = Vec::with_capacity(shards.len());
    for shard in shards {
        let manifest = Manifest::read_for(shard)?.ok_or_else(|| {
            Error::bad_file(
                shard,
                "has no manifest: only outputs of lorakit stages run with --shard can be merged",
            )
        })?;
        manifests.push(manifest);
    }
    check_one_whole_run(shards, &manifests)?;
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
    manifest.shard = None;
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

/// Checks that `shards` (with their `manifests`) are the outputs of every shard of one run,
/// each once: the same stage, output schema, parameters, inputs (by content), shard count and
/// dataset. A shard output of an older lorakit, whose manifest records no shard, is recognised
/// by its shard-named path (with a warning: its dataset cannot be checked).
fn check_one_whole_run(shards: &[PathBuf], manifests: &[Manifest]) -> Result<()> {
    let mut parts: Vec<(Shard, Option<&str>)> = Vec::with_capacity(shards.len());
    for (path, manifest) in shards.iter().zip(manifests) {
        let part = match &manifest.shard {
            Some(record) => (record.shard(), Some(record.dataset.as_str())),
            None => {
                let Some((shard, _)) = Shard::from_output_path(path) else {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "is not the output of a run with --shard: its manifest records no \
                             shard and its name has no .shard-<i>-of-<n> (it is a whole {} \
                             document); give only the shard outputs of one run",
                            manifest.output_schema
                        ),
                    ));
                };
                tracing::warn!(
                    "{}: the manifest records no shard (written by an older lorakit); taken as \
                     shard {}/{} from its name, without checking that it belongs to the same \
                     dataset as the others",
                    path.display(),
                    shard.index,
                    shard.count
                );
                (shard, None)
            }
        };
        parts.push(part);
    }
    let (first, first_manifest, (first_shard, first_dataset)) =
        (&shards[0], &manifests[0], parts[0]);
    let other_run = |path: &Path, what: String| {
        Error::bad_file(
            path,
            format!(
                "{what} than {}: it comes from another run; merge the shard outputs of one run \
                 (re-run the shards alike)",
                first.display()
            ),
        )
    };
    for (path, (manifest, &(shard, dataset))) in shards.iter().zip(manifests.iter().zip(&parts)) {
        if manifest.output_schema != first_manifest.output_schema {
            return Err(Error::schema(
                path,
                format!(
                    "is a {} document, unlike {} ({})",
                    manifest.output_schema,
                    first.display(),
                    first_manifest.output_schema
                ),
            ));
        }
        if manifest.tool != first_manifest.tool {
            return Err(other_run(
                path,
                format!("was written by {}, another stage", manifest.tool),
            ));
        }
        if shard.count != first_shard.count {
            return Err(other_run(
                path,
                format!(
                    "is shard {}/{}, split in {} parts, not {}",
                    shard.index, shard.count, shard.count, first_shard.count
                ),
            ));
        }
        if let (Some(dataset), Some(first_dataset)) = (dataset, first_dataset) {
            if dataset != first_dataset {
                return Err(other_run(
                    path,
                    "was split from another dataset (other images or metadata keys)".into(),
                ));
            }
        }
        if manifest.parameters != first_manifest.parameters {
            let differing = differing_keys(&manifest.parameters, &first_manifest.parameters);
            return Err(other_run(
                path,
                format!("was run with other parameters ({differing})"),
            ));
        }
        let contents = |m: &Manifest| {
            let mut inputs: Vec<(String, String)> = m
                .inputs
                .iter()
                .map(|input| (input.role.clone(), input.blake3.clone()))
                .collect();
            inputs.sort();
            inputs
        };
        if contents(manifest) != contents(first_manifest) {
            return Err(other_run(
                path,
                "read other inputs (model or input metadata, by content)".into(),
            ));
        }
    }
    let count = first_shard.count;
    let mut given: Vec<Option<&PathBuf>> = vec![None; count as usize];
    for (path, (shard, _)) in shards.iter().zip(&parts) {
        if let Some(earlier) = given[shard.index as usize].replace(path) {
            return Err(Error::Usage(format!(
                "{} and {} are both shard {}/{count}; give each shard's output once",
                earlier.display(),
                path.display(),
                shard.index
            )));
        }
    }
    let missing: Vec<String> = (0..count)
        .filter(|index| given[*index as usize].is_none())
        .map(|index| {
            let shard = Shard { index, count };
            match Shard::from_output_path(first) {
                Some((_, whole)) => format!(
                    "shard {index}/{count} ({})",
                    shard.output_path(&whole).display()
                ),
                None => format!("shard {index}/{count}"),
            }
        })
        .collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "{} {} missing: the run was split in {count} shards and the join needs every one; \
             run the missing shard(s) with --shard i/{count} and give all outputs",
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" }
        )));
    }
    Ok(())
}

/// The top-level keys whose values differ between two parameter objects, for messages.
fn differing_keys(a: &Value, b: &Value) -> String {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return "another parameter layout".into();
    };
    let mut keys: Vec<&str> = a
        .keys()
        .chain(b.keys())
        .filter(|key| a.get(*key) != b.get(*key))
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys.join(", ")
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

    const SHARDS: u64 = 3;

    /// Writes `whole` split in shards as a sharded run does (shard-named paths, manifests with
    /// their shard records over every key of `whole`) and returns the shard paths.
    fn write_shards(dir: &Path, whole: &Metadata, parameters: Value) -> Vec<PathBuf> {
        let keys: Vec<&String> = whole.iter().map(|(k, _)| k).collect();
        (0..SHARDS)
            .map(|index| {
                let shard = Shard {
                    index,
                    count: SHARDS,
                };
                let mut part = whole.clone();
                part.retain(|key| shard.contains(key));
                let path = shard.output_path(&dir.join("meta.json"));
                part.save(&path).unwrap();
                let mut manifest = Manifest::new("test", &path, METADATA_V1, parameters.clone());
                manifest.summary.done = part.len();
                manifest.shard = shard.record(&keys);
                manifest.write_for(&path).unwrap();
                path
            })
            .collect()
    }

    fn metadata(names: &str, count: usize) -> Metadata {
        let mut whole = Metadata::new();
        for n in 0..count {
            whole
                .entry_mut(&format!("{names}_{n:02}.png"))
                .insert("caption".into(), Value::String(format!("c{n}")));
        }
        whole
    }

    fn refusal(shards: &[PathBuf], out: &Path) -> (String, bool) {
        let error = merge_shard_outputs(shards, out, None).unwrap_err();
        assert!(!out.exists(), "a refused merge wrote {}", out.display());
        let usage = matches!(error, Error::Usage(_));
        (error.to_string(), usage)
    }

    #[test]
    fn merging_metadata_shards_restores_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        let whole = metadata("img", 20);
        let mut paths = write_shards(dir.path(), &whole, serde_json::json!({}));
        paths.reverse();
        let out = dir.path().join("joined.json");
        let summary = merge_shard_outputs(&paths, &out, None).unwrap();
        assert_eq!(summary.done, 20);
        assert_eq!(std::fs::read(&out).unwrap(), whole.to_bytes());
        assert_eq!(Manifest::read_for(&out).unwrap().unwrap().shard, None);
    }

    #[test]
    fn an_incomplete_or_repeated_shard_set_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_shards(dir.path(), &metadata("img", 20), serde_json::json!({}));
        let out = dir.path().join("joined.json");
        let (message, usage) = refusal(&[paths[0].clone(), paths[2].clone()], &out);
        assert!(usage, "{message}");
        assert!(
            message.contains("shard 1/3") && message.contains("meta.shard-1-of-3.json"),
            "{message}"
        );
        let (message, usage) = refusal(
            &[paths[0].clone(), paths[1].clone(), paths[1].clone()],
            &out,
        );
        assert!(usage && message.contains("both shard 1/3"), "{message}");
    }

    #[test]
    fn outputs_of_other_runs_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("joined.json");
        let ours = write_shards(dir.path(), &metadata("img", 20), serde_json::json!({}));
        let elsewhere = dir.path().join("other");
        std::fs::create_dir(&elsewhere).unwrap();

        // Shard 1 of a run over another dataset.
        let theirs = write_shards(&elsewhere, &metadata("pic", 20), serde_json::json!({}));
        let (message, usage) =
            refusal(&[ours[0].clone(), theirs[1].clone(), ours[2].clone()], &out);
        assert!(!usage, "{message}");
        assert!(
            message.contains(&theirs[1].display().to_string())
                && message.contains("another dataset"),
            "{message}"
        );

        // Shard 1 of the same dataset run with other parameters.
        let theirs = write_shards(
            &elsewhere,
            &metadata("img", 20),
            serde_json::json!({"seed": 2}),
        );
        let (message, _) = refusal(&[ours[0].clone(), theirs[1].clone(), ours[2].clone()], &out);
        assert!(message.contains("other parameters (seed)"), "{message}");

        // A whole (unsharded) metadata file with its manifest.
        let plain = dir.path().join("meta_cap.json");
        metadata("img", 3).save(&plain).unwrap();
        Manifest::new("merge-captions", &plain, METADATA_V1, serde_json::json!({}))
            .write_for(&plain)
            .unwrap();
        let (message, _) = refusal(&[ours[0].clone(), plain.clone()], &out);
        assert!(
            message.contains("meta_cap.json")
                && message.contains("not the output of a run with --shard"),
            "{message}"
        );
    }

    #[test]
    fn shard_outputs_of_older_versions_are_taken_from_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let whole = metadata("img", 20);
        let paths = write_shards(dir.path(), &whole, serde_json::json!({}));
        for path in &paths {
            let mut manifest = Manifest::read_for(path).unwrap().unwrap();
            manifest.shard = None;
            manifest.write_for(path).unwrap();
        }
        let out = dir.path().join("joined.json");
        merge_shard_outputs(&paths, &out, None).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), whole.to_bytes());
        let (message, usage) = refusal(&paths[..2], &dir.path().join("part.json"));
        assert!(usage && message.contains("shard 2/3"), "{message}");
    }
}
