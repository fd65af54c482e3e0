//! `train-lora`'s command line, as sd-scripts' `train_network.py` reads its own: unambiguous
//! prefixes of option names, `--config_file` TOML (the command line wins) and `--output_config`,
//! every other option of `train_network.py` accepted or refused by name ([`kohya_options`]), and
//! with `--resume` the settings saved in the state fill in every option the command line leaves
//! out (docs/kohya-compat.md#command-lines, docs/kohya-compat.md#resuming).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};
use serde_json::Value;

use super::kohya_options::{self, Handling};
use crate::stages::train_lora::optim::{self, OptimizerKind};
use crate::stages::train_lora::settings::{self, Notice, Settings};
use crate::stages::train_lora::state;
use crate::{Error, Result};

/// Options that say how this invocation runs, not what the run is.
const NOT_SETTINGS: &[&str] = &["resume", "quiet", "verbose", "config_file", "output_config"];

/// A parsed train-lora command line.
#[derive(Debug)]
pub struct Parsed<P> {
    /// The tool's arguments.
    pub args: P,
    /// The explicitly given settings (with `--config_file` and `--resume`: theirs included).
    pub settings: Settings,
    /// Kohya options accepted without an effect or with a warning, for the run's log.
    pub notices: Vec<Notice>,
}

/// Parses the command line of a tool whose flags include
/// [`TrainArgs`](crate::stages::train_lora::TrainArgs). `--help`, `--version` and malformed
/// command lines exit as clap does; `--output_config` writes the config file and exits.
pub fn parse<P: CommandFactory + FromArgMatches>(
    argv: impl IntoIterator<Item = OsString>,
) -> Result<Parsed<P>> {
    let argv: Vec<OsString> = argv.into_iter().collect();
    let command = command::<P>();
    let mut full = argv.clone();
    let mut restored = Vec::new();
    if let Ok(probe) = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
    {
        let mut given = explicit_settings(&command, &probe);
        let config = probe.try_get_one::<PathBuf>("config_file").ok().flatten();
        if let Some(config) = config.filter(|_| !probe.get_flag("output_config")) {
            let from_file = read_config_file(&command, &config_path(config))?;
            let missing = Settings {
                values: from_file
                    .values
                    .into_iter()
                    .filter(|(id, _)| !given.values.contains_key(id))
                    .collect(),
                restored: Vec::new(),
            };
            full.extend(command_line_of(&command, &missing));
            given.values.extend(missing.values);
        }
        if let Some(resume) = probe.try_get_one::<String>("resume").ok().flatten() {
            let output_dir = given.values.get("output_dir").and_then(|v| v[0].as_str());
            let dir = state::resolve_resume(resume, output_dir.map(Path::new))?;
            if let Some(saved) = state::saved_settings(&dir)? {
                let missing = settings::restore(&dir, &saved, &given)?;
                full.extend(command_line_of(&command, &missing));
                restored = missing.restored;
                given.values.extend(missing.values);
            }
        }
        if !given.values.contains_key("in_json") && !probe.get_flag("output_config") {
            return Err(missing_dataset(&given, &probe));
        }
    }
    let matches = command
        .clone()
        .try_get_matches_from(&full)
        .unwrap_or_else(|e| e.exit());
    let mut notices = Vec::new();
    let mut refused = Vec::new();
    for option in kohya_options::given(&matches) {
        match option.handling {
            Handling::NoEffect(why) => notices.push(Notice {
                warning: false,
                text: format!(
                    "--{} is accepted and has no effect here: {why}",
                    option.name
                ),
            }),
            Handling::Warn(what) => notices.push(Notice {
                warning: true,
                text: format!("--{}: {what}", option.name),
            }),
            Handling::Refuse(why) => refused.push(format!("--{}: {why}", option.name)),
        }
    }
    refused.extend(optimizer_refusal(&matches));
    if !refused.is_empty() {
        return Err(Error::Usage(refused.join("\n")));
    }
    let args = P::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let mut settings = explicit_settings(&command, &matches);
    settings.restored = restored;
    if matches.get_flag("output_config") {
        let config = matches.get_one::<PathBuf>("config_file").ok_or_else(|| {
            Error::Usage(
                "--output_config writes the settings to --config_file FILE: give it".into(),
            )
        })?;
        let path = config_path(config);
        write_config_file(&command, &matches, &settings, &path)?;
        eprintln!(
            "wrote the settings of this command line to {}",
            path.display()
        );
        std::process::exit(0);
    }
    Ok(Parsed {
        args,
        settings,
        notices,
    })
}

