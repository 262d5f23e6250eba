//! Shared helpers for the renderer's tests: meshes, random numbers and gradient checks.
#![allow(dead_code)] // each test binary uses a different subset

use candle_core::{DType, Device, Tensor, Var};
use ganfit_render::{Camera, Triangles};

/// Small deterministic generator (SplitMix64), so that tests need no extra crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    pub fn tensor(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(self.vec(n, lo, hi), shape, &Device::Cpu).unwrap()
    }
}

/// A camera looking down +z at a unit-ish object about 3 units away.
pub fn camera(width: usize, height: usize) -> Camera {
    let f = 1.6 * width.max(height) as f64;
    Camera::new(
        f,
        f,
        (width as f64 - 1.0) / 2.0,
        (height as f64 - 1.0) / 2.0,
        width,
        height,
        0.1,
        10.0,
    )
    .unwrap()
}

/// A closed, outward-oriented UV sphere with radial bumps, `[V, 3]` positions and triangles.
pub fn bumpy_sphere(
    rings: usize,
    segments: usize,
    radius: f64,
    bump: f64,
) -> (Vec<f64>, Vec<[u32; 3]>) {
    use std::f64::consts::PI;
    let mut verts = vec![0.0, -radius, 0.0];
    for r in 1..rings {
        let theta = PI * r as f64 / rings as f64;
        for s in 0..segments {
            let phi = 2.0 * PI * s as f64 / segments as f64;
            let rad = radius * (1.0 + bump * (3.0 * phi).sin() * (2.0 * theta).sin());
            verts.extend([
                rad * theta.sin() * phi.cos(),
                -rad * theta.cos(),
                rad * theta.sin() * phi.sin(),
            ]);
        }
    }
    verts.extend([0.0, radius, 0.0]);
    let ring = |r: usize, s: usize| (1 + (r - 1) * segments + s % segments) as u32;
    let top = (verts.len() / 3 - 1) as u32;
    let mut tris = Vec::new();
    for s in 0..segments {
        tris.push([0, ring(1, s), ring(1, s + 1)]);
        tris.push([top, ring(rings - 1, s + 1), ring(rings - 1, s)]);
    }
    for r in 1..rings - 1 {
        for s in 0..segments {
            let (a, b, c, d) = (
                ring(r, s),
                ring(r, s + 1),
                ring(r + 1, s),
                ring(r + 1, s + 1),
            );
            tris.push([a, c, b]);
            tris.push([b, c, d]);
        }
    }
    // Orient every face outwards (the winding above depends on the axis convention).
    for t in &mut tris {
        let p = |i: u32| {
            [
                verts[3 * i as usize],
                verts[3 * i as usize + 1],
                verts[3 * i as usize + 2],
            ]
        };
        let (a, b, c) = (p(t[0]), p(t[1]), p(t[2]));
        let e1 = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
        let e2 = [c[0] - a[0], c[1] - a[1], c[2] - a[2]];
        let n = [
            e1[1] * e2[2] - e1[2] * e2[1],
            e1[2] * e2[0] - e1[0] * e2[2],
            e1[0] * e2[1] - e1[1] * e2[0],
        ];
        let centre = [
            (a[0] + b[0] + c[0]) / 3.0,
            (a[1] + b[1] + c[1]) / 3.0,
            (a[2] + b[2] + c[2]) / 3.0,
        ];
        if n[0] * centre[0] + n[1] * centre[1] + n[2] * centre[2] < 0.0 {
            t.swap(1, 2);
        }
    }
    (verts, tris)
}

/// Random triangles in clip space, all corners in front of the camera (w in [1, 2]).
pub fn random_clip_mesh(rng: &mut Rng, batch: usize, tris: usize) -> (Tensor, Triangles) {
    let nv = tris * 3;
    let mut clip = Vec::with_capacity(batch * nv * 4);
    for _ in 0..batch * nv {
        let w = rng.uniform(1.0, 2.0);
        clip.extend([
            rng.uniform(-0.9, 0.9) * w,
            rng.uniform(-0.9, 0.9) * w,
            rng.uniform(-0.8, 0.8) * w,
            w,
        ]);
    }
    // Half the triangles share vertices with the previous one, so that shared edges occur.
    let indices = (0..tris as u32)
        .map(|t| {
            if t % 2 == 1 {
                [3 * t - 2, 3 * t - 1, 3 * t]
            } else {
                [3 * t, 3 * t + 1, 3 * t + 2]
            }
        })
        .collect();
    let clip = Tensor::from_vec(clip, (batch, nv, 4), &Device::Cpu).unwrap();
    (clip, Triangles::new(indices, nv).unwrap())
}

/// Compares the autograd gradient of `loss(x)` with central differences, entry by entry.
///
/// `valid(x_minus, x_plus)` may veto an entry (e.g. when the perturbation changed which
/// triangle covers a pixel, where the op is discontinuous by design). Returns how many entries
/// were compared.
pub fn check_gradient(
    x: &Tensor,
    loss: impl Fn(&Tensor) -> Tensor,
    valid: impl Fn(&Tensor, &Tensor) -> bool,
    eps: f64,
    tol: f64,
) -> usize {
    assert_eq!(x.dtype(), DType::F64, "gradient checks run in f64");
    let var = Var::from_tensor(x).unwrap();
    let l = loss(var.as_tensor());
    let grads = l.backward().unwrap();
    let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
        None => vec![0.0; x.elem_count()],
    };
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let scalar = |v: &[f64]| -> (Tensor, f64) {
        let t = Tensor::from_slice(v, x.shape(), x.device()).unwrap();
        let l = loss(&t).to_scalar::<f64>().unwrap();
        (t, l)
    };
    let mut compared = 0;
    for i in 0..base.len() {
        let mut plus = base.clone();
        let mut minus = base.clone();
        plus[i] += eps;
        minus[i] -= eps;
        let (tp, lp) = scalar(&plus);
        let (tm, lm) = scalar(&minus);
        if !valid(&tm, &tp) {
            continue;
        }
        let numeric = (lp - lm) / (2.0 * eps);
        let scale = 1.0 + numeric.abs().max(analytic[i].abs());
        assert!(
            (numeric - analytic[i]).abs() <= tol * scale,
            "entry {i}: analytic {} vs numeric {numeric}",
            analytic[i]
        );
        compared += 1;
    }
    compared
}

/// `Σ t ⊙ cot`, the scalar whose gradient is the vector-Jacobian product with `cot`.
pub fn dot(t: &Tensor, cot: &Tensor) -> Tensor {
    (t * cot).unwrap().sum_all().unwrap()
}

/// The gradients of `Σ cot ⊙ f(inputs)` with respect to each input, on the inputs' device.
pub fn vjp(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, cot: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = (f(&tensors) * cot)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vars.iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| v.zeros_like().unwrap())
        })
        .collect()
}
