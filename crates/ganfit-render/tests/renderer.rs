//! The composed renderer on a sphere: plausible depth, normals and coverage, texture and
//! vertex-colour paths agree, batching is independent per item, and appearances sharing one
//! rasterization render and differentiate as separate renders.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bumpy_sphere, camera};
use ganfit_render::{
    Appearance, Lighting, PhongLight, RenderOptions, Renderer, Scene, Triangles, WrapMode,
};
use ganfit_testkit::max_abs_diff;

fn sphere() -> (Tensor, Triangles) {
    let (verts, tris) = bumpy_sphere(16, 24, 0.8, 0.0);
    let nv = verts.len() / 3;
    (
        Tensor::from_vec(verts, (nv, 3), &Device::Cpu).unwrap(),
        Triangles::new(tris, nv).unwrap(),
    )
}

/// The rotation, translation and SH light the sphere's 24 × 20 renders below are drawn with.
fn view_and_light() -> [Tensor; 3] {
    let cpu = &Device::Cpu;
    [
        Tensor::new(&[[0.1, 0.2, 0.0]], cpu).unwrap(),
        Tensor::new(&[[0.0, 0.0, 3.0]], cpu).unwrap(),
        Tensor::new(&[[[0.8, 0.1, -0.3, 0.1, 0.0, 0.0, 0.05, 0.0, 0.0]; 3]], cpu).unwrap(),
    ]
}

/// Texture coordinates `[V, 2]`, `map` of each of the `[V, 3]` vertex positions.
fn uv_from_positions(verts: &Tensor, map: impl Fn(&[f64]) -> [f64; 2]) -> Tensor {
    let pos: Vec<f64> = verts.flatten_all().unwrap().to_vec1().unwrap();
    let uv: Vec<f64> = pos.chunks(3).flat_map(map).collect();
    Tensor::from_vec(uv, (verts.dim(0).unwrap(), 2), &Device::Cpu).unwrap()
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
    let depth = at(&out.depth().unwrap(), 0, 16, 16)[0];
    assert!((depth - 2.2).abs() < 0.01, "depth {depth}");
    let n = at(&out.normals().unwrap(), 0, 16, 16);
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
    assert_eq!(at(&out.depth().unwrap(), 0, 0, 0), vec![0.0]);
}

#[test]
fn texture_and_vertex_colours_agree_for_a_linear_colouring() {
    let (verts, tris) = sphere();
    let nv = tris.num_vertices();
    // uv = (x, y) mapped into [0, 1], and a texture that is linear in u: bilinear sampling of a
    // linear ramp reproduces it exactly, as does interpolating vertex colours.
    let uv = uv_from_positions(&verts, |p| [0.25 + 0.5 * (p[0] + 0.8) / 1.6, 0.5]);
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
    let [rot, trans, sh] = view_and_light();
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
    let diff = max_abs_diff(&textured, &coloured);
    assert!(diff < 1e-9, "{diff}");
    assert!(coloured.sum_all().unwrap().to_scalar::<f64>().unwrap() > 10.0);
}

