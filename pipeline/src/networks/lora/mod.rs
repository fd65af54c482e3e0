//! LoRA network in the kohya-ss sd-scripts format (`networks.lora`): module selection, key names,
//! initialisation, the training forward pass, and `.safetensors` save/load with `ss_*` metadata.
//!
//! A model exposes its adaptable layers ([`AdaptableLayer`]) through a visitor; [`LoraNetwork`]
//! attaches a [`LoraModule`] to every layer the selection rules pick
//! (docs/kohya-compat.md#lora-module-selection) and names it `lora_unet_<diffusers path with '_'>`
//! (docs/kohya-compat.md#lora-key-names).

#[cfg(test)]
mod device_parity;
mod dropout;
mod file;
mod selection;

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::models::adapter::{Adaptable, AdaptableLayer, Container, LayerAdapter};
use crate::models::frozen::FrozenKind;
use crate::models::low_rank::LowRankBranch;
use crate::models::trainable_conv;
use crate::{Error, Result};
use dropout::BranchDraw;
pub(crate) use dropout::NO_DROPOUT_STREAM;
pub use dropout::{BranchDropout, DropoutRates};
pub(crate) use file::serialize_with_hashes;
pub(crate) use file::FileModule;
pub use file::{sha256_hex, LoraFile};
pub use selection::{unet_lora_name, BlockDims, BlockLayout, LoraConfig};

/// Alpha as stored in the file: sd-scripts keeps an integer default alpha as int64
/// (docs/kohya-compat.md#lora-tensors-and-alpha).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Alpha {
    /// Integer alpha (the `--network_alpha` default of 1), stored as I64.
    Int(i64),
    /// Float alpha (given on the command line or from a file), stored as F32.
    Float(f32),
}

impl Alpha {
    /// Numeric value.
    pub fn value(self) -> f64 {
        match self {
            Alpha::Int(v) => v as f64,
            Alpha::Float(v) => v as f64,
        }
    }
}

/// One LoRA module: `lora_down`, `lora_up` and `alpha`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// kohya key prefix, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub name: String,
    /// `lora_down.weight`: `[r, in]` or `[r, in, kh, kw]`.
    pub down: Var,
    /// `lora_up.weight`: `[out, r]` or `[out, r, 1, 1]`.
    pub up: Var,
    /// Alpha (scale = alpha / rank).
    pub alpha: Alpha,
    /// Multiplier (1.0 in training).
    pub multiplier: f64,
    /// Dropout while training (`--network_dropout`, `rank_dropout`, `module_dropout`).
    pub dropout: Option<BranchDropout>,
}

impl LoraModule {
    /// Rank (dimension 0 of `lora_down`).
    pub fn rank(&self) -> usize {
        self.down.as_tensor().dims()[0]
    }

    /// The module's weight change `multiplier · scale · up · down`, shaped like the layer's
    /// weight (`[out, in]` or `[out, in, kh, kw]`; for a conv the sum over ranks of
    /// `up[o, r] · down[r, i, :, :]`).
    pub fn weight_delta(&self) -> candle_core::Result<Tensor> {
        let down = self.down.as_tensor();
        let rank = self.rank();
        let up = self.up.as_tensor().reshape(((), rank))?;
        let mut shape = down.dims().to_vec();
        shape[0] = up.dim(0)?;
        up.matmul(&down.reshape((rank, ()))?)?
            .reshape(shape)?
            .affine(self.scale(), 0.0)
    }

    /// `multiplier * alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.multiplier * self.alpha.value() / self.rank() as f64
    }
}

impl LayerAdapter for LoraModule {
    fn clone_box(&self) -> Box<dyn LayerAdapter> {
        Box::new(self.clone())
    }

    /// The plain branch when no dropout applies this forward pass (then the layer fuses it).
    fn low_rank_branch(&self) -> Option<LowRankBranch> {
        let drops = self
            .dropout
            .as_ref()
            .and_then(BranchDropout::draw)
            .is_some();
        (!drops).then(|| LowRankBranch {
            down: self.down.as_tensor().clone(),
            up: self.up.as_tensor().clone(),
            scale: self.scale(),
        })
    }

