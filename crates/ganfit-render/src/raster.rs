//! The rasteriser: which triangle covers each pixel centre, with perspective-correct
//! barycentrics and their gradients with respect to the clip-space vertex positions.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::error::{RenderError, Result};
use crate::kernel::{
    Real, add_into, check_float, cross, data, dispatch_float, dot, piece_len, pixel_centre,
    triangle_at,
};
use crate::triangles::Triangles;

/// Rows per bin: triangles are sorted into horizontal bands of this many rows, and bands are
/// rasterised in parallel.
const BAND_ROWS: usize = 8;

/// Triangles set up per parallel task.
const SETUP_CHUNK: usize = 4096;

/// Choices for [`rasterize`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RasterOptions {
    /// Drop back-facing triangles. A triangle faces the camera when its corners appear
    /// counter-clockwise in the image as displayed (row 0 at the top); for a closed mesh whose
    /// `(v1 - v0) × (v2 - v0)` normals point outwards, that is the side seen from outside.
    pub cull_backfaces: bool,
}

/// Rasterises triangles given in homogeneous clip space.
///
/// * `clip_pos`: `[B, V, 4]` f32 or f64 clip-space positions `(x, y, z, w)` (see
///   [`crate::Camera::to_clip`]). Pixel (column i, row j) has its centre at normalised device
///   coordinates `(x/w, y/w) = ((2i + 1) / W - 1, (2j + 1) / H - 1)`: row 0 is at `y/w ≈ -1`.
/// * `triangles`: the mesh, indexing the V vertices.
///
/// Returns `rast`, `[B, H, W, 4]` in the dtype of `clip_pos`, per pixel:
/// * `u, v`: perspective-correct barycentrics of the pixel centre; the surface point is
///   `u · p0 + v · p1 + (1 - u - v) · p2` for the triangle's corners p0, p1, p2 (clip space).
/// * `z/w`: normalised depth, -1 at the near plane, +1 at the far plane.
/// * `id`: triangle index + 1, or 0 where no triangle covers the pixel (then all four are 0).
///
/// A pixel is covered when its centre lies inside the triangle and `-1 ≤ z/w ≤ 1`; triangles that
/// cross the near plane are clipped by that depth test (their barycentrics still refer to the
/// whole triangle), and corners behind the camera (`w ≤ 0`) are handled by homogeneous edge
/// functions without any division by `w`. Centres exactly on an edge shared by two triangles go
/// to exactly one of them (top-left rule: an edge owns its centres when it is a left edge, or a
/// horizontal top edge, of its triangle). The nearest `z/w` wins; on an exact depth tie the
/// lower triangle index wins. Degenerate (zero-area) triangles cover nothing.
///
/// Gradients flow from `u`, `v` and `z/w` to `clip_pos` (all four coordinates) with the
/// triangle ids held fixed; the id channel carries no gradient. Outside covered pixels the
/// gradient is zero, so silhouettes only move through [`crate::antialias`].
pub fn rasterize(
    clip_pos: &Tensor,
    triangles: &Triangles,
    height: usize,
    width: usize,
    options: RasterOptions,
) -> Result<Tensor> {
    check_float(clip_pos, "clip_pos", "[B, V, 4]", 3, Some(4))?;
    if height == 0 || width == 0 {
        return Err(RenderError::EmptyImage { height, width });
    }
    check_vertex_count(clip_pos, triangles)?;
    let op = Rasterize {
        triangles: triangles.clone(),
        height,
        width,
        cull_backfaces: options.cull_backfaces,
    };
    Ok(clip_pos.contiguous()?.apply_op1(op)?)
}

/// Errors unless `positions` (`[B, V, _]`) has exactly as many vertices as `triangles` expects.
pub(crate) fn check_vertex_count(positions: &Tensor, triangles: &Triangles) -> Result<()> {
    let nv = positions.dim(1)?;
    if nv != triangles.num_vertices() {
        return Err(RenderError::Shape {
            what: "clip_pos",
            expected: format!(
                "[B, {}, 4] (one row per mesh vertex)",
                triangles.num_vertices()
            ),
            got: positions.dims().to_vec(),
        });
    }
    Ok(())
}

