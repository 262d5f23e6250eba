//! Interpolation of per-vertex attributes over the rasterised triangles.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{RenderError, Result};
use crate::kernel::{
    PIXEL_CHUNK, Real, add_into, check_rast, data, dispatch_float, piece_len, triangle_at,
};
use crate::triangles::Triangles;

/// Interpolates vertex attributes at every pixel: `u · a0 + v · a1 + (1 - u - v) · a2` with the
/// barycentrics `(u, v)` and triangle id from `rast` (see [`crate::rasterize`]).
///
/// * `attr`: `[V, C]` (shared by the batch) or `[B, V, C]` (B = 1 broadcasts), same dtype as `rast`.
/// * `rast`: `[B, H, W, 4]` from [`crate::rasterize`].
/// * `triangles`: indices into the V attribute rows, one triangle per rasterised triangle. This
///   need not be the mesh used for rasterising — e.g. a UV layout with seams has its own vertex
///   list — but it must have the same triangle count and order.
///
/// Returns `[B, H, W, C]`, zero where no triangle covers the pixel. Gradients flow to `attr`
/// and to the `u, v` channels of `rast` (hence, through the rasteriser, to vertex positions).
pub fn interpolate(attr: &Tensor, rast: &Tensor, triangles: &Triangles) -> Result<Tensor> {
    let (batch, ..) = check_rast(rast)?;
    let attr = match attr.rank() {
        2 => attr.unsqueeze(0)?,
        3 => attr.clone(),
        _ => {
            return Err(RenderError::Shape {
                what: "attr",
                expected: "[V, C] or [B, V, C]".into(),
                got: attr.dims().to_vec(),
            });
        }
    };
    let (attr_batch, nv, _) = attr.dims3()?;
    if attr.dtype() != rast.dtype() {
        return Err(RenderError::DType {
            what: "attr (must match rast)",
            got: attr.dtype(),
        });
    }
    if attr_batch != batch && attr_batch != 1 {
        return Err(RenderError::Batch {
            what: "attr",
            got: attr_batch,
            expected: batch,
        });
    }
    if nv != triangles.num_vertices() {
        return Err(RenderError::Shape {
            what: "attr",
            expected: format!(
                "[.., {}, C] (one row per vertex of `triangles`)",
                triangles.num_vertices()
            ),
            got: attr.dims().to_vec(),
        });
    }
    Ok(attr.contiguous()?.apply_op2(
        &rast.contiguous()?,
        Interpolate {
            triangles: triangles.clone(),
        },
    )?)
}

/// Checks that `tri` lies within the triangles the caller passed (a mismatched `rast` could
/// hold larger ids) and returns its corner vertices.
fn corners_of(tris: &[[u32; 3]], t: usize) -> candle_core::Result<[usize; 3]> {
    match tris.get(t) {
        Some(tri) => Ok(tri.map(|v| v as usize)),
        None => candle_core::bail!(
            "rast refers to triangle {t} but only {} triangles were given; interpolate with the triangle list that was rasterised",
            tris.len()
        ),
    }
}

/// Barycentric weights of the three corners at a rast pixel.
fn weights<T: Real>(px: &[T]) -> [T; 3] {
    [px[0], px[1], T::one() - px[0] - px[1]]
}

struct Interpolate {
    triangles: Triangles,
}

