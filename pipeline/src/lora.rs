//! LoRA network in the kohya-ss sd-scripts format (`networks.lora`): module selection, key names,
//! initialisation, the training forward pass, and `.safetensors` save/load with `ss_*` metadata.
//!
//! A model exposes its adaptable layers ([`AdaptableLayer`]) through a visitor; [`LoraNetwork`]
//! attaches a [`LoraModule`] to every layer the selection rules pick (spec §8.1) and names it
//! `lora_unet_<diffusers path with '_'>` (spec §8.2).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::models::frozen::{FrozenKind, FrozenOp};
use crate::{Error, Result};

/// The sd-scripts model class that contains a layer; drives module selection (spec §8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// Inside a `Transformer2DModel` (the default LierLa target).
    Transformer,
    /// Inside a `ResnetBlock2D` (C3Lier only).
    Resnet,
    /// A `Downsample2D` (C3Lier only).
    Downsample,
    /// An `Upsample2D` (C3Lier only).
    Upsample,
    /// Anything else (never adapted).
    Other,
}

/// A frozen linear or convolution layer that may carry a trainable LoRA module.
#[derive(Debug, Clone)]
pub struct AdaptableLayer {
    /// Diffusers-style path of the layer, e.g. `down_blocks.0.attentions.0.proj_in`.
    pub path: String,
    /// The sd-scripts class that contains it.
    pub container: Container,
    op: FrozenOp,
    bias: Option<Tensor>,
    /// The attached LoRA module, if any.
    pub lora: Option<LoraModule>,
}

impl AdaptableLayer {
    /// A frozen layer from its weight and optional bias.
    pub fn new(
        path: String,
        container: Container,
        weight: Tensor,
        bias: Option<Tensor>,
        kind: FrozenKind,
    ) -> Self {
        Self {
            path,
            container,
            op: FrozenOp::new(weight, kind),
            bias: bias.map(|b| b.detach()),
            lora: None,
        }
    }

    /// The frozen base weight.
    pub fn weight(&self) -> &Tensor {
        self.op.weight()
    }

    /// Linear or convolution (with stride and padding).
    pub fn kind(&self) -> FrozenKind {
        self.op.kind()
    }

    /// Adds `delta` (shaped like the weight) to the frozen weight.
    pub fn merge_into_weight(&mut self, delta: &Tensor) -> candle_core::Result<()> {
        let weight = self.op.weight();
        let merged = (weight.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?
            .to_dtype(weight.dtype())?;
        self.op = FrozenOp::new(merged, self.op.kind());
        Ok(())
    }

    /// `W0 x + b (+ up(down(x)) * multiplier * alpha / rank)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = self.op.forward(x)?;
        if let Some(bias) = &self.bias {
            y = match self.op.kind() {
                FrozenKind::Linear => y.broadcast_add(bias)?,
                FrozenKind::Conv2d { .. } => {
                    y.broadcast_add(&bias.reshape((bias.dim(0)?, 1, 1))?)?
                }
            };
        }
        match self.lora.as_ref().map(|l| l.delta(x, self.op.kind())) {
            Some(delta) => match delta? {
                Some(delta) => y + delta,
                None => Ok(y),
            },
            None => Ok(y),
        }
    }
}

/// Alpha as stored in the file: sd-scripts keeps an integer default alpha as int64 (spec §8.3).
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

/// Dropout probabilities of a LoRA branch while training (spec §8.5).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DropoutRates {
    /// Hidden units of `lora_down`'s output (`--network_dropout`): inverted dropout.
    pub neuron: f32,
    /// Whole ranks per sample (`rank_dropout`): the branch's scale grows by `1 / (1 - rank)`.
    pub rank: f32,
    /// The whole branch per forward pass (`module_dropout`).
    pub module: f32,
}

impl DropoutRates {
    /// True when any rate is above zero.
    pub fn any(&self) -> bool {
        self.neuron > 0.0 || self.rank > 0.0 || self.module > 0.0
    }
}

/// Dropout of one LoRA branch while training, as sd-scripts' `networks.lora`: the branch may be
/// skipped (`module_dropout`), its hidden units dropped (`--network_dropout`) and whole ranks of
/// each sample masked (`rank_dropout`). Draws come from a seeded RNG keyed by the current
/// micro-batch stream (shared by every module of a network) and the module's index, so a run is
/// reproducible and a resumed run draws the same masks. No stream set (outside training) means
/// no dropout.
#[derive(Debug, Clone)]
pub struct BranchDropout {
    rates: DropoutRates,
    index: u64,
    stream: Arc<AtomicU64>,
}

