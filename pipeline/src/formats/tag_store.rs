//! The tag-probability store: every image's full output vector, so thresholds, undesired tags
//! and replacements can be re-applied without running the model again, and re-runs only infer
//! new or changed images.
//!
//! One file per dataset (default `<train_data_dir>/.lorakit/tag-probs.bin`):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `LKTAGP01` |
//! | 8 | header length `L` (u64 little-endian) |
//! | L | header JSON: `format`, `model_hash`, `outputs` (T), `entries` |
//! | N·T·4 | probabilities, f32 little-endian, one row per entry in entry order |
//!
//! Each entry records the image path relative to the dataset folder, its size and modification
//! time (to skip re-hashing unchanged files), the BLAKE3 hash of its bytes and the content key
//! (image hash + model hash + preprocessing version) its row was computed for.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dataset::imaging::DecodeOptions;
use crate::infra::hashing::KeyBuilder;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"LKTAGP01";
/// Format identifier written in the header.
pub const FORMAT: &str = crate::formats::schema::TAG_STORE_V1;
/// Version of the preprocessing folded into every content key; bump when it changes.
const PREPROCESS_VERSION: u32 = 1;

/// Identity of one image file as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the dataset folder, `/`-separated.
    pub path: String,
    /// File size in bytes when hashed.
    pub size: u64,
    /// Modification time (ns since the epoch) when hashed.
    pub mtime_ns: u128,
    /// BLAKE3 of the file bytes.
    pub image_hash: String,
    /// Content key of the probabilities.
    pub key: String,
    /// Decoded `(width, height)` of the image.
    pub image_size: (u32, u32),
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    model_hash: String,
    outputs: usize,
    entries: Vec<Entry>,
}

/// Probabilities of a dataset's images for one model.
#[derive(Debug, Clone, Default)]
pub struct ProbabilityStore {
    model_hash: String,
    outputs: usize,
    rows: HashMap<String, (Entry, Vec<f32>)>,
}

impl ProbabilityStore {
    /// An empty store for the model with `model_hash` producing `outputs` values.
    pub fn new(model_hash: &str, outputs: usize) -> Self {
        ProbabilityStore {
            model_hash: model_hash.to_string(),
            outputs,
            rows: HashMap::new(),
        }
    }

    /// Loads `path`; `Ok(None)` when the file does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let bad = |message: &str| {
            Error::bad_file(
                path,
                format!("{message}; delete the file to rebuild the tag-probability store"),
            )
        };
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(bad("not a lorakit tag-probability store"));
        }
        let header_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
        let body = 16usize
            .checked_add(header_len)
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| bad("truncated header"))?;
        let header: Header = serde_json::from_slice(&bytes[16..body])
            .map_err(|e| bad(&format!("unreadable header ({e})")))?;
        if header.format != FORMAT {
            return Err(bad(&format!(
                "format {:?}, expected {FORMAT:?}",
                header.format
            )));
        }
        let expected = header.entries.len() * header.outputs * 4;
        let data = &bytes[body..];
        if data.len() != expected {
            return Err(bad(&format!(
                "{} bytes of probabilities, expected {expected}",
                data.len()
            )));
        }
        let mut values = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")));
        let rows = header
            .entries
            .into_iter()
            .map(|entry| {
                let row: Vec<f32> = values.by_ref().take(header.outputs).collect();
                (entry.path.clone(), (entry, row))
            })
            .collect();
        Ok(Some(ProbabilityStore {
            model_hash: header.model_hash,
            outputs: header.outputs,
            rows,
        }))
    }

    /// Writes the store atomically, entries sorted by path.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut sorted: Vec<&(Entry, Vec<f32>)> = self.rows.values().collect();
        sorted.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        let header = Header {
            format: FORMAT.to_string(),
            model_hash: self.model_hash.clone(),
            outputs: self.outputs,
            entries: sorted.iter().map(|(entry, _)| entry.clone()).collect(),
        };
        let header = serde_json::to_vec(&header).expect("header serialises");
        crate::infra::fsio::write_atomic_with(path, |w| {
            w.write_all(MAGIC)?;
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            for (_, row) in &sorted {
                for value in row {
                    w.write_all(&value.to_le_bytes())?;
                }
            }
            Ok(())
        })
    }

    /// Hash of the model the rows were computed with.
    pub fn model_hash(&self) -> &str {
        &self.model_hash
    }

    /// Number of stored images.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no image is stored.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The stored entry and row of `relative_path`.
    pub fn get(&self, relative_path: &str) -> Option<(&Entry, &[f32])> {
        self.rows
            .get(relative_path)
            .map(|(entry, row)| (entry, row.as_slice()))
    }

    /// Stores (or replaces) the row of one image.
    pub fn insert(&mut self, entry: Entry, row: Vec<f32>) {
        self.rows.insert(entry.path.clone(), (entry, row));
    }

    /// Item name → content key of every stored image (for the manifest).
    pub fn keys(&self) -> std::collections::BTreeMap<String, String> {
        self.rows
            .iter()
            .map(|(path, (entry, _))| (path.clone(), entry.key.clone()))
            .collect()
    }

    /// Adds every row of `other`, the store of another shard of the same dataset; refuses a
    /// store computed with another model.
    pub fn absorb(&mut self, other: ProbabilityStore) -> std::result::Result<(), String> {
        if other.model_hash != self.model_hash || other.outputs != self.outputs {
            return Err(format!(
                "was computed with another tagger model ({} with {} outputs, not {} with {}); \
                 re-run that shard with the same model",
                other.model_hash, other.outputs, self.model_hash, self.outputs
            ));
        }
        self.rows.extend(other.rows);
        Ok(())
    }

    /// Drops images no longer in the dataset.
    pub fn retain_paths(&mut self, keep: &std::collections::HashSet<String>) {
        self.rows.retain(|path, _| keep.contains(path));
    }

    /// Content key of an image's probabilities under the model `model_hash`, decoded with
    /// `decode` (the model also fixes the input size and layout, so nothing else affects the row).
    pub fn content_key(model_hash: &str, image_hash: &str, decode: &DecodeOptions) -> String {
        KeyBuilder::new("tag-probs", PREPROCESS_VERSION)
            .text("model", model_hash)
            .text("image", image_hash)
            .text("decode", decode.key_text())
            .finish()
    }
}

/// Size and modification time of a file, as stored in [`Entry`].
pub fn file_stamp(path: &Path) -> Result<(u64, u128)> {
    let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok((metadata.len(), mtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.bin");
        assert!(ProbabilityStore::load(&path).unwrap().is_none());
        let mut store = ProbabilityStore::new("m", 3);
        let entry = Entry {
            path: "a/b.png".into(),
            size: 10,
            mtime_ns: 5,
            image_hash: "h".into(),
            key: ProbabilityStore::content_key("m", "h", &DecodeOptions::default()),
            image_size: (4, 3),
        };
        store.insert(entry.clone(), vec![0.25, 0.5, 1.0]);
        store.save(&path).unwrap();
        let loaded = ProbabilityStore::load(&path).unwrap().unwrap();
        assert_eq!(loaded.model_hash(), "m");
        assert_eq!(
            loaded.get("a/b.png").unwrap(),
            (&entry, &[0.25f32, 0.5, 1.0][..])
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let error = ProbabilityStore::load(&path).unwrap_err().to_string();
        assert!(error.contains("delete the file"), "{error}");
    }
}
