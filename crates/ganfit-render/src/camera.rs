//! Pinhole camera in the OpenCV convention, rigid pose from an axis-angle vector, and the
//! conversion to the clip space the rasteriser takes.
//!
//! Camera space: x right, y down, z forward (points in front of the camera have z > 0).
//! Pixel coordinates: `u = fx * x / z + cx`, `v = fy * y / z + cy`, with the centre of pixel
//! (column i, row j) at `(u, v) = (i, j)` — OpenCV's convention, which landmark detectors use.
//! Image row 0 is the top of the picture, and it is row 0 of every `[B, H, W, C]` output.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{RenderError, Result};
use crate::kernel::{
    Real, check_float, constant, cpu_tensor, data, dispatch_float, min_tasks, tracked, with_data,
};

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
        let batch = points.dim(0)?;
        let m = constant(&m, (1, 3, 4), points)?.repeat((batch, 1, 1))?;
        let bias = constant(&bias, (1, 4), points)?.repeat((batch, 1))?;
        affine_points(points, &m, &bias)
    }

    /// Pixel coordinates `[B, N, 2]` (u, v) of camera-space points `[B, N, 3]`, for landmarks.
    pub fn project(&self, points: &Tensor) -> Result<Tensor> {
        check_float(points, "camera-space points", "[B, N, 3]", 3, Some(3))?;
        let xy = points.narrow(2, 0, 2)?;
        let z = points.narrow(2, 2, 1)?;
        let focal = constant(&[self.fx, self.fy], 2, points)?;
        let centre = constant(&[self.cx, self.cy], 2, points)?;
        Ok(xy
            .broadcast_div(&z)?
            .broadcast_mul(&focal)?
            .broadcast_add(&centre)?)
    }
}

/// Rotation matrices `[B, 3, 3]` from axis-angle vectors `[B, 3]` (direction = axis, norm =
/// angle in radians, right-hand rule), by Rodrigues' formula.
///
/// Written as `R = I + a K + b (r rᵀ - |r|² I)` with `K` the cross-product matrix of `r`,
/// `a = sin θ / θ` and `b = 2 (sin(θ/2) / θ)²`, which stays accurate and differentiable at θ = 0
/// (θ is computed as `sqrt(|r|² + 1e-16)`). In f32 and f64 one op (computed
/// in f64, on the CPU and on CUDA devices), otherwise candle tensor ops.
pub fn rotation_matrix(axis_angle: &Tensor) -> Result<Tensor> {
    check_float(axis_angle, "axis_angle", "[B, 3]", 2, Some(3))?;
    if matches!(axis_angle.dtype(), DType::F32 | DType::F64) {
        return Ok(axis_angle.contiguous()?.apply_op1(RotationMatrix)?);
    }
    rotation_matrix_with_tensor_ops(axis_angle)
}

fn rotation_matrix_with_tensor_ops(axis_angle: &Tensor) -> Result<Tensor> {
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
    affine_points(&points, &rot.transpose(1, 2)?, translation)
}

/// `points · matrix + offset` per image, for points `[B, V, 3]` (or `[1, V, 3]`, shared by the
/// batch), matrices `[B, 3, K]` and offsets `[B, K]`: `[B, V, K]`. On the CPU and on CUDA devices
/// one op ([`AffinePoints`]); as candle tensor ops, the matrix product and the broadcast sum
/// cost several vertex-sized temporaries and gradient sums in each direction.
fn affine_points(points: &Tensor, matrix: &Tensor, offset: &Tensor) -> Result<Tensor> {
    let fused_device =
        points.device().is_cpu() || cfg!(feature = "cuda") && points.device().is_cuda();
    if fused_device && matches!(points.dtype(), DType::F32 | DType::F64) {
        return Ok(points.contiguous()?.apply_op3(
            &matrix.contiguous()?,
            &offset.contiguous()?,
            AffinePoints,
        )?);
    }
    affine_points_with_tensor_ops(points, matrix, offset)
}

