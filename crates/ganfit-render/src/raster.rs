//! The rasteriser: which triangle covers each pixel centre, with perspective-correct
//! barycentrics and their gradients with respect to the clip-space vertex positions.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use std::ops::Range;

use rayon::prelude::*;

use crate::error::{RenderError, Result};
use crate::kernel::{
    Real, add_into, check_float, cross, data, dispatch_float, dot, min_tasks, pixel_centre,
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

/// Per-triangle constants: three edge functions over pixel NDC `(x, y)` and the corners' clip
/// `z` and `w`.
#[derive(Clone, Copy)]
struct Setup<T> {
    /// `(a, b, c)` of `e = a x + b y + c`, signed so that the inside is positive. For a pixel
    /// inside, `e_i / Σe` is the barycentric of corner i.
    edges: [[T; 3]; 3],
    /// Whether a centre exactly on edge i (e = 0) belongs to this triangle.
    owns_tie: [bool; 3],
    /// `(z_i, w_i)` of the corners: a covered centre's `z/w` is `Σ e_i z_i / Σ e_i w_i`, a
    /// weighted mean of the corners' `z_i/w_i` (weights `e_i w_i ≥ 0` in front of the
    /// camera). The same value as the triangle's depth plane `Σ z_i (a_j × a_k) / det`, but
    /// that plane's coefficients lose all precision for triangles a fraction of a pixel across
    /// (the cross products cancel): at a camera a metre away with the near plane at 1 cm, an
    /// eyelid's plane put its pixels tens of millimetres off, piercing it with the eyeball
    /// behind.
    depth: [[T; 2]; 3],
    /// Inclusive pixel bounding box `[x0, x1] × [y0, y1]`.
    bbox: [u32; 4],
    /// Triangle index + 1, as written to the id channel.
    id: T,
}

/// Clip-space corners `(x, y, z, w)` of triangle `tri` in one image's vertex array.
pub(crate) fn corners<T: Real>(verts: &[T], tri: &[u32; 3]) -> [[T; 4]; 3] {
    let corner = |i: u32| {
        let c = &verts[i as usize * 4..i as usize * 4 + 4];
        [c[0], c[1], c[2], c[3]]
    };
    [corner(tri[0]), corner(tri[1]), corner(tri[2])]
}

/// Where a vertex lies relative to the view volume's depth range, and which pixel centres
/// its projection could bound.
#[derive(Clone, Copy, Default)]
struct Projected {
    /// `FRONT`, `BEYOND_FAR` and `BEFORE_NEAR` bits.
    flags: u8,
    /// For `FRONT` vertices, the pixel range a bounding box starting or ending at the projection
    /// would cover: `[first column, last column, first row, last row]` (see [`PixelSpan`]).
    span: [i32; 4],
}

/// `w > 0` and `z ≥ -w`: in front of the near plane, so its projection bounds the triangle.
const FRONT: u8 = 1;
/// `z > w`.
const BEYOND_FAR: u8 = 2;
/// `z < -w`.
const BEFORE_NEAR: u8 = 4;

/// The pixel centres `c` along one axis of `size` pixels that a bounding box `[lo, hi]` in NDC
/// may cover, before clamping to the image: `ceil(lo') ..= floor(min(hi', size - 1))`, where
/// `'` maps NDC to pixel units (centres at integers) with a slack that absorbs rounding, so
/// that the exact edge tests, not the box, decide about centres on the boundary.
///
/// Both ends are monotone in their bound, so for a box spanned by points, the span of the box
/// is the min (first) and max (last) of the points' own spans: they are computed per vertex.
struct PixelSpan;

impl PixelSpan {
    fn first(lo: f64, size: usize) -> i32 {
        ceil_to_i32((lo + 1.0) * size as f64 * 0.5 - 0.5 - 1e-3)
    }

    fn last(hi: f64, size: usize) -> i32 {
        floor_to_i32(((hi + 1.0) * size as f64 * 0.5 - 0.5 + 1e-3).min(size as f64 - 1.0))
    }

    /// The clamped range `[first, last]`, or `None` when it holds no pixel.
    fn clamp(first: i32, last: i32) -> Option<[u32; 2]> {
        let first = first.max(0);
        (last >= first).then_some([first as u32, last as u32])
    }
}

/// `x.ceil() as i32` (saturating, NaN to 0), without the call into libm that `ceil` is on
/// baseline x86-64 (no SSE4.1 rounding instruction): four such calls per vertex were a fifth
/// of the vertex projection's time.
fn ceil_to_i32(x: f64) -> i32 {
    // `as` truncates towards zero, saturating: one step up where that fell below `x`.
    let t = x as i32;
    if f64::from(t) < x {
        t.saturating_add(1)
    } else {
        t
    }
}

/// `x.floor() as i32` (saturating, NaN to 0), like [`ceil_to_i32`].
fn floor_to_i32(x: f64) -> i32 {
    let t = x as i32;
    if f64::from(t) > x {
        t.saturating_sub(1)
    } else {
        t
    }
}

/// Classifies and projects every vertex once, so that triangle setup shares the divisions.
/// `min_tasks` is rayon's `with_min_len` for the vertex chunks.
fn project_vertices<T: Real>(
    verts: &[T],
    width: usize,
    height: usize,
    min_tasks: usize,
) -> Vec<Projected> {
    let mut out = vec![Projected::default(); verts.len() / 4];
    out.par_chunks_mut(SETUP_CHUNK)
        .zip(verts.par_chunks(SETUP_CHUNK * 4))
        .with_min_len(min_tasks)
        .for_each(|(out, verts)| {
            for (o, c) in out.iter_mut().zip(verts.chunks_exact(4)) {
                let front = c[3] > T::zero() && c[2] >= -c[3];
                let mut flags = u8::from(front) * FRONT;
                flags |= u8::from(c[2] > c[3]) * BEYOND_FAR;
                flags |= u8::from(c[2] < -c[3]) * BEFORE_NEAR;
                o.flags = flags;
                if front {
                    let inv_w = T::one() / c[3];
                    let (x, y) = ((c[0] * inv_w).to_f64(), (c[1] * inv_w).to_f64());
                    o.span = [
                        PixelSpan::first(x, width),
                        PixelSpan::last(x, width),
                        PixelSpan::first(y, height),
                        PixelSpan::last(y, height),
                    ];
                }
            }
        });
    out
}

/// Inclusive pixel bounding box `[x0, x1, y0, y1]` of the centres a triangle may cover: the
/// screen bounds of the triangle clipped to the near plane, or `None` when it covers none.
fn pixel_bbox<T: Real>(
    v: &[[T; 4]; 3],
    p: [&Projected; 3],
    width: usize,
    height: usize,
) -> Option<[u32; 4]> {
    let all = p[0].flags & p[1].flags & p[2].flags;
    if all & (BEYOND_FAR | BEFORE_NEAR) != 0 {
        return None;
    }
    let span = if all & FRONT != 0 {
        // The common case: wholly in front of the near plane, so the projections bound it.
        let first = |k: usize| p[0].span[k].min(p[1].span[k]).min(p[2].span[k]);
        let last = |k: usize| p[0].span[k].max(p[1].span[k]).max(p[2].span[k]);
        [first(0), last(1), first(2), last(3)]
    } else {
        let (lo, hi) = clipped_bounds(v)?;
        [
            PixelSpan::first(lo[0], width),
            PixelSpan::last(hi[0], width),
            PixelSpan::first(lo[1], height),
            PixelSpan::last(hi[1], height),
        ]
    };
    let [x0, x1] = PixelSpan::clamp(span[0], span[1])?;
    let [y0, y1] = PixelSpan::clamp(span[2], span[3])?;
    Some([x0, x1, y0, y1])
}

/// Edge functions and depth plane of a triangle whose bounding box is `bbox`, or `None` when
/// it is degenerate or culled.
fn setup<T: Real>(
    v: &[[T; 4]; 3],
    bbox: [u32; 4],
    cull_backfaces: bool,
    id: T,
) -> Option<Setup<T>> {
    // Homogeneous 2D rasterisation: with a_i = (x_i, y_i, w_i) and p = (x, y, 1), the edge
    // function e_i = p · (a_j × a_k) is linear in p and proportional to the clip-space
    // barycentric of corner i, with Σe of the sign of det(a) exactly where w > 0.
    let a = [
        [v[0][0], v[0][1], v[0][3]],
        [v[1][0], v[1][1], v[1][3]],
        [v[2][0], v[2][1], v[2][3]],
    ];
    let mut edges = [cross(a[1], a[2]), cross(a[2], a[0]), cross(a[0], a[1])];
    let det = dot(a[0], edges[0]);
    // det > 0 is clockwise on screen (back-facing) for any w signs, since det equals the
    // camera-space triple product p0 · (p1 × p2) times a positive factor.
    if !det.is_finite() || det == T::zero() || (cull_backfaces && det > T::zero()) {
        return None;
    }
    let sign = if det > T::zero() { T::one() } else { -T::one() };
    for e in &mut edges {
        for c in e.iter_mut() {
            *c *= sign;
        }
    }
    let owns = |e: &[T; 3]| e[0] > T::zero() || (e[0] == T::zero() && e[1] > T::zero());
    Some(Setup {
        edges,
        owns_tie: [owns(&edges[0]), owns(&edges[1]), owns(&edges[2])],
        depth: v.map(|c| [c[2], c[3]]),
        bbox,
        id,
    })
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
        // When the images share the threads out evenly, each is drawn by one thread, each
        // triangle as soon as it is set up, with no list of setups and no bins; otherwise the
        // triangles of an image are binned into bands of rows drawn in parallel. Either way
        // every pixel sees the same triangles in the same order.
        let one_thread_per_image = batch.is_multiple_of(rayon::current_num_threads());
        out.par_chunks_mut(h * w * 4)
            .with_min_len(min_tasks())
            .enumerate()
            .for_each(|(b, image)| {
                let verts = &clip[b * nv * 4..(b + 1) * nv * 4];
                if one_thread_per_image {
                    let projected = project_vertices(verts, w, h, usize::MAX);
                    for (t, tri) in self.triangles.as_slice().iter().enumerate() {
                        if let Some(s) = self.triangle_setup(verts, &projected, t, tri) {
                            draw(image, 0, w, &s, &xs, &ys);
                        }
                    }
                    return;
                }
                let projected = project_vertices(verts, w, h, 1);
                let setups = self.setups(verts, &projected);
                let bands = Bands::new(&setups, h);
                image
                    .par_chunks_mut(BAND_ROWS * w * 4)
                    .enumerate()
                    .for_each(|(band, rows)| {
                        for &s in bands.members(band) {
                            draw(rows, band * BAND_ROWS, w, &setups[s as usize], &xs, &ys);
                        }
                    });
            });
        out
    }

    /// Triangle `t`'s setup, if it may cover a pixel centre.
    fn triangle_setup<T: Real>(
        &self,
        verts: &[T],
        projected: &[Projected],
        t: usize,
        tri: &[u32; 3],
    ) -> Option<Setup<T>> {
        let v = corners(verts, tri);
        let p = tri.map(|i| &projected[i as usize]);
        let bbox = pixel_bbox(&v, p, self.width, self.height)?;
        setup(&v, bbox, self.cull_backfaces, T::of((t + 1) as f64))
    }

    /// The triangles that may cover a pixel centre, in index order.
    fn setups<T: Real>(&self, verts: &[T], projected: &[Projected]) -> Vec<Setup<T>> {
        self.triangles
            .as_slice()
            .par_chunks(SETUP_CHUNK)
            .enumerate()
            .flat_map_iter(|(chunk, tris)| {
                tris.iter().enumerate().filter_map(move |(i, tri)| {
                    self.triangle_setup(verts, projected, chunk * SETUP_CHUNK + i, tri)
                })
            })
            .collect()
    }
}

