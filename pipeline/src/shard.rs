//! `--shard i/n`: split a per-image stage over `n` machines with a stable assignment.
//!
//! An item belongs to shard `i` when the BLAKE3 hash of its identity (the image path relative to
//! the dataset folder, or its metadata key) modulo `n` equals `i`. The assignment depends only on
//! the item itself, so every machine computes the same split without reading the other items,
//! and adding images moves no existing image to another shard.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::manifest::Manifest;
use crate::metadata::{write_python_json, Metadata};
use crate::report::Summary;
use crate::schema::METADATA_V1;
use crate::{fsio, Error, Result};

/// One part of a sharded run: shard `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This machine's part, `0..count`.
    pub index: u64,
    /// Number of parts.
    pub count: u64,
}

impl Shard {
    /// The whole dataset as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// True when the item with identity `key` belongs to this shard.
    pub fn contains(&self, key: &str) -> bool {
        if self.count == 1 {
            return true;
        }
        let hash = blake3::hash(key.as_bytes());
        let head = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
        head % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        let usage = || format!("--shard expects i/n with 0 <= i < n (e.g. 0/3), got {text:?}");
        let (index, count) = text.split_once('/').ok_or_else(usage)?;
        let index: u64 = index.trim().parse().map_err(|_| usage())?;
        let count: u64 = count.trim().parse().map_err(|_| usage())?;
        if count == 0 || index >= count {
            return Err(usage());
        }
        Ok(Shard { index, count })
    }
}

/// Joins the JSON outputs of a sharded stage (and their manifests) into one output.
///
/// Metadata JSON (`lorakit.metadata/v1`) is merged entry by entry; other stage documents merge
/// their `entries` object, and every other field must be equal across shards. Entries keep the
/// order of `order_like` (e.g. the stage's input metadata) when given, else sorted by key, which
/// is the order an unsharded run writes. Returns the combined summary of the shard runs.
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
    let mut manifests = Vec::with_capacity(shards.len());
    for shard in shards {
        let manifest = Manifest::read_for(shard)?.ok_or_else(|| {
            Error::bad_file(
                shard,
                "has no manifest: only outputs of lorakit stages run with --shard can be merged",
            )
        })?;
        if manifest.output_schema
            != manifests
                .first()
                .map_or(&manifest, |m: &Manifest| m)
                .output_schema
        {
            return Err(Error::schema(
                shard,
                format!(
                    "is a {} document, unlike {}",
                    manifest.output_schema,
                    first.display()
                ),
            ));
        }
        manifests.push(manifest);
    }
    let schema_id = manifests[0].output_schema.clone();
    let order = match order_like {
        Some(path) => Some(
            Metadata::load(path)?
                .iter()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>(),
        ),
        None => None,
    };

    let combined = if schema_id == METADATA_V1 {
        let mut entries = Map::new();
        for shard in shards {
            for (key, entry) in Metadata::load(shard)?.iter() {
                entries.insert(key.clone(), Value::Object(entry.clone()));
            }
        }
        Value::Object(reorder(entries, order.as_deref()))
    } else {
        let mut document: Option<Value> = None;
        let mut entries = Map::new();
        for shard in shards {
            let mut value: Value = serde_json::from_slice(&fsio::read(shard)?)
                .map_err(|e| Error::bad_file(shard, format!("not valid JSON ({e})")))?;
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
                        first.display()
                    ),
                    ))
                }
            }
        }
        let mut document = document.expect("at least one shard");
        document["entries"] = Value::Object(reorder(entries, order.as_deref()));
        document
    };

    let bytes = if schema_id == METADATA_V1 {
        Metadata::from_value(combined)
            .map_err(|m| Error::schema(first, m))?
            .to_bytes()
    } else {
        let mut bytes = Vec::new();
        write_python_json(&mut bytes, &combined, 2, false).expect("writing to memory");
        bytes.push(b'\n');
        bytes
    };
    fsio::write_atomic(output, &bytes)?;

    let mut manifest = manifests[0].clone();
    manifest.output = output
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    manifest.summary = Summary::default();
    manifest.items.clear();
    for part in &manifests {
        manifest.items.extend(part.items.clone());
        manifest.summary.done += part.summary.done;
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

    #[test]
    fn shards_partition_items() {
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        for n in 0..300 {
            let key = format!("img_{n}.png");
            assert_eq!(shards.iter().filter(|s| s.contains(&key)).count(), 1);
        }
        let sizes: Vec<usize> = shards
            .iter()
            .map(|s| {
                (0..300)
                    .filter(|n| s.contains(&format!("img_{n}.png")))
                    .count()
            })
            .collect();
        assert!(sizes.iter().all(|&c| c > 70), "{sizes:?}");
    }

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

    #[test]
    fn parsing() {
        assert_eq!(
            "2/5".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 5 }
        );
        assert!("5/5".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
    }
}
