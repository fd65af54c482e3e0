//! The device-generic path of every custom op ([`super::kernel_choice`]) against its CPU kernel:
//! the same outputs and the same gradients of a weighted sum for every differentiable input.
//! The kernels run on f32 CPU tensors; the generic path runs forced on the CPU, or on the
//! device `LORAKIT_TEST_DEVICE` names (`cuda` in a `--features candle-cuda` build, as
//! `bench/gpu-check.sh` runs it), in f32 and, where the op takes it, bf16 activations or weights.
//! The LoRA'd layers are checked with these helpers in `networks::lora::device_parity`.

use candle_core::{DType, Device, Tensor, Var};

use super::attention::{attention, causal_multi_head_attention, multi_head_attention, Products};
use super::conv::Conv2d;
use super::frozen::{FrozenKind, FrozenOp};
use super::geglu::geglu;
use super::kernel_choice::with_generic_ops;
use super::norm::Norm;
use super::recompute::{backward, checkpointed, Recomputable};
use super::trainable_conv;
use crate::infra::test_support::relative_difference;

/// An op under test: its inputs (variables on one device) to its output.
pub(crate) type Op<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// The device the generic paths are checked on: `LORAKIT_TEST_DEVICE=cuda` (a build with
/// `--features candle-cuda`), else the CPU.
fn test_device() -> Device {
    match std::env::var("LORAKIT_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect(
            "LORAKIT_TEST_DEVICE=cuda needs a CUDA device and a build with --features candle-cuda",
        ),
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("LORAKIT_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

/// A random f32 CPU tensor.
pub(crate) fn random(shape: &[usize], std: f32) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
}

/// `t` on `device` in `dtype`.
pub(crate) fn moved(t: &Tensor, device: &Device, dtype: DType) -> Tensor {
    t.to_device(device).unwrap().to_dtype(dtype).unwrap()
}

/// `t` as an f32 CPU tensor.
fn on_cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// The output of `op` on `inputs` (moved to `device`, in `dtype`, each a variable) and the
/// gradients of `sum(output · loss_weights)` for every input, as f32 CPU tensors. The backward
/// pass is [`backward`], so checkpointed blocks report their variables too.
fn output_and_gradients(
    op: Op,
    inputs: &[Tensor],
    loss_weights: Option<&Tensor>,
    device: &Device,
    dtype: DType,
) -> (Tensor, Vec<Tensor>) {
    let variables: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&moved(t, device, dtype)).unwrap())
        .collect();
    let tensors: Vec<Tensor> = variables.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&tensors).unwrap();
    let Some(loss_weights) = loss_weights else {
        return (on_cpu(&y), Vec::new());
    };
    let loss = (y.to_dtype(DType::F32).unwrap() * loss_weights.to_device(device).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = backward(&loss).unwrap();
    let gradients = variables
        .iter()
        .map(|v| {
            on_cpu(
                grads
                    .get(v.as_tensor())
                    .expect("every input gets a gradient"),
            )
        })
        .collect();
    (on_cpu(&y), gradients)
}

/// Asserts that `op` on the generic path (on [`test_device`], inputs in `dtype`) gives the
/// output and input gradients of its CPU kernel on f32 inputs, within `tolerance` relative to
/// the largest magnitude; `differentiable`: whether gradients are compared too. Both sides get
/// the inputs rounded to `dtype`, so a narrow dtype is charged only for its arithmetic.
pub(crate) fn assert_generic_matches_kernels(
    case: &str,
    inputs: &[Tensor],
    dtype: DType,
    tolerance: f32,
    differentiable: bool,
    op: Op,
) {
    let inputs: Vec<Tensor> = inputs
        .iter()
        .map(|t| on_cpu(&t.to_dtype(dtype).unwrap()))
        .collect();
    let inputs = inputs.as_slice();
    let (probe, _) = output_and_gradients(op, inputs, None, &Device::Cpu, DType::F32);
    let loss_weights = differentiable.then(|| random(probe.dims(), 1.0));
    let (kernel_y, kernel_grads) =
        output_and_gradients(op, inputs, loss_weights.as_ref(), &Device::Cpu, DType::F32);
    let device = test_device();
    let (generic_y, generic_grads) = with_generic_ops(|| {
        output_and_gradients(op, inputs, loss_weights.as_ref(), &device, dtype)
    });
    let case = format!("{case} {dtype:?} on {device:?}");
    assert_eq!(generic_y.dims(), kernel_y.dims(), "{case}");
    let off = relative_difference(&generic_y, &kernel_y);
    assert!(off <= tolerance, "{case}: output off by {off}");
    for (n, (generic, kernel)) in generic_grads.iter().zip(&kernel_grads).enumerate() {
        assert_eq!(generic.dims(), kernel.dims(), "{case}: gradient {n}");
        let off = relative_difference(generic, kernel);
        assert!(
            off <= tolerance,
            "{case}: gradient of input {n} off by {off}"
        );
    }
}