/// For each band of rows, the indices into the setups overlapping it, in triangle order:
/// a counting sort into one flat list.
struct Bands {
    /// Band `k`'s members are `members[start[k]..start[k + 1]]`.
    start: Vec<u32>,
    members: Vec<u32>,
}

impl Bands {
    fn new<T>(setups: &[Setup<T>], height: usize) -> Self {
        let n = height.div_ceil(BAND_ROWS);
        let span = |s: &Setup<T>| s.bbox[2] as usize / BAND_ROWS..=s.bbox[3] as usize / BAND_ROWS;
        let mut start = vec![0u32; n + 1];
        for s in setups {
            for band in span(s) {
                start[band + 1] += 1;
            }
        }
        for k in 0..n {
            start[k + 1] += start[k];
        }
        let mut next = start.clone();
        let mut members = vec![0u32; start[n] as usize];
        for (i, s) in setups.iter().enumerate() {
            for band in span(s) {
                members[next[band] as usize] = i as u32;
                next[band] += 1;
            }
        }
        Self { start, members }
    }

    fn members(&self, band: usize) -> &[u32] {
        &self.members[self.start[band] as usize..self.start[band + 1] as usize]
    }
}

/// `z/w` at a covered centre with edge values `e` (see [`Setup::depth`]).
#[inline]
fn depth_at<T: Real>(depth: &[[T; 2]; 3], e: &[T; 3]) -> T {
    let z = e[0] * depth[0][0] + e[1] * depth[1][0] + e[2] * depth[2][0];
    let w = e[0] * depth[0][1] + e[1] * depth[1][1] + e[2] * depth[2][1];
    z / w
}