/// Stream value meaning "not training": the branch is applied without dropout.
const NO_DROPOUT_STREAM: u64 = 0;

/// How one forward pass of a branch is perturbed.
struct BranchDraw {
    rng: rand::rngs::StdRng,
    rates: DropoutRates,
}

impl BranchDropout {
    /// The draws for this forward pass, or `None` when not training.
    fn draw(&self) -> Option<BranchDraw> {
        let stream = self.stream.load(Ordering::Relaxed);
        if stream == NO_DROPOUT_STREAM || !self.rates.any() {
            return None;
        }
        let seed = stream ^ (self.index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Some(BranchDraw {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            rates: self.rates,
        })
    }
}

impl BranchDraw {
    /// True when module dropout skips the branch this time (drawn first, as upstream).
    fn skips_branch(&mut self) -> bool {
        self.rates.module > 0.0 && self.rng.random::<f32>() < self.rates.module
    }

    /// `hidden` (the output of `lora_down`, ranks on axis `rank_axis`, samples on axis 0) with
    /// neuron and rank dropout applied; returns it with the factor the branch scale gains.
    fn apply(&mut self, hidden: Tensor, rank_axis: usize) -> candle_core::Result<(Tensor, f64)> {
        let mut hidden = hidden;
        let neuron = self.rates.neuron;
        if neuron > 0.0 {
            let keep = 1.0 / (1.0 - neuron);
            let mask: Vec<f32> = (0..hidden.elem_count())
                .map(|_| {
                    if self.rng.random::<f32>() < neuron {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, hidden.shape(), hidden.device())?
                .to_dtype(hidden.dtype())?;
            hidden = (hidden * mask)?;
        }
        let rank = self.rates.rank;
        if rank <= 0.0 {
            return Ok((hidden, 1.0));
        }
        let (batch, ranks) = (hidden.dim(0)?, hidden.dim(rank_axis)?);
        let mask: Vec<f32> = (0..batch * ranks)
            .map(|_| f32::from(self.rng.random::<f32>() > rank))
            .collect();
        let mut shape = vec![1; hidden.rank()];
        shape[0] = batch;
        shape[rank_axis] = ranks;
        let mask = Tensor::from_vec(mask, shape, hidden.device())?.to_dtype(hidden.dtype())?;
        Ok((hidden.broadcast_mul(&mask)?, 1.0 / (1.0 - rank as f64)))
    }
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

    /// The LoRA branch `up(down(x)) * scale` for a layer of `kind`, or `None` when module
    /// dropout skips it for this forward pass.
    fn delta(&self, x: &Tensor, kind: FrozenKind) -> candle_core::Result<Option<Tensor>> {
        let mut draw = self.dropout.as_ref().and_then(BranchDropout::draw);
        if draw.as_mut().is_some_and(BranchDraw::skips_branch) {
            return Ok(None);
        }
        let down = &self.down.as_tensor().to_dtype(x.dtype())?;
        let up = &self.up.as_tensor().to_dtype(x.dtype())?;
        let mut extra_scale = 1.0;
        let mut dropout = |hidden: Tensor, rank_axis: usize| match &mut draw {
            Some(draw) => {
                let (hidden, factor) = draw.apply(hidden, rank_axis)?;
                extra_scale = factor;
                Ok::<_, candle_core::Error>(hidden)
            }
            None => Ok(hidden),
        };
        let out = match kind {
            FrozenKind::Linear => {
                let hidden = x.broadcast_matmul(&down.t()?)?;
                let rank_axis = hidden.rank() - 1;
                dropout(hidden, rank_axis)?.broadcast_matmul(&up.t()?)?
            }
            FrozenKind::Conv2d {
                stride: 1,
                padding: 0,
            } if down.dim(2)? == 1 && down.dim(3)? == 1 => {
                // A 1x1 convolution is a product over channels: `[r, C] · [C, H·W]` per image.
                // Written as matrix products, its backward pass is two more products instead of
                // candle's (slow) transposed convolution.
                let (batch, channels, height, width) = x.dims4()?;
                let down = down.reshape((down.dim(0)?, channels))?;
                let up = up.reshape((up.dim(0)?, up.dim(1)?))?;
                let pixels = x.reshape((batch, channels, height * width))?;
                let hidden = dropout(down.broadcast_matmul(&pixels)?, 1)?;
                up.broadcast_matmul(&hidden)?
                    .reshape((batch, up.dim(0)?, height, width))?
            }
            FrozenKind::Conv2d { stride, padding } => {
                dropout(x.conv2d(down, padding, stride, 1, 1)?, 1)?.conv2d(up, 0, 1, 1, 1)?
            }
        };
        Ok(Some(out.affine(self.scale() * extra_scale, 0.0)?))
    }
}

/// Which layers get a module and with what rank/alpha (spec §8.1, §8.6, §8.8).
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Rank for Linear and 1x1 conv layers (`--network_dim`, default 4).
    pub network_dim: usize,
    /// Alpha for those layers (`--network_alpha`, default integer 1).
    pub network_alpha: Alpha,
    /// Rank for 3x3 convs (`conv_dim` network arg); `None` = LierLa (no conv modules).
    pub conv_dim: Option<usize>,
    /// Alpha for 3x3 convs (`conv_alpha`, default 1.0).
    pub conv_alpha: f32,
    /// Per-block ranks and alphas; when set they replace the four values above.
    pub blocks: Option<BlockDims>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            network_dim: 4,
            network_alpha: Alpha::Int(1),
            conv_dim: None,
            conv_alpha: 1.0,
            blocks: None,
        }
    }
}

