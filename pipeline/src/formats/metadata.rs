//! The sd-scripts metadata JSON (`meta_cap.json`, `meta_clean.json`, `meta_lat.json`, ...).
//!
//! A flat JSON object keyed by image key (a file stem, or the image path with `--full_path`);
//! each value is an object with `caption`, `tags`, `train_resolution`, `image_size` and any other
//! fields, which are preserved in order on rewrite. Files are written the way Python's
//! `json.dump(obj, f, indent=2)` writes them, so our output diffs cleanly against sd-scripts'.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::dataset::IMAGE_EXTENSIONS;
use crate::infra::{fsio, pyjson};
use crate::{Error, Result};

/// The settings of an entry's subset that apply while training, as prepare-dataset records them
/// (`lorakit_subset`, schema `lorakit.metadata/v2`).
#[derive(Debug, Clone, PartialEq)]
pub struct EntrySubset {
    /// Index of the entry's dataset.
    pub dataset: usize,
    /// `flip_aug`.
    pub flip_aug: bool,
    /// `shuffle_caption`.
    pub shuffle_caption: bool,
    /// `keep_tokens`.
    pub keep_tokens: usize,
    /// `caption_separator`.
    pub caption_separator: String,
    /// `caption_tag_dropout_rate`.
    pub caption_tag_dropout_rate: f64,
    /// `caption_dropout_rate`.
    pub caption_dropout_rate: f64,
    /// `caption_dropout_every_n_epochs` (0: never).
    pub caption_dropout_every_n_epochs: usize,
}

impl EntrySubset {
    /// The subset settings of `entry`; `None` for an entry without `lorakit_subset`. A missing
    /// setting reads as sd-scripts' default.
    pub fn of(entry: &Map<String, Value>) -> Option<Self> {
        let subset = entry.get("lorakit_subset")?;
        let count = |key: &str| subset[key].as_u64().unwrap_or(0) as usize;
        let rate = |key: &str| subset[key].as_f64().unwrap_or(0.0);
        Some(EntrySubset {
            dataset: count("dataset"),
            flip_aug: subset["flip_aug"] == true,
            shuffle_caption: subset["shuffle_caption"] == true,
            keep_tokens: count("keep_tokens"),
            caption_separator: subset["caption_separator"]
                .as_str()
                .unwrap_or(",")
                .to_string(),
            caption_tag_dropout_rate: rate("caption_tag_dropout_rate"),
            caption_dropout_rate: rate("caption_dropout_rate"),
            caption_dropout_every_n_epochs: count("caption_dropout_every_n_epochs"),
        })
    }

    /// Whether captions of the subset change from step to step (shuffle or tag dropout), so
    /// that training draws cached caption variants.
    pub fn augments_captions(&self) -> bool {
        self.shuffle_caption || self.caption_tag_dropout_rate > 0.0
    }
}

/// Metadata JSON document: image key → entry object, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    entries: Map<String, Value>,
}

impl Metadata {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a metadata JSON file and checks it against the `lorakit.metadata/v2` schema
    /// (an object whose values are objects with well-typed known fields; every v1 document
    /// follows it).
    pub fn load(path: &Path) -> Result<Self> {
        let value = pyjson::read_document(path)?;
        crate::formats::schema::validate(crate::formats::schema::METADATA_V2, &value).map_err(
            |problems| {
                Error::schema(
                    path,
                    format!(
                        "does not follow {}:\n{problems}",
                        crate::formats::schema::METADATA_V2
                    ),
                )
            },
        )?;
        Self::from_value(value).map_err(|message| Error::schema(path, message))
    }

    /// Builds a document from parsed JSON, checking its shape.
    pub fn from_value(value: Value) -> std::result::Result<Self, String> {
        let Value::Object(entries) = value else {
            return Err("metadata JSON must be an object keyed by image".into());
        };
        if let Some((key, _)) = entries.iter().find(|(_, v)| !v.is_object()) {
            return Err(format!("entry {key:?} is not an object"));
        }
        Ok(Metadata { entries })
    }

