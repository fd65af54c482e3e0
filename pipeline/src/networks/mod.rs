//! Trainable networks attached to a frozen model's adaptable layers.

pub mod dylora;
pub mod lora;
pub mod lycoris;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;

use crate::models::adapter::Adaptable;
use crate::Result;
use dylora::DyloraNetwork;
use lora::LoraNetwork;
use lycoris::LycorisNetwork;

/// Merges the network file `path` into `model`'s frozen weights at `multiplier` (generate-images,
/// `--base_weights`): a kohya LoRA or DyLoRA file, or a LyCORIS file (LoCon, LoHa, LoKr).
pub fn merge_file(
    model: &mut dyn Adaptable,
    path: &Path,
    multiplier: f64,
) -> Result<lora::LoadReport> {
    match lycoris::is_lycoris_file(path)? {
        true => LycorisNetwork::merge_file(model, path, multiplier),
        false => LoraNetwork::merge_file(model, path, multiplier),
    }
}

/// The network a training run trains: sd-scripts' LoRA (`networks.lora`) or DyLoRA
/// (`networks.dylora`), or a LyCORIS network (`lycoris.kohya`).
#[derive(Debug, Clone)]
pub enum Network {
    /// `--network_module networks.lora`.
    Lora(LoraNetwork),
    /// `--network_module networks.dylora`.
    Dylora(DyloraNetwork),
    /// `--network_module lycoris.kohya`.
    Lycoris(LycorisNetwork),
}

impl Network {
    /// The module names, in module order.
    pub fn module_names(&self) -> Vec<&str> {
        match self {
            Network::Lora(n) => n.modules.iter().map(|m| m.name.as_str()).collect(),
            Network::Dylora(n) => n.modules.iter().map(|m| m.name.as_str()).collect(),
            Network::Lycoris(n) => (n.modules.iter().map(|m| m.name.as_str()))
                .chain(n.norms.iter().map(|m| m.name.as_str()))
                .collect(),
        }
    }

    /// Sets the stream of the next forward pass's dropout masks and DyLoRA rank draws (`None`:
    /// not training: no dropout, DyLoRA at full rank).
    pub fn set_dropout_stream(&self, stream: Option<u64>) {
        match self {
            Network::Lora(n) => n.set_dropout_stream(stream),
            Network::Dylora(n) => n.set_stream(stream),
            Network::Lycoris(n) => n.set_dropout_stream(stream),
        }
    }

    /// Writes the network's file with `metadata` atomically to `path`.
    pub fn save(
        &self,
        path: &Path,
        save_dtype: Option<DType>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        match self {
            Network::Lora(n) => n.save(path, save_dtype, metadata),
            Network::Dylora(n) => n.save(path, save_dtype, metadata),
            Network::Lycoris(n) => n.save(path, save_dtype, metadata),
        }
    }
}
