//! Periodic and final saves of a training run (docs/kohya-compat.md#save-names-and-rotation,
//! docs/kohya-compat.md#training-state): model files with sd-scripts' names and `ss_*` metadata,
//! state folders next to them, and rotation of old ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;

use super::optim::Optimizer;
use super::state;
use super::TrainArgs;
use crate::networks::Network;
use crate::{Error, Result};

/// When a periodic save happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavePoint {
    /// After optimizer step N (`<name>-step<N:08>`).
    Step(usize),
    /// At the end of epoch N (`<name>-<N:06>`).
    Epoch(usize),
}

/// Writes the model files and state folders of one run.
pub struct Saver<'a> {
    /// The run's options (output folder, rotation, metadata switches).
    pub args: &'a TrainArgs,
    /// The network being trained.
    pub network: &'a Network,
    /// `--save_precision`.
    pub save_dtype: Option<DType>,
    /// Metadata shared by every file; steps, epoch and finish time are added per file.
    pub meta_base: BTreeMap<String, String>,
    /// Output name (`--output_name` or "last").
    pub name: String,
    /// Save every this many epochs (`--save_every_n_epochs`, or from `--save_n_epoch_ratio`).
    pub every_n_epochs: Option<usize>,
    /// The run's settings (with the seed it uses), kept in every state folder for `--resume`.
    pub settings: super::settings::Settings,
}

impl Saver<'_> {
    /// Writes `<stem>.safetensors` for a network trained `steps` steps into `epoch` epochs.
    pub fn save_model(&self, stem: &str, steps: usize, epoch: usize) -> Result<PathBuf> {
        let path = self.args.output_dir.join(format!("{stem}.safetensors"));
        self.save_model_at(&path, steps, epoch)?;
        Ok(path)
    }

    /// Writes the network, trained `steps` steps into `epoch` epochs, to `path` (atomically).
    pub fn save_model_at(&self, path: &Path, steps: usize, epoch: usize) -> Result<()> {
        let mut meta = self.meta_base.clone();
        if !self.args.no_metadata {
            meta.insert(
                "ss_training_finished_at".into(),
                crate::infra::pyjson::float_repr(super::unix_time()),
            );
            meta.insert("ss_steps".into(), steps.to_string());
            meta.insert("ss_epoch".into(), epoch.to_string());
        }
        self.network.save(path, self.save_dtype, &meta)
    }

    /// A periodic save: the model file, its state folder with `--save_state`, then removal of
    /// the ones `--save_last_n_*` no longer keeps. `epoch` is the metadata's epoch count.
    pub fn checkpoint(
        &self,
        at: SavePoint,
        steps: usize,
        epoch: usize,
        optimizer: &Optimizer,
        position: &state::Progress,
    ) -> Result<()> {
        let stem = self.stem(at);
        self.save_model(&stem, steps, epoch)?;
        if self.args.save_state {
            let dir = self.args.output_dir.join(format!("{stem}-state"));
            state::save(&dir, self.network, optimizer, position, &self.settings)?;
        }
        let args = self.args;
        let (keep_models, keep_states) = match at {
            SavePoint::Step(_) => (args.save_last_n_steps, args.save_last_n_steps_state),
            SavePoint::Epoch(_) => (args.save_last_n_epochs, args.save_last_n_epochs_state),
        };
        if let Some(old) = keep_models.and_then(|keep| self.expired(at, keep)) {
            remove_file_if_present(
                &(self.args.output_dir).join(format!("{}.safetensors", self.stem(old))),
            )?;
        }
        if let Some(old) = keep_states
            .or(keep_models)
            .and_then(|keep| self.expired(at, keep))
        {
            let dir = self
                .args
                .output_dir
                .join(format!("{}-state", self.stem(old)));
            if dir.is_dir() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
        }
        Ok(())
    }

    /// The final state folder (`<name>-state`), with `--save_state` or `--save_state_on_train_end`.
    pub fn final_state(&self, optimizer: &Optimizer, position: &state::Progress) -> Result<()> {
        if self.args.save_state || self.args.save_state_on_train_end {
            let dir = self.args.output_dir.join(format!("{}-state", self.name));
            state::save(&dir, self.network, optimizer, position, &self.settings)?;
        }
        Ok(())
    }

    /// The file stem of a periodic save (`<name>-step<N:08>` or `<name>-<N:06>`).
    pub fn stem(&self, at: SavePoint) -> String {
        match at {
            SavePoint::Step(step) => format!("{}-step{step:08}", self.name),
            SavePoint::Epoch(epoch) => format!("{}-{epoch:06}", self.name),
        }
    }

    /// The save that keeping the last `keep` ones drops once `at` is written (see
    /// docs/kohya-compat.md#save-names-and-rotation): epoch `e - every·keep`; step `s - keep - 1`
    /// rounded down to a multiple of the interval.
    fn expired(&self, at: SavePoint, keep: usize) -> Option<SavePoint> {
        match at {
            SavePoint::Epoch(epoch) => {
                let every = self.every_n_epochs?;
                epoch
                    .checked_sub(every * keep)
                    .filter(|&e| e > 0)
                    .map(SavePoint::Epoch)
            }
            SavePoint::Step(step) => {
                let every = self.args.save_every_n_steps.filter(|&n| n > 0)?;
                let old = step.checked_sub(keep + 1)?;
                Some(old - old % every)
                    .filter(|&s| s > 0)
                    .map(SavePoint::Step)
            }
        }
    }
}

fn remove_file_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}
