//! Which layers `lycoris.kohya` gives a module, with what dim and alpha, under a preset, and
//! LoKr's factorisation of a dimension.

use super::preset::{Preset, Site};
use crate::models::adapter::{AdaptableLayer, AdaptableNorm};
use crate::models::frozen::FrozenKind;
use crate::networks::lora::DropoutRates;
use crate::{Error, Result};

/// The LyCORIS algorithm (`algo=` network argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// `locon` (also lycoris' `lora`): `lora_down` / `lora_up`.
    Locon,
    /// `loha`: Hadamard product of two low-rank products.
    Loha,
    /// `lokr`: Kronecker product of a small and a (low-rank) large factor.
    Lokr,
    /// `full`: the whole weight and bias trained, saved as their differences (`diff`,
    /// `diff_b`).
    Full,
    /// `dylora`: `lora_down` / `lora_up` in blocks of `block_size` ranks; each training step
    /// uses the first blocks up to a drawn one and trains that one.
    Dylora,
}

impl Algo {
    /// The algorithm of an `algo=` value, `None` when not one of these.
    pub fn parse(value: &str) -> Option<Self> {
        match value.to_lowercase().as_str() {
            "lora" | "locon" => Some(Algo::Locon),
            "loha" => Some(Algo::Loha),
            "lokr" => Some(Algo::Lokr),
            "full" => Some(Algo::Full),
            "dylora" => Some(Algo::Dylora),
            _ => None,
        }
    }
}

/// The settings of a `lycoris.kohya` network.
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisConfig {
    /// The algorithm.
    pub algo: Algo,
    /// Dim of Linear and 1x1 conv layers (`--network_dim`, default 4).
    pub dim: usize,
    /// Alpha of those (`--network_alpha`, default 1).
    pub alpha: f32,
    /// Dim of larger convolutions (`conv_dim`, default the network dim; 0: none).
    pub conv_dim: usize,
    /// Alpha of larger convolutions (`conv_alpha`, default the network alpha).
    pub conv_alpha: f32,
    /// LoKr's factorisation factor (`factor`, default -1: as square as possible).
    pub factor: i64,
    /// LoKr: the small factor is a low-rank product too when the dim is small enough
    /// (`decompose_both`).
    pub decompose_both: bool,
    /// `rank_dropout` and `module_dropout` (the neuron rate is unused: lycoris' `dropout` has no
    /// effect on the rebuilt weight).
    pub dropout: DropoutRates,
    /// Tucker decomposition of convolutions larger than 1x1 (`use_tucker`).
    pub use_tucker: bool,
    /// DoRA's weight decomposition on every module (`dora_wd`).
    pub weight_decompose: bool,
    /// DoRA's norms per output row (`wd_on_output`, default true) or per input column.
    pub wd_on_output: bool,
    /// A trainable scalar on every module's change, initialised to 0, with the factor that is
    /// otherwise zero drawn at random instead (`use_scalar`).
    pub use_scalar: bool,
    /// `algo=dylora`'s ranks per block (`block_size`, default 4); the dims must be multiples.
    pub block_size: usize,
    /// Normalisation layers inside the targets get a trainable change of their weight and bias
    /// (`train_norm`).
    pub train_norm: bool,
    /// Which layers get a module (`preset`, default `full`), with the preset's per-module
    /// algorithms and options.
    pub preset: Preset,
}

impl LycorisConfig {
    /// The settings of `layer`'s module: this network's, with the preset's per-module algorithm
    /// and options for the layer applied, and the module's dim and alpha; `None` when it gets
    /// no module. Linear and 1x1 layers take the network dim and alpha (none when the dim is
    /// 0); larger convolutions `conv_dim` / `conv_alpha` (none when 0 or the preset disables
    /// convolutions). A per-module `dim` / `alpha` replaces either, and gives a larger
    /// convolution a module even without `conv_dim`, as lycoris' `create_single_module` reads
    /// them. A layer the preset selects twice is an error, as in lycoris.
    pub fn module_config(&self, layer: &AdaptableLayer) -> Result<Option<(Self, usize, f32)>> {
        let selection = self.preset.select(&Site::of_layer(layer));
        match selection.count {
            0 => return Ok(None),
            1 => {}
            _ => {
                return Err(Error::Usage(format!(
                    "the preset selects {} twice (by two target classes, or by a class and its \
                     name); lycoris stops with \"duplicated lora name\"",
                    layer.lora_name()
                )))
            }
        }
        let entry = selection.options.cloned().unwrap_or_default();
        let wanted_dim = entry.dim.filter(|&d| d > 0);
        let wanted_alpha = entry.alpha.filter(|&a| a != 0.0);
        let pointwise = match layer.kind() {
            FrozenKind::Linear => true,
            FrozenKind::Conv2d { .. } => layer.weight().dims()[2] == 1,
        };
        let conv_dim = if self.preset.enable_conv {
            self.conv_dim
        } else {
            0
        };
        let (dim, alpha) = if pointwise && self.dim > 0 {
            (
                wanted_dim.unwrap_or(self.dim),
                wanted_alpha.unwrap_or(self.alpha),
            )
        } else if layer.kind() != FrozenKind::Linear && (conv_dim > 0 || wanted_dim.is_some()) {
            (
                wanted_dim.unwrap_or(conv_dim),
                wanted_alpha.unwrap_or(self.conv_alpha),
            )
        } else {
            return Ok(None);
        };
        let config = LycorisConfig {
            algo: selection.algo.unwrap_or(self.algo),
            factor: entry.factor.unwrap_or(self.factor),
            decompose_both: entry.decompose_both.unwrap_or(self.decompose_both),
            use_tucker: entry.use_tucker.unwrap_or(self.use_tucker),
            weight_decompose: entry.weight_decompose.unwrap_or(self.weight_decompose),
            wd_on_output: entry.wd_on_output.unwrap_or(self.wd_on_output),
            use_scalar: entry.use_scalar.unwrap_or(self.use_scalar),
            block_size: entry.block_size.unwrap_or(self.block_size),
            ..self.clone()
        };
        config.check_module(&layer.lora_name(), dim)?;
        Ok(Some((config, dim, alpha)))
    }

