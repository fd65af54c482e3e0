//! lycoris' presets (`preset=` network argument): which layers of the UNet and the text encoders
//! get a module, by the class of a containing sd-scripts module or by the layer's name, as
//! lycoris-lora 3.4.0's `LycorisNetworkKohya` selects them.

use std::path::Path;

use regex::Regex;

use super::selection::Algo;
use crate::models::adapter::{AdaptableLayer, AdaptableNorm, Container, NormType};
use crate::models::frozen::FrozenKind;
use crate::{Error, Result};

/// The sd-scripts classes lorakit locates around a layer (see [`containers`]); a preset may name
/// these.
const MODELLED_CLASSES: [&str; 15] = [
    "Transformer2DModel",
    "BasicTransformerBlock",
    "CrossAttention",
    "FeedForward",
    "GEGLU",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
    "CLIPEncoderLayer",
    "CLIPAttention",
    "CLIPMLP",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "LayerNorm",
];

/// Classes lycoris' built-in presets list that no module of the SD1/SD2/SDXL models of sd-scripts
/// (with transformers 4.54) has, besides [`OTHER_TRANSFORMERS`]: they select nothing here, as in
/// lycoris.
const ABSENT_CLASSES: [&str; 8] = [
    "SelfAttention",
    "CLIPSdpaAttention",
    "MT5Block",
    "BertLayer",
    "Gemma2Attention",
    "Gemma2FlashAttention2",
    "Gemma2SdpaAttention",
    "Gemma2MLP",
];

/// Other text-encoder classes of lycoris' `attn-only` preset that SD models lack.
const ABSENT_TEXT_CLASSES: [&str; 2] = ["BertAttention", "MT5LayerSelfAttention"];

/// A lycoris preset as `lycoris.kohya` applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Convolutions larger than 1x1 get modules (`enable_conv`; false sets `conv_dim` to 0).
    pub enable_conv: bool,
    /// UNet classes whose Linear and convolution layers get modules (`unet_target_module`).
    pub unet_target_module: Vec<String>,
    /// UNet layer names (exact, or a regex matched at the start of the name; with
    /// `use_fnmatch` a glob) that get a module themselves (`unet_target_name`).
    pub unet_target_name: Vec<String>,
    /// The text encoders' counterparts (`text_encoder_target_module`).
    pub text_encoder_target_module: Vec<String>,
    /// `text_encoder_target_name`.
    pub text_encoder_target_name: Vec<String>,
    /// Names are globs (Python's `fnmatch`) instead of regexes (`use_fnmatch`).
    pub use_fnmatch: bool,
    /// Per-class algorithm and options (`module_algo_map`), in file order.
    pub module_algo_map: Vec<(String, ModuleOverride)>,
    /// Per-name algorithm and options (`name_algo_map`: a name, or a pattern as the target
    /// names are), in file order.
    pub name_algo_map: Vec<(String, ModuleOverride)>,
}

/// One entry of a preset's `module_algo_map` or `name_algo_map`: an algorithm and options for
/// the modules it covers. An option left out takes the network's value; lycoris passes the
/// entry's options to the module in place of the network's (`dim` and `alpha` of 0 mean "not
/// given", as lycoris reads them with `or`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModuleOverride {
    /// `algo`; left out, the enclosing entry's algorithm, else the network's.
    pub algo: Option<Algo>,
    /// `dim`: the rank of every layer it covers, convolutions larger than 1x1 included.
    pub dim: Option<usize>,
    /// `alpha`.
    pub alpha: Option<f32>,
    /// `factor` (LoKr).
    pub factor: Option<i64>,
    /// `use_tucker`.
    pub use_tucker: Option<bool>,
    /// `use_scalar`.
    pub use_scalar: Option<bool>,
    /// `decompose_both` (LoKr).
    pub decompose_both: Option<bool>,
    /// `weight_decompose` (DoRA; `dora_wd` in the network arguments).
    pub weight_decompose: Option<bool>,
    /// `wd_on_out` (DoRA's norms per output row; `wd_on_output` in the network arguments).
    pub wd_on_output: Option<bool>,
    /// `block_size` (`algo=dylora`).
    pub block_size: Option<usize>,
}

/// The options a `module_algo_map` / `name_algo_map` entry may set.
const OVERRIDE_OPTIONS: &str = "algo, dim, alpha, factor, use_tucker, use_scalar, \
                                decompose_both, weight_decompose, wd_on_out, block_size";

