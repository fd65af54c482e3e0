//! Dropout of LoRA branches while training (`--network_dropout`, `rank_dropout`,
//! `module_dropout`; docs/kohya-compat.md#lora-forward-pass-and-dropout), drawn from seeded
//! streams so runs are reproducible.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

/// Dropout probabilities of a LoRA branch while training
/// (docs/kohya-compat.md#lora-forward-pass-and-dropout).
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
    pub(super) rates: DropoutRates,
    pub(super) index: u64,
    pub(super) stream: Arc<AtomicU64>,
}

/// Stream value meaning "not training": the branch is applied without dropout.
pub(crate) const NO_DROPOUT_STREAM: u64 = 0;

/// How one forward pass of a branch is perturbed.
pub(crate) struct BranchDraw {
    rng: rand::rngs::StdRng,
    rates: DropoutRates,
}

impl BranchDropout {
    /// Dropout at `rates` for the module at `index`, drawing from `stream`.
    pub(crate) fn new(rates: DropoutRates, index: u64, stream: Arc<AtomicU64>) -> Self {
        Self {
            rates,
            index,
            stream,
        }
    }

    /// The draws for this forward pass, or `None` when not training.
    pub(crate) fn draw(&self) -> Option<BranchDraw> {
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
    pub(crate) fn skips_branch(&mut self) -> bool {
        self.rates.module > 0.0 && self.rng.random::<f32>() < self.rates.module
    }

    /// LyCORIS' rank dropout of a rebuilt weight change: a `[rows, 1, ...]` mask (`rank` axes in
    /// all) keeping each output row with probability `1 - rank`, unscaled; `None` without rank
    /// dropout.
    pub(crate) fn row_mask(
        &mut self,
        rows: usize,
        rank: usize,
        device: &candle_core::Device,
    ) -> candle_core::Result<Option<Tensor>> {
        let rate = self.rates.rank;
        if rate <= 0.0 {
            return Ok(None);
        }
        let mask: Vec<f32> = (0..rows)
            .map(|_| f32::from(self.rng.random::<f32>() > rate))
            .collect();
        let mut shape = vec![1; rank];
        shape[0] = rows;
        Tensor::from_vec(mask, shape, device).map(Some)
    }

    /// `hidden` (the output of `lora_down`, ranks on axis `rank_axis`, samples on axis 0) with
    /// neuron and rank dropout applied; returns it with the factor the branch scale gains.
    pub(super) fn apply(
        &mut self,
        hidden: Tensor,
        rank_axis: usize,
    ) -> candle_core::Result<(Tensor, f64)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

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