/// f32: within float rounding.
pub(crate) const F32_TOLERANCE: f32 = 1e-5;

/// f32 inputs against a frozen weight of `weight_dtype`: within float rounding, except where
/// the CPU kernels multiply a bf16 weight in bfloat16 ([`crate::models::bf16_products`]): there
/// the kernels round the activations and output gradients to 8 mantissa bits (about 4e-3 per
/// value) and the generic path does not.
pub(crate) fn f32_tolerance(weight_dtype: DType) -> f32 {
    let rounded = weight_dtype == DType::BF16 && crate::models::bf16_products::available();
    if rounded {
        1e-2
    } else {
        F32_TOLERANCE
    }
}
/// bf16 activations against the f32 kernels on the same bf16-rounded inputs: every product and
/// sum rounded to 8 mantissa bits (the worst of five runs: 1.7e-2, GroupNorm + SiLU gradients);
/// a wrong index or layout is off by order 1.
pub(crate) const BF16_TOLERANCE: f32 = 3e-2;

#[test]
fn frozen_layers_match_on_the_generic_path() {
    let convolutions = [(3, 1, 1, 9, 7), (3, 2, 1, 9, 9), (1, 1, 0, 5, 6)];
    for weight_dtype in [DType::F32, DType::BF16] {
        let weight = moved(&random(&[70, 64], 0.3), &Device::Cpu, weight_dtype);
        let bias = random(&[70], 1.0);
        let linear = |t: &[Tensor]| {
            let device = t[0].device();
            let op = FrozenOp::new(
                weight.to_device(device)?,
                Some(bias.to_device(device)?.to_dtype(t[0].dtype())?),
                FrozenKind::Linear,
            );
            op.forward(&t[0])
        };
        let x = [random(&[2, 3, 64], 1.0)];
        let case = format!("linear, {weight_dtype:?} weight");
        let tolerance = f32_tolerance(weight_dtype);
        assert_generic_matches_kernels(&case, &x, DType::F32, tolerance, true, &linear);
        assert_generic_matches_kernels(&case, &x, DType::BF16, BF16_TOLERANCE, true, &linear);

        for (k, stride, padding, h, w) in convolutions {
            let weight = moved(&random(&[6, 5, k, k], 0.3), &Device::Cpu, weight_dtype);
            let bias = random(&[6], 1.0);
            let conv = |t: &[Tensor]| {
                let device = t[0].device();
                let kind = FrozenKind::Conv2d { stride, padding };
                let bias = bias.to_device(device)?.to_dtype(t[0].dtype())?;
                FrozenOp::new(weight.to_device(device)?, Some(bias), kind).forward(&t[0])
            };
            let case = format!("conv k{k} s{stride} p{padding}, {weight_dtype:?} weight");
            let x = [random(&[2, 5, h, w], 1.0)];
            assert_generic_matches_kernels(&case, &x, DType::F32, tolerance, true, &conv);
        }
    }
}

#[test]
fn trainable_convolution_matches_on_the_generic_path() {
    for (stride, padding) in [(1, 1), (2, 1)] {
        let conv = |t: &[Tensor]| trainable_conv::conv2d(&t[0], &t[1], stride, padding);
        let inputs = [random(&[2, 5, 9, 9], 1.0), random(&[4, 5, 3, 3], 0.3)];
        let case = format!("trainable conv s{stride} p{padding}");
        assert_generic_matches_kernels(&case, &inputs, DType::F32, F32_TOLERANCE, true, &conv);
    }
}

#[test]
fn inference_convolution_matches_on_the_generic_path() {
    // The VAE's convolution: Winograd for 3x3 stride 1 on the CPU, im2col otherwise.
    for (k, stride, padding) in [(3, 1, 1), (3, 2, 0), (1, 1, 0)] {
        let weight = random(&[6, 5, k, k], 0.3);
        let bias = random(&[6], 1.0);
        let conv = |t: &[Tensor]| {
            let device = t[0].device();
            let layer = Conv2d::new(
                weight.to_device(device)?,
                bias.to_device(device)?,
                stride,
                padding,
            )?;
            candle_core::Module::forward(&layer, &t[0])
        };
        let case = format!("VAE conv k{k} s{stride} p{padding}");
        let x = [random(&[1, 5, 9, 9], 1.0)];
        assert_generic_matches_kernels(&case, &x, DType::F32, F32_TOLERANCE, false, &conv);
    }
}