impl ModuleOverride {
    /// The entry `key` of the map `map` (a TOML table of options).
    fn parse(map: &str, key: &str, value: &toml::Value) -> std::result::Result<Self, String> {
        let table = value
            .as_table()
            .ok_or_else(|| format!("{map}.{key} must be a table of options"))?;
        let mut entry = ModuleOverride::default();
        for (option, value) in table {
            let what = |kind: &str| format!("{map}.{key}.{option} must be {kind}");
            let flag = || value.as_bool().ok_or_else(|| what("true or false"));
            let count = || {
                (value.as_integer())
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| what("a whole number"))
            };
            match option.as_str() {
                "algo" => {
                    let name = value.as_str().ok_or_else(|| what("a string"))?;
                    entry.algo = Some(Algo::parse(name).ok_or_else(|| {
                        format!(
                            "{map}.{key}.algo = {name:?}: lorakit trains locon (lora), loha, \
                             lokr, full and dylora"
                        )
                    })?);
                }
                "dim" => entry.dim = Some(count()?),
                "alpha" => {
                    let alpha = (value.as_float())
                        .or_else(|| value.as_integer().map(|n| n as f64))
                        .ok_or_else(|| what("a number"))?;
                    entry.alpha = Some(alpha as f32);
                }
                "factor" => {
                    entry.factor = Some(value.as_integer().ok_or_else(|| what("a whole number"))?)
                }
                "use_tucker" => entry.use_tucker = Some(flag()?),
                "use_scalar" => entry.use_scalar = Some(flag()?),
                "decompose_both" => entry.decompose_both = Some(flag()?),
                "weight_decompose" => entry.weight_decompose = Some(flag()?),
                "wd_on_out" => entry.wd_on_output = Some(flag()?),
                "block_size" => entry.block_size = Some(count()?.max(1)),
                _ => {
                    return Err(format!(
                        "{map}.{key}: option {option} is not one lorakit applies per module \
                         (it applies {OVERRIDE_OPTIONS})"
                    ))
                }
            }
        }
        Ok(entry)
    }
}

/// A layer as a preset sees it: its path, the model it is in, the sd-scripts class around it and
/// its own class.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    /// Diffusers-style path, e.g. `down_blocks.0.resnets.0.conv1`.
    pub path: &'a str,
    /// The sd-scripts class that contains it.
    pub container: Container,
    /// The kohya prefix of its model (`lora_unet`, `lora_te`, ...).
    pub lora_prefix: &'a str,
    /// Its own class: `Linear`, `Conv2d`, `GroupNorm` or `LayerNorm`.
    pub class: &'static str,
}

impl<'a> Site<'a> {
    /// A linear or convolution layer.
    pub fn of_layer(layer: &'a AdaptableLayer) -> Self {
        Self {
            path: &layer.path,
            container: layer.container,
            lora_prefix: layer.lora_prefix,
            class: match layer.kind() {
                FrozenKind::Linear => "Linear",
                FrozenKind::Conv2d { .. } => "Conv2d",
            },
        }
    }

    /// A normalisation layer.
    pub fn of_norm(norm: &'a AdaptableNorm) -> Self {
        Self {
            path: &norm.path,
            container: norm.container,
            lora_prefix: norm.lora_prefix,
            class: match norm.kind() {
                NormType::Group { .. } => "GroupNorm",
                NormType::Layer => "LayerNorm",
            },
        }
    }
}

/// What a preset says about one layer: how many times lycoris selects it (more than once is an
/// error), and, when once, the per-module algorithm and options that apply to it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerSelection<'a> {
    /// How many times the layer is selected.
    pub count: usize,
    /// The algorithm of the map entries that cover it (`None`: the network's).
    pub algo: Option<Algo>,
    /// The options of the map entry that covers it, if any.
    pub options: Option<&'a ModuleOverride>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The UNet classes of lycoris' `full` preset that follow `Transformer2DModel` in its list.
const OTHER_TRANSFORMERS: [&str; 12] = [
    "HunYuanDiTBlock",
    "DoubleStreamBlock",
    "SingleStreamBlock",
    "SingleDiTBlock",
    "MMDoubleStreamBlock",
    "MMSingleStreamBlock",
    "WanAttentionBlock",
    "HunyuanVideoTransformerBlock",
    "HunyuanVideoSingleTransformerBlock",
    "JointTransformerBlock",
    "FinalLayer",
    "QwenImageTransformerBlock",
];

