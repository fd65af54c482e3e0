//! The dataset description: sd-scripts' datasets and subsets with every per-subset setting,
//! built from a `--dataset_config` TOML/JSON file or from `--train_data_dir` (+ `--reg_data_dir`,
//! or `--in_json`) and the command-line values, with sd-scripts' precedence
//! subset > dataset > `[general]` > command line > built-in default
//! (`library/config_util.py`: `ConfigSanitizer`, `BlueprintGenerator`).

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::dataset::bucket::Size;
use crate::{Error, Result};

/// Which of sd-scripts' dataset classes a dataset is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// `DreamBoothDataset`: folders of images with caption files or class tokens.
    DreamBooth,
    /// `FineTuningDataset`: a metadata JSON (`caption`, `tags`, `image_size`) per subset.
    FineTuning,
}

/// Where a subset's images and captions come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SubsetSource {
    /// A DreamBooth folder.
    DreamBooth {
        /// `class_tokens`: the caption of images without a caption file.
        class_tokens: Option<String>,
        /// `caption_extension`, with its leading dot added as sd-scripts does.
        caption_extension: String,
        /// `is_reg`: regularisation images.
        is_reg: bool,
        /// `cache_info`: accepted; lorakit reads the folder afresh every time.
        cache_info: bool,
    },
    /// A fine-tune metadata file (`.json`, or sd-scripts' `.jsonl` lines).
    FineTuning {
        /// `metadata_file`.
        metadata_file: PathBuf,
    },
}

/// One subset with every setting resolved through the fallbacks.
#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    /// `image_dir` (required for DreamBooth; for fine-tune, the base of relative keys).
    pub image_dir: Option<PathBuf>,
    /// DreamBooth folder or fine-tune metadata.
    pub source: SubsetSource,
    /// `num_repeats` (a subset below 1 is skipped with a warning, as sd-scripts does).
    pub num_repeats: i64,
    /// `shuffle_caption`.
    pub shuffle_caption: bool,
    /// `caption_separator`.
    pub caption_separator: String,
    /// `keep_tokens`.
    pub keep_tokens: i64,
    /// `keep_tokens_separator`.
    pub keep_tokens_separator: String,
    /// `secondary_separator`.
    pub secondary_separator: Option<String>,
    /// `enable_wildcard`.
    pub enable_wildcard: bool,
    /// `color_aug`.
    pub color_aug: bool,
    /// `flip_aug`.
    pub flip_aug: bool,
    /// `face_crop_aug_range`.
    pub face_crop_aug_range: Option<(f64, f64)>,
    /// `random_crop`.
    pub random_crop: bool,
    /// `caption_prefix`.
    pub caption_prefix: Option<String>,
    /// `caption_suffix`.
    pub caption_suffix: Option<String>,
    /// `caption_dropout_rate`.
    pub caption_dropout_rate: f64,
    /// `caption_dropout_every_n_epochs`.
    pub caption_dropout_every_n_epochs: i64,
    /// `caption_tag_dropout_rate`.
    pub caption_tag_dropout_rate: f64,
    /// `token_warmup_min`.
    pub token_warmup_min: i64,
    /// `token_warmup_step`.
    pub token_warmup_step: f64,
    /// `alpha_mask`.
    pub alpha_mask: bool,
    /// `resize_interpolation`.
    pub resize_interpolation: Option<String>,
    /// `custom_attributes` (kept as given).
    pub custom_attributes: Option<Value>,
}

impl Subset {
    /// True for a DreamBooth subset of regularisation images.
    pub fn is_reg(&self) -> bool {
        matches!(self.source, SubsetSource::DreamBooth { is_reg: true, .. })
    }

