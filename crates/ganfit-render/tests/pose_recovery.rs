//! Usable gradients: recover a rigid pose from a target render by Adam. The mesh is a
//! procedurally generated bumpy sphere; the ICT-face version of this test belongs to the
//! facade's top-level tests, where the face model is available.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::{bumpy_sphere, camera};
use ganfit_render::{
    Appearance, Lighting, RenderOptions, Renderer, Scene, Triangles, rotation_matrix,
};

struct Setup {
    renderer: Renderer,
    vertices: Tensor,
    colors: Tensor,
    sh: Tensor,
}

fn setup(antialias: bool) -> Setup {
    let (verts, tris) = bumpy_sphere(14, 20, 0.8, 0.15);
    let nv = verts.len() / 3;
    let dev = Device::Cpu;
    let mut pts: Vec<f32> = verts.iter().map(|&v| v as f32).collect();
    pts.chunks_mut(3).for_each(|p| p[2] += 3.0);
    // Colour stripes make rotations about the view axis visible, not just the outline.
    let colors: Vec<f32> = verts
        .chunks(3)
        .flat_map(|p| {
            let s = (5.0 * p[0] + 3.0 * p[1]).sin() as f32;
            [0.5 + 0.4 * s, 0.5 - 0.3 * s, 0.6]
        })
        .collect();
    let sh = {
        let mut c = vec![0.0f32; 27];
        for ch in 0..3 {
            c[ch * 9] = 0.9;
            c[ch * 9 + 2] = -0.4; // light from the camera side (-z)
            c[ch * 9 + 1] = -0.2;
        }
        Tensor::from_vec(c, (1, 3, 9), &dev).unwrap()
    };
    let options = RenderOptions {
        cull_backfaces: false,
        antialias,
    };
    Setup {
        renderer: Renderer::new(Triangles::new(tris, nv).unwrap(), camera(64, 64), options),
        vertices: Tensor::from_vec(pts, (nv, 3), &dev).unwrap(),
        colors: Tensor::from_vec(colors, (nv, 3), &dev).unwrap(),
        sh,
    }
}

/// Renders about the mesh centre: rotation R about (0, 0, 3), then translation.
fn render(s: &Setup, rotation: &Tensor, translation: &Tensor) -> ganfit_render::Rendering {
    // Express "rotate about the centre" as camera-from-world with t' = c - R c + t.
    let centre = Tensor::new(&[[0.0f32, 0.0, 3.0]], &Device::Cpu).unwrap();
    let rc = centre
        .unsqueeze(1)
        .unwrap()
        .matmul(&rotation_matrix(rotation).unwrap().transpose(1, 2).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap();
    let t = ((&centre - rc).unwrap() + translation).unwrap();
    let scene = Scene {
        vertices: &s.vertices,
        rotation,
        translation: &t,
        appearance: Appearance::VertexColors(&s.colors),
        lighting: Lighting::SphericalHarmonics(&s.sh),
    };
    s.renderer.render(&scene).unwrap()
}

fn angle_between(a: &Tensor, b: &Tensor) -> f64 {
    let ra = rotation_matrix(a).unwrap().squeeze(0).unwrap();
    let rb = rotation_matrix(b).unwrap().squeeze(0).unwrap();
    let rel = ra.t().unwrap().matmul(&rb).unwrap();
    let trace: f32 = (0..3)
        .map(|i| {
            rel.get(i)
                .unwrap()
                .get(i)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    (((trace as f64 - 1.0) / 2.0).clamp(-1.0, 1.0)).acos()
}

#[test]
fn adam_recovers_pose_from_shading_and_silhouette() {
    let s = setup(true);
    let true_rot = Tensor::new(&[[0.10f32, -0.12, 0.08]], &Device::Cpu).unwrap();
    let true_trans = Tensor::new(&[[0.06f32, -0.05, 0.12]], &Device::Cpu).unwrap();
    let target = render(&s, &true_rot, &true_trans);
    let rot = Var::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
    let trans = Var::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
    let params = ParamsAdamW {
        lr: 0.01,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut adam = AdamW::new(vec![rot.clone(), trans.clone()], params).unwrap();
    let start = angle_between(rot.as_tensor(), &true_rot);
    for _ in 0..200 {
        let out = render(&s, rot.as_tensor(), trans.as_tensor());
        let image_loss = (&out.image - &target.image)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let mask_loss = (&out.mask - &target.mask)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        adam.backward_step(&(image_loss + mask_loss).unwrap())
            .unwrap();
    }
    let angle = angle_between(rot.as_tensor(), &true_rot).to_degrees();
    let offset = (trans.as_tensor() - &true_trans)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!(
        "recovered pose: rotation error {angle:.4}°, translation error {offset:.5} (from {:.2}°)",
        start.to_degrees()
    );
    // Scene units: the sphere is 1.6 across, as a face is about 16 cm, so 0.01 is about 1 mm.
    assert!(
        angle < 1.0,
        "rotation error {angle}° (started at {}°)",
        start.to_degrees()
    );
    assert!(offset < 0.01, "translation error {offset}");
}

#[test]
fn silhouette_gradients_need_antialias() {
    let shifted = Tensor::new(&[[0.05f32, -0.04, 0.0]], &Device::Cpu).unwrap();
    let zero = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
    for antialias in [false, true] {
        let s = setup(antialias);
        let target = render(&s, &zero, &shifted).mask;
        let trans = Var::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
        let mask = render(&s, &zero, trans.as_tensor()).mask;
        let loss = (mask - target).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f32> = grads.get(trans.as_tensor()).map_or(vec![0.0; 3], |g| {
            g.flatten_all().unwrap().to_vec1().unwrap()
        });
        if antialias {
            // The gradient points towards the target offset in x and y.
            assert!(g[0] < 0.0 && g[1] > 0.0, "{g:?}");
        } else {
            // Coverage is piecewise constant: without antialiasing the silhouette term is blind.
            assert_eq!(g, vec![0.0; 3]);
        }
    }
}
