//! `train-lora`'s command line, as sd-scripts' `train_network.py` reads its own: unambiguous
//! prefixes of option names, `--config_file` TOML (the command line wins) and `--output_config`,
//! every other option of `train_network.py` accepted or refused by name ([`kohya_options`]), and
//! with `--resume` the settings saved in the state fill in every option the command line leaves
//! out (docs/kohya-compat.md#command-lines, docs/kohya-compat.md#resuming).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command, CommandFactory, FromArgMatches};
use serde_json::Value;

use super::kohya_options::{self, Handling};
use super::prepare_dataset::DatasetArgs;
use crate::stages::train_lora::optim::{self, OptimizerKind};
use crate::stages::train_lora::preparation::{self, Preparation, ToolRun};
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
    /// Kohya options accepted without an effect, for the run's log.
    pub notices: Vec<Notice>,
    /// Without `--in_json`: the preparation of the command line's kohya dataset.
    pub preparation: Option<Preparation>,
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
    let mut preparation = None;
    let mut early_notices = Vec::new();
    let mut writes_config = false;
    if let Ok(probe) = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
    {
        writes_config = probe.get_flag("output_config");
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
        let typed = |id: &str| probe.value_source(id) == Some(ValueSource::CommandLine);
        let config = given.values.contains_key("dataset_config");
        if given.values.contains_key("in_json")
            && !config
            && given.values.contains_key("reg_data_dir")
        {
            early_notices.push(Notice {
                warning: true,
                text: "--reg_data_dir is not used: with --in_json the dataset is the metadata's \
                       (sd-scripts' fine-tuning dataset has no regularisation images)"
                    .into(),
            });
        }
        if config && typed("in_json") {
            early_notices.push(Notice {
                warning: true,
                text: "--in_json is not used: --dataset_config describes the dataset (as in \
                       sd-scripts)"
                    .into(),
            });
        }
        if (config || !given.values.contains_key("in_json")) && !probe.get_flag("output_config") {
            let folders = ["train_data_dir", "dataset_config"]
                .iter()
                .any(|id| given.values.contains_key(*id));
            let required = ["pretrained_model_name_or_path", "output_dir"]
                .iter()
                .all(|id| given.values.contains_key(*id));
            if !(folders && required) {
                return Err(missing_dataset(&given, &probe));
            }
            let config_variants = config.then(|| check_dataset_config(&given)).transpose()?;
            let quiet = probe.try_get_one::<bool>("quiet").ok().flatten() == Some(&true);
            let planned = dataset_preparation(&given, config_variants, quiet);
            full.push(format!("--in_json={}", planned.metadata().display()).into());
            preparation = Some(planned);
        }
    }
    // `--output_config` records a kohya dataset's folders as given: no metadata is planned, so
    // `--in_json` is not required there.
    let matches_command = match writes_config {
        true => command
            .clone()
            .mut_arg("in_json", |arg| arg.required(false)),
        false => command.clone(),
    };
    let matches = matches_command
        .try_get_matches_from(&full)
        .unwrap_or_else(|e| e.exit());
    let mut notices = early_notices;
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
            Handling::Refuse(why) => refused.push(format!("--{}: {why}", option.name)),
        }
    }
    if preparation.is_none() {
        for id in ["caption_prefix", "caption_suffix"] {
            if matches.value_source(id) == Some(ValueSource::CommandLine) {
                refused.push(format!(
                    "--{id}: it is encoded with the captions, which --in_json's caches hold \
                     already; give it to prepare-dataset when preparing that metadata, or train \
                     from the folders (--train_data_dir / --dataset_config without --in_json) \
                     and train-lora prepares them with it"
                ));
            }
        }
    }
    refused.extend(optimizer_refusal(&matches));
    if !refused.is_empty() {
        return Err(Error::Usage(refused.join("\n")));
    }
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
    let args = P::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok(Parsed {
        args,
        settings,
        notices,
        preparation,
    })
}

