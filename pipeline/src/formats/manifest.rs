//! Sidecar manifests: `<output>.manifest.json` next to every stage output.
//!
//! sd-scripts reads the metadata JSON as a flat map, so provenance cannot live inside it. The
//! manifest records which schema the output follows, the tool and its version, the parameters,
//! content hashes of inputs and output, per-item content keys and the failures of the run.
//! Tools check the manifest of every JSON they read and refuse another or a future schema.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dataset::shard::ShardRecord;
use crate::formats::schema::{self, MANIFEST_V1};
use crate::infra::report::Summary;
use crate::infra::{fsio, hashing, pyjson};
use crate::{Error, Result};

/// Version of the lorakit tools, recorded in every manifest.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One input that determined the output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    /// What the input is (`in_json`, `sidecars`, `model`, ...).
    pub role: String,
    /// Where it was read from, when it is one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// BLAKE3 of its content (for many files: of their per-item keys in order).
    pub blake3: String,
    /// How many files it stands for, when it covers many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<usize>,
}

/// The sidecar manifest of one stage output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_V1`].
    pub schema: String,
    /// The tool that wrote the output.
    pub tool: String,
    /// That tool's version.
    pub tool_version: String,
    /// The output's file name, relative to the manifest's folder.
    pub output: String,
    /// The schema id the output follows.
    pub output_schema: String,
    /// BLAKE3 of the output file, when the output is one file.
    #[serde(default)]
    pub output_blake3: Option<String>,
    /// Every parameter that changes the output.
    pub parameters: Value,
    /// Content hashes of the inputs.
    pub inputs: Vec<InputRecord>,
    /// Per-item content keys (per-image stages).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub items: BTreeMap<String, String>,
    /// Sidecar files the stage wrote (caption and tag files): path relative to the dataset
    /// folder -> BLAKE3 of the bytes written, to tell its own files from the user's
    /// ([`crate::dataset::sidecar`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sidecars: crate::dataset::sidecar::WrittenSidecars,
    /// Counts and failures of the run that wrote the output.
    pub summary: Summary,
    /// For the output of a run with `--shard i/n`: which part of which run it is (absent in
    /// unsharded and merged outputs, and in shard outputs of older lorakit versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardRecord>,
}

impl Manifest {
    /// A manifest for `output` written by `tool`, following `output_schema`.
    pub fn new(tool: &str, output: &Path, output_schema: &str, parameters: Value) -> Self {
        Manifest {
            schema: MANIFEST_V1.to_string(),
            tool: tool.to_string(),
            tool_version: TOOL_VERSION.to_string(),
            output: output
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            output_schema: output_schema.to_string(),
            output_blake3: None,
            parameters,
            inputs: Vec::new(),
            items: BTreeMap::new(),
            sidecars: BTreeMap::new(),
            summary: Summary::default(),
            shard: None,
        }
    }

    /// The manifest path of `output`: `<output>.manifest.json`.
    pub fn path_for(output: &Path) -> PathBuf {
        let mut name = output.as_os_str().to_os_string();
        name.push(".manifest.json");
        PathBuf::from(name)
    }

    /// Records a file input with its content hash.
    pub fn add_input_file(&mut self, role: &str, path: &Path) -> Result<()> {
        self.inputs.push(InputRecord {
            role: role.to_string(),
            path: Some(path.display().to_string()),
            blake3: hashing::hash_file(path)?,
            items: None,
        });
        Ok(())
    }

    /// Records a file input whose content hash the caller already knows (large model files,
    /// hashed once through [`crate::infra::hashing::memoised`]).
    pub fn add_input_hash(&mut self, role: &str, path: &Path, blake3: &str) {
        self.inputs.push(InputRecord {
            role: role.to_string(),
            path: Some(path.display().to_string()),
            blake3: blake3.to_string(),
            items: None,
        });
    }

    /// Hashes the written `output` file and writes the manifest next to it (atomically).
    pub fn write_for(&mut self, output: &Path) -> Result<()> {
        self.output_blake3 = Some(hashing::hash_file(output)?);
        let value = serde_json::to_value(&*self).expect("manifest serialises");
        let path = Self::path_for(output);
        schema::validate(MANIFEST_V1, &value).map_err(|problems| {
            Error::schema(
                &path,
                format!("lorakit bug: the manifest does not follow its own schema:\n{problems}"),
            )
        })?;
        fsio::write_atomic(&path, &pyjson::document_bytes(&value))
    }

