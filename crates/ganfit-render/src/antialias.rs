//! Analytic antialiasing of silhouette edges, which gives the image a gradient with respect to
//! where the silhouettes are (the rasteriser alone has none: coverage is piecewise constant).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{RenderError, Result};
use crate::kernel::{
    Real, check_float, check_rast, copy, cpu_tensor, cross, data, dispatch_float, dot, min_tasks,
    pixel_centre, tracked, triangle_at, with_data,
};
use crate::raster::{check_vertex_count, corners};
use crate::triangles::{NO_NEIGHBOUR, Triangles};

/// Blends colours across silhouette edges in proportion to how far the edge lies from the
/// pixel centres, so that the image depends continuously on vertex positions there.
///
/// For each pair of horizontally or vertically adjacent pixels whose triangle ids differ, the
/// front one of the two triangles (the only one, next to background; else the one with smaller
/// `z/w`) is searched for a silhouette edge crossing the segment between the two pixel centres:
/// an edge on the mesh boundary, or one whose neighbouring triangle faces the other way. If the
/// edge crosses at fraction `α` of the way from the covered centre, the pixel straddled by the
/// edge takes `|α - 0.5|` of its neighbour's colour: the far pixel takes `α - 0.5` of the front
/// triangle's colour when `α > 0.5`, the near pixel takes `0.5 - α` of the far colour otherwise.
/// Pixels away from silhouettes are returned unchanged.
///
/// * `color`: `[B, H, W, C]` image to antialias (typically shaded, from `rast`).
/// * `rast`: `[B, H, W, 4]` from [`crate::rasterize`] with the same `clip_pos` and `triangles`.
/// * `clip_pos`: `[B, V, 4]` clip-space positions; gradients flow to them through `α`.
///
/// Returns `[B, H, W, C]` with gradients to `color` and `clip_pos` (`rast` is only read: the
/// crossings are piecewise constant in it, so it gets no gradient from here). Edges with a
/// corner behind the camera (`w ≤ 0`) are left aliased. The silhouette analysis runs once, in
/// the forward pass, and the backward pass reuses it.
pub fn antialias(
    color: &Tensor,
    rast: &Tensor,
    clip_pos: &Tensor,
    triangles: &Triangles,
) -> Result<Tensor> {
    let (batch, h, w) = check_rast(rast)?;
    check_float(color, "color", "[B, H, W, C]", 4, None)?;
    check_float(clip_pos, "clip_pos", "[B, V, 4]", 3, Some(4))?;
    check_vertex_count(clip_pos, triangles)?;
    if color.dims()[..3] != [batch, h, w] || clip_pos.dim(0)? != batch {
        return Err(RenderError::Shape {
            what: "color and clip_pos",
            expected: format!("[{batch}, {h}, {w}, C] and [{batch}, V, 4] to match rast"),
            got: color.dims().to_vec(),
        });
    }
    if color.dtype() != rast.dtype() || clip_pos.dtype() != rast.dtype() {
        return Err(RenderError::DType {
            what: "color and clip_pos (must match rast)",
            got: color.dtype(),
        });
    }
    let silhouettes = Silhouettes::find(rast, clip_pos, triangles)?;
    blend(color, clip_pos, &silhouettes, false)
}

/// `color`, masked by coverage first if `mask`, with the silhouette crossings blended in; a
/// differentiable function of `color` and `clip_pos`.
pub(crate) fn blend(
    color: &Tensor,
    clip_pos: &Tensor,
    silhouettes: &Arc<Silhouettes>,
    mask: bool,
) -> Result<Tensor> {
    let op = Blend {
        silhouettes: silhouettes.clone(),
        mask,
    };
    Ok(color.contiguous()?.apply_op2(&clip_pos.contiguous()?, op)?)
}

/// The antialiased coverage `[B, H, W, 1]`, differentiable with respect to `clip_pos`.
pub(crate) fn coverage(clip_pos: &Tensor, silhouettes: &Arc<Silhouettes>) -> Result<Tensor> {
    let op = Coverage {
        silhouettes: silhouettes.clone(),
    };
    Ok(clip_pos.contiguous()?.apply_op1(op)?)
}

