//! `--network_dim`, `--network_alpha`, `--network_dropout` and the `--network_args` of
//! `networks.lora` (docs/kohya-compat.md#lora-network): conv ranks, per-block ranks and alphas,
//! per-block learning-rate weights, rank and module dropout, and LoRA+.

use crate::networks::lora::{Alpha, BlockDims, BlockLayout, DropoutRates, LoraConfig};
use crate::networks::lycoris::{Algo, LycorisConfig, Preset};
use crate::{Error, Result};

use super::TrainArgs;

/// Everything the network arguments decide.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// Which layers get modules, with what rank and alpha.
    pub lora: LoraConfig,
    /// Dropout rates while training.
    pub dropout: DropoutRates,
    /// Learning-rate weight per UNet block (one per block of `layout`), when any is given.
    pub block_lr_weights: Option<Vec<f64>>,
    /// How the UNet's blocks are numbered.
    pub layout: BlockLayout,
    /// LoRA+: the UNet's `lora_up` weights learn this many times faster.
    pub loraplus_ratio: Option<f64>,
    /// LoRA+ of the text-encoder modules (`loraplus_text_encoder_lr_ratio`, else
    /// `loraplus_lr_ratio`).
    pub loraplus_text_encoder_ratio: Option<f64>,
    /// The LyCORIS network of `--network_module lycoris.kohya` (then `lora` is unused).
    pub lycoris: Option<LycorisConfig>,
    /// `--network_module networks.dylora`: the ranks trained together (`unit`); `lora` then
    /// holds the dim, the alpha and whether convolutions get modules.
    pub dylora_unit: Option<usize>,
}