impl Preset {
    /// The built-in presets of lycoris-lora 3.4.0 that lorakit implements: `full` (the default),
    /// `full-lin`, `attn-mlp`, `attn-only`, `unet-only`, `unet-transformer-only` and
    /// `unet-convblock-only`.
    pub fn builtin(name: &str) -> Option<Self> {
        let transformers = || {
            let mut list = vec!["Transformer2DModel".to_string()];
            list.extend(strings(&OTHER_TRANSFORMERS));
            list
        };
        let full_unet = || {
            let mut list = transformers();
            list.splice(
                1..1,
                strings(&["ResnetBlock2D", "Downsample2D", "Upsample2D"]),
            );
            list
        };
        let full_names = || {
            strings(&[
                "conv_in",
                "conv_out",
                "time_embedding.linear_1",
                "time_embedding.linear_2",
            ])
        };
        let full_text = || {
            strings(&[
                "CLIPAttention",
                "CLIPSdpaAttention",
                "CLIPMLP",
                "MT5Block",
                "BertLayer",
                "Gemma2Attention",
                "Gemma2FlashAttention2",
                "Gemma2SdpaAttention",
                "Gemma2MLP",
            ])
        };
        let preset = |enable_conv, unet_module, unet_name, text_module| Preset {
            enable_conv,
            unet_target_module: unet_module,
            unet_target_name: unet_name,
            text_encoder_target_module: text_module,
            text_encoder_target_name: Vec::new(),
            use_fnmatch: false,
            module_algo_map: Vec::new(),
            name_algo_map: Vec::new(),
        };
        Some(match name {
            "full" => preset(true, full_unet(), full_names(), full_text()),
            "full-lin" => {
                let mut unet = transformers();
                unet.insert(1, "ResnetBlock2D".into());
                let names = strings(&["time_embedding.linear_1", "time_embedding.linear_2"]);
                preset(false, unet, names, full_text())
            }
            "attn-mlp" => preset(false, transformers(), Vec::new(), full_text()),
            "attn-only" => {
                let mut text = strings(&["CLIPAttention", "CLIPSdpaAttention"]);
                text.extend(strings(&ABSENT_TEXT_CLASSES));
                text.extend(strings(&[
                    "Gemma2Attention",
                    "Gemma2FlashAttention2",
                    "Gemma2SdpaAttention",
                ]));
                let unet = strings(&["CrossAttention", "SelfAttention"]);
                preset(false, unet, Vec::new(), text)
            }
            "unet-only" => preset(true, full_unet(), full_names(), Vec::new()),
            "unet-transformer-only" => preset(false, transformers(), Vec::new(), Vec::new()),
            "unet-convblock-only" => {
                let unet = strings(&["ResnetBlock2D", "Downsample2D", "Upsample2D"]);
                preset(true, unet, strings(&["conv_in", "conv_out"]), Vec::new())
            }
            _ => return None,
        })
    }