/// The silhouette crossings of a rasterised batch and its coverage: everything antialiasing
/// needs from `rast`, found once and shared by the forward and backward passes of [`blend`]
/// and [`coverage`] (the crossings are piecewise constant in the positions, their weights are
/// exact functions of them and are differentiated analytically).
pub(crate) struct Silhouettes {
    h: usize,
    w: usize,
    nv: usize,
    images: Vec<ImageSilhouettes>,
    /// Where rast lives on a CUDA device: the crossings found there (`images` is then empty).
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda::GpuCrossings>,
}

/// One image's crossings (in the dtype of the call, widened to f64 exactly) and coverage.
struct ImageSilhouettes {
    crossings: Vec<Crossing<f64>>,
    covered: Vec<bool>,
}

impl Silhouettes {
    /// Analyses `rast` (`[B, H, W, 4]`) drawn from `clip_pos` (`[B, V, 4]`) and `triangles`;
    /// with `find_crossings` false only the coverage is recorded (no antialiasing).
    pub(crate) fn analyse(
        rast: &Tensor,
        clip_pos: &Tensor,
        triangles: &Triangles,
        find_crossings: bool,
    ) -> Result<Arc<Self>> {
        let (batch, h, w) = check_rast(rast)?;
        let nv = clip_pos.dim(1)?;
        #[cfg(feature = "cuda")]
        if rast.device().is_cuda() {
            let gpu = crate::cuda::GpuCrossings::find(rast, clip_pos, triangles, find_crossings)?;
            return Ok(Arc::new(Self {
                h,
                w,
                nv,
                images: Vec::new(),
                gpu: Some(gpu),
            }));
        }
        fn run<T: Real>(
            rast: &Tensor,
            clip: &Tensor,
            triangles: &Triangles,
            find_crossings: bool,
            (batch, h, w, nv): (usize, usize, usize, usize),
        ) -> candle_core::Result<Vec<ImageSilhouettes>> {
            with_data::<T, _>(rast, |rast| {
                with_data::<T, _>(clip, |clip| {
                    Ok((0..batch)
                        .into_par_iter()
                        .with_min_len(min_tasks())
                        .map(|b| {
                            let pixels = h * w;
                            let image = &rast[b * pixels * 4..(b + 1) * pixels * 4];
                            let covered =
                                image.chunks_exact(4).map(|px| px[3] >= T::one()).collect();
                            let crossings = if find_crossings {
                                let verts = &clip[b * nv * 4..(b + 1) * nv * 4];
                                Scene::new(image, verts, triangles, h, w).crossings()
                            } else {
                                Vec::new()
                            };
                            ImageSilhouettes { crossings, covered }
                        })
                        .collect())
                })
            })
        }
        let dims = (batch, h, w, nv);
        let images = match rast.dtype() {
            DType::F32 => run::<f32>(rast, clip_pos, triangles, find_crossings, dims)?,
            _ => run::<f64>(rast, clip_pos, triangles, find_crossings, dims)?,
        };
        Ok(Arc::new(Self {
            h,
            w,
            nv,
            images,
            #[cfg(feature = "cuda")]
            gpu: None,
        }))
    }

    fn find(rast: &Tensor, clip_pos: &Tensor, triangles: &Triangles) -> Result<Arc<Self>> {
        Self::analyse(rast, clip_pos, triangles, true)
    }

    /// The plain coverage `[B, H, W, 1]` in `dtype`, with no gradient.
    pub(crate) fn covered(&self, dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return Ok(gpu.covered(dtype)?);
        }
        let shape = (self.images.len(), self.h, self.w, 1);
        Ok(match dtype {
            DType::F32 => cpu_tensor(self.coverage_image::<f32>(), shape)?,
            _ => cpu_tensor(self.coverage_image::<f64>(), shape)?,
        })
    }
}