fn affine_points_with_tensor_ops(
    points: &Tensor,
    matrix: &Tensor,
    offset: &Tensor,
) -> Result<Tensor> {
    let mapped = if points.dim(0)? == matrix.dim(0)? {
        points.matmul(matrix)?
    } else {
        points.squeeze(0)?.broadcast_matmul(matrix)?
    };
    Ok(mapped.broadcast_add(&offset.unsqueeze(1)?)?)
}

/// [`affine_points`] on the CPU: (points, matrix, offset) -> points · matrix + offset.
struct AffinePoints;

/// Sizes of an [`AffinePoints`] call.
#[derive(Clone, Copy)]
struct AffineDims {
    /// Images (matrices).
    batch: usize,
    /// Whether the points are shared by the batch.
    shared: bool,
    vertices: usize,
    /// Output coordinates per point.
    k: usize,
}

impl AffineDims {
    fn of(points: &Shape, matrix: &Shape) -> candle_core::Result<Self> {
        let (point_batch, vertices, _) = points.dims3()?;
        let (batch, _, k) = matrix.dims3()?;
        Ok(Self {
            batch,
            shared: point_batch != batch,
            vertices,
            k,
        })
    }

    /// Image `b`'s points in `points` (`[B or 1, V, 3]`).
    fn points<'a, T>(&self, points: &'a [T], b: usize) -> &'a [T] {
        let b = if self.shared { 0 } else { b };
        &points[b * self.vertices * 3..(b + 1) * self.vertices * 3]
    }
}

impl AffinePoints {
    fn forward<T: Real>(&self, points: &[T], matrix: &[T], offset: &[T], d: AffineDims) -> Vec<T> {
        let k = d.k;
        let mut out = vec![T::zero(); d.batch * d.vertices * k];
        out.par_chunks_mut((d.vertices * k).max(1))
            .with_min_len(min_tasks())
            .enumerate()
            .for_each(|(b, out)| {
                let m = &matrix[b * 3 * k..(b + 1) * 3 * k];
                let t = &offset[b * k..(b + 1) * k];
                let points = d.points(points, b);
                for (o, p) in out.chunks_exact_mut(k).zip(points.chunks_exact(3)) {
                    for (j, o) in o.iter_mut().enumerate() {
                        *o = p[0] * m[j] + p[1] * m[k + j] + p[2] * m[2 * k + j] + t[j];
                    }
                }
            });
        out
    }

    /// Gradients to the points, matrices and offsets from the output gradient `grad`.
    fn backward<T: Real>(
        &self,
        [points, matrix]: [&[T]; 2],
        grad: &[T],
        d: AffineDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let k = d.k;
        // Per image: its points' gradient, then `Σ_v p_v g_vᵀ` and `Σ_v g_v`.
        let per_image: Vec<(Vec<T>, Vec<T>)> = (0..d.batch)
            .into_par_iter()
            .with_min_len(min_tasks())
            .map(|b| {
                let m = &matrix[b * 3 * k..(b + 1) * 3 * k];
                let g = &grad[b * d.vertices * k..(b + 1) * d.vertices * k];
                let points = d.points(points, b);
                let mut g_points = vec![T::zero(); d.vertices * 3];
                let mut g_affine = vec![T::zero(); 4 * k];
                for ((gp, p), g) in g_points
                    .chunks_exact_mut(3)
                    .zip(points.chunks_exact(3))
                    .zip(g.chunks_exact(k))
                {
                    for (i, gp) in gp.iter_mut().enumerate() {
                        *gp = (0..k).fold(T::zero(), |a, j| a + g[j] * m[i * k + j]);
                    }
                    for (j, &g) in g.iter().enumerate() {
                        for i in 0..3 {
                            g_affine[i * k + j] += p[i] * g;
                        }
                        g_affine[3 * k + j] += g;
                    }
                }
                (g_points, g_affine)
            })
            .collect();
        let mut g_matrix = Vec::with_capacity(d.batch * 3 * k);
        let mut g_offset = Vec::with_capacity(d.batch * k);
        for (_, g_affine) in &per_image {
            g_matrix.extend_from_slice(&g_affine[..3 * k]);
            g_offset.extend_from_slice(&g_affine[3 * k..]);
        }
        let mut images = per_image.into_iter().map(|(g_points, _)| g_points);
        let g_points = if d.shared {
            let first = images
                .next()
                .unwrap_or_else(|| vec![T::zero(); d.vertices * 3]);
            images.fold(first, crate::kernel::add_into)
        } else {
            images.flatten().collect()
        };
        (g_points, g_matrix, g_offset)
    }
}