    /// A preset TOML file as lycoris-lora 3.4.0 reads it for `lycoris.kohya`: `enable_conv`,
    /// `unet_target_module`, `unet_target_name`, `text_encoder_target_module`,
    /// `text_encoder_target_name`, `use_fnmatch` and the per-module algorithms
    /// `module_algo_map` / `name_algo_map`; a key left out keeps the `full` preset's value. Keys
    /// `lycoris.kohya` ignores (`target_module`, `target_name`, `exclude_name`, `lora_prefix`),
    /// unknown keys and options, and classes lorakit does not locate are refused.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| Error::bad_file(path, format!("not a TOML preset ({e})")))?;
        let bad = |message: String| Error::bad_file(path, message);
        let mut preset = Self::builtin("full").expect("the full preset");
        for (key, value) in &table {
            let list = || -> Result<Vec<String>> {
                let items = value
                    .as_array()
                    .ok_or_else(|| bad(format!("{key} must be a list of strings")))?;
                (items.iter())
                    .map(|item| {
                        (item.as_str().map(str::to_string))
                            .ok_or_else(|| bad(format!("{key} must be a list of strings")))
                    })
                    .collect()
            };
            let flag =
                || (value.as_bool()).ok_or_else(|| bad(format!("{key} must be true or false")));
            match key.as_str() {
                "enable_conv" => preset.enable_conv = flag()?,
                "use_fnmatch" => preset.use_fnmatch = flag()?,
                "unet_target_module" => preset.unet_target_module = list()?,
                "unet_target_name" => preset.unet_target_name = list()?,
                "text_encoder_target_module" => preset.text_encoder_target_module = list()?,
                "text_encoder_target_name" => preset.text_encoder_target_name = list()?,
                "module_algo_map" | "name_algo_map" => {
                    let table = (value.as_table())
                        .ok_or_else(|| bad(format!("{key} must be a table of tables")))?;
                    let entries = (table.iter())
                        .map(|(name, options)| {
                            let entry = ModuleOverride::parse(key, name, options).map_err(&bad)?;
                            Ok((name.clone(), entry))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    match key.as_str() {
                        "module_algo_map" => preset.module_algo_map = entries,
                        _ => preset.name_algo_map = entries,
                    }
                }
                "target_module" | "target_name" | "exclude_name" | "lora_prefix" => {
                    return Err(bad(format!(
                        "{key}: lycoris.kohya ignores this key; use unet_target_module, \
                         unet_target_name, text_encoder_target_module and \
                         text_encoder_target_name"
                    )))
                }
                _ => {
                    return Err(bad(format!(
                        "unknown preset key {key} (lycoris.kohya reads enable_conv, \
                         unet_target_module, unet_target_name, text_encoder_target_module, \
                         text_encoder_target_name, use_fnmatch, module_algo_map and \
                         name_algo_map)"
                    )))
                }
            }
        }
        let modules = preset.unet_target_module.iter();
        let mapped = preset.module_algo_map.iter().map(|(class, _)| class);
        for class in modules
            .chain(&preset.text_encoder_target_module)
            .chain(mapped)
        {
            let known = MODELLED_CLASSES.contains(&class.as_str())
                || OTHER_TRANSFORMERS.contains(&class.as_str())
                || ABSENT_CLASSES.contains(&class.as_str())
                || ABSENT_TEXT_CLASSES.contains(&class.as_str());
            if !known {
                return Err(bad(format!(
                    "target module class {class} is not one lorakit locates; it knows {}",
                    MODELLED_CLASSES.join(", ")
                )));
            }
        }
        let names = preset.unet_target_name.iter();
        let mapped = preset.name_algo_map.iter().map(|(name, _)| name);
        for name in names.chain(&preset.text_encoder_target_name).chain(mapped) {
            preset
                .pattern(name)
                .map_err(|e| bad(format!("target name {name}: {e}")))?;
        }
        Ok(preset)
    }

    /// A target name as a regex: Python's `re.match` (anchored at the start), or with
    /// `use_fnmatch` a whole-name glob (`*`, `?`, `[...]`).
    fn pattern(&self, name: &str) -> std::result::Result<Regex, regex::Error> {
        if !self.use_fnmatch {
            return Regex::new(&format!("^(?:{name})"));
        }
        let mut out = String::from("^(?s:");
        let mut chars = name.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => out.push_str(".*"),
                '?' => out.push('.'),
                '[' => {
                    let mut class = String::from("[");
                    if chars.peek() == Some(&'!') {
                        chars.next();
                        class.push('^');
                    }
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                        if c == '\\' || c == '[' {
                            class.push('\\');
                        }
                        class.push(c);
                    }
                    class.push(']');
                    out.push_str(&class);
                }
                c => out.push_str(&regex::escape(&c.to_string())),
            }
        }
        out.push_str(")$");
        Regex::new(&out)
    }

    /// True when `name` is one of `names` or matches one as a pattern.
    fn names_match(&self, names: &[String], name: &str) -> bool {
        (names.iter()).any(|t| t == name || self.pattern(t).is_ok_and(|re| re.is_match(name)))
    }

    /// How lycoris selects `layer`: once for each containing target class whose module name
    /// matches no target name, and once when the layer's own name matches one (more than once
    /// is lycoris' "duplicated lora name" error). A layer selected through a target class takes
    /// the `module_algo_map` entry of the innermost mapped class from the target down to the
    /// layer itself, whose algorithm, when it names none, is the next mapped class's outwards;
    /// a layer selected by name takes its `name_algo_map` entry (the exact name, else the first
    /// matching pattern), else its own class's `module_algo_map` entry.
    pub fn select(&self, site: &Site) -> LayerSelection<'_> {
        let (modules, names) = match site.lora_prefix {
            "lora_unet" => (&self.unet_target_module, &self.unet_target_name),
            _ => (
                &self.text_encoder_target_module,
                &self.text_encoder_target_name,
            ),
        };
        let chain = containers(site);
        let targets: Vec<usize> = (chain.iter().enumerate())
            .filter(|(_, (path, class))| {
                modules.iter().any(|m| m == class) && !self.names_match(names, path)
            })
            .map(|(index, _)| index)
            .collect();
        let by_name = self.names_match(names, site.path);
        let count = targets.len() + usize::from(by_name);
        if count != 1 {
            return LayerSelection {
                count,
                ..LayerSelection::default()
            };
        }
        let mut selection = LayerSelection {
            count,
            ..LayerSelection::default()
        };
        match targets.first() {
            Some(&target) => {
                for (_, class) in &chain[target..] {
                    if let Some(entry) = self.class_entry(class) {
                        selection.algo = entry.algo.or(selection.algo);
                        selection.options = Some(entry);
                    }
                }
            }
            None => {
                let own_class = chain.last().map_or("", |(_, class)| *class);
                let entry = (self.name_entry(site.path)).or_else(|| self.class_entry(own_class));
                selection.algo = entry.and_then(|e| e.algo);
                selection.options = entry;
            }
        }
        selection
    }

    /// The `module_algo_map` entry of a class.
    fn class_entry(&self, class: &str) -> Option<&ModuleOverride> {
        (self.module_algo_map.iter())
            .find(|(name, _)| name == class)
            .map(|(_, entry)| entry)
    }

    /// The `name_algo_map` entry of a layer name: the exact name, else the first key (in file
    /// order) that matches it as a pattern.
    fn name_entry(&self, name: &str) -> Option<&ModuleOverride> {
        let map = &self.name_algo_map;
        (map.iter().find(|(key, _)| key == name))
            .or_else(|| {
                map.iter()
                    .find(|(key, _)| self.pattern(key).is_ok_and(|re| re.is_match(name)))
            })
            .map(|(_, entry)| entry)
    }
}

