//! bitsandbytes' optimizers (`AdamW8bit`, `PagedAdamW*`, `Lion8bit`, `SGD8bit`) as its CUDA
//! kernels compute them (`csrc/kernels.cu`): float32 arithmetic, weight decay after the Adam
//! step, and for tensors of at least `min_8bit_size` values both states kept in blockwise
//! dynamic 8-bit codes, dequantised, updated and quantised again at every step. Smaller tensors
//! keep float32 states (`kOptimizer32bit*State`). "Paged" only places states in GPU memory.

use candle_core::{DType, Device, Tensor};

use super::quant::{self, Quantized};

/// The update rule of a bitsandbytes optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// `"adam"`: AdamW with decoupled weight decay.
    Adam,
    /// `"lion"`.
    Lion,
    /// `"momentum"`: SGD with heavy-ball momentum (`SGD8bit`; no Nesterov term).
    Momentum,
}

/// Hyper-parameters of a bitsandbytes optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Update rule.
    pub rule: Rule,
    /// First beta (Adam, Lion) or momentum (SGD).
    pub beta1: f64,
    /// Second beta (Adam, Lion).
    pub beta2: f64,
    /// Denominator epsilon (Adam).
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// 8-bit states (`*8bit`, or `optim_bits=8`).
    pub eight_bit: bool,
    /// Tensors with fewer values keep float32 states.
    pub min_8bit_size: usize,
}

impl Config {
    /// Whether a tensor of `len` values keeps quantised states.
    pub fn quantizes(&self, len: usize) -> bool {
        self.eight_bit && len >= self.min_8bit_size
    }

    /// Number of moment tensors.
    fn moments(&self) -> usize {
        match self.rule {
            Rule::Adam => 2,
            Rule::Lion | Rule::Momentum => 1,
        }
    }

    /// Bytes of state kept for a tensor of `len` values.
    pub fn state_bytes(&self, len: usize) -> u64 {
        let per_moment = if self.quantizes(len) {
            len + 4 * len.div_ceil(quant::BLOCK)
        } else {
            4 * len
        };
        (self.moments() * per_moment) as u64
    }
}

/// One moment of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Moment {
    /// float32 values.
    Full(Vec<f32>),
    /// 8-bit codes with their block scales.
    Quantized(Quantized),
}

/// The state of one tensor: its moments (state1, and state2 for Adam).
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// `state1` (and `state2`).
    pub moments: Vec<Moment>,
}

/// `sgn` of the kernels: 0 for 0.
fn sgn(x: f32) -> f32 {
    f32::from(u8::from(0.0 < x)) - f32::from(u8::from(x < 0.0))
}

impl State {
    /// Zero state for a tensor of `len` values.
    pub fn new(config: &Config, len: usize) -> Self {
        let moment = || {
            if config.quantizes(len) {
                Moment::Quantized(Quantized::zeros(len))
            } else {
                Moment::Full(vec![0.0; len])
            }
        };
        Self {
            moments: (0..config.moments()).map(|_| moment()).collect(),
        }
    }