/// Depth-tests one triangle into the rows `row0..` held by `rows`.
fn draw<T: Real>(rows: &mut [T], row0: usize, w: usize, s: &Setup<T>, xs: &[T], ys: &[T]) {
    let [x0, x1, y0, y1] = s.bbox.map(|b| b as usize);
    let row_end = row0 + rows.len() / (w * 4);
    let [ea, eb, ec] = s.edges;
    // A centre on an edge (e = 0, either sign of zero) is inside when the edge owns ties.
    let inside = |e: T, owns: bool| if owns { e >= T::zero() } else { e > T::zero() };
    for y in y0.max(row0)..=y1.min(row_end - 1) {
        let py = ys[y];
        // Row-then-column evaluation keeps shared edges bit-exact negatives of each other.
        let (ra, rb, rc) = (ea[1] * py + ea[2], eb[1] * py + eb[2], ec[1] * py + ec[2]);
        let line = &mut rows[(y - row0) * w * 4..(y - row0 + 1) * w * 4];
        for x in x0..=x1 {
            let px = xs[x];
            let e = [ea[0] * px + ra, eb[0] * px + rb, ec[0] * px + rc];
            if !(inside(e[0], s.owns_tie[0])
                && inside(e[1], s.owns_tie[1])
                && inside(e[2], s.owns_tie[2]))
            {
                continue;
            }
            let sum = e[0] + e[1] + e[2];
            if sum <= T::zero() {
                continue;
            }
            let z = depth_at(&s.depth, &e);
            if !(z >= -T::one() && z <= T::one()) {
                continue;
            }
            let px_out = &mut line[x * 4..x * 4 + 4];
            if px_out[3] != T::zero() && z >= px_out[2] {
                continue;
            }
            px_out.copy_from_slice(&[e[0] / sum, e[1] / sum, z, s.id]);
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let size = (self.height, self.width);
        crate::cuda::rasterize(&self.triangles, size, self.cull_backfaces, storage, layout)
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
    #[allow(clippy::too_many_arguments)]
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
        let mut out = vec![T::zero(); batch * nv * 4];
        // Images run in parallel; a lone image is split into one row range per thread.
        let pieces = rayon::current_num_threads().div_ceil(batch).max(1);
        let rows_per_piece = h.div_ceil(pieces).max(1);
        out.par_chunks_mut((nv * 4).max(1))
            .with_min_len(min_tasks())
            .enumerate()
            .for_each(|(b, dst)| {
                let image = Image {
                    verts: &clip[b * nv * 4..(b + 1) * nv * 4],
                    rast: &rast[b * h * w * 4..(b + 1) * h * w * 4],
                    grad: &grad[b * h * w * 4..(b + 1) * h * w * 4],
                    height: h,
                    width: w,
                };
                if pieces == 1 {
                    self.add_rows(&image, 0..h, dst);
                    return;
                }
                let sum = (0..h.div_ceil(rows_per_piece))
                    .into_par_iter()
                    .map(|piece| {
                        let rows = piece * rows_per_piece..((piece + 1) * rows_per_piece).min(h);
                        let mut acc = vec![T::zero(); nv * 4];
                        self.add_rows(&image, rows, &mut acc);
                        acc
                    })
                    .reduce_with(add_into);
                if let Some(sum) = sum {
                    dst.copy_from_slice(&sum);
                }
            });
        out
    }

    /// Adds the gradient of image rows `rows` to `out` (`[V, 4]`), a band of rows at a time:
    /// the band's pixel terms are summed per triangle, then each triangle touched does its
    /// cross products once (see [`TriangleSums`]).
    fn add_rows<T: Real>(&self, image: &Image<'_, T>, rows: Range<usize>, out: &mut [T]) {
        let tris = self.triangles.as_slice();
        let (h, w) = (image.height, image.width);
        let xs: Vec<T> = (0..w).map(|i| pixel_centre(i, w)).collect();
        let mut sums = TriangleSums::new(tris.len());
        for band in rows.clone().step_by(BAND_ROWS) {
            for y in band..(band + BAND_ROWS).min(rows.end) {
                let py = pixel_centre::<T>(y, h);
                let row = y * w * 4..(y + 1) * w * 4;
                let (rast, grad) = (&image.rast[row.clone()], &image.grad[row]);
                // Runs of one triangle along the row share its constants.
                let mut x = 0;
                while x < w {
                    let id = rast[x * 4 + 3];
                    let start = x;
                    x += 1;
                    while x < w && rast[x * 4 + 3] == id {
                        x += 1;
                    }
                    if let Some(t) = triangle_at(id) {
                        let run = start * 4..x * 4;
                        let tri = &tris[t];
                        let terms = run_terms(
                            image.verts,
                            tri,
                            &xs[start..x],
                            py,
                            &rast[run.clone()],
                            &grad[run],
                        );
                        if let Some(terms) = terms {
                            sums.add(t, terms);
                        }
                    }
                }
            }
            sums.flush(image.verts, tris, out);
        }
    }
}

/// One image's slices of the backward's inputs.
struct Image<'a, T> {
    verts: &'a [T],
    rast: &'a [T],
    grad: &'a [T],
    height: usize,
    width: usize,
}