    /// The LoRA branch `up(down(x)) * scale` for a layer of `kind`, or `None` when module
    /// dropout skips it for this forward pass.
    fn delta(&self, x: &Tensor, kind: FrozenKind) -> candle_core::Result<Option<Tensor>> {
        let mut draw = self.dropout.as_ref().and_then(BranchDropout::draw);
        if draw.as_mut().is_some_and(BranchDraw::skips_branch) {
            return Ok(None);
        }
        let mut extra_scale = 1.0;
        let out = unscaled_branch(
            x,
            self.down.as_tensor(),
            self.up.as_tensor(),
            kind,
            &mut |hidden, rank_axis| match &mut draw {
                Some(draw) => {
                    let (hidden, factor) = draw.apply(hidden, rank_axis)?;
                    extra_scale = factor;
                    Ok(hidden)
                }
                None => Ok(hidden),
            },
        )?;
        Ok(Some(out.affine(self.scale() * extra_scale, 0.0)?))
    }
}

/// The unscaled low-rank branch `up(down(x))` for a layer of `kind`, with `down` `[r, in(, k, k)]`
/// and `up` `[out, r(, 1, 1)]` (cast to `x`'s dtype); `hidden` may change the down projection's
/// output (ranks on the axis it is given, samples on axis 0) before the up projection.
pub(crate) fn unscaled_branch(
    x: &Tensor,
    down: &Tensor,
    up: &Tensor,
    kind: FrozenKind,
    hidden: &mut dyn FnMut(Tensor, usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let down = &down.to_dtype(x.dtype())?;
    let up = &up.to_dtype(x.dtype())?;
    match kind {
        FrozenKind::Linear => {
            let projected = x.broadcast_matmul(&down.t()?)?;
            let rank_axis = projected.rank() - 1;
            hidden(projected, rank_axis)?.broadcast_matmul(&up.t()?)
        }
        FrozenKind::Conv2d { stride, padding } => {
            // The hidden `[N, r, OH·OW]`: a 1x1 convolution is a product over channels,
            // `[r, C] · [C, H·W]` per image; larger kernels run on the im2col kernels of
            // `trainable_conv`. The up-projection is 1x1, another product. Written so, the
            // backward pass never goes through candle's (slow) transposed convolution.
            let (batch, channels, height, width) = x.dims4()?;
            let rank = down.dim(0)?;
            let pointwise = (down.dim(2)?, down.dim(3)?, stride, padding) == (1, 1, 1, 0);
            let (projected, (out_h, out_w)) = if pointwise {
                let pixels = x.reshape((batch, channels, height * width))?;
                let down = down.reshape((rank, channels))?;
                (down.broadcast_matmul(&pixels)?, (height, width))
            } else {
                let projected = trainable_conv::conv2d(x, down, stride, padding)?;
                let (_, _, out_h, out_w) = projected.dims4()?;
                (projected.flatten_from(2)?, (out_h, out_w))
            };
            let up = up.reshape((up.dim(0)?, rank))?;
            up.broadcast_matmul(&hidden(projected, 1)?)?
                .reshape((batch, up.dim(0)?, out_h, out_w))
        }
    }
}

/// The LoRA module attached to `layer`, if any.
fn attached(layer: &AdaptableLayer) -> Option<&LoraModule> {
    let adapter: &dyn Any = layer.adapter.as_deref()?;
    adapter.downcast_ref()
}

/// The LoRA module attached to `layer`, if any, to change it.
fn attached_mut(layer: &mut AdaptableLayer) -> Option<&mut LoraModule> {
    let adapter: &mut dyn Any = layer.adapter.as_deref_mut()?;
    adapter.downcast_mut()
}

/// A LoRA network attached to a model: the list of module names and trainable variables.
#[derive(Debug, Clone)]
pub struct LoraNetwork {
    /// Modules in model order.
    pub modules: Vec<LoraModule>,
    /// The micro-batch stream shared by the modules' dropout ([`BranchDropout`]).
    dropout_stream: Arc<AtomicU64>,
}

impl LoraNetwork {
    /// The network of `modules`, without dropout.
    pub(crate) fn from_modules(modules: Vec<LoraModule>) -> Self {
        Self {
            modules,
            dropout_stream: Arc::default(),
        }
    }

    /// Turns on dropout at `rates` for every module (in `model` too).
    pub fn enable_dropout(&mut self, model: &mut dyn Adaptable, rates: DropoutRates) {
        let make = |index: usize| BranchDropout {
            rates,
            index: index as u64,
            stream: self.dropout_stream.clone(),
        };
        let positions: HashMap<String, usize> = (self.modules.iter())
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        model.visit_layers(&mut |layer| {
            if let Some(lora) = attached_mut(layer) {
                if let Some(&index) = positions.get(&lora.name) {
                    lora.dropout = Some(make(index));
                }
            }
        });
        for (index, module) in self.modules.iter_mut().enumerate() {
            module.dropout = Some(make(index));
        }
    }

    /// Sets the dropout masks' stream for the next forward pass (`None`: no dropout). The
    /// trainer passes a value derived from the seed and the micro-batch index.
    pub fn set_dropout_stream(&self, stream: Option<u64>) {
        let value = stream.map_or(NO_DROPOUT_STREAM, |s| s.max(1));
        self.dropout_stream.store(value, Ordering::Relaxed);
    }

    /// Creates and attaches fresh modules (down Kaiming-uniform, up zeros;
    /// docs/kohya-compat.md#lora-initialisation) drawn from a seeded RNG.
    pub fn create(
        model: &mut dyn Adaptable,
        config: &LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut modules = Vec::new();
        try_visit_layers(model, &mut |layer| {
            if let Some((rank, alpha)) = config.select(layer) {
                attach(
                    layer,
                    new_module(layer, rank, alpha, &mut rng, device)?,
                    &mut modules,
                );
            }
            Ok(())
        })?;
        let mut seen = std::collections::HashSet::new();
        for m in &modules {
            if !seen.insert(m.name.as_str()) {
                return Err(Error::Model(format!(
                    "duplicate LoRA module name {}",
                    m.name
                )));
            }
        }
        Ok(Self {
            modules,
            dropout_stream: Arc::default(),
        })
    }

    /// How many trainable values [`LoraNetwork::create`] would allocate for `model` under
    /// `config`, counted from the layer shapes alone (nothing is allocated).
    pub fn parameter_count(model: &mut dyn Adaptable, config: &LoraConfig) -> usize {
        let mut count = 0;
        model.visit_layers(&mut |layer| {
            if let Some((rank, _)) = config.select(layer) {
                let (down, up, _) = module_shapes(layer, rank);
                count += down.iter().product::<usize>() + up.iter().product::<usize>();
            }
        });
        count
    }

    /// Loads a kohya LoRA file and attaches its UNet modules to `model` (non-strict: text-encoder
    /// modules are ignored, and so are names the model does not have; both are counted in the
    /// returned report). Weights are trainable variables (for `--network_weights`).
    pub fn load(
        model: &mut dyn Adaptable,
        path: &Path,
        multiplier: f64,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let file = LoraFile::read(path)?;
        let mut modules = Vec::new();
        let mut used = std::collections::HashSet::new();
        try_visit_layers(model, &mut |layer| {
            let name = layer.lora_name();
            if let Some(entry) = file.modules.get(&name) {
                let module = module_from_file(layer, &name, entry, multiplier, device, path)?;
                attach(layer, module, &mut modules);
                used.insert(name);
            }
            Ok(())
        })?;
        let mut report = LoadReport {
            applied: used.len(),
            ..LoadReport::default()
        };
        report.count_unused(&file, &used);
        Ok((
            Self {
                modules,
                dropout_stream: Arc::default(),
            },
            report,
        ))
    }

    /// Loads the matching modules of the kohya LoRA file `path` into this network, attached to
    /// `model` (`--network_weights` without `--dim_from_weights`): weights and alpha come from the
    /// file, a module the file lacks keeps its fresh initialisation, and a module whose rank or
    /// shape differs is an error.
    pub fn load_weights(&mut self, model: &mut dyn Adaptable, path: &Path) -> Result<LoadReport> {
        let file = LoraFile::read(path)?;
        let mut used = std::collections::HashSet::new();
        let mut alphas = HashMap::new();
        try_visit_layers(model, &mut |layer| {
            // The variables are shared with the layer's copy of the module.
            let Some(module) = attached(layer).cloned() else {
                return Ok(());
            };
            let Some(entry) = file.modules.get(&module.name) else {
                return Ok(());
            };
            let device = module.down.device().clone();
            let loaded =
                module_from_file(layer, &module.name, entry, module.multiplier, &device, path)?;
            if loaded.down.dims() != module.down.dims() {
                return Err(Error::bad_file(path, format!(
                    "module {} has rank {} in the file but {} in this network; pass the file's --network_dim / network_args, or --dim_from_weights",
                    module.name,
                    loaded.rank(),
                    module.rank()
                )));
            }
            module.down.set(loaded.down.as_tensor())?;
            module.up.set(loaded.up.as_tensor())?;
            if let Some(attached) = attached_mut(layer) {
                attached.alpha = loaded.alpha;
            }
            used.insert(module.name.clone());
            alphas.insert(module.name, loaded.alpha);
            Ok(())
        })?;
        for module in &mut self.modules {
            if let Some(&alpha) = alphas.get(&module.name) {
                module.alpha = alpha;
            }
        }
        let mut report = LoadReport {
            applied: used.len(),
            ..LoadReport::default()
        };
        report.count_unused(&file, &used);
        Ok(report)
    }

    /// Max-norm regularisation (`--scale_weight_norms`, see
    /// docs/kohya-compat.md#max-norm-regularisation): every module whose weight change
    /// `scale · up · down` has a Frobenius norm above `limit` has both its matrices scaled so the
    /// norm becomes `limit`.
    pub fn apply_max_norm(&self, limit: f64) -> Result<MaxNormReport> {
        let mut report = MaxNormReport::default();
        let mut total = 0.0;
        for module in &self.modules {
            let rank = module.rank();
            let down = module.down.as_tensor().reshape((rank, ()))?;
            let up = module.up.as_tensor().reshape(((), rank))?;
            // ‖U·D‖² = Σ (UᵀU) ∘ (D·Dᵀ): two rank×rank products instead of the full matrix.
            let gram_up = up.t()?.matmul(&up)?;
            let gram_down = down.matmul(&down.t()?)?;
            let squared = (gram_up * gram_down)?.sum_all()?.to_scalar::<f32>()? as f64;
            let norm = squared.max(0.0).sqrt() * module.alpha.value() / rank as f64;
            let clamped = norm.max(limit / 2.0);
            let ratio = clamped.min(limit) / clamped;
            if ratio != 1.0 {
                report.keys_scaled += 1;
                let factor = ratio.sqrt();
                module.up.set(&(module.up.as_tensor() * factor)?)?;
                module.down.set(&(module.down.as_tensor() * factor)?)?;
            }
            let scaled = norm * ratio;
            total += scaled;
            report.max_norm = report.max_norm.max(scaled);
        }
        report.mean_norm = total / self.modules.len().max(1) as f64;
        Ok(report)
    }

    /// Merges the modules of the kohya LoRA file `path` that `model` has a layer for (UNet, and
    /// text-encoder ones when `model` includes the text encoders), at `multiplier`, into its
    /// frozen weights (`--base_weights`, generate-images); the report counts what was merged
    /// and skipped.
    pub fn merge_file(
        model: &mut dyn Adaptable,
        path: &Path,
        multiplier: f64,
    ) -> Result<LoadReport> {
        let file = LoraFile::read(path)?;
        let mut report = LoadReport::default();
        let mut used = std::collections::HashSet::new();
        try_visit_layers(model, &mut |layer| {
            let name = layer.lora_name();
            if let Some(entry) = file.modules.get(&name) {
                let module = module_from_file(layer, &name, entry, multiplier, &Device::Cpu, path)?;
                let delta = module.weight_delta()?.to_device(layer.weight().device())?;
                layer.merge_into_weight(&delta)?;
                report.applied += 1;
                used.insert(name);
            }
            Ok(())
        })?;
        report.count_unused(&file, &used);
        Ok(report)
    }

    /// The trainable variables (down and up of each module, in module order).
    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|m| [m.down.clone(), m.up.clone()])
            .collect()
    }

    /// The state dict as sd-scripts saves it: `(key, tensor)` with `.alpha` as a 0-d tensor
    /// (I64 for an integer alpha unless `save_dtype` casts everything).
    pub fn state_dict(&self, save_dtype: Option<DType>) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.modules.len() * 3);
        for m in &self.modules {
            let cast = |t: &Tensor| -> Result<Tensor> {
                let t = t.to_device(&Device::Cpu)?;
                Ok(match save_dtype {
                    Some(dt) => t.to_dtype(dt)?,
                    None => t.to_dtype(DType::F32)?,
                })
            };
            out.push((
                format!("{}.lora_down.weight", m.name),
                cast(m.down.as_tensor())?,
            ));
            out.push((
                format!("{}.lora_up.weight", m.name),
                cast(m.up.as_tensor())?,
            ));
            let alpha = match (m.alpha, save_dtype) {
                (Alpha::Int(v), None) => Tensor::new(v, &Device::Cpu)?,
                (a, dt) => Tensor::new(a.value() as f32, &Device::Cpu)?
                    .to_dtype(dt.unwrap_or(DType::F32))?,
            };
            out.push((format!("{}.alpha", m.name), alpha));
        }
        Ok(out)
    }

    /// Serialises the network with `metadata` (plus `sshs_model_hash`/`sshs_legacy_hash`, see
    /// docs/kohya-compat.md#lora-file-hashes) and writes it atomically to `path`.
    pub fn save(
        &self,
        path: &Path,
        save_dtype: Option<DType>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        let tensors = self.state_dict(save_dtype)?;
        let bytes = serialize_with_hashes(&tensors, metadata)
            .map_err(|e| Error::Model(format!("cannot serialise LoRA {}: {e}", path.display())))?;
        crate::infra::fsio::write_atomic(path, &bytes)
    }
}