struct Rasterize {
    triangles: Triangles,
    height: usize,
    width: usize,
    cull_backfaces: bool,
}

/// Per-triangle constants: three edge functions and a depth plane over pixel NDC `(x, y)`.
#[derive(Clone, Copy)]
struct Setup<T> {
    /// `(a, b, c)` of `e = a x + b y + c`, signed so that the inside is positive. For a pixel
    /// inside, `e_i / Σe` is the barycentric of corner i.
    edges: [[T; 3]; 3],
    /// Whether a centre exactly on edge i (e = 0) belongs to this triangle.
    owns_tie: [bool; 3],
    /// `z/w = depth[0] x + depth[1] y + depth[2]`.
    depth: [T; 3],
    /// Inclusive pixel bounding box `[x0, x1] × [y0, y1]`.
    bbox: [u32; 4],
}

/// Clip-space corners `(x, y, z, w)` of triangle `tri` in one image's vertex array.
pub(crate) fn corners<T: Real>(verts: &[T], tri: &[u32; 3]) -> [[T; 4]; 3] {
    tri.map(|i| {
        let i = i as usize * 4;
        [verts[i], verts[i + 1], verts[i + 2], verts[i + 3]]
    })
}

fn setup<T: Real>(
    v: &[[T; 4]; 3],
    cull_backfaces: bool,
    width: usize,
    height: usize,
) -> Option<Setup<T>> {
    // Homogeneous 2D rasterisation: with a_i = (x_i, y_i, w_i) and p = (x, y, 1), the edge
    // function e_i = p · (a_j × a_k) is linear in p and proportional to the clip-space
    // barycentric of corner i, with Σe of the sign of det(a) exactly where w > 0.
    let bbox = pixel_bbox(v, width, height)?;
    let a = v.map(|c| [c[0], c[1], c[3]]);
    let edges = [cross(a[1], a[2]), cross(a[2], a[0]), cross(a[0], a[1])];
    let det = dot(a[0], edges[0]);
    // det > 0 is clockwise on screen (back-facing) for any w signs, since det equals the
    // camera-space triple product p0 · (p1 × p2) times a positive factor.
    if !det.is_finite() || det == T::zero() || (cull_backfaces && det > T::zero()) {
        return None;
    }
    let sign = if det > T::zero() { T::one() } else { -T::one() };
    let edges = edges.map(|e| e.map(|c| c * sign));
    let owns_tie = edges.map(|[ea, eb, _]| ea > T::zero() || (ea == T::zero() && eb > T::zero()));
    let inv_det = T::one() / det;
    let depth = [0, 1, 2].map(|m| {
        (v[0][2] * edges[0][m] + v[1][2] * edges[1][m] + v[2][2] * edges[2][m]) * sign * inv_det
    });
    Some(Setup {
        edges,
        owns_tie,
        depth,
        bbox: bbox.map(|b| b as u32),
    })
}

/// Pixels whose centres may be covered: the screen bounds of the triangle clipped to the near
/// plane, or `None` when it lies entirely outside the view volume.
fn pixel_bbox<T: Real>(v: &[[T; 4]; 3], width: usize, height: usize) -> Option<[usize; 4]> {
    let all = |f: fn(&[T; 4]) -> bool| v.iter().all(f);
    if all(|c| c[2] > c[3]) || all(|c| c[2] < -c[3]) {
        return None;
    }
    let (lo, hi) = if all(|c| c[3] > T::zero() && c[2] >= -c[3]) {
        // The common case: wholly in front of the near plane, so project the corners.
        let p = v.map(|c| {
            let inv_w = T::one() / c[3];
            [c[0] * inv_w, c[1] * inv_w]
        });
        let lo = [0, 1].map(|k| Float::min(Float::min(p[0][k], p[1][k]), p[2][k]).to_f64());
        let hi = [0, 1].map(|k| Float::max(Float::max(p[0][k], p[1][k]), p[2][k]).to_f64());
        (lo, hi)
    } else {
        clipped_bounds(v)?
    };
    // Pixel i's centre is at NDC (2i + 1) / size - 1; the slack absorbs rounding so that the
    // exact edge tests, not the box, decide about centres on the boundary.
    let range = |lo: f64, hi: f64, size: usize| {
        let s = size as f64;
        let first = ceil_at_least_zero((lo + 1.0) * s * 0.5 - 0.5 - 1e-3);
        let last = floor_at_most(((hi + 1.0) * s * 0.5 - 0.5 + 1e-3).min(s - 1.0))?;
        (first <= last).then_some((first, last))
    };
    let (x0, x1) = range(lo[0], hi[0], width)?;
    let (y0, y1) = range(lo[1], hi[1], height)?;
    Some([x0, x1, y0, y1])
}

