//! Helpers shared by the unit tests: the fixture folder, tensor comparisons and gradients, and
//! flag parsing.

use std::path::PathBuf;

use candle_core::{Tensor, Var};

/// The bundled fixtures (`tests/fixtures` at the repository root).
pub(crate) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Largest absolute elementwise difference between `a` and `b`.
pub(crate) fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// [`max_difference`] relative to the largest magnitude of `reference`.
pub(crate) fn relative_difference(ours: &Tensor, reference: &Tensor) -> f32 {
    let peak = reference.abs().unwrap().max_all().unwrap();
    max_difference(ours, reference) / peak.to_scalar::<f32>().unwrap()
}

/// The gradients with respect to `inputs` of `sum(y * weights)`: a loss that weights every
/// output differently, so each position's gradient counts.
pub(crate) fn weighted_sum_gradients<const N: usize>(
    y: &Tensor,
    weights: &Tensor,
    inputs: [&Var; N],
) -> [Tensor; N] {
    let grads = (y * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    inputs.map(|input| grads.get(input.as_tensor()).unwrap().clone())
}

/// A tool's flag struct parsed from its program name and positional arguments (`leading`)
/// followed by `flags`, as its binary parses them.
pub(crate) fn parse_flags<A: clap::Args>(leading: &[&str], flags: &[&str]) -> A {
    #[derive(clap::Parser)]
    struct Command<A: clap::Args> {
        #[command(flatten)]
        tool: A,
    }
    let argv = leading.iter().chain(flags);
    <Command<A> as clap::Parser>::try_parse_from(argv)
        .unwrap()
        .tool
}
