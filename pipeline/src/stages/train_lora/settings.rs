//! The settings of a training run as its command line gave them, kept in every state folder so
//! that `--resume` continues the same run without the original flags
//! (docs/kohya-compat.md#resuming).
//!
//! A setting is an option id (`network_dim`) with its values as typed (`["8"]`), or `true` for a
//! flag. Paths are stored absolute, so a run resumes from any working folder.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{Error, Result};

/// Options a resumed run may change: how long it runs, where and how often it saves and logs.
/// Every other option decides what is trained and must stay as the run started.
const MAY_CHANGE_ON_RESUME: &[&str] = &[
    "max_train_steps",
    "max_train_epochs",
    "output_dir",
    "output_name",
    "save_model_as",
    "save_precision",
    "save_every_n_epochs",
    "save_every_n_steps",
    "save_n_epoch_ratio",
    "save_last_n_epochs",
    "save_last_n_epochs_state",
    "save_last_n_steps",
    "save_last_n_steps_state",
    "save_state",
    "save_state_on_train_end",
    "no_metadata",
    "training_comment",
    "loss_log",
    "log_with",
    "logging_dir",
    "log_prefix",
    "device",
    "validate_every_n_steps",
    "validate_every_n_epochs",
    "max_validation_steps",
    "sample_prompts",
    "sample_every_n_steps",
    "sample_every_n_epochs",
    "sample_at_first",
    "sample_sampler",
];

/// Explicitly given options of a run, by option id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Option id → values as typed (`["8"]`), or `true` for a flag.
    pub values: BTreeMap<String, Value>,
    /// The options a `--resume` restored from the state (as `--id value` text, for the log).
    pub restored: Vec<String>,
}

impl Settings {
    /// The settings as stored in a state folder.
    pub fn to_json(&self) -> Value {
        Value::Object(self.values.clone().into_iter().collect())
    }

    /// Settings read back from a state folder's JSON object.
    pub fn from_json(value: &Value) -> Option<Self> {
        let values = value
            .as_object()?
            .iter()
            .map(|(id, v)| (id.clone(), v.clone()))
            .collect();
        Some(Settings {
            values,
            restored: Vec::new(),
        })
    }

    /// These settings with `id` set to one value (the seed a run drew for itself).
    pub fn with_value(&self, id: &str, value: String) -> Self {
        let mut settings = self.clone();
        settings.values.insert(id.into(), Value::from(vec![value]));
        settings
    }
}

/// A line for the run's log about an option the command line gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Logged as a warning (else as information).
    pub warning: bool,
    /// What to say.
    pub text: String,
}

/// `--id v1 v2` / `--id` as a user reads it.
fn describe(id: &str, value: Option<&Value>) -> String {
    match value {
        None => format!("--{id} not given"),
        Some(Value::Array(values)) => {
            let shown: Vec<String> = values
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), String::from))
                .collect();
            format!("--{id} {}", shown.join(" "))
        }
        Some(_) => format!("--{id}"),
    }
}

/// The settings a resumed run takes from its state that `given` (this command line) leaves out;
/// refuses options that would change what the run trains, naming each.
pub fn restore(state: &std::path::Path, saved: &Settings, given: &Settings) -> Result<Settings> {
    let conflicts: Vec<String> = given
        .values
        .iter()
        .filter(|(id, value)| {
            !MAY_CHANGE_ON_RESUME.contains(&id.as_str()) && saved.values.get(*id) != Some(*value)
        })
        .map(|(id, value)| {
            format!(
                "{} (the run used {})",
                describe(id, Some(value)),
                match saved.values.get(id) {
                    Some(old) => describe(id, Some(old)),
                    None => "the default".into(),
                }
            )
        })
        .collect();
    if !conflicts.is_empty() {
        return Err(Error::Usage(format!(
            "--resume {}: this command line changes what the resumed run trains: {}. Leave these \
             options out (the state restores the run's settings), or start a new training \
             without --resume. On resume only the length (--max_train_steps, \
             --max_train_epochs), saving (--output_dir, --output_name, --save_*) and logging \
             options may change.",
            state.display(),
            conflicts.join("; ")
        )));
    }
    let values: BTreeMap<String, Value> = saved
        .values
        .iter()
        .filter(|(id, _)| !given.values.contains_key(*id))
        .map(|(id, v)| (id.clone(), v.clone()))
        .collect();
    let restored = values.iter().map(|(id, v)| describe(id, Some(v))).collect();
    Ok(Settings { values, restored })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(value: Value) -> Settings {
        Settings::from_json(&value).unwrap()
    }

    #[test]
    fn resume_restores_what_the_command_line_leaves_out() {
        let saved =
            settings(json!({"network_dim": ["8"], "flip_aug": true, "max_train_steps": ["200"]}));
        let given = settings(json!({"max_train_steps": ["300"], "network_dim": ["8"]}));
        let restored = restore(std::path::Path::new("s"), &saved, &given).unwrap();
        assert_eq!(restored.values, settings(json!({"flip_aug": true})).values);
        assert_eq!(restored.restored, vec!["--flip_aug".to_string()]);
    }

    #[test]
    fn resume_refuses_a_changed_training_setting_by_name() {
        let saved = settings(json!({"network_dim": ["8"]}));
        let given = settings(json!({"network_dim": ["4"], "flip_aug": true}));
        let message = restore(std::path::Path::new("s"), &saved, &given)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("--network_dim 4 (the run used --network_dim 8)")
                && message.contains("--flip_aug (the run used the default)"),
            "{message}"
        );
    }
}
