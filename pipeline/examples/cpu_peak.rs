//! The machine's ceilings for float32 inference: the fused multiply-add peak and the memory read
//! bandwidth, on every core at once. `bench/inference.sh` runs it first, so that the per-item
//! figures can be read against what the CPU can do at most.
//!
//! `cargo run --release -p lorakit-pipeline --example cpu_peak [-- THREADS]`
//!
//! Prints one JSON line: `{"threads", "fma_gflops", "read_gbytes_per_s"}`. The FMA figure comes
//! from independent chains of 512-bit (AVX-512F) or 256-bit (AVX2 FMA) multiply-adds held in
//! registers, the best of 5 runs of about 0.4 s; the bandwidth figure from summing a 1 GiB
//! buffer split over the threads, the best of 5 passes.

use std::time::Instant;

type Failure = Box<dyn std::error::Error>;

/// Multiply-add rounds per run and thread; each round is 12 independent vector FMAs.
const ROUNDS: usize = 20_000_000;

fn main() -> Result<(), Failure> {
    let threads = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => std::thread::available_parallelism()?.get(),
    };
    let (lanes, kernel) = fma_kernel().ok_or("this CPU has neither AVX-512F nor AVX2 with FMA")?;
    let flops_per_thread = (ROUNDS * 12 * lanes * 2) as f64;
    let fma_gflops = best_of(5, || {
        let start = Instant::now();
        std::thread::scope(|scope| {
            let runs: Vec<_> = (0..threads)
                .map(|t| scope.spawn(move || kernel(1.0 + t as f32 * 1e-7)))
                .collect();
            let sums: f32 = runs.into_iter().map(|r| r.join().unwrap_or(0.0)).sum();
            std::hint::black_box(sums);
        });
        flops_per_thread * threads as f64 / start.elapsed().as_secs_f64() / 1e9
    });

    let buffer: Vec<f32> = (0..(1usize << 28)).map(|i| (i % 7) as f32).collect();
    let chunk = buffer.len().div_ceil(threads);
    let read_gbytes_per_s = best_of(5, || {
        let start = Instant::now();
        std::thread::scope(|scope| {
            let runs: Vec<_> = (buffer.chunks(chunk))
                .map(|part| scope.spawn(move || sum_lanes(part)))
                .collect();
            let sums: f32 = runs.into_iter().map(|r| r.join().unwrap_or(0.0)).sum();
            std::hint::black_box(sums);
        });
        (buffer.len() * 4) as f64 / start.elapsed().as_secs_f64() / 1e9
    });
    println!(
        "{{\"threads\": {threads}, \"fma_gflops\": {fma_gflops:.1}, \
         \"read_gbytes_per_s\": {read_gbytes_per_s:.1}}}"
    );
    Ok(())
}

/// The highest of `runs` measurements.
fn best_of(runs: usize, mut measure: impl FnMut() -> f64) -> f64 {
    (0..runs).map(|_| measure()).fold(0.0, f64::max)
}

/// A sum in 16 independent lanes, which the compiler vectorises into full-width loads.
fn sum_lanes(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    for block in values.chunks_exact(16) {
        for (lane, v) in lanes.iter_mut().zip(block) {
            *lane += v;
        }
    }
    lanes.iter().sum()
}

/// The widest FMA kernel this CPU runs, with its float32 lanes per instruction.
fn fma_kernel() -> Option<(usize, fn(f32) -> f32)> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return Some((16, |seed| unsafe { fma_avx512(seed) }));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return Some((8, |seed| unsafe { fma_avx2(seed) }));
        }
    }
    None
}

/// `ROUNDS` rounds of 12 independent 512-bit multiply-add chains.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let scale = _mm512_set1_ps(0.999_999);
    let step = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(seed); 12];
    for _ in 0..ROUNDS {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, scale, step);
        }
    }
    let total = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
    _mm512_reduce_add_ps(total)
}

/// `ROUNDS` rounds of 12 independent 256-bit multiply-add chains.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let scale = _mm256_set1_ps(0.999_999);
    let step = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(seed); 12];
    for _ in 0..ROUNDS {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, scale, step);
        }
    }
    let mut lanes = [0f32; 8];
    let total = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
    _mm256_storeu_ps(lanes.as_mut_ptr(), total);
    lanes.iter().sum()
}