// floor/ceil by casts: they are library calls on baseline x86-64, and this runs per triangle.
fn ceil_at_least_zero(a: f64) -> usize {
    if a.is_nan() || a <= 0.0 {
        return 0;
    }
    let t = a as usize;
    t + usize::from((t as f64) < a)
}

/// `floor(b)`, or `None` when it is negative (or NaN).
fn floor_at_most(b: f64) -> Option<usize> {
    (b >= 0.0).then_some(b as usize)
}

/// NDC bounds of the part of a triangle in front of the near plane (`z >= -w`); the whole
/// screen when the clipped part still reaches `w <= 0` (only with unusual projections).
fn clipped_bounds<T: Real>(v: &[[T; 4]; 3]) -> Option<([f64; 2], [f64; 2])> {
    let v = v.map(|c| c.map(|x| x.to_f64()));
    let outside = |f: &dyn Fn(&[f64; 4]) -> bool| v.iter().all(f);
    if outside(&|c| c[0] > c[3])
        || outside(&|c| c[0] < -c[3])
        || outside(&|c| c[1] > c[3])
        || outside(&|c| c[1] < -c[3])
    {
        return None;
    }
    let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
    let mut include = |c: [f64; 4]| {
        if c[3].is_nan() || c[3] <= 0.0 {
            lo = [-1.0; 2];
            hi = [1.0; 2];
        }
        for k in 0..2 {
            lo[k] = lo[k].min(c[k] / c[3]);
            hi[k] = hi[k].max(c[k] / c[3]);
        }
    };
    for i in 0..3 {
        let (p, q) = (v[i], v[(i + 1) % 3]);
        let (dp, dq) = (p[2] + p[3], q[2] + q[3]);
        if dp >= 0.0 {
            include(p);
        }
        if (dp >= 0.0) != (dq >= 0.0) {
            let t = dp / (dp - dq);
            include([0, 1, 2, 3].map(|k| p[k] + t * (q[k] - p[k])));
        }
    }
    Some((lo, hi))
}

impl Rasterize {
    fn forward<T: Real>(&self, clip: &[T], batch: usize, nv: usize) -> Vec<T> {
        let (h, w) = (self.height, self.width);
        let xs: Vec<T> = (0..w).map(|i| pixel_centre(i, w)).collect();
        let ys: Vec<T> = (0..h).map(|j| pixel_centre(j, h)).collect();
        let mut out = vec![T::zero(); batch * h * w * 4];
        out.par_chunks_mut(h * w * 4)
            .enumerate()
            .for_each(|(b, image)| {
                let verts = &clip[b * nv * 4..(b + 1) * nv * 4];
                // Chunks keep the setup parallel for single images without a per-item collect.
                let tris = self.triangles.as_slice();
                let setups: Vec<(T, Setup<T>)> = tris
                    .par_chunks(SETUP_CHUNK)
                    .enumerate()
                    .map(|(chunk, tris)| {
                        let mut out = Vec::with_capacity(tris.len());
                        for (i, tri) in tris.iter().enumerate() {
                            if let Some(s) = setup(&corners(verts, tri), self.cull_backfaces, w, h)
                            {
                                out.push((T::of((chunk * SETUP_CHUNK + i + 1) as f64), s));
                            }
                        }
                        out
                    })
                    .collect::<Vec<_>>()
                    .concat();
                let bands = bin_by_band(&setups, h);
                image
                    .par_chunks_mut(BAND_ROWS * w * 4)
                    .zip(bands.par_iter())
                    .enumerate()
                    .for_each(|(band, (rows, members))| {
                        for &s in members {
                            let (id, s) = &setups[s as usize];
                            draw(rows, band * BAND_ROWS, w, *id, s, &xs, &ys);
                        }
                    });
            });
        out
    }
}