/// The sd-scripts modules that contain a layer (itself included), outermost first, as (module
/// name, class): e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k` lies in
/// `Transformer2DModel`, `BasicTransformerBlock` and `CrossAttention` and is a `Linear`.
/// Block-level classes (`CrossAttnDownBlock2D`, `CLIPEncoder`, ...) are not located.
fn containers(site: &Site) -> Vec<(String, &'static str)> {
    let path = site.path;
    let before = |marker: &str| path.find(marker).map(|i| path[..i].to_string());
    let parent = |levels: usize| {
        let parts: Vec<&str> = path.split('.').collect();
        parts[..parts.len().saturating_sub(levels)].join(".")
    };
    let mut out = Vec::new();
    match site.container {
        Container::Transformer => {
            // The transformer's own GroupNorm is its `norm`.
            let root = [".transformer_blocks.", ".proj_in", ".proj_out"]
                .iter()
                .filter_map(|m| before(m))
                .chain(path.strip_suffix(".norm").map(str::to_string))
                .min_by_key(|r| r.len());
            if let Some(root) = root {
                out.push((root.clone(), "Transformer2DModel"));
            }
            if let Some(i) = path.find(".transformer_blocks.") {
                let after = &path[i + ".transformer_blocks.".len()..];
                let index = after.split('.').next().unwrap_or("");
                let block = format!("{}.transformer_blocks.{index}", &path[..i]);
                out.push((block.clone(), "BasicTransformerBlock"));
                for (part, class) in [
                    ("attn1", "CrossAttention"),
                    ("attn2", "CrossAttention"),
                    ("ff", "FeedForward"),
                ] {
                    let inner = format!("{block}.{part}");
                    if path.starts_with(&format!("{inner}.")) {
                        if path.starts_with(&format!("{inner}.net.0.")) {
                            out.push((inner.clone(), class));
                            out.push((format!("{inner}.net.0"), "GEGLU"));
                        } else {
                            out.push((inner, class));
                        }
                    }
                }
            }
        }
        Container::Resnet => {
            // SDXL's ResNet layers sit one level deeper (`in_layers.2`, `emb_layers.1`, ...).
            let parts: Vec<&str> = path.split('.').collect();
            let nested = parts.len() >= 2 && parts[parts.len() - 2].ends_with("_layers");
            out.push((parent(if nested { 2 } else { 1 }), "ResnetBlock2D"));
        }
        Container::Downsample => out.push((parent(1), "Downsample2D")),
        Container::Upsample => out.push((parent(1), "Upsample2D")),
        Container::TextEncoder => {
            if let Some(i) = path.find(".layers.") {
                let after = &path[i + ".layers.".len()..];
                let index = after.split('.').next().unwrap_or("");
                out.push((format!("{}.layers.{index}", &path[..i]), "CLIPEncoderLayer"));
            }
            if let Some(root) = before(".self_attn.") {
                out.push((format!("{root}.self_attn"), "CLIPAttention"));
            } else if let Some(root) = before(".mlp.") {
                out.push((format!("{root}.mlp"), "CLIPMLP"));
            }
        }
        Container::Other => {}
    }
    out.push((path.to_string(), site.class));
    out
}

