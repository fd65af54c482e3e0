//! `--shard i/n`: split a per-image stage over `n` machines with a stable assignment.
//!
//! An item belongs to shard `i` when the BLAKE3 hash of its identity modulo `n` equals `i`. The
//! identity of an image is its path relative to the dataset folder (`tag-images`,
//! `caption-images`, `prepare-latents`: one image lands on the same shard in every stage); a
//! `cache-text-encoder` entry, which reads no image, is identified by its metadata key. The
//! assignment is a function of the path alone, not of the image bytes or of the other items:
//! deciding ownership reads nothing, so no machine opens an image it does not own, every machine
//! computes the same split, and adding images moves no existing image to another shard.
//!
//! Per-image outputs (tag and caption files, latent and text-encoder caches) are written as in
//! an unsharded run. A run's own files (metadata JSON, cache index, caption index,
//! tag-probability store, `--output_path`) get a shard-named path ([`Shard::output_path`]) so
//! shards sharing a folder never overwrite each other; [`merge_shard_outputs`] joins them.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::caption::CAPTION_INDEX_V1;
use crate::manifest::Manifest;
use crate::metadata::{write_python_json, Metadata};
use crate::report::Summary;
use crate::schema::METADATA_V1;
use crate::tagger::store::{ProbabilityStore, FORMAT as TAG_STORE_V1};
use crate::{dataset, fsio, Error, Result};

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

    /// True when `image`, found under the dataset folder `root`, belongs to this shard (its
    /// identity is its path relative to `root`, see [`dataset::relative_name`]).
    pub fn contains_image(&self, root: &Path, image: &Path) -> bool {
        self.count == 1 || self.contains(&dataset::relative_name(root, image))
    }

    /// Where this shard writes a run output that would be `path` unsharded: `path` itself for
    /// the whole dataset, else `.shard-<i>-of-<n>` before the extension
    /// (`meta_lat.json` -> `meta_lat.shard-0-of-3.json`).
    pub fn output_path(&self, path: &Path) -> PathBuf {
        if *self == Shard::ALL {
            return path.to_path_buf();
        }
        let mut name = path.file_stem().unwrap_or_default().to_os_string();
        name.push(format!(".shard-{}-of-{}", self.index, self.count));
        if let Some(extension) = path.extension() {
            name.push(".");
            name.push(extension);
        }
        path.with_file_name(name)
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
        match read_json(shard)? {
            Value::Object(part) => entries.extend(part),
            _ => {
                return Err(Error::schema(
                    shard,
                    "a caption index must be a JSON object",
                ))
            }
        }
    }
    Ok(python_json_bytes(&Value::Object(reorder(entries, None))))
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
        let mut value = read_json(shard)?;
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
    Ok(python_json_bytes(&document))
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_slice(&fsio::read(path)?)
        .map_err(|e| Error::bad_file(path, format!("not valid JSON ({e})")))
}

/// `value` as the stages write their JSON documents (indent 2, UTF-8, final newline).
fn python_json_bytes(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_python_json(&mut bytes, value, 2, false).expect("writing to memory");
    bytes.push(b'\n');
    bytes
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
    fn shard_outputs_are_named_apart() {
        let shard = Shard { index: 1, count: 3 };
        assert_eq!(
            shard.output_path(Path::new("out/meta_lat.json")),
            Path::new("out/meta_lat.shard-1-of-3.json")
        );
        assert_eq!(
            shard.output_path(Path::new("d/.lorakit-tag-probs.bin")),
            Path::new("d/.lorakit-tag-probs.shard-1-of-3.bin")
        );
        assert_eq!(
            Shard::ALL.output_path(Path::new("meta.json")),
            Path::new("meta.json")
        );
        let root = Path::new("data");
        let image = Path::new("data/sub/a.png");
        assert_eq!(
            shard.contains_image(root, image),
            shard.contains("sub/a.png")
        );
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
