//! Normals and shading models.
//!
//! Each is written as plain candle tensor ops, which define its semantics and run on any
//! device; on the CPU, [`vertex_normals`], [`normalize`], [`shade_sh`] and [`shade_phong`] run as
//! fused kernels instead
//! (`shading_kernels`), since a dozen image-sized temporaries per call, and as many again in
//! the backward pass, cost far more than the arithmetic.

use candle_core::{D, Tensor};

use crate::error::{RenderError, Result};
use crate::kernel::{check_float, has_fused_kernels};
use crate::shading_kernels::{FaceNormalSums, Normalize, ShBands, ShadePhong, ShadeSh};
use crate::triangles::Triangles;

/// Keeps normalisation of zero vectors (background pixels) finite: they stay zero.
const NORM_EPS: f64 = 1e-12;

/// Cross product along the last dim (size 3) of two broadcast-compatible tensors.
fn cross3(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let c = |t: &Tensor, i| t.narrow(D::Minus1, i, 1);
    let (ax, ay, az) = (c(a, 0)?, c(a, 1)?, c(a, 2)?);
    let (bx, by, bz) = (c(b, 0)?, c(b, 1)?, c(b, 2)?);
    let x = ((&ay * &bz)? - (&az * &by)?)?;
    let y = ((&az * &bx)? - (&ax * &bz)?)?;
    let z = ((&ax * &by)? - (&ay * &bx)?)?;
    Ok(Tensor::cat(&[x, y, z], D::Minus1)?)
}

/// Rescales the last dim to unit length: `v / sqrt(|v|² + 1e-12)`, so that zero vectors stay
/// (almost exactly) zero.
pub fn normalize(v: &Tensor) -> Result<Tensor> {
    if has_fused_kernels(v) && v.rank() > 0 {
        return Ok(v.contiguous()?.apply_op1(Normalize { eps: NORM_EPS })?);
    }
    normalize_with_tensor_ops(v)
}

pub(crate) fn normalize_with_tensor_ops(v: &Tensor) -> Result<Tensor> {
    let norm = (v.sqr()?.sum_keepdim(D::Minus1)? + NORM_EPS)?.sqrt()?;
    Ok(v.broadcast_div(&norm)?)
}

fn dot_last(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.broadcast_mul(b)?.sum_keepdim(D::Minus1)?)
}

/// Unit vertex normals `[B, V, 3]` of a mesh with positions `[B, V, 3]`: the area-weighted sum
/// of the face normals `(v1 - v0) × (v2 - v0)` around each vertex (outward for counter-clockwise
/// faces seen from outside). Vertices used by no triangle get zero normals.
pub fn vertex_normals(positions: &Tensor, triangles: &Triangles) -> Result<Tensor> {
    check_float(positions, "positions", "[B, V, 3]", 3, Some(3))?;
    if positions.dim(1)? != triangles.num_vertices() {
        return Err(RenderError::Shape {
            what: "positions",
            expected: format!("[B, {}, 3]", triangles.num_vertices()),
            got: positions.dims().to_vec(),
        });
    }
    if has_fused_kernels(positions) {
        let op = FaceNormalSums {
            triangles: triangles.clone(),
        };
        return normalize(&positions.contiguous()?.apply_op1(op)?);
    }
    normalize(&face_normal_sums_with_tensor_ops(positions, triangles)?)
}

pub(crate) fn face_normal_sums_with_tensor_ops(
    positions: &Tensor,
    triangles: &Triangles,
) -> Result<Tensor> {
    let device = positions.device();
    let corner = |k: usize| -> Result<Tensor> {
        let idx: Vec<u32> = triangles.as_slice().iter().map(|t| t[k]).collect();
        Ok(Tensor::from_vec(idx, triangles.len(), device)?)
    };
    let (i0, i1, i2) = (corner(0)?, corner(1)?, corner(2)?);
    let p0 = positions.index_select(&i0, 1)?;
    let e1 = (positions.index_select(&i1, 1)? - &p0)?;
    let e2 = (positions.index_select(&i2, 1)? - &p0)?;
    let face = cross3(&e1, &e2)?;
    let all = Tensor::cat(&[&i0, &i1, &i2], 0)?;
    let spread = Tensor::cat(&[&face, &face, &face], 1)?;
    Ok(positions.zeros_like()?.index_add(&all, &spread, 1)?)
}

