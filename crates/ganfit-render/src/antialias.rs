//! Analytic antialiasing of silhouette edges, which gives the image a gradient with respect to
//! where the silhouettes are (the rasteriser alone has none: coverage is piecewise constant).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{RenderError, Result};
use crate::kernel::{
    Real, add_into, check_float, check_rast, cross, data, dispatch_float, dot, piece_len,
    pixel_centre, triangle_at,
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
/// Returns `[B, H, W, C]` with gradients to `color` and `clip_pos` (`rast` gets zeros). Edges with a
/// corner behind the camera (`w ≤ 0`) are left aliased.
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
    let op = Antialias {
        triangles: triangles.clone(),
    };
    Ok(color
        .contiguous()?
        .apply_op3(&rast.contiguous()?, &clip_pos.contiguous()?, op)?)
}

struct Antialias {
    triangles: Triangles,
}

/// A silhouette edge between two adjacent pixels and how it blends them.
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

    /// The (up to four) crossings involving pixel `i`.
    fn crossings_at(&self, i: usize) -> impl Iterator<Item = Crossing<T>> + '_ {
        let (x, y) = (i % self.w, i / self.w);
        let left = (x > 0).then(|| (i - 1, i));
        let right = (x + 1 < self.w).then(|| (i, i + 1));
        let up = (y > 0).then(|| (i - self.w, i));
        let down = (y + 1 < self.h).then(|| (i, i + self.w));
        [left, right, up, down]
            .into_iter()
            .flatten()
            .filter_map(|(p, q)| self.crossing(p, q))
    }
}

impl Antialias {
    /// Image `b`'s slices of the inputs and its silhouette edges.
    #[allow(clippy::too_many_arguments)]
    fn scene<'a, T: Real>(
        &'a self,
        rast: &'a [T],
        clip: &'a [T],
        b: usize,
        pixels: usize,
        nv: usize,
        h: usize,
        w: usize,
    ) -> Scene<'a, T> {
        let verts = &clip[b * nv * 4..(b + 1) * nv * 4];
        let tris = self.triangles.as_slice();
        let facings: Vec<bool> = tris
            .iter()
            .map(|tri| facing(&corners(verts, tri)))
            .collect();
        // Boundary edges, and edges whose two triangles face opposite ways, can be silhouettes.
        let silhouettes = self
            .triangles
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
            rast: &rast[b * pixels * 4..(b + 1) * pixels * 4],
            verts,
            tris,
            silhouettes,
            h,
            w,
        }
    }
}

/// Sizes of an antialiasing call.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    w: usize,
    c: usize,
    nv: usize,
}

impl Dims {
    fn new(image: &Shape, clip: &Shape) -> candle_core::Result<Self> {
        let (_, h, w, c) = image.dims4()?;
        let (_, nv, _) = clip.dims3()?;
        Ok(Self { h, w, c, nv })
    }
}

impl Antialias {
    fn forward<T: Real>(&self, color: &[T], rast: &[T], clip: &[T], d: Dims) -> Vec<T> {
        let Dims { h, w, c, nv } = d;
        let pixels = h * w;
        let mut out = color.to_vec();
        out.par_chunks_mut((pixels * c).max(1))
            .enumerate()
            .for_each(|(b, image)| {
                let scene = self.scene(rast, clip, b, pixels, nv, h, w);
                let src = &color[b * pixels * c..(b + 1) * pixels * c];
                image
                    .par_chunks_mut(c.max(1))
                    .enumerate()
                    .for_each(|(i, dst)| {
                        for x in scene.crossings_at(i).filter(|x| x.target == i) {
                            for ch in 0..c {
                                dst[ch] += x.weight * (src[x.source * c + ch] - src[i * c + ch]);
                            }
                        }
                    });
            });
        out
    }

    /// d color: the identity plus the blend weights, gathered per pixel.
    fn color_grad<T: Real>(&self, rast: &[T], clip: &[T], grad: &[T], d: Dims) -> Vec<T> {
        let Dims { h, w, c, nv } = d;
        let pixels = h * w;
        let mut out = grad.to_vec();
        out.par_chunks_mut((pixels * c).max(1))
            .enumerate()
            .for_each(|(b, image)| {
                let scene = self.scene(rast, clip, b, pixels, nv, h, w);
                let g = &grad[b * pixels * c..(b + 1) * pixels * c];
                image
                    .par_chunks_mut(c.max(1))
                    .enumerate()
                    .for_each(|(i, dst)| {
                        for x in scene.crossings_at(i) {
                            let from = if x.target == i { i } else { x.target };
                            let scale = if x.target == i { -x.weight } else { x.weight };
                            for ch in 0..c {
                                dst[ch] += scale * g[from * c + ch];
                            }
                        }
                    });
            });
        out
    }