impl NetworkOptions {
    /// Reads the network options of `args` (values of `--network_args` are `key=value` strings)
    /// for a UNet whose blocks are numbered as `layout`.
    pub fn from_args(args: &TrainArgs, layout: BlockLayout) -> Result<Self> {
        let mut given = std::collections::BTreeMap::new();
        for arg in &args.network_args {
            let (key, value) = arg.split_once('=').ok_or_else(|| {
                Error::Usage(format!("--network_args {arg:?}: expected key=value"))
            })?;
            given.insert(key.trim().to_string(), value.trim().to_string());
        }
        if args.network_module == LYCORIS_MODULE {
            return Ok(Self {
                lora: LoraConfig::default(),
                dropout: DropoutRates::default(),
                block_lr_weights: None,
                layout,
                loraplus_ratio: None,
                loraplus_text_encoder_ratio: None,
                lycoris: Some(lycoris_config(args, given)?),
                dylora_unit: None,
            });
        }
        if args.network_module == DYLORA_MODULE {
            return dylora_options(args, given, layout);
        }
        let mut take = |key: &str| given.remove(key);
        let network_dim = args.network_dim.unwrap_or(4);
        let network_alpha = args.network_alpha.map_or(Alpha::Int(1), Alpha::Float);
        let conv_dim = take("conv_dim")
            .map(|v| number::<usize>("conv_dim", &v))
            .transpose()?;
        let conv_alpha = take("conv_alpha")
            .map(|v| number::<f32>("conv_alpha", &v))
            .transpose()?
            .unwrap_or(1.0);
        let block_dims = take("block_dims");
        let block_alphas = take("block_alphas");
        let conv_block_dims = take("conv_block_dims");
        let conv_block_alphas = take("conv_block_alphas");
        let threshold = take("block_lr_zero_threshold")
            .map(|v| number::<f64>("block_lr_zero_threshold", &v))
            .transpose()?
            .unwrap_or(0.0);
        let block_lr_weights = block_lr_weights(
            layout,
            [
                take("down_lr_weight"),
                take("mid_lr_weight"),
                take("up_lr_weight"),
            ],
            threshold,
        )?;
        let rate = |key: &str, value: Option<String>| -> Result<f32> {
            let rate = value.map(|v| number::<f32>(key, &v)).transpose()?;
            probability(key, rate)
        };
        let dropout = DropoutRates {
            neuron: probability("--network_dropout", args.network_dropout)?,
            rank: rate("rank_dropout", take("rank_dropout"))?,
            module: rate("module_dropout", take("module_dropout"))?,
        };
        let ratio =
            |key: &str, value: Option<String>| value.map(|v| number::<f64>(key, &v)).transpose();
        let shared_ratio = ratio("loraplus_lr_ratio", take("loraplus_lr_ratio"))?;
        let unet_ratio = ratio("loraplus_unet_lr_ratio", take("loraplus_unet_lr_ratio"))?;
        let text_encoder_ratio = ratio(
            "loraplus_text_encoder_lr_ratio",
            take("loraplus_text_encoder_lr_ratio"),
        )?;
        if take("dropout").is_some() {
            tracing::warn!(
                "--network_args dropout=... has no effect with networks.lora (as in sd-scripts); use --network_dropout"
            );
        }
        if let Some(key) = given.keys().next() {
            return Err(Error::Usage(format!(
                "--network_args {key}: not supported by networks.lora (supported: conv_dim, conv_alpha, block_dims, block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold, rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)"
            )));
        }

        let count = layout.count();
        let blocks = if block_dims.is_some() || block_lr_weights.is_some() {
            let mut blocks = BlockDims {
                layout,
                dims: match &block_dims {
                    Some(v) => block_list(layout, "block_dims", v)?,
                    None => vec![network_dim; count],
                },
                alphas: match &block_alphas {
                    Some(v) => float_alphas(layout, "block_alphas", v)?,
                    None => vec![network_alpha; count],
                },
                conv: match (&conv_block_dims, conv_dim) {
                    (Some(dims), _) => Some((
                        block_list(layout, "conv_block_dims", dims)?,
                        match &conv_block_alphas {
                            Some(v) => float_alphas(layout, "conv_block_alphas", v)?,
                            None => vec![Alpha::Float(conv_alpha); count],
                        },
                    )),
                    (None, Some(dim)) => {
                        Some((vec![dim; count], vec![Alpha::Float(conv_alpha); count]))
                    }
                    (None, None) => None,
                },
            };
            // A block that learns nothing gets no module.
            for (block, _) in
                (block_lr_weights.iter().flatten().enumerate()).filter(|(_, &weight)| weight == 0.0)
            {
                blocks.dims[block] = 0;
                if let Some((conv_dims, _)) = &mut blocks.conv {
                    conv_dims[block] = 0;
                }
            }
            Some(blocks)
        } else {
            None
        };
        Ok(Self {
            lora: LoraConfig {
                network_dim,
                network_alpha,
                conv_dim,
                conv_alpha,
                blocks,
            },
            dropout,
            block_lr_weights,
            layout,
            loraplus_ratio: unet_ratio.or(shared_ratio).filter(|&r| r != 0.0),
            loraplus_text_encoder_ratio: text_encoder_ratio.or(shared_ratio).filter(|&r| r != 0.0),
            lycoris: None,
            dylora_unit: None,
        })
    }

    /// Learning-rate factor of a module's `lora_down` (`is_up` false) or `lora_up` weight: its
    /// block's weight, times the LoRA+ ratio for `lora_up` (for a text-encoder module: 1, times
    /// the text encoder's LoRA+ ratio). 0 means it is not trained.
    pub fn lr_factor(&self, module_name: &str, is_up: bool) -> f64 {
        if module_name.starts_with("lora_te") {
            return match self.loraplus_text_encoder_ratio {
                Some(ratio) if is_up => ratio,
                _ => 1.0,
            };
        }
        let block = match (&self.block_lr_weights, self.layout.index(module_name)) {
            (Some(weights), Some(block)) => weights[block],
            _ => 1.0,
        };
        match self.loraplus_ratio {
            Some(ratio) if is_up => block * ratio,
            _ => block,
        }
    }
}