    /// The subset's settings under sd-scripts' names, in the order sd-scripts lists them
    /// (`image_dir`, `class_tokens`/`metadata_file`, ..., `resize_interpolation`); `img_count`
    /// is the number of images registered from it.
    pub fn settings_json(&self, img_count: usize) -> Map<String, Value> {
        let mut map = Map::new();
        let path = |p: &Path| Value::String(p.to_string_lossy().into_owned());
        map.insert(
            "image_dir".into(),
            self.image_dir.as_deref().map_or(Value::Null, path),
        );
        match &self.source {
            SubsetSource::DreamBooth {
                class_tokens,
                caption_extension,
                is_reg,
                ..
            } => {
                map.insert("class_tokens".into(), json!(class_tokens));
                map.insert("is_reg".into(), json!(is_reg));
                map.insert("caption_extension".into(), json!(caption_extension));
            }
            SubsetSource::FineTuning { metadata_file } => {
                map.insert("metadata_file".into(), path(metadata_file));
            }
        }
        let face = self.face_crop_aug_range.map(|(a, b)| json!([a, b]));
        for (key, value) in [
            ("num_repeats", json!(self.num_repeats)),
            ("img_count", json!(img_count)),
            ("shuffle_caption", json!(self.shuffle_caption)),
            ("keep_tokens", json!(self.keep_tokens)),
            ("keep_tokens_separator", json!(self.keep_tokens_separator)),
            ("caption_separator", json!(self.caption_separator)),
            ("caption_prefix", json!(self.caption_prefix)),
            ("caption_suffix", json!(self.caption_suffix)),
            ("caption_dropout_rate", json!(self.caption_dropout_rate)),
            (
                "caption_dropout_every_n_epochs",
                json!(self.caption_dropout_every_n_epochs),
            ),
            (
                "caption_tag_dropout_rate",
                json!(self.caption_tag_dropout_rate),
            ),
            ("flip_aug", json!(self.flip_aug)),
            ("color_aug", json!(self.color_aug)),
            ("random_crop", json!(self.random_crop)),
            ("face_crop_aug_range", json!(face)),
            ("enable_wildcard", json!(self.enable_wildcard)),
            ("secondary_separator", json!(self.secondary_separator)),
            ("token_warmup_min", json!(self.token_warmup_min)),
            (
                "token_warmup_step",
                token_warmup_json(self.token_warmup_step),
            ),
            ("alpha_mask", json!(self.alpha_mask)),
        ] {
            map.insert(key.into(), value);
        }
        if let SubsetSource::DreamBooth { cache_info, .. } = &self.source {
            map.insert("cache_info".into(), json!(cache_info));
        }
        map.insert(
            "resize_interpolation".into(),
            json!(self.resize_interpolation),
        );
        if let Some(attributes) = &self.custom_attributes {
            map.insert("custom_attributes".into(), attributes.clone());
        }
        map
    }
}

/// `token_warmup_step` as sd-scripts keeps it: an integer when it is whole (the default `0`).
fn token_warmup_json(step: f64) -> Value {
    if step.fract() == 0.0 && step.abs() < 1e15 {
        json!(step as i64)
    } else {
        json!(step)
    }
}

/// One dataset: its bucket and batch settings and its subsets.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// DreamBooth or fine-tune (sd-scripts refuses both kinds of subset in one dataset).
    pub kind: DatasetKind,
    /// `resolution` (W, H): required.
    pub resolution: Option<Size>,
    /// `batch_size` (`--train_batch_size`).
    pub batch_size: i64,
    /// `enable_bucket`.
    pub enable_bucket: bool,
    /// `min_bucket_reso`.
    pub min_bucket_reso: i64,
    /// `max_bucket_reso`.
    pub max_bucket_reso: i64,
    /// `bucket_reso_steps`.
    pub bucket_reso_steps: i64,
    /// `bucket_no_upscale`.
    pub bucket_no_upscale: bool,
    /// `--prior_loss_weight` (DreamBooth datasets).
    pub prior_loss_weight: f64,
    /// `network_multiplier`.
    pub network_multiplier: f64,
    /// `resize_interpolation` (the default of its subsets).
    pub resize_interpolation: Option<String>,
    /// The subsets, in the order given.
    pub subsets: Vec<Subset>,
}

/// How the description was given, which decides how sd-scripts reports its folders
/// (`ss_dataset_dirs`, `ss_reg_dataset_dirs`).
#[derive(Debug, Clone, PartialEq)]
pub enum DescriptionSource {
    /// `--dataset_config FILE`.
    ConfigFile(PathBuf),
    /// `--train_data_dir` with `N_name` subfolders (and `--reg_data_dir`).
    Folders,
    /// `--train_data_dir` + `--in_json`.
    Metadata,
}

/// The whole dataset description: what sd-scripts' `DatasetGroup` is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// Where it came from.
    pub source: DescriptionSource,
    /// The datasets, in order.
    pub datasets: Vec<Dataset>,
    /// Warnings sd-scripts also prints (folders without an `N_` prefix, ...).
    pub warnings: Vec<String>,
}