/// Checks the subsets of a `--dataset_config` for the settings training cannot apply (refused by
/// key, as on the command line). Their caption, flip and batch settings apply per subset and
/// dataset from the prepared metadata; returns whether any subset shuffles or drops tags, so
/// that the text-encoder caches need caption variants.
fn check_dataset_config(given: &Settings) -> Result<bool> {
    let mut argv: Vec<OsString> = vec!["prepare-dataset".into()];
    argv.extend(dataset_options(given));
    let matches = DatasetArgs::augment_args(Command::new("prepare-dataset"))
        .try_get_matches_from(argv)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let args = DatasetArgs::from_arg_matches(&matches).map_err(|e| Error::Usage(e.to_string()))?;
    let description = crate::dataset::kohya::describe(&args.command_line()?)?;
    let file = args.dataset_config.unwrap_or_default();
    let subsets: Vec<&crate::dataset::kohya::Subset> = description
        .datasets
        .iter()
        .flat_map(|dataset| &dataset.subsets)
        .collect();
    let unsupported: [(&str, bool, &str); 7] = [
        (
            "keep_tokens_separator",
            subsets.iter().any(|s| !s.keep_tokens_separator.is_empty()),
            kohya_options::CAPTION_AUGMENTATION,
        ),
        (
            "secondary_separator",
            subsets.iter().any(|s| s.secondary_separator.is_some()),
            kohya_options::CAPTION_AUGMENTATION,
        ),
        (
            "enable_wildcard",
            subsets.iter().any(|s| s.enable_wildcard),
            kohya_options::CAPTION_AUGMENTATION,
        ),
        (
            "token_warmup_step",
            subsets.iter().any(|s| s.token_warmup_step != 0.0),
            kohya_options::CAPTION_AUGMENTATION,
        ),
        (
            "color_aug",
            subsets.iter().any(|s| s.color_aug),
            kohya_options::IMAGE_AUGMENTATION,
        ),
        (
            "random_crop",
            subsets.iter().any(|s| s.random_crop),
            kohya_options::IMAGE_AUGMENTATION,
        ),
        (
            "face_crop_aug_range",
            subsets.iter().any(|s| s.face_crop_aug_range.is_some()),
            kohya_options::IMAGE_AUGMENTATION,
        ),
    ];
    let problems: Vec<String> = (unsupported.iter())
        .filter(|(_, set, _)| *set)
        .map(|(key, _, why)| format!("`{key}` in {}: {why}", file.display()))
        .collect();
    if !problems.is_empty() {
        return Err(Error::Usage(problems.join("\n")));
    }
    Ok(subsets
        .iter()
        .any(|s| s.shuffle_caption || s.caption_tag_dropout_rate > 0.0))
}

/// The prepare-dataset options among `given`: every dataset option of `train_network.py` the
/// command line gave (`--caption_extention` spelled right), except `--in_json`, which names
/// the metadata train-lora trains from.
fn dataset_options(given: &Settings) -> Vec<OsString> {
    let mut options = Settings::default();
    for (id, value) in &given.values {
        let id = match id.as_str() {
            "caption_extention" => "caption_extension",
            "in_json" => continue,
            id => id,
        };
        options.values.insert(id.to_string(), value.clone());
    }
    command_line_of(
        &DatasetArgs::augment_args(Command::new("prepare-dataset")),
        &options,
    )
}