/// A silhouette edge between two adjacent pixels and how it blends them.
#[derive(Clone, Copy)]
struct Crossing<T> {
    /// Pixel whose colour is blended.
    target: usize,
    /// Pixel it borrows colour from.
    source: usize,
    /// Fraction of the source colour taken.
    weight: T,
    /// The edge's two vertices.
    edge: [usize; 2],
    /// d weight / d (x, y, w) of the two edge vertices.
    d_weight: [[T; 3]; 2],
}

/// One image's inputs to the pair analysis.
struct Scene<'a, T> {
    rast: &'a [T],
    verts: &'a [T],
    tris: &'a [[u32; 3]],
    /// Per triangle, bit k set when edge k is a silhouette edge in this view.
    silhouettes: Vec<u8>,
    h: usize,
    w: usize,
}

/// Twice the signed volume spanned by the corners' `(x, y, w)`; its sign is the facing.
fn facing<T: Real>(v: &[[T; 4]; 3]) -> bool {
    let a = v.map(|c| [c[0], c[1], c[3]]);
    dot(a[0], cross(a[1], a[2])) > T::zero()
}

impl<T: Real> Scene<'_, T> {
    fn centre(&self, pixel: usize) -> [T; 2] {
        [
            pixel_centre(pixel % self.w, self.w),
            pixel_centre(pixel / self.w, self.h),
        ]
    }

    /// The silhouette crossing between adjacent pixels `p` and `q`, evaluated identically
    /// whichever of the two asks.
    fn crossing(&self, p: usize, q: usize) -> Option<Crossing<T>> {
        let (rp, rq) = (&self.rast[p * 4..p * 4 + 4], &self.rast[q * 4..q * 4 + 4]);
        let (tp, tq) = (triangle_at(rp[3]), triangle_at(rq[3]));
        let (near, far, t) = match (tp, tq) {
            _ if tp == tq => return None,
            (Some(a), None) => (p, q, a),
            (None, Some(b)) => (q, p, b),
            (Some(a), Some(b)) => {
                if rq[2] < rp[2] {
                    (q, p, b)
                } else {
                    (p, q, a)
                }
            }
            (None, None) => return None,
        };
        let silhouettes = *self.silhouettes.get(t)?;
        if silhouettes == 0 {
            return None;
        }
        let tri = &self.tris[t];
        let cs = corners(self.verts, tri);
        let (pn, pf) = (self.centre(near), self.centre(far));
        let mut best: Option<(T, usize, T, T)> = None;
        for k in 0..3 {
            if silhouettes & (1 << k) == 0 {
                continue;
            }
            let (a, b) = (cs[k], cs[(k + 1) % 3]);
            if a[3] <= T::zero() || b[3] <= T::zero() {
                continue;
            }
            let (e1, e2) = ([a[0] / a[3], a[1] / a[3]], [b[0] / b[3], b[1] / b[3]]);
            let side =
                |x: [T; 2]| (e2[0] - e1[0]) * (x[1] - e1[1]) - (e2[1] - e1[1]) * (x[0] - e1[0]);
            let (f_near, f_far) = (side(pn), side(pf));
            let crosses = f_near * f_far < T::zero();
            if !crosses {
                continue;
            }
            let alpha = f_near / (f_near - f_far);
            let hit = [
                pn[0] + alpha * (pf[0] - pn[0]),
                pn[1] + alpha * (pf[1] - pn[1]),
            ];
            let along = [e2[0] - e1[0], e2[1] - e1[1]];
            let beta = ((hit[0] - e1[0]) * along[0] + (hit[1] - e1[1]) * along[1])
                / (along[0] * along[0] + along[1] * along[1]);
            if !(beta >= T::zero() && beta <= T::one()) {
                continue;
            }
            if best.is_none_or(|(best_alpha, ..)| alpha < best_alpha) {
                best = Some((alpha, k, f_near, f_far));
            }
        }
        let (alpha, k, f_near, f_far) = best?;
        let half = T::of(0.5);
        // The straddled pixel is the far one when the edge is past the midpoint.
        let (target, source, weight, sign) = if alpha > half {
            (far, near, alpha - half, T::one())
        } else {
            (near, far, half - alpha, -T::one())
        };
        let (a, b) = (cs[k], cs[(k + 1) % 3]);
        let (e1, e2) = ([a[0] / a[3], a[1] / a[3]], [b[0] / b[3], b[1] / b[3]]);
        // side(x) = (e2 - e1) × (x - e1); differentiate it at both centres w.r.t. e1 and e2.
        let d_side = |x: [T; 2]| [[e2[1] - x[1], x[0] - e2[0]], [x[1] - e1[1], e1[0] - x[0]]];
        let (dn, df) = (d_side(pn), d_side(pf));
        let denom = (f_near - f_far) * (f_near - f_far);
        let d_weight = [(0, a), (1, b)].map(|(i, v)| {
            let d_e = [0, 1].map(|m| sign * (f_near * df[i][m] - f_far * dn[i][m]) / denom);
            let inv_w = T::one() / v[3];
            [
                d_e[0] * inv_w,
                d_e[1] * inv_w,
                -(d_e[0] * v[0] + d_e[1] * v[1]) * inv_w * inv_w,
            ]
        });
        Some(Crossing {
            target,
            source,
            weight,
            edge: [tri[k] as usize, tri[(k + 1) % 3] as usize],
            d_weight,
        })
    }

    /// Every crossing of the image, each pixel pair once (with its left or top pixel first).
    fn crossings(&self) -> Vec<Crossing<f64>> {
        let (h, w) = (self.h, self.w);
        let widen = |x: Crossing<T>| Crossing {
            target: x.target,
            source: x.source,
            weight: x.weight.to_f64(),
            edge: x.edge,
            d_weight: x.d_weight.map(|d| d.map(|v| v.to_f64())),
        };
        // A pair crosses a silhouette only where one of its pixels shows a triangle with a
        // silhouette edge; flagging those pixels first leaves the full test to few pairs.
        let candidate: Vec<bool> = self
            .rast
            .chunks_exact(4)
            .map(|px| {
                triangle_at(px[3])
                    .and_then(|t| self.silhouettes.get(t))
                    .is_some_and(|&bits| bits != 0)
            })
            .collect();
        let candidate = &candidate;
        (0..h)
            .into_par_iter()
            .with_min_len(min_tasks())
            .flat_map_iter(|y| {
                (0..w).flat_map(move |x| {
                    let i = y * w + x;
                    let pair = |j: usize| candidate[i] || candidate[j];
                    let right = (x + 1 < w && pair(i + 1))
                        .then(|| self.crossing(i, i + 1))
                        .flatten();
                    let down = (y + 1 < h && pair(i + w))
                        .then(|| self.crossing(i, i + w))
                        .flatten();
                    right.into_iter().chain(down).map(widen)
                })
            })
            .collect()
    }
}

