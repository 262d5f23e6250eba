//! The custom ops against slow reference implementations written with plain candle tensor
//! ops (whose gradients come from candle's autograd), on outputs and on vector-Jacobian
//! products with random cotangents.

mod common;

use candle_core::{D, DType, Device, Tensor, Var};
use common::{Rng, dot, random_clip_mesh};
use ganfit_render::{
    PhongLight, RasterOptions, Triangles, WrapMode, interpolate, rasterize, sh_irradiance_basis,
    shade_phong, shade_sh, texture,
};
use ganfit_testkit::max_abs_diff;

/// Gradients of `dot(f(inputs), cot)` for each input.
fn vjp(inputs: &[&Tensor], f: impl Fn(&[Tensor]) -> Tensor, cot: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let grads = dot(&out, cot).backward().unwrap();
    let g = ts
        .iter()
        .map(|t| grads.get(t).cloned().unwrap_or(t.zeros_like().unwrap()))
        .collect();
    (out.detach(), g)
}

/// Interpolation by gathering corner attributes with index_select and weighting them.
fn interpolate_reference(attr: &Tensor, rast: &Tensor, tris: &Triangles) -> Tensor {
    let (b, h, w, _) = rast.dims4().unwrap();
    let (_, nv, c) = attr.dims3().unwrap();
    let ids: Vec<f64> = rast
        .narrow(3, 3, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut corner_rows = vec![Vec::new(); 3];
    for (i, id) in ids.iter().enumerate() {
        let batch = (i / (h * w)) as u32;
        let tri = if *id > 0.0 {
            tris.as_slice()[*id as usize - 1]
        } else {
            [0, 0, 0]
        };
        for k in 0..3 {
            corner_rows[k].push(batch * nv as u32 + tri[k]);
        }
    }
    let flat = attr.reshape((b * nv, c)).unwrap();
    let covered = rast
        .narrow(3, 3, 1)
        .unwrap()
        .gt(0.0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let u = rast.narrow(3, 0, 1).unwrap();
    let v = rast.narrow(3, 1, 1).unwrap();
    let weights = [u.clone(), v.clone(), ((1.0 - &u).unwrap() - &v).unwrap()];
    let mut out = Tensor::zeros((b, h, w, c), DType::F64, &Device::Cpu).unwrap();
    for (rows, wt) in corner_rows.into_iter().zip(weights) {
        let idx = Tensor::from_vec(rows, b * h * w, &Device::Cpu).unwrap();
        let a = flat
            .index_select(&idx, 0)
            .unwrap()
            .reshape((b, h, w, c))
            .unwrap();
        out = (out + a.broadcast_mul(&wt).unwrap()).unwrap();
    }
    out.broadcast_mul(&covered).unwrap()
}

#[test]
fn interpolate_matches_reference_on_outputs_and_vjps() {
    let mut rng = Rng::new(21);
    let (clip, tris) = random_clip_mesh(&mut rng, 2, 7);
    let (h, w) = (15, 19);
    let nv = tris.num_vertices();
    let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
    let attr = rng.tensor(&[2, nv, 4], -1.0, 1.0);
    let cot = rng.tensor(&[2, h, w, 4], -1.0, 1.0);
    // The rast gradient is only meaningful in the u, v channels.
    let keep_uv = |g: &Tensor| g.narrow(3, 0, 2).unwrap();
    let (ours, g_ours) = vjp(
        &[&attr, &rast],
        |x| interpolate(&x[0], &x[1], &tris).unwrap(),
        &cot,
    );
    let (theirs, g_theirs) = vjp(
        &[&attr, &rast],
        |x| interpolate_reference(&x[0], &x[1], &tris),
        &cot,
    );
    assert!(max_abs_diff(&ours, &theirs) < 1e-12);
    assert!(max_abs_diff(&g_ours[0], &g_theirs[0]) < 1e-12);
    assert!(max_abs_diff(&keep_uv(&g_ours[1]), &keep_uv(&g_theirs[1])) < 1e-12);
    assert!(
        ours.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            > 1.0,
        "nothing was drawn"
    );
}

/// Bilinear sampling from index_select gathers; the integer parts are constants, the
/// fractional parts stay differentiable tensors.
fn texture_reference(tex: &Tensor, uv: &Tensor, wrap: WrapMode) -> Tensor {
    let (bt, ht, wt, c) = tex.dims4().unwrap();
    let (b, h, w, _) = uv.dims4().unwrap();
    let scaled = uv
        .broadcast_mul(&Tensor::new(&[wt as f64, ht as f64], &Device::Cpu).unwrap())
        .unwrap()
        .affine(1.0, -0.5)
        .unwrap();
    let lower: Vec<f64> = scaled
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|x| x.floor())
        .collect();
    let lower_t = Tensor::from_vec(lower.clone(), (b, h, w, 2), &Device::Cpu).unwrap();
    let frac = (&scaled - &lower_t).unwrap();
    let place = |i: i64, n: usize| match wrap {
        WrapMode::Clamp => i.clamp(0, n as i64 - 1) as u32,
        WrapMode::Wrap => i.rem_euclid(n as i64) as u32,
    };
    let flat = tex.reshape((bt * ht * wt, c)).unwrap();
    let fx = frac.narrow(3, 0, 1).unwrap();
    let fy = frac.narrow(3, 1, 1).unwrap();
    let mut out = Tensor::zeros((b, h, w, c), DType::F64, &Device::Cpu).unwrap();
    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let idx: Vec<u32> = lower
            .chunks(2)
            .enumerate()
            .map(|(i, l)| {
                let base = if bt == 1 {
                    0
                } else {
                    (i / (h * w)) as u32 * (ht * wt) as u32
                };
                base + place(l[1] as i64 + dy, ht) * wt as u32 + place(l[0] as i64 + dx, wt)
            })
            .collect();
        let idx = Tensor::from_vec(idx, b * h * w, &Device::Cpu).unwrap();
        let texels = flat
            .index_select(&idx, 0)
            .unwrap()
            .reshape((b, h, w, c))
            .unwrap();
        let wx = if dx == 1 {
            fx.clone()
        } else {
            (1.0 - &fx).unwrap()
        };
        let wy = if dy == 1 {
            fy.clone()
        } else {
            (1.0 - &fy).unwrap()
        };
        out = (out + texels.broadcast_mul(&(wx * wy).unwrap()).unwrap()).unwrap();
    }
    out
}

