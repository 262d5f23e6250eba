//! Rasteriser edge cases, checked against an independent camera-space ray caster.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{Rng, bumpy_sphere, camera};
use ganfit_render::{Camera, RasterOptions, Triangles, antialias, interpolate, rasterize};
use ganfit_testkit::max_abs_diff;

/// Ray through the centre of pixel (x, y) hits triangle `p` (camera space) at depth t with
/// barycentrics b: returns (b0, b1, t) when the hit is inside (no near/far test).
fn ray_hit(cam: &Camera, p: &[[f64; 3]; 3], x: usize, y: usize) -> Option<(f64, f64, f64, f64)> {
    let d = [
        (x as f64 - cam.cx) / cam.fx,
        (y as f64 - cam.cy) / cam.fy,
        1.0,
    ];
    let sub = |a: [f64; 3], b: [f64; 3]| [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    let cross = |a: [f64; 3], b: [f64; 3]| {
        [
            a[1] * b[2] - a[2] * b[1],
            a[2] * b[0] - a[0] * b[2],
            a[0] * b[1] - a[1] * b[0],
        ]
    };
    let dot = |a: [f64; 3], b: [f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    // Möller–Trumbore with the barycentrics of corners 1 and 2.
    let (e1, e2) = (sub(p[1], p[0]), sub(p[2], p[0]));
    let h = cross(d, e2);
    let det = dot(e1, h);
    if det.abs() < 1e-14 {
        return None;
    }
    let s = sub([0.0; 3], p[0]);
    let b1 = dot(s, h) / det;
    let q = cross(s, e1);
    let b2 = dot(d, q) / det;
    let t = dot(e2, q) / det;
    let b0 = 1.0 - b1 - b2;
    // Smallest barycentric, to skip centres too close to an edge for a fair comparison.
    let margin = b0.min(b1).min(b2);
    (margin >= 0.0).then_some((b0, b1, t, margin))
}

fn clip_of(cam: &Camera, pts: &[[f64; 3]]) -> Tensor {
    let flat: Vec<f64> = pts.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (1, pts.len(), 3), &Device::Cpu).unwrap();
    cam.to_clip(&t).unwrap()
}

fn pixel(rast: &Tensor, y: usize, x: usize) -> Vec<f64> {
    rast.get(0)
        .unwrap()
        .get(y)
        .unwrap()
        .get(x)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Renders random camera-space triangles, some behind the camera or through the near plane,
/// and compares every pixel with the ray caster (nearest hit within [near, far]).
fn compare_with_ray_caster(width: usize, height: usize, seed: u64) -> usize {
    let cam = camera(width, height);
    let mut rng = Rng::new(seed);
    let mut pts = Vec::new();
    for _ in 0..6 {
        for _ in 0..3 {
            let z = rng.uniform(-0.5, 3.0);
            pts.push([
                rng.uniform(-0.4, 0.4) * z.abs().max(0.3),
                rng.uniform(-0.4, 0.4) * z.abs().max(0.3),
                z,
            ]);
        }
    }
    let tris: Vec<[u32; 3]> = (0..6u32).map(|t| [3 * t, 3 * t + 1, 3 * t + 2]).collect();
    let triangles = Triangles::new(tris, pts.len()).unwrap();
    let rast = rasterize(
        &clip_of(&cam, &pts),
        &triangles,
        height,
        width,
        RasterOptions::default(),
    )
    .unwrap();
    let (n, f) = (cam.near, cam.far);
    let mut checked = 0;
    for y in 0..height {
        'pixel: for x in 0..width {
            let mut best: Option<(usize, f64, f64, f64)> = None;
            for t in 0..6 {
                let corners = [pts[3 * t], pts[3 * t + 1], pts[3 * t + 2]];
                if let Some((b0, b1, z, margin)) = ray_hit(&cam, &corners, x, y) {
                    let near_boundary =
                        margin < 1e-6 || (z - n).abs() < 1e-6 || (z - f).abs() < 1e-6;
                    let visible = z >= n && z <= f;
                    if near_boundary && (visible || z > 0.0) {
                        continue 'pixel;
                    }
                    if visible && best.is_none_or(|(_, _, _, bz)| z < bz) {
                        best = Some((t, b0, b1, z));
                    }
                }
            }
            let got = pixel(&rast, y, x);
            match best {
                None => assert_eq!(got, vec![0.0; 4], "pixel ({x}, {y}) should be empty"),
                Some((t, b0, b1, z)) => {
                    let zw = ((f + n) / (f - n) * z - 2.0 * f * n / (f - n)) / z;
                    let want = [b0, b1, zw, (t + 1) as f64];
                    for (g, w) in got.iter().zip(want) {
                        assert!(
                            (g - w).abs() < 1e-9,
                            "pixel ({x}, {y}): got {got:?}, want {want:?}"
                        );
                    }
                }
            }
            checked += 1;
        }
    }
    checked
}

#[test]
fn matches_ray_casting_including_near_plane_and_behind_camera() {
    assert!(compare_with_ray_caster(23, 17, 11) > 300);
    assert!(compare_with_ray_caster(40, 9, 12) > 300);
}

#[test]
fn one_pixel_and_non_square_images() {
    assert_eq!(compare_with_ray_caster(1, 1, 13), 1);
    assert!(compare_with_ray_caster(3, 7, 14) > 15);
    // A triangle covering the whole view covers the single pixel of a 1x1 image.
    let cam = camera(1, 1);
    let big = [[-5.0, -5.0, 2.0], [5.0, -5.0, 2.0], [0.0, 5.0, 2.0]];
    let tris = Triangles::new(vec![[0, 1, 2]], 3).unwrap();
    let rast = rasterize(&clip_of(&cam, &big), &tris, 1, 1, RasterOptions::default()).unwrap();
    assert_eq!(pixel(&rast, 0, 0)[3], 1.0);
}

#[test]
fn triangles_behind_the_camera_draw_nothing_and_have_zero_gradient() {
    let cam = camera(8, 8);
    let behind = [[-1.0, -1.0, -2.0], [1.0, -1.0, -2.0], [0.0, 1.0, -2.5]];
    let tris = Triangles::new(vec![[0, 1, 2]], 3).unwrap();
    let var = Var::from_tensor(&clip_of(&cam, &behind)).unwrap();
    let rast = rasterize(var.as_tensor(), &tris, 8, 8, RasterOptions::default()).unwrap();
    assert_eq!(
        rast.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    let grads = rast.sum_all().unwrap().backward().unwrap();
    let g = grads.get(var.as_tensor()).unwrap();
    assert_eq!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
}

#[test]
fn degenerate_triangles_cover_nothing_and_stay_finite() {
    let cam = camera(10, 10);
    let pts = [
        [0.0, 0.0, 2.0],
        [0.3, 0.3, 2.0],
        [0.6, 0.6, 2.0],
        [-0.2, 0.1, 2.0],
    ];
    // Collinear corners, a repeated corner, and one corner used thrice.
    let tris = Triangles::new(vec![[0, 1, 2], [0, 3, 3], [1, 1, 1]], 4).unwrap();
    let var = Var::from_tensor(&clip_of(&cam, &pts)).unwrap();
    let rast = rasterize(var.as_tensor(), &tris, 10, 10, RasterOptions::default()).unwrap();
    assert_eq!(
        rast.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    let color = Tensor::ones((1, 10, 10, 1), DType::F64, &Device::Cpu).unwrap();
    let out = antialias(&color, &rast, var.as_tensor(), &tris).unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g.iter().all(|v| v.is_finite()));
}

#[test]
fn empty_mesh_gives_an_empty_image_with_gradients() {
    let clip = Tensor::zeros((2, 0, 4), DType::F32, &Device::Cpu).unwrap();
    let tris = Triangles::new(vec![], 0).unwrap();
    let var = Var::from_tensor(&clip).unwrap();
    let rast = rasterize(var.as_tensor(), &tris, 5, 6, RasterOptions::default()).unwrap();
    assert_eq!(rast.dims(), &[2, 5, 6, 4]);
    assert_eq!(
        rast.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let attr = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
    let img = interpolate(&attr, &rast, &tris).unwrap();
    assert_eq!(img.dims(), &[2, 5, 6, 3]);
    assert!(rast.sum_all().unwrap().backward().is_ok());
}

#[test]
fn exact_depth_ties_go_to_the_lower_triangle_id() {
    let cam = camera(9, 9);
    let pts = [[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [0.0, 1.0, 2.0]];
    // The same corners in the same order: the same depths to the last bit. (Listed with its
    // corners rotated, a triangle's depths may differ from its own in the last bit.)
    let tris = Triangles::new(vec![[0, 1, 2], [0, 1, 2], [0, 1, 2]], 3).unwrap();
    let rast = rasterize(&clip_of(&cam, &pts), &tris, 9, 9, RasterOptions::default()).unwrap();
    let ids: Vec<f64> = rast
        .narrow(3, 3, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(ids.contains(&1.0));
    assert!(ids.iter().all(|&i| i == 0.0 || i == 1.0), "{ids:?}");
}

#[test]
fn shared_edges_through_pixel_centres_cover_each_pixel_once() {
    // A grid whose vertices sit exactly on pixel centres, so that many centres lie on edges.
    let (w, h, cells) = (16usize, 16usize, 5usize);
    let centre = |i: usize, n: usize| (2 * i + 1) as f64 / n as f64 - 1.0;
    let mut clip = Vec::new();
    for j in 0..=cells {
        for i in 0..=cells {
            clip.extend([centre(2 + 2 * i, w), centre(3 + 2 * j, h), 0.0, 1.0]);
        }
    }
    let id = |i: usize, j: usize| (j * (cells + 1) + i) as u32;
    let mut tris = Vec::new();
    for j in 0..cells {
        for i in 0..cells {
            // Alternate diagonals so that edges run in all directions.
            if (i + j) % 2 == 0 {
                tris.extend([
                    [id(i, j), id(i, j + 1), id(i + 1, j)],
                    [id(i + 1, j), id(i, j + 1), id(i + 1, j + 1)],
                ]);
            } else {
                tris.extend([
                    [id(i, j), id(i + 1, j + 1), id(i + 1, j)],
                    [id(i, j), id(i, j + 1), id(i + 1, j + 1)],
                ]);
            }
        }
    }
    let nv = clip.len() / 4;
    let clip = Tensor::from_vec(clip, (1, nv, 4), &Device::Cpu).unwrap();
    let mut count = vec![0u32; w * h];
    for tri in &tris {
        let single = Triangles::new(vec![*tri], nv).unwrap();
        let rast = rasterize(&clip, &single, h, w, RasterOptions::default()).unwrap();
        let ids: Vec<f64> = rast
            .narrow(3, 3, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (c, i) in count.iter_mut().zip(ids) {
            *c += u32::from(i > 0.0);
        }
    }
    // Pixel centres strictly inside the grid's outline are covered exactly once; the outline's
    // left and top edges own their centres, the right and bottom ones do not.
    for y in 0..h {
        for x in 0..w {
            let inside = (2..2 + 2 * cells).contains(&x) && (3..3 + 2 * cells).contains(&y);
            assert_eq!(count[y * w + x], u32::from(inside), "pixel ({x}, {y})");
        }
    }
}

#[test]
fn backface_culling_follows_the_documented_winding() {
    let cam = camera(12, 12);
    // In camera space (x right, y down): centre, right, down is clockwise on screen, and its
    // normal (v1 - v0) × (v2 - v0) = +z points away from the camera: a back face.
    let pts = [[0.0, 0.0, 2.0], [0.5, 0.0, 2.0], [0.0, 0.5, 2.0]];
    let clip = clip_of(&cam, &pts);
    let cull = RasterOptions {
        cull_backfaces: true,
    };
    let count = |tris: Vec<[u32; 3]>, opts| {
        let t = Triangles::new(tris, 3).unwrap();
        let r = rasterize(&clip, &t, 12, 12, opts).unwrap();
        r.narrow(3, 3, 1)
            .unwrap()
            .gt(0.0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    assert!(count(vec![[0, 1, 2]], RasterOptions::default()) > 0.0);
    assert_eq!(count(vec![[0, 1, 2]], cull), 0.0);
    assert!(count(vec![[0, 2, 1]], cull) > 0.0);

    // A closed outward mesh looks the same with and without culling.
    let (verts, tris) = bumpy_sphere(12, 16, 0.8, 0.1);
    let nv = verts.len() / 3;
    let mut pts: Vec<f64> = verts.clone();
    pts.chunks_mut(3).for_each(|p| p[2] += 3.0);
    let clip = cam
        .to_clip(&Tensor::from_vec(pts, (1, nv, 3), &Device::Cpu).unwrap())
        .unwrap();
    let tris = Triangles::new(tris, nv).unwrap();
    let a = rasterize(&clip, &tris, 12, 12, RasterOptions::default()).unwrap();
    let b = rasterize(&clip, &tris, 12, 12, cull).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// Two jittered sheets of triangles a fraction of a pixel across, the back one a millimetre
/// behind the front one, a metre from a camera whose near plane is at 1 cm (the fit's depth
/// range): in f32 every pixel shows the front sheet, at a depth between its triangle's
/// corners'. (A depth plane per triangle lost its precision for such triangles: eyelids were
/// pierced by the eyeballs behind them, in a spray of single pixels.)
#[test]
fn sub_pixel_triangles_keep_their_depth_order_far_from_the_near_plane() {
    let (size, cells, extent_mm, distance_mm) = (24usize, 240usize, 48.0, 1000.0);
    let cam = Camera::new(700.0, 700.0, 11.5, 11.5, size, size, 10.0, 1e4).unwrap();
    let mut rng = Rng::new(5);
    let step = extent_mm / cells as f64;
    let mut points = Vec::new();
    let mut tris = Vec::new();
    for sheet in 0..2 {
        let first = points.len() as u32;
        for row in 0..=cells {
            for column in 0..=cells {
                let jitter = |rng: &mut Rng| rng.uniform(-0.3, 0.3) * step;
                points.push([
                    column as f64 * step - extent_mm / 2.0 + jitter(&mut rng),
                    row as f64 * step - extent_mm / 2.0 + jitter(&mut rng),
                    distance_mm + sheet as f64 + rng.uniform(-0.2, 0.2),
                ]);
            }
        }
        let at = |row: usize, column: usize| first + (row * (cells + 1) + column) as u32;
        for row in 0..cells {
            for column in 0..cells {
                tris.push([at(row, column), at(row + 1, column), at(row, column + 1)]);
                tris.push([
                    at(row + 1, column),
                    at(row + 1, column + 1),
                    at(row, column + 1),
                ]);
            }
        }
    }
    let front_triangles = tris.len() / 2;
    let clip = clip_of(&cam, &points).to_dtype(DType::F32).unwrap();
    let corner_depths: Vec<[f32; 3]> = {
        let c: Vec<Vec<f32>> = clip.squeeze(0).unwrap().to_vec2().unwrap();
        tris.iter()
            .map(|t| t.map(|v| c[v as usize][2] / c[v as usize][3]))
            .collect()
    };
    let triangles = Triangles::new(tris, points.len()).unwrap();
    let rast = rasterize(&clip, &triangles, size, size, RasterOptions::default()).unwrap();
    let values: Vec<f32> = rast.flatten_all().unwrap().to_vec1().unwrap();
    for (p, pixel) in values.chunks(4).enumerate() {
        let id = pixel[3] as usize;
        assert!(
            (1..=front_triangles).contains(&id),
            "pixel {p} shows triangle {id}, not the front sheet's 1..={front_triangles}"
        );
        let [a, b, c] = corner_depths[id - 1];
        // A few roundings of slack: a few hundredths of a millimetre here.
        let slack = 4.0 * f32::EPSILON;
        let (lo, hi) = (a.min(b).min(c) - slack, a.max(b).max(c) + slack);
        assert!(
            pixel[2] >= lo && pixel[2] <= hi,
            "pixel {p}: z/w {} outside its corners' {lo}..{hi}",
            pixel[2]
        );
    }
}