/// Band constants: `Y_lm` normalisation times the Lambertian convolution factor of its band
/// (π, 2π/3, π/4), for the terms `1`, `y|z|x`, `xy|yz|xz`, `3z² - 1` and `x² - y²`.
const SH_DC: f64 = 0.282_094_8 * std::f64::consts::PI;
const SH_LINEAR: f64 = 0.488_602_5 * 2.0 * std::f64::consts::PI / 3.0;
const SH_CROSS: f64 = 1.092_548_4 * std::f64::consts::PI / 4.0;
const SH_ZONAL: f64 = 0.315_391_6 * std::f64::consts::PI / 4.0;
const SH_SQUARE: f64 = 0.546_274_2 * std::f64::consts::PI / 4.0;

const SH_BANDS: ShBands = ShBands {
    dc: SH_DC,
    linear: SH_LINEAR,
    cross: SH_CROSS,
    zonal: SH_ZONAL,
    square: SH_SQUARE,
};

/// Real spherical-harmonic basis up to band 2 for unit normals `[.., 3]`, with the Lambertian
/// (clamped-cosine) convolution folded in (Ramamoorthi & Hanrahan 2001), shape `[.., 9]`.
///
/// Order: `1, y, z, x, xy, yz, 3z² - 1, xz, x² - y²` (m = -l..l per band), in whatever frame
/// the normals are given (camera space in [`crate::Renderer`]). With coefficients `L_k`,
/// `Σ_k L_k · basis_k(n)` is the irradiance from the environment `Σ_k L_k Y_k`.
pub fn sh_irradiance_basis(normals: &Tensor) -> Result<Tensor> {
    let c = |i| normals.narrow(D::Minus1, i, 1);
    let (x, y, z) = (c(0)?, c(1)?, c(2)?);
    let terms = [
        (x.ones_like()? * SH_DC)?,
        (&y * SH_LINEAR)?,
        (&z * SH_LINEAR)?,
        (&x * SH_LINEAR)?,
        ((&x * &y)? * SH_CROSS)?,
        ((&y * &z)? * SH_CROSS)?,
        ((z.sqr()? * 3.0)? - 1.0)?.affine(SH_ZONAL, 0.0)?,
        ((&x * &z)? * SH_CROSS)?,
        ((x.sqr()? - y.sqr()?)? * SH_SQUARE)?,
    ];
    Ok(Tensor::cat(&terms, D::Minus1)?)
}

/// The `[9, 16]` map from SH coefficients to the symmetric 4x4 matrix `M` with
/// `Σ_k L_k basis_k(n) = ñᵀ M ñ`, `ñ = (x, y, z, 1)` (Ramamoorthi & Hanrahan's quadratic form).
fn sh_quadratic_form() -> [[f64; 16]; 9] {
    let mut w = [[0.0; 16]; 9];
    let mut put = |k: usize, i: usize, j: usize, v: f64| {
        w[k][4 * i + j] += v / 2.0;
        w[k][4 * j + i] += v / 2.0;
    };
    put(0, 3, 3, SH_DC);
    put(1, 1, 3, SH_LINEAR);
    put(2, 2, 3, SH_LINEAR);
    put(3, 0, 3, SH_LINEAR);
    put(4, 0, 1, SH_CROSS);
    put(5, 1, 2, SH_CROSS);
    put(6, 2, 2, 3.0 * SH_ZONAL);
    put(6, 3, 3, -SH_ZONAL);
    put(7, 0, 2, SH_CROSS);
    put(8, 0, 0, SH_SQUARE);
    put(8, 1, 1, -SH_SQUARE);
    w
}

