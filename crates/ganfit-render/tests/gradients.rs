//! Every op's backward against central finite differences (f64), plus a hand-derived case.

mod common;

use approx::assert_abs_diff_eq;
use candle_core::{Device, Tensor};
use common::{Rng, check_gradient, dot, random_clip_mesh};
use ganfit_render::{
    PhongLight, RasterOptions, Triangles, WrapMode, antialias, camera_from_world, interpolate,
    rasterize, sample_vertex_colors, shade_phong, shade_sh, texture, vertex_normals,
};

const EPS: f64 = 1e-6;
const TOL: f64 = 1e-5;

fn ids(rast: &Tensor) -> Vec<f64> {
    rast.narrow(3, 3, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Entries whose perturbation changes coverage are where the ops are discontinuous by design.
fn same_ids(tris: &Triangles, h: usize, w: usize) -> impl Fn(&Tensor, &Tensor) -> bool + '_ {
    move |a, b| {
        let r = |c: &Tensor| ids(&rasterize(c, tris, h, w, RasterOptions::default()).unwrap());
        r(a) == r(b)
    }
}

#[test]
fn single_triangle_matches_hand_derived_values() {
    // Right triangle over the left-top half of NDC with w = 1, so barycentrics are affine:
    // at p = (x, y), v = (x + 1) / 2 and u = (1 - y) / 2 - v, with ∇u = (-1/2, -1/2).
    let clip = Tensor::new(
        &[[
            [-1.0f64, -1.0, 0.0, 1.0],
            [1.0, -1.0, 0.5, 1.0],
            [-1.0, 1.0, -0.5, 1.0],
        ]],
        &Device::Cpu,
    )
    .unwrap();
    let tris = Triangles::new(vec![[0, 1, 2]], 3).unwrap();
    let rast = rasterize(&clip, &tris, 4, 4, RasterOptions::default()).unwrap();
    let px: Vec<f64> = rast
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    // Pixel (0, 0) has its centre at (-0.75, -0.75): v = 0.125, u = 0.75, z/w = 0.125·0.5 - 0.125·0.5.
    assert_eq!(px, vec![0.75, 0.125, 0.0, 1.0]);
    // The centre (-0.25, 0.25) lies exactly on the hypotenuse, a bottom-right edge: not covered.
    let on_edge: Vec<f64> = rast
        .get(0)
        .unwrap()
        .get(2)
        .unwrap()
        .get(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(on_edge, vec![0.0; 4]);
    // For affine barycentrics, d b_i / d p_j = -b_j ∇b_i: du/dx0 = du/dy0 = u / 2 = 0.375,
    // dv/dx1 = -v · 1/2 = -0.0625, and moving corner 2 in x moves u by -(1 - u - v) · (-1/2).
    let var = candle_core::Var::from_tensor(&clip).unwrap();
    let r = rasterize(var.as_tensor(), &tris, 4, 4, RasterOptions::default()).unwrap();
    let pick = |ch: usize| {
        r.get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(ch)
            .unwrap()
    };
    let g = pick(0).backward().unwrap();
    let gu: Vec<Vec<f64>> = g
        .get(var.as_tensor())
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_abs_diff_eq!(gu[0][0], 0.375, epsilon = 1e-12);
    assert_abs_diff_eq!(gu[0][1], 0.375, epsilon = 1e-12);
    assert_abs_diff_eq!(gu[2][0], 0.125 * 0.5, epsilon = 1e-12);
    let g = pick(1).backward().unwrap();
    let gv: Vec<Vec<f64>> = g
        .get(var.as_tensor())
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_abs_diff_eq!(gv[1][0], -0.0625, epsilon = 1e-12);
    // z/w = Σ b_i z_i with w = 1, so d(z/w)/dz_i = b_i.
    let g = pick(2).backward().unwrap();
    let gz: Vec<Vec<f64>> = g
        .get(var.as_tensor())
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_abs_diff_eq!(gz[0][2], 0.75, epsilon = 1e-12);
    assert_abs_diff_eq!(gz[1][2], 0.125, epsilon = 1e-12);
    assert_abs_diff_eq!(gz[2][2], 0.125, epsilon = 1e-12);
}

#[test]
fn rasterize_backward_matches_finite_differences() {
    let mut rng = Rng::new(1);
    let (clip, tris) = random_clip_mesh(&mut rng, 2, 6);
    let (h, w) = (9, 13);
    let cot = rng.tensor(&[2, h, w, 4], -1.0, 1.0);
    let n = check_gradient(
        &clip,
        |c| {
            dot(
                &rasterize(c, &tris, h, w, RasterOptions::default()).unwrap(),
                &cot,
            )
        },
        same_ids(&tris, h, w),
        EPS,
        TOL,
    );
    assert!(n > 100, "only {n} entries compared");
}

#[test]
fn rasterize_backward_with_corners_behind_the_camera() {
    // A large triangle with one corner behind the camera (w < 0) and one crossing the near plane.
    let clip = Tensor::new(
        &[[
            [-0.5f64, -0.4, 0.5, 1.0],
            [0.6, -0.3, 0.9, 1.3],
            [0.2, 0.9, -1.5, -0.7],
        ]],
        &Device::Cpu,
    )
    .unwrap();
    let tris = Triangles::new(vec![[0, 1, 2]], 3).unwrap();
    let (h, w) = (10, 10);
    let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
    assert!(ids(&rast).iter().any(|&i| i > 0.0));
    let cot = Rng::new(2).tensor(&[1, h, w, 4], -1.0, 1.0);
    let n = check_gradient(
        &clip,
        |c| {
            dot(
                &rasterize(c, &tris, h, w, RasterOptions::default()).unwrap(),
                &cot,
            )
        },
        same_ids(&tris, h, w),
        EPS,
        TOL,
    );
    assert_eq!(n, 12);
}

#[test]
fn interpolate_backward_matches_finite_differences() {
    let mut rng = Rng::new(3);
    let (clip, tris) = random_clip_mesh(&mut rng, 2, 5);
    let (h, w) = (8, 11);
    let nv = tris.num_vertices();
    let attr = rng.tensor(&[2, nv, 3], -1.0, 1.0);
    let shared = rng.tensor(&[nv, 2], -1.0, 1.0);
    let cot = rng.tensor(&[2, h, w, 3], -1.0, 1.0);
    let cot2 = rng.tensor(&[2, h, w, 2], -1.0, 1.0);
    let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
    check_gradient(
        &attr,
        |a| dot(&interpolate(a, &rast, &tris).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    check_gradient(
        &shared,
        |a| dot(&interpolate(a, &rast, &tris).unwrap(), &cot2),
        |_, _| true,
        EPS,
        TOL,
    );
    let n = check_gradient(
        &clip,
        |c| {
            let r = rasterize(c, &tris, h, w, RasterOptions::default()).unwrap();
            dot(&interpolate(&attr, &r, &tris).unwrap(), &cot)
        },
        same_ids(&tris, h, w),
        EPS,
        TOL,
    );
    assert!(n > 60, "only {n} entries compared");
}

#[test]
fn texture_backward_matches_finite_differences() {
    let mut rng = Rng::new(4);
    let tex = rng.tensor(&[2, 5, 7, 3], 0.0, 1.0);
    // Coordinates reach outside [0, 1] to exercise the addressing modes.
    let uv = rng.tensor(&[2, 4, 6, 2], -0.3, 1.3);
    let cot = rng.tensor(&[2, 4, 6, 3], -1.0, 1.0);
    for wrap in [WrapMode::Clamp, WrapMode::Wrap] {
        check_gradient(
            &tex,
            |t| dot(&texture(t, &uv, wrap).unwrap(), &cot),
            |_, _| true,
            EPS,
            TOL,
        );
        check_gradient(
            &uv,
            |u| dot(&texture(&tex, u, wrap).unwrap(), &cot),
            |_, _| true,
            EPS,
            TOL,
        );
    }
    let shared = rng.tensor(&[5, 7, 3], 0.0, 1.0);
    check_gradient(
        &shared,
        |t| dot(&texture(t, &uv, WrapMode::Wrap).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    let vertex_uv = rng.tensor(&[9, 2], 0.0, 1.0);
    let vcot = rng.tensor(&[2, 9, 3], -1.0, 1.0);
    check_gradient(
        &vertex_uv,
        |u| {
            dot(
                &sample_vertex_colors(&tex, u, WrapMode::Clamp).unwrap(),
                &vcot,
            )
        },
        |_, _| true,
        EPS,
        TOL,
    );
}

#[test]
fn antialias_backward_matches_finite_differences() {
    let mut rng = Rng::new(5);
    let (clip, tris) = random_clip_mesh(&mut rng, 2, 4);
    let (h, w) = (12, 12);
    let color = rng.tensor(&[2, h, w, 2], 0.0, 1.0);
    let cot = rng.tensor(&[2, h, w, 2], -1.0, 1.0);
    let aa = |col: &Tensor, c: &Tensor| {
        let r = rasterize(c, &tris, h, w, RasterOptions::default()).unwrap();
        antialias(col, &r, c, &tris).unwrap()
    };
    check_gradient(
        &color,
        |col| dot(&aa(col, &clip), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    // The analysis must actually find silhouettes, else the position check is vacuous.
    let changed = (aa(&color, &clip) - &color)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(changed > 0.1, "antialias changed nothing ({changed})");
    let var = candle_core::Var::from_tensor(&clip).unwrap();
    let g = dot(&aa(&color, var.as_tensor()), &cot).backward().unwrap();
    let norm = g
        .get(var.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(norm > 1e-3, "no position gradient ({norm})");
    let n = check_gradient(
        &clip,
        |c| dot(&aa(&color, c), &cot),
        same_ids(&tris, h, w),
        EPS,
        TOL,
    );
    assert!(n > 40, "only {n} entries compared");
}

#[test]
fn shading_backward_matches_finite_differences() {
    let mut rng = Rng::new(6);
    let albedo = rng.tensor(&[2, 7, 3], 0.0, 1.0);
    let normals = rng.tensor(&[2, 7, 3], -1.0, 1.0);
    let coeffs = rng.tensor(&[2, 3, 9], -1.0, 1.0);
    let cot = rng.tensor(&[2, 7, 3], -1.0, 1.0);
    check_gradient(
        &coeffs,
        |c| dot(&shade_sh(&albedo, &normals, c).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    check_gradient(
        &normals,
        |n| dot(&shade_sh(&albedo, n, &coeffs).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    check_gradient(
        &albedo,
        |a| dot(&shade_sh(a, &normals, &coeffs).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    let unit = ganfit_render::normalize(&normals).unwrap();
    let view = ganfit_render::normalize(&rng.tensor(&[2, 7, 3], -1.0, 1.0)).unwrap();
    let light = |d: &Tensor| PhongLight {
        direction: d.clone(),
        color: Tensor::new(&[[0.9f64, 0.8, 0.7], [0.5, 0.6, 0.7]], &Device::Cpu).unwrap(),
        ambient: Tensor::new(&[[0.2f64, 0.2, 0.3], [0.1, 0.1, 0.1]], &Device::Cpu).unwrap(),
        specular: 0.3,
        shininess: 8.0,
    };
    let dir = rng.tensor(&[2, 3], -1.0, 1.0);
    check_gradient(
        &dir,
        |d| {
            dot(
                &shade_phong(&albedo, &unit, &view, &light(d)).unwrap(),
                &cot,
            )
        },
        |_, _| true,
        EPS,
        TOL,
    );
    check_gradient(
        &unit,
        |n| dot(&shade_phong(&albedo, n, &view, &light(&dir)).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
}

#[test]
fn camera_and_normals_backward_match_finite_differences() {
    let mut rng = Rng::new(7);
    let points = rng.tensor(&[2, 5, 3], -1.0, 1.0);
    let rot = rng.tensor(&[2, 3], -1.0, 1.0);
    let trans = rng.tensor(&[2, 3], -1.0, 1.0);
    let cot = rng.tensor(&[2, 5, 3], -1.0, 1.0);
    check_gradient(
        &rot,
        |r| dot(&camera_from_world(&points, r, &trans).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    check_gradient(
        &trans,
        |t| dot(&camera_from_world(&points, &rot, t).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    // At zero rotation the gradient is the cross-product matrix, with no 0/0 in the formula.
    let zero = Tensor::zeros((2, 3), candle_core::DType::F64, &Device::Cpu).unwrap();
    check_gradient(
        &zero,
        |r| dot(&camera_from_world(&points, r, &trans).unwrap(), &cot),
        |_, _| true,
        EPS,
        TOL,
    );
    let cam = common::camera(20, 10);
    let pcot = rng.tensor(&[2, 5, 2], -1.0, 1.0);
    let shifted = (&points
        + Tensor::new(&[0.0f64, 0.0, 4.0], &Device::Cpu)
            .unwrap()
            .broadcast_as((2, 5, 3))
            .unwrap())
    .unwrap();
    check_gradient(
        &shifted,
        |p| dot(&cam.project(p).unwrap(), &pcot),
        |_, _| true,
        EPS,
        TOL,
    );
    let (verts, tris) = common::bumpy_sphere(4, 5, 1.0, 0.2);
    let tris = Triangles::new(tris, verts.len() / 3).unwrap();
    let pos = Tensor::from_vec(verts.clone(), (1, verts.len() / 3, 3), &Device::Cpu).unwrap();
    let ncot = rng.tensor(&[1, verts.len() / 3, 3], -1.0, 1.0);
    check_gradient(
        &pos,
        |p| dot(&vertex_normals(p, &tris).unwrap(), &ncot),
        |_, _| true,
        EPS,
        TOL,
    );
}