/// Per corner i of a triangle: `Σ g_e[i] det · (x, y, 1)` over its pixels, then `Σ g_zw b_i` and
/// `Σ g_zw b_i z/w` (see [`run_terms`]).
type PixelTerms<T> = [[T; 5]; 3];

/// The sums of [`PixelTerms`] of the triangles touched since the last flush.
struct TriangleSums<T> {
    /// Per triangle, its index into `sums`, or `u32::MAX` when untouched.
    slot: Vec<u32>,
    sums: Vec<(u32, PixelTerms<T>)>,
}

impl<T: Real> TriangleSums<T> {
    fn new(triangles: usize) -> Self {
        Self {
            slot: vec![u32::MAX; triangles],
            sums: Vec::new(),
        }
    }

    fn add(&mut self, t: usize, terms: PixelTerms<T>) {
        let slot = self.slot[t];
        if slot == u32::MAX {
            self.slot[t] = self.sums.len() as u32;
            self.sums.push((t as u32, terms));
            return;
        }
        let sum = &mut self.sums[slot as usize].1;
        for (sum, terms) in sum.iter_mut().zip(terms) {
            sum.iter_mut().zip(terms).for_each(|(a, b)| *a += b);
        }
    }

    /// Turns the sums into vertex gradients, added to `out` (`[V, 4]`), and starts afresh.
    ///
    /// With `a_i = (x_i, y_i, w_i)`, pixel `p = (x, y, 1)` and edge functions
    /// `e_i = p · (a_j × a_k) = det(p, a_j, a_k)` for (i, j, k) cyclic, the pixel VJP with
    /// respect to corner m's `(x, y, w)` is `(g_e[m-1] a[m+1] - g_e[m+1] a[m-1]) × p`, linear in
    /// the pixel terms `g_e[i] p`: only their sums need the cross products.
    fn flush(&mut self, verts: &[T], tris: &[[u32; 3]], out: &mut [T]) {
        for (t, terms) in self.sums.drain(..) {
            self.slot[t as usize] = u32::MAX;
            let tri = &tris[t as usize];
            let a = corners(verts, tri).map(|c| [c[0], c[1], c[3]]);
            let inv_det = T::one() / dot(a[0], cross(a[1], a[2]));
            let lever = terms.map(|c| [c[0] * inv_det, c[1] * inv_det, c[2] * inv_det]);
            for (m, &v) in tri.iter().enumerate() {
                let (prev, next) = ((m + 2) % 3, (m + 1) % 3);
                let ga = sub(cross(a[next], lever[prev]), cross(a[prev], lever[next]));
                let d = &mut out[v as usize * 4..v as usize * 4 + 4];
                d[0] += ga[0];
                d[1] += ga[1];
                d[2] += terms[m][3];
                d[3] += ga[2] - terms[m][4];
            }
        }
    }
}

