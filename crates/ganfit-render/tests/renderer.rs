//! The composed renderer on a sphere: plausible depth, normals and coverage, texture and
//! vertex-colour paths agree, batching is independent per item.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bumpy_sphere, camera};
use ganfit_render::{
    Appearance, Lighting, PhongLight, RenderOptions, Renderer, Scene, Triangles, WrapMode,
};

fn sphere() -> (Tensor, Triangles) {
    let (verts, tris) = bumpy_sphere(16, 24, 0.8, 0.0);
    let nv = verts.len() / 3;
    (
        Tensor::from_vec(verts, (nv, 3), &Device::Cpu).unwrap(),
        Triangles::new(tris, nv).unwrap(),
    )
}

fn at(t: &Tensor, b: usize, y: usize, x: usize) -> Vec<f64> {
    t.get(b)
        .unwrap()
        .get(y)
        .unwrap()
        .get(x)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn sphere_render_has_plausible_buffers() {
    let (verts, tris) = sphere();
    let nv = tris.num_vertices();
    let renderer = Renderer::new(tris, camera(33, 33), RenderOptions::default());
    let rot = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
    let trans = Tensor::new(&[[0.0, 0.0, 3.0], [0.3, 0.0, 4.0]], &Device::Cpu).unwrap();
    let colors = Tensor::full(0.5f64, (nv, 3), &Device::Cpu).unwrap();
    let light = PhongLight {
        direction: Tensor::new(&[[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]], &Device::Cpu).unwrap(),
        color: Tensor::full(1.0f64, (2, 3), &Device::Cpu).unwrap(),
        ambient: Tensor::full(0.1f64, (2, 3), &Device::Cpu).unwrap(),
        specular: 0.0,
        shininess: 1.0,
    };
    let scene = Scene {
        vertices: &verts,
        rotation: &rot,
        translation: &trans,
        appearance: Appearance::VertexColors(&colors),
        lighting: Lighting::Phong(&light),
    };
    let out = renderer.render(&scene).unwrap();
    assert_eq!(out.image.dims(), &[2, 33, 33, 3]);
    // Centre pixel of item 0: the sphere's front at depth 3 - 0.8, facing the camera (-z), lit
    // head-on: 0.5 · (0.1 + 1).
    let depth = at(&out.depth, 0, 16, 16)[0];
    assert!((depth - 2.2).abs() < 0.01, "depth {depth}");
    let n = at(&out.normals, 0, 16, 16);
    assert!(n[2] < -0.99, "normal {n:?}");
    let c = at(&out.image, 0, 16, 16);
    assert!((c[0] - 0.55).abs() < 0.01, "colour {c:?}");
    // Coverage ≈ projected disc area: radius f · r / sqrt(d² - r²) pixels.
    let f = 1.6 * 33.0;
    let radius = f * 0.8 / (9.0f64 - 0.64).sqrt();
    let area = out
        .mask
        .get(0)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let disc = std::f64::consts::PI * radius * radius;
    assert!((area - disc).abs() < 0.05 * disc, "area {area} vs {disc}");
    // Item 1 is farther and shifted right: smaller, and off-centre.
    let area1 = out
        .mask
        .get(1)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(area1 < area * 0.7);
    assert!(at(&out.mask, 1, 16, 27)[0] > 0.5 && at(&out.mask, 1, 16, 5)[0] < 0.5);
    // Background stays black and zero.
    assert_eq!(at(&out.image, 0, 0, 0), vec![0.0; 3]);
    assert_eq!(at(&out.depth, 0, 0, 0), vec![0.0]);
}

#[test]
fn texture_and_vertex_colours_agree_for_a_linear_colouring() {
    let (verts, tris) = sphere();
    let nv = tris.num_vertices();
    // uv = (x, y) mapped into [0, 1], and a texture that is linear in u: bilinear sampling of a
    // linear ramp reproduces it exactly, as does interpolating vertex colours.
    let pos: Vec<f64> = verts.flatten_all().unwrap().to_vec1().unwrap();
    let uv: Vec<f64> = pos
        .chunks(3)
        .flat_map(|p| [0.25 + 0.5 * (p[0] + 0.8) / 1.6, 0.5])
        .collect();
    let uv = Tensor::from_vec(uv, (nv, 2), &Device::Cpu).unwrap();
    let wt = 16;
    let texels: Vec<f64> = (0..4 * wt)
        .flat_map(|i| {
            let u = ((i % wt) as f64 + 0.5) / wt as f64;
            [u, 1.0 - u, 0.5]
        })
        .collect();
    let tex = Tensor::from_vec(texels, (4, wt, 3), &Device::Cpu).unwrap();
    let colors: Vec<f64> = uv
        .to_vec2::<f64>()
        .unwrap()
        .iter()
        .flat_map(|c| [c[0], 1.0 - c[0], 0.5])
        .collect();
    let colors = Tensor::from_vec(colors, (nv, 3), &Device::Cpu).unwrap();
    let renderer = Renderer::new(tris, camera(24, 20), RenderOptions::default());
    let rot = Tensor::new(&[[0.1, 0.2, 0.0]], &Device::Cpu).unwrap();
    let trans = Tensor::new(&[[0.0, 0.0, 3.0]], &Device::Cpu).unwrap();
    let sh = Tensor::new(
        &[[[0.8, 0.1, -0.3, 0.1, 0.0, 0.0, 0.05, 0.0, 0.0]; 3]],
        &Device::Cpu,
    )
    .unwrap();
    let render = |appearance| {
        let scene = Scene {
            vertices: &verts,
            rotation: &rot,
            translation: &trans,
            appearance,
            lighting: Lighting::SphericalHarmonics(&sh),
        };
        renderer.render(&scene).unwrap().image
    };
    let textured = render(Appearance::Texture {
        texture: &tex,
        uv: &uv,
        uv_triangles: None,
        wrap: WrapMode::Clamp,
    });
    let coloured = render(Appearance::VertexColors(&colors));
    let diff = (&textured - &coloured)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff < 1e-9, "{diff}");
    assert!(coloured.sum_all().unwrap().to_scalar::<f64>().unwrap() > 10.0);
}