/// The `--network_module` of sd-scripts' DyLoRA.
pub const DYLORA_MODULE: &str = "networks.dylora";

/// The options of `networks.dylora`, read as its `create_network` reads them: `conv_dim` (equal to
/// the network dim) adds the convolutions, `unit` (default 1) and the LoRA+ ratios. Every module
/// takes `--network_alpha`, so a `conv_alpha` other than it is refused (sd-scripts would ignore
/// it), and so are the arguments and dropouts DyLoRA does not have.
fn dylora_options(
    args: &TrainArgs,
    mut given: std::collections::BTreeMap<String, String>,
    layout: BlockLayout,
) -> Result<NetworkOptions> {
    let mut take = |key: &str| given.remove(key);
    let network_dim = args.network_dim.unwrap_or(4);
    let network_alpha = args.network_alpha.map_or(Alpha::Int(1), Alpha::Float);
    let conv_dim = take("conv_dim")
        .map(|v| number::<usize>("conv_dim", &v))
        .transpose()?;
    if conv_dim.is_some_and(|dim| dim != network_dim) {
        return Err(Error::Usage(format!(
            "--network_args conv_dim: networks.dylora needs conv_dim equal to --network_dim              ({network_dim}), as sd-scripts asserts"
        )));
    }
    if let Some(value) = take("conv_alpha") {
        if number::<f64>("conv_alpha", &value)? != network_alpha.value() {
            return Err(Error::Usage(format!(
                "--network_args conv_alpha={value}: networks.dylora gives every module                  --network_alpha ({}) and ignores conv_alpha; leave it out or set --network_alpha",
                network_alpha.value()
            )));
        }
    }
    let unit = take("unit")
        .map(|v| number::<usize>("unit", &v))
        .transpose()?
        .unwrap_or(1);
    if unit == 0 || network_dim % unit != 0 {
        return Err(Error::Usage(format!(
            "--network_args unit={unit}: must divide --network_dim ({network_dim})"
        )));
    }
    let ratio =
        |key: &str, value: Option<String>| value.map(|v| number::<f64>(key, &v)).transpose();
    let shared_ratio = ratio("loraplus_lr_ratio", take("loraplus_lr_ratio"))?;
    let unet_ratio = ratio("loraplus_unet_lr_ratio", take("loraplus_unet_lr_ratio"))?;
    let text_encoder_ratio = ratio(
        "loraplus_text_encoder_lr_ratio",
        take("loraplus_text_encoder_lr_ratio"),
    )?;
    if let Some(key) = given.keys().next() {
        return Err(Error::Usage(format!(
            "--network_args {key}: not supported by networks.dylora (it reads conv_dim,              conv_alpha, unit and the loraplus ratios); networks.lora has the other arguments"
        )));
    }
    if args.network_dropout.is_some_and(|p| p > 0.0) {
        return Err(Error::Usage(
            "--network_dropout: networks.dylora has no dropout (sd-scripts ignores it); leave it              out, or use networks.lora"
                .into(),
        ));
    }
    Ok(NetworkOptions {
        lora: LoraConfig {
            network_dim,
            network_alpha,
            conv_dim,
            conv_alpha: network_alpha.value() as f32,
            blocks: None,
        },
        dropout: DropoutRates::default(),
        block_lr_weights: None,
        layout,
        loraplus_ratio: unet_ratio.or(shared_ratio).filter(|&r| r != 0.0),
        loraplus_text_encoder_ratio: text_encoder_ratio.or(shared_ratio).filter(|&r| r != 0.0),
        lycoris: None,
        dylora_unit: Some(unit),
    })
}

/// The `--network_module` of LyCORIS networks.
pub const LYCORIS_MODULE: &str = "lycoris.kohya";

/// lycoris' `str_bool`: every value but `false` (any case) is true.
fn lycoris_bool(value: &str) -> bool {
    !value.eq_ignore_ascii_case("false")
}

