//! Versioned JSON Schemas (the files in the repository's `schemas/` folder), compiled in.
//!
//! Schema ids look like `lorakit.metadata/v1`: a family and a major version. A tool states the
//! id it expects and refuses documents that declare another family or a different version.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

/// Every schema this build knows: `(id, JSON Schema text)`.
pub const SCHEMAS: &[(&str, &str)] = &[
    (
        METADATA_V1,
        include_str!("../../../schemas/metadata.v1.schema.json"),
    ),
    (
        METADATA_V2,
        include_str!("../../../schemas/metadata.v2.schema.json"),
    ),
    (
        MANIFEST_V1,
        include_str!("../../../schemas/manifest.v1.schema.json"),
    ),
    (
        TE_CACHE_V1,
        include_str!("../../../schemas/te_cache.v1.schema.json"),
    ),
    (
        CAPTION_INDEX_V1,
        include_str!("../../../schemas/caption_index.v1.schema.json"),
    ),
    (
        LINT_REPORT_V1,
        include_str!("../../../schemas/lint_report.v1.schema.json"),
    ),
];

/// The sd-scripts-compatible metadata JSON.
pub const METADATA_V1: &str = "lorakit.metadata/v1";
/// The metadata JSON with per-image subset settings (`lorakit_subset`, from prepare-dataset);
/// every v1 document is a v2 document.
pub const METADATA_V2: &str = "lorakit.metadata/v2";
/// The metadata schemas a metadata reader accepts in a manifest.
pub const METADATA_READABLE: &[&str] = &[METADATA_V1, METADATA_V2];
/// The sidecar manifest written next to every stage output.
pub const MANIFEST_V1: &str = "lorakit.manifest/v1";

/// The index of a text-encoder output cache (`cache-text-encoder`).
pub const TE_CACHE_V1: &str = "lorakit.te_cache/v1";
/// The caption index `caption-images` writes next to the images (image -> caption).
pub const CAPTION_INDEX_V1: &str = "lorakit.caption_index/v1";
/// The JSON report of `lint-dataset`.
pub const LINT_REPORT_V1: &str = "lorakit.lint_report/v1";
/// The binary tag-probability store of `tag-images` (format id in its header; no JSON Schema).
pub const TAG_STORE_V1: &str = "lorakit.tag_probs/v1";
/// The LoRA file `train-lora` writes (recorded in its manifest; a kohya `.safetensors`).
pub const LORA_V1: &str = "lorakit.lora/v1";

/// Splits `lorakit.metadata/v1` into `("lorakit.metadata", 1)`.
pub fn parse_id(id: &str) -> Option<(&str, u32)> {
    let (family, version) = id.rsplit_once("/v")?;
    Some((family, version.parse().ok()?))
}

/// Explains why a document declaring `found` cannot be read by a tool expecting `expected`,
/// or `None` when they are the same schema.
pub fn version_mismatch(found: &str, expected: &str) -> Option<String> {
    if found == expected {
        return None;
    }
    let (expected_family, expected_version) =
        parse_id(expected).expect("known schema ids are well formed");
    Some(match parse_id(found) {
        Some((family, version)) if family == expected_family && version > expected_version => format!(
            "declares schema {found}, newer than the {expected} this lorakit reads; upgrade lorakit or regenerate the file"
        ),
        Some((family, _)) if family == expected_family => format!(
            "declares schema {found}, older than the {expected} this lorakit reads; regenerate the file with this lorakit"
        ),
        _ => format!("declares schema {found:?}, but a {expected} document is expected here"),
    })
}

/// Checks `document` against the schema `id`; returns every violation (at most 10), one per line.
pub fn validate(id: &str, document: &Value) -> Result<(), String> {
    static COMPILED: OnceLock<Mutex<HashMap<&'static str, &'static jsonschema::Validator>>> =
        OnceLock::new();
    let validator = {
        let mut cache = COMPILED
            .get_or_init(Default::default)
            .lock()
            .expect("schema cache lock");
        let (known_id, text) = SCHEMAS
            .iter()
            .find(|(known, _)| *known == id)
            .ok_or_else(|| format!("unknown schema {id}"))?;
        *cache.entry(known_id).or_insert_with(|| {
            let schema: Value = serde_json::from_str(text).expect("bundled schema is JSON");
            Box::leak(Box::new(
                jsonschema::validator_for(&schema).expect("bundled schema is valid"),
            ))
        })
    };
    let errors: Vec<String> = validator
        .iter_errors(document)
        .take(10)
        .map(|e| {
            format!(
                "at {}: {e}",
                if e.instance_path.as_str().is_empty() {
                    "/"
                } else {
                    e.instance_path.as_str()
                }
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_schema_compiles_and_names_its_id() {
        for (id, text) in SCHEMAS {
            let schema: Value = serde_json::from_str(text).unwrap();
            jsonschema::validator_for(&schema).unwrap();
            let (family, version) = parse_id(id).unwrap();
            let declared = schema["$id"].as_str().unwrap();
            assert!(
                declared.contains(&format!(
                    "{}.v{version}",
                    family.trim_start_matches("lorakit.")
                )),
                "{declared} vs {id}"
            );
        }
    }

    #[test]
    fn version_messages() {
        assert!(version_mismatch(METADATA_V1, METADATA_V1).is_none());
        assert!(version_mismatch("lorakit.metadata/v2", METADATA_V1)
            .unwrap()
            .contains("newer"));
        assert!(version_mismatch("lorakit.manifest/v1", METADATA_V1)
            .unwrap()
            .contains("expected"));
    }
}
