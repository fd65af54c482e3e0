//! sd-scripts' DyLoRA (`--network_module networks.dylora`, docs/dylora.md): a LoRA whose ranks are
//! trained a block of `unit` at a time.
//!
//! The layers, key names and file are those of a kohya LoRA (`lora_down.weight`,
//! `lora_up.weight`, `alpha`), with every module at `--network_dim` / `--network_alpha` (3x3
//! convolutions too, when `conv_dim` is given). While training, each forward pass of a module
//! draws a rank `b` (a multiple of `unit` below the dim), computes the full-rank branch
//! `up · down · x · alpha / dim · sqrt(dim / (b + unit))`, and lets gradients reach only ranks
//! `b .. b + unit`. As in sd-scripts, every rank row of `lora_down` and column of `lora_up` is its
//! own trainable variable, so the optimizer leaves the others untouched that step. The draw comes
//! from a seeded generator keyed by the micro-batch stream and the module's index, so runs are
//! reproducible and a resumed run draws the same ranks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::models::adapter::{Adaptable, LayerAdapter};
use crate::models::frozen::FrozenKind;
use crate::networks::lora::{
    module_from_file, module_shapes, try_visit_layers, unscaled_branch, Alpha, LoraConfig,
    LoraFile, LoraModule, LoraNetwork, NO_DROPOUT_STREAM,
};
use crate::{Error, Result};

/// One DyLoRA module: sd-scripts' `DyLoRAModule`.
#[derive(Debug, Clone)]
pub struct DyloraModule {
    /// kohya key prefix, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub name: String,
    /// The rows of `lora_down.weight`, one variable per rank (sd-scripts' `lora_A.i`):
    /// `[1, in]`, or `[1, in, k, k]` for a convolution larger than 1x1.
    pub down_rows: Vec<Var>,
    /// The columns of `lora_up.weight`, one variable per rank (`lora_B.i`): `[out, 1]`, or
    /// `[out, 1, 1, 1]` for a convolution larger than 1x1.
    pub up_columns: Vec<Var>,
    /// Alpha (scale = alpha / dim).
    pub alpha: Alpha,
    /// Ranks trained together (`unit`).
    pub unit: usize,
    /// `lora_down.weight`'s shape.
    down_shape: Vec<usize>,
    /// `lora_up.weight`'s shape.
    up_shape: Vec<usize>,
    /// Position in the network, for the rank draw.
    index: u64,
    /// The micro-batch stream ([`NO_DROPOUT_STREAM`] outside training).
    stream: Arc<AtomicU64>,
}

impl DyloraModule {
    /// The dim (number of ranks).
    pub fn rank(&self) -> usize {
        self.down_rows.len()
    }

    /// `lora_down.weight` `[dim, in(, k, k)]`.
    pub fn down(&self) -> candle_core::Result<Tensor> {
        let rows: Vec<&Tensor> = self.down_rows.iter().map(Var::as_tensor).collect();
        Tensor::cat(&rows, 0)?.reshape(self.down_shape.as_slice())
    }

    /// `lora_up.weight` `[out, dim(, 1, 1)]`.
    pub fn up(&self) -> candle_core::Result<Tensor> {
        let columns: Vec<&Tensor> = self.up_columns.iter().map(Var::as_tensor).collect();
        Tensor::cat(&columns, 1)?.reshape(self.up_shape.as_slice())
    }

