//! `--mixed_precision`: the dtypes a model is kept and computed in, parsed once for every tool.
//!
//! On the CPU, half precision is a storage format: frozen weights are kept in float16 or bfloat16
//! (half the memory) and widened to float32 one layer at a time inside the kernels, while
//! activations, gradients and trainable parameters stay float32. candle's CPU backend has no fast
//! half-precision matrix product (and none at all for bfloat16), so computing in the half dtype
//! would be many times slower or fail. The one exception: on CPUs with AVX512-BF16, products with
//! bfloat16 and float8 weights round their f32 operand to bfloat16 and sum in f32
//! ([`super::bf16_products`]), as PyTorch's autocast does. On CUDA the half dtype is also the
//! compute dtype.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// sd-scripts' `--mixed_precision` (`no`, `fp16`, `bf16`; `fp32` is accepted for `no`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixedPrecision {
    /// float32 throughout.
    No,
    /// float16.
    Fp16,
    /// bfloat16.
    Bf16,
}

impl MixedPrecision {
    /// Parses the flag value.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "no" | "fp32" => Ok(MixedPrecision::No),
            "fp16" => Ok(MixedPrecision::Fp16),
            "bf16" => Ok(MixedPrecision::Bf16),
            other => Err(Error::Usage(format!(
                "--mixed_precision {other}: use no, fp16 or bf16"
            ))),
        }
    }

    /// The flag value (`no`, `fp16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Fp16 => "fp16",
            MixedPrecision::Bf16 => "bf16",
        }
    }

    /// The dtype's short name (`fp32`, `fp16`, `bf16`).
    pub fn dtype_name(self) -> &'static str {
        match self {
            MixedPrecision::No => "fp32",
            other => other.name(),
        }
    }

    /// The dtype frozen weights are stored in.
    pub fn dtype(self) -> DType {
        match self {
            MixedPrecision::No => DType::F32,
            MixedPrecision::Fp16 => DType::F16,
            MixedPrecision::Bf16 => DType::BF16,
        }
    }

    /// The dtype activations are computed in on `device`: float32 on the CPU, the stored dtype
    /// on CUDA.
    pub fn compute_dtype(self, device: &Device) -> DType {
        if device.is_cpu() {
            DType::F32
        } else {
            self.dtype()
        }
    }
}

/// The dtypes of a frozen model on one device: how its large weights are stored and what its
/// activations (and small parameters: biases, norms) are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrecision {
    /// Linear and convolution weights.
    pub weights: DType,
    /// Activations, biases and norm parameters.
    pub compute: DType,
}

impl ModelPrecision {
    /// `--mixed_precision` on `device`, with `--fp8_base` storing the weights as float8 e4m3.
    pub fn new(mixed: MixedPrecision, fp8_base: bool, device: &Device) -> Self {
        ModelPrecision {
            weights: if fp8_base {
                DType::F8E4M3
            } else {
                mixed.dtype()
            },
            compute: mixed.compute_dtype(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_names_the_alternatives() {
        for (text, expected) in [
            ("no", MixedPrecision::No),
            ("fp32", MixedPrecision::No),
            ("fp16", MixedPrecision::Fp16),
            ("bf16", MixedPrecision::Bf16),
        ] {
            assert_eq!(MixedPrecision::parse(text).unwrap(), expected);
        }
        let message = MixedPrecision::parse("fp8").unwrap_err().to_string();
        assert!(
            message.contains("fp8") && message.contains("bf16"),
            "{message}"
        );
        assert_eq!(MixedPrecision::No.dtype_name(), "fp32");
        assert_eq!(MixedPrecision::Bf16.dtype(), DType::BF16);
    }

    #[test]
    fn half_precision_on_the_cpu_stores_half_and_computes_f32() {
        let cpu = ModelPrecision::new(MixedPrecision::Bf16, false, &Device::Cpu);
        assert_eq!((cpu.weights, cpu.compute), (DType::BF16, DType::F32));
        let fp8 = ModelPrecision::new(MixedPrecision::Fp16, true, &Device::Cpu);
        assert_eq!((fp8.weights, fp8.compute), (DType::F8E4M3, DType::F32));
        let fp32 = ModelPrecision::new(MixedPrecision::No, false, &Device::Cpu);
        assert_eq!((fp32.weights, fp32.compute), (DType::F32, DType::F32));
    }
}
