//! The optimizers against their reference packages (golden/optimizers, made by
//! tests/fixtures/generate/optimizers.py; tolerances in tests/fixtures/README.md): parameters
//! after every step, the 8-bit states, Adafactor's own learning rate, the `d` of Prodigy and
//! the D-adaptation optimizers, and `ss_optimizer`; plus exact save/restore of every
//! optimizer's state.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use lorakit_pipeline::formats::npz::NpzReader;
use lorakit_pipeline::stages::train_lora::optim::{quant, Optimizer, OptimizerKind};

use crate::support::fixtures;

struct Golden {
    npz: NpzReader,
    document: serde_json::Value,
}

impl Golden {
    fn open() -> Self {
        let dir = fixtures().join("golden/optimizers");
        Self {
            npz: NpzReader::open(&dir.join("steps.npz")).unwrap(),
            document: serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap())
                .unwrap(),
        }
    }

    fn shapes(&self) -> Vec<Vec<usize>> {
        serde_json::from_value(self.document["shapes"].clone()).unwrap()
    }

    fn steps(&self) -> usize {
        self.document["steps"].as_u64().unwrap() as usize
    }

    fn array(&mut self, name: &str) -> Vec<f32> {
        self.npz.read_f32(name).unwrap().0
    }

    fn cases(&self) -> Vec<serde_json::Value> {
        self.document["cases"].as_array().unwrap().clone()
    }
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    (value.as_array().unwrap().iter())
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn numbers(value: &serde_json::Value) -> Vec<f64> {
    (value.as_array().unwrap().iter())
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// A case's optimizer over the golden's starting tensors.
fn optimizer_for(golden: &mut Golden, case: &serde_json::Value) -> Optimizer {
    let kind = OptimizerKind::parse(
        case["optimizer_type"].as_str().unwrap(),
        &strings(&case["optimizer_args"]),
    )
    .unwrap();
    let vars: Vec<Var> = (golden.shapes().iter().enumerate())
        .map(|(j, shape)| {
            let values = golden.array(&format!("init__p{j}"));
            Var::from_tensor(&Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap()
        })
        .collect();
    let factors = vec![1.0; vars.len()];
    Optimizer::new(kind, vars, factors).unwrap()
}

fn grads_of_step(golden: &mut Golden, k: usize) -> Vec<Option<Tensor>> {
    (golden.shapes().iter().enumerate())
        .map(|(j, shape)| {
            let values = golden.array(&format!("grad__s{k}__p{j}"));
            Some(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap())
        })
        .collect()
}

fn values(var: &Var) -> Vec<f32> {
    var.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Largest difference relative to the largest magnitude of `theirs`.
fn relative_gap(ours: &[f32], theirs: &[f32]) -> f64 {
    let scale = theirs.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let gap = (ours.iter().zip(theirs))
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    gap / scale.max(f64::MIN_POSITIVE)
}

/// How far apart two runs moved a tensor from `init`: the largest difference of the moves,
/// less 4 float32 steps of the largest value (the rounding of `init + move`), relative to the
/// largest move of `theirs`. The learning-rate-free optimizers move values by 1e-6 in the
/// golden's 4 steps, which [`relative_gap`]'s 1e-6 of the largest value cannot resolve.
fn displacement_gap(ours: &[f32], theirs: &[f32], init: &[f32]) -> f64 {
    let scale = theirs.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let rounding = 4.0 * scale * f64::from(f32::EPSILON);
    let moved = (theirs.iter().zip(init))
        .map(|(t, i)| f64::from(t - i).abs())
        .fold(0.0, f64::max);
    let gap = (ours.iter().zip(theirs))
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    (gap - rounding).max(0.0) / moved.max(f64::MIN_POSITIVE)
}

/// What one case's run gave: parameters per step and tensor, `own_lr` and `d` per step.
struct Run {
    params: Vec<Vec<Vec<f32>>>,
    own_lrs: Vec<f64>,
    estimates: Vec<f64>,
    optimizer: Optimizer,
}

fn run(golden: &mut Golden, case: &serde_json::Value) -> Run {
    let mut optimizer = optimizer_for(golden, case);
    let lrs = numbers(&case["lrs"]);
    let mut params = Vec::new();
    let mut own_lrs = Vec::new();
    let mut estimates = Vec::new();
    for (k, lr) in lrs.iter().enumerate().take(golden.steps()) {
        let grads = grads_of_step(golden, k);
        optimizer.step(&grads, *lr, 0.0).unwrap();
        params.push(optimizer.vars().iter().map(values).collect());
        own_lrs.extend(optimizer.own_lr());
        let state = optimizer.state_tensors().unwrap();
        if let Some((_, d)) = state.iter().find(|(name, _)| name == "dadapt.d") {
            estimates.push(d.to_vec1::<f64>().unwrap()[0]);
        }
    }
    Run {
        params,
        own_lrs,
        estimates,
        optimizer,
    }
}

#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let mut golden = Golden::open();
    for (ours, name) in [
        (quant::signed_map(), "qmap_signed"),
        (quant::unsigned_map(), "qmap_unsigned"),
    ] {
        let theirs = golden.array(name);
        let same = ours
            .iter()
            .zip(&theirs)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: ours {ours:?}\ntheirs {theirs:?}");
    }
}

#[test]
fn every_case_writes_ss_optimizer_as_sd_scripts() {
    let golden = Golden::open();
    for case in golden.cases() {
        let kind = OptimizerKind::parse(
            case["optimizer_type"].as_str().unwrap(),
            &strings(&case["optimizer_args"]),
        )
        .unwrap();
        assert_eq!(kind.description(), case["ss_optimizer"].as_str().unwrap());
    }
}

/// bitsandbytes' optimizers follow the CUDA kernels (the generator's float32 port) step by
/// step to 1e-6 and store the same 8-bit codes and block scales; against the package's CPU
/// backend (another quantiser, coarse for small values) within the summed learning rates.
#[test]
fn bitsandbytes_optimizers_follow_the_cuda_kernels() {
    let mut golden = Golden::open();
    let mut checked = 0;
    for case in golden.cases() {
        let name = case["name"].as_str().unwrap().to_string();
        if case.get("port_vs_package_max_abs").is_none() {
            continue;
        }
        let result = run(&mut golden, &case);
        let lrs = numbers(&case["lrs"]);
        for (k, step) in result.params.iter().enumerate() {
            for (j, ours) in step.iter().enumerate() {
                let port = golden.array(&format!("{name}__port__s{k}__p{j}"));
                let gap = relative_gap(ours, &port);
                assert!(
                    gap <= 1e-6,
                    "{name} step {k} tensor {j}: {gap:e} from the port"
                );
                let package = golden.array(&format!("{name}__s{k}__p{j}"));
                let worst = (ours.iter().zip(&package))
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .fold(0.0, f64::max);
                let limit = lrs.iter().sum::<f64>();
                assert!(
                    worst <= limit,
                    "{name} step {k} tensor {j}: {worst:e} from bitsandbytes"
                );
            }
        }
        let state: HashMap<String, Tensor> = result
            .optimizer
            .state_tensors()
            .unwrap()
            .into_iter()
            .collect();
        for j in 0..golden.shapes().len() {
            for m in 1..=2 {
                let codes_name = format!("{name}__port__codes{m}__p{j}");
                if !golden.npz.contains(&codes_name) {
                    continue;
                }
                let theirs = golden.npz.read_u8(&codes_name).unwrap().0;
                let ours = state[&format!("state{m}.{j}")].to_vec1::<u8>().unwrap();
                assert_eq!(ours, theirs, "{name} state{m} of tensor {j}");
                let absmax = golden.array(&format!("{name}__port__absmax{m}__p{j}"));
                let ours = state[&format!("absmax{m}.{j}")].to_vec1::<f32>().unwrap();
                assert!(
                    relative_gap(&ours, &absmax) <= 1e-6,
                    "{name} absmax{m} of {j}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "{checked} quantised states compared");
}

/// torch's SGD and AdamW, lion-pytorch's Lion, transformers' Adafactor, prodigyopt's Prodigy and
/// dadaptation's seven optimizers: parameters after every step to 1e-6 of each tensor's largest
/// value and their moves from the start to 1e-3 of the largest move (beyond float32 rounding),
/// Adafactor's own learning rate and D-adaptation's `d` to 1e-6 relative.
#[test]
fn float32_optimizers_step_as_their_packages() {
    let mut golden = Golden::open();
    let mut checked = 0;
    for case in golden.cases() {
        let name = case["name"].as_str().unwrap().to_string();
        if case.get("port_vs_package_max_abs").is_some() {
            continue;
        }
        let result = run(&mut golden, &case);
        for (k, step) in result.params.iter().enumerate() {
            for (j, ours) in step.iter().enumerate() {
                let theirs = golden.array(&format!("{name}__s{k}__p{j}"));
                let gap = relative_gap(ours, &theirs);
                assert!(gap <= 1e-6, "{name} step {k} tensor {j}: {gap:e}");
                let gap = displacement_gap(ours, &theirs, &golden.array(&format!("init__p{j}")));
                assert!(
                    gap <= 1e-3,
                    "{name} step {k} tensor {j}: moved {gap:e} apart"
                );
            }
        }
        if let Some(expected) = case.get("own_lrs") {
            let expected = numbers(expected);
            assert_eq!(result.own_lrs.len(), expected.len(), "{name}");
            for (a, b) in result.own_lrs.iter().zip(&expected) {
                assert!((a - b).abs() <= 1e-6 * b.abs(), "{name}: lr {a} vs {b}");
            }
        }
        if let Some(expected) = case.get("d") {
            let expected = numbers(expected);
            assert_eq!(result.estimates.len(), expected.len(), "{name}");
            for (a, b) in result.estimates.iter().zip(&expected) {
                assert!((a - b).abs() <= 1e-6 * b.abs(), "{name}: d {a} vs {b}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 25, "{checked} cases");
}

/// Saving the state half-way and restoring it into a fresh optimizer continues bit for bit,
/// for every optimizer of the golden.
#[test]
fn restored_states_continue_bit_for_bit() {
    let mut golden = Golden::open();
    for case in golden.cases() {
        let name = case["name"].as_str().unwrap().to_string();
        let lrs = numbers(&case["lrs"]);
        let straight = run(&mut golden, &case);
        let mut first = optimizer_for(&mut golden, &case);
        let half = golden.steps() / 2;
        for (k, lr) in lrs.iter().enumerate().take(half) {
            first
                .step(&grads_of_step(&mut golden, k), *lr, 0.0)
                .unwrap();
        }
        let saved: HashMap<String, Tensor> = first.state_tensors().unwrap().into_iter().collect();
        let mut second = optimizer_for(&mut golden, &case);
        for (var, from) in second.vars().iter().zip(first.vars()) {
            var.set(from.as_tensor()).unwrap();
        }
        second.restore_state(&saved).unwrap();
        second.steps = first.steps.clone();
        for (k, lr) in lrs.iter().enumerate().take(golden.steps()).skip(half) {
            second
                .step(&grads_of_step(&mut golden, k), *lr, 0.0)
                .unwrap();
        }
        for (j, var) in second.vars().iter().enumerate() {
            assert_eq!(
                values(var),
                straight.params[golden.steps() - 1][j],
                "{name} tensor {j}"
            );
        }
    }
}