/// Lambertian shading under second-order spherical-harmonic lighting.
///
/// * `albedo`: `[B, N, C]` or `[B, H, W, C]`, `normals`: the same with 3 channels (unit),
///   `coeffs`: `[B, C, 9]` per channel in the order of [`sh_irradiance_basis`].
///
/// Returns `albedo ⊙ (basis(n) · coeffsᵀ)` in the shape of `albedo`, evaluated as the
/// equivalent quadratic form `ñᵀ M_c ñ` (one matrix product instead of nine per-pixel terms).
/// (Deep3DFaceRecon's coefficients use the same basis up to per-term constant factors and
/// signs; rescale when importing them.)
pub fn shade_sh(albedo: &Tensor, normals: &Tensor, coeffs: &Tensor) -> Result<Tensor> {
    shade_sh_of(albedo, normals, coeffs, false)
}

/// [`shade_sh`] of `normalize(normals)`: on the CPU one op, whose backward pass hands back the
/// gradient of the normals as given (the renderer's interpolated normals skip an image-sized
/// gradient buffer and sum in candle's backward pass, and the separate normalisation's pass).
pub(crate) fn shade_sh_of_normalized(
    albedo: &Tensor,
    normals: &Tensor,
    coeffs: &Tensor,
) -> Result<Tensor> {
    shade_sh_of(albedo, normals, coeffs, true)
}

/// [`shade_sh`], of the normalised normals when `normalize_first`.
fn shade_sh_of(
    albedo: &Tensor,
    normals: &Tensor,
    coeffs: &Tensor,
    normalize_first: bool,
) -> Result<Tensor> {
    let rank = pixel_rank(normals, "normals")?;
    check_float(
        normals,
        "normals",
        "[B, N, 3] or [B, H, W, 3]",
        rank,
        Some(3),
    )?;
    check_float(albedo, "albedo", "[B, N, C] or [B, H, W, C]", rank, None)?;
    check_float(coeffs, "sh coeffs", "[B, C, 9]", 3, Some(9))?;
    let batch = normals.dim(0)?;
    let channels = coeffs.dim(1)?;
    let pixels = &normals.dims()[..rank - 1];
    if albedo.dims()[..rank - 1] != *pixels
        || albedo.dim(D::Minus1)? != channels
        || coeffs.dim(0)? != batch
    {
        return Err(RenderError::Shape {
            what: "albedo and sh coeffs",
            expected: format!("{pixels:?} + [C] and [{batch}, C, 9] to match the normals"),
            got: albedo.dims().to_vec(),
        });
    }
    if albedo.dtype() != normals.dtype() || coeffs.dtype() != normals.dtype() {
        return Err(RenderError::DType {
            what: "albedo and sh coeffs (must match the normals)",
            got: albedo.dtype(),
        });
    }
    // The CPU kernel normalises in place; other paths normalise first.
    let fused_normalize =
        normalize_first && normals.device().is_cpu() && has_fused_kernels(normals);
    let normals = &if normalize_first && !fused_normalize {
        normalize(normals)?
    } else {
        normals.clone()
    };
    if has_fused_kernels(normals) {
        let op = ShadeSh {
            bands: SH_BANDS,
            normalize: fused_normalize.then_some(NORM_EPS),
        };
        let shaded = as_rows(albedo)?.apply_op3(&as_rows(normals)?, &coeffs.contiguous()?, op)?;
        return shaped_like(shaded, albedo);
    }
    let shaded = shade_sh_with_tensor_ops(&as_rows(albedo)?, &as_rows(normals)?, coeffs)?;
    shaped_like(shaded, albedo)
}

/// The rank of per-pixel inputs to the shading functions: 3 (`[B, N, C]`) or 4 (`[B, H, W, C]`).
fn pixel_rank(t: &Tensor, what: &'static str) -> Result<usize> {
    match t.rank() {
        r @ (3 | 4) => Ok(r),
        _ => Err(RenderError::Shape {
            what,
            expected: "[B, N, C] or [B, H, W, C]".into(),
            got: t.dims().to_vec(),
        }),
    }
}

