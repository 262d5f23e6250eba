//! Pinhole camera in the OpenCV convention, rigid pose from an axis-angle vector, and the
//! conversion to the clip space the rasteriser takes.
//!
//! Camera space: x right, y down, z forward (points in front of the camera have z > 0).
//! Pixel coordinates: `u = fx * x / z + cx`, `v = fy * y / z + cy`, with the centre of pixel
//! (column i, row j) at `(u, v) = (i, j)` — OpenCV's convention, which landmark detectors use.
//! Image row 0 is the top of the picture, and it is row 0 of every `[B, H, W, C]` output.

use candle_core::Tensor;

use crate::error::{RenderError, Result};
use crate::kernel::check_float;

/// Intrinsics of a pinhole camera plus the depth range kept by the rasteriser.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Camera {
    /// Focal length along x, in pixels.
    pub fx: f64,
    /// Focal length along y, in pixels.
    pub fy: f64,
    /// Principal point x, in pixels (OpenCV: pixel centres at integers).
    pub cx: f64,
    /// Principal point y, in pixels.
    pub cy: f64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Nearest depth drawn (camera z, scene units); geometry closer than this is clipped.
    pub near: f64,
    /// Farthest depth drawn.
    pub far: f64,
}

impl Camera {
    /// A camera after checking that focal lengths are positive, the image is non-empty and
    /// `0 < near < far`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        fx: f64,
        fy: f64,
        cx: f64,
        cy: f64,
        width: usize,
        height: usize,
        near: f64,
        far: f64,
    ) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(RenderError::EmptyImage { height, width });
        }
        if !(fx > 0.0 && fy > 0.0 && fx.is_finite() && fy.is_finite()) {
            return Err(RenderError::Camera(format!(
                "focal lengths must be positive and finite, got fx={fx}, fy={fy}"
            )));
        }
        if !(near > 0.0 && far > near && far.is_finite()) {
            return Err(RenderError::Camera(format!(
                "need 0 < near < far (finite), got near={near}, far={far}"
            )));
        }
        Ok(Self {
            fx,
            fy,
            cx,
            cy,
            width,
            height,
            near,
            far,
        })
    }

    /// Homogeneous clip coordinates `[B, V, 4]` of camera-space points `[B, V, 3]`.
    ///
    /// `x_clip / w` and `y_clip / w` are normalised device coordinates in which -1 and +1 are the
    /// outer edges of the image (left/top and right/bottom), so pixel (i, j) has its centre at
    /// `((2i + 1) / W - 1, (2j + 1) / H - 1)`. `w = z` (camera depth), and `z_clip / w` runs from
    /// -1 at `near` to +1 at `far` (OpenGL's depth mapping).
    pub fn to_clip(&self, points: &Tensor) -> Result<Tensor> {
        check_float(points, "camera-space points", "[B, V, 3]", 3, Some(3))?;
        let (w, h) = (self.width as f64, self.height as f64);
        let (n, f) = (self.near, self.far);
        #[rustfmt::skip]
        let m = [
            2.0 * self.fx / w, 0.0, 0.0, 0.0,
            0.0, 2.0 * self.fy / h, 0.0, 0.0,
            (2.0 * self.cx + 1.0) / w - 1.0, (2.0 * self.cy + 1.0) / h - 1.0, (f + n) / (f - n), 1.0,
        ];
        let bias = [0.0, 0.0, -2.0 * f * n / (f - n), 0.0];
        let m = Tensor::from_slice(&m, (3, 4), points.device())?.to_dtype(points.dtype())?;
        let bias = Tensor::from_slice(&bias, 4, points.device())?.to_dtype(points.dtype())?;
        Ok(points.broadcast_matmul(&m)?.broadcast_add(&bias)?)
    }

    /// Pixel coordinates `[B, N, 2]` (u, v) of camera-space points `[B, N, 3]`, for landmarks.
    pub fn project(&self, points: &Tensor) -> Result<Tensor> {
        check_float(points, "camera-space points", "[B, N, 3]", 3, Some(3))?;
        let xy = points.narrow(2, 0, 2)?;
        let z = points.narrow(2, 2, 1)?;
        let focal = Tensor::from_slice(&[self.fx, self.fy], 2, points.device())?
            .to_dtype(points.dtype())?;
        let centre = Tensor::from_slice(&[self.cx, self.cy], 2, points.device())?
            .to_dtype(points.dtype())?;
        Ok(xy
            .broadcast_div(&z)?
            .broadcast_mul(&focal)?
            .broadcast_add(&centre)?)
    }
}