#[test]
fn texture_matches_reference_on_outputs_and_vjps() {
    let mut rng = Rng::new(22);
    for (wrap, tex_batch) in [
        (WrapMode::Clamp, 2),
        (WrapMode::Wrap, 2),
        (WrapMode::Clamp, 1),
        (WrapMode::Wrap, 1),
    ] {
        let tex = rng.tensor(&[tex_batch, 6, 9, 3], 0.0, 1.0);
        let uv = rng.tensor(&[2, 5, 4, 2], -0.4, 1.4);
        let cot = rng.tensor(&[2, 5, 4, 3], -1.0, 1.0);
        let (ours, g_ours) = vjp(&[&tex, &uv], |x| texture(&x[0], &x[1], wrap).unwrap(), &cot);
        let (theirs, g_theirs) = vjp(
            &[&tex, &uv],
            |x| texture_reference(&x[0], &x[1], wrap),
            &cot,
        );
        assert!(max_abs_diff(&ours, &theirs) < 1e-12, "{wrap:?}");
        assert!(max_abs_diff(&g_ours[0], &g_theirs[0]) < 1e-12, "{wrap:?}");
        // In clamp mode the reference still differentiates the (constant) clamped weights the
        // same way, so the uv gradients agree there too.
        assert!(max_abs_diff(&g_ours[1], &g_theirs[1]) < 1e-11, "{wrap:?}");
    }
}