/// Without `--in_json`: what the command line asks for instead (a folder dataset, sd-scripts'
/// usual form, is named with the way to prepare it), with every other refused option, so that
/// a kohya command line learns everything it needs at once.
fn missing_dataset(given: &Settings, probe: &ArgMatches) -> Error {
    let folders: Vec<String> = ["train_data_dir", "reg_data_dir", "dataset_config"]
        .iter()
        .filter(|id| given.values.contains_key(**id))
        .map(|id| format!("--{id}"))
        .collect();
    let mut lines: Vec<String> = ["pretrained_model_name_or_path", "output_dir"]
        .iter()
        .filter(|id| !given.values.contains_key(**id))
        .map(|id| format!("--{id} is required"))
        .collect();
    lines.push(if folders.is_empty() {
        "--in_json METADATA is required: the fine-tuning metadata JSON that prepare-latents wrote \
         (with its latent and text-encoder caches)"
            .to_string()
    } else {
        format!(
            "{} without --in_json: {}",
            folders.join(" / "),
            kohya_options::FOLDER_DATASETS
        )
    });
    lines.extend(
        kohya_options::given(probe)
            .into_iter()
            .filter(|option| !["reg_data_dir", "dataset_config"].contains(&option.name))
            .filter_map(|option| match option.handling {
                Handling::Refuse(why) => Some(format!("--{}: {why}", option.name)),
                _ => None,
            }),
    );
    lines.extend(optimizer_refusal(probe));
    Error::Usage(lines.join("\n"))
}

/// The refusal of an optimizer train-lora does not have, checked with the other options so a
/// kohya command line learns everything it needs at once (the stage checks it again).
fn optimizer_refusal(matches: &ArgMatches) -> Option<String> {
    let name = matches
        .try_get_one::<String>("optimizer_type")
        .ok()
        .flatten()
        .cloned()
        .unwrap_or_default();
    let flag = |id: &str| matches.try_get_one::<bool>(id).ok().flatten() == Some(&true);
    let args: Vec<String> = matches
        .try_get_many::<String>("optimizer_args")
        .ok()
        .flatten()
        .map(|values| values.cloned().collect())
        .unwrap_or_default();
    optim::optimizer_name(&name, flag("use_8bit_adam"), flag("use_lion_optimizer"))
        .and_then(|name| OptimizerKind::parse(&name, &args))
        .err()
        .map(|e| e.to_string())
}

/// The command of a tool whose flags include `TrainArgs`, with argparse's conveniences
/// (unambiguous prefixes), `--config_file` / `--output_config` and every other kohya option.
pub fn command<P: CommandFactory>() -> Command {
    P::command()
        .infer_long_args(true)
        .arg(
            Arg::new("config_file")
                .long("config_file")
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "TOML file of options (sections flattened, as sd-scripts reads it); options \
                     on the command line win. `.toml` is added when the name has no extension",
                ),
        )
        .arg(
            Arg::new("output_config")
                .long("output_config")
                .action(ArgAction::SetTrue)
                .help("Write this command line's options to --config_file and exit"),
        )
        .args(
            kohya_options::KOHYA_OPTIONS
                .iter()
                .map(kohya_options::clap_arg),
        )
}

/// `--config_file NAME`, with `.toml` added when NAME has no extension (as sd-scripts).
fn config_path(name: &Path) -> PathBuf {
    if name.extension().is_some() {
        name.to_path_buf()
    } else {
        name.with_extension("toml")
    }
}