/// The LyCORIS network of `--network_dim`, `--network_alpha` and the `--network_args` `given`
/// (docs/lycoris.md), read as `lycoris.kohya.create_network` reads them; options it has that this
/// tool does not implement are refused when they would change anything.
fn lycoris_config(
    args: &TrainArgs,
    mut given: std::collections::BTreeMap<String, String>,
) -> Result<LycorisConfig> {
    let mut take = |key: &str| given.remove(key);
    let algo_name = take("algo").unwrap_or_else(|| "lora".into());
    let algo = Algo::parse(&algo_name).ok_or_else(|| {
        let why = match algo_name.to_lowercase().as_str() {
            // lycoris-lora 3.4.0's module table lacks ia3: lycoris.kohya stops with KeyError.
            "ia3" => "lycoris-lora 3.4.0's lycoris.kohya cannot build it either (KeyError 'ia3')",
            _ => "not supported",
        };
        Error::Usage(format!(
            "--network_args algo={algo_name}: {why}; lycoris.kohya's locon (lora), loha, lokr, \
             full and dylora are supported"
        ))
    })?;
    let dim = args.network_dim.unwrap_or(4);
    let alpha = args.network_alpha.unwrap_or(1.0);
    // lycoris reads `int(value or network_dim)`: an empty value means the default.
    let conv_dim = match take("conv_dim").filter(|v| !v.is_empty()) {
        Some(v) => number::<usize>("conv_dim", &v)?,
        None => dim,
    };
    let conv_alpha = match take("conv_alpha").filter(|v| !v.is_empty()) {
        Some(v) => number::<f32>("conv_alpha", &v)?,
        None => alpha,
    };
    let factor = match take("factor") {
        Some(v) => number::<i64>("factor", &v)?,
        None => -1,
    };
    let decompose_both =
        match take("decompose_both") {
            // lycoris passes the string on as it is: any non-empty value, "False" too, is true.
            Some(v) if v.eq_ignore_ascii_case("false") => return Err(Error::Usage(
                "--network_args decompose_both=False: lycoris treats any given value, \"False\" \
                 too, as true; leave decompose_both out to keep it off"
                    .into(),
            )),
            Some(v) => !v.is_empty(),
            None => false,
        };
    let rate = |key: &str, value: Option<String>| -> Result<f32> {
        let rate = value.map(|v| number::<f32>(key, &v)).transpose()?;
        probability(key, rate)
    };
    let dropout = DropoutRates {
        neuron: 0.0,
        rank: rate("rank_dropout", take("rank_dropout"))?,
        module: rate("module_dropout", take("module_dropout"))?,
    };
    let neuron = rate("dropout", take("dropout"))?;
    if neuron > 0.0 || args.network_dropout.is_some_and(|d| d > 0.0) {
        tracing::warn!(
            "dropout / --network_dropout have no effect with lycoris.kohya (lycoris applies \
             neither to the rebuilt weight); rank_dropout and module_dropout do"
        );
    }
    let weight_decompose = take("dora_wd").is_some_and(|v| lycoris_bool(&v));
    let wd_on_output = take("wd_on_output").is_none_or(|v| lycoris_bool(&v));
    let preset = match take("preset") {
        None => Preset::builtin("full").expect("the full preset"),
        Some(name) => match Preset::builtin(&name) {
            Some(preset) => preset,
            None if name == "ia3" => {
                return Err(Error::Usage(
                    "--network_args preset=ia3: per-layer (IA)^3 options are not supported; \
                     the other built-in presets and preset files are"
                        .into(),
                ))
            }
            None if std::path::Path::new(&name).is_file() => {
                Preset::from_file(std::path::Path::new(&name))?
            }
            None => {
                return Err(Error::Usage(format!(
                    "--network_args preset={name}: neither one of lycoris' presets (full, \
                     full-lin, attn-mlp, attn-only, unet-only, unet-transformer-only, \
                     unet-convblock-only) nor a preset TOML file"
                )))
            }
        },
    };
    let use_tucker = take("use_tucker").is_some_and(|v| lycoris_bool(&v));
    for key in ["use_cp", "use_conv_cp", "disable_conv_cp"] {
        if take(key).is_some() {
            // lycoris copies these deprecated names' values onto use_tucker and then reads them
            // with Python truthiness, so their meaning depends on the order and spelling.
            return Err(Error::Usage(format!(
                "--network_args {key}: lycoris' deprecated name; give use_tucker=True instead"
            )));
        }
    }
    let use_scalar = take("use_scalar").is_some_and(|v| lycoris_bool(&v));
    // lycoris reads `int(value or 4)`.
    let block_size = match take("block_size").filter(|v| !v.is_empty()) {
        Some(v) => number::<usize>("block_size", &v)?.max(1),
        None => 4,
    };
    let train_norm = take("train_norm").is_some_and(|v| lycoris_bool(&v));
    const OFF_ONLY: [(&str, &str); 9] = [
        ("bypass_mode", "the bypass forward pass"),
        ("rs_lora", "rank-stabilised scaling"),
        ("full_matrix", "LoKr's full matrices"),
        (
            "unbalanced_factorization",
            "LoKr's unbalanced factorisation",
        ),
        ("rank_dropout_scale", "rescaled rank dropout"),
        ("rescaled", "rescaled modules"),
        ("train_t5xxl", "T5-XXL training"),
        ("loraplus_lr_ratio", "LoRA+"),
        ("loraplus_unet_lr_ratio", "LoRA+"),
    ];
    for (key, what) in OFF_ONLY {
        if let Some(value) = take(key) {
            let on = match key {
                // LoRA+ ratios are numbers.
                "loraplus_lr_ratio" | "loraplus_unet_lr_ratio" => {
                    number::<f64>(key, &value)? != 0.0
                }
                _ => lycoris_bool(&value),
            };
            if on {
                return Err(Error::Usage(format!(
                    "--network_args {key}={value}: {what} is not supported with lycoris.kohya; \
                     supported: algo=locon|loha|lokr|full|dylora, conv_dim, conv_alpha, \
                     factor, decompose_both, use_tucker, dora_wd, wd_on_output, use_scalar, \
                     block_size, train_norm, rank_dropout, module_dropout, dropout (no effect), \
                     preset"
                )));
            }
        }
    }
    if let Some(key) = given.keys().next() {
        return Err(Error::Usage(format!(
            "--network_args {key}: not supported with lycoris.kohya (supported: algo, conv_dim, \
             conv_alpha, factor, decompose_both, use_tucker, dora_wd, wd_on_output, use_scalar, \
             block_size, train_norm, rank_dropout, module_dropout, dropout, preset)"
        )));
    }
    let config = LycorisConfig {
        algo,
        dim,
        alpha,
        conv_dim,
        conv_alpha,
        factor,
        decompose_both,
        dropout,
        use_tucker,
        weight_decompose,
        wd_on_output,
        use_scalar,
        block_size,
        train_norm,
        preset,
    };
    config.check_module("--network_args", dim)?;
    if config.preset.enable_conv {
        config.check_module("--network_args conv_dim", conv_dim)?;
    }
    Ok(config)
}

