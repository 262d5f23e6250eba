//! Interpolation of per-vertex attributes over the rasterised triangles.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{RenderError, Result};
use crate::kernel::{
    PIXEL_CHUNK, Real, add_into, check_rast, cpu_tensor, data, dispatch_float, min_tasks,
    piece_len, tracked, triangle_at, with_data,
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
            .with_min_len(min_tasks())
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        attr: &candle_core::CudaStorage,
        attr_l: &Layout,
        rast: &candle_core::CudaStorage,
        rast_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::interpolate(&self.triangles, (attr, attr_l), (rast, rast_l))
    }

    fn bwd(
        &self,
        attr: &Tensor,
        rast: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if attr.device().is_cuda() {
            let (g_attr, g_rast) =
                crate::cuda::interpolate_grads(&self.triangles, attr, rast, grad)?;
            return Ok((tracked(attr, g_attr), tracked(rast, g_rast)));
        }
        let d = dims(attr.shape(), rast.shape())?;
        fn run<T: Real>(
            op: &Interpolate,
            [attr, rast, grad]: [&Tensor; 3],
            d: Dims,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            with_data::<T, _>(attr, |a| {
                with_data::<T, _>(rast, |r| {
                    with_data::<T, _>(grad, |g| {
                        let (g_attr, g_rast) = op.backward(a, r, g, d)?;
                        Ok((
                            tracked(attr, cpu_tensor(g_attr, attr.shape())?),
                            tracked(rast, cpu_tensor(g_rast, rast.shape())?),
                        ))
                    })
                })
            })
        }
        let ts = [attr, rast, grad];
        match attr.dtype() {
            DType::F32 => run::<f32>(self, ts, d),
            DType::F64 => run::<f64>(self, ts, d),
            dt => candle_core::bail!("ganfit-render kernels take f32 or f64 tensors, got {dt:?}"),
        }
    }
}