impl LoadReport {
    /// Counts the text-encoder modules among the `used` ones, and the modules of `file` not in
    /// `used`: unknown UNet names and text-encoder modules.
    fn count_unused(&mut self, file: &LoraFile, used: &std::collections::HashSet<String>) {
        self.applied_text_encoder = used.iter().filter(|n| !n.starts_with("lora_unet_")).count();
        for name in file.modules.keys().filter(|n| !used.contains(*n)) {
            if name.starts_with("lora_unet_") {
                self.unknown.push(name.clone());
            } else {
                self.ignored_text_encoder += 1;
            }
        }
    }
}

/// What [`LoraNetwork::apply_max_norm`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MaxNormReport {
    /// Modules that were scaled down.
    pub keys_scaled: usize,
    /// Mean norm of the modules' weight changes after scaling.
    pub mean_norm: f64,
    /// Largest norm after scaling.
    pub max_norm: f64,
}

/// What [`LoraNetwork::load`] did with the modules of a file.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Modules applied (UNet and text encoder).
    pub applied: usize,
    /// Of those, text-encoder modules.
    pub applied_text_encoder: usize,
    /// Text-encoder modules skipped (no such layer in the model given, or no text encoder).
    pub ignored_text_encoder: usize,
    /// `lora_unet_*` modules with no matching layer.
    pub unknown: Vec<String>,
}

