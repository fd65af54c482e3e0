//! DDPM noise schedule and loss weights (docs/kohya-compat.md#noise-schedule,
//! docs/kohya-compat.md#loss-and-loss-weights).

/// Number of DDPM training timesteps.
pub const TRAIN_TIMESTEPS: usize = 1000;

/// The scaled-linear DDPM schedule in float32, as sd-scripts builds it.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// `beta_t`.
    pub betas: Vec<f32>,
    /// `abar_t = prod alpha_s`.
    pub alphas_cumprod: Vec<f32>,
    /// `abar / (1 - abar)` of the schedule *before* a zero-terminal-SNR fix (sd-scripts quirk).
    pub all_snr: Vec<f32>,
}

impl NoiseSchedule {
    /// `beta_start 0.00085`, `beta_end 0.012`, "scaled_linear", 1000 steps; optionally with
    /// `--zero_terminal_snr` applied (the SNR table keeps the unfixed values).
    pub fn scaled_linear(zero_terminal_snr: bool) -> Self {
        let (start, end) = (0.00085f32.sqrt(), 0.012f32.sqrt());
        let last = (TRAIN_TIMESTEPS - 1) as f32;
        let betas: Vec<f32> = (0..TRAIN_TIMESTEPS)
            .map(|t| {
                let step = (end - start) / last;
                let root = if t < TRAIN_TIMESTEPS / 2 {
                    start + step * t as f32
                } else {
                    end - step * (last - t as f32)
                };
                root * root
            })
            .collect();
        let alphas_cumprod = cumulative_product(&betas);
        let all_snr = alphas_cumprod.iter().map(|&a| a / (1.0 - a)).collect();
        let mut schedule = Self {
            betas,
            alphas_cumprod,
            all_snr,
        };
        if zero_terminal_snr {
            schedule.enforce_zero_terminal_snr();
        }
        schedule
    }

    /// Rescales `sqrt(abar)` so the last value is 0 and the first unchanged, then recomputes betas.
    fn enforce_zero_terminal_snr(&mut self) {
        let roots: Vec<f32> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let (first, last) = (roots[0], roots[TRAIN_TIMESTEPS - 1]);
        let scale = first / (first - last);
        let fixed: Vec<f32> = roots
            .iter()
            .map(|s| {
                let scaled = (s - last) * scale;
                scaled * scaled
            })
            .collect();
        let mut betas = Vec::with_capacity(TRAIN_TIMESTEPS);
        betas.push(1.0 - fixed[0]);
        for t in 1..TRAIN_TIMESTEPS {
            betas.push(1.0 - fixed[t] / fixed[t - 1]);
        }
        self.betas = betas;
        self.alphas_cumprod = cumulative_product(&self.betas);
    }

    /// `(sqrt(abar_t), sqrt(1 - abar_t))` for `x_t = a x0 + b eps` and `v = a eps - b x0`.
    pub fn coefficients(&self, t: usize) -> (f32, f32) {
        let abar = self.alphas_cumprod[t];
        (abar.sqrt(), (1.0 - abar).sqrt())
    }
}

fn cumulative_product(betas: &[f32]) -> Vec<f32> {
    let mut running = 1.0f32;
    betas
        .iter()
        .map(|b| {
            running *= 1.0 - b;
            running
        })
        .collect()
}

/// Per-sample loss weighting options (docs/kohya-compat.md#loss-and-loss-weights), applied in
/// this order.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossWeighting {
    /// `--min_snr_gamma`.
    pub min_snr_gamma: Option<f32>,
    /// `--scale_v_pred_loss_like_noise_pred`.
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// `--v_pred_like_loss`.
    pub v_pred_like_loss: Option<f32>,
    /// `--debiased_estimation_loss`.
    pub debiased_estimation: bool,
    /// `--v_parameterization`.
    pub v_prediction: bool,
}

impl LossWeighting {
    /// Multiplier of a sample's mean loss at timestep `t`.
    pub fn weight(&self, snr_table: &[f32], t: usize) -> f32 {
        let snr = snr_table[t];
        let clipped = snr.min(1000.0);
        let mut w = 1.0f32;
        if let Some(gamma) = self.min_snr_gamma {
            w *= if self.v_prediction {
                snr.min(gamma) / (snr + 1.0)
            } else {
                snr.min(gamma) / snr
            };
        }
        if self.scale_v_pred_loss_like_noise_pred {
            w *= clipped / (clipped + 1.0);
        }
        if let Some(k) = self.v_pred_like_loss {
            w += w / (clipped / (clipped + 1.0)) * k;
        }
        if self.debiased_estimation {
            w *= if self.v_prediction {
                1.0 / (clipped + 1.0)
            } else {
                1.0 / clipped.sqrt()
            };
        }
        w
    }
}