/// The dataset options of sd-scripts' `train_network.py` command line, with argparse's
/// defaults: the last fallback of every setting.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandLine {
    /// `--train_data_dir`.
    pub train_data_dir: Option<PathBuf>,
    /// `--reg_data_dir`.
    pub reg_data_dir: Option<PathBuf>,
    /// `--in_json`.
    pub in_json: Option<PathBuf>,
    /// `--dataset_config`.
    pub dataset_config: Option<PathBuf>,
    /// `--resolution` (W, H).
    pub resolution: Option<Size>,
    /// `--train_batch_size` (default 1).
    pub train_batch_size: i64,
    /// `--enable_bucket`.
    pub enable_bucket: bool,
    /// `--min_bucket_reso` (default 256).
    pub min_bucket_reso: i64,
    /// `--max_bucket_reso` (default 1024).
    pub max_bucket_reso: i64,
    /// `--bucket_reso_steps` (default 64).
    pub bucket_reso_steps: i64,
    /// `--bucket_no_upscale`.
    pub bucket_no_upscale: bool,
    /// `--prior_loss_weight` (default 1.0).
    pub prior_loss_weight: f64,
    /// `--network_multiplier` (default 1.0).
    pub network_multiplier: f64,
    /// `--dataset_repeats` (default 1; the repeats of an `--in_json` subset).
    pub dataset_repeats: i64,
    /// `--caption_extension` (default `.caption`).
    pub caption_extension: String,
    /// `--caption_separator` (default `,`).
    pub caption_separator: String,
    /// `--shuffle_caption`.
    pub shuffle_caption: bool,
    /// `--keep_tokens` (default 0).
    pub keep_tokens: i64,
    /// `--keep_tokens_separator` (default empty).
    pub keep_tokens_separator: String,
    /// `--secondary_separator`.
    pub secondary_separator: Option<String>,
    /// `--enable_wildcard`.
    pub enable_wildcard: bool,
    /// `--caption_prefix`.
    pub caption_prefix: Option<String>,
    /// `--caption_suffix`.
    pub caption_suffix: Option<String>,
    /// `--color_aug`.
    pub color_aug: bool,
    /// `--flip_aug`.
    pub flip_aug: bool,
    /// `--face_crop_aug_range`.
    pub face_crop_aug_range: Option<(f64, f64)>,
    /// `--random_crop`.
    pub random_crop: bool,
    /// `--caption_dropout_rate` (default 0).
    pub caption_dropout_rate: f64,
    /// `--caption_dropout_every_n_epochs` (default 0).
    pub caption_dropout_every_n_epochs: i64,
    /// `--caption_tag_dropout_rate` (default 0).
    pub caption_tag_dropout_rate: f64,
    /// `--token_warmup_min` (default 1).
    pub token_warmup_min: i64,
    /// `--token_warmup_step` (default 0).
    pub token_warmup_step: f64,
    /// `--alpha_mask`.
    pub alpha_mask: bool,
    /// `--cache_info`.
    pub cache_info: bool,
    /// `--resize_interpolation`.
    pub resize_interpolation: Option<String>,
}

impl Default for CommandLine {
    fn default() -> Self {
        CommandLine {
            train_data_dir: None,
            reg_data_dir: None,
            in_json: None,
            dataset_config: None,
            resolution: None,
            train_batch_size: 1,
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
            prior_loss_weight: 1.0,
            network_multiplier: 1.0,
            dataset_repeats: 1,
            caption_extension: ".caption".into(),
            caption_separator: ",".into(),
            shuffle_caption: false,
            keep_tokens: 0,
            keep_tokens_separator: String::new(),
            secondary_separator: None,
            enable_wildcard: false,
            caption_prefix: None,
            caption_suffix: None,
            color_aug: false,
            flip_aug: false,
            face_crop_aug_range: None,
            random_crop: false,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            alpha_mask: false,
            cache_info: false,
            resize_interpolation: None,
        }
    }
}

impl CommandLine {
    /// The command-line values as a config layer under the config's key names (argparse's
    /// `train_batch_size` is `batch_size`, `dataset_repeats` is `num_repeats`).
    fn layer(&self) -> Map<String, Value> {
        let mut map = Map::new();
        let mut put = |key: &str, value: Value| {
            if !value.is_null() {
                map.insert(key.to_string(), value);
            }
        };
        put(
            "resolution",
            self.resolution.map_or(Value::Null, |(w, h)| json!([w, h])),
        );
        put("batch_size", json!(self.train_batch_size));
        put("enable_bucket", json!(self.enable_bucket));
        put("min_bucket_reso", json!(self.min_bucket_reso));
        put("max_bucket_reso", json!(self.max_bucket_reso));
        put("bucket_reso_steps", json!(self.bucket_reso_steps));
        put("bucket_no_upscale", json!(self.bucket_no_upscale));
        put("prior_loss_weight", json!(self.prior_loss_weight));
        put("network_multiplier", json!(self.network_multiplier));
        put("num_repeats", json!(self.dataset_repeats));
        put("caption_extension", json!(self.caption_extension));
        put("caption_separator", json!(self.caption_separator));
        put("shuffle_caption", json!(self.shuffle_caption));
        put("keep_tokens", json!(self.keep_tokens));
        put("keep_tokens_separator", json!(self.keep_tokens_separator));
        put("secondary_separator", json!(self.secondary_separator));
        put("enable_wildcard", json!(self.enable_wildcard));
        put("caption_prefix", json!(self.caption_prefix));
        put("caption_suffix", json!(self.caption_suffix));
        put("color_aug", json!(self.color_aug));
        put("flip_aug", json!(self.flip_aug));
        put(
            "face_crop_aug_range",
            self.face_crop_aug_range
                .map_or(Value::Null, |(a, b)| json!([a, b])),
        );
        put("random_crop", json!(self.random_crop));
        put("caption_dropout_rate", json!(self.caption_dropout_rate));
        put(
            "caption_dropout_every_n_epochs",
            json!(self.caption_dropout_every_n_epochs),
        );
        put(
            "caption_tag_dropout_rate",
            json!(self.caption_tag_dropout_rate),
        );
        put("token_warmup_min", json!(self.token_warmup_min));
        put("token_warmup_step", json!(self.token_warmup_step));
        put("alpha_mask", json!(self.alpha_mask));
        put("cache_info", json!(self.cache_info));
        put("resize_interpolation", json!(self.resize_interpolation));
        map
    }
}