/// Several appearances over one rasterization: each image is what `render` draws with that
/// appearance alone, and the gradients of a loss over all of them are the separate renders'
/// gradients summed (to the vertices, the pose, the light and each appearance's colours).
#[test]
fn appearances_sharing_one_rasterization_render_and_differentiate_as_separate_renders() {
    let (verts, tris) = sphere();
    let nv = tris.num_vertices();
    let var = |t: Tensor| candle_core::Var::from_tensor(&t).unwrap();
    let colours = |seed: f64| {
        let values: Vec<f64> = (0..nv * 3)
            .map(|i| 0.5 + 0.4 * (i as f64 * 0.37 + seed).sin())
            .collect();
        var(Tensor::from_vec(values, (nv, 3), &Device::Cpu).unwrap())
    };
    let (first, second) = (colours(0.0), colours(1.3));
    let vertices = var(verts);
    let [rot, trans, sh] = view_and_light().map(var);
    let renderer = Renderer::new(tris, camera(24, 20), RenderOptions::default());
    fn scene<'a>(
        [vertices, rot, trans, sh]: [&'a candle_core::Var; 4],
        colours: &'a candle_core::Var,
    ) -> Scene<'a> {
        Scene {
            vertices: vertices.as_tensor(),
            rotation: rot.as_tensor(),
            translation: trans.as_tensor(),
            appearance: Appearance::VertexColors(colours.as_tensor()),
            lighting: Lighting::SphericalHarmonics(sh.as_tensor()),
        }
    }
    let geometry = [&vertices, &rot, &trans, &sh];
    // Different weights per image, so that a swapped or shared gradient would show.
    let weights = [0.7, -1.9];
    let loss = |images: [&Tensor; 2]| {
        let terms: Vec<Tensor> = images
            .iter()
            .zip(weights)
            .map(|(image, w)| (*image * w).unwrap().sqr().unwrap().sum_all().unwrap())
            .collect();
        (&terms[0] + &terms[1]).unwrap()
    };
    let together = renderer
        .render_with_appearances(
            &scene(geometry, &first),
            &[Appearance::VertexColors(second.as_tensor())],
        )
        .unwrap();
    let apart = [
        renderer.render(&scene(geometry, &first)).unwrap(),
        renderer.render(&scene(geometry, &second)).unwrap(),
    ];
    for (t, a) in together.iter().zip(&apart) {
        assert_eq!(max_abs_diff(&t.image, &a.image), 0.0);
        assert_eq!(max_abs_diff(&t.mask, &a.mask), 0.0);
    }
    assert!(max_abs_diff(&apart[0].image, &apart[1].image) > 0.1);
    let shared = loss([&together[0].image, &together[1].image])
        .backward()
        .unwrap();
    let separate = loss([&apart[0].image, &apart[1].image]).backward().unwrap();
    for (name, v) in [
        ("vertices", &vertices),
        ("rotation", &rot),
        ("translation", &trans),
        ("light", &sh),
        ("first colours", &first),
        ("second colours", &second),
    ] {
        let (s, p) = (
            shared.get(v.as_tensor()).unwrap(),
            separate.get(v.as_tensor()).unwrap(),
        );
        let scale = max_abs_diff(p, &p.zeros_like().unwrap());
        assert!(scale > 0.0, "{name} has no gradient");
        assert!(
            max_abs_diff(s, p) <= 1e-12 * scale,
            "{name}: {}",
            max_abs_diff(s, p)
        );
    }
}

/// A textured render through every op with several inputs (camera, interpolation, texture,
/// shading, antialiasing) where some inputs are constants: the constants get no gradient at
/// all (candle would otherwise sum one into a fresh zero tensor for nothing), and the
/// variables' gradients are those of a render where every input is a variable.
#[test]
fn constants_get_no_gradient_and_leave_the_variables_gradients_unchanged() {
    let (verts, tris) = sphere();
    let uv = uv_from_positions(&verts, |p| [0.5 + 0.4 * p[0], 0.5 + 0.4 * p[1]]);
    let texels: Vec<f64> = (0..8 * 8 * 3)
        .map(|i| 0.5 + 0.4 * (i as f64 * 0.61).sin())
        .collect();
    let texture = Tensor::from_vec(texels, (8, 8, 3), &Device::Cpu).unwrap();
    let [rot, trans, sh] = view_and_light();
    let renderer = Renderer::new(tris, camera(24, 20), RenderOptions::default());
    let inputs = [verts, rot, trans, texture, sh];
    // The gradients of a fixed loss with the inputs flagged in `variable` as variables.
    let gradients = |variable: [bool; 5]| -> Vec<Option<Tensor>> {
        let vars: Vec<candle_core::Var> = inputs
            .iter()
            .map(|t| candle_core::Var::from_tensor(t).unwrap())
            .collect();
        let pick = |i: usize| {
            if variable[i] {
                vars[i].as_tensor().clone()
            } else {
                inputs[i].clone()
            }
        };
        let t: Vec<Tensor> = (0..5).map(pick).collect();
        let out = renderer
            .render(&Scene {
                vertices: &t[0],
                rotation: &t[1],
                translation: &t[2],
                appearance: Appearance::Texture {
                    texture: &t[3],
                    uv: &uv,
                    uv_triangles: None,
                    wrap: WrapMode::Clamp,
                },
                lighting: Lighting::SphericalHarmonics(&t[4]),
            })
            .unwrap();
        let loss =
            (out.image.sqr().unwrap().sum_all().unwrap() + out.mask.sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        (0..5).map(|i| grads.get(&t[i]).cloned()).collect()
    };
    let all = gradients([true; 5]);
    // The texture and the light constant, then the pose: each op still meets a variable.
    for variable in [
        [true, true, true, false, false],
        [true, false, false, true, true],
    ] {
        let some = gradients(variable);
        for (i, (g, reference)) in some.iter().zip(&all).enumerate() {
            let reference = reference.as_ref().expect("every variable has a gradient");
            match g {
                Some(g) => {
                    assert!(variable[i], "constant {i} got a gradient");
                    assert_eq!(max_abs_diff(g, reference), 0.0, "input {i}");
                }
                None => assert!(!variable[i], "variable {i} got no gradient"),
            }
        }
    }
}