impl<'a, T: Real> Scene<'a, T> {
    /// One image's rast `[H, W, 4]`, clip positions `[V, 4]` and its silhouette edges.
    fn new(rast: &'a [T], verts: &'a [T], triangles: &'a Triangles, h: usize, w: usize) -> Self {
        let tris = triangles.as_slice();
        let facings: Vec<bool> = tris
            .iter()
            .map(|tri| facing(&corners(verts, tri)))
            .collect();
        // Boundary edges, and edges whose two triangles face opposite ways, can be silhouettes.
        let silhouettes = triangles
            .neighbours()
            .iter()
            .zip(&facings)
            .map(|(nbs, &front)| {
                (0..3).fold(0u8, |bits, k| {
                    let nb = nbs[k];
                    let open = nb == NO_NEIGHBOUR || facings[nb as usize] != front;
                    bits | (u8::from(open) << k)
                })
            })
            .collect();
        Scene {
            rast,
            verts,
            tris,
            silhouettes,
            h,
            w,
        }
    }
}

/// [`blend`]: (color `[B, H, W, C]`, clip_pos) -> blended color.
struct Blend {
    silhouettes: Arc<Silhouettes>,
    /// Multiply the colour by the coverage before blending.
    mask: bool,
}

/// [`coverage`]: clip_pos -> antialiased coverage `[B, H, W, 1]`.
struct Coverage {
    silhouettes: Arc<Silhouettes>,
}