    /// d clip_pos: each crossing once (from its left or top pixel), scattered to the edge.
    fn position_grad<T: Real>(
        &self,
        color: &[T],
        rast: &[T],
        clip: &[T],
        grad: &[T],
        d: Dims,
    ) -> Vec<T> {
        let Dims { h, w, c, nv } = d;
        let pixels = h * w;
        let mut out = vec![T::zero(); clip.len()];
        out.par_chunks_mut((nv * 4).max(1))
            .enumerate()
            .for_each(|(b, dst)| {
                let scene = self.scene(rast, clip, b, pixels, nv, h, w);
                let col = &color[b * pixels * c..(b + 1) * pixels * c];
                let g = &grad[b * pixels * c..(b + 1) * pixels * c];
                let sum = (0..pixels)
                    .into_par_iter()
                    .with_min_len(piece_len(pixels))
                    .fold(
                        || vec![T::zero(); nv * 4],
                        |mut acc, i| {
                            let (x, y) = (i % w, i / w);
                            let pairs = [(x + 1 < w).then(|| i + 1), (y + 1 < h).then(|| i + w)];
                            for x in pairs
                                .into_iter()
                                .flatten()
                                .filter_map(|q| scene.crossing(i, q))
                            {
                                let (t, s) = (x.target * c, x.source * c);
                                let g_weight = (0..c).fold(T::zero(), |a, ch| {
                                    a + g[t + ch] * (col[s + ch] - col[t + ch])
                                });
                                for (v, dw) in x.edge.into_iter().zip(x.d_weight) {
                                    acc[v * 4] += g_weight * dw[0];
                                    acc[v * 4 + 1] += g_weight * dw[1];
                                    acc[v * 4 + 3] += g_weight * dw[2];
                                }
                            }
                            acc
                        },
                    )
                    .reduce(|| vec![T::zero(); nv * 4], add_into);
                dst.copy_from_slice(&sum);
            });
        out
    }
}

impl CustomOp3 for Antialias {
    fn name(&self) -> &'static str {
        "ganfit-antialias"
    }

    fn cpu_fwd(
        &self,
        color: &CpuStorage,
        color_l: &Layout,
        rast: &CpuStorage,
        rast_l: &Layout,
        clip: &CpuStorage,
        clip_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::new(color_l.shape(), clip_l.shape())?;
        dispatch_float!(color, T => {
            let out = self.forward::<T>(data(color, color_l)?, data(rast, rast_l)?, data(clip, clip_l)?, d);
            Ok((T::to_cpu_storage_owned(out), color_l.shape().clone()))
        })
    }

    fn bwd(
        &self,
        color: &Tensor,
        rast: &Tensor,
        clip: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let triangles = self.triangles.clone();
        let grad_color = rast.apply_op3_no_bwd(clip, &grad, &ColorGrad(Antialias { triangles }))?;
        // Colour and its gradient travel as one tensor so that a three-input op sees all four.
        let color_and_grad = Tensor::cat(&[color, &grad], 3)?;
        let triangles = self.triangles.clone();
        let grad_clip =
            color_and_grad.apply_op3_no_bwd(rast, clip, &PositionGrad(Antialias { triangles }))?;
        // rast gets no gradient, but candle's backward needs one for every tracked input.
        Ok((Some(grad_color), Some(rast.zeros_like()?), Some(grad_clip)))
    }
}

/// d color of [`Antialias`]: (rast, clip_pos, d out) -> d color.
struct ColorGrad(Antialias);

impl CustomOp3 for ColorGrad {
    fn name(&self) -> &'static str {
        "ganfit-antialias-color-grad"
    }

    fn cpu_fwd(
        &self,
        rast: &CpuStorage,
        rast_l: &Layout,
        clip: &CpuStorage,
        clip_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::new(grad_l.shape(), clip_l.shape())?;
        dispatch_float!(rast, T => {
            let out = self.0.color_grad::<T>(data(rast, rast_l)?, data(clip, clip_l)?, data(grad, grad_l)?, d);
            Ok((T::to_cpu_storage_owned(out), grad_l.shape().clone()))
        })
    }
}

/// d clip_pos of [`Antialias`]: (cat(color, d out) along channels, rast, clip_pos) -> d clip_pos.
struct PositionGrad(Antialias);

impl CustomOp3 for PositionGrad {
    fn name(&self) -> &'static str {
        "ganfit-antialias-position-grad"
    }

    fn cpu_fwd(
        &self,
        both: &CpuStorage,
        both_l: &Layout,
        rast: &CpuStorage,
        rast_l: &Layout,
        clip: &CpuStorage,
        clip_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c2) = both_l.shape().dims4()?;
        let c = c2 / 2;
        let d = Dims::new(&Shape::from((b, h, w, c)), clip_l.shape())?;
        dispatch_float!(both, T => {
            let both = data::<T>(both, both_l)?;
            let mut color = Vec::with_capacity(both.len() / 2);
            let mut grad = Vec::with_capacity(both.len() / 2);
            for px in both.chunks(c2) {
                color.extend_from_slice(&px[..c]);
                grad.extend_from_slice(&px[c..]);
            }
            let out = self.0.position_grad::<T>(&color, data(rast, rast_l)?, data(clip, clip_l)?, &grad, d);
            Ok((T::to_cpu_storage_owned(out), clip_l.shape().clone()))
        })
    }
}