/// Per-pixel `[B, .., C]` values as `[B, N, C]` rows, for the paths that need rows. The CPU
/// kernels take any such shape as it is: each reshape would cost candle's backward pass an
/// image-sized zero fill and sum.
fn as_rows(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() || t.rank() == 3 {
        return Ok(t.contiguous()?);
    }
    let dims = t.dims();
    Ok(t.reshape((dims[0], (), dims[dims.len() - 1]))?)
}

/// Output rows of a shading path back in the shape of its input `like` (see [`as_rows`]).
fn shaped_like(rows: Tensor, like: &Tensor) -> Result<Tensor> {
    if rows.dims() == like.dims() {
        return Ok(rows);
    }
    Ok(rows.reshape(like.shape())?)
}

pub(crate) fn shade_sh_with_tensor_ops(
    albedo: &Tensor,
    normals: &Tensor,
    coeffs: &Tensor,
) -> Result<Tensor> {
    let (batch, n, _) = normals.dims3()?;
    let channels = coeffs.dim(1)?;
    let form: Vec<f64> = sh_quadratic_form().iter().flatten().copied().collect();
    let form = Tensor::from_vec(form, (9, 16), coeffs.device())?.to_dtype(coeffs.dtype())?;
    // [B, C, 16] -> [B, C, 4 (row), 4 (col)] -> [B, 4 (row), C * 4]
    let m = coeffs
        .broadcast_matmul(&form)?
        .reshape((batch, channels, 4, 4))?
        .transpose(1, 2)?
        .reshape((batch, 4, channels * 4))?;
    let homogeneous = Tensor::cat(&[normals, &normals.narrow(2, 0, 1)?.ones_like()?], 2)?;
    let rows = homogeneous.matmul(&m)?.reshape((batch, n, channels, 4))?;
    let irradiance = rows.broadcast_mul(&homogeneous.unsqueeze(2)?)?.sum(3)?;
    Ok((albedo * irradiance)?)
}

/// One directional light plus ambient light, GANFIT's illumination model, each `[B, 3]` (RGB or
/// xyz) so that the batch can have its own lights, all differentiable.
#[derive(Clone, Debug)]
pub struct PhongLight {
    /// Direction from the surface towards the light (normalised internally), `[B, 3]`.
    pub direction: Tensor,
    /// Directional light colour, `[B, 3]`.
    pub color: Tensor,
    /// Ambient light colour, `[B, 3]`.
    pub ambient: Tensor,
    /// Specular strength; 0 turns the specular term off.
    pub specular: f64,
    /// Phong exponent of the specular lobe (> 1 keeps its gradient finite at the lobe's edge).
    pub shininess: f64,
}

