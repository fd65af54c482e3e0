//! `--log_with tensorboard`: the loss-log values as TensorBoard scalars, under the tags and in
//! the folder layout sd-scripts uses (`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/network_train`).

use std::path::PathBuf;

use super::TrainArgs;
use crate::formats::tfevents::EventWriter;
use crate::{Error, Result};

/// Loss-log keys and the TensorBoard tags sd-scripts logs the same values under.
const TAGS: &[(&str, &str)] = &[
    ("loss", "loss/current"),
    ("loss_average", "loss/average"),
    ("lr", "lr/unet"),
    ("keys_scaled", "max_norm/keys_scaled"),
    ("average_key_norm", "max_norm/average_key_norm"),
    ("max_key_norm", "max_norm/max_key_norm"),
    ("validation_loss", "loss/validation/step_average"),
    ("validation_divergence", "loss/validation/step_divergence"),
    ("epoch_loss_average", "loss/epoch_average"),
    ("epoch_validation_loss", "loss/validation/epoch_average"),
    (
        "epoch_validation_divergence",
        "loss/validation/epoch_divergence",
    ),
];

/// Where a run's events go, from `--log_with`, `--logging_dir` and `--log_prefix`; `None`
/// without tracking. As in sd-scripts, `--logging_dir` alone means TensorBoard.
pub fn run_dir(args: &TrainArgs) -> Result<Option<PathBuf>> {
    let tracker = match (args.log_with.as_deref(), &args.logging_dir) {
        (None, None) => return Ok(None),
        (None, Some(_)) => "tensorboard",
        (Some(tracker), _) => tracker,
    };
    match tracker {
        "tensorboard" => {}
        "wandb" | "all" => {
            return Err(Error::Usage(format!(
                "--log_with {tracker}: Weights & Biases needs an account and the network; use \
                 --log_with tensorboard --logging_dir DIR (read with `tensorboard --logdir DIR`)"
            )))
        }
        other => {
            return Err(Error::Usage(format!(
                "--log_with {other}: use tensorboard (with --logging_dir)"
            )))
        }
    }
    let Some(dir) = &args.logging_dir else {
        return Err(Error::Usage(
            "--log_with tensorboard needs --logging_dir DIR for the event files".into(),
        ));
    };
    let prefix = args.log_prefix.as_deref().unwrap_or("");
    if prefix.contains(['/', '\\']) {
        return Err(Error::Usage(format!(
            "--log_prefix {prefix:?}: give a plain name (choose the folder with --logging_dir)"
        )));
    }
    Ok(Some(
        dir.join(format!(
            "{prefix}{}",
            crate::infra::clock::local_timestamp()
        ))
        .join(args.log_tracker_name.as_deref().unwrap_or("network_train")),
    ))
}

/// Appends loss-log lines to a TensorBoard event file.
pub struct Tracker {
    writer: EventWriter,
}

impl Tracker {
    /// Starts an event file in `dir`.
    pub fn create(dir: &std::path::Path) -> Result<Self> {
        let writer = EventWriter::create(dir)?;
        tracing::info!("TensorBoard events: {}", writer.path().display());
        Ok(Tracker { writer })
    }

    /// Records the values of one loss-log line at its `step`.
    pub fn record(&mut self, line: &serde_json::Value) -> Result<()> {
        let step = line["step"].as_u64().unwrap_or_default() as usize;
        let scalars: Vec<(&str, f32)> = TAGS
            .iter()
            .filter_map(|(key, tag)| Some((*tag, line.get(*key)?.as_f64()? as f32)))
            .collect();
        self.writer.scalars(step, &scalars)
    }
}