#[test]
fn sh_shading_matches_per_pixel_formula() {
    let mut rng = Rng::new(23);
    let normals = ganfit_render::normalize(&rng.tensor(&[1, 5, 3], -1.0, 1.0)).unwrap();
    let albedo = rng.tensor(&[1, 5, 3], 0.0, 1.0);
    let coeffs = rng.tensor(&[1, 3, 9], -1.0, 1.0);
    let out: Vec<Vec<f64>> = shade_sh(&albedo, &normals, &coeffs)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let n: Vec<Vec<f64>> = normals.get(0).unwrap().to_vec2().unwrap();
    let a: Vec<Vec<f64>> = albedo.get(0).unwrap().to_vec2().unwrap();
    let l: Vec<Vec<f64>> = coeffs.get(0).unwrap().to_vec2().unwrap();
    use std::f64::consts::PI;
    for i in 0..5 {
        let [x, y, z] = [n[i][0], n[i][1], n[i][2]];
        // Ramamoorthi & Hanrahan's irradiance: A_l · Y_lm with A = (π, 2π/3, π/4).
        let y_lm = [
            0.282095,
            0.488603 * y,
            0.488603 * z,
            0.488603 * x,
            1.092548 * x * y,
            1.092548 * y * z,
            0.315392 * (3.0 * z * z - 1.0),
            1.092548 * x * z,
            0.546274 * (x * x - y * y),
        ];
        let band = [
            PI,
            2.0 * PI / 3.0,
            2.0 * PI / 3.0,
            2.0 * PI / 3.0,
            PI / 4.0,
            PI / 4.0,
            PI / 4.0,
            PI / 4.0,
            PI / 4.0,
        ];
        for ch in 0..3 {
            let irradiance: f64 = (0..9).map(|k| l[ch][k] * band[k] * y_lm[k]).sum();
            assert!(
                (out[i][ch] - a[i][ch] * irradiance).abs() < 1e-5,
                "pixel {i} channel {ch}"
            );
        }
    }
    // A constant environment (only the DC term) gives irradiance π·L00·Y00 everywhere.
    let basis = sh_irradiance_basis(&normals).unwrap();
    let dc: Vec<f64> = basis
        .narrow(D::Minus1, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(dc.iter().all(|v| (v - PI * 0.282095).abs() < 1e-5));
}

#[test]
fn phong_matches_per_pixel_formula() {
    let mut rng = Rng::new(24);
    let normals = ganfit_render::normalize(&rng.tensor(&[2, 6, 3], -1.0, 1.0)).unwrap();
    let view = ganfit_render::normalize(&rng.tensor(&[2, 6, 3], -1.0, 1.0)).unwrap();
    let albedo = rng.tensor(&[2, 6, 3], 0.0, 1.0);
    let light = PhongLight {
        direction: rng.tensor(&[2, 3], -1.0, 1.0),
        color: rng.tensor(&[2, 3], 0.0, 1.0),
        ambient: rng.tensor(&[2, 3], 0.0, 0.5),
        specular: 0.4,
        shininess: 5.0,
    };
    let out = shade_phong(&albedo, &normals, &view, &light).unwrap();
    let get3 = |t: &Tensor| -> Vec<Vec<Vec<f64>>> { t.to_vec3().unwrap() };
    let (o, n, v, a) = (get3(&out), get3(&normals), get3(&view), get3(&albedo));
    let get2 = |t: &Tensor| -> Vec<Vec<f64>> { t.to_vec2().unwrap() };
    let (d, c, amb) = (
        get2(&light.direction),
        get2(&light.color),
        get2(&light.ambient),
    );
    for b in 0..2 {
        let len = (d[b][0].powi(2) + d[b][1].powi(2) + d[b][2].powi(2)).sqrt();
        let l: Vec<f64> = d[b].iter().map(|x| x / len).collect();
        for i in 0..6 {
            let nl: f64 = (0..3).map(|k| n[b][i][k] * l[k]).sum();
            let r: Vec<f64> = (0..3).map(|k| 2.0 * nl * n[b][i][k] - l[k]).collect();
            let rv: f64 = (0..3).map(|k| r[k] * v[b][i][k]).sum();
            for ch in 0..3 {
                let want = a[b][i][ch] * (amb[b][ch] + c[b][ch] * nl.max(0.0))
                    + 0.4 * c[b][ch] * rv.max(0.0).powf(5.0);
                assert!(
                    (o[b][i][ch] - want).abs() < 1e-5,
                    "batch {b} pixel {i} channel {ch}"
                );
            }
        }
    }
}