/// The options of a `--config_file` TOML: top-level keys and the keys of each section (one
/// level, as sd-scripts flattens them); `false` flags and empty strings (which the kohya_ss GUI
/// writes for unset fields) are left out. Unknown keys are refused by name.
fn read_config_file(command: &Command, path: &Path) -> Result<Settings> {
    let text = crate::infra::fsio::read(path)?;
    let text = String::from_utf8(text)
        .map_err(|_| Error::bad_file(path, "is not UTF-8 text; a config file is TOML"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::bad_file(path, format!("is not valid TOML: {e}")))?;
    let mut flat = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(section) => flat.extend(section),
            value => flat.push((key, value)),
        }
    }
    let mut settings = Settings::default();
    for (key, value) in flat {
        let Some(arg) = command.get_arguments().find(|a| a.get_id().as_str() == key) else {
            return Err(Error::bad_file(
                path,
                format!("`{key}` is not an option of train-lora or train_network.py"),
            ));
        };
        let is_flag = !arg.get_action().takes_values();
        let scalar = |value: &toml::Value| -> Result<Option<String>> {
            Ok(match value {
                toml::Value::String(text) if text.is_empty() => None,
                toml::Value::String(text) => Some(text.clone()),
                toml::Value::Integer(n) => Some(n.to_string()),
                toml::Value::Float(x) => Some(x.to_string()),
                toml::Value::Boolean(b) => Some(if *b { "True" } else { "False" }.into()),
                other => {
                    return Err(Error::bad_file(
                        path,
                        format!("`{key}` = {other}: give a string, number, boolean or list"),
                    ))
                }
            })
        };
        let setting = match (&value, is_flag) {
            (toml::Value::Boolean(true), true) => Some(Value::Bool(true)),
            (toml::Value::Boolean(false), true) => None,
            (_, true) => {
                return Err(Error::bad_file(
                    path,
                    format!("`{key}` is a flag: write `{key} = true` or leave it out"),
                ))
            }
            (toml::Value::Array(items), false) => {
                let mut values = Vec::new();
                for item in items {
                    values.extend(scalar(item)?.map(Value::from));
                }
                (!values.is_empty()).then_some(Value::Array(values))
            }
            (value, false) => scalar(value)?.map(|v| Value::Array(vec![Value::from(v)])),
        };
        if let Some(setting) = setting {
            settings.values.insert(key, setting);
        }
    }
    Ok(settings)
}

/// `--output_config`: the explicitly given options as a TOML file sd-scripts reads too (numbers
/// as numbers, flags as booleans, several values as lists); refuses to replace a file.
fn write_config_file(
    command: &Command,
    matches: &ArgMatches,
    settings: &Settings,
    path: &Path,
) -> Result<()> {
    if path.exists() {
        return Err(Error::Usage(format!(
            "--output_config: {} exists; choose another --config_file name",
            path.display()
        )));
    }
    let mut table = toml::Table::new();
    for (id, value) in &settings.values {
        let typed = match value {
            Value::Array(values) => {
                let items: Vec<toml::Value> = values
                    .iter()
                    .map(|v| typed_value(matches, id, v.as_str().unwrap_or_default()))
                    .collect();
                let many = command
                    .get_arguments()
                    .find(|a| a.get_id().as_str() == id)
                    .is_some_and(|a| matches!(a.get_action(), ArgAction::Append));
                match (many, items.len()) {
                    (false, 1) => items.into_iter().next().expect("one item"),
                    _ => toml::Value::Array(items),
                }
            }
            _ => toml::Value::Boolean(true),
        };
        table.insert(id.clone(), typed);
    }
    let text = toml::to_string(&table)
        .map_err(|e| Error::Usage(format!("--output_config: cannot write TOML: {e}")))?;
    crate::infra::fsio::write_atomic(path, text.as_bytes())
}

/// A value as TOML types it: an integer or float when the option parses to a number.
fn typed_value(matches: &ArgMatches, id: &str, text: &str) -> toml::Value {
    let integer = matches.try_get_one::<usize>(id).is_ok()
        || matches.try_get_one::<u64>(id).is_ok()
        || matches.try_get_one::<i64>(id).is_ok();
    let float = matches.try_get_one::<f64>(id).is_ok() || matches.try_get_one::<f32>(id).is_ok();
    match (integer, float) {
        (true, _) => text
            .parse::<i64>()
            .map_or_else(|_| toml::Value::from(text), toml::Value::from),
        (_, true) => text
            .parse::<f64>()
            .map_or_else(|_| toml::Value::from(text), toml::Value::from),
        _ => toml::Value::from(text),
    }
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