/// The type a config key must have (voluptuous' checks in sd-scripts' `ConfigSanitizer`).
#[derive(Clone, Copy)]
enum Kind {
    Bool,
    Int,
    /// Python `float` only: an integer is refused, as sd-scripts refuses it.
    Float,
    /// `Any(float, int)`.
    Number,
    Str,
    Table,
    /// `[float, float]`.
    FloatPair,
    /// `int` or `[int, int]`.
    Resolution,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Bool => "true or false",
            Kind::Int => "an integer",
            Kind::Float => "a decimal number such as 1.0 (sd-scripts refuses an integer here)",
            Kind::Number => "a number",
            Kind::Str => "a string",
            Kind::Table => "a table",
            Kind::FloatPair => "two decimal numbers such as [0.4, 0.8]",
            Kind::Resolution => "an integer or [width, height]",
        }
    }

    fn accepts(self, value: &Value) -> bool {
        let positive_int = |v: &Value| v.as_u64().is_some_and(|n| n > 0 && n <= u32::MAX as u64);
        match self {
            Kind::Bool => value.is_boolean(),
            Kind::Int => value.is_i64() || value.is_u64(),
            Kind::Float => value.is_f64(),
            Kind::Number => value.is_number(),
            Kind::Str => value.is_string(),
            Kind::Table => value.is_object(),
            Kind::FloatPair => value
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(Value::is_f64)),
            Kind::Resolution => {
                positive_int(value)
                    || value
                        .as_array()
                        .is_some_and(|a| a.len() == 2 && a.iter().all(positive_int))
            }
        }
    }
}

