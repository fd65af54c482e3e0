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
use crate::networks::Network;
use crate::stages::train_lora::loss::LossAverage;
use crate::stages::train_lora::optim::Optimizer;
use crate::stages::train_lora::settings::Settings;
use crate::{Error, Result};

/// File that marks a complete state folder.
const STATE_FILE: &str = "train_state.json";

/// Where training stands.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// 1-based epoch to continue in.
    pub epoch: usize,
    /// Batches of that epoch already consumed (by each rank, in a data-parallel run).
    pub batches_done_in_epoch: usize,
    /// Ranks of the run that saved the state: a state resumes with as many.
    pub world_size: usize,
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
    network: &Network,
    optimizer: &Optimizer,
    progress: &Progress,
    settings: &Settings,
) -> Result<()> {
    let staging = crate::infra::fsio::temp_sibling(dir, "new");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let model_path = staging.join("model.safetensors");
    match network {
        // lycoris' file multiplies use_scalar's scalar into a factor; the state keeps both.
        Network::Lycoris(network) => network.save_training_state(&model_path)?,
        _ => network.save(&model_path, None, &Default::default())?,
    }
    let moments = optimizer.state_tensors()?;
    let bytes = safetensors::serialize(moments.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| Error::Model(format!("cannot serialise optimizer state: {e}")))?;
    crate::infra::fsio::write_atomic(&staging.join("optimizer.safetensors"), &bytes)?;
    let state = json!({
        "current_epoch": progress.epoch,
        "current_step": progress.global_step,
        "lorakit_batches_done_in_epoch": progress.batches_done_in_epoch,
        "lorakit_world_size": progress.world_size,
        "lorakit_optimizer_steps": optimizer.steps,
        "lorakit_loss_log": progress.log_lines,
        "lorakit_loss_window": progress.loss_average.slots,
        "lorakit_settings": settings.to_json(),
    });
    crate::infra::fsio::write_atomic(
        &staging.join(STATE_FILE),
        serde_json::to_string_pretty(&state)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let retired = crate::infra::fsio::temp_sibling(dir, "old");
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
pub fn resolve_resume(resume: &str, output_dir: Option<&Path>) -> Result<PathBuf> {
    if resume != "latest" {
        return Ok(PathBuf::from(resume));
    }
    let output_dir = output_dir.ok_or_else(|| {
        Error::Usage(
            "--resume latest looks in --output_dir: give --output_dir, or the state folder \
             (--resume OUT/NAME-state)"
                .into(),
        )
    })?;
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

/// The settings of the run a state folder was saved by; `None` for states saved before
/// settings were kept.
pub fn saved_settings(dir: &Path) -> Result<Option<Settings>> {
    let (value, _) = read_state_json(dir)?;
    Ok(Settings::from_json(&value["lorakit_settings"]))
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

/// One LoRA module as a state file or a command line describes it.
struct ModuleShape<'a> {
    name: &'a str,
    /// Dimensions of `lora_down` (`[dim, in]`, or `[dim, in, k, k]`).
    down: &'a [usize],
    /// Alpha, when known.
    alpha: Option<f64>,
}

impl ModuleShape<'_> {
    /// Convolutions with a kernel larger than 1x1 take `conv_dim` / `conv_alpha`.
    fn is_conv(&self) -> bool {
        self.down.len() == 4 && self.down[2] * self.down[3] > 1
    }
}

/// Refuses to resume into a network other than the saved one (another `--network_dim`,
/// `--network_alpha`, conv dims or module set), saying what the state was saved with, what the
/// command line asks for, and how to proceed.
fn check_same_network(
    dir: &Path,
    weights: &HashMap<String, Tensor>,
    network: &LoraNetwork,
) -> Result<()> {
    let saved: Vec<ModuleShape> = weights
        .iter()
        .filter_map(|(key, down)| {
            let name = key.strip_suffix(".lora_down.weight")?;
            let alpha = weights.get(&format!("{name}.alpha")).and_then(|alpha| {
                alpha
                    .to_dtype(candle_core::DType::F64)
                    .and_then(|a| a.to_scalar::<f64>())
                    .ok()
            });
            Some(ModuleShape {
                name,
                down: down.dims(),
                alpha,
            })
        })
        .collect();
    let asked: Vec<ModuleShape> = network
        .modules
        .iter()
        .map(|module| ModuleShape {
            name: &module.name,
            down: module.down.as_tensor().dims(),
            alpha: Some(module.alpha.value()),
        })
        .collect();
    let by_name: HashMap<&str, &ModuleShape> = saved.iter().map(|m| (m.name, m)).collect();
    let same = saved.len() == asked.len()
        && asked.iter().all(|ours| {
            by_name.get(ours.name).is_some_and(|theirs| {
                theirs.down == ours.down
                    && (theirs.alpha.zip(ours.alpha)).is_none_or(|(a, b)| (a - b).abs() < 1e-6)
            })
        });
    if same {
        return Ok(());
    }
    let asked_names: std::collections::HashSet<&str> = asked.iter().map(|m| m.name).collect();
    let mut only_saved: Vec<&str> = saved
        .iter()
        .map(|m| m.name)
        .filter(|name| !asked_names.contains(name))
        .collect();
    let mut only_asked: Vec<&str> = asked
        .iter()
        .map(|m| m.name)
        .filter(|name| !by_name.contains_key(name))
        .collect();
    only_saved.sort_unstable();
    only_asked.sort_unstable();
    let mut modules = String::new();
    for (list, place) in [(&only_saved, "the state"), (&only_asked, "this run")] {
        if !list.is_empty() {
            let more = list.len().saturating_sub(3);
            modules.push_str(&format!(
                "; modules only in {place}: {}{}",
                list[..list.len().min(3)].join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
    }
    Err(Error::Usage(format!(
        "--resume {}: the state was saved with {}, but this command line asks for {}{modules}; \
         resume with the network flags the state was saved with (--network_dim, \
         --network_alpha, --network_args), or start a new training (another --output_dir or \
         --output_name, without --resume)",
        dir.display(),
        describe(&saved),
        describe(&asked)
    )))
}

/// `network_dim 4, network_alpha 1 over 96 modules` (and the same for conv modules), in the
/// terms of the command line.
fn describe(modules: &[ModuleShape]) -> String {
    let range = |values: Vec<f64>| -> String {
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if low == high {
            format!("{low}")
        } else {
            format!("{low}..{high}")
        }
    };
    let mut parts = Vec::new();
    for (conv, prefix) in [(false, "network"), (true, "conv")] {
        let group: Vec<&ModuleShape> = modules.iter().filter(|m| m.is_conv() == conv).collect();
        if group.is_empty() {
            continue;
        }
        let dims = range(group.iter().map(|m| m.down[0] as f64).collect());
        let alphas: Vec<f64> = group.iter().filter_map(|m| m.alpha).collect();
        let alpha = if alphas.is_empty() {
            "unknown".to_string()
        } else {
            range(alphas)
        };
        parts.push(format!(
            "{prefix}_dim {dims}, {prefix}_alpha {alpha} over {} modules",
            group.len()
        ));
    }
    if parts.is_empty() {
        "no LoRA modules".into()
    } else {
        parts.join("; ")
    }
}

/// Restores weights and optimizer moments into `network` / `optimizer`; returns the position.
/// A run of `world_size` ranks resumes only a state saved by as many ranks.
pub fn load(
    dir: &Path,
    network: &Network,
    optimizer: &mut Optimizer,
    world_size: usize,
) -> Result<Progress> {
    let (value, global_step) = read_state_json(dir)?;
    let state_path = dir.join(STATE_FILE);
    // States saved before data-parallel runs existed come from one process.
    let saved_world_size = value["lorakit_world_size"].as_u64().unwrap_or(1) as usize;
    if saved_world_size != world_size {
        return Err(Error::Usage(format!(
            "{}: saved by a run of {saved_world_size} ranks; resume it with WORLD_SIZE={saved_world_size} (this run has {world_size}), or start a new run",
            dir.display()
        )));
    }
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
    match network {
        Network::Lora(network) => {
            check_same_network(dir, &weights, network)?;
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
        }
        Network::Dylora(network) => {
            network.load_weights(&model_path, true).map_err(|e| {
                Error::Usage(format!(
                    "{} was saved for another DyLoRA network ({e}); resume with the \
                     --network_dim / --network_alpha / --network_args it was saved with",
                    dir.display()
                ))
            })?;
        }
        Network::Lycoris(network) => {
            // The state's file names exactly this network's tensors.
            let keys: std::collections::BTreeSet<String> = (network.training_state_dict()?)
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            let saved: std::collections::BTreeSet<String> = weights.keys().cloned().collect();
            if keys != saved {
                let differs = |a: &std::collections::BTreeSet<String>, b| {
                    a.difference(b)
                        .next()
                        .cloned()
                        .unwrap_or_else(|| "nothing".into())
                };
                return Err(Error::Usage(format!(
                    "{} was saved for another LyCORIS network (other algo, dims or modules: it \
                     has {}, this run has {}); resume with the --network_dim / --network_alpha / \
                     --network_args it was saved with",
                    dir.display(),
                    differs(&saved, &keys),
                    differs(&keys, &saved),
                )));
            }
            network
                .load_weights(&model_path)
                .map_err(|e| corrupt(&model_path, e.to_string()))?;
        }
    }
    let optimizer_path = dir.join("optimizer.safetensors");
    let moments: HashMap<String, Tensor> =
        candle_core::safetensors::load(&optimizer_path, &Device::Cpu)
            .map_err(|e| corrupt(&optimizer_path, e.to_string()))?;
    optimizer
        .restore_state(&moments)
        .map_err(|e| corrupt(&optimizer_path, e))?;
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
        world_size,
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