/// Number of UNet blocks of SD1.x/SD2.x for per-block settings (spec §8.6).
pub const SD_BLOCKS: usize = 25;

/// Per-block ranks and alphas of the UNet (`block_dims`, `block_alphas`, `conv_block_dims`,
/// `conv_block_alphas`), [`SD_BLOCKS`] entries each, indexed by [`sd_block_index`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockDims {
    /// Rank of Linear and 1x1 conv layers per block (0: no module).
    pub dims: Vec<usize>,
    /// Alpha of those layers per block.
    pub alphas: Vec<Alpha>,
    /// Rank and alpha of 3x3 convolutions per block; `None`: no conv modules.
    pub conv: Option<(Vec<usize>, Vec<Alpha>)>,
}

impl LoraConfig {
    /// Rank and alpha for a layer, or `None` when it gets no module.
    pub fn select(&self, layer: &AdaptableLayer) -> Option<(usize, Alpha)> {
        let conv_enabled = match &self.blocks {
            Some(blocks) => blocks.conv.is_some(),
            None => self.conv_dim.is_some(),
        };
        let targeted = match layer.container {
            Container::Transformer => true,
            Container::Resnet | Container::Downsample | Container::Upsample => conv_enabled,
            Container::Other => false,
        };
        if !targeted {
            return None;
        }
        let is_pointwise = match layer.kind() {
            FrozenKind::Linear => true,
            FrozenKind::Conv2d { .. } => {
                let dims = layer.weight().dims();
                dims[2] == 1 && dims[3] == 1
            }
        };
        let block = sd_block_index(&unet_lora_name(&layer.path));
        let (rank, alpha) = match (&self.blocks, block) {
            (Some(blocks), Some(block)) if is_pointwise => {
                (blocks.dims[block], blocks.alphas[block])
            }
            (Some(blocks), Some(block)) => {
                let (dims, alphas) = blocks.conv.as_ref()?;
                (dims[block], alphas[block])
            }
            _ if is_pointwise => (self.network_dim, self.network_alpha),
            _ => (self.conv_dim?, Alpha::Float(self.conv_alpha)),
        };
        (rank > 0).then_some((rank, alpha))
    }
}

/// The SD1.x/SD2.x block (0..[`SD_BLOCKS`]) of a UNet LoRA module name (spec §8.6): down-block
/// layers are 1..=11, the middle block 12, up-block layers 13..=24; `None` for other layers.
pub fn sd_block_index(lora_name: &str) -> Option<usize> {
    static PATTERN: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_",
        )
        .expect("valid block pattern")
    });
    if let Some(found) = PATTERN.captures(lora_name) {
        let level: usize = found[2].parse().ok()?;
        let layer: usize = found[4].parse().ok()?;
        let within = match &found[3] {
            "upsamplers" | "downsamplers" => 3 * level + 2,
            _ => 3 * level + layer,
        };
        let first = if &found[1] == "down" { 1 } else { 13 };
        Some(first + within).filter(|&b| b < SD_BLOCKS)
    } else if lora_name.contains("mid_block_") {
        Some(12)
    } else {
        None
    }
}

