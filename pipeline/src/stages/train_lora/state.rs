//! Resumable training state (`--save_state` / `--resume`): a folder with the LoRA weights
//! (`model.safetensors`, kohya key names), the optimizer moments (`optimizer.safetensors`) and
//! `train_state.json` (sd-scripts' `current_epoch` / `current_step` plus the position inside the
//! epoch and the loss log). Noise and data order are pure functions of the seed and the position,
//! so a resumed run continues exactly where the saved one stopped.
//!
//! The folder is assembled under a temporary name and renamed into place, so a crash leaves either
//! the previous state or the new one, never a mixture.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::networks::lora::LoraNetwork;
use crate::stages::train_lora::loss::LossAverage;
use crate::stages::train_lora::optim::Optimizer;
use crate::{Error, Result};

/// File that marks a complete state folder.
const STATE_FILE: &str = "train_state.json";

/// Where training stands.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// 1-based epoch to continue in.
    pub epoch: usize,
    /// Batches of that epoch already consumed.
    pub batches_done_in_epoch: usize,
    /// Optimizer steps done.
    pub global_step: usize,
    /// JSON lines of the loss log so far.
    pub log_lines: Vec<String>,
    /// The window behind the logged loss average.
    pub loss_average: LossAverage,
}

/// Writes a state folder atomically.
pub fn save(
    dir: &Path,
    network: &LoraNetwork,
    optimizer: &Optimizer,
    progress: &Progress,
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!("{}{name}", crate::infra::fsio::TEMP_PREFIX));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    network.save(
        &staging.join("model.safetensors"),
        None,
        &Default::default(),
    )?;
    let mut moments: Vec<(String, Tensor)> = Vec::new();
    for (i, m) in optimizer.exp_avg.iter().enumerate() {
        moments.push((format!("exp_avg.{i}"), m.to_device(&Device::Cpu)?));
    }
    for (i, v) in optimizer.exp_avg_sq.iter().enumerate() {
        moments.push((format!("exp_avg_sq.{i}"), v.to_device(&Device::Cpu)?));
    }
    let bytes = safetensors::serialize(moments.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| Error::Model(format!("cannot serialise optimizer state: {e}")))?;
    crate::infra::fsio::write_atomic(&staging.join("optimizer.safetensors"), &bytes)?;
    let state = json!({
        "current_epoch": progress.epoch,
        "current_step": progress.global_step,
        "lorakit_batches_done_in_epoch": progress.batches_done_in_epoch,
        "lorakit_optimizer_steps": optimizer.steps,
        "lorakit_loss_log": progress.log_lines,
        "lorakit_loss_window": progress.loss_average.slots,
    });
    crate::infra::fsio::write_atomic(
        &staging.join(STATE_FILE),
        serde_json::to_string_pretty(&state)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let retired = parent.join(format!("{}old-{name}", crate::infra::fsio::TEMP_PREFIX));
    if dir.exists() {
        if retired.exists() {
            std::fs::remove_dir_all(&retired).map_err(|e| Error::io(&retired, e))?;
        }
        std::fs::rename(dir, &retired).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
    if retired.exists() {
        std::fs::remove_dir_all(&retired).map_err(|e| Error::io(&retired, e))?;
    }
    Ok(())
}

/// `--resume DIR`, or `latest`: the complete state folder in `output_dir` with the most steps.
pub fn resolve_resume(resume: &str, output_dir: &Path) -> Result<PathBuf> {
    if resume != "latest" {
        return Ok(PathBuf::from(resume));
    }
    let entries = std::fs::read_dir(output_dir).map_err(|e| Error::io(output_dir, e))?;
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with("-state") || name.starts_with(crate::infra::fsio::TEMP_PREFIX) {
            continue;
        }
        if let Ok((_, step)) = read_state_json(&path) {
            if best.as_ref().is_none_or(|(s, _)| step > *s) {
                best = Some((step, path));
            }
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        Error::Usage(format!(
            "--resume latest: no complete *-state folder in {}",
            output_dir.display()
        ))
    })
}