/// Phong shading: `albedo ⊙ (ambient + color · max(0, n·l)) + specular · color · max(0, r·v)^shininess`
/// with `r = 2 (n·l) n - l` the reflected light direction.
///
/// * `albedo`: `[B, N, 3]` or `[B, H, W, 3]`, `normals`: the same shape (unit), `view`: the
///   same shape, unit vectors from the surface towards the camera.
///
/// Returns the shape of `albedo`.
///
/// Where `n·l` or `r·v` is exactly 0 (e.g. zero normals on the background), the CPU kernel
/// takes the gradient through the clamp as 0; the tensor-op path used on other devices passes
/// it through (candle's `relu`), which only matters for such degenerate pixels.
pub fn shade_phong(
    albedo: &Tensor,
    normals: &Tensor,
    view: &Tensor,
    light: &PhongLight,
) -> Result<Tensor> {
    let rank = pixel_rank(normals, "normals")?;
    let expected = "[B, N, 3] or [B, H, W, 3]";
    check_float(albedo, "albedo", expected, rank, Some(3))?;
    check_float(normals, "normals", expected, rank, Some(3))?;
    check_float(view, "view", expected, rank, Some(3))?;
    let batch = normals.dim(0)?;
    for (what, t) in [
        ("light direction", &light.direction),
        ("light color", &light.color),
        ("ambient", &light.ambient),
    ] {
        check_float(t, what, "[B, 3]", 2, Some(3))?;
        if t.dim(0)? != batch {
            return Err(RenderError::Shape {
                what,
                expected: format!("[{batch}, 3], one light per image of the normals' batch"),
                got: t.dims().to_vec(),
            });
        }
    }
    for (what, t) in [("albedo", albedo), ("view", view)] {
        if t.dims() != normals.dims() {
            return Err(RenderError::Shape {
                what,
                expected: format!("{:?}, the normals' shape", normals.dims()),
                got: t.dims().to_vec(),
            });
        }
    }
    for (what, t) in [
        ("albedo", albedo),
        ("view", view),
        ("light direction", &light.direction),
        ("light color", &light.color),
        ("ambient", &light.ambient),
    ] {
        if t.dtype() != normals.dtype() {
            return Err(RenderError::DType {
                what,
                got: t.dtype(),
            });
        }
    }
    let direction = normalize(&light.direction)?;
    if has_fused_kernels(normals) {
        // The light travels as one [B, 9] tensor, and the view vectors (needed only for the
        // specular term) alongside the normals: the custom op takes three inputs.
        let packed = Tensor::cat(&[&direction, &light.color, &light.ambient], 1)?;
        let geometry = if light.specular == 0.0 {
            as_rows(normals)?
        } else {
            Tensor::cat(&[as_rows(normals)?, as_rows(view)?], D::Minus1)?
        };
        let op = ShadePhong {
            specular: light.specular,
            shininess: light.shininess,
        };
        return shaped_like(as_rows(albedo)?.apply_op3(&geometry, &packed, op)?, albedo);
    }
    let [albedo_rows, normals, view] = [albedo, normals, view].map(as_rows);
    let shaded = shade_phong_with_tensor_ops(&albedo_rows?, &normals?, &view?, &direction, light)?;
    shaped_like(shaded, albedo)
}