#[test]
fn attention_matches_on_the_generic_path() {
    // Long enough for several chunks of the CPU kernel; cross-attention with another value
    // width; token-major multi-head attention.
    for (groups, queries, keys, depth, value_depth) in [(2, 1500, 200, 8, 8), (2, 40, 7, 5, 3)] {
        let scale = 1.0 / (depth as f64).sqrt();
        let op = |t: &[Tensor]| attention(&t[0], &t[1], &t[2], scale);
        let inputs = [
            random(&[groups, queries, depth], 1.0),
            random(&[groups, keys, depth], 1.0),
            random(&[groups, keys, value_depth], 1.0),
        ];
        let case = format!("attention {groups}x{queries}x{keys}");
        assert_generic_matches_kernels(&case, &inputs, DType::F32, F32_TOLERANCE, true, &op);
        assert_generic_matches_kernels(&case, &inputs, DType::BF16, BF16_TOLERANCE, true, &op);
    }
    let heads = 4;
    let op = |t: &[Tensor]| multi_head_attention(&t[0], &t[1], &t[2], heads, 0.25, Products::F32);
    let inputs = [
        random(&[2, 50, 32], 1.0),
        random(&[2, 9, 32], 1.0),
        random(&[2, 9, 24], 1.0),
    ];
    assert_generic_matches_kernels("multi-head", &inputs, DType::F32, F32_TOLERANCE, true, &op);
    let causal = |t: &[Tensor]| causal_multi_head_attention(&t[0], &t[1], &t[2], heads, 0.25);
    let self_attention = [
        random(&[2, 600, 32], 1.0),
        random(&[2, 600, 32], 1.0),
        random(&[2, 600, 32], 1.0),
    ];
    let case = "causal multi-head";
    assert_generic_matches_kernels(
        case,
        &self_attention,
        DType::F32,
        F32_TOLERANCE,
        true,
        &causal,
    );
    assert_generic_matches_kernels(
        "multi-head",
        &inputs,
        DType::BF16,
        BF16_TOLERANCE,
        true,
        &op,
    );
}

#[test]
fn norms_and_geglu_match_on_the_generic_path() {
    let (weight, bias) = (random(&[8], 1.0), random(&[8], 1.0));
    let norm = |t: &Tensor| -> candle_core::Result<Norm> {
        let device = t.device();
        Ok(Norm::new(
            weight.to_device(device)?,
            bias.to_device(device)?,
            1e-5,
        ))
    };
    let group = |t: &[Tensor]| norm(&t[0])?.group(4, &t[0]);
    let group_silu = |t: &[Tensor]| norm(&t[0])?.group_silu(4, &t[0]);
    let layer = |t: &[Tensor]| norm(&t[0])?.layer(&t[0]);
    let image = [random(&[2, 8, 5, 6], 2.0)];
    let tokens = [random(&[2, 7, 8], 2.0)];
    let cases: [(&str, &[Tensor], Op); 4] = [
        ("group norm", &image, &group),
        ("group norm + SiLU", &image, &group_silu),
        ("layer norm", &tokens, &layer),
        ("GEGLU", &tokens, &|t: &[Tensor]| geglu(&t[0])),
    ];
    for (case, inputs, op) in cases {
        assert_generic_matches_kernels(case, inputs, DType::F32, F32_TOLERANCE, true, op);
        assert_generic_matches_kernels(case, inputs, DType::BF16, BF16_TOLERANCE, true, op);
    }
}

/// A block with a trainable weight: `silu(x W) + condition`.
#[derive(Clone)]
struct ToyBlock {
    weight: Tensor,
}

impl Recomputable for ToyBlock {
    fn run(&self, x: &Tensor, condition: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.weight)?
            .silu()?
            .broadcast_add(condition)
    }
}

#[test]
fn checkpointed_blocks_match_on_every_device() {
    // Inputs: x, the condition and the block's weight (a variable inside the block, whose
    // gradient comes from the recomputation). Reference: the block run without checkpointing.
    let inputs = [
        random(&[2, 5, 6], 1.0),
        random(&[2, 1, 4], 1.0),
        random(&[6, 4], 0.5),
    ];
    let block = |t: &[Tensor]| {
        let block = ToyBlock {
            weight: t[2].clone(),
        };
        if super::kernel_choice::cpu_kernels(t[0].device()) {
            block.run(&t[0], &t[1])
        } else {
            checkpointed(&block, &t[0], &t[1])
        }
    };
    assert_generic_matches_kernels(
        "checkpointed",
        &inputs,
        DType::F32,
        F32_TOLERANCE,
        true,
        &block,
    );
}
