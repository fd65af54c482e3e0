//! SVD and QR for the LoRA tools, through nalgebra (in f64).

use nalgebra::DMatrix;

/// A thin SVD `A = U · diag(s) · Vt` with the singular values in descending order.
#[derive(Debug, Clone)]
pub struct Svd {
    /// `m x k` left singular vectors.
    pub u: DMatrix<f64>,
    /// `k` singular values, descending.
    pub s: Vec<f64>,
    /// `k x n` right singular vectors (rows).
    pub vt: DMatrix<f64>,
}

/// A row-major `rows x cols` f32 buffer as an f64 matrix.
pub fn matrix(rows: usize, cols: usize, data: &[f32]) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |r, c| data[r * cols + c] as f64)
}

/// Row-major f32 values of `m`.
pub fn to_row_major(m: &DMatrix<f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.len());
    for r in 0..m.nrows() {
        for c in 0..m.ncols() {
            out.push(m[(r, c)] as f32);
        }
    }
    out
}

/// Thin SVD of `a`, singular values sorted descending.
pub fn svd(a: DMatrix<f64>) -> Svd {
    let (rows, cols) = a.shape();
    if rows == 0 || cols == 0 {
        return Svd {
            u: DMatrix::zeros(rows, 0),
            s: Vec::new(),
            vt: DMatrix::zeros(0, cols),
        };
    }
    let svd = a.svd(true, true);
    let u = svd.u.expect("U requested");
    let vt = svd.v_t.expect("V^T requested");
    let values: Vec<f64> = svd.singular_values.iter().copied().collect();
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    Svd {
        u: u.select_columns(order.iter()),
        s: order.iter().map(|&i| values[i]).collect(),
        vt: vt.select_rows(order.iter()),
    }
}

/// SVD of the product `up · down` (`up`: `m x r`, `down`: `r x n`) without forming it: QR of
/// both factors, then the SVD of the small `R_up · R_downᵀ`. The singular values beyond
/// `min(m, n, r)` are exactly zero and not returned.
pub fn product_svd(up: DMatrix<f64>, down: DMatrix<f64>) -> Svd {
    let qr_up = up.qr();
    let qr_down = down.transpose().qr();
    let (q_up, r_up) = (qr_up.q(), qr_up.r());
    let (q_down, r_down) = (qr_down.q(), qr_down.r());
    let small = &r_up * r_down.transpose();
    let inner = svd(small);
    Svd {
        u: q_up * inner.u,
        s: inner.s,
        vt: inner.vt * q_down.transpose(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconstruct(svd: &Svd) -> DMatrix<f64> {
        let k = svd.s.len();
        let s = DMatrix::from_fn(k, k, |r, c| if r == c { svd.s[r] } else { 0.0 });
        &svd.u * s * &svd.vt
    }

    #[test]
    fn svd_reconstructs_and_sorts() {
        let a = DMatrix::from_fn(5, 7, |r, c| ((r * 7 + c) as f64 * 0.37).sin());
        let svd = svd(a.clone());
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
        assert!((reconstruct(&svd) - a).abs().max() < 1e-10);
    }

    #[test]
    fn product_svd_matches_full_svd() {
        let up = DMatrix::from_fn(6, 3, |r, c| ((r * 3 + c) as f64 * 0.91).cos());
        let down = DMatrix::from_fn(3, 9, |r, c| ((r * 9 + c) as f64 * 0.53).sin());
        let full = svd(&up * &down);
        let fast = product_svd(up.clone(), down.clone());
        for (a, b) in fast.s.iter().zip(&full.s) {
            assert!((a - b).abs() < 1e-10);
        }
        assert!((reconstruct(&fast) - &up * &down).abs().max() < 1e-10);
    }
}