    /// Whether `norm` gets a norm module (`train_norm`): when the preset selects it, as lycoris
    /// gives every `GroupNorm` / `LayerNorm` it reaches a `NormModule` whatever the algorithm.
    pub fn selects_norm(&self, norm: &AdaptableNorm) -> Result<bool> {
        if !self.train_norm {
            return Ok(false);
        }
        match self.preset.select(&Site::of_norm(norm)).count {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::Usage(format!(
                "the preset selects {} twice; lycoris stops with \"duplicated lora name\"",
                norm.lora_name()
            ))),
        }
    }

    /// Refuses a module (`module`: its name, or the arguments that set it) whose settings
    /// lycoris cannot build or would ignore: `algo=full` with
    /// DoRA, `use_scalar`, Tucker or rank dropout (its full module has none of them), and a
    /// dylora dim that is not a multiple of `block_size`.
    pub fn check_module(&self, module: &str, dim: usize) -> Result<()> {
        if self.algo == Algo::Full {
            let ignored = [
                ("dora_wd", self.weight_decompose),
                ("use_scalar", self.use_scalar),
                ("use_tucker", self.use_tucker),
                ("rank_dropout", self.dropout.rank > 0.0),
            ];
            if let Some((key, _)) = ignored.iter().find(|(_, on)| *on) {
                return Err(Error::Usage(format!(
                    "{module} algo=full {key}: lycoris' full module has no {key}; train the \
                     whole weights without it, or use algo=locon|loha|lokr"
                )));
            }
        }
        if self.algo == Algo::Dylora {
            let ignored = [
                ("dora_wd", self.weight_decompose),
                ("use_scalar", self.use_scalar),
                ("use_tucker", self.use_tucker),
                ("rank_dropout", self.dropout.rank > 0.0),
            ];
            if let Some((key, _)) = ignored.iter().find(|(_, on)| *on) {
                return Err(Error::Usage(format!(
                    "{module} algo=dylora {key}: lycoris' dylora module ignores {key}; leave it \
                     out, or use algo=locon|loha|lokr"
                )));
            }
            if !dim.is_multiple_of(self.block_size) {
                return Err(Error::Usage(format!(
                    "{module} algo=dylora: dim {dim} is not a multiple of block_size {} \
                     (lycoris stops: \"lora_dim must be a multiple of block_size\")",
                    self.block_size
                )));
            }
        }
        Ok(())
    }
}

/// lycoris' `factorization(dimension, factor)`: `(m, n)` with `m · n = dimension`, `m ≤ n`; with
/// a positive `factor` dividing the dimension, `{factor, dimension / factor}`, otherwise the
/// most square split whose smaller part is at most `factor` (any when `factor` is negative).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension % factor as usize == 0 {
        let m = factor as usize;
        let n = dimension / m;
        return (m.min(n), m.max(n));
    }
    let limit = if factor < 0 {
        dimension
    } else {
        factor as usize
    };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > limit {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    (m.min(n), m.max(n))
}

#[cfg(test)]
mod tests {
    use super::factorization;

    #[test]
    fn factorization_matches_lycoris() {
        // lycoris-lora 3.4.0's `factorization` for factor -1, 2, 4, 8, 16 (its docstring's
        // table, whose 360 row differs from what the code returns).
        let table: [(usize, [(usize, usize); 5]); 6] = [
            (127, [(1, 127), (1, 127), (1, 127), (1, 127), (1, 127)]),
            (128, [(8, 16), (2, 64), (4, 32), (8, 16), (8, 16)]),
            (250, [(10, 25), (2, 125), (2, 125), (5, 50), (10, 25)]),
            (360, [(18, 20), (2, 180), (4, 90), (8, 45), (15, 24)]),
            (512, [(16, 32), (2, 256), (4, 128), (8, 64), (16, 32)]),
            (1024, [(32, 32), (2, 512), (4, 256), (8, 128), (16, 64)]),
        ];
        for (dimension, expected) in table {
            for (factor, want) in [-1, 2, 4, 8, 16].into_iter().zip(expected) {
                assert_eq!(
                    factorization(dimension, factor),
                    want,
                    "{dimension} {factor}"
                );
            }
        }
    }
}