/// The learning-rate weights of every block of `layout` from `down_lr_weight`, `mid_lr_weight`
/// and `up_lr_weight` (`[down, mid, up]`), or `None` when none is given. Lists are
/// comma-separated (an empty item is 0), padded with 1.0 or cut to length; down and up also take
/// a preset (`sine`, `cosine`, `linear`, `reverse_linear`, `zeros`, optionally `+base`). Weights
/// at or below `threshold` become 0. SDXL's first and last blocks (embeddings and out layers)
/// weigh 1.0, as sd-scripts adds them.
fn block_lr_weights(
    layout: BlockLayout,
    [down, mid, up]: [Option<String>; 3],
    threshold: f64,
) -> Result<Option<Vec<f64>>> {
    if down.is_none() && mid.is_none() && up.is_none() {
        return Ok(None);
    }
    let part = |key: &str, value: Option<String>, len: usize, presets: bool| -> Result<Vec<f64>> {
        let mut weights = match value {
            None => vec![1.0; len],
            Some(v) if presets && !v.contains(',') && v.parse::<f64>().is_err() => {
                preset(key, &v, len)?
            }
            Some(v) => (v.split(','))
                .map(|item| match item.trim() {
                    "" => Ok(0.0),
                    number => number.parse::<f64>().map_err(|_| bad_number(key, &v)),
                })
                .collect::<Result<Vec<_>>>()?,
        };
        if weights.len() > len {
            tracing::warn!(
                "{key} has {} values; those after the {len}th are ignored",
                weights.len()
            );
        }
        weights.resize(len, 1.0);
        Ok(weights)
    };
    let (side, middle) = layout.lr_weights_per_part();
    let mut weights = part("down_lr_weight", down, side, true)?;
    weights.extend(part("mid_lr_weight", mid, middle, false)?);
    weights.extend(part("up_lr_weight", up, side, true)?);
    for weight in &mut weights {
        if *weight <= threshold {
            *weight = 0.0;
        }
    }
    if layout == BlockLayout::Sdxl {
        weights.insert(0, 1.0);
        weights.push(1.0);
    }
    Ok(Some(weights))
}

