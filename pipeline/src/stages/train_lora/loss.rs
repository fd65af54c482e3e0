//! The element-wise training loss (`--loss_type`, docs/kohya-compat.md#loss-and-loss-weights):
//! squared error, absolute error, or the pseudo-Huber losses with a per-sample threshold from
//! `--huber_schedule`.

use candle_core::Tensor;

use super::schedule::{NoiseSchedule, TRAIN_TIMESTEPS};
use crate::{Error, Result};

/// Which element-wise loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// `(p - y)^2` (the default).
    L2,
    /// `|p - y|`.
    L1,
    /// `2c (sqrt((p - y)^2 + c^2) - c)`.
    Huber,
    /// `2 (sqrt((p - y)^2 + c^2) - c)`.
    SmoothL1,
}

/// How the Huber threshold `c` depends on the timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HuberSchedule {
    /// `c = huber_c * huber_scale`.
    Constant,
    /// `c = exp(t ln(huber_c) / 1000) * huber_scale`.
    Exponential,
    /// `c = (1 - huber_c) / (1 + sigma_t)^2 + huber_c`, `sigma_t = sqrt((1 - abar_t) / abar_t)`.
    Snr,
}

/// The loss options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossFunction {
    /// Element-wise loss.
    pub kind: LossType,
    /// Threshold schedule of the Huber losses.
    pub schedule: HuberSchedule,
    /// `--huber_c`.
    pub huber_c: f32,
    /// `--huber_scale`.
    pub huber_scale: f32,
}

impl Default for LossFunction {
    /// sd-scripts' defaults: squared error (`l2`, `snr`, 0.1, 1.0).
    fn default() -> Self {
        Self {
            kind: LossType::L2,
            schedule: HuberSchedule::Snr,
            huber_c: 0.1,
            huber_scale: 1.0,
        }
    }
}

impl LossFunction {
    /// Parses `--loss_type`, `--huber_schedule`, `--huber_c` and `--huber_scale`.
    pub fn parse(kind: &str, schedule: &str, huber_c: f64, huber_scale: f64) -> Result<Self> {
        let kind = match kind {
            "l2" => LossType::L2,
            "l1" => LossType::L1,
            "huber" => LossType::Huber,
            "smooth_l1" => LossType::SmoothL1,
            other => {
                return Err(Error::Usage(format!(
                    "--loss_type {other}: use l2, l1, huber or smooth_l1"
                )))
            }
        };
        let schedule = match schedule {
            "constant" => HuberSchedule::Constant,
            "exponential" => HuberSchedule::Exponential,
            "snr" => HuberSchedule::Snr,
            other => {
                return Err(Error::Usage(format!(
                    "--huber_schedule {other}: use constant, exponential or snr"
                )))
            }
        };
        if !(huber_c > 0.0 && huber_c <= 1.0) {
            return Err(Error::Usage(format!(
                "--huber_c {huber_c}: must be above 0 and at most 1"
            )));
        }
        Ok(Self {
            kind,
            schedule,
            huber_c: huber_c as f32,
            huber_scale: huber_scale as f32,
        })
    }

    /// The Huber threshold for timestep `t`.
    pub fn threshold(&self, noise: &NoiseSchedule, t: usize) -> f32 {
        match self.schedule {
            HuberSchedule::Constant => self.huber_c * self.huber_scale,
            HuberSchedule::Exponential => {
                let rate = -self.huber_c.ln() / TRAIN_TIMESTEPS as f32;
                (-rate * t as f32).exp() * self.huber_scale
            }
            HuberSchedule::Snr => {
                let abar = noise.alphas_cumprod[t];
                let sigma = ((1.0 - abar) / abar).sqrt();
                (1.0 - self.huber_c) / (1.0 + sigma).powi(2) + self.huber_c
            }
        }
    }

    /// The element-wise loss of `pred` against `target` (`[B, ...]`, f32) for the samples'
    /// `timesteps`.
    pub fn elementwise(
        &self,
        pred: &Tensor,
        target: &Tensor,
        noise: &NoiseSchedule,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let diff = (pred - target)?;
        let loss = match self.kind {
            LossType::L2 => diff.sqr()?,
            LossType::L1 => diff.abs()?,
            LossType::Huber | LossType::SmoothL1 => {
                let thresholds: Vec<f32> = timesteps
                    .iter()
                    .map(|&t| self.threshold(noise, t))
                    .collect();
                let mut shape = vec![1; diff.rank()];
                shape[0] = thresholds.len();
                let c = Tensor::from_vec(thresholds, shape, diff.device())?;
                let root = diff.sqr()?.broadcast_add(&c.sqr()?)?.sqrt()?;
                let excess = root.broadcast_sub(&c)?;
                match self.kind {
                    LossType::Huber => (excess.broadcast_mul(&c)? * 2.0)?,
                    _ => (excess * 2.0)?,
                }
            }
        };
        Ok(loss)
    }
}

