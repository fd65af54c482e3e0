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
        match &self.lora {
            Some(lora) => y + lora.delta(x, self.op.kind())?,
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
    /// Dropout of the hidden units while training (`--network_dropout`).
    pub dropout: Option<HiddenDropout>,
}

/// Dropout of a LoRA branch's hidden units (the output of `lora_down`), as `--network_dropout`
/// in sd-scripts: each unit is zeroed with `probability` and the others scaled by
/// `1 / (1 - probability)`. Masks come from a seeded RNG keyed by the current micro-batch stream
/// (shared by every module of a network) and the module's index, so a run is reproducible and a
/// resumed run draws the same masks. No stream set (outside training) means no dropout.
#[derive(Debug, Clone)]
pub struct HiddenDropout {
    probability: f32,
    index: u64,
    stream: Arc<AtomicU64>,
}

/// Stream value meaning "not training": the branch is applied without dropout.
const NO_DROPOUT_STREAM: u64 = 0;

impl HiddenDropout {
    /// `hidden` with dropout applied, or unchanged when no training stream is set.
    fn apply(&self, hidden: Tensor) -> candle_core::Result<Tensor> {
        let stream = self.stream.load(Ordering::Relaxed);
        if stream == NO_DROPOUT_STREAM || self.probability <= 0.0 {
            return Ok(hidden);
        }
        let seed = stream ^ (self.index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let keep = 1.0 / (1.0 - self.probability);
        let mask: Vec<f32> = (0..hidden.elem_count())
            .map(|_| {
                if rng.random::<f32>() < self.probability {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, hidden.shape(), hidden.device())?;
        let mask = mask.to_dtype(hidden.dtype())?;
        hidden * mask
    }
}

impl LoraModule {
    /// Rank (dimension 0 of `lora_down`).
    pub fn rank(&self) -> usize {
        self.down.as_tensor().dims()[0]
    }

    /// `multiplier * alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.multiplier * self.alpha.value() / self.rank() as f64
    }

    /// The LoRA branch `up(down(x)) * scale` for a layer of `kind`.
    fn delta(&self, x: &Tensor, kind: FrozenKind) -> candle_core::Result<Tensor> {
        let down = &self.down.as_tensor().to_dtype(x.dtype())?;
        let up = &self.up.as_tensor().to_dtype(x.dtype())?;
        let dropout = |hidden: Tensor| match &self.dropout {
            Some(dropout) => dropout.apply(hidden),
            None => Ok(hidden),
        };
        let out = match kind {
            FrozenKind::Linear => {
                dropout(x.broadcast_matmul(&down.t()?)?)?.broadcast_matmul(&up.t()?)?
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
                let hidden = dropout(down.broadcast_matmul(&pixels)?)?;
                up.broadcast_matmul(&hidden)?
                    .reshape((batch, up.dim(0)?, height, width))?
            }
            FrozenKind::Conv2d { stride, padding } => {
                dropout(x.conv2d(down, padding, stride, 1, 1)?)?.conv2d(up, 0, 1, 1, 1)?
            }
        };
        out.affine(self.scale(), 0.0)
    }
}

/// Which layers get a module and with what rank/alpha (spec §8.1, §8.8).
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
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            network_dim: 4,
            network_alpha: Alpha::Int(1),
            conv_dim: None,
            conv_alpha: 1.0,
        }
    }
}

impl LoraConfig {
    /// Rank and alpha for a layer, or `None` when it gets no module.
    pub fn select(&self, layer: &AdaptableLayer) -> Option<(usize, Alpha)> {
        let conv_enabled = self.conv_dim.is_some();
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
        let (rank, alpha) = if is_pointwise {
            (self.network_dim, self.network_alpha)
        } else {
            (self.conv_dim?, Alpha::Float(self.conv_alpha))
        };
        (rank > 0).then_some((rank, alpha))
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
    /// The micro-batch stream shared by the modules' dropout ([`HiddenDropout`]).
    dropout_stream: Arc<AtomicU64>,
}

impl LoraNetwork {
    /// Turns on `--network_dropout` with `probability` for every module (in `model` too).
    pub fn enable_dropout(&mut self, model: &mut dyn Adaptable, probability: f32) {
        let make = |index: usize| HiddenDropout {
            probability,
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
        let mut report = LoadReport::default();
        for name in file.modules.keys() {
            if used.contains(name) {
                report.applied += 1;
            } else if name.starts_with("lora_unet_") {
                report.unknown.push(name.clone());
            } else {
                report.ignored_text_encoder += 1;
            }
        }
        Ok((
            Self {
                modules,
                dropout_stream: Arc::default(),
            },
            report,
        ))
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

    #[test]
    fn hidden_dropout_zeroes_the_given_share_and_rescales_the_rest() {
        let stream = Arc::new(AtomicU64::new(NO_DROPOUT_STREAM));
        let dropout = HiddenDropout {
            probability: 0.25,
            index: 5,
            stream: stream.clone(),
        };
        let hidden = Tensor::ones((4, 2500), DType::F32, &Device::Cpu).unwrap();
        let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();

        // No stream (not training): unchanged.
        assert!(values(dropout.apply(hidden.clone()).unwrap())
            .iter()
            .all(|&v| v == 1.0));

        stream.store(7, Ordering::Relaxed);
        let first = values(dropout.apply(hidden.clone()).unwrap());
        let zeros = first.iter().filter(|&&v| v == 0.0).count() as f32 / first.len() as f32;
        assert!((zeros - 0.25).abs() < 0.02, "zeroed share {zeros}");
        assert!(first
            .iter()
            .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(first, values(dropout.apply(hidden.clone()).unwrap()));

        stream.store(8, Ordering::Relaxed);
        assert_ne!(first, values(dropout.apply(hidden).unwrap()));
    }
}