    /// Reads `in_json` if given, else `out_json` if it exists (in-place update), else empty:
    /// the base document rule of sd-scripts' merge tools.
    pub fn load_base(in_json: Option<&Path>, out_json: &Path) -> Result<Self> {
        match in_json {
            Some(path) => Self::load(path),
            None if out_json.exists() => Self::load(out_json),
            None => Ok(Self::new()),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Map<String, Value>> {
        self.entries.get(key).and_then(Value::as_object)
    }

    /// The entry for `key`, created empty (at the end) if absent.
    pub fn entry_mut(&mut self, key: &str) -> &mut Map<String, Value> {
        self.entries
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("metadata entries are objects (checked on load)")
    }

    /// Keeps only the entries whose key passes `keep` (order unchanged).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.entries.retain(|key, _| keep(key));
    }

    /// Iterates over `(key, entry)` in document order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Map<String, Value>)> {
        self.entries
            .iter()
            .filter_map(|(k, v)| v.as_object().map(|o| (k, o)))
    }

    /// Iterates mutably over `(key, entry)` in document order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Map<String, Value>)> {
        self.entries
            .iter_mut()
            .filter_map(|(k, v)| v.as_object_mut().map(|o| (k, o)))
    }

    /// Serialises exactly as sd-scripts does (`indent=2`, non-ASCII escaped, no final newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 160);
        pyjson::write_python_json(&mut out, &self.entries, 2, true).expect("writing to memory");
        out
    }

    /// Writes the document to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        fsio::write_atomic(path, &self.to_bytes())
    }
}

/// Loads a metadata JSON a stage reads: its manifest (if any) must declare
/// `lorakit.metadata/v1` or `/v2`, and the document must follow the schema.
pub fn load_input_metadata(path: &Path) -> Result<Metadata> {
    crate::formats::manifest::Manifest::check_input_one_of(
        path,
        crate::formats::schema::METADATA_READABLE,
    )?;
    Metadata::load(path)
}

/// The metadata key of `image`: its path as found (with `--full_path`) or its file stem.
pub fn image_key(image: &Path, full_path: bool) -> Result<String> {
    let text = if full_path {
        image.as_os_str()
    } else {
        image.file_stem().unwrap_or_default()
    };
    text.to_str().map(str::to_string).ok_or_else(|| {
        Error::bad_file(
            image,
            "file name is not valid UTF-8 and cannot be a metadata JSON key; rename the file",
        )
    })
}

/// Fails when two images would get the same key (same stem in different folders or formats).
pub fn check_unique_keys(images: &[PathBuf], full_path: bool) -> Result<()> {
    if full_path {
        return Ok(());
    }
    let mut seen: HashMap<&std::ffi::OsStr, &Path> = HashMap::with_capacity(images.len());
    let mut clashes = Vec::new();
    for image in images {
        let stem = image.file_stem().unwrap_or_default();
        if let Some(first) = seen.insert(stem, image) {
            clashes.push(format!("{} and {}", first.display(), image.display()));
        }
    }
    if clashes.is_empty() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "{} image(s) share a file stem, so their metadata keys would collide: {}; \
         use --full_path to key images by path, or rename them",
        clashes.len(),
        clashes.join("; ")
    )))
}

/// Finds the image file a metadata key refers to, following sd-scripts' rules: the key as a path
/// (absolute, or relative to `image_dir`), else `image_dir/<key>.<image extension>` for stem keys.
pub fn resolve_image(key: &str, image_dir: Option<&Path>) -> Option<PathBuf> {
    let as_path = Path::new(key);
    if as_path.is_absolute() || image_dir.is_none() {
        return as_path.is_file().then(|| as_path.to_path_buf());
    }
    let dir = image_dir?;
    let joined = dir.join(key);
    if joined.is_file() {
        return Some(joined);
    }
    if as_path.is_file() {
        return Some(as_path.to_path_buf());
    }
    IMAGE_EXTENSIONS
        .iter()
        .flat_map(|ext| [ext.to_string(), ext.to_uppercase()])
        .map(|ext| dir.join(format!("{key}.{ext}")))
        .find(|candidate| candidate.is_file())
}