/// Rotation matrices `[B, 3, 3]` from axis-angle vectors `[B, 3]` (direction = axis, norm =
/// angle in radians, right-hand rule), by Rodrigues' formula in differentiable tensor ops.
///
/// Written as `R = I + a K + b (r rᵀ - |r|² I)` with `K` the cross-product matrix of `r`,
/// `a = sin θ / θ` and `b = 2 (sin(θ/2) / θ)²`, which stays accurate and differentiable at θ = 0
/// (θ is computed as `sqrt(|r|² + 1e-16)`).
pub fn rotation_matrix(axis_angle: &Tensor) -> Result<Tensor> {
    check_float(axis_angle, "axis_angle", "[B, 3]", 2, Some(3))?;
    let (batch, _) = axis_angle.dims2()?;
    let r = axis_angle;
    let sq_norm = r.sqr()?.sum_keepdim(1)?; // [B,1]
    // The offset keeps the square root differentiable at zero rotation; it is large enough
    // that θ² stays a normal f32 in the backward pass, and no division is by more than θ.
    let theta = (&sq_norm + 1e-16)?.sqrt()?;
    let a = theta.sin()?.div(&theta)?;
    let b = ((&theta * 0.5)?.sin()?.div(&theta)?.sqr()? * 2.0)?;
    let comp = |i| r.narrow(1, i, 1);
    let (x, y, z) = (comp(0)?, comp(1)?, comp(2)?);
    let zero = x.zeros_like()?;
    let k = Tensor::cat(
        &[
            &zero,
            &z.neg()?,
            &y,
            &z,
            &zero,
            &x.neg()?,
            &y.neg()?,
            &x,
            &zero,
        ],
        1,
    )?
    .reshape((batch, 3, 3))?;
    let outer = r.unsqueeze(2)?.matmul(&r.unsqueeze(1)?)?; // [B,3,3]
    let eye = Tensor::eye(3, r.dtype(), r.device())?.unsqueeze(0)?;
    let sq = sq_norm.unsqueeze(2)?;
    let rr = outer.broadcast_sub(&eye.broadcast_mul(&sq)?)?;
    let rot = eye
        .broadcast_add(&k.broadcast_mul(&a.unsqueeze(2)?)?)?
        .add(&rr.broadcast_mul(&b.unsqueeze(2)?)?)?;
    Ok(rot)
}

/// Camera-space points `[B, N, 3]` = `R(axis_angle) · p + translation` for world points
/// `[B, N, 3]` (or `[N, 3]`, shared by the batch), axis-angle `[B, 3]` and translation `[B, 3]`.
pub fn camera_from_world(
    points: &Tensor,
    axis_angle: &Tensor,
    translation: &Tensor,
) -> Result<Tensor> {
    check_float(translation, "translation", "[B, 3]", 2, Some(3))?;
    let rot = rotation_matrix(axis_angle)?;
    let batch = rot.dim(0)?;
    let points = match points.rank() {
        2 => {
            check_float(points, "points", "[N, 3] or [B, N, 3]", 2, Some(3))?;
            points.unsqueeze(0)?
        }
        _ => {
            check_float(points, "points", "[N, 3] or [B, N, 3]", 3, Some(3))?;
            points.clone()
        }
    };
    let pb = points.dim(0)?;
    if pb != batch && pb != 1 {
        return Err(RenderError::Batch {
            what: "points",
            got: pb,
            expected: batch,
        });
    }
    if translation.dim(0)? != batch {
        return Err(RenderError::Batch {
            what: "translation",
            got: translation.dim(0)?,
            expected: batch,
        });
    }
    let rotated = if pb == batch {
        points.matmul(&rot.transpose(1, 2)?)?
    } else {
        points.squeeze(0)?.broadcast_matmul(&rot.transpose(1, 2)?)?
    };
    Ok(rotated.broadcast_add(&translation.unsqueeze(1)?)?)
}
