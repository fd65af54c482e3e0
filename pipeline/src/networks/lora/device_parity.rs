//! The LoRA'd layers on the device-generic path against the CPU kernels (the fused low-rank op
//! of `models::low_rank`, the trainable convolution of a conv LoRA), with the helpers of
//! `models::device_parity`.

use candle_core::{DType, Device, Tensor, Var};

use super::{Alpha, LoraModule};
use crate::models::adapter::{AdaptableLayer, Container};
use crate::models::device_parity::{assert_generic_matches_kernels, f32_tolerance, moved, random};
use crate::models::frozen::FrozenKind;

#[test]
fn lora_layers_match_on_the_generic_path() {
    // The fused low-rank op (linear and pointwise layers) against the frozen op plus the
    // composed branch that every other device runs, and a 3x3 conv LoRA whose down-projection
    // is the trainable convolution. Inputs: x, lora_down, lora_up.
    // Shapes: the frozen weight, x, lora_down, lora_up.
    let pointwise = FrozenKind::Conv2d {
        stride: 1,
        padding: 0,
    };
    let strided = FrozenKind::Conv2d {
        stride: 2,
        padding: 1,
    };
    let cases: [(&str, FrozenKind, [&[usize]; 4]); 3] = [
        (
            "linear",
            FrozenKind::Linear,
            [&[12, 10], &[2, 3, 10], &[4, 10], &[12, 4]],
        ),
        (
            "pointwise conv",
            pointwise,
            [&[6, 5, 1, 1], &[2, 5, 3, 4], &[2, 5, 1, 1], &[6, 2, 1, 1]],
        ),
        (
            "3x3 conv",
            strided,
            [&[6, 5, 3, 3], &[2, 5, 7, 7], &[2, 5, 3, 3], &[6, 2, 1, 1]],
        ),
    ];
    for (name, kind, [weight_shape, x_shape, down_shape, up_shape]) in cases {
        for weight_dtype in [DType::F32, DType::BF16] {
            let weight = moved(&random(weight_shape, 0.3), &Device::Cpu, weight_dtype);
            let bias = random(&weight_shape[..1], 1.0);
            let layer = |t: &[Tensor]| {
                let device = t[0].device();
                let mut layer = AdaptableLayer::new(
                    "layer".into(),
                    Container::Transformer,
                    weight.to_device(device)?,
                    Some(bias.to_device(device)?.to_dtype(t[0].dtype())?),
                    kind,
                );
                layer.adapter = Some(Box::new(LoraModule {
                    name: "lora_unet_layer".into(),
                    down: Var::from_tensor(&t[1])?,
                    up: Var::from_tensor(&t[2])?,
                    alpha: Alpha::Float(1.5),
                    multiplier: 1.0,
                    dropout: None,
                }));
                layer.forward(&t[0])
            };
            let inputs = [
                random(x_shape, 1.0),
                random(down_shape, 0.3),
                random(up_shape, 0.3),
            ];
            let case = format!("{name} LoRA, {weight_dtype:?} weight");
            let tolerance = f32_tolerance(weight_dtype);
            assert_generic_matches_kernels(&case, &inputs, DType::F32, tolerance, true, &layer);
        }
    }
}