impl Interpolate {
    /// Gradients to the attributes and to the rast `u, v` channels (the others get none), in
    /// one sweep over the pixels.
    fn backward<T: Real>(
        &self,
        attr: &[T],
        rast: &[T],
        grad: &[T],
        d: Dims,
    ) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let Dims {
            attr_batch,
            nv,
            c,
            pixels,
        } = d;
        let per_set = nv * c;
        // A shared attribute set collects from every image, so its pieces run over all pixels.
        let span = if attr_batch == 1 {
            rast.len() / 4
        } else {
            pixels
        };
        let mut g_attr = vec![T::zero(); attr_batch * per_set];
        let mut g_rast = vec![T::zero(); rast.len()];
        // Images with their own attributes that share the threads out evenly are one task each,
        // summed in place in pixel order; otherwise each set's pixels are split into one piece
        // per thread, summed into scratch sets that are added up.
        if attr_batch > 1 && attr_batch.is_multiple_of(rayon::current_num_threads()) {
            g_attr
                .par_chunks_mut(per_set.max(1))
                .zip(g_rast.par_chunks_mut(span * 4))
                .with_min_len(min_tasks())
                .enumerate()
                .try_for_each(|(b, (g_attr, g_rast))| {
                    let attr = &attr[b * per_set..(b + 1) * per_set];
                    let rast = &rast[b * span * 4..(b + 1) * span * 4];
                    let grad = &grad[b * span * c..(b + 1) * span * c];
                    self.add_pixels(attr, c, rast, grad, g_rast, g_attr)
                })?;
            return Ok((g_attr, g_rast));
        }
        let sets = g_attr
            .chunks_mut(per_set.max(1))
            .zip(g_rast.chunks_mut(span * 4))
            .enumerate();
        for (b, (g_attr, g_rast)) in sets {
            let attr = &attr[b * per_set..(b + 1) * per_set];
            let (rast, grad) = (
                &rast[b * span * 4..(b + 1) * span * 4],
                &grad[b * span * c..(b + 1) * span * c],
            );
            let sum = g_rast
                .par_chunks_mut(PIXEL_CHUNK * 4)
                .zip(rast.par_chunks(PIXEL_CHUNK * 4))
                .zip(grad.par_chunks(PIXEL_CHUNK * c.max(1)))
                .with_min_len(piece_len(span.div_ceil(PIXEL_CHUNK)))
                .try_fold(
                    || vec![T::zero(); per_set],
                    |mut acc, ((g_rast, rast), grad)| {
                        self.add_pixels(attr, c, rast, grad, g_rast, &mut acc)?;
                        Ok::<_, candle_core::Error>(acc)
                    },
                )
                .try_reduce_with(|a, b| Ok(add_into(a, b)))
                .transpose()?;
            if let Some(sum) = sum {
                g_attr.copy_from_slice(&sum);
            }
        }
        Ok((g_attr, g_rast))
    }

    /// Adds the gradients of a run of pixels (their `rast` and output gradient `grad`) to their
    /// `g_rast` and to the attribute set `g_attr` (`[V, C]`) of the attributes `attr` they show.
    #[allow(clippy::too_many_arguments)]
    fn add_pixels<T: Real>(
        &self,
        attr: &[T],
        c: usize,
        rast: &[T],
        grad: &[T],
        g_rast: &mut [T],
        g_attr: &mut [T],
    ) -> candle_core::Result<()> {
        let tris = self.triangles.as_slice();
        let pixels = g_rast.chunks_exact_mut(4).zip(rast.chunks_exact(4));
        for ((g_px, px), g) in pixels.zip(grad.chunks_exact(c.max(1))) {
            let Some(t) = triangle_at(px[3]) else {
                continue;
            };
            // Pixels the loss ignores (e.g. masked background) add nothing.
            if g.iter().all(|&g| g == T::zero()) {
                continue;
            }
            let tri = corners_of(tris, t)?;
            let [a0, a1, a2] = tri.map(|v| &attr[v * c..v * c + c]);
            for k in 0..c {
                g_px[0] += g[k] * (a0[k] - a2[k]);
                g_px[1] += g[k] * (a1[k] - a2[k]);
            }
            for (wt, v) in weights(px).into_iter().zip(tri) {
                g_attr[v * c..v * c + c]
                    .iter_mut()
                    .zip(g)
                    .for_each(|(a, &g)| *a += wt * g);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;
    use crate::kernel::testing::{gradient, random, triangle_soup};
    use crate::raster::{RasterOptions, rasterize};
    use ganfit_testkit::max_abs_diff;

    /// Per-image attributes on as many threads as images (or one) are summed one image per
    /// task; otherwise each image's pixels are split between threads. The gradients must agree,
    /// bit for bit between one thread and one task per image.
    #[test]
    fn per_image_and_split_backward_paths_agree() {
        let n = 40;
        let (clip, tris) = triangle_soup(n, 21);
        let (h, w) = (29, 41);
        let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
        let attr = random(&[2, 3 * n, 3], -1.0, 1.0, 23);
        let cot = random(&[2, h, w, 3], -1.0, 1.0, 24);
        let run = |threads: usize| {
            ganfit_testkit::on_threads(threads, || {
                let loss = |a: &Tensor, r: &Tensor| {
                    (interpolate(a, r, &tris).unwrap() * &cot)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                };
                (
                    gradient(&attr, |a| loss(a, &rast)),
                    gradient(&rast, |r| loss(&attr, r)),
                )
            })
        };
        let (attr_one, rast_one) = run(1);
        let (attr_per_image, rast_per_image) = run(2);
        let (attr_split, rast_split) = run(3);
        assert!(max_abs_diff(&attr_one, &attr_one.zeros_like().unwrap()) > 0.0);
        assert_eq!(max_abs_diff(&attr_one, &attr_per_image), 0.0);
        assert_eq!(max_abs_diff(&rast_one, &rast_per_image), 0.0);
        assert!(max_abs_diff(&attr_one, &attr_split) < 1e-12);
        assert_eq!(max_abs_diff(&rast_one, &rast_split), 0.0);
    }
}