fn read_state_json(dir: &Path) -> Result<(serde_json::Value, usize)> {
    let path = dir.join(STATE_FILE);
    let value = crate::infra::pyjson::parse_document(&crate::infra::fsio::read(&path)?).map_err(
        |message| {
            Error::bad_file(
                &path,
                format!("{message}; the state is corrupt, resume from another one"),
            )
        },
    )?;
    let step = value["current_step"]
        .as_u64()
        .ok_or_else(|| Error::bad_file(&path, "current_step is missing; the state is corrupt"))?;
    Ok((value, step as usize))
}

/// Restores weights and optimizer moments into `network` / `optimizer`; returns the position.
pub fn load(dir: &Path, network: &LoraNetwork, optimizer: &mut Optimizer) -> Result<Progress> {
    let (value, global_step) = read_state_json(dir)?;
    let state_path = dir.join(STATE_FILE);
    let model_path = dir.join("model.safetensors");
    let corrupt = |path: &Path, e: String| {
        Error::bad_file(
            path,
            format!("{e}; the state is corrupt, resume from another one"),
        )
    };
    let weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(&model_path, &Device::Cpu)
            .map_err(|e| corrupt(&model_path, e.to_string()))?;
    for module in &network.modules {
        for (suffix, var) in [
            ("lora_down.weight", &module.down),
            ("lora_up.weight", &module.up),
        ] {
            let key = format!("{}.{suffix}", module.name);
            let tensor = weights
                .get(&key)
                .ok_or_else(|| corrupt(&model_path, format!("{key} is missing")))?;
            if tensor.dims() != var.as_tensor().dims() {
                return Err(corrupt(
                    &model_path,
                    format!(
                        "{key} has shape {:?}, this run uses {:?}",
                        tensor.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            var.set(&tensor.to_device(var.as_tensor().device())?)?;
        }
    }
    let optimizer_path = dir.join("optimizer.safetensors");
    let moments: HashMap<String, Tensor> =
        candle_core::safetensors::load(&optimizer_path, &Device::Cpu)
            .map_err(|e| corrupt(&optimizer_path, e.to_string()))?;
    for (prefix, list) in [
        ("exp_avg", &mut optimizer.exp_avg),
        ("exp_avg_sq", &mut optimizer.exp_avg_sq),
    ] {
        for (i, slot) in list.iter_mut().enumerate() {
            let key = format!("{prefix}.{i}");
            let tensor = moments.get(&key).ok_or_else(|| {
                corrupt(
                    &optimizer_path,
                    format!("{key} is missing (different optimizer?)"),
                )
            })?;
            if tensor.dims() != slot.dims() {
                return Err(corrupt(
                    &optimizer_path,
                    format!("{key} has the wrong shape"),
                ));
            }
            *slot = tensor.to_device(slot.device())?;
        }
    }
    let steps = value["lorakit_optimizer_steps"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_u64()).collect::<Vec<_>>())
        .unwrap_or_default();
    if steps.len() != optimizer.steps.len() {
        return Err(corrupt(
            &state_path,
            format!(
                "lorakit_optimizer_steps has {} entries, this run trains {} tensors",
                steps.len(),
                optimizer.steps.len()
            ),
        ));
    }
    optimizer.steps = steps.into_iter().map(|s| s as usize).collect();
    let epoch = value["current_epoch"]
        .as_u64()
        .ok_or_else(|| corrupt(&state_path, "current_epoch is missing".into()))?
        as usize;
    Ok(Progress {
        epoch,
        batches_done_in_epoch: value["lorakit_batches_done_in_epoch"].as_u64().unwrap_or(0)
            as usize,
        global_step,
        log_lines: value["lorakit_loss_log"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        loss_average: LossAverage {
            slots: value["lorakit_loss_window"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_f64())
                        .map(|v| v as f32)
                        .collect()
                })
                .unwrap_or_default(),
        },
    })
}