/// Calls `f` on the layers of `model` in order until one call fails, and returns that error.
pub(crate) fn try_visit_layers(
    model: &mut dyn Adaptable,
    f: &mut dyn FnMut(&mut AdaptableLayer) -> Result<()>,
) -> Result<()> {
    let mut failure = None;
    model.visit_layers(&mut |layer| {
        if failure.is_none() {
            failure = f(layer).err();
        }
    });
    failure.map_or(Ok(()), Err)
}

/// Attaches `module` to `layer` and records it in `modules`.
fn attach(layer: &mut AdaptableLayer, module: LoraModule, modules: &mut Vec<LoraModule>) {
    layer.adapter = Some(Box::new(module.clone()));
    modules.push(module);
}

/// The down and up weight shapes of a rank-`rank` module on `layer`, and the down fan-in.
pub(crate) fn module_shapes(
    layer: &AdaptableLayer,
    rank: usize,
) -> (Vec<usize>, Vec<usize>, usize) {
    let dims = layer.weight().dims();
    match layer.kind() {
        FrozenKind::Linear => (vec![rank, dims[1]], vec![dims[0], rank], dims[1]),
        FrozenKind::Conv2d { .. } => (
            vec![rank, dims[1], dims[2], dims[3]],
            vec![dims[0], rank, 1, 1],
            dims[1] * dims[2] * dims[3],
        ),
    }
}