    /// Reads the manifest of `output`, if there is one, and checks its own schema version.
    pub fn read_for(output: &Path) -> Result<Option<Manifest>> {
        let path = Self::path_for(output);
        if !path.exists() {
            return Ok(None);
        }
        let value = pyjson::parse_document(&fsio::read(&path)?).map_err(|message| {
            Error::bad_file(
                &path,
                format!("manifest: {message}; or delete it to re-run the stage"),
            )
        })?;
        let declared = value
            .get("schema")
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        if let Some(problem) = schema::version_mismatch(declared, MANIFEST_V1) {
            return Err(Error::schema(&path, format!("manifest {problem}")));
        }
        schema::validate(MANIFEST_V1, &value)
            .map_err(|e| Error::schema(&path, format!("manifest is malformed:\n{e}")))?;
        let manifest =
            serde_json::from_value(value).map_err(|e| Error::schema(&path, e.to_string()))?;
        Ok(Some(manifest))
    }

    /// The manifest `tool` wrote for a document `output` was made from: `output`'s own, or the
    /// one found by following each manifest's `in_json` input back (prepare-dataset's metadata
    /// behind prepare-latents', for example). A recorded relative path is tried from the
    /// current folder, then from the folder of the manifest that records it.
    pub fn upstream(output: &Path, tool: &str) -> Result<Option<(PathBuf, Manifest)>> {
        let mut document = output.to_path_buf();
        // A chain of stages is short; the bound only guards against a manifest loop.
        for _ in 0..8 {
            let Some(manifest) = Self::read_for(&document)? else {
                return Ok(None);
            };
            if manifest.tool == tool {
                return Ok(Some((document, manifest)));
            }
            let Some(recorded) = (manifest.inputs.iter())
                .find(|input| input.role == "in_json")
                .and_then(|input| input.path.as_deref())
                .map(PathBuf::from)
            else {
                return Ok(None);
            };
            document = match document.parent() {
                Some(folder) if recorded.is_relative() && !recorded.exists() => {
                    folder.join(recorded)
                }
                _ => recorded,
            };
        }
        Ok(None)
    }

    /// Checks that the document at `input` may be read as `expected_schema`.
    ///
    /// A file without a manifest (e.g. written by sd-scripts) is accepted; one whose manifest
    /// declares another or a future schema is refused with a message naming both.
    pub fn check_input(input: &Path, expected_schema: &str) -> Result<Option<Manifest>> {
        Self::check_input_one_of(input, &[expected_schema])
    }

    /// As [`Manifest::check_input`], for a reader that accepts any of `accepted` (oldest
    /// first; a refusal names the last, newest one).
    pub fn check_input_one_of(input: &Path, accepted: &[&str]) -> Result<Option<Manifest>> {
        let Some(manifest) = Self::read_for(input)? else {
            return Ok(None);
        };
        if accepted.contains(&manifest.output_schema.as_str()) {
            return Ok(Some(manifest));
        }
        let newest = accepted.last().copied().unwrap_or_default();
        if let Some(problem) = schema::version_mismatch(&manifest.output_schema, newest) {
            return Err(Error::schema(
                input,
                format!("its manifest {} {problem}", Self::path_for(input).display()),
            ));
        }
        Ok(Some(manifest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_checks() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("meta.json");
        std::fs::write(&output, b"{}").unwrap();
        let mut manifest = Manifest::new(
            "merge-captions",
            &output,
            schema::METADATA_V1,
            serde_json::json!({"full_path": true}),
        );
        manifest.inputs.push(InputRecord {
            role: "sidecars".into(),
            path: None,
            blake3: hashing::hash_bytes(b""),
            items: Some(0),
        });
        manifest.write_for(&output).unwrap();
        let read = Manifest::check_input(&output, schema::METADATA_V1)
            .unwrap()
            .unwrap();
        assert_eq!(read, manifest);
        assert_eq!(
            read.output_blake3.as_deref(),
            Some(hashing::hash_bytes(b"{}").as_str())
        );

        let future = std::fs::read_to_string(Manifest::path_for(&output))
            .unwrap()
            .replace("lorakit.metadata/v1", "lorakit.metadata/v7");
        std::fs::write(Manifest::path_for(&output), future).unwrap();
        let message = Manifest::check_input(&output, schema::METADATA_V1)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("v7") && message.contains("newer"),
            "{message}"
        );

        std::fs::write(
            Manifest::path_for(&output),
            br#"{"schema": "lorakit.manifest/v2"}"#,
        )
        .unwrap();
        let message = Manifest::check_input(&output, schema::METADATA_V1)
            .unwrap_err()
            .to_string();
        assert!(message.contains("newer"), "{message}");
    }

    #[test]
    fn files_without_manifest_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("from_sd_scripts.json");
        assert!(Manifest::check_input(&output, schema::METADATA_V1)
            .unwrap()
            .is_none());
    }
}
