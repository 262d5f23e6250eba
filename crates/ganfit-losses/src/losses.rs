//! GANFIT's loss terms (Gecer et al. 2019, eqs. 4–8): identity and content losses on the
//! outputs of [`FaceRecognitionNet`](crate::identity::FaceRecognitionNet), the masked pixel loss,
//! the landmark loss and the Gaussian prior on model coefficients.
//!
//! Each returns one loss per render, `[B]`. The photo side may have batch 1 and is then compared
//! with every render (the usual case: one photo, the render R and the frontal render R̂).

use candle_core::{D, Tensor};

use crate::{LossError, Result};

/// Keeps norms and square roots away from zero, where their gradient is infinite.
const EPS: f64 = 1e-12;

/// Identity loss `1 − cos(e_photo, e_render)` of `[B, 128]` descriptors (photo batch 1 or B).
pub fn identity_loss(photo: &Tensor, render: &Tensor) -> Result<Tensor> {
    check_pair("identity loss descriptors", photo, render, 2)?;
    let dot = photo.broadcast_mul(render)?.sum(D::Minus1)?;
    let norm =
        |t: &Tensor| -> candle_core::Result<Tensor> { (t.sqr()?.sum(D::Minus1)? + EPS)?.sqrt() };
    let cos = dot.broadcast_div(&norm(photo)?.broadcast_mul(&norm(render)?)?)?;
    Ok(cos.affine(-1.0, 1.0)?)
}