impl CustomOp3 for AffinePoints {
    fn name(&self) -> &'static str {
        "ganfit-affine-points"
    }

    fn cpu_fwd(
        &self,
        points: &CpuStorage,
        points_l: &Layout,
        matrix: &CpuStorage,
        matrix_l: &Layout,
        offset: &CpuStorage,
        offset_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = AffineDims::of(points_l.shape(), matrix_l.shape())?;
        dispatch_float!(points, T => {
            let out = self.forward::<T>(
                data(points, points_l)?, data(matrix, matrix_l)?, data(offset, offset_l)?, d,
            );
            let shape = Shape::from((d.batch, d.vertices, d.k));
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        points: &candle_core::CudaStorage,
        points_l: &Layout,
        matrix: &candle_core::CudaStorage,
        matrix_l: &Layout,
        offset: &candle_core::CudaStorage,
        offset_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let d = AffineDims::of(points_l.shape(), matrix_l.shape())?;
        crate::cuda::affine_points(
            (points, points_l),
            (matrix, matrix_l),
            (offset, offset_l),
            (d.batch, d.shared, d.vertices, d.k),
        )
    }

    fn bwd(
        &self,
        points: &Tensor,
        matrix: &Tensor,
        offset: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = AffineDims::of(points.shape(), matrix.shape())?;
        #[cfg(feature = "cuda")]
        if points.device().is_cuda() {
            let (gp, gm, go) =
                crate::cuda::affine_points_grads([points, matrix, offset], grad, d.shared)?;
            return Ok((
                tracked(points, gp),
                tracked(matrix, gm),
                tracked(offset, go),
            ));
        }
        fn run<T: Real>(
            op: &AffinePoints,
            [points, matrix, offset]: [&Tensor; 3],
            grad: &Tensor,
            d: AffineDims,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            with_data::<T, _>(points, |p| {
                with_data::<T, _>(matrix, |m| {
                    with_data::<T, _>(grad, |g| {
                        let (gp, gm, go) = op.backward([p, m], g, d);
                        Ok((
                            tracked(points, cpu_tensor(gp, points.shape())?),
                            tracked(matrix, cpu_tensor(gm, matrix.shape())?),
                            tracked(offset, cpu_tensor(go, offset.shape())?),
                        ))
                    })
                })
            })
        }
        let inputs = [points, matrix, offset];
        match points.dtype() {
            DType::F32 => run::<f32>(self, inputs, grad, d),
            _ => run::<f64>(self, inputs, grad, d),
        }
    }
}

/// The terms of Rodrigues' formula at `r` (see [`rotation_matrix`]): θ, a, b and their
/// derivatives a', b' with respect to θ (by series below θ = 0.01, where the closed forms
/// cancel).
fn rodrigues_terms(r: [f64; 3]) -> [f64; 5] {
    let theta = (r[0] * r[0] + r[1] * r[1] + r[2] * r[2] + 1e-16).sqrt();
    let (s, h) = (theta.sin(), (0.5 * theta).sin());
    let a = s / theta;
    let b = 2.0 * (h / theta) * (h / theta);
    let (da, db) = if theta < 1e-2 {
        let theta3 = theta * theta * theta;
        (-theta / 3.0 + theta3 / 30.0, -theta / 12.0 + theta3 / 180.0)
    } else {
        (
            (theta * theta.cos() - s) / (theta * theta),
            (s * theta - 4.0 * h * h) / (theta * theta * theta),
        )
    };
    [theta, a, b, da, db]
}

/// The rotation matrix (row-major) of axis-angle `r`.
fn rodrigues(r: [f64; 3]) -> [f64; 9] {
    let [_, a, b, _, _] = rodrigues_terms(r);
    let sq = r[0] * r[0] + r[1] * r[1] + r[2] * r[2];
    let k = [0.0, -r[2], r[1], r[2], 0.0, -r[0], -r[1], r[0], 0.0];
    std::array::from_fn(|ij| {
        let (i, j) = (ij / 3, ij % 3);
        let eye = if i == j { 1.0 } else { 0.0 };
        eye + a * k[ij] + b * (r[i] * r[j] - sq * eye)
    })
}

/// `<g, d R / d r>` for the rotation of axis-angle `r`: with `w = d <g, K> / d r`,
/// `a' (r/θ) <g, K> + a w + b' (r/θ) (rᵀ g r - |r|² tr g) + b (g r + gᵀ r - 2 r tr g)`.
fn rodrigues_vjp(r: [f64; 3], g: [f64; 9]) -> [f64; 3] {
    let [theta, a, b, da, db] = rodrigues_terms(r);
    let sq = r[0] * r[0] + r[1] * r[1] + r[2] * r[2];
    let w = [g[7] - g[5], g[2] - g[6], g[3] - g[1]];
    let gk = r[0] * w[0] + r[1] * w[1] + r[2] * w[2];
    let trace = g[0] + g[4] + g[8];
    let gr: [f64; 3] =
        std::array::from_fn(|i| g[i * 3] * r[0] + g[i * 3 + 1] * r[1] + g[i * 3 + 2] * r[2]);
    let gtr: [f64; 3] = std::array::from_fn(|i| g[i] * r[0] + g[3 + i] * r[1] + g[6 + i] * r[2]);
    let q = r[0] * gr[0] + r[1] * gr[1] + r[2] * gr[2] - sq * trace;
    std::array::from_fn(|i| {
        let along = r[i] / theta;
        da * along * gk + a * w[i] + db * along * q + b * (gr[i] + gtr[i] - 2.0 * r[i] * trace)
    })
}

/// [`rotation_matrix`] as one op: axis-angle `[B, 3]` -> `[B, 3, 3]`, in f64 whatever the
/// dtype (kernels/render.cu computes the same on a GPU). As tensor ops it was some 40 small
/// operations and their backward, 1 ms of every render on a GPU.
struct RotationMatrix;

impl candle_core::CustomOp1 for RotationMatrix {
    fn name(&self) -> &'static str {
        "ganfit-rotation-matrix"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let batch = layout.shape().dims()[0];
        dispatch_float!(storage, T => {
            let r = data::<T>(storage, layout)?;
            let out: Vec<T> = r
                .chunks_exact(3)
                .flat_map(|r| rodrigues([0, 1, 2].map(|i| <T as candle_core::WithDType>::to_f64(r[i]))))
                .map(T::of)
                .collect();
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), Shape::from((batch, 3, 3))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rotation(storage, layout)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &RotationMatrixGrad,
        )?))
    }
}