impl Silhouettes {
    fn pixels(&self) -> usize {
        self.h * self.w
    }

    /// Image `b`'s colour at pixel `i`, channel `ch`, masked by coverage if `mask`.
    fn masked<T: Real>(
        &self,
        color: &[T],
        c: usize,
        b: usize,
        mask: bool,
    ) -> impl Fn(usize, usize) -> T {
        let covered = &self.images[b].covered;
        let image = &color[b * self.pixels() * c..(b + 1) * self.pixels() * c];
        move |i, ch| {
            if !mask || covered[i] {
                image[i * c + ch]
            } else {
                T::zero()
            }
        }
    }

    /// The blended colours of every image.
    fn forward<T: Real>(&self, color: &[T], c: usize, mask: bool) -> Vec<T> {
        let per_image = self.pixels() * c;
        let mut out = vec![T::zero(); self.images.len() * per_image];
        out.par_chunks_mut(per_image.max(1))
            .with_min_len(min_tasks())
            .enumerate()
            .for_each(|(b, out)| {
                let col = self.masked(color, c, b, mask);
                for (i, px) in out.chunks_exact_mut(c.max(1)).enumerate() {
                    for (ch, o) in px.iter_mut().enumerate() {
                        *o = col(i, ch);
                    }
                }
                for x in &self.images[b].crossings {
                    let weight = T::of(x.weight);
                    for ch in 0..c {
                        out[x.target * c + ch] += weight * (col(x.source, ch) - col(x.target, ch));
                    }
                }
            });
        out
    }

    /// d color: the identity plus the blend weights, zero where masked away.
    fn color_grad<T: Real>(&self, grad: &[T], c: usize, mask: bool) -> Vec<T> {
        let per_image = self.pixels() * c;
        let mut out = copy(grad);
        out.par_chunks_mut(per_image.max(1))
            .with_min_len(min_tasks())
            .enumerate()
            .for_each(|(b, out)| {
                let g = &grad[b * per_image..(b + 1) * per_image];
                let image = &self.images[b];
                for x in &image.crossings {
                    let weight = T::of(x.weight);
                    for ch in 0..c {
                        let moved = weight * g[x.target * c + ch];
                        out[x.target * c + ch] -= moved;
                        out[x.source * c + ch] += moved;
                    }
                }
                if mask {
                    for (px, &covered) in out.chunks_exact_mut(c.max(1)).zip(&image.covered) {
                        if !covered {
                            px.fill(T::zero());
                        }
                    }
                }
            });
        out
    }

    /// d clip_pos: each crossing's weight gradient scattered to its edge's two vertices.
    fn position_grad<T: Real>(&self, color: &[T], grad: &[T], c: usize, mask: bool) -> Vec<T> {
        let per_clip = self.nv * 4;
        let mut out = vec![T::zero(); self.images.len() * per_clip];
        out.par_chunks_mut(per_clip.max(1))
            .with_min_len(min_tasks())
            .enumerate()
            .for_each(|(b, out)| {
                let col = self.masked(color, c, b, mask);
                let g = &grad[b * self.pixels() * c..(b + 1) * self.pixels() * c];
                for x in &self.images[b].crossings {
                    let g_weight = (0..c).fold(T::zero(), |a, ch| {
                        a + g[x.target * c + ch] * (col(x.source, ch) - col(x.target, ch))
                    });
                    for (v, dw) in x.edge.into_iter().zip(x.d_weight) {
                        out[v * 4] += g_weight * T::of(dw[0]);
                        out[v * 4 + 1] += g_weight * T::of(dw[1]);
                        out[v * 4 + 3] += g_weight * T::of(dw[2]);
                    }
                }
            });
        out
    }

    /// Coverage of every pixel as a one-channel image.
    fn coverage_image<T: Real>(&self) -> Vec<T> {
        let mut out = vec![T::zero(); self.images.len() * self.pixels()];
        out.par_chunks_mut(self.pixels().max(1))
            .zip(self.images.par_iter())
            .with_min_len(min_tasks())
            .for_each(|(out, image)| {
                for (o, &covered) in out.iter_mut().zip(&image.covered) {
                    if covered {
                        *o = T::one();
                    }
                }
            });
        out
    }
}