fn new_module(
    layer: &AdaptableLayer,
    rank: usize,
    alpha: Alpha,
    rng: &mut rand::rngs::StdRng,
    device: &Device,
) -> Result<LoraModule> {
    let (down_shape, up_shape, fan_in) = module_shapes(layer, rank);
    let bound = 1.0 / (fan_in as f64).sqrt();
    let count: usize = down_shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    let down = Var::from_tensor(&Tensor::from_vec(values, down_shape, device)?)?;
    let up = Var::from_tensor(&Tensor::zeros(up_shape, DType::F32, device)?)?;
    // An alpha of 0 means "no scaling": upstream stores the (integer) rank instead.
    let alpha = if alpha.value() == 0.0 {
        Alpha::Int(rank as i64)
    } else {
        alpha
    };
    Ok(LoraModule {
        name: layer.lora_name(),
        down,
        up,
        alpha,
        multiplier: 1.0,
        dropout: None,
    })
}

/// The module `name` of a LoRA file as a module for `layer` (2-D weights of a 1x1 conv are
/// accepted); an error names the file when its shapes do not fit the layer.
pub(crate) fn module_from_file(
    layer: &AdaptableLayer,
    name: &str,
    entry: &FileModule,
    multiplier: f64,
    device: &Device,
    path: &Path,
) -> Result<LoraModule> {
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let dims = layer.weight().dims().to_vec();
    let mut down = entry.down.clone();
    let mut up = entry.up.clone();
    // 2-D weights for a 1x1 conv layer (and 4-D 1x1 for a linear one) are accepted, as UIs do.
    match layer.kind() {
        FrozenKind::Conv2d { .. } => {
            if down.rank() == 2 {
                down = down.unsqueeze(2)?.unsqueeze(3)?;
            }
            if up.rank() == 2 {
                up = up.unsqueeze(2)?.unsqueeze(3)?;
            }
        }
        FrozenKind::Linear => {
            if down.rank() == 4 {
                down = down.flatten_from(1)?;
            }
            if up.rank() == 4 {
                up = up.flatten_from(1)?;
            }
        }
    }
    let rank = down.dims()[0];
    let in_ok = down.dims()[1] == dims[1] && down.dims()[2..] == dims[2..];
    let out_ok = up.dims()[0] == dims[0] && up.dims()[1] == rank;
    if !in_ok || !out_ok {
        return Err(bad(format!(
            "LoRA module {name} has shapes down {:?} / up {:?} that do not fit the layer weight {:?}; the file was trained for a different base model",
            down.dims(),
            up.dims(),
            dims
        )));
    }
    let alpha = entry.alpha.unwrap_or(Alpha::Float(rank as f32));
    Ok(LoraModule {
        name: name.to_string(),
        down: Var::from_tensor(&down.to_dtype(DType::F32)?.to_device(device)?)?,
        up: Var::from_tensor(&up.to_dtype(DType::F32)?.to_device(device)?)?,
        alpha,
        multiplier,
        dropout: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, down: &[usize], up: &[usize], seed: u64) -> LoraModule {
        let device = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut random = |shape: &[usize]| {
            let values: Vec<f32> = (0..shape.iter().product())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            Var::from_tensor(&Tensor::from_vec(values, shape, &device).unwrap()).unwrap()
        };
        LoraModule {
            name: name.into(),
            down: random(down),
            up: random(up),
            alpha: Alpha::Float(2.0),
            multiplier: 1.0,
            dropout: None,
        }
    }

    /// ‖scale · up · down‖ computed from the full weight change.
    fn change_norm(m: &LoraModule) -> f64 {
        let rank = m.rank();
        let down = m.down.as_tensor().reshape((rank, ())).unwrap();
        let up = m.up.as_tensor().reshape(((), rank)).unwrap();
        let delta = up.matmul(&down).unwrap();
        let squared = delta
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (squared as f64).sqrt() * m.alpha.value() / rank as f64
    }

    #[test]
    fn max_norm_scales_only_modules_above_the_limit() {
        let network = LoraNetwork {
            modules: vec![
                module("linear", &[4, 16], &[8, 4], 1),
                module("conv", &[4, 3, 3, 3], &[5, 4, 1, 1], 2),
            ],
            dropout_stream: Arc::default(),
        };
        let before: Vec<f64> = network.modules.iter().map(change_norm).collect();
        let limit = (before[0] + before[1]) / 2.0;
        let (small, large) = if before[0] < before[1] {
            (0, 1)
        } else {
            (1, 0)
        };
        let small_down = network.modules[small]
            .down
            .as_tensor()
            .to_vec2::<f32>()
            .ok();

        let report = network.apply_max_norm(limit).unwrap();
        let after: Vec<f64> = network.modules.iter().map(change_norm).collect();
        assert_eq!(report.keys_scaled, 1);
        assert!(
            (after[large] - limit).abs() < 1e-4 * limit,
            "{after:?} vs {limit}"
        );
        assert!((after[small] - before[small]).abs() < 1e-9);
        assert_eq!(
            network.modules[small]
                .down
                .as_tensor()
                .to_vec2::<f32>()
                .ok(),
            small_down
        );
        assert!((report.max_norm - limit).abs() < 1e-9 * limit);
        assert!((report.mean_norm - (limit + before[small]) / 2.0).abs() < 1e-4 * limit);
    }
}