#[cfg(test)]
mod tests {
    use super::Preset;

    fn preset_file(text: &str) -> crate::Result<Preset> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preset.toml");
        std::fs::write(&path, text).unwrap();
        Preset::from_file(&path)
    }

    #[test]
    fn a_key_left_out_keeps_the_full_presets_value() {
        let preset =
            preset_file("enable_conv = false\nunet_target_module = [\"CrossAttention\"]\n")
                .unwrap();
        let full = Preset::builtin("full").unwrap();
        assert!(!preset.enable_conv);
        assert_eq!(preset.unet_target_module, ["CrossAttention"]);
        assert_eq!(preset.unet_target_name, full.unet_target_name);
        assert_eq!(
            preset.text_encoder_target_module,
            full.text_encoder_target_module
        );
    }

    #[test]
    fn keys_and_classes_lorakit_does_not_apply_are_refused() {
        for (text, named) in [
            ("target_module = [\"ResnetBlock2D\"]", "unet_target_module"),
            (
                "[module_algo_map.CrossAttention]\nalgo = \"glora\"",
                "module_algo_map.CrossAttention.algo",
            ),
            (
                "[module_algo_map.CrossAttention]\ntrain_on_input = true",
                "option train_on_input",
            ),
            (
                "[module_algo_map.Attention]\nalgo = \"lokr\"",
                "class Attention",
            ),
            ("[name_algo_map.\"(\"]\nalgo = \"lokr\"", "target name ("),
            (
                "unet_target_module = [\"CrossAttnDownBlock2D\"]",
                "CrossAttnDownBlock2D",
            ),
            ("unet_target_name = [\"(\"]", "target name ("),
            ("dim = 4", "unknown preset key dim"),
        ] {
            let message = preset_file(text).unwrap_err().to_string();
            assert!(message.contains(named), "{text}: {message}");
        }
        // An empty map changes nothing and is accepted.
        assert!(preset_file("[name_algo_map]\n").is_ok());
    }

    #[test]
    fn algo_map_entries_keep_their_options_and_file_order() {
        let preset = preset_file(
            "[name_algo_map.\"b.*\"]\nalgo = \"loha\"\n[name_algo_map.\"a.*\"]\ndim = 8\n\
             [module_algo_map.Linear]\nalgo = \"lokr\"\nfactor = 4\nalpha = 1\n\
             weight_decompose = true\n",
        )
        .unwrap();
        let names: Vec<&str> = (preset.name_algo_map.iter())
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(names, ["b.*", "a.*"]);
        assert_eq!(preset.name_algo_map[1].1.dim, Some(8));
        assert_eq!(preset.name_algo_map[1].1.algo, None);
        let linear = &preset.module_algo_map[0].1;
        assert_eq!(linear.algo, Some(super::Algo::Lokr));
        assert_eq!(linear.factor, Some(4));
        assert_eq!(linear.alpha, Some(1.0));
        assert_eq!(linear.weight_decompose, Some(true));
        assert_eq!(
            preset.name_entry("bat").unwrap().algo,
            Some(super::Algo::Loha)
        );
        assert!(preset.name_entry("cat").is_none());
    }

    #[test]
    fn names_match_as_python_re_match_or_fnmatch() {
        let mut preset = Preset::builtin("full").unwrap();
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // re.match: anchored at the start only.
        assert!(preset.names_match(&names(&["down_blocks\\.0"]), "down_blocks.0.resnets.1"));
        assert!(!preset.names_match(&names(&["resnets"]), "down_blocks.0.resnets.1"));
        // fnmatch: the whole name, with *, ? and [...].
        preset.use_fnmatch = true;
        assert!(preset.names_match(&names(&["*.resnets.[01]"]), "down_blocks.0.resnets.1"));
        assert!(!preset.names_match(&names(&["*.resnets.[!01]"]), "down_blocks.0.resnets.1"));
        assert!(!preset.names_match(&names(&["down_blocks"]), "down_blocks.0.resnets.1"));
        assert!(preset.names_match(
            &names(&["down_blocks.?.resnets.1"]),
            "down_blocks.0.resnets.1"
        ));
    }
}