/// Fails unless `image`, the image metadata entry `key` resolved to, lies in the dataset folder
/// `dir` or one of its sub-folders (compared after resolving symlinks and `..`): stages write
/// their outputs beside the image, and a key like `ds/../elsewhere/x.png` or an absolute path
/// elsewhere must not make them write outside the dataset.
pub fn ensure_in_dataset(key: &str, image: &Path, dir: &Path) -> Result<()> {
    let folder = match image.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let inside = folder
        .canonicalize()
        .ok()
        .zip(dir.canonicalize().ok())
        .is_some_and(|(folder, dir)| folder.starts_with(dir));
    if inside {
        return Ok(());
    }
    Err(Error::bad_file(
        key,
        format!(
            "metadata entry leads to {}, outside the dataset folder {}; nothing is written for it (fix or remove the entry)",
            image.display(),
            dir.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_like_python_json_dump() {
        let mut meta = Metadata::new();
        meta.entry_mut("moon")
            .insert("caption".into(), json!("Moon — satellite 😀 \"q\"\n"));
        meta.entry_mut("a")
            .insert("train_resolution".into(), json!([256, 128]));
        meta.entry_mut("e");
        let text = String::from_utf8(meta.to_bytes()).unwrap();
        let expected = "{\n  \"moon\": {\n    \"caption\": \"Moon \\u2014 satellite \\ud83d\\ude00 \\\"q\\\"\\n\"\n  },\n  \"a\": {\n    \"train_resolution\": [\n      256,\n      128\n    ]\n  },\n  \"e\": {}\n}";
        assert_eq!(text, expected);
    }

    #[test]
    fn preserves_unknown_fields_and_order() {
        let text = r#"{"b": {"zeta": 1, "caption": "x"}, "a": {"tags": "t"}}"#;
        let mut meta = Metadata::from_value(serde_json::from_str(text).unwrap()).unwrap();
        meta.entry_mut("b").insert("caption".into(), json!("y"));
        let keys: Vec<_> = meta.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(keys, ["b", "a"]);
        assert_eq!(
            meta.get("b").unwrap().keys().collect::<Vec<_>>(),
            ["zeta", "caption"]
        );
    }

    #[test]
    fn rejects_non_object_documents() {
        assert!(Metadata::from_value(json!([1, 2])).is_err());
        assert!(Metadata::from_value(json!({"a": "b"})).is_err());
    }

    #[test]
    fn images_outside_the_dataset_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dataset = root.path().join("ds");
        std::fs::create_dir_all(dataset.join("sub")).unwrap();
        std::fs::create_dir_all(root.path().join("outside")).unwrap();
        for image in ["ds/a.png", "ds/sub/b.png", "outside/x.png"] {
            std::fs::write(root.path().join(image), b"x").unwrap();
        }
        let check = |key: &str| {
            let image = resolve_image(key, Some(&dataset)).unwrap();
            ensure_in_dataset(key, &image, &dataset)
        };
        assert!(check("a").is_ok());
        assert!(check("sub/b.png").is_ok());
        let escaped = check("../outside/x.png").unwrap_err().to_string();
        assert!(escaped.contains("../outside/x.png") && escaped.contains("outside the dataset"));
        let absolute = root.path().join("outside/x.png").display().to_string();
        assert!(check(&absolute).is_err());
    }

    #[test]
    fn stem_collisions_are_reported() {
        let images = vec![PathBuf::from("d/a.png"), PathBuf::from("d/sub/a.jpg")];
        let message = check_unique_keys(&images, false).unwrap_err().to_string();
        assert!(message.contains("--full_path"), "{message}");
        assert!(check_unique_keys(&images, true).is_ok());
    }
}