/// [`shade_phong`] as candle tensor ops, with the light direction already normalised.
pub(crate) fn shade_phong_with_tensor_ops(
    albedo: &Tensor,
    normals: &Tensor,
    view: &Tensor,
    direction: &Tensor,
    light: &PhongLight,
) -> Result<Tensor> {
    let l = direction.unsqueeze(1)?;
    let color = light.color.unsqueeze(1)?;
    let n_dot_l = dot_last(normals, &l)?;
    let diffuse = n_dot_l.relu()?.broadcast_mul(&color)?;
    let lit = diffuse.broadcast_add(&light.ambient.unsqueeze(1)?)?;
    let shaded = (albedo * lit)?;
    if light.specular == 0.0 {
        return Ok(shaded);
    }
    let reflected = (normals.broadcast_mul(&(n_dot_l * 2.0)?)?.broadcast_sub(&l))?;
    let lobe = dot_last(&reflected, view)?.relu()?.powf(light.shininess)?;
    Ok((shaded + lobe.broadcast_mul(&color)?.affine(light.specular, 0.0)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testing::{dot, finite_difference_error, gradient, random};
    use ganfit_testkit::max_abs_diff;

    /// The fused CPU kernel `fused` against its tensor-op definition `reference`: outputs and
    /// vector-Jacobian products for every input, and the fused backward against central
    /// differences.
    fn check_fused(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let (ours, theirs) = (fused(inputs), reference(inputs));
        assert!(max_abs_diff(&ours, &theirs) < 1e-12);
        let cot = random(ours.dims(), -1.0, 1.0, 99);
        for k in 0..inputs.len() {
            let with = |f: &dyn Fn(&[Tensor]) -> Tensor, x: &Tensor| {
                let mut all = inputs.to_vec();
                all[k] = x.clone();
                (f(&all) * &cot).unwrap().sum_all().unwrap()
            };
            let g_ours = gradient(&inputs[k], |x| with(&fused, x));
            let g_theirs = gradient(&inputs[k], |x| with(&reference, x));
            let scale = max_abs_diff(&g_theirs, &g_theirs.zeros_like().unwrap()).max(1.0);
            assert!(
                max_abs_diff(&g_ours, &g_theirs) < 1e-11 * scale,
                "input {k}"
            );
            let err = finite_difference_error(&inputs[k], |x| with(&fused, x));
            assert!(err < 1e-6, "input {k}: finite-difference error {err}");
        }
        assert!(dot(&ours, &cot).is_finite());
    }

    #[test]
    fn fused_normalize_matches_tensor_ops() {
        check_fused(
            &[random(&[2, 5, 3], -1.0, 1.0, 1)],
            |x| normalize(&x[0]).unwrap(),
            |x| normalize_with_tensor_ops(&x[0]).unwrap(),
        );
        // A zero vector (background pixels) stays zero, with the same finite gradient.
        let zero =
            Tensor::zeros((1, 3), candle_core::DType::F64, &candle_core::Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&normalize(&zero).unwrap(), &zero), 0.0);
        let cot = random(&[1, 3], -1.0, 1.0, 7);
        let g = |f: &dyn Fn(&Tensor) -> Tensor| {
            gradient(&zero, |x| (f(x) * &cot).unwrap().sum_all().unwrap())
        };
        let ours = g(&|x| normalize(x).unwrap());
        let theirs = g(&|x| normalize_with_tensor_ops(x).unwrap());
        assert!(max_abs_diff(&ours, &theirs) < 1e-12 * 1e6);
    }

    #[test]
    fn fused_sh_shading_matches_tensor_ops() {
        let albedo = random(&[2, 6, 3], 0.0, 1.0, 2);
        let normals = normalize(&random(&[2, 6, 3], -1.0, 1.0, 3)).unwrap();
        let coeffs = random(&[2, 3, 9], -1.0, 1.0, 4);
        check_fused(
            &[albedo, normals, coeffs],
            |x| shade_sh(&x[0], &x[1], &x[2]).unwrap(),
            |x| shade_sh_with_tensor_ops(&x[0], &x[1], &x[2]).unwrap(),
        );
    }

    /// Images `[B, H, W, C]` shade exactly as the same pixels in rows `[B, N, C]`, on outputs
    /// and on the gradients to every input.
    #[test]
    fn image_shaped_inputs_shade_as_rows() {
        let image = |t: &Tensor| t.reshape((2, 3, 4, t.dim(2).unwrap())).unwrap();
        let albedo = random(&[2, 12, 3], 0.0, 1.0, 31);
        let normals = normalize(&random(&[2, 12, 3], -1.0, 1.0, 32)).unwrap();
        let view = normalize(&random(&[2, 12, 3], -1.0, 1.0, 33)).unwrap();
        let coeffs = random(&[2, 3, 9], -1.0, 1.0, 34);
        let light = PhongLight {
            direction: random(&[2, 3], -1.0, 1.0, 35),
            color: random(&[2, 3], 0.2, 1.0, 36),
            ambient: random(&[2, 3], 0.0, 0.5, 37),
            specular: 0.3,
            shininess: 5.0,
        };
        let cot = random(&[2, 12, 3], -1.0, 1.0, 38);
        type Shade<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor;
        let sh: Shade<'_> = &|a, n, _| shade_sh(a, n, &coeffs).unwrap();
        let phong: Shade<'_> = &|a, n, v| shade_phong(a, n, v, &light).unwrap();
        for shade in [sh, phong] {
            let rows = |x: [&Tensor; 3]| shade(x[0], x[1], x[2]);
            let images = |x: [&Tensor; 3]| {
                let out = shade(&image(x[0]), &image(x[1]), &image(x[2]));
                assert_eq!(out.dims(), [2, 3, 4, 3]);
                out.reshape((2, 12, 3)).unwrap()
            };
            let inputs = [&albedo, &normals, &view];
            assert_eq!(max_abs_diff(&rows(inputs), &images(inputs)), 0.0);
            for k in 0..3 {
                let vjp = |f: &dyn Fn([&Tensor; 3]) -> Tensor| {
                    gradient(inputs[k], |x| {
                        let mut all = inputs;
                        all[k] = x;
                        (f(all) * &cot).unwrap().sum_all().unwrap()
                    })
                };
                assert_eq!(max_abs_diff(&vjp(&rows), &vjp(&images)), 0.0, "input {k}");
            }
        }
    }

    /// The renderer's shading of normals it has not normalised: against the tensor ops on
    /// images `[B, H, W, C]` (outputs, vector-Jacobian products, central differences), and
    /// bit for bit against the two CPU ops it replaces, zero normals (background) included.
    #[test]
    fn sh_shading_of_normalized_matches_normalize_then_shade() {
        let albedo = random(&[2, 3, 4, 3], 0.0, 1.0, 2);
        let raw = random(&[2, 3, 4, 3], -2.0, 2.0, 3);
        let coeffs = random(&[2, 3, 9], -1.0, 1.0, 4);
        check_fused(
            &[albedo.clone(), raw.clone(), coeffs.clone()],
            |x| shade_sh_of_normalized(&x[0], &x[1], &x[2]).unwrap(),
            |x| {
                let rows = |t: &Tensor| t.reshape((2, 12, 3)).unwrap();
                let unit = normalize_with_tensor_ops(&rows(&x[1])).unwrap();
                let shaded = shade_sh_with_tensor_ops(&rows(&x[0]), &unit, &x[2]).unwrap();
                shaded.reshape((2, 3, 4, 3)).unwrap()
            },
        );
        let mask = random(&[2, 3, 4, 1], 0.0, 1.0, 5).ge(0.3).unwrap();
        let raw = raw
            .broadcast_mul(&mask.to_dtype(raw.dtype()).unwrap())
            .unwrap();
        let cot = random(&[2, 3, 4, 3], -1.0, 1.0, 6);
        let fused = |n: &Tensor| shade_sh_of_normalized(&albedo, n, &coeffs).unwrap();
        let composed = |n: &Tensor| shade_sh(&albedo, &normalize(n).unwrap(), &coeffs).unwrap();
        assert_eq!(max_abs_diff(&fused(&raw), &composed(&raw)), 0.0);
        let vjp = |f: &dyn Fn(&Tensor) -> Tensor| {
            gradient(&raw, |n| (f(n) * &cot).unwrap().sum_all().unwrap())
        };
        assert_eq!(max_abs_diff(&vjp(&fused), &vjp(&composed)), 0.0);
    }

    #[test]
    fn fused_phong_shading_matches_tensor_ops() {
        let albedo = random(&[2, 40, 3], 0.0, 1.0, 6);
        let normals = normalize(&random(&[2, 40, 3], -1.0, 1.0, 7)).unwrap();
        let view = normalize(&random(&[2, 40, 3], -1.0, 1.0, 8)).unwrap();
        let direction = random(&[2, 3], -1.0, 1.0, 9);
        let color = random(&[2, 3], 0.2, 1.0, 10);
        let ambient = random(&[2, 3], 0.0, 0.5, 11);
        for specular in [0.0, 0.4] {
            let light = |x: &[Tensor]| PhongLight {
                direction: x[3].clone(),
                color: x[4].clone(),
                ambient: x[5].clone(),
                specular,
                shininess: 6.0,
            };
            let inputs =
                [&albedo, &normals, &view, &direction, &color, &ambient].map(Tensor::clone);
            check_fused(
                &inputs,
                |x| shade_phong(&x[0], &x[1], &x[2], &light(x)).unwrap(),
                |x| {
                    let direction = normalize_with_tensor_ops(&x[3]).unwrap();
                    shade_phong_with_tensor_ops(&x[0], &x[1], &x[2], &direction, &light(x)).unwrap()
                },
            );
        }
    }

    #[test]
    fn fused_face_normal_sums_match_tensor_ops() {
        let tris = Triangles::new(vec![[0, 1, 2], [0, 2, 3], [1, 3, 2], [4, 0, 1]], 5).unwrap();
        let positions = random(&[2, 5, 3], -1.0, 1.0, 5);
        let op = |p: &Tensor| {
            p.apply_op1(FaceNormalSums {
                triangles: tris.clone(),
            })
            .unwrap()
        };
        check_fused(
            &[positions],
            |x| op(&x[0]),
            |x| face_normal_sums_with_tensor_ops(&x[0], &tris).unwrap(),
        );
    }
}