/// The [`PixelTerms`] of `g · (u, v, z/w)` summed over a run of pixels of row `py` covered by
/// triangle `tri`, at columns `xs`, with their `rast` and `grad` values; `None` when the run
/// has no gradient.
///
/// With `S = Σ e_i`, the barycentrics are `b_i = e_i / S`, and since
/// `Σ_i w_i (a_j × a_k) = (0, 0, det)`, the interpolated `w` is `Σ b_i w_i = det / S`: the
/// barycentrics give `S` without the edge functions.
fn run_terms<T: Real>(
    verts: &[T],
    tri: &[u32; 3],
    xs: &[T],
    py: T,
    rast: &[T],
    grad: &[T],
) -> Option<PixelTerms<T>> {
    let v = corners(verts, tri);
    let (z, w) = (v.map(|c| c[2]), v.map(|c| c[3]));
    let zero = T::zero();
    let mut sums = [[zero; 5]; 3];
    let mut any = false;
    for ((px, g), &x) in rast.chunks_exact(4).zip(grad.chunks_exact(4)).zip(xs) {
        if g[0] == zero && g[1] == zero && g[2] == zero {
            continue;
        }
        any = true;
        let bary = [px[0], px[1], T::one() - px[0] - px[1]];
        let zw = px[2];
        let w_p = bary[0] * w[0] + bary[1] * w[1] + bary[2] * w[2];
        // z/w = Σ b_i z_i / Σ b_i w_i: explicit terms in z_i, w_i plus the path through b.
        // (Interpolation passes no gradient to z/w, so the division is usually skipped.)
        let g_zw = if g[2] == zero { zero } else { g[2] / w_p };
        let g_bary = [
            g[0] + g_zw * (z[0] - zw * w[0]),
            g[1] + g_zw * (z[1] - zw * w[1]),
            g_zw * (z[2] - zw * w[2]),
        ];
        let g_dot = g_bary[0] * bary[0] + g_bary[1] * bary[1] + g_bary[2] * bary[2];
        for (i, sum) in sums.iter_mut().enumerate() {
            // g_e = (g_bary - g_dot) / S = (g_bary - g_dot) w_p / det.
            let g_e_det = (g_bary[i] - g_dot) * w_p;
            sum[0] += g_e_det * x;
            sum[2] += g_e_det;
            let scale = g_zw * bary[i];
            sum[3] += scale;
            sum[4] += scale * zw;
        }
    }
    for sum in &mut sums {
        sum[1] = sum[2] * py;
    }
    any.then_some(sums)
}