/// The logged `loss_average`, as sd-scripts' `loss/average`: during the first epoch the mean of
/// every micro-batch loss so far; afterwards a window with one slot per micro-batch of an epoch,
/// each holding the latest loss of that micro-batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossAverage {
    /// The window's slots.
    pub slots: Vec<f32>,
}

impl LossAverage {
    /// Records the loss of micro-batch `batch` (0-based) of 1-based `epoch`.
    pub fn record(&mut self, epoch: usize, batch: usize, loss: f32) {
        if epoch <= 1 {
            self.slots.push(loss);
            return;
        }
        if self.slots.len() <= batch {
            self.slots.resize(batch + 1, 0.0);
        }
        self.slots[batch] = loss;
    }

    /// The current average (NaN before any loss).
    pub fn value(&self) -> f32 {
        self.slots.iter().sum::<f32>() / self.slots.len() as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn loss_of(kind: &str, schedule: &str, pred: f32, target: f32, t: usize) -> f32 {
        let noise = NoiseSchedule::scaled_linear(false);
        let function = LossFunction::parse(kind, schedule, 0.1, 2.0).unwrap();
        let p = Tensor::new(&[[pred]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[target]], &Device::Cpu).unwrap();
        let loss = function.elementwise(&p, &y, &noise, &[t]).unwrap();
        loss.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn losses_follow_the_spec_formulas() {
        assert!((loss_of("l2", "snr", 1.5, 0.5, 10) - 1.0).abs() < 1e-6);
        assert!((loss_of("l1", "snr", -1.5, 0.5, 10) - 2.0).abs() < 1e-6);
        // Constant threshold c = 0.1 * 2.0.
        let c = 0.2f32;
        let huber = 2.0 * c * ((1.0f32 + c * c).sqrt() - c);
        assert!((loss_of("huber", "constant", 1.0, 0.0, 500) - huber).abs() < 1e-6);
        let smooth = 2.0 * ((1.0f32 + c * c).sqrt() - c);
        assert!((loss_of("smooth_l1", "constant", 1.0, 0.0, 500) - smooth).abs() < 1e-6);
    }

    #[test]
    fn loss_average_is_cumulative_in_epoch_one_then_a_window() {
        let mut average = LossAverage::default();
        for (batch, loss) in [1.0, 2.0, 3.0].into_iter().enumerate() {
            average.record(1, batch, loss);
        }
        assert_eq!(average.value(), 2.0);
        average.record(2, 0, 4.0);
        assert_eq!(average.value(), 3.0, "slot 0 replaced: (4 + 2 + 3) / 3");
        average.record(2, 1, 5.0);
        assert_eq!(average.slots, vec![4.0, 5.0, 3.0]);
    }

    #[test]
    fn huber_thresholds_follow_their_schedules() {
        let noise = NoiseSchedule::scaled_linear(false);
        let exponential = LossFunction::parse("huber", "exponential", 0.1, 1.0).unwrap();
        assert!((exponential.threshold(&noise, 0) - 1.0).abs() < 1e-6);
        assert!((exponential.threshold(&noise, 1000) - 0.1).abs() < 1e-6);
        let snr = LossFunction::parse("huber", "snr", 0.1, 5.0).unwrap();
        // Low noise: sigma near 0, c near 1; high noise: c near huber_c; scale not applied.
        assert!(snr.threshold(&noise, 0) > 0.9);
        assert!((snr.threshold(&noise, 999) - 0.1).abs() < 0.01);
        let abar = noise.alphas_cumprod[400];
        let sigma = ((1.0 - abar) / abar).sqrt();
        let expected = 0.9 / (1.0 + sigma).powi(2) + 0.1;
        assert_eq!(snr.threshold(&noise, 400), expected);
        assert!(LossFunction::parse("huber", "snr", 0.0, 1.0).is_err());
        assert!(LossFunction::parse("mse", "snr", 0.1, 1.0).is_err());
    }
}
