//! The benches' scene: a face-sized mesh filling most of a square image.

use ganfit_render::{Camera, Triangles};

/// A 97 x 97 vertex height field shaped like a face-sized cap (about 16 cm wide, bulging
/// towards the camera), 48 cm in front of a camera whose view it mostly fills: 18,432 triangles.
pub fn face_like_mesh() -> (Vec<f32>, Triangles) {
    let n = 96;
    let mut verts = Vec::with_capacity((n + 1) * (n + 1) * 3);
    for j in 0..=n {
        for i in 0..=n {
            let (x, y) = (
                i as f32 / n as f32 * 2.0 - 1.0,
                j as f32 / n as f32 * 2.0 - 1.0,
            );
            let bulge = (1.0 - 0.5 * (x * x + y * y)).max(0.0) * 0.06
                + 0.004 * (9.0 * x).sin() * (7.0 * y).cos();
            verts.extend([0.08 * x, 0.1 * y, 0.48 - bulge]);
        }
    }
    let id = |i: usize, j: usize| (j * (n + 1) + i) as u32;
    let mut tris = Vec::with_capacity(2 * n * n);
    for j in 0..n {
        for i in 0..n {
            tris.push([id(i, j), id(i, j + 1), id(i + 1, j)]);
            tris.push([id(i + 1, j), id(i, j + 1), id(i + 1, j + 1)]);
        }
    }
    let nv = verts.len() / 3;
    (verts, Triangles::new(tris, nv).unwrap())
}

pub fn camera(size: usize) -> Camera {
    let c = (size as f64 - 1.0) / 2.0;
    Camera::new(
        2.4 * size as f64,
        2.4 * size as f64,
        c,
        c,
        size,
        size,
        0.05,
        2.0,
    )
    .unwrap()
}
