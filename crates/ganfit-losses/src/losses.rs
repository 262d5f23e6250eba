//! GANFIT's identity and content losses (Gecer et al. 2019, eqs. 4–5) on the outputs of
//! [`FaceRecognitionNet`](crate::identity::FaceRecognitionNet).
//!
//! Both return one loss per render, `[B]`. The photo side may have batch 1 and is then compared
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