/// A preset list of `len` learning-rate weights: `name` or `name+base`.
fn preset(key: &str, value: &str, len: usize) -> Result<Vec<f64>> {
    let (name, base) = match value.split_once('+') {
        Some((name, base)) => (name, number::<f64>(key, base)?),
        None => (value, 0.0),
    };
    let position = |i: usize| i as f64 / (len - 1) as f64;
    let quarter_sine = |i: usize| (std::f64::consts::FRAC_PI_2 * position(i)).sin();
    let rising: Vec<f64> = match name {
        "sine" | "cosine" => (0..len).map(quarter_sine).collect(),
        "linear" | "reverse_linear" => (0..len).map(position).collect(),
        "zeros" => vec![0.0; len],
        _ => {
            return Err(Error::Usage(format!(
                "--network_args {key}={value}: use comma-separated numbers or one of sine, cosine, linear, reverse_linear, zeros (optionally +base)"
            )))
        }
    };
    let ordered: Vec<f64> = if name == "cosine" || name == "reverse_linear" {
        rising.into_iter().rev().collect()
    } else {
        rising
    };
    Ok(ordered.into_iter().map(|w| w + base).collect())
}

/// `count` comma-separated ranks, one per block of `layout`.
fn block_list(layout: BlockLayout, key: &str, value: &str) -> Result<Vec<usize>> {
    let values = (value.split(','))
        .map(|item| number::<usize>(key, item))
        .collect::<Result<Vec<_>>>()?;
    exactly_blocks(layout, key, values)
}

/// Comma-separated alphas, one per block of `layout`.
fn float_alphas(layout: BlockLayout, key: &str, value: &str) -> Result<Vec<Alpha>> {
    let values = (value.split(','))
        .map(|item| number::<f32>(key, item).map(Alpha::Float))
        .collect::<Result<Vec<_>>>()?;
    exactly_blocks(layout, key, values)
}

/// `values` when there is one per block of `layout`.
fn exactly_blocks<T>(layout: BlockLayout, key: &str, values: Vec<T>) -> Result<Vec<T>> {
    let count = layout.count();
    if values.len() != count {
        let unet = match layout {
            BlockLayout::Sd => "SD1.x/SD2.x",
            BlockLayout::Sdxl => "SDXL",
        };
        return Err(Error::Usage(format!(
            "--network_args {key}: needs {count} comma-separated values (one per {unet} UNet \
             block), got {}",
            values.len()
        )));
    }
    Ok(values)
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| bad_number(key, value))
}