/// Content loss `Σ_j ‖F_j(photo) − F_j(render)‖₂ / (H_j·W_j·C_j)` over matching `[B, C, H, W]`
/// feature maps (e.g. [`FaceFeatures::maps`](crate::identity::FaceFeatures::maps), or a subset
/// of them).
pub fn content_loss(photo: &[Tensor], render: &[Tensor]) -> Result<Tensor> {
    if photo.len() != render.len() || photo.is_empty() {
        return Err(LossError::InputShape {
            what: "content loss feature maps",
            expected: format!(
                "the same non-zero number of maps on both sides ({})",
                photo.len()
            ),
            actual: vec![render.len()],
        });
    }
    let mut total: Option<Tensor> = None;
    for (p, r) in photo.iter().zip(render) {
        check_pair("content loss feature map", p, r, 4)?;
        let size: usize = r.dims()[1..].iter().product();
        let diff = r.broadcast_sub(p)?;
        let dist = (diff.sqr()?.flatten_from(1)?.sum(1)? + EPS)?.sqrt()?;
        let term = (dist / size as f64)?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    Ok(total.expect("at least one map"))
}

/// Pixel loss: the masked mean over pixels of the RGB distance `‖render − photo‖₂`.
///
/// `render` is `[B, H, W, 3]`, `photo` `[B or 1, H, W, 3]` and `mask` `[B, H, W, 1]`, weights in
/// [0, 1] (e.g. the renderer's coverage times a skin mask). Returns `[B]`:
/// `Σ_p m_p ‖d_p‖ / max(Σ_p m_p, 1)`, where `‖d_p‖ = sqrt(Σ_c d_pc² + ε)`. The per-pixel norm
/// (not its square) makes the term robust to outliers like an L2,1 norm, as in GANFIT. The
/// denominator's floor of one pixel's weight makes an empty mask give 0 and keeps the mask's
/// gradient bounded when coverage is almost empty. Gradients flow to `render`, `photo` and `mask`.
pub fn pixel_loss(render: &Tensor, photo: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let r = render.dims();
    if r.len() != 4 || r[3] != 3 {
        return Err(LossError::InputShape {
            what: "pixel loss render",
            expected: "[B, H, W, 3]".into(),
            actual: r.to_vec(),
        });
    }
    check_pair("pixel loss photo", photo, render, 4)?;
    if mask.dims() != [r[0], r[1], r[2], 1] {
        return Err(LossError::InputShape {
            what: "pixel loss mask",
            expected: format!("[{}, {}, {}, 1] to match the render", r[0], r[1], r[2]),
            actual: mask.dims().to_vec(),
        });
    }
    let diff = render.broadcast_sub(photo)?;
    let norm = (diff.sqr()?.sum_keepdim(3)? + EPS)?.sqrt()?;
    let weighted = (norm * mask)?.flatten_from(1)?.sum(1)?;
    let coverage = mask.flatten_from(1)?.sum(1)?.maximum(1.0)?;
    Ok((weighted / coverage)?)
}

/// Landmark loss: the weighted mean squared distance between `projected` and `targets`, divided
/// by the squared diagonal of the targets' bounding box so that it does not depend on the
/// photo's scale.
///
/// `projected` is `[B, L, 2]` (pixels), `targets` `[B or 1, L, 2]`, `weights` optional
/// per-landmark weights (0 drops a landmark, also from the bounding box). Returns `[B]`:
/// `Σ_l w_l ‖p_l − t_l‖² / Σ_l w_l / diag²`, with diag² floored at 1 px². Gradients flow to
/// `projected` and `targets`.
pub fn landmark_loss(
    projected: &Tensor,
    targets: &Tensor,
    weights: Option<&LandmarkWeights>,
) -> Result<Tensor> {
    let p = projected.dims();
    if p.len() != 3 || p[2] != 2 || p[1] == 0 {
        return Err(LossError::InputShape {
            what: "projected landmarks",
            expected: "[B, L, 2] with L > 0".into(),
            actual: p.to_vec(),
        });
    }
    check_pair("landmark targets", targets, projected, 3)?;
    let squared = projected.broadcast_sub(targets)?.sqr()?.sum(2)?;
    let (error, kept) = match weights {
        None => (squared.mean(1)?, targets.clone()),
        Some(w) => {
            if w.count != p[1] {
                return Err(LossError::InputShape {
                    what: "landmark weights",
                    expected: format!("[{}], one per landmark", p[1]),
                    actual: vec![w.count],
                });
            }
            if w.total == 0.0 {
                return Ok(projected.zeros_like()?.sum((1, 2))?);
            }
            let weights = w.weights.to_dtype(projected.dtype())?;
            let error = (squared.broadcast_mul(&weights)?.sum(1)? / w.total)?;
            (error, targets.index_select(&w.kept, 1)?)
        }
    };
    let extent = (kept.max(1)? - kept.min(1)?)?;
    let diagonal_sq = extent.sqr()?.sum(1)?.maximum(1.0)?;
    Ok(error.broadcast_div(&diagonal_sq)?)
}

/// Gaussian prior `Σ_k c_k²` of `[B, K]` coefficients given in standard deviations; returns `[B]`.
pub fn gaussian_prior(coefficients: &Tensor) -> Result<Tensor> {
    if coefficients.rank() != 2 {
        return Err(LossError::InputShape {
            what: "prior coefficients",
            expected: "[B, K]".into(),
            actual: coefficients.dims().to_vec(),
        });
    }
    Ok(coefficients.sqr()?.sum(1)?)
}

/// Per-landmark weights of [`landmark_loss`], checked once (they are constant over a fit, and
/// checking reads them back from their device, which on a GPU waits for its queue to drain).
#[derive(Debug, Clone)]
pub struct LandmarkWeights {
    /// `[1, L]`.
    weights: Tensor,
    /// Indices of the positive weights.
    kept: Tensor,
    total: f64,
    count: usize,
}

impl LandmarkWeights {
    /// `weights`, `[L]`, finite and non-negative (0 drops a landmark).
    pub fn new(weights: &Tensor) -> Result<Self> {
        let &[count] = weights.dims() else {
            return Err(LossError::InputShape {
                what: "landmark weights",
                expected: "[L], one per landmark".into(),
                actual: weights.dims().to_vec(),
            });
        };
        let values = weights
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        if let Some(bad) = values.iter().find(|w| !(**w >= 0.0 && w.is_finite())) {
            return Err(LossError::InputValue {
                what: "landmark weights",
                reason: format!("must be finite and >= 0 (use 0 to drop a landmark), got {bad}"),
            });
        }
        let kept: Vec<u32> = (0..count as u32)
            .filter(|&l| values[l as usize] > 0.0)
            .collect();
        Ok(LandmarkWeights {
            weights: weights.unsqueeze(0)?,
            kept: Tensor::new(kept.as_slice(), weights.device())?,
            total: values.iter().sum(),
            count,
        })
    }
}

/// Checks that `photo` and `render` have `rank` dims, equal except for a photo batch of 1.
fn check_pair(what: &'static str, photo: &Tensor, render: &Tensor, rank: usize) -> Result<()> {
    let (p, r) = (photo.dims(), render.dims());
    let ok = p.len() == rank && r.len() == rank && p[1..] == r[1..] && (p[0] == r[0] || p[0] == 1);
    if ok {
        Ok(())
    } else {
        Err(LossError::InputShape {
            what,
            expected: format!("rank {rank}, photo shaped like the render {r:?} (or batch 1)"),
            actual: p.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_gradient, seeded_tensor};
    use candle_core::DType;

    #[test]
    fn identity_loss_is_zero_for_parallel_and_two_for_opposite_descriptors() -> Result<()> {
        let a = seeded_tensor(&[1, 8], 1)?;
        let b = Tensor::cat(&[(&a * 3.0)?, (&a * -0.5)?], 0)?;
        let loss: Vec<f64> = identity_loss(&a, &b)?.to_vec1()?;
        assert!(
            loss[0].abs() < 1e-9 && (loss[1] - 2.0).abs() < 1e-9,
            "{loss:?}"
        );
        Ok(())
    }

    #[test]
    fn identity_loss_gradient_matches_finite_differences() -> Result<()> {
        let photo = seeded_tensor(&[1, 6], 2)?;
        let render = seeded_tensor(&[2, 6], 3)?;
        check_input_gradient(
            &render,
            |r| identity_loss(&photo, r).map_err(candle_core::Error::wrap),
            1e-6,
        )?;
        Ok(check_input_gradient(
            &photo,
            |p| identity_loss(p, &render).map_err(candle_core::Error::wrap),
            1e-6,
        )?)
    }

    #[test]
    fn content_loss_normalises_each_map_by_its_size() -> Result<()> {
        let zero = Tensor::zeros(
            (1, 2, 3, 3),
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )?;
        let ones = zero.ones_like()?;
        let small = Tensor::zeros(
            (1, 1, 2, 2),
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )?;
        let loss: Vec<f64> = content_loss(
            &[zero.clone(), small.clone()],
            &[ones, (small.ones_like()? * 2.0)?],
        )?
        .to_vec1()?;
        // ‖1‖ over 18 elements = √18, divided by 18; ‖2‖ over 4 = 4, divided by 4.
        let expected = 18f64.sqrt() / 18.0 + 1.0;
        assert!((loss[0] - expected).abs() < 1e-9, "{loss:?} vs {expected}");
        Ok(())
    }

    #[test]
    fn content_loss_gradient_matches_finite_differences() -> Result<()> {
        let photo = [
            seeded_tensor(&[1, 2, 3, 3], 4)?,
            seeded_tensor(&[1, 3, 2, 2], 5)?,
        ];
        let render = [
            seeded_tensor(&[2, 2, 3, 3], 6)?,
            seeded_tensor(&[2, 3, 2, 2], 7)?,
        ];
        let second = render[1].clone();
        Ok(check_input_gradient(
            &render[0],
            |r| {
                content_loss(&photo, &[r.clone(), second.clone()]).map_err(candle_core::Error::wrap)
            },
            1e-6,
        )?)
    }

    /// A `[rows, cols]`-shaped f64 tensor, for hand-checked values.
    fn tensor(values: &[f64], shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            values,
            shape,
            &candle_core::Device::Cpu,
        )?)
    }

    /// Mask weights in [0, 1] from a seed.
    fn seeded_mask(shape: &[usize], seed: u64) -> Result<Tensor> {
        Ok(seeded_tensor(shape, seed)?.affine(0.5, 0.5)?)
    }

    #[test]
    fn pixel_loss_is_the_masked_mean_of_rgb_distances() -> Result<()> {
        // Two pixels with distances 5 and 3 to a black photo.
        let render = tensor(&[3., 4., 0., 1., 2., 2.], &[1, 1, 2, 3])?.repeat((3, 1, 1, 1))?;
        let photo = render.narrow(0, 0, 1)?.zeros_like()?;
        let mask = tensor(&[1.0, 0.5, 0.0, 0.0, 0.25, 0.25], &[3, 1, 2, 1])?;
        // (5 + 0.5·3) / 1.5; an empty mask gives 0; a mask summing to 0.5 < 1 divides by 1.
        let expected = [6.5 / 1.5, 0.0, 0.25 * 5.0 + 0.25 * 3.0];
        for dtype in [DType::F64, DType::F32] {
            let [r, p, m] = [&render, &photo, &mask].map(|t| t.to_dtype(dtype));
            let loss = pixel_loss(&r?, &p?, &m?)?.to_dtype(DType::F64)?;
            let loss: Vec<f64> = loss.to_vec1()?;
            for (l, e) in loss.iter().zip(expected) {
                assert!((l - e).abs() < 1e-5, "{dtype:?}: {loss:?} vs {expected:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn pixel_loss_gradient_is_finite_for_an_empty_mask_and_equal_pixels() -> Result<()> {
        let render = candle_core::Var::from_tensor(&seeded_tensor(&[1, 2, 2, 3], 8)?)?;
        let mask = candle_core::Var::from_tensor(&seeded_mask(&[1, 2, 2, 1], 9)?.zeros_like()?)?;
        let loss = pixel_loss(render.as_tensor(), render.as_tensor(), mask.as_tensor())?;
        assert_eq!(loss.to_vec1::<f64>()?, [0.0]);
        let grads = loss.sum_all()?.backward()?;
        for var in [render.as_tensor(), mask.as_tensor()] {
            let g = grads.get(var).expect("gradient reaches every input");
            let values = g.flatten_all()?.to_vec1::<f64>()?;
            assert!(values.iter().all(|v| v.is_finite()), "{values:?}");
        }
        Ok(())
    }

    #[test]
    fn pixel_loss_gradient_matches_finite_differences() -> Result<()> {
        let render = seeded_tensor(&[2, 3, 3, 3], 10)?;
        let photo = seeded_tensor(&[1, 3, 3, 3], 11)?;
        let mask = seeded_mask(&[2, 3, 3, 1], 12)?;
        let wrap = candle_core::Error::wrap;
        check_input_gradient(
            &render,
            |r| pixel_loss(r, &photo, &mask).map_err(wrap),
            1e-6,
        )?;
        check_input_gradient(
            &photo,
            |p| pixel_loss(&render, p, &mask).map_err(wrap),
            1e-6,
        )?;
        Ok(check_input_gradient(
            &mask,
            |m| pixel_loss(&render, &photo, m).map_err(wrap),
            1e-6,
        )?)
    }

    #[test]
    fn landmark_loss_is_scale_free_and_drops_zero_weighted_landmarks() -> Result<()> {
        // Targets span a 3 × 4 box (diagonal 5); every projection is off by 1 px.
        let targets = tensor(&[0., 0., 3., 0., 0., 4., 1., 1.], &[1, 4, 2])?;
        let projected = (&targets + 1.0)?;
        let loss: Vec<f64> = landmark_loss(&projected, &targets, None)?.to_vec1()?;
        assert!((loss[0] - 2.0 / 25.0).abs() < 1e-12, "{loss:?}");
        let scaled: Vec<f64> =
            landmark_loss(&(&projected * 10.0)?, &(&targets * 10.0)?, None)?.to_vec1()?;
        assert!((scaled[0] - loss[0]).abs() < 1e-12, "{scaled:?}");

        // A far-off fourth target with weight 0 changes neither the error nor the box; weight 2
        // on the first landmark counts its error twice.
        let outlier = tensor(&[0., 0., 3., 0., 0., 4., 90., 90.], &[1, 4, 2])?;
        let moved = tensor(&[2., 0., 3., 0., 0., 4., 0., 0.], &[1, 4, 2])?;
        let weights = tensor(&[2., 1., 1., 0.], &[4])?;
        let checked = LandmarkWeights::new(&weights)?;
        let loss: Vec<f64> = landmark_loss(&moved, &outlier, Some(&checked))?.to_vec1()?;
        assert!((loss[0] - 2.0 * 4.0 / 4.0 / 25.0).abs() < 1e-12, "{loss:?}");
        let [m, o, w] = [&moved, &outlier, &weights].map(|t| t.to_dtype(DType::F32));
        let single = landmark_loss(&m?, &o?, Some(&LandmarkWeights::new(&w?)?))?;
        let single: Vec<f32> = single.to_vec1()?;
        assert!((single[0] - 0.08).abs() < 1e-6, "{single:?}");

        let zero = LandmarkWeights::new(&weights.zeros_like()?)?;
        let none = landmark_loss(&moved, &outlier, Some(&zero))?;
        assert_eq!(none.to_vec1::<f64>()?, [0.0]);
        Ok(())
    }

    #[test]
    fn landmark_loss_gradient_matches_finite_differences() -> Result<()> {
        let projected = (seeded_tensor(&[2, 5, 2], 13)? * 50.0)?;
        let targets = (seeded_tensor(&[1, 5, 2], 14)? * 50.0)?;
        let weights = LandmarkWeights::new(&tensor(&[1.0, 0.5, 0.0, 2.0, 1.0], &[5])?)?;
        let wrap = candle_core::Error::wrap;
        check_input_gradient(
            &projected,
            |p| landmark_loss(p, &targets, Some(&weights)).map_err(wrap),
            1e-6,
        )?;
        check_input_gradient(
            &targets,
            |t| landmark_loss(&projected, t, Some(&weights)).map_err(wrap),
            1e-6,
        )?;
        Ok(check_input_gradient(
            &projected,
            |p| landmark_loss(p, &targets, None).map_err(wrap),
            1e-6,
        )?)
    }

    #[test]
    fn gaussian_prior_sums_squares_and_its_gradient_matches() -> Result<()> {
        let c = tensor(&[1., -2., 0.5, 0., 3., 0.], &[2, 3])?;
        assert_eq!(gaussian_prior(&c)?.to_vec1::<f64>()?, [5.25, 9.0]);
        Ok(check_input_gradient(
            &seeded_tensor(&[2, 7], 15)?,
            |c| gaussian_prior(c).map_err(candle_core::Error::wrap),
            1e-6,
        )?)
    }

    #[test]
    fn bad_pixel_landmark_and_prior_inputs_are_typed_errors() -> Result<()> {
        let shape_error = |r: Result<Tensor>| matches!(r, Err(LossError::InputShape { .. }));
        let render = seeded_tensor(&[2, 3, 3, 3], 1)?;
        let mask = seeded_mask(&[2, 3, 3, 1], 2)?;
        assert!(shape_error(pixel_loss(
            &render,
            &render.narrow(1, 0, 2)?,
            &mask
        )));
        assert!(shape_error(pixel_loss(&render, &render, &render)));
        assert!(shape_error(pixel_loss(&mask, &mask, &mask)));
        assert!(shape_error(pixel_loss(
            &render,
            &seeded_tensor(&[3, 3, 3, 3], 3)?,
            &mask
        )));

        let points = seeded_tensor(&[2, 5, 2], 4)?;
        assert!(shape_error(landmark_loss(
            &points,
            &points.narrow(1, 0, 4)?,
            None
        )));
        assert!(shape_error(landmark_loss(&render, &render, None)));
        let four = LandmarkWeights::new(&seeded_tensor(&[4], 5)?.abs()?)?;
        assert!(shape_error(landmark_loss(&points, &points, Some(&four))));
        let matrix = seeded_tensor(&[5, 1], 5)?.abs()?;
        assert!(matches!(
            LandmarkWeights::new(&matrix),
            Err(LossError::InputShape { .. })
        ));
        for bad in [-1.0, f64::NAN] {
            let weights = tensor(&[1., 1., bad, 1., 1.], &[5])?;
            let err = LandmarkWeights::new(&weights).unwrap_err();
            assert!(matches!(err, LossError::InputValue { .. }), "{err}");
            assert!(err.to_string().contains(">= 0"), "{err}");
        }

        assert!(shape_error(gaussian_prior(&points)));
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let a = seeded_tensor(&[2, 8], 1)?;
        let b = seeded_tensor(&[3, 8], 2)?;
        assert!(matches!(
            identity_loss(&a, &b),
            Err(LossError::InputShape { .. })
        ));
        assert!(matches!(
            content_loss(&[], &[]),
            Err(LossError::InputShape { .. })
        ));
        Ok(())
    }
}