    /// The first rank of the block this forward pass trains (a multiple of `unit`), drawn from
    /// the micro-batch stream; `None` outside training.
    pub fn drawn_rank(&self) -> Option<usize> {
        let stream = self.stream.load(Ordering::Relaxed);
        if stream == NO_DROPOUT_STREAM {
            return None;
        }
        let seed = stream ^ (self.index + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let drawn = rand::rngs::StdRng::seed_from_u64(seed).random_range(0..self.rank());
        Some(drawn - drawn % self.unit)
    }

    /// The branch with ranks `trained .. trained + unit` trainable and the scale
    /// `alpha / dim · sqrt(dim / (trained + unit))` (sd-scripts' forward after its draw); with
    /// `None`, the plain LoRA branch (`alpha / dim`, what a DyLoRA file is outside training).
    pub fn delta_at(
        &self,
        x: &Tensor,
        kind: FrozenKind,
        trained: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let rank = self.rank();
        let in_block = |i: usize| trained.is_some_and(|b| (b..b + self.unit).contains(&i));
        let gather = |vars: &[Var], axis: usize| {
            let parts: Vec<Tensor> = (vars.iter().enumerate())
                .map(|(i, var)| match in_block(i) {
                    true => var.as_tensor().clone(),
                    false => var.as_tensor().detach(),
                })
                .collect();
            Tensor::cat(&parts, axis)
        };
        let down = gather(&self.down_rows, 0)?.reshape(self.down_shape.as_slice())?;
        let up = gather(&self.up_columns, 1)?.reshape(self.up_shape.as_slice())?;
        let factor = trained.map_or(1.0, |b| (rank as f64 / (b + self.unit) as f64).sqrt());
        let scale = self.alpha.value() / rank as f64 * factor;
        unscaled_branch(x, &down, &up, kind, &mut |hidden, _| Ok(hidden))?.affine(scale, 0.0)
    }
}

impl LayerAdapter for DyloraModule {
    fn clone_box(&self) -> Box<dyn LayerAdapter> {
        Box::new(self.clone())
    }