    /// One update of `param` with `grad` at 1-based `step` and learning rate `lr`.
    pub fn update(
        &mut self,
        config: &Config,
        param: &mut [f32],
        grad: &[f32],
        step: usize,
        lr: f64,
    ) {
        let maps = [quant::signed_map(), quant::unsigned_map()];
        // Dequantised (or float32) moments.
        let mut values: Vec<Vec<f32>> = (self.moments.iter().enumerate())
            .map(|(k, moment)| match moment {
                Moment::Full(v) => v.clone(),
                Moment::Quantized(q) => (0..param.len()).map(|i| q.value(maps[k], i)).collect(),
            })
            .collect();
        let quantized = matches!(self.moments[0], Moment::Quantized(_));
        let (beta1, beta2) = (config.beta1 as f32, config.beta2 as f32);
        let (eps, lr, decay) = (config.eps as f32, lr as f32, config.weight_decay as f32);
        match config.rule {
            Rule::Adam => {
                let correction1 = 1.0 - beta1.powf(step as f32);
                let correction2 = (1.0 - beta2.powf(step as f32)).sqrt();
                let step_size = -lr * correction2 / correction1;
                let (first, second) = values.split_at_mut(1);
                let (m, v) = (&mut first[0], &mut second[0]);
                for i in 0..param.len() {
                    let g = grad[i];
                    if quantized && !g.is_finite() {
                        m[i] = 0.0;
                        v[i] = 0.0;
                        continue;
                    }
                    // The 8-bit kernel multiplies (1 - beta2) by g, then by g; the 32-bit one by g * g.
                    v[i] = if quantized {
                        v[i] * beta2 + (1.0 - beta2) * g * g
                    } else {
                        v[i] * beta2 + (1.0 - beta2) * (g * g)
                    };
                    m[i] = m[i] * beta1 + (1.0 - beta1) * g;
                    param[i] += step_size * (m[i] / (v[i].sqrt() + correction2 * eps));
                    if decay > 0.0 {
                        param[i] *= 1.0 - lr * decay;
                    }
                }
            }
            Rule::Lion => {
                let m = &mut values[0];
                for i in 0..param.len() {
                    let g = grad[i];
                    if decay > 0.0 {
                        param[i] *= 1.0 - lr * decay;
                    }
                    param[i] -= lr * sgn(m[i] * beta1 + (1.0 - beta1) * g);
                    m[i] = m[i] * beta2 + (1.0 - beta2) * g;
                }
            }
            Rule::Momentum => {
                let m = &mut values[0];
                for i in 0..param.len() {
                    let mut g = grad[i];
                    if decay > 0.0 {
                        g += param[i] * decay;
                    }
                    m[i] = if step == 1 { g } else { m[i] * beta1 + g };
                    param[i] -= lr * m[i];
                }
            }
        }
        for (k, (moment, new)) in self.moments.iter_mut().zip(values).enumerate() {
            *moment = match moment {
                Moment::Full(_) => Moment::Full(new),
                Moment::Quantized(_) => Moment::Quantized(Quantized::encode(&new, maps[k], k == 0)),
            };
        }
    }

    /// The state as named tensors, bitsandbytes' names with the tensor's index
    /// (`state1.3`, `absmax1.3`, ...).
    pub fn tensors(&self, index: usize) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (k, moment) in self.moments.iter().enumerate() {
            let n = k + 1;
            match moment {
                Moment::Full(v) => out.push((
                    format!("state{n}.{index}"),
                    Tensor::from_slice(v, v.len(), &Device::Cpu)?,
                )),
                Moment::Quantized(q) => {
                    out.push((
                        format!("state{n}.{index}"),
                        Tensor::from_slice(&q.codes, q.codes.len(), &Device::Cpu)?,
                    ));
                    out.push((
                        format!("absmax{n}.{index}"),
                        Tensor::from_slice(&q.absmax, q.absmax.len(), &Device::Cpu)?,
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Restores the state written by [`State::tensors`]; `Err` names what is missing or wrong.
    pub fn restore(
        &mut self,
        index: usize,
        saved: &std::collections::HashMap<String, Tensor>,
    ) -> Result<(), String> {
        let get = |name: String, dtype: DType, len: usize| -> Result<Tensor, String> {
            let tensor = saved
                .get(&name)
                .ok_or_else(|| format!("{name} is missing (different optimizer?)"))?;
            if tensor.dtype() != dtype || tensor.elem_count() != len {
                return Err(format!(
                    "{name} is {:?} with {} values, this run keeps {dtype:?} with {len}",
                    tensor.dtype(),
                    tensor.elem_count()
                ));
            }
            Ok(tensor.clone())
        };
        for (k, moment) in self.moments.iter_mut().enumerate() {
            let n = k + 1;
            match moment {
                Moment::Full(v) => {
                    let t = get(format!("state{n}.{index}"), DType::F32, v.len())?;
                    *v = t.to_vec1::<f32>().map_err(|e| e.to_string())?;
                }
                Moment::Quantized(q) => {
                    let codes = get(format!("state{n}.{index}"), DType::U8, q.codes.len())?;
                    let absmax = get(format!("absmax{n}.{index}"), DType::F32, q.absmax.len())?;
                    q.codes = codes.to_vec1::<u8>().map_err(|e| e.to_string())?;
                    q.absmax = absmax.to_vec1::<f32>().map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }
}
