//! `--mixed_precision`: the dtype a model runs in, parsed once for every tool.

use candle_core::DType;

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

    /// The dtype the model runs in.
    pub fn dtype(self) -> DType {
        match self {
            MixedPrecision::No => DType::F32,
            MixedPrecision::Fp16 => DType::F16,
            MixedPrecision::Bf16 => DType::BF16,
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
}
