//! The history view: the LoRA files of an output folder with their `ss_*` metadata (read by
//! check-lora's library code), loss plots and logs, sample images and the contact sheet, and the
//! check / resize / merge actions, which call the lora_tools stages.

use std::path::{Path, PathBuf};

use lorakit_pipeline::stages::lora_tools::{check, merge, resize, tensors::Precision};
use lorakit_pipeline::stages::train_lora::contact_sheet::CONTACT_SHEET;
use lorakit_pipeline::stages::train_lora::samples::sample_dir;
use lorakit_pipeline::{Error, Result};
use serde::Serialize;
use serde_json::{Map, Value};

/// One LoRA file of the folder.
#[derive(Debug, Clone, Serialize)]
pub struct LoraEntry {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Modification time (Unix seconds).
    pub modified: f64,
    /// Its `ss_*` metadata (or the reason it could not be read).
    pub metadata: Map<String, Value>,
    /// `<stem>_loss.png` beside it.
    pub loss_plot: Option<PathBuf>,
    /// `<stem>_loss.jsonl` beside it.
    pub loss_log: Option<PathBuf>,
}

/// Everything the history shows of one output folder.
#[derive(Debug, Clone, Serialize)]
pub struct History {
    /// LoRA files, newest first.
    pub loras: Vec<LoraEntry>,
    /// Resumable states (`*-state` folders).
    pub states: Vec<PathBuf>,
    /// The contact sheet of the sample images.
    pub contact_sheet: Option<PathBuf>,
    /// Sample images.
    pub samples: Vec<PathBuf>,
}

/// Reads the output folder `dir`.
pub fn history(dir: &Path) -> Result<History> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut loras = Vec::new();
    let mut states = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() && name.ends_with("-state") {
            states.push(path);
        } else if path.is_file() && name.ends_with(".safetensors") {
            loras.push(lora_entry(path)?);
        }
    }
    loras.sort_by(|a, b| b.modified.total_cmp(&a.modified));
    states.sort();
    let samples_dir = sample_dir(dir);
    let sheet = samples_dir.join(CONTACT_SHEET);
    let mut samples: Vec<PathBuf> = std::fs::read_dir(&samples_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "png") && *p != sheet)
        .collect();
    samples.sort();
    Ok(History {
        loras,
        states,
        contact_sheet: sheet.is_file().then_some(sheet),
        samples,
    })
}

fn lora_entry(path: PathBuf) -> Result<LoraEntry> {
    let info = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
    let modified = info
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let metadata = match inspect(&path) {
        Ok(report) => report
            .get("metadata")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.starts_with("ss_"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        Err(error) => Map::from_iter([("error".to_string(), Value::from(error.detail()))]),
    };
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let beside = |suffix: &str| {
        let file = path.with_file_name(format!("{stem}{suffix}"));
        file.is_file().then_some(file)
    };
    Ok(LoraEntry {
        bytes: info.len(),
        modified,
        metadata,
        loss_plot: beside("_loss.png"),
        loss_log: beside("_loss.jsonl"),
        path,
    })
}

/// check-lora's report of one file (tensors and all metadata).
pub fn inspect(path: &Path) -> Result<Value> {
    check::report(&check::Options {
        file: path.to_path_buf(),
        show_all_keys: false,
        json: true,
        no_metadata: false,
    })
}

/// resize-lora to `new_rank`, written as `<stem>_rank<N>.safetensors` beside the file.
pub fn resize_to(path: &Path, new_rank: usize) -> Result<PathBuf> {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let save_to = path.with_file_name(format!("{stem}_rank{new_rank}.safetensors"));
    resize::run(&resize::Options {
        model: path.to_path_buf(),
        save_to: save_to.clone(),
        new_rank,
        new_conv_rank: None,
        dynamic_method: None,
        dynamic_param: None,
        save_precision: None,
        verbose: false,
    })?;
    Ok(save_to)
}

/// merge-lora of several LoRAs (one ratio each) into one LoRA `save_to`.
pub fn merge_into(models: &[PathBuf], ratios: &[f32], save_to: &Path) -> Result<()> {
    merge::run(&merge::Options {
        sd_model: None,
        save_to: save_to.to_path_buf(),
        models: models.to_vec(),
        ratios: ratios.to_vec(),
        precision: Precision::Float,
        save_precision: None,
        no_metadata: false,
        concat: false,
        shuffle: false,
        v2: false,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/golden/lora_tools")
            .join(name)
    }

    #[test]
    fn a_folder_lists_its_loras_and_the_actions_write_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (b, ab) = (
            dir.path().join("b.safetensors"),
            dir.path().join("ab.safetensors"),
        );
        std::fs::copy(golden("lora_b.safetensors"), &b).unwrap();
        std::fs::copy(golden("merge_ab.safetensors"), &ab).unwrap();
        std::fs::write(dir.path().join("b_loss.png"), b"png").unwrap();
        std::fs::create_dir(dir.path().join("b-step00000002-state")).unwrap();
        let found = history(dir.path()).unwrap();
        assert_eq!(found.loras.len(), 2);
        assert_eq!(found.states.len(), 1);
        for lora in &found.loras {
            assert_eq!(
                lora.metadata["ss_network_dim"],
                "4",
                "{}",
                lora.path.display()
            );
            assert!(lora.metadata.keys().all(|k| k.starts_with("ss_")));
            let plot = lora.path == b;
            assert_eq!(lora.loss_plot.is_some(), plot);
        }
        let resized = resize_to(&b, 2).unwrap();
        assert_eq!(resized, dir.path().join("b_rank2.safetensors"));
        assert_eq!(
            inspect(&resized).unwrap()["metadata"]["ss_network_dim"],
            "2"
        );
        let merged = dir.path().join("merged.safetensors");
        merge_into(&[b, ab], &[1.0, 0.5], &merged).unwrap();
        assert_eq!(history(dir.path()).unwrap().loras.len(), 4);
    }
}