/// Vector-Jacobian product of [`RotationMatrix`]: (axis-angle, d R) -> d axis-angle.
pub(crate) struct RotationMatrixGrad;

impl candle_core::CustomOp2 for RotationMatrixGrad {
    fn name(&self) -> &'static str {
        "ganfit-rotation-matrix-grad"
    }

    fn cpu_fwd(
        &self,
        r: &CpuStorage,
        r_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(r, T => {
            let (r, g) = (data::<T>(r, r_l)?, data::<T>(g, g_l)?);
            let f = <T as candle_core::WithDType>::to_f64;
            let out: Vec<T> = r
                .chunks_exact(3)
                .zip(g.chunks_exact(9))
                .flat_map(|(r, g)| rodrigues_vjp([0, 1, 2].map(|i| f(r[i])), std::array::from_fn(|i| f(g[i]))))
                .map(T::of)
                .collect();
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), r_l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        r: &candle_core::CudaStorage,
        r_l: &Layout,
        g: &candle_core::CudaStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rotation_grad((r, r_l), (g, g_l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testing::{dot, finite_difference_error, gradient, random};
    use ganfit_testkit::max_abs_diff;

    /// The CPU op against its tensor-op definition, on outputs and vector-Jacobian products
    /// for every input, with points of their own and shared by the batch; its backward against
    /// central differences.
    /// The rotation op against its tensor-op definition (outputs and vector-Jacobian products)
    /// and its backward against central differences, from no rotation through tiny angles
    /// (the series branch) to nearly half a turn; in f32 too, which it computes in f64.
    #[test]
    fn rotation_op_matches_tensor_ops_and_finite_differences() {
        let axis_angle = Tensor::from_vec(
            vec![
                0.0, 0.0, 0.0, 1e-6, -2e-6, 5e-7, 3e-3, 1e-3, -4e-3, 0.3, -0.2, 0.5, -1.9, 2.1, 0.4,
            ],
            (5, 3),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let fused = |x: &Tensor| rotation_matrix(x).unwrap();
        let reference = |x: &Tensor| rotation_matrix_with_tensor_ops(x).unwrap();
        assert!(max_abs_diff(&fused(&axis_angle), &reference(&axis_angle)) < 1e-14);
        let cot = random(&[5, 3, 3], -1.0, 1.0, 7);
        let vjp = |f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor| {
            let cot = cot
                .narrow(0, 5 - x.dim(0).unwrap(), x.dim(0).unwrap())
                .unwrap();
            (f(x) * cot).unwrap().sum_all().unwrap()
        };
        let ours = gradient(&axis_angle, |x| vjp(&fused, x));
        let theirs = gradient(&axis_angle, |x| vjp(&reference, x));
        assert!(max_abs_diff(&ours, &theirs) < 1e-9, "{ours} vs {theirs}");
        assert!(dot(&ours, &ours) > 0.0);
        // Away from zero, where differences of a step are not dominated by the 1e-16 offset.
        let away = axis_angle.narrow(0, 2, 3).unwrap();
        let err = finite_difference_error(&away, |x| vjp(&fused, x));
        assert!(err < 1e-8, "finite-difference error {err}");
        let in_f32 = rotation_matrix(&axis_angle.to_dtype(DType::F32).unwrap()).unwrap();
        assert!(max_abs_diff(&in_f32.to_dtype(DType::F64).unwrap(), &fused(&axis_angle)) < 1e-7);
    }

    #[test]
    fn fused_affine_points_match_tensor_ops() {
        let matrix = random(&[2, 3, 4], -1.0, 1.0, 1);
        let offset = random(&[2, 4], -1.0, 1.0, 2);
        for point_batch in [2, 1] {
            let points = random(&[point_batch, 7, 3], -1.0, 1.0, 3);
            let inputs = [points, matrix.clone(), offset.clone()];
            let fused = |x: &[Tensor]| affine_points(&x[0], &x[1], &x[2]).unwrap();
            let reference =
                |x: &[Tensor]| affine_points_with_tensor_ops(&x[0], &x[1], &x[2]).unwrap();
            assert!(max_abs_diff(&fused(&inputs), &reference(&inputs)) < 1e-14);
            let cot = random(&[2, 7, 4], -1.0, 1.0, 4);
            for i in 0..3 {
                let with = |f: &dyn Fn(&[Tensor]) -> Tensor, x: &Tensor| {
                    let mut all = inputs.to_vec();
                    all[i] = x.clone();
                    (f(&all) * &cot).unwrap().sum_all().unwrap()
                };
                let ours = gradient(&inputs[i], |x| with(&fused, x));
                let theirs = gradient(&inputs[i], |x| with(&reference, x));
                assert!(max_abs_diff(&ours, &theirs) < 1e-13, "input {i}");
                assert!(dot(&ours, &ours) > 0.0);
                let err = finite_difference_error(&inputs[i], |x| with(&fused, x));
                assert!(err < 1e-8, "input {i}: finite-difference error {err}");
            }
        }
    }
}