#[cfg(feature = "cuda")]
impl Silhouettes {
    fn on_gpu(&self) -> candle_core::Result<&crate::cuda::GpuCrossings> {
        match &self.gpu {
            Some(gpu) => Ok(gpu),
            None => candle_core::bail!(
                "silhouettes found on the CPU cannot blend GPU tensors; analyse the GPU rast"
            ),
        }
    }
}

impl CustomOp2 for Blend {
    fn name(&self) -> &'static str {
        "ganfit-antialias"
    }

    fn cpu_fwd(
        &self,
        color: &CpuStorage,
        color_l: &Layout,
        _clip: &CpuStorage,
        _clip_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = color_l.shape().dims4()?.3;
        dispatch_float!(color, T => {
            let out = self.silhouettes.forward::<T>(data(color, color_l)?, c, self.mask);
            Ok((T::to_cpu_storage_owned(out), color_l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        color: &candle_core::CudaStorage,
        color_l: &Layout,
        _clip: &candle_core::CudaStorage,
        _clip_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.silhouettes
            .on_gpu()?
            .blend((color, color_l), self.mask, false)
    }

    fn bwd(
        &self,
        color: &Tensor,
        clip: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.silhouettes.gpu {
            let grad = &grad.contiguous()?;
            let d_color = grad.apply_op1_no_bwd(&crate::cuda::BlendColorGrad {
                crossings: gpu.clone(),
                mask: self.mask,
            })?;
            let d_clip = color.apply_op2_no_bwd(
                grad,
                &crate::cuda::BlendPositionGrad {
                    crossings: gpu.clone(),
                    mask: self.mask,
                    coverage: false,
                    num_vertices: self.silhouettes.nv,
                },
            )?;
            return Ok((tracked(color, d_color), tracked(clip, d_clip)));
        }
        let c = color.dims4()?.3;
        fn run<T: Real>(
            op: &Blend,
            color: &Tensor,
            clip: &Tensor,
            grad: &Tensor,
            c: usize,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let s = &op.silhouettes;
            with_data::<T, _>(color, |col| {
                with_data::<T, _>(grad, |g| {
                    let d_color = s.color_grad(g, c, op.mask);
                    let d_clip = s.position_grad(col, g, c, op.mask);
                    Ok((
                        tracked(color, cpu_tensor(d_color, color.shape())?),
                        tracked(clip, cpu_tensor(d_clip, clip.shape())?),
                    ))
                })
            })
        }
        match color.dtype() {
            DType::F32 => run::<f32>(self, color, clip, grad, c),
            _ => run::<f64>(self, color, clip, grad, c),
        }
    }
}

impl CustomOp1 for Coverage {
    fn name(&self) -> &'static str {
        "ganfit-antialias-coverage"
    }

    fn cpu_fwd(
        &self,
        clip: &CpuStorage,
        _clip_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = &self.silhouettes;
        let shape = Shape::from((s.images.len(), s.h, s.w, 1));
        dispatch_float!(clip, T => {
            let out = s.forward::<T>(&s.coverage_image::<T>(), 1, false);
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        clip: &candle_core::CudaStorage,
        clip_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        // The coverage is read from rast; `clip` only supplies the dtype.
        self.silhouettes
            .on_gpu()?
            .blend((clip, clip_l), false, true)
    }

    fn bwd(
        &self,
        clip: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.silhouettes.gpu {
            let grad = grad.contiguous()?;
            // The coverage comes from rast, so the first input is not read.
            let op = crate::cuda::BlendPositionGrad {
                crossings: gpu.clone(),
                mask: false,
                coverage: true,
                num_vertices: self.silhouettes.nv,
            };
            return Ok(Some(grad.apply_op2_no_bwd(&grad, &op)?));
        }
        fn run<T: Real>(
            s: &Silhouettes,
            clip: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<Tensor> {
            with_data::<T, _>(grad, |g| {
                let d_clip = s.position_grad(&s.coverage_image::<T>(), g, 1, false);
                cpu_tensor(d_clip, clip.shape())
            })
        }
        let s = &self.silhouettes;
        Ok(Some(match clip.dtype() {
            DType::F32 => run::<f32>(s, clip, grad)?,
            _ => run::<f64>(s, clip, grad)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testing::{gradient, random};
    use crate::raster::{RasterOptions, rasterize};
    use ganfit_testkit::max_abs_diff;

    /// The renderer's fused masking ([`blend`] with `mask`) and antialiased [`coverage`] equal
    /// the public [`antialias`] of the premultiplied colour and of the coverage image, on
    /// outputs and on vector-Jacobian products to colour and positions.
    #[test]
    fn masked_blend_and_coverage_match_antialias_of_masked_inputs() {
        let (h, w, nt) = (14, 12, 6);
        // Random triangles in front of the camera (w in [1, 2]), NDC within about ±1.2.
        let raw = random(&[1, 3 * nt, 4], 0.0, 1.0, 11);
        let v: Vec<f64> = raw.flatten_all().unwrap().to_vec1().unwrap();
        let clip: Vec<f64> = v
            .chunks(4)
            .flat_map(|c| {
                let cw = 1.0 + c[3];
                [
                    (c[0] * 2.4 - 1.2) * cw,
                    (c[1] * 2.4 - 1.2) * cw,
                    (c[2] * 1.6 - 0.8) * cw,
                    cw,
                ]
            })
            .collect();
        let clip = cpu_tensor(clip, (1, 3 * nt, 4)).unwrap();
        let tris: Vec<[u32; 3]> = (0..nt as u32)
            .map(|t| [3 * t, 3 * t + 1, 3 * t + 2])
            .collect();
        let tris = Triangles::new(tris, 3 * nt).unwrap();
        let color = random(&[1, h, w, 2], 0.0, 1.0, 12);
        let cot = random(&[1, h, w, 2], -1.0, 1.0, 13);
        let cot1 = random(&[1, h, w, 1], -1.0, 1.0, 14);
        let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
        let sil = Silhouettes::analyse(&rast, &clip, &tris, true).unwrap();
        assert!(
            sil.images[0].crossings.len() > 5,
            "too few silhouette crossings to test"
        );
        let covered = sil.covered(DType::F64).unwrap();

        let fused = |col: &Tensor, c: &Tensor| blend(col, c, &sil, true).unwrap();
        let reference = |col: &Tensor, c: &Tensor| {
            antialias(&col.broadcast_mul(&covered).unwrap(), &rast, c, &tris).unwrap()
        };
        assert!(max_abs_diff(&fused(&color, &clip), &reference(&color, &clip)) < 1e-12);
        let vjp = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let loss = |out: Tensor| (out * &cot).unwrap().sum_all().unwrap();
            (
                gradient(&color, |col| loss(f(col, &clip))),
                gradient(&clip, |c| loss(f(&color, c))),
            )
        };
        let (ours, theirs) = (vjp(&fused), vjp(&reference));
        assert!(max_abs_diff(&ours.0, &theirs.0) < 1e-12);
        assert!(max_abs_diff(&ours.1, &theirs.1) < 1e-10);
        assert!(max_abs_diff(&ours.1, &ours.1.zeros_like().unwrap()) > 1e-3);

        let cov = |c: &Tensor| coverage(c, &sil).unwrap();
        let cov_reference = |c: &Tensor| antialias(&covered, &rast, c, &tris).unwrap();
        assert!(max_abs_diff(&cov(&clip), &cov_reference(&clip)) < 1e-12);
        let loss = |out: Tensor| (out * &cot1).unwrap().sum_all().unwrap();
        let ours = gradient(&clip, |c| loss(cov(c)));
        let theirs = gradient(&clip, |c| loss(cov_reference(c)));
        assert!(max_abs_diff(&ours, &theirs) < 1e-10);
        assert!(max_abs_diff(&ours, &ours.zeros_like().unwrap()) > 1e-3);
    }
}