fn bad_number(key: &str, value: &str) -> Error {
    Error::Usage(format!("--network_args {key}={value}: not a valid number"))
}

/// `rate` (0 when absent) after checking it is a probability below 1.
fn probability(name: &str, rate: Option<f32>) -> Result<f32> {
    let rate = rate.unwrap_or(0.0);
    if !(0.0..1.0).contains(&rate) {
        return Err(Error::Usage(format!(
            "{name} {rate}: must be at least 0 and below 1"
        )));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(layout: BlockLayout, down: &str, mid: &str, up: &str, threshold: f64) -> Vec<f64> {
        let given = |v: &str| (!v.is_empty()).then(|| v.to_string());
        block_lr_weights(layout, [given(down), given(mid), given(up)], threshold)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn lr_weight_lists_are_padded_cut_and_thresholded() {
        let sd = BlockLayout::Sd;
        let w = weights(sd, "0.5,,2", "3,4", "1,1,1,1,1,1,1,1,1,1,1,1,9,9", 0.0);
        assert_eq!(w.len(), sd.count());
        assert_eq!(&w[..4], &[0.5, 0.0, 2.0, 1.0]);
        assert_eq!(w[12], 3.0, "mid takes one value");
        assert!(w[13..].iter().all(|&x| x == 1.0), "up cut to 12");
        let w = weights(sd, "", "0.1", "", 0.1);
        assert_eq!(w[12], 0.0, "at the threshold becomes 0");
        assert!(block_lr_weights(sd, [None, None, None], 0.0)
            .unwrap()
            .is_none());

        let sdxl = BlockLayout::Sdxl;
        let w = weights(sdxl, "0.5", "3,4", "zeros", 0.0);
        assert_eq!(w.len(), sdxl.count());
        assert_eq!((w[0], w[22]), (1.0, 1.0), "embeddings and out layers");
        assert_eq!(&w[1..3], &[0.5, 1.0]);
        assert_eq!(&w[10..13], &[3.0, 4.0, 1.0], "mid takes three values");
        assert!(w[13..22].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn lr_weight_presets_follow_the_spec_formulas() {
        let w = weights(BlockLayout::Sd, "sine", "", "cosine+0.5", 0.0);
        for i in 0..12 {
            let sine = (std::f64::consts::FRAC_PI_2 * i as f64 / 11.0).sin();
            assert!((w[i] - sine).abs() < 1e-12);
            let cosine = (std::f64::consts::FRAC_PI_2 * (11 - i) as f64 / 11.0).sin() + 0.5;
            assert!((w[13 + i] - cosine).abs() < 1e-12);
        }
        let w = weights(BlockLayout::Sd, "reverse_linear", "", "linear", 0.0);
        assert_eq!(w[0], 1.0);
        assert_eq!(w[11], 0.0);
        assert_eq!(w[13], 0.0);
        assert_eq!(w[24], 1.0);
        assert!(block_lr_weights(BlockLayout::Sd, [Some("wave".into()), None, None], 0.0).is_err());
        assert!(
            block_lr_weights(BlockLayout::Sdxl, [None, Some("sine".into()), None], 0.0).is_err(),
            "mid takes numbers only"
        );
    }

    #[test]
    fn block_lists_need_one_value_per_block() {
        assert!(block_list(BlockLayout::Sd, "block_dims", "1,2,3").is_err());
        assert_eq!(
            block_list(BlockLayout::Sd, "block_dims", &["4"; 25].join(",")).unwrap(),
            vec![4; 25]
        );
        assert!(block_list(BlockLayout::Sdxl, "block_dims", &["4"; 25].join(",")).is_err());
        assert_eq!(
            block_list(BlockLayout::Sdxl, "block_dims", &["4"; 23].join(",")).unwrap(),
            vec![4; 23]
        );
        assert!(probability("rank_dropout", Some(1.0)).is_err());
    }
}