/// The preparation of the kohya dataset a command line without `--in_json` names
/// (`--train_data_dir`, `--reg_data_dir`, `--dataset_config`): prepare-dataset with every
/// dataset option given, prepare-latents with the VAE options, cache-text-encoder with the
/// caption options (and caption variants when the captions are augmented). `config_variants`
/// is `Some` for a `--dataset_config`, whose subsets bring their own caption settings: whether
/// any of them needs caption variants.
fn dataset_preparation(
    given: &Settings,
    config_variants: Option<bool>,
    quiet: bool,
) -> Preparation {
    let text = |id: &str| -> Option<String> {
        match given.values.get(id)? {
            Value::Array(values) => values.first()?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let flag = |id: &str| given.values.get(id) == Some(&Value::Bool(true));
    let output_dir = PathBuf::from(text("output_dir").unwrap_or_default());
    let name = text("output_name").unwrap_or_else(|| "last".into());
    let dir = Preparation::folder(&output_dir, &name);
    let model = OsString::from(text("pretrained_model_name_or_path").unwrap_or_default());
    let dataset_json = dir.join(preparation::DATASET_JSON).into_os_string();
    let latents_json = dir.join(preparation::LATENTS_JSON).into_os_string();
    let quiet_flag = quiet.then(|| OsString::from("--quiet"));

    let mut describe = dataset_options(given);
    describe.extend([OsString::from("--out_json"), dataset_json.clone()]);
    describe.extend(quiet_flag.clone());

    let images = text("train_data_dir")
        .map(PathBuf::from)
        .or_else(|| {
            text("dataset_config").map(|config| {
                let parent = Path::new(&config).parent().map(Path::to_path_buf);
                parent.unwrap_or_default()
            })
        })
        .unwrap_or_default();
    let mut latents = vec![
        images.into_os_string(),
        dataset_json,
        latents_json.clone(),
        model.clone(),
        "--full_path".into(),
    ];
    if let Some(vae) = text("vae") {
        latents.extend(["--vae".into(), vae.into()]);
    }
    for id in ["flip_aug", "alpha_mask"] {
        if flag(id) {
            latents.push(format!("--{id}").into());
        }
    }
    latents.extend(quiet_flag.clone());

    let mut encode = vec![latents_json, model, "--full_path".into()];
    for id in ["clip_skip", "max_token_length", "mixed_precision"] {
        if let Some(value) = text(id) {
            encode.extend([format!("--{id}").into(), value.into()]);
        }
    }
    let positive = |id: &str| text(id).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) > 0.0;
    let variants = text("caption_variants").unwrap_or_else(|| "8".into());
    if let Some(needed) = config_variants {
        if needed {
            encode.extend(["--variants".into(), variants.into()]);
        }
    } else if flag("shuffle_caption")
        || positive("keep_tokens")
        || positive("caption_tag_dropout_rate")
    {
        encode.extend(["--variants".into(), variants.into()]);
        if flag("shuffle_caption") {
            encode.push("--shuffle_caption".into());
        }
        for id in [
            "keep_tokens",
            "caption_tag_dropout_rate",
            "caption_separator",
        ] {
            if let Some(value) = text(id) {
                encode.extend([format!("--{id}").into(), value.into()]);
            }
        }
    }
    encode.extend(quiet_flag);

    Preparation {
        dir,
        runs: vec![
            ToolRun {
                tool: "prepare-dataset",
                args: describe,
            },
            ToolRun {
                tool: "prepare-latents",
                args: latents,
            },
            ToolRun {
                tool: "cache-text-encoder",
                args: encode,
            },
        ],
    }
}

/// Neither `--in_json` nor a kohya dataset to prepare (or the model and output folder a
/// preparation needs): everything missing, with every other refused option, so that a kohya
/// command line learns everything it needs at once.
fn missing_dataset(given: &Settings, probe: &ArgMatches) -> Error {
    let mut lines: Vec<String> = ["pretrained_model_name_or_path", "output_dir"]
        .iter()
        .filter(|id| !given.values.contains_key(**id))
        .map(|id| format!("--{id} is required"))
        .collect();
    let folders = ["train_data_dir", "dataset_config"]
        .iter()
        .any(|id| given.values.contains_key(*id));
    if !folders {
        lines.push(
            "the dataset is required: --train_data_dir FOLDER (kohya `<repeats>_<class tokens>` \
             subfolders, with --reg_data_dir for regularisation images), --dataset_config \
             FILE.toml, or --in_json METADATA as prepare-latents wrote it"
                .to_string(),
        );
    }
    lines.extend(kohya_options::given(probe).into_iter().filter_map(
        |option| match option.handling {
            Handling::Refuse(why) => Some(format!("--{}: {why}", option.name)),
            _ => None,
        },
    ));
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
        // argparse: an option given again replaces its earlier values (lists too).
        .args_override_self(true)
        .mut_args(|arg| match arg.get_action() {
            ArgAction::Append => arg.action(ArgAction::Set),
            _ => arg,
        })
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
                    .and_then(Arg::get_num_args)
                    .is_some_and(|range| range.max_values() > 1);
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

/// The tokens that give `settings`: `--long=value` for one value, `--long v1 v2 ...` for several
/// (one occurrence: given again, an option replaces its values) and `--flag`.
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
            // One occurrence: given again, an option replaces its values (argparse's way).
            Value::Array(values) if values.len() == 1 => {
                tokens.push(format!("--{long}={}", values[0].as_str().unwrap_or_default()).into());
            }
            Value::Array(values) => {
                tokens.push(format!("--{long}").into());
                tokens.extend(values.iter().map(|v| v.as_str().unwrap_or_default().into()));
            }
            _ => tokens.push(format!("--{long}").into()),
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::LogArgs;
    use crate::stages::train_lora::TrainArgs;

    #[derive(clap::Parser, Debug)]
    #[command(rename_all = "snake_case")]
    struct Args {
        #[command(flatten)]
        train: TrainArgs,
        #[command(flatten)]
        log: LogArgs,
    }

    fn parsed(flags: &[&str]) -> Result<Parsed<Args>> {
        let argv = [
            "train-lora",
            "--pretrained_model_name_or_path",
            "m.safetensors",
        ];
        parse::<Args>(argv.iter().chain(flags).map(OsString::from))
    }

    #[test]
    fn an_option_given_again_replaces_its_values_as_in_argparse() {
        let parsed = parsed(&[
            "--in_json=meta.json",
            "--output_dir=out",
            "--output_name=first",
            "--output_name=second",
            "--network_args",
            "conv_dim=4",
            "--network_args",
            "conv_alpha=1",
        ])
        .unwrap();
        assert_eq!(parsed.args.train.output_name.as_deref(), Some("second"));
        assert_eq!(parsed.args.train.network_args, ["conv_alpha=1"]);
        assert!(parsed.preparation.is_none());
    }

    #[test]
    fn a_kohya_dataset_without_in_json_is_prepared_by_the_sibling_tools() {
        let parsed = parsed(&[
            "--train_data_dir=img",
            "--output_dir=out",
            "--shuffle_caption",
            "--keep_tokens=1",
            "--caption_extension=.txt",
            "--clip_skip=2",
            "--caption_prefix=masterpiece",
            "-q",
        ])
        .unwrap();
        let preparation = parsed.preparation.expect("prepared");
        let dir = std::path::absolute("out/.lorakit/last-dataset").unwrap();
        assert_eq!(preparation.dir, dir);
        assert_eq!(parsed.args.train.in_json, dir.join("meta_lat.json"));
        let tools: Vec<&str> = preparation.runs.iter().map(|run| run.tool).collect();
        assert_eq!(
            tools,
            ["prepare-dataset", "prepare-latents", "cache-text-encoder"]
        );
        let lines: Vec<String> = preparation.runs.iter().map(ToolRun::shell_line).collect();
        let img = std::path::absolute("img").unwrap();
        for expected in [
            format!("--train_data_dir={}", img.display()),
            "--caption_extension=.txt".into(),
            "--shuffle_caption".into(),
            "--keep_tokens=1".into(),
            "--caption_prefix=masterpiece".into(),
            "--quiet".into(),
        ] {
            assert!(lines[0].contains(&expected), "{expected} in {}", lines[0]);
        }
        assert!(!lines[0].contains("clip_skip"), "{}", lines[0]);
        assert!(lines[1].contains("--full_path"), "{}", lines[1]);
        for expected in [
            "--clip_skip 2",
            "--variants 8",
            "--shuffle_caption",
            "--keep_tokens 1",
        ] {
            assert!(lines[2].contains(expected), "{expected} in {}", lines[2]);
        }
    }

    #[test]
    fn a_dataset_config_keeps_its_subset_settings_and_refuses_what_training_cannot_apply() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("dataset.toml");
        let toml = |general: &str, extra: &str| {
            format!(
                "[general]\n{general}\n[[datasets]]\nresolution = 256\nbatch_size = 4\n\n  \
                 [[datasets.subsets]]\n  image_dir = {:?}\n  class_tokens = \"sks\"\n{extra}",
                dir.path().display().to_string()
            )
        };
        let config_flag = format!("--dataset_config={}", config.display());
        let flags = [
            config_flag.as_str(),
            "--output_dir=out",
            "--train_batch_size=2",
        ];
        let subsets = "\n  [[datasets.subsets]]\n  image_dir = \"other\"\n  keep_tokens = 2\n";
        std::fs::write(
            &config,
            toml("shuffle_caption = true\nkeep_tokens = 1\n", subsets),
        )
        .unwrap();
        let run = parsed(&flags).unwrap();
        let train = &run.args.train;
        assert!(
            !train.shuffle_caption,
            "the subsets' settings stay in the metadata"
        );
        assert_eq!(
            train.train_batch_size, 2,
            "the datasets' batch sizes stay there too"
        );
        let encode = run.preparation.unwrap().runs[2].shell_line();
        assert!(encode.contains("--variants 8"), "{encode}");
        assert!(!encode.contains("--shuffle_caption"), "{encode}");

        std::fs::write(&config, toml("keep_tokens = 1\n", "")).unwrap();
        let encode = parsed(&flags).unwrap().preparation.unwrap().runs[2].shell_line();
        assert!(!encode.contains("--variants"), "nothing to vary: {encode}");

        let refused = format!("{subsets}  random_crop = true\n");
        std::fs::write(&config, toml("", &refused)).unwrap();
        let refusal = parsed(&flags).unwrap_err().to_string();
        assert!(refusal.contains("`random_crop`"), "{refusal}");
    }

    #[test]
    fn a_caption_prefix_needs_the_dataset_prepared_here() {
        let refusal = parsed(&[
            "--in_json=meta.json",
            "--output_dir=out",
            "--caption_prefix=x",
        ])
        .unwrap_err()
        .to_string();
        assert!(refusal.contains("--caption_prefix"), "{refusal}");
    }

    #[test]
    fn a_command_line_without_a_dataset_is_told_every_form() {
        let refusal = parsed(&["--output_dir=out"]).unwrap_err().to_string();
        for form in ["--train_data_dir", "--dataset_config", "--in_json"] {
            assert!(refusal.contains(form), "{refusal}");
        }
    }
}
