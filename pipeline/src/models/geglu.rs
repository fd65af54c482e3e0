//! GEGLU, the gated activation of the UNet's feed-forward layers: the projection's last dimension
//! splits into halves `[h, g]` and the result is `h · gelu(g)` (erf form).
//!
//! As elementary candle ops the graph keeps `gelu(g)` as well as the product until the backward
//! pass; as one op it keeps only the projection, and the backward pass recomputes the gate.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use super::frozen::dense;
use super::kernel_choice::cpu_kernels;
use super::kernels::{
    f32_elements, gated_gelu_erf_gradient_rows, gated_gelu_erf_rows, with_f32_slice,
};

/// `h · gelu(g)` for `projected = [h, g]` split on the last dimension.
pub fn geglu(projected: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_kernels(projected.device()) && projected.dtype() == DType::F32 {
        // A graph node only when the input carries a gradient.
        dense(projected)?.apply_op1(Geglu)
    } else {
        let (hidden, gate) = halves(projected)?;
        hidden * gate.gelu_erf()?
    }
}

/// The two halves of the last dimension.
fn halves(projected: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let half = projected.dim(D::Minus1)? / 2;
    Ok((
        projected.narrow(D::Minus1, 0, half)?,
        projected.narrow(D::Minus1, half, half)?,
    ))
}

#[derive(Debug, Clone, Copy)]
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some(projected) = f32_elements(storage, layout) else {
            candle_core::bail!("geglu: expected a contiguous f32 input")
        };
        let mut dims = layout.dims().to_vec();
        let Some(width) = dims.last_mut() else {
            candle_core::bail!("geglu: expected an input with a last dimension")
        };
        let rows = gated_gelu_erf_rows(projected, *width);
        *width /= 2;
        Ok((CpuStorage::F32(rows), Shape::from(dims)))
    }

    /// `d hidden = dy · gelu(g)`, `d g = dy · h · gelu'(g)` with
    /// `gelu'(g) = Φ(g) + g φ(g)` (normal CDF and density).
    fn bwd(
        &self,
        projected: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if projected.dtype() == DType::F32 && cpu_kernels(projected.device()) {
            let width = projected.dim(D::Minus1)?;
            let rows = with_f32_slice(projected, |projected| {
                with_f32_slice(grad, |grad| {
                    gated_gelu_erf_gradient_rows(projected, grad, width)
                })
            })??;
            return Ok(Some(Tensor::from_vec(
                rows,
                projected.shape(),
                projected.device(),
            )?));
        }
        let (hidden, gate) = halves(&projected.detach())?;
        let grad = grad.detach();
        let cdf = ((gate.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
        let density = (gate.sqr()? * -0.5)?
            .exp()?
            .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
        let gelu = (&gate * &cdf)?;
        let derivative = (cdf + (&gate * density)?)?;
        let hidden_grad = (&grad * gelu)?;
        let gate_grad = ((grad * hidden)? * derivative)?;
        Ok(Some(Tensor::cat(&[hidden_grad, gate_grad], D::Minus1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::test_support::{relative_difference, weighted_sum_gradients};
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_elementary_ops_with_gradients() {
        let device = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.5, (2, 5, 8), &device).unwrap() - 0.2).unwrap();
        let ours_input = Var::from_tensor(&x).unwrap();
        let reference_input = Var::from_tensor(&x).unwrap();
        let ours = geglu(ours_input.as_tensor()).unwrap();
        let (hidden, gate) = halves(reference_input.as_tensor()).unwrap();
        let reference = (hidden * gate.gelu_erf().unwrap()).unwrap();
        assert_eq!(ours.dims(), &[2, 5, 4]);
        assert!(relative_difference(&ours, &reference) < 1e-6);
        // Without a graph the op gives the same values and no node.
        let plain = geglu(&x).unwrap();
        assert!(!plain.track_op());
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&plain), values(&ours));
        let weights = Tensor::randn(0f32, 1.0, ours.shape(), &device).unwrap();
        let [ours_grad] = weighted_sum_gradients(&ours, &weights, [&ours_input]);
        let [reference_grad] = weighted_sum_gradients(&reference, &weights, [&reference_input]);
        let off = relative_difference(&ours_grad, &reference_grad);
        assert!(off < 1e-5, "gradient off by {off}");
    }
}
