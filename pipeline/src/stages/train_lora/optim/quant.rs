//! bitsandbytes' blockwise dynamic 8-bit quantisation of optimizer states: the 256-value
//! dynamic map (`functional.create_dynamic_map`, signed for first moments, unsigned for second
//! moments), blocks of 256 values each scaled by its largest magnitude, and the CUDA kernels'
//! nearest-code search (`quantize_2D` in `csrc/kernels.cu`).

use std::sync::OnceLock;

/// Values per block (`blocksize = 256` of bitsandbytes' blockwise optimizers).
pub const BLOCK: usize = 256;

/// `create_dynamic_map(signed)`: 7 exponent ranges `10^-6 .. 10^0`, each holding the means of
/// an evenly spaced float32 `linspace(0.1, 1, ...)`, plus 0 and 1, sorted.
fn create_dynamic_map(signed: bool) -> [f32; 256] {
    // Python floats, multiplied with the float32 means as a float32 tensor.
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, decade) in DECADES.iter().enumerate() {
        let items = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let bounds = linspace_f32(0.1, 1.0, items);
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(*decade as f32 * mean);
            if signed {
                data.push(-(*decade as f32) * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("256 values")
}

/// `torch.linspace(start, end, steps, dtype=float32)` as its CPU kernel computes it: the first
/// half from `start`, the second half back from `end`, each value one fused multiply-add (the
/// compiled kernel's rounding; separate rounding differs in the last bit of some values).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// The signed dynamic map (first moments).
pub fn signed_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| create_dynamic_map(true))
}

/// The unsigned dynamic map (second moments).
pub fn unsigned_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| create_dynamic_map(false))
}

/// The code of `x` (already divided by its block's absmax) as `quantize_2D<SIGNED>` finds it:
/// a 7-step binary search from code 127, then the nearer of the last two bracketing codes by
/// their midpoint (the bounds start at -1 or 0 and 1, not at the map's ends).
pub fn quantize(map: &[f32; 256], signed: bool, x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = if signed { -1.0f32 } else { 0.0 };
    let mut upper = 1.0f32;
    let mut val = map[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = map[pivot];
        step >>= 1;
    }
    let code = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    code as u8
}

/// A signed state's code, moved one step towards the value's side when the nearest code has
/// the other sign (the kernels keep the sign of every first moment).
pub fn quantize_signed(map: &[f32; 256], value: f32, absmax: f32) -> u8 {
    let code = quantize(map, true, value / absmax);
    if map[code as usize].is_sign_negative() != value.is_sign_negative() {
        if value > 0.0 {
            code.wrapping_add(1)
        } else {
            code.wrapping_sub(1)
        }
    } else {
        code
    }
}

/// Largest magnitude of each block of `values`.
pub fn block_absmax(values: &[f32]) -> Vec<f32> {
    values
        .chunks(BLOCK)
        .map(|block| block.iter().fold(f32::MIN, |m, v| m.max(v.abs())))
        .collect()
}

/// Quantised values: one code per value, one absmax per block of [`BLOCK`].
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Codes into the dynamic map.
    pub codes: Vec<u8>,
    /// Scale of each block.
    pub absmax: Vec<f32>,
}

impl Quantized {
    /// All zeros (every code 0, every scale 0), as bitsandbytes initialises its states.
    pub fn zeros(len: usize) -> Self {
        Self {
            codes: vec![0; len],
            absmax: vec![0.0; len.div_ceil(BLOCK)],
        }
    }

    /// The value of element `i`.
    pub fn value(&self, map: &[f32; 256], i: usize) -> f32 {
        map[self.codes[i] as usize] * self.absmax[i / BLOCK]
    }

    /// Quantises `values` with each block's absmax, as the optimizer kernels store their states.
    pub fn encode(values: &[f32], map: &[f32; 256], signed: bool) -> Self {
        let absmax = block_absmax(values);
        let codes = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let scale = absmax[i / BLOCK];
                if scale == 0.0 {
                    // 0/0 is a positive NaN on the GPU: code 0, then the sign fix for a
                    // signed state. Every value of the block reads back as 0 either way.
                    if signed {
                        255
                    } else {
                        0
                    }
                } else if signed {
                    quantize_signed(map, v, scale)
                } else {
                    quantize(map, false, v / scale)
                }
            })
            .collect();
        Self { codes, absmax }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sorted_and_span_zero_to_one() {
        for (map, low) in [(signed_map(), -1.0f32), (unsigned_map(), 0.0)] {
            assert!(map.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(map[255], 1.0);
            assert!((map[0] - low).abs() < 0.01, "{}", map[0]);
            assert!(map.contains(&0.0));
        }
    }

    #[test]
    fn every_code_quantises_to_itself_and_midpoints_split_neighbours() {
        for (map, signed) in [(signed_map(), true), (unsigned_map(), false)] {
            for code in 0..256usize {
                // Duplicate values (the unsigned map's leading zeros) may find the other copy.
                let found = quantize(map, signed, map[code]) as usize;
                assert_eq!(map[found], map[code], "code {code}");
            }
            for code in 1..255usize {
                let (a, b) = (map[code], map[code + 1]);
                if a == b {
                    continue;
                }
                let below = a + (b - a) * 0.25;
                let above = a + (b - a) * 0.75;
                assert_eq!(map[quantize(map, signed, below) as usize], a);
                assert_eq!(map[quantize(map, signed, above) as usize], b);
            }
        }
    }

    #[test]
    fn signed_codes_keep_the_sign_and_round_trips_stay_within_half_a_step() {
        let values: Vec<f32> = (0..700)
            .map(|i| ((i as f32 * 0.37).sin() * 1e-3) * if i % 7 == 0 { 1e-4 } else { 1.0 })
            .collect();
        let q = Quantized::encode(&values, signed_map(), true);
        assert_eq!(q.absmax.len(), 3);
        for (i, &v) in values.iter().enumerate() {
            let back = q.value(signed_map(), i);
            if v != 0.0 {
                assert_eq!(back.is_sign_negative(), v.is_sign_negative(), "{i}");
            }
            // The coarsest step of the map near 1 is 0.9/64: half of it bounds the error.
            assert!(
                (back - v).abs() <= q.absmax[i / BLOCK] * 0.0071,
                "{i}: {v} -> {back}"
            );
        }
    }
}