/// kohya key prefix of a UNet layer path.
pub fn unet_lora_name(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}

/// Something whose adaptable layers can be visited (the UNet).
pub trait Adaptable {
    /// Calls `f` on every adaptable layer, in model order.
    fn visit_layers(&mut self, f: &mut dyn FnMut(&mut AdaptableLayer));
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
            if let Some(lora) = &mut layer.lora {
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

    /// Creates and attaches fresh modules (down Kaiming-uniform, up zeros; spec §8.4) drawn from a
    /// seeded RNG.
    pub fn create(
        model: &mut dyn Adaptable,
        config: &LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut modules = Vec::new();
        let mut failure: Option<Error> = None;
        model.visit_layers(&mut |layer| {
            if failure.is_some() {
                return;
            }
            let Some((rank, alpha)) = config.select(layer) else {
                return;
            };
            match new_module(layer, rank, alpha, &mut rng, device) {
                Ok(module) => {
                    layer.lora = Some(module.clone());
                    modules.push(module);
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
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
        let mut failure: Option<Error> = None;
        model.visit_layers(&mut |layer| {
            if failure.is_some() {
                return;
            }
            let name = unet_lora_name(&layer.path);
            let Some(entry) = file.modules.get(&name) else {
                return;
            };
            used.insert(name.clone());
            match module_from_file(layer, &name, entry, multiplier, device, path) {
                Ok(module) => {
                    layer.lora = Some(module.clone());
                    modules.push(module);
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
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
        let mut failure: Option<Error> = None;
        model.visit_layers(&mut |layer| {
            let Some(module) = layer.lora.as_ref().filter(|_| failure.is_none()) else {
                return;
            };
            let Some(entry) = file.modules.get(&module.name) else {
                return;
            };
            let loaded = module_from_file(
                layer,
                &module.name,
                entry,
                module.multiplier,
                module.down.device(),
                path,
            )
            .and_then(|loaded| {
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
                Ok(loaded.alpha)
            });
            match loaded {
                Ok(alpha) => {
                    used.insert(module.name.clone());
                    alphas.insert(module.name.clone(), alpha);
                    if let Some(module) = &mut layer.lora {
                        module.alpha = alpha;
                    }
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
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

    /// Max-norm regularisation (`--scale_weight_norms`, spec §8.5): every module whose weight
    /// change `scale · up · down` has a Frobenius norm above `limit` has both its matrices scaled
    /// so the norm becomes `limit`.
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

    /// Merges the UNet modules of the kohya LoRA file `path`, at `multiplier`, into the frozen
    /// weights of `model` (`--base_weights`); the report counts what was merged and skipped.
    pub fn merge_file(
        model: &mut dyn Adaptable,
        path: &Path,
        multiplier: f64,
    ) -> Result<LoadReport> {
        let file = LoraFile::read(path)?;
        let mut report = LoadReport::default();
        let mut used = std::collections::HashSet::new();
        let mut failure: Option<Error> = None;
        model.visit_layers(&mut |layer| {
            let name = unet_lora_name(&layer.path);
            let Some(entry) = file.modules.get(&name).filter(|_| failure.is_none()) else {
                return;
            };
            used.insert(name.clone());
            let merged = module_from_file(layer, &name, entry, multiplier, &Device::Cpu, path)
                .and_then(|module| {
                    let delta = module.weight_delta()?.to_device(layer.weight().device())?;
                    Ok(layer.merge_into_weight(&delta)?)
                });
            match merged {
                Ok(()) => report.applied += 1,
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
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

    /// Serialises the network with `metadata` (plus `sshs_model_hash`/`sshs_legacy_hash`, spec
    /// §10.2) and writes it atomically to `path`.
    pub fn save(
        &self,
        path: &Path,
        save_dtype: Option<DType>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        let tensors = self.state_dict(save_dtype)?;
        let bytes = serialize_with_hashes(&tensors, metadata)
            .map_err(|e| Error::Model(format!("cannot serialise LoRA {}: {e}", path.display())))?;
        crate::fsio::write_atomic(path, &bytes)
    }
}

impl LoadReport {
    /// Counts the modules of `file` not in `used`: unknown UNet names and text-encoder modules.
    fn count_unused(&mut self, file: &LoraFile, used: &std::collections::HashSet<String>) {
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
    /// UNet modules applied.
    pub applied: usize,
    /// Text-encoder modules skipped (this tool trains and applies the UNet only).
    pub ignored_text_encoder: usize,
    /// `lora_unet_*` modules with no matching layer.
    pub unknown: Vec<String>,
}

fn new_module(
    layer: &AdaptableLayer,
    rank: usize,
    alpha: Alpha,
    rng: &mut rand::rngs::StdRng,
    device: &Device,
) -> Result<LoraModule> {
    let dims = layer.weight().dims().to_vec();
    let (down_shape, up_shape, fan_in) = match layer.kind() {
        FrozenKind::Linear => (vec![rank, dims[1]], vec![dims[0], rank], dims[1]),
        FrozenKind::Conv2d { .. } => (
            vec![rank, dims[1], dims[2], dims[3]],
            vec![dims[0], rank, 1, 1],
            dims[1] * dims[2] * dims[3],
        ),
    };
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
        name: unet_lora_name(&layer.path),
        down,
        up,
        alpha,
        multiplier: 1.0,
        dropout: None,
    })
}

fn module_from_file(
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

/// One module as read from a file.
#[derive(Debug, Clone)]
struct FileModule {
    down: Tensor,
    up: Tensor,
    alpha: Option<Alpha>,
}

/// The modules and metadata of a kohya LoRA `.safetensors` file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    modules: BTreeMap<String, FileModule>,
    /// Header `__metadata__`.
    pub metadata: HashMap<String, String>,
}

impl LoraFile {
    /// Reads a LoRA file (any of F32/F16/BF16 weights, alpha of any float type or I64).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| Error::BadFile {
            path: path.to_path_buf(),
            message,
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            bad(format!(
                "not a safetensors file ({e}); pass a LoRA .safetensors file"
            ))
        })?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read tensors ({e})")))?;
        let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>, Option<Alpha>)> =
            BTreeMap::new();
        for (key, tensor) in tensors {
            let (module, field) = if let Some(m) = key.strip_suffix(".lora_down.weight") {
                (m, 0)
            } else if let Some(m) = key.strip_suffix(".lora_up.weight") {
                (m, 1)
            } else if let Some(m) = key.strip_suffix(".alpha") {
                (m, 2)
            } else {
                return Err(bad(format!(
                    "unexpected key {key}: not a kohya LoRA (lora_down/lora_up/alpha) file"
                )));
            };
            let slot = parts.entry(module.to_string()).or_default();
            match field {
                0 => slot.0 = Some(tensor),
                1 => slot.1 = Some(tensor),
                _ => {
                    let alpha = if tensor.dtype() == DType::I64 {
                        Alpha::Int(tensor.to_scalar::<i64>()?)
                    } else {
                        Alpha::Float(tensor.to_dtype(DType::F32)?.to_scalar::<f32>()?)
                    };
                    slot.2 = Some(alpha);
                }
            }
        }
        let mut modules = BTreeMap::new();
        for (name, (down, up, alpha)) in parts {
            match (down, up) {
                (Some(down), Some(up)) => {
                    modules.insert(name, FileModule { down, up, alpha });
                }
                _ => {
                    return Err(bad(format!(
                        "module {name} lacks lora_down or lora_up weights"
                    )))
                }
            }
        }
        Ok(Self { modules, metadata })
    }

    /// Module names in the file.
    pub fn module_names(&self) -> impl Iterator<Item = &String> {
        self.modules.keys()
    }
}

/// Safetensors bytes of `tensors` with `metadata` plus the two sd-webui hashes.
fn serialize_with_hashes(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(name, t)| (name.as_str(), t)).collect();
    let ss_only: HashMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let hashing =
        safetensors::serialize(views.iter().copied(), Some(ss_only)).map_err(|e| e.to_string())?;
    let header_len =
        u64::from_le_bytes(hashing[..8].try_into().expect("8-byte header length")) as usize;
    let model_hash = sha256_hex(&hashing[8 + header_len..]);
    let legacy_slice = if hashing.len() > 0x100000 {
        &hashing[0x100000..hashing.len().min(0x110000)]
    } else {
        &[][..]
    };
    let legacy_hash = sha256_hex(legacy_slice)[..8].to_string();
    let mut full: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    full.insert("sshs_model_hash".into(), model_hash);
    full.insert("sshs_legacy_hash".into(), legacy_hash);
    safetensors::serialize(views.iter().copied(), Some(full)).map_err(|e| e.to_string())
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod dropout_tests {
    use super::*;

    fn dropout(rates: DropoutRates, stream: &Arc<AtomicU64>) -> BranchDropout {
        BranchDropout {
            rates,
            index: 5,
            stream: stream.clone(),
        }
    }

    /// The values of `hidden` after the draws of `dropout`, and the scale factor (`None` when
    /// not training).
    fn applied(dropout: &BranchDropout, hidden: &Tensor, axis: usize) -> Option<(Vec<f32>, f64)> {
        let (out, factor) = dropout.draw()?.apply(hidden.clone(), axis).unwrap();
        Some((out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), factor))
    }

    #[test]
    fn neuron_dropout_zeroes_the_given_share_and_rescales_the_rest() {
        let stream = Arc::new(AtomicU64::new(NO_DROPOUT_STREAM));
        let rates = DropoutRates {
            neuron: 0.25,
            ..DropoutRates::default()
        };
        let dropout = dropout(rates, &stream);
        let hidden = Tensor::ones((4, 2500), DType::F32, &Device::Cpu).unwrap();
        assert!(
            applied(&dropout, &hidden, 1).is_none(),
            "no stream: no dropout"
        );

        stream.store(7, Ordering::Relaxed);
        let (first, factor) = applied(&dropout, &hidden, 1).unwrap();
        assert_eq!(factor, 1.0);
        let zeros = first.iter().filter(|&&v| v == 0.0).count() as f32 / first.len() as f32;
        assert!((zeros - 0.25).abs() < 0.02, "zeroed share {zeros}");
        assert!(first
            .iter()
            .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(first, applied(&dropout, &hidden, 1).unwrap().0);

        stream.store(8, Ordering::Relaxed);
        assert_ne!(first, applied(&dropout, &hidden, 1).unwrap().0);
    }

    #[test]
    fn rank_dropout_masks_whole_ranks_per_sample_and_raises_the_scale() {
        let stream = Arc::new(AtomicU64::new(3));
        let rates = DropoutRates {
            rank: 0.4,
            ..DropoutRates::default()
        };
        let dropout = dropout(rates, &stream);
        // Linear activations [batch, tokens, rank]: one mask value per (sample, rank).
        let (batch, tokens, ranks) = (3, 5, 400);
        let hidden = Tensor::ones((batch, tokens, ranks), DType::F32, &Device::Cpu).unwrap();
        let (values, factor) = applied(&dropout, &hidden, 2).unwrap();
        assert!((factor - 1.0 / 0.6).abs() < 1e-6);
        for b in 0..batch {
            for r in 0..ranks {
                let first = values[b * tokens * ranks + r];
                assert!(first == 0.0 || first == 1.0);
                for t in 1..tokens {
                    assert_eq!(values[(b * tokens + t) * ranks + r], first);
                }
            }
        }
        let dropped = values.iter().filter(|&&v| v == 0.0).count() as f32 / values.len() as f32;
        assert!((dropped - 0.4).abs() < 0.04, "dropped share {dropped}");
        // Convolution activations [batch, rank, h, w]: constant over the pixels.
        let hidden = Tensor::ones((2, 300, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let (values, _) = applied(&dropout, &hidden, 1).unwrap();
        for pixel in values.chunks(4) {
            assert!(pixel.iter().all(|&v| v == pixel[0]));
        }
    }

    #[test]
    fn module_dropout_skips_the_branch_at_the_given_rate() {
        let stream = Arc::new(AtomicU64::new(NO_DROPOUT_STREAM));
        let rates = DropoutRates {
            module: 0.3,
            ..DropoutRates::default()
        };
        let dropout = dropout(rates, &stream);
        assert!(dropout.draw().is_none());
        let skipped = (1..=4000u64)
            .filter(|&s| {
                stream.store(s, Ordering::Relaxed);
                dropout.draw().unwrap().skips_branch()
            })
            .count() as f32
            / 4000.0;
        assert!((skipped - 0.3).abs() < 0.03, "skipped share {skipped}");
    }
}

#[cfg(test)]
mod max_norm_tests {
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