/// Groups of allowed keys of one config level.
type KeyGroups = &'static [&'static [(&'static str, Kind)]];

/// Keys every level from subset up accepts (`SUBSET_ASCENDABLE_SCHEMA` + dropout keys).
const SUBSET_ASCENDABLE: &[(&str, Kind)] = &[
    ("color_aug", Kind::Bool),
    ("face_crop_aug_range", Kind::FloatPair),
    ("flip_aug", Kind::Bool),
    ("num_repeats", Kind::Int),
    ("random_crop", Kind::Bool),
    ("shuffle_caption", Kind::Bool),
    ("keep_tokens", Kind::Int),
    ("keep_tokens_separator", Kind::Str),
    ("secondary_separator", Kind::Str),
    ("caption_separator", Kind::Str),
    ("enable_wildcard", Kind::Bool),
    ("token_warmup_min", Kind::Int),
    ("token_warmup_step", Kind::Number),
    ("caption_prefix", Kind::Str),
    ("caption_suffix", Kind::Str),
    ("custom_attributes", Kind::Table),
    ("resize_interpolation", Kind::Str),
    ("caption_dropout_every_n_epochs", Kind::Int),
    ("caption_dropout_rate", Kind::Number),
    ("caption_tag_dropout_rate", Kind::Number),
];
/// DreamBooth keys that may also sit at dataset or `[general]` level.
const DREAMBOOTH_ASCENDABLE: &[(&str, Kind)] = &[
    ("caption_extension", Kind::Str),
    ("class_tokens", Kind::Str),
    ("cache_info", Kind::Bool),
];
/// Keys of a DreamBooth subset only.
const DREAMBOOTH_SUBSET: &[(&str, Kind)] = &[
    ("image_dir", Kind::Str),
    ("is_reg", Kind::Bool),
    ("alpha_mask", Kind::Bool),
];
/// Keys of a fine-tune subset only.
const FINE_TUNING_SUBSET: &[(&str, Kind)] = &[
    ("metadata_file", Kind::Str),
    ("image_dir", Kind::Str),
    ("alpha_mask", Kind::Bool),
];
/// Keys of a dataset or `[general]`.
const DATASET_ASCENDABLE: &[(&str, Kind)] = &[
    ("batch_size", Kind::Int),
    ("bucket_no_upscale", Kind::Bool),
    ("bucket_reso_steps", Kind::Int),
    ("enable_bucket", Kind::Bool),
    ("max_bucket_reso", Kind::Int),
    ("min_bucket_reso", Kind::Int),
    ("validation_seed", Kind::Int),
    ("validation_split", Kind::Float),
    ("resolution", Kind::Resolution),
    ("network_multiplier", Kind::Float),
    ("resize_interpolation", Kind::Str),
];
/// The values `resize_interpolation` may take (sd-scripts' `--resize_interpolation` choices).
const INTERPOLATIONS: &[&str] = &[
    "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area",
];

/// Checks one table of the config against the keys allowed there; `place` names it
/// (`datasets[0].subsets[1]`).
fn check_table(
    file: &Path,
    place: &str,
    table: &Map<String, Value>,
    allowed: &[&[(&str, Kind)]],
    extra: &[&str],
) -> Result<()> {
    for (key, value) in table {
        if extra.contains(&key.as_str()) {
            continue;
        }
        let kind = allowed
            .iter()
            .flat_map(|group| group.iter())
            .find(|(name, _)| name == key)
            .map(|(_, kind)| *kind);
        let Some(kind) = kind else {
            let mut names: Vec<&str> = allowed
                .iter()
                .flat_map(|group| group.iter().map(|(name, _)| *name))
                .chain(extra.iter().copied())
                .collect();
            names.sort_unstable();
            names.dedup();
            return Err(Error::bad_file(
                file,
                format!(
                    "unknown key `{key}` in {place}; allowed there: {}",
                    names.join(", ")
                ),
            ));
        };
        if !kind.accepts(value) {
            return Err(Error::bad_file(
                file,
                format!(
                    "`{key}` in {place} must be {}, not {value}",
                    kind.describe()
                ),
            ));
        }
        if key == "resize_interpolation"
            && !value.as_str().is_some_and(|v| INTERPOLATIONS.contains(&v))
        {
            return Err(Error::bad_file(
                file,
                format!(
                    "`resize_interpolation` in {place} is {value}; allowed: {}",
                    INTERPOLATIONS.join(", ")
                ),
            ));
        }
        if key == "validation_split" && value.as_f64().is_some_and(|v| v != 0.0) {
            return Err(Error::bad_file(
                file,
                format!(
                    "`validation_split` in {place}: validation datasets are not supported by \
                     lorakit; remove the key (or set 0.0)"
                ),
            ));
        }
    }
    Ok(())
}

/// The fallback chain of one setting: subset, dataset, `[general]`, command line.
struct Layers<'a>(Vec<&'a Map<String, Value>>);

impl Layers<'_> {
    fn value(&self, key: &str) -> Option<&Value> {
        self.0
            .iter()
            .find_map(|layer| layer.get(key).filter(|v| !v.is_null()))
    }
    fn bool(&self, key: &str) -> bool {
        self.value(key).and_then(Value::as_bool).unwrap_or(false)
    }
    fn int(&self, key: &str, default: i64) -> i64 {
        self.value(key).and_then(Value::as_i64).unwrap_or(default)
    }
    fn float(&self, key: &str, default: f64) -> f64 {
        self.value(key).and_then(Value::as_f64).unwrap_or(default)
    }
    fn string(&self, key: &str) -> Option<String> {
        self.value(key).and_then(Value::as_str).map(str::to_string)
    }
    fn resolution(&self) -> Option<Size> {
        let value = self.value("resolution")?;
        let side = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match value {
            Value::Array(pair) if pair.len() == 2 => Some((side(&pair[0])?, side(&pair[1])?)),
            other => side(other).map(|s| (s, s)),
        }
    }
    fn pair(&self, key: &str) -> Option<(f64, f64)> {
        let pair = self.value(key)?.as_array()?;
        Some((pair.first()?.as_f64()?, pair.get(1)?.as_f64()?))
    }

    fn subset(&self, source: SubsetSource) -> Subset {
        Subset {
            image_dir: self.string("image_dir").map(PathBuf::from),
            source,
            num_repeats: self.int("num_repeats", 1),
            shuffle_caption: self.bool("shuffle_caption"),
            caption_separator: self
                .string("caption_separator")
                .unwrap_or_else(|| ",".into()),
            keep_tokens: self.int("keep_tokens", 0),
            keep_tokens_separator: self.string("keep_tokens_separator").unwrap_or_default(),
            secondary_separator: self.string("secondary_separator"),
            enable_wildcard: self.bool("enable_wildcard"),
            color_aug: self.bool("color_aug"),
            flip_aug: self.bool("flip_aug"),
            face_crop_aug_range: self.pair("face_crop_aug_range"),
            random_crop: self.bool("random_crop"),
            caption_prefix: self.string("caption_prefix"),
            caption_suffix: self.string("caption_suffix"),
            caption_dropout_rate: self.float("caption_dropout_rate", 0.0),
            caption_dropout_every_n_epochs: self.int("caption_dropout_every_n_epochs", 0),
            caption_tag_dropout_rate: self.float("caption_tag_dropout_rate", 0.0),
            token_warmup_min: self.int("token_warmup_min", 1),
            token_warmup_step: self.float("token_warmup_step", 0.0),
            alpha_mask: self.bool("alpha_mask"),
            resize_interpolation: self.string("resize_interpolation"),
            custom_attributes: self.value("custom_attributes").cloned(),
        }
    }

    fn dataset(&self, kind: DatasetKind, subsets: Vec<Subset>) -> Dataset {
        Dataset {
            kind,
            resolution: self.resolution(),
            batch_size: self.int("batch_size", 1),
            enable_bucket: self.bool("enable_bucket"),
            min_bucket_reso: self.int("min_bucket_reso", 256),
            max_bucket_reso: self.int("max_bucket_reso", 1024),
            bucket_reso_steps: self.int("bucket_reso_steps", 64),
            bucket_no_upscale: self.bool("bucket_no_upscale"),
            prior_loss_weight: self.float("prior_loss_weight", 1.0),
            network_multiplier: self.float("network_multiplier", 1.0),
            resize_interpolation: self.string("resize_interpolation"),
            subsets,
        }
    }
}