impl Interpolate {
    fn forward<T: Real>(&self, attr: &[T], rast: &[T], dims: Dims) -> candle_core::Result<Vec<T>> {
        let Dims {
            attr_batch,
            nv,
            c,
            pixels,
            ..
        } = dims;
        let tris = self.triangles.as_slice();
        let mut out = vec![T::zero(); rast.len() / 4 * c];
        // Blocks of pixels per task: per-pixel rayon items cost more than the arithmetic.
        out.par_chunks_mut(PIXEL_CHUNK * c.max(1))
            .zip(rast.par_chunks(PIXEL_CHUNK * 4))
            .enumerate()
            .try_for_each(|(block, (dst, rast))| {
                let pixels_before = block * PIXEL_CHUNK;
                for (j, (dst, px)) in dst
                    .chunks_exact_mut(c)
                    .zip(rast.chunks_exact(4))
                    .enumerate()
                {
                    let Some(t) = triangle_at(px[3]) else {
                        continue;
                    };
                    let tri = corners_of(tris, t)?;
                    let base = if attr_batch == 1 {
                        0
                    } else {
                        (pixels_before + j) / pixels * nv * c
                    };
                    for (wt, v) in weights(px).into_iter().zip(tri) {
                        let row = &attr[base + v * c..base + v * c + c];
                        dst.iter_mut().zip(row).for_each(|(d, &a)| *d += wt * a);
                    }
                }
                Ok::<_, candle_core::Error>(())
            })?;
        Ok(out)
    }
}

/// Sizes shared by the interpolation kernels.
#[derive(Clone, Copy)]
struct Dims {
    attr_batch: usize,
    nv: usize,
    c: usize,
    /// Pixels per image.
    pixels: usize,
}

fn dims(attr: &Shape, rast: &Shape) -> candle_core::Result<Dims> {
    let (attr_batch, nv, c) = attr.dims3()?;
    let (_, h, w, _) = rast.dims4()?;
    Ok(Dims {
        attr_batch,
        nv,
        c,
        pixels: h * w,
    })
}

impl CustomOp2 for Interpolate {
    fn name(&self) -> &'static str {
        "ganfit-interpolate"
    }

    fn cpu_fwd(
        &self,
        attr: &CpuStorage,
        attr_l: &Layout,
        rast: &CpuStorage,
        rast_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(attr_l.shape(), rast_l.shape())?;
        let (b, h, w, _) = rast_l.shape().dims4()?;
        dispatch_float!(attr, T => {
            let out = self.forward::<T>(data(attr, attr_l)?, data(rast, rast_l)?, d)?;
            Ok((T::to_cpu_storage_owned(out), Shape::from((b, h, w, d.c))))
        })
    }

    fn bwd(
        &self,
        attr: &Tensor,
        rast: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_attr = rast.apply_op2_no_bwd(
            &grad,
            &AttrGrad {
                triangles: self.triangles.clone(),
                attr_shape: attr.shape().clone(),
            },
        )?;
        let grad_rast = attr.apply_op3_no_bwd(
            rast,
            &grad,
            &RastGrad {
                triangles: self.triangles.clone(),
            },
        )?;
        Ok((Some(grad_attr), Some(grad_rast)))
    }
}

/// d attr of [`Interpolate`]: (rast, d out) -> d attr.
struct AttrGrad {
    triangles: Triangles,
    attr_shape: Shape,
}

impl AttrGrad {
    fn backward<T: Real>(&self, rast: &[T], grad: &[T], d: Dims) -> candle_core::Result<Vec<T>> {
        let tris = self.triangles.as_slice();
        let Dims {
            attr_batch,
            nv,
            c,
            pixels,
        } = d;
        let n = rast.len() / 4;
        // Broadcast attributes collect from every image, so pieces run over all pixels.
        let per_image = nv * c;
        let images = if attr_batch == 1 { 1 } else { n / pixels };
        let mut out = vec![T::zero(); attr_batch * per_image];
        let span = if attr_batch == 1 { n } else { pixels };
        out.par_chunks_mut(per_image.max(1))
            .enumerate()
            .try_for_each(|(b, dst)| {
                debug_assert!(b < images);
                let pixels = b * span..(b + 1) * span;
                let rast = &rast[pixels.start * 4..pixels.end * 4];
                let grad = &grad[pixels.start * c..pixels.end * c];
                let sum = rast
                    .par_chunks(PIXEL_CHUNK * 4)
                    .zip(grad.par_chunks(PIXEL_CHUNK * c.max(1)))
                    .with_min_len(piece_len(span.div_ceil(PIXEL_CHUNK)))
                    .try_fold(
                        || vec![T::zero(); per_image],
                        |mut acc, (rast, grad)| {
                            for (px, g) in rast.chunks_exact(4).zip(grad.chunks_exact(c)) {
                                let Some(t) = triangle_at(px[3]) else {
                                    continue;
                                };
                                if g.iter().all(|&g| g == T::zero()) {
                                    continue;
                                }
                                for (wt, v) in weights(px).into_iter().zip(corners_of(tris, t)?) {
                                    acc[v * c..v * c + c]
                                        .iter_mut()
                                        .zip(g)
                                        .for_each(|(a, &g)| *a += wt * g);
                                }
                            }
                            Ok::<_, candle_core::Error>(acc)
                        },
                    )
                    .try_reduce_with(|a, b| Ok(add_into(a, b)))
                    .transpose()?
                    .unwrap_or_else(|| vec![T::zero(); per_image]);
                dst.copy_from_slice(&sum);
                Ok::<_, candle_core::Error>(())
            })?;
        Ok(out)
    }
}