/// For each band of rows, the indices into `setups` overlapping it, in triangle order.
fn bin_by_band<T>(setups: &[(T, Setup<T>)], height: usize) -> Vec<Vec<u32>> {
    let mut bands = vec![Vec::new(); height.div_ceil(BAND_ROWS)];
    for (i, (_, s)) in setups.iter().enumerate() {
        for band in &mut bands[s.bbox[2] as usize / BAND_ROWS..=s.bbox[3] as usize / BAND_ROWS] {
            band.push(i as u32);
        }
    }
    bands
}

/// Depth-tests one triangle into the rows `row0..` held by `rows`.
fn draw<T: Real>(rows: &mut [T], row0: usize, w: usize, id: T, s: &Setup<T>, xs: &[T], ys: &[T]) {
    let [x0, x1, y0, y1] = s.bbox.map(|b| b as usize);
    let row_end = row0 + rows.len() / (w * 4);
    let [ea, eb, ec] = s.edges;
    for y in y0.max(row0)..=y1.min(row_end - 1) {
        let py = ys[y];
        // Row-then-column evaluation keeps shared edges bit-exact negatives of each other.
        let (ra, rb, rc) = (ea[1] * py + ea[2], eb[1] * py + eb[2], ec[1] * py + ec[2]);
        let z_row = s.depth[1] * py + s.depth[2];
        let line = &mut rows[(y - row0) * w * 4..(y - row0 + 1) * w * 4];
        for x in x0..=x1 {
            let px = xs[x];
            let e = [ea[0] * px + ra, eb[0] * px + rb, ec[0] * px + rc];
            let inside = (0..3).all(|i| e[i] > T::zero() || (e[i] == T::zero() && s.owns_tie[i]));
            let sum = e[0] + e[1] + e[2];
            if !inside || sum <= T::zero() {
                continue;
            }
            let z = s.depth[0] * px + z_row;
            if !(z >= -T::one() && z <= T::one()) {
                continue;
            }
            let px_out = &mut line[x * 4..x * 4 + 4];
            if px_out[3] != T::zero() && z >= px_out[2] {
                continue;
            }
            px_out.copy_from_slice(&[e[0] / sum, e[1] / sum, z, id]);
        }
    }
}

impl CustomOp1 for Rasterize {
    fn name(&self) -> &'static str {
        "ganfit-rasterize"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, nv, _) = layout.shape().dims3()?;
        let shape = Shape::from((batch, self.height, self.width, 4));
        dispatch_float!(storage, T => {
            let out = self.forward::<T>(data(storage, layout)?, batch, nv);
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), shape))
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = arg.apply_op3_no_bwd(
            res,
            &grad_res.contiguous()?,
            &RasterizeGrad {
                triangles: self.triangles.clone(),
            },
        )?;
        Ok(Some(grad))
    }
}

/// Vector-Jacobian product of [`Rasterize`]: (clip_pos, rast, d rast) -> d clip_pos.
struct RasterizeGrad {
    triangles: Triangles,
}