/// sd-scripts' `caption_extension` rule: a missing leading dot is added.
fn with_dot(extension: String) -> String {
    if extension.is_empty() || extension.starts_with('.') {
        extension
    } else {
        format!(".{extension}")
    }
}

/// Builds the subsets and datasets of a user config (already checked) over `args`.
fn blueprint(
    user: &Map<String, Value>,
    args: &CommandLine,
    source: DescriptionSource,
) -> Description {
    let empty = Map::new();
    let argparse = args.layer();
    let general = user
        .get("general")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut datasets = Vec::new();
    for dataset in user
        .get("datasets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let dataset = dataset.as_object().unwrap_or(&empty);
        let subsets_config: Vec<&Map<String, Value>> = dataset
            .get("subsets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .collect();
        let kind = if subsets_config
            .iter()
            .all(|s| !s.contains_key("metadata_file"))
        {
            DatasetKind::DreamBooth
        } else {
            DatasetKind::FineTuning
        };
        let subsets = subsets_config
            .iter()
            .map(|subset| {
                let layers = Layers(vec![subset, dataset, general, &argparse]);
                let source = match kind {
                    DatasetKind::DreamBooth => SubsetSource::DreamBooth {
                        class_tokens: layers.string("class_tokens"),
                        caption_extension: with_dot(
                            layers.string("caption_extension").unwrap_or_default(),
                        ),
                        is_reg: layers.bool("is_reg"),
                        cache_info: layers.bool("cache_info"),
                    },
                    DatasetKind::FineTuning => SubsetSource::FineTuning {
                        metadata_file: PathBuf::from(
                            layers.string("metadata_file").unwrap_or_default(),
                        ),
                    },
                };
                layers.subset(source)
            })
            .collect();
        datasets.push(Layers(vec![dataset, general, &argparse]).dataset(kind, subsets));
    }
    Description {
        source,
        datasets,
        warnings: Vec::new(),
    }
}

/// Reads and checks a `--dataset_config` file (`.toml`, or `.json` as sd-scripts also reads).
fn read_user_config(file: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let name = file.to_string_lossy().to_lowercase();
    let value: Value = if name.ends_with(".toml") {
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| Error::bad_file(file, format!("not valid TOML: {e}")))?;
        serde_json::to_value(table).map_err(|e| Error::bad_file(file, e.to_string()))?
    } else if name.ends_with(".json") {
        serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(file, format!("not valid JSON: {e}")))?
    } else {
        return Err(Error::bad_file(
            file,
            "dataset config must be a .toml or .json file (as sd-scripts reads it)",
        ));
    };
    let Value::Object(user) = value else {
        return Err(Error::bad_file(file, "dataset config must be a table"));
    };
    check_user_config(file, &user)?;
    Ok(user)
}