fn sub<T: Real>(a: [T; 3], b: [T; 3]) -> [T; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        clip: &candle_core::CudaStorage,
        clip_l: &Layout,
        rast: &candle_core::CudaStorage,
        rast_l: &Layout,
        grad: &candle_core::CudaStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [(clip, clip_l), (rast, rast_l), (grad, grad_l)];
        crate::cuda::rasterize_grad(&self.triangles, inputs)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;
    use crate::kernel::testing::{gradient, random, triangle_soup};
    use ganfit_testkit::max_abs_diff;

    /// The integer rounding helpers equal `ceil`/`floor` followed by a saturating cast, also at
    /// the ends of the `i32` range, for infinities and NaN.
    #[test]
    fn rounding_helpers_equal_ceil_and_floor() {
        let edge = [i32::MIN, i32::MIN + 1, -1, 0, 1, i32::MAX - 1, i32::MAX].map(f64::from);
        let mut xs: Vec<f64> = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            1e-300,
            -1e-300,
            2.5,
            -2.5,
            1e10,
            -1e10,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MAX,
            f64::MIN,
        ]
        .to_vec();
        for e in edge {
            xs.extend([e, e - 0.5, e + 0.5, e.next_down(), e.next_up()]);
        }
        let mut state = 7u64;
        for _ in 0..10_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            xs.push((state >> 11) as f64 / (1u64 << 53) as f64 * 2000.0 - 1000.0);
        }
        for x in xs {
            assert_eq!(ceil_to_i32(x), x.ceil() as i32, "ceil {x}");
            assert_eq!(floor_to_i32(x), x.floor() as i32, "floor {x}");
        }
    }

    /// With as many threads as images (or one), the rasteriser draws each triangle as soon as
    /// it is set up and sums each image's backward in one piece; with more it bins triangles
    /// into bands and splits the rows. All must give the same image, bit for bit, and the same
    /// gradient.
    #[test]
    fn one_thread_and_banded_paths_agree() {
        let n = 60;
        let (clip, tris) = triangle_soup(n, 11);
        let (h, w) = (37, 53);
        let cot = random(&[2, h, w, 4], -1.0, 1.0, 13);
        let run = |threads: usize| {
            ganfit_testkit::on_threads(threads, || {
                let draw = |c: &Tensor| rasterize(c, &tris, h, w, RasterOptions::default());
                let rast: Vec<f64> = draw(&clip)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let grad = gradient(&clip, |c| {
                    (draw(c).unwrap() * &cot).unwrap().sum_all().unwrap()
                });
                (rast, grad)
            })
        };
        let (rast_one, grad_one) = run(1);
        let (rast_per_image, grad_per_image) = run(2);
        let (rast_many, grad_many) = run(3);
        let covered = rast_one.chunks(4).filter(|p| p[3] > 0.0).count();
        assert!(covered > h * w / 2, "only {covered} pixels covered");
        assert!(rast_one == rast_many);
        assert!(rast_one == rast_per_image);
        let scale = max_abs_diff(&grad_one, &grad_one.zeros_like().unwrap());
        assert!(scale > 0.0);
        assert!(max_abs_diff(&grad_one, &grad_many) < 1e-12 * scale);
        assert!(max_abs_diff(&grad_one, &grad_per_image) < 1e-12 * scale);
    }
}