impl RasterizeGrad {
    fn backward<T: Real>(
        &self,
        clip: &[T],
        rast: &[T],
        grad: &[T],
        batch: usize,
        nv: usize,
        h: usize,
        w: usize,
    ) -> Vec<T> {
        let tris = self.triangles.as_slice();
        let xs: Vec<T> = (0..w).map(|i| pixel_centre(i, w)).collect();
        let mut out = vec![T::zero(); batch * nv * 4];
        out.par_chunks_mut((nv * 4).max(1))
            .enumerate()
            .for_each(|(b, dst)| {
                let verts = &clip[b * nv * 4..(b + 1) * nv * 4];
                let image = b * h * w * 4;
                let sum = (0..h)
                    .into_par_iter()
                    .with_min_len(piece_len(h))
                    .fold(
                        || vec![T::zero(); nv * 4],
                        |mut acc, y| {
                            let py = pixel_centre::<T>(y, h);
                            for (x, &px) in xs.iter().enumerate() {
                                let at = image + (y * w + x) * 4;
                                let Some(t) = triangle_at(rast[at + 3]) else {
                                    continue;
                                };
                                let g = [grad[at], grad[at + 1], grad[at + 2]];
                                if g.iter().all(|&g| g == T::zero()) {
                                    continue;
                                }
                                let p = [px, py, T::one()];
                                let tri = &tris[t];
                                let vjp = pixel_vjp(&corners(verts, tri), p, g);
                                for (k, &vi) in tri.iter().enumerate() {
                                    let d = &mut acc[vi as usize * 4..vi as usize * 4 + 4];
                                    d.iter_mut().zip(vjp[k]).for_each(|(d, g)| *d += g);
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

/// Gradient of `g · (u, v, z/w)` at pixel `p` with respect to the three corners `(x, y, z, w)`.
fn pixel_vjp<T: Real>(v: &[[T; 4]; 3], p: [T; 3], g: [T; 3]) -> [[T; 4]; 3] {
    let a = v.map(|c| [c[0], c[1], c[3]]);
    let c = [cross(a[1], a[2]), cross(a[2], a[0]), cross(a[0], a[1])];
    let e = c.map(|c| dot(p, c));
    let inv_s = T::one() / (e[0] + e[1] + e[2]);
    let bary = e.map(|e| e * inv_s);
    let w_at = bary[0] * v[0][3] + bary[1] * v[1][3] + bary[2] * v[2][3];
    let z_at = bary[0] * v[0][2] + bary[1] * v[1][2] + bary[2] * v[2][2];
    let inv_w = T::one() / w_at;
    let zw = z_at * inv_w;
    // z/w = Σ b_i z_i / Σ b_i w_i: explicit terms in z_i, w_i plus the path through b.
    let g_zw = g[2] * inv_w;
    let g_bary: [T; 3] = std::array::from_fn(|i| {
        let direct = if i < 2 { g[i] } else { T::zero() };
        direct + g_zw * (v[i][2] - zw * v[i][3])
    });
    let g_dot = g_bary[0] * bary[0] + g_bary[1] * bary[1] + g_bary[2] * bary[2];
    let g_e = g_bary.map(|gb| (gb - g_dot) * inv_s);
    // e_i = det(p, a_j, a_k) = a_j · (a_k × p) = a_k · (p × a_j) for (i, j, k) cyclic, so corner
    // m collects g_e[m-1] (a_{m+1} × p) - g_e[m+1] (a_{m-1} × p) = (…) × p: one cross each.
    let ga: [[T; 3]; 3] = std::array::from_fn(|m| {
        let (prev, next) = ((m + 2) % 3, (m + 1) % 3);
        let lever: [T; 3] =
            std::array::from_fn(|q| g_e[prev] * a[next][q] - g_e[next] * a[prev][q]);
        cross(lever, p)
    });
    std::array::from_fn(|i| {
        let scale = g_zw * bary[i];
        [ga[i][0], ga[i][1], scale, ga[i][2] - scale * zw]
    })
}

impl CustomOp3 for RasterizeGrad {
    fn name(&self) -> &'static str {
        "ganfit-rasterize-grad"
    }

    fn cpu_fwd(
        &self,
        clip: &CpuStorage,
        clip_l: &Layout,
        rast: &CpuStorage,
        rast_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, nv, _) = clip_l.shape().dims3()?;
        let (_, h, w, _) = rast_l.shape().dims4()?;
        dispatch_float!(clip, T => {
            let out = self.backward::<T>(
                data(clip, clip_l)?, data(rast, rast_l)?, data(grad, grad_l)?, batch, nv, h, w,
            );
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(out), clip_l.shape().clone()))
        })
    }
}
