//! Validation loss on held-out cached images (`--validation_split`), as sd-scripts computes it:
//! every validation batch at four fixed timesteps spread over `[min_timestep, max_timestep]`,
//! with the same noise at every evaluation and no dropout, so the curve shows only what the
//! network learned.

use candle_core::Device;

use super::data::CachedDataset;
use super::noise::NoiseOptions;
use super::{micro_batch_loss, LossContext};
use crate::models::unet::Unet;
use crate::networks::Network;
use crate::Result;

/// Timesteps per validation batch.
const TIMESTEPS: usize = 4;

/// The held-out set and how it is evaluated.
pub struct Validation {
    dataset: CachedDataset,
    batches: Vec<Vec<usize>>,
    timesteps: Vec<usize>,
    seed: u64,
}

impl Validation {
    /// Evaluates `dataset` in batches of `batch_size` (at most `max_batches` of them) with noise
    /// seeded by `seed`, at timesteps strictly inside `[min_timestep, max_timestep]`.
    pub fn new(
        dataset: CachedDataset,
        batch_size: usize,
        max_batches: Option<usize>,
        seed: u64,
        noise: &NoiseOptions,
    ) -> Self {
        let mut batches = dataset.epoch_batches(seed, 0, batch_size);
        if let Some(limit) = max_batches {
            batches.truncate(limit);
        }
        Self {
            dataset,
            batches,
            timesteps: spread_timesteps(noise.min_timestep, noise.max_timestep),
            seed,
        }
    }

    /// Number of held-out images.
    pub fn images(&self) -> usize {
        self.dataset.samples.len()
    }

    /// The mean loss over every batch and timestep.
    pub fn loss(
        &self,
        unet: &Unet,
        network: &Network,
        training: &LossContext,
        device: &Device,
    ) -> Result<f32> {
        network.set_dropout_stream(None);
        let mut total = 0.0;
        let mut count = 0;
        for (b, batch) in self.batches.iter().enumerate() {
            let batch = self.dataset.collate(batch, device, &Default::default())?;
            for (j, &t) in self.timesteps.iter().enumerate() {
                let ctx = LossContext {
                    noise: NoiseOptions {
                        min_timestep: t,
                        max_timestep: t,
                        ..training.noise
                    },
                    seed: self.seed,
                    recorded: None,
                    ..*training
                };
                let index = (b * self.timesteps.len() + j) as u64;
                let loss = micro_batch_loss(unet, &ctx, &batch, index)?;
                total += loss.to_scalar::<f32>()?;
                count += 1;
            }
        }
        Ok(total / count.max(1) as f32)
    }
}

/// `TIMESTEPS` integers evenly inside `[low, high]`, ends excluded (numpy
/// `linspace(low, high, TIMESTEPS + 2, dtype=int)[1:-1]`: 200, 400, 600, 800 by default).
fn spread_timesteps(low: usize, high: usize) -> Vec<usize> {
    let span = high as f64 - low as f64;
    (1..=TIMESTEPS)
        .map(|k| (low as f64 + span * k as f64 / (TIMESTEPS + 1) as f64) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_are_spread_inside_the_range() {
        assert_eq!(spread_timesteps(0, 1000), [200, 400, 600, 800]);
        assert_eq!(spread_timesteps(100, 900), [260, 420, 580, 740]);
        assert_eq!(spread_timesteps(0, 3), [0, 1, 1, 2]);
    }
}