/// sd-scripts' `ConfigSanitizer` for a user config: allowed keys and their types per level,
/// required keys, and no DreamBooth and fine-tune subsets in one dataset.
fn check_user_config(file: &Path, user: &Map<String, Value>) -> Result<()> {
    check_table(file, "the top level", user, &[], &["general", "datasets"])?;
    let general_allowed: &[&[(&str, Kind)]] =
        &[DATASET_ASCENDABLE, SUBSET_ASCENDABLE, DREAMBOOTH_ASCENDABLE];
    if let Some(general) = user.get("general") {
        let general = general
            .as_object()
            .ok_or_else(|| Error::bad_file(file, "`general` must be a table ([general])"))?;
        check_table(file, "[general]", general, general_allowed, &[])?;
    }
    let Some(datasets) = user.get("datasets") else {
        return Ok(());
    };
    let datasets = datasets.as_array().ok_or_else(|| {
        Error::bad_file(file, "`datasets` must be an array of tables ([[datasets]])")
    })?;
    for (d, dataset) in datasets.iter().enumerate() {
        let place = format!("datasets[{d}]");
        let dataset = dataset
            .as_object()
            .ok_or_else(|| Error::bad_file(file, format!("{place} must be a table")))?;
        let subsets: Vec<&Map<String, Value>> = match dataset.get("subsets") {
            None => Vec::new(),
            Some(Value::Array(subsets)) => subsets
                .iter()
                .enumerate()
                .map(|(s, subset)| {
                    subset.as_object().ok_or_else(|| {
                        Error::bad_file(file, format!("{place}.subsets[{s}] must be a table"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(Error::bad_file(
                    file,
                    format!(
                        "`subsets` in {place} must be an array of tables ([[datasets.subsets]])"
                    ),
                ))
            }
        };
        let fine_tuning = subsets
            .iter()
            .filter(|s| s.contains_key("metadata_file"))
            .count();
        if fine_tuning > 0 && fine_tuning < subsets.len() {
            return Err(Error::bad_file(
                file,
                format!(
                    "{place} mixes DreamBooth subsets (image_dir only) and fine-tune subsets \
                     (metadata_file); sd-scripts refuses this: split them into separate datasets"
                ),
            ));
        }
        let is_fine_tuning = fine_tuning > 0;
        let (dataset_allowed, subset_allowed, required): (KeyGroups, KeyGroups, &str) =
            if is_fine_tuning {
                (
                    &[DATASET_ASCENDABLE, SUBSET_ASCENDABLE],
                    &[SUBSET_ASCENDABLE, FINE_TUNING_SUBSET],
                    "metadata_file",
                )
            } else {
                (
                    &[DATASET_ASCENDABLE, SUBSET_ASCENDABLE, DREAMBOOTH_ASCENDABLE],
                    &[SUBSET_ASCENDABLE, DREAMBOOTH_SUBSET, DREAMBOOTH_ASCENDABLE],
                    "image_dir",
                )
            };
        check_table(file, &place, dataset, dataset_allowed, &["subsets"])?;
        for (s, subset) in subsets.iter().enumerate() {
            let place = format!("{place}.subsets[{s}]");
            check_table(file, &place, subset, subset_allowed, &[])?;
            if !subset.contains_key(required) {
                return Err(Error::bad_file(file, format!("{place} needs `{required}`")));
            }
        }
    }
    Ok(())
}

/// The repeat count and class tokens of a DreamBooth folder name `N_tokens` (sd-scripts'
/// `extract_dreambooth_params`): `None` when the part before the first `_` is not an integer.
pub fn parse_folder_name(name: &str) -> Option<(i64, String)> {
    let (count, tokens) = name.split_once('_').unwrap_or((name, ""));
    let count = count.trim();
    let digits = count.strip_prefix(['+', '-']).unwrap_or(count);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i64 = count.parse().ok()?;
    Some((value, tokens.to_string()))
}

/// The DreamBooth subsets of `N_name` folders under `base` (sd-scripts'
/// `generate_dreambooth_subsets_config_by_subdirs`), in sorted order (sd-scripts takes the
/// file system's order). Folders without an `N_` prefix are skipped with a warning; folders
/// with a count below 1 are skipped silently, as sd-scripts does.
fn folder_subsets(
    base: &Path,
    is_reg: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<Map<String, Value>>> {
    if !base.is_dir() {
        warnings.push(format!(
            "{}: not a folder; no {} images read from it",
            base.display(),
            if is_reg { "regularisation" } else { "training" }
        ));
        return Ok(Vec::new());
    }
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(base).map_err(|e| Error::io(base, e))? {
        let entry = entry.map_err(|e| Error::io(base, e))?;
        if entry.path().is_dir() {
            folders.push(entry.path());
        }
    }
    folders.sort();
    let mut subsets = Vec::new();
    for folder in folders {
        let name = folder.file_name().unwrap_or_default().to_string_lossy();
        let Some((repeats, tokens)) = parse_folder_name(&name) else {
            warnings.push(format!(
                "{}: ignored, the folder name has no `<repeats>_` prefix (e.g. `10_{name}`)",
                folder.display()
            ));
            continue;
        };
        if repeats < 1 {
            continue;
        }
        let mut subset = Map::new();
        subset.insert("image_dir".into(), json!(folder.to_string_lossy()));
        subset.insert("num_repeats".into(), json!(repeats));
        subset.insert("is_reg".into(), json!(is_reg));
        subset.insert("class_tokens".into(), json!(tokens));
        subsets.push(subset);
    }
    Ok(subsets)
}

/// The dataset description of a `train_network.py` command line: `--dataset_config` if given
/// (then `--train_data_dir`, `--reg_data_dir` and `--in_json` are ignored with a warning, as
/// sd-scripts does), else DreamBooth folders of `--train_data_dir` (+ `--reg_data_dir`), else
/// the `--in_json` metadata over `--train_data_dir`.
pub fn describe(args: &CommandLine) -> Result<Description> {
    if let Some(file) = &args.dataset_config {
        let user = read_user_config(file)?;
        let mut description = blueprint(&user, args, DescriptionSource::ConfigFile(file.clone()));
        if args.train_data_dir.is_some() || args.reg_data_dir.is_some() || args.in_json.is_some() {
            description.warnings.push(
                "--train_data_dir, --reg_data_dir and --in_json are ignored: --dataset_config \
                 describes the dataset"
                    .into(),
            );
        }
        return Ok(description);
    }
    let mut warnings = Vec::new();
    let (subsets, source) = match &args.in_json {
        None => {
            let Some(train) = &args.train_data_dir else {
                return Err(Error::Usage(
                    "give --train_data_dir (folders named `<repeats>_<name>`), \
                     --train_data_dir with --in_json, or --dataset_config"
                        .into(),
                ));
            };
            let mut subsets = folder_subsets(train, false, &mut warnings)?;
            if let Some(reg) = &args.reg_data_dir {
                subsets.extend(folder_subsets(reg, true, &mut warnings)?);
            }
            (subsets, DescriptionSource::Folders)
        }
        Some(in_json) => {
            let mut subset = Map::new();
            if let Some(train) = &args.train_data_dir {
                subset.insert("image_dir".into(), json!(train.to_string_lossy()));
            }
            subset.insert("metadata_file".into(), json!(in_json.to_string_lossy()));
            (vec![subset], DescriptionSource::Metadata)
        }
    };
    let subsets: Vec<Value> = subsets.into_iter().map(Value::Object).collect();
    let mut user = Map::new();
    user.insert("datasets".into(), json!([{ "subsets": subsets }]));
    let mut description = blueprint(&user, args, source);
    description.warnings = warnings;
    Ok(description)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<Description> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dataset.toml");
        std::fs::write(&file, text).unwrap();
        describe(&CommandLine {
            dataset_config: Some(file),
            ..CommandLine::default()
        })
    }

    #[test]
    fn subset_over_dataset_over_general_over_command_line() {
        let description = config(
            "[general]\nkeep_tokens = 1\nshuffle_caption = true\ncaption_extension = 'txt'\n\
             [[datasets]]\nresolution = [320, 192]\nkeep_tokens = 2\n\
             [[datasets.subsets]]\nimage_dir = 'a'\nkeep_tokens = 3\n\
             [[datasets.subsets]]\nimage_dir = 'b'\n",
        )
        .unwrap();
        let dataset = &description.datasets[0];
        assert_eq!(dataset.kind, DatasetKind::DreamBooth);
        assert_eq!(dataset.resolution, Some((320, 192)));
        assert_eq!(dataset.min_bucket_reso, 256, "command-line default");
        let keep: Vec<i64> = dataset.subsets.iter().map(|s| s.keep_tokens).collect();
        assert_eq!(keep, [3, 2]);
        assert!(dataset.subsets.iter().all(|s| s.shuffle_caption));
        assert!(matches!(
            &dataset.subsets[0].source,
            SubsetSource::DreamBooth { caption_extension, .. } if caption_extension == ".txt"
        ));
    }

    #[test]
    fn unknown_keys_wrong_types_and_mixed_subsets_are_refused_by_name() {
        let unknown = config("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nrepeats = 2\n")
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("unknown key `repeats` in datasets[0].subsets[0]")
                && unknown.contains("num_repeats"),
            "{unknown}"
        );
        let typed = config("[general]\nflip_aug = 'yes'\n")
            .unwrap_err()
            .to_string();
        assert!(
            typed.contains("`flip_aug` in [general] must be true or false"),
            "{typed}"
        );
        let float = config("[[datasets]]\nnetwork_multiplier = 1\n")
            .unwrap_err()
            .to_string();
        assert!(float.contains("decimal number"), "{float}");
        let mixed = config(
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n\
             [[datasets.subsets]]\nmetadata_file = 'm.json'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(mixed.contains("separate datasets"), "{mixed}");
        let class_in_ft = config(
            "[[datasets]]\nclass_tokens = 'x'\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            class_in_ft.contains("unknown key `class_tokens`"),
            "{class_in_ft}"
        );
        let missing = config("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("needs `image_dir`"), "{missing}");
    }

    #[test]
    fn folder_names_follow_sd_scripts() {
        assert_eq!(
            parse_folder_name("3_sks photo"),
            Some((3, "sks photo".into()))
        );
        assert_eq!(parse_folder_name("10_a_b"), Some((10, "a_b".into())));
        assert_eq!(parse_folder_name("5"), Some((5, String::new())));
        assert_eq!(parse_folder_name("0_x"), Some((0, "x".into())));
        assert_eq!(parse_folder_name("sks_3"), None);
        assert_eq!(parse_folder_name("x3_a"), None);
    }
}