    fn delta(&self, x: &Tensor, kind: FrozenKind) -> candle_core::Result<Option<Tensor>> {
        self.delta_at(x, kind, self.drawn_rank()).map(Some)
    }
}

/// A DyLoRA network attached to a model.
#[derive(Debug, Clone)]
pub struct DyloraNetwork {
    /// Modules in model order.
    pub modules: Vec<DyloraModule>,
    /// The micro-batch stream shared by the modules' rank draws.
    stream: Arc<AtomicU64>,
}

impl DyloraNetwork {
    /// Creates and attaches fresh modules on the layers `config` selects (every one at
    /// `config`'s network dim and alpha), `lora_down` rows Kaiming-uniform and `lora_up` zero
    /// as sd-scripts initialises them, drawn from a seeded RNG. The dim must be a multiple of
    /// `unit`.
    pub fn create(
        model: &mut dyn Adaptable,
        config: &LoraConfig,
        unit: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let (dim, alpha) = (config.network_dim, config.network_alpha);
        check_unit(dim, unit)?;
        // An alpha of 0 means "no scaling": sd-scripts stores the (integer) dim instead.
        let alpha = match alpha.value() == 0.0 {
            true => Alpha::Int(dim as i64),
            false => alpha,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let stream = Arc::new(AtomicU64::new(NO_DROPOUT_STREAM));
        let mut modules = Vec::new();
        try_visit_layers(model, &mut |layer| {
            if config.select(layer).is_none() {
                return Ok(());
            }
            let (down_shape, up_shape, fan_in) = module_shapes(layer, dim);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut down = Vec::with_capacity(dim * fan_in);
            down.extend((0..dim * fan_in).map(|_| rng.random_range(-bound..bound) as f32));
            let down = Tensor::from_vec(down, down_shape.as_slice(), device)?;
            let up = Tensor::zeros(up_shape.as_slice(), DType::F32, device)?;
            let module = new_module(
                layer.lora_name(),
                &down,
                &up,
                alpha,
                unit,
                &stream,
                &modules,
            )?;
            layer.adapter = Some(Box::new(module.clone()));
            modules.push(module);
            Ok(())
        })?;
        Ok(Self { modules, stream })
    }

    /// Builds the network from a LoRA / DyLoRA file (`--dim_from_weights`, sd-scripts'
    /// `create_network_from_weights`): one module per module of the file the model has a layer
    /// for, at the file's dim and alpha; returns the network and the file's other module names.
    pub fn load(
        model: &mut dyn Adaptable,
        path: &Path,
        unit: usize,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        let file = LoraFile::read(path)?;
        let stream = Arc::new(AtomicU64::new(NO_DROPOUT_STREAM));
        let mut modules = Vec::new();
        try_visit_layers(model, &mut |layer| {
            let name = layer.lora_name();
            let Some(entry) = file.modules.get(&name) else {
                return Ok(());
            };
            let loaded = module_from_file(layer, &name, entry, 1.0, device, path)?;
            check_unit(loaded.rank(), unit)
                .map_err(|e| Error::bad_file(path, format!("module {name}: {e}")))?;
            let (down, up) = (loaded.down.as_tensor(), loaded.up.as_tensor());
            let module = new_module(name, down, up, loaded.alpha, unit, &stream, &modules)?;
            layer.adapter = Some(Box::new(module.clone()));
            modules.push(module);
            Ok(())
        })?;
        let loaded: std::collections::HashSet<&str> =
            modules.iter().map(|m| m.name.as_str()).collect();
        let unused = (file.modules.keys())
            .filter(|name| !loaded.contains(name.as_str()))
            .cloned()
            .collect();
        Ok((Self { modules, stream }, unused))
    }

    /// Loads the weights of the LoRA / DyLoRA file `path` into this network's modules of the
    /// same names (`--network_weights`, resuming): a module the file lacks keeps its weights
    /// unless `strict`, and a dim, shape or alpha that differs is an error. Returns how many
    /// modules were loaded.
    pub fn load_weights(&self, path: &Path, strict: bool) -> Result<usize> {
        let file = LoraFile::read(path)?;
        let mut applied = 0;
        for module in &self.modules {
            let Some(entry) = file.modules.get(&module.name) else {
                if strict {
                    return Err(Error::bad_file(
                        path,
                        format!("module {} is missing", module.name),
                    ));
                }
                continue;
            };
            let fits = |tensor: &Tensor, shape: &[usize]| {
                tensor.elem_count() == shape.iter().product::<usize>()
                    && tensor.dim(0).ok() == shape.first().copied()
            };
            let rank_of_up = entry.up.dims().get(1).copied();
            if !fits(&entry.down, &module.down_shape)
                || !fits(&entry.up, &module.up_shape)
                || rank_of_up != Some(module.rank())
            {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "module {} has lora_down {:?} / lora_up {:?} in the file but {:?} / {:?} \
                         in this network; pass the file's --network_dim and conv_dim, or \
                         --dim_from_weights",
                        module.name,
                        entry.down.dims(),
                        entry.up.dims(),
                        module.down_shape,
                        module.up_shape
                    ),
                ));
            }
            let alpha = entry.alpha.map_or(module.rank() as f64, Alpha::value);
            if alpha != module.alpha.value() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "module {} has alpha {alpha} in the file but {} in this network; pass \
                         the file's --network_alpha, or --dim_from_weights",
                        module.name,
                        module.alpha.value()
                    ),
                ));
            }
            let down = entry.down.to_dtype(DType::F32)?;
            let up = entry.up.to_dtype(DType::F32)?;
            let up = up.reshape((up.dim(0)?, module.rank()))?;
            for (i, row) in module.down_rows.iter().enumerate() {
                let value = down.narrow(0, i, 1)?.reshape(row.shape())?;
                row.set(&value.to_device(row.device())?)?;
            }
            for (i, column) in module.up_columns.iter().enumerate() {
                let value = up.narrow(1, i, 1)?.reshape(column.shape())?;
                column.set(&value.to_device(column.device())?)?;
            }
            applied += 1;
        }
        Ok(applied)
    }

    /// Sets the rank draws' stream for the next forward pass (`None`: not training, full rank).
    pub fn set_stream(&self, stream: Option<u64>) {
        let value = stream.map_or(NO_DROPOUT_STREAM, |s| s.max(1));
        self.stream.store(value, Ordering::Relaxed);
    }

    /// Every trainable variable with its module name and whether it belongs to `lora_up`, in
    /// sd-scripts' parameter order (per module: the `lora_A` rows, then the `lora_B` columns).
    pub fn named_vars(&self) -> Vec<(Var, &str, bool)> {
        (self.modules.iter())
            .flat_map(|m| {
                let down = m.down_rows.iter().map(|v| (v.clone(), false));
                let up = m.up_columns.iter().map(|v| (v.clone(), true));
                down.chain(up)
                    .map(move |(var, is_up)| (var, m.name.as_str(), is_up))
            })
            .collect()
    }

    /// The network as the plain LoRA its file holds (copies of the weights).
    fn as_lora(&self) -> Result<LoraNetwork> {
        let modules = (self.modules.iter())
            .map(|m| {
                Ok(LoraModule {
                    name: m.name.clone(),
                    down: Var::from_tensor(&m.down()?)?,
                    up: Var::from_tensor(&m.up()?)?,
                    alpha: m.alpha,
                    multiplier: 1.0,
                    dropout: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraNetwork::from_modules(modules))
    }

    /// The state dict as sd-scripts' DyLoRA saves it: that of a kohya LoRA.
    pub fn state_dict(&self, save_dtype: Option<DType>) -> Result<Vec<(String, Tensor)>> {
        self.as_lora()?.state_dict(save_dtype)
    }

    /// Writes the network's file with `metadata` (plus the sd-webui hashes) atomically to
    /// `path`.
    pub fn save(
        &self,
        path: &Path,
        save_dtype: Option<DType>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        self.as_lora()?.save(path, save_dtype, metadata)
    }
}

/// Refuses a dim that `unit` does not divide (sd-scripts asserts it).
fn check_unit(dim: usize, unit: usize) -> Result<()> {
    if unit == 0 || dim % unit != 0 {
        return Err(Error::Usage(format!(
            "DyLoRA: the dim {dim} is not a multiple of unit={unit}; give a --network_dim that \
             unit divides"
        )));
    }
    Ok(())
}

/// A module named `name` with the weights `down` `[dim, in(, k, k)]` and `up` `[out, dim(, 1,
/// 1)]`, split into per-rank variables shaped as sd-scripts' (`[1, in]` / `[out, 1]` unless the
/// kernel is larger than 1x1), placed after `earlier`.
fn new_module(
    name: String,
    down: &Tensor,
    up: &Tensor,
    alpha: Alpha,
    unit: usize,
    stream: &Arc<AtomicU64>,
    earlier: &[DyloraModule],
) -> Result<DyloraModule> {
    let rank = down.dim(0)?;
    let spatial = down.rank() == 4 && down.dims()[2..] != [1, 1];
    let (down_row, up_column): (Vec<usize>, Vec<usize>) = match spatial {
        true => (
            [&[1][..], &down.dims()[1..]].concat(),
            vec![up.dim(0)?, 1, 1, 1],
        ),
        false => (vec![1, down.dims()[1]], vec![up.dim(0)?, 1]),
    };
    let up_matrix = up.reshape((up.dim(0)?, rank))?;
    let mut down_rows = Vec::with_capacity(rank);
    let mut up_columns = Vec::with_capacity(rank);
    for i in 0..rank {
        let row = down.narrow(0, i, 1)?.reshape(down_row.as_slice())?;
        let column = up_matrix.narrow(1, i, 1)?.reshape(up_column.as_slice())?;
        down_rows.push(Var::from_tensor(&row)?);
        up_columns.push(Var::from_tensor(&column)?);
    }
    Ok(DyloraModule {
        name,
        down_rows,
        up_columns,
        alpha,
        unit,
        down_shape: down.dims().to_vec(),
        up_shape: up.dims().to_vec(),
        index: earlier.len() as u64,
        stream: stream.clone(),
    })
}
