//! `train-lora`'s command line: with `--resume`, the settings saved in the state fill in every
//! option the command line leaves out (docs/kohya-compat.md#resuming).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory, FromArgMatches};
use serde_json::Value;

use crate::stages::train_lora::settings::{self, Settings};
use crate::stages::train_lora::state;
use crate::Result;

/// Options that say how this invocation runs, not what the run is.
const NOT_SETTINGS: &[&str] = &["resume", "quiet", "verbose"];

/// Parses the command line of a tool whose flags include [`TrainArgs`]
/// (crate::stages::train_lora::TrainArgs), and returns the explicitly given settings (with
/// `--resume`: the restored ones included). `--help`, `--version` and malformed command lines
/// exit as clap does.
pub fn parse<P: CommandFactory + FromArgMatches>(
    argv: impl IntoIterator<Item = OsString>,
) -> Result<(P, Settings)> {
    let argv: Vec<OsString> = argv.into_iter().collect();
    let command = P::command();
    let mut full = argv.clone();
    let mut restored = Vec::new();
    if let Ok(probe) = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
    {
        if let Some(resume) = probe.try_get_one::<String>("resume").ok().flatten() {
            let output_dir = probe.try_get_one::<PathBuf>("output_dir").ok().flatten();
            let dir = state::resolve_resume(resume, output_dir.map(PathBuf::as_path))?;
            if let Some(saved) = state::saved_settings(&dir)? {
                let given = explicit_settings(&command, &probe);
                let missing = settings::restore(&dir, &saved, &given)?;
                full.extend(command_line_of(&command, &missing));
                restored = missing.restored;
            }
        }
    }
    let matches = command
        .clone()
        .try_get_matches_from(&full)
        .unwrap_or_else(|e| e.exit());
    let parsed = P::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let mut settings = explicit_settings(&command, &matches);
    settings.restored = restored;
    Ok((parsed, settings))
}

/// The options given on the command line, paths made absolute.
fn explicit_settings(command: &Command, matches: &ArgMatches) -> Settings {
    let mut settings = Settings::default();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_SETTINGS.contains(&id) || matches.value_source(id) != Some(ValueSource::CommandLine)
        {
            continue;
        }
        let value = if !arg.get_action().takes_values() {
            Value::Bool(true)
        } else if let Ok(Some(paths)) = matches.try_get_many::<PathBuf>(id) {
            paths
                .map(|path| {
                    Value::from(
                        std::path::absolute(path)
                            .unwrap_or_else(|_| path.clone())
                            .to_string_lossy()
                            .into_owned(),
                    )
                })
                .collect()
        } else {
            matches
                .get_raw(id)
                .into_iter()
                .flatten()
                .map(|raw| Value::from(raw.to_string_lossy().into_owned()))
                .collect()
        };
        settings.values.insert(id.to_string(), value);
    }
    settings
}

/// `--long=value` tokens (one per value) and `--flag` tokens that give `settings`.
fn command_line_of(command: &Command, settings: &Settings) -> Vec<OsString> {
    let mut tokens = Vec::new();
    for (id, value) in &settings.values {
        let Some(long) = command
            .get_arguments()
            .find(|arg| arg.get_id().as_str() == id)
            .and_then(|arg| arg.get_long())
        else {
            continue;
        };
        match value {
            Value::Array(values) => {
                for v in values {
                    tokens.push(format!("--{long}={}", v.as_str().unwrap_or_default()).into());
                }
            }
            _ => tokens.push(format!("--{long}").into()),
        }
    }
    tokens
}