impl CustomOp2 for AttrGrad {
    fn name(&self) -> &'static str {
        "ganfit-interpolate-attr-grad"
    }

    fn cpu_fwd(
        &self,
        rast: &CpuStorage,
        rast_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(&self.attr_shape, rast_l.shape())?;
        dispatch_float!(rast, T => {
            let out = self.backward::<T>(data(rast, rast_l)?, data(grad, grad_l)?, d)?;
            Ok((T::to_cpu_storage_owned(out), self.attr_shape.clone()))
        })
    }
}

/// d rast of [`Interpolate`]: (attr, rast, d out) -> d rast (only the u, v channels are non-zero).
struct RastGrad {
    triangles: Triangles,
}

impl RastGrad {
    fn backward<T: Real>(
        &self,
        attr: &[T],
        rast: &[T],
        grad: &[T],
        d: Dims,
    ) -> candle_core::Result<Vec<T>> {
        let tris = self.triangles.as_slice();
        let Dims {
            attr_batch,
            nv,
            c,
            pixels,
        } = d;
        let mut out = vec![T::zero(); rast.len()];
        out.par_chunks_mut(PIXEL_CHUNK * 4)
            .zip(rast.par_chunks(PIXEL_CHUNK * 4))
            .enumerate()
            .try_for_each(|(block, (dst, rast))| {
                let pixels_before = block * PIXEL_CHUNK;
                for (j, (dst, px)) in dst
                    .chunks_exact_mut(4)
                    .zip(rast.chunks_exact(4))
                    .enumerate()
                {
                    let Some(t) = triangle_at(px[3]) else {
                        continue;
                    };
                    let [v0, v1, v2] = corners_of(tris, t)?;
                    let i = pixels_before + j;
                    let base = if attr_batch == 1 {
                        0
                    } else {
                        i / pixels * nv * c
                    };
                    let row = |v: usize| &attr[base + v * c..base + v * c + c];
                    let (a0, a1, a2) = (row(v0), row(v1), row(v2));
                    let g = &grad[i * c..i * c + c];
                    for k in 0..c {
                        dst[0] += g[k] * (a0[k] - a2[k]);
                        dst[1] += g[k] * (a1[k] - a2[k]);
                    }
                }
                Ok::<_, candle_core::Error>(())
            })?;
        Ok(out)
    }
}

impl CustomOp3 for RastGrad {
    fn name(&self) -> &'static str {
        "ganfit-interpolate-rast-grad"
    }

    fn cpu_fwd(
        &self,
        attr: &CpuStorage,
        attr_l: &Layout,
        rast: &CpuStorage,
        rast_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(attr_l.shape(), rast_l.shape())?;
        dispatch_float!(attr, T => {
            let out = self.backward::<T>(data(attr, attr_l)?, data(rast, rast_l)?, data(grad, grad_l)?, d)?;
            Ok((T::to_cpu_storage_owned(out), rast_l.shape().clone()))
        })
    }
}
