//! Central finite-difference checks of candle gradients, for this crate's tests and for anyone
//! adding a differentiable op.

use candle_core::{DType, Device, Result, Tensor, Var, bail};

/// A deterministic pseudo-random `f64` tensor with values in [−1, 1) (splitmix64 of `seed`).
pub fn seeded_tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    let len: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let values: Vec<f64> = (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Checks the gradient of `f` at `x` (an `f64` tensor) against central finite differences.
///
/// `f` may return any shape; it is reduced to a scalar with fixed pseudo-random weights so that
/// every output element matters. At most `max_coords` input elements, spread evenly over `x`,
/// are perturbed (by 1e-6 · max(1, |x_i|)). Fails when `|analytic − numeric| > tol · max(|numeric|, g)` for any
/// of them, where `g` is the largest analytic gradient magnitude over all of `x` (so that tiny
/// gradients are checked relative to their own scale, not to 1). Returns the largest such
/// relative error.
pub fn check_input_gradient_at(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
    tol: f64,
    max_coords: usize,
) -> Result<f64> {
    if x.dtype() != DType::F64 {
        bail!(
            "finite-difference checks need f64 inputs, got {:?}",
            x.dtype()
        );
    }
    let probe = f(x)?;
    let weights = seeded_tensor(probe.dims(), 99)?;
    let scalar = |y: Tensor| -> Result<f64> { scalar_tensor(y, &weights)?.to_scalar::<f64>() };

    let var = Var::from_tensor(x)?;
    let grads = scalar_tensor(f(var.as_tensor())?, &weights)?.backward()?;
    let analytic = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
        None => vec![0.0; x.elem_count()],
    };

    let scale = analytic.iter().fold(0f64, |m, g| m.max(g.abs()));
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let step = (base.len() / max_coords.max(1)).max(1);
    let mut worst = 0f64;
    for i in (0..base.len()).step_by(step) {
        // A step relative to the value keeps rounding error small next to the difference.
        let eps = 1e-6 * base[i].abs().max(1.0);
        let eval = |delta: f64| -> Result<f64> {
            let mut shifted = base.clone();
            shifted[i] += delta;
            scalar(f(&Tensor::from_vec(shifted, x.dims(), x.device())?)?)
        };
        let numeric = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
        let denominator = numeric.abs().max(scale);
        let difference = (analytic[i] - numeric).abs();
        let error = if denominator > 0.0 {
            difference / denominator
        } else {
            difference
        };
        worst = worst.max(error);
        if error.is_nan() || error > tol {
            bail!(
                "gradient mismatch at element {i}: analytic {} vs finite difference {numeric}",
                analytic[i]
            );
        }
    }
    Ok(worst)
}

/// [`check_input_gradient_at`] on every element of a small `x`.
pub fn check_input_gradient(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
    tol: f64,
) -> Result<()> {
    check_input_gradient_at(x, f, tol, usize::MAX).map(|_| ())
}

fn scalar_tensor(y: Tensor, weights: &Tensor) -> Result<Tensor> {
    (y * weights)?.sum_all()
}
