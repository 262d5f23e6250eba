//! The ops on a CUDA device against the same ops on the CPU, on the same random inputs: forward
//! outputs bit for bit (the kernels repeat the CPU's arithmetic without FMA contraction), and
//! vector-Jacobian products with random cotangents to 1e-10 (f64) of their scale, since the GPU
//! sums gradients atomically in another order. Built only with the `cuda` feature, and run on a
//! machine with a GPU by scripts/device-check.sh.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{Rng, bumpy_sphere, camera, random_clip_mesh, vjp};
use ganfit_render::{
    Appearance, Lighting, PhongLight, RasterOptions, RenderOptions, Renderer, Scene, Triangles,
    WrapMode, camera_from_world, interpolate, normalize, rasterize, shade_phong, shade_sh, texture,
};
use ganfit_testkit::{gpu, relative_error, values};

/// Whether two tensors (any device) hold the same values, bit for bit.
fn identical(a: &Tensor, b: &Tensor) -> bool {
    assert_eq!(a.dims(), b.dims());
    let bits = |t: &Tensor| values(t).into_iter().map(f64::to_bits).collect::<Vec<_>>();
    bits(a) == bits(b)
}

/// `f` of `inputs` on the CPU and on the GPU: the outputs within `forward` of each other and
/// the VJPs with cotangent `cot` within `backward` (relative errors), the inputs' gradients
/// named by `names` in the messages.
fn assert_gpu_matches_cpu(
    what: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Tensor,
    cot: &Tensor,
    names: &[&str],
    (forward, backward): (f64, f64),
) {
    let on_gpu: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(&gpu()).unwrap())
        .collect();
    let error = relative_error(&f(inputs), &f(&on_gpu));
    assert!(error < forward, "{what} forward: relative error {error:e}");
    let cpu = vjp(inputs, &f, cot);
    let gpu_grads = vjp(&on_gpu, &f, &cot.to_device(&gpu()).unwrap());
    for (name, (a, b)) in names.iter().zip(cpu.iter().zip(&gpu_grads)) {
        let error = relative_error(a, b);
        assert!(
            error < backward,
            "{what} VJP to the {name}: relative error {error:e}"
        );
    }
}

/// Random triangles with shared edges (and some corners behind the camera), and a closed bumpy
/// sphere: `[B, V, 4]` clip positions with their triangles.
fn scenes() -> Vec<(Tensor, Triangles)> {
    let mut rng = Rng::new(3);
    let (random, random_tris) = random_clip_mesh(&mut rng, 2, 300);
    let mut data = values(&random);
    for c in data.chunks_exact_mut(4).step_by(13) {
        c[3] = -c[3];
    }
    let random = Tensor::from_vec(data, random.shape(), &Device::Cpu).unwrap();
    let (verts, tris) = bumpy_sphere(40, 64, 1.0, 0.15);
    let nv = verts.len() / 3;
    let points = Tensor::from_vec(verts, (1, nv, 3), &Device::Cpu).unwrap();
    let shift = Tensor::new(&[0.1f64, -0.05, 3.0], &Device::Cpu).unwrap();
    let sphere = camera(160, 120)
        .to_clip(&points.broadcast_add(&shift).unwrap())
        .unwrap();
    vec![
        (random, random_tris),
        (sphere, Triangles::new(tris, nv).unwrap()),
    ]
}

#[test]
fn cuda_rasterize_matches_cpu() {
    let (h, w) = (120, 160);
    let mut rng = Rng::new(5);
    for (clip, tris) in scenes() {
        for dtype in [DType::F32, DType::F64] {
            let clip = clip.to_dtype(dtype).unwrap();
            for cull in [false, true] {
                let options = RasterOptions {
                    cull_backfaces: cull,
                };
                let cpu = rasterize(&clip, &tris, h, w, options).unwrap();
                let on_gpu =
                    rasterize(&clip.to_device(&gpu()).unwrap(), &tris, h, w, options).unwrap();
                assert!(identical(&cpu, &on_gpu), "{dtype:?}, cull {cull}");
            }
        }
        let cot = rng.tensor(&[clip.dim(0).unwrap(), h, w, 4], -1.0, 1.0);
        let draw = |t: &[Tensor]| rasterize(&t[0], &tris, h, w, RasterOptions::default()).unwrap();
        let cpu = vjp(std::slice::from_ref(&clip), draw, &cot);
        let on_gpu = vjp(
            &[clip.to_device(&gpu()).unwrap()],
            draw,
            &cot.to_device(&gpu()).unwrap(),
        );
        let error = relative_error(&cpu[0], &on_gpu[0]);
        assert!(error < 1e-10, "rasterize VJP: relative error {error:e}");
    }
}

/// The camera's rotation and point transforms (one op each on the GPU too), with points of
/// each image and points shared by the batch, and clip coordinates after them; the rotation is
/// computed in f64 on both sides, so outputs agree to rounding of the products only.
#[test]
fn cuda_camera_matches_cpu() {
    let mut rng = Rng::new(11);
    let cam = camera(160, 120);
    for point_batch in [2, 1] {
        let points = rng.tensor(&[point_batch, 500, 3], -0.5, 0.5);
        let rotation = rng.tensor(&[2, 3], -1.5, 1.5);
        let translation = rng.tensor(&[2, 3], -0.2, 0.2);
        let shift = Tensor::new(&[[0.0f64, 0.0, 3.0]], &Device::Cpu).unwrap();
        let translation = translation.broadcast_add(&shift).unwrap();
        let f = |t: &[Tensor]| {
            let camera_space = camera_from_world(&t[0], &t[1], &t[2]).unwrap();
            cam.to_clip(&camera_space).unwrap()
        };
        let cot = rng.tensor(&[2, 500, 4], -1.0, 1.0);
        assert_gpu_matches_cpu(
            "camera",
            &[points, rotation, translation],
            f,
            &cot,
            &["points", "rotation", "translation"],
            (1e-12, 1e-10),
        );
    }
}

#[test]
fn cuda_interpolate_matches_cpu() {
    let (h, w, c) = (120, 160, 5);
    let mut rng = Rng::new(7);
    for (clip, tris) in scenes() {
        let (batch, nv, _) = clip.dims3().unwrap();
        let rast = rasterize(&clip, &tris, h, w, RasterOptions::default()).unwrap();
        for sets in [1, batch] {
            let attr = rng.tensor(&[sets, nv, c], -2.0, 2.0);
            for dtype in [DType::F32, DType::F64] {
                let (attr, rast) = (attr.to_dtype(dtype).unwrap(), rast.to_dtype(dtype).unwrap());
                let cpu = interpolate(&attr, &rast, &tris).unwrap();
                let (attr_gpu, rast_gpu) = (
                    attr.to_device(&gpu()).unwrap(),
                    rast.to_device(&gpu()).unwrap(),
                );
                assert!(
                    identical(&cpu, &interpolate(&attr_gpu, &rast_gpu, &tris).unwrap()),
                    "{dtype:?}"
                );
            }
            let cot = rng.tensor(&[batch, h, w, c], -1.0, 1.0);
            let f = |t: &[Tensor]| interpolate(&t[0], &t[1], &tris).unwrap();
            let cpu = vjp(&[attr.clone(), rast.clone()], f, &cot);
            let inputs = [
                attr.to_device(&gpu()).unwrap(),
                rast.to_device(&gpu()).unwrap(),
            ];
            let on_gpu = vjp(&inputs, f, &cot.to_device(&gpu()).unwrap());
            for (what, (a, b)) in ["attr", "rast"].iter().zip(cpu.iter().zip(&on_gpu)) {
                let error = relative_error(a, b);
                assert!(
                    error < 1e-10,
                    "interpolate VJP to {what}: relative error {error:e}"
                );
            }
        }
    }
}

#[test]
fn cuda_texture_matches_cpu() {
    let (batch, h, w, c) = (2, 64, 96, 3);
    let mut rng = Rng::new(9);
    for wrap in [WrapMode::Clamp, WrapMode::Wrap] {
        for sets in [1, batch] {
            let tex = rng.tensor(&[sets, 33, 47, c], 0.0, 1.0);
            let uv = rng.tensor(&[batch, h, w, 2], -0.3, 1.3);
            for dtype in [DType::F32, DType::F64] {
                let (tex, uv) = (tex.to_dtype(dtype).unwrap(), uv.to_dtype(dtype).unwrap());
                let cpu = texture(&tex, &uv, wrap).unwrap();
                let on_gpu = texture(
                    &tex.to_device(&gpu()).unwrap(),
                    &uv.to_device(&gpu()).unwrap(),
                    wrap,
                )
                .unwrap();
                assert!(identical(&cpu, &on_gpu), "{wrap:?} {dtype:?}");
            }
            let cot = rng.tensor(&[batch, h, w, c], -1.0, 1.0);
            let f = |t: &[Tensor]| texture(&t[0], &t[1], wrap).unwrap();
            let cpu = vjp(&[tex.clone(), uv.clone()], f, &cot);
            let inputs = [
                tex.to_device(&gpu()).unwrap(),
                uv.to_device(&gpu()).unwrap(),
            ];
            let on_gpu = vjp(&inputs, f, &cot.to_device(&gpu()).unwrap());
            for (what, (a, b)) in ["tex", "uv"].iter().zip(cpu.iter().zip(&on_gpu)) {
                let error = relative_error(a, b);
                assert!(
                    error < 1e-10,
                    "texture VJP to {what}: relative error {error:e}"
                );
            }
        }
    }
}

/// The composed renderer (vertex colours, SH light, antialiasing) on both devices in f64.
/// Shading runs as candle tensor ops on the GPU (fused kernels on the CPU) and cuBLAS rounds the
/// camera transform differently, so values agree to rounding rather than bit for bit.
#[test]
fn cuda_renderer_matches_cpu() {
    let (verts, tris) = bumpy_sphere(40, 64, 1.0, 0.15);
    let nv = verts.len() / 3;
    let tris = Triangles::new(tris, nv).unwrap();
    let renderer = Renderer::new(tris, camera(160, 120), RenderOptions::default());
    let mut rng = Rng::new(11);
    let inputs = [
        Tensor::from_vec(verts, (1, nv, 3), &Device::Cpu).unwrap(),
        Tensor::new(&[[0.1f64, -0.2, 0.05]], &Device::Cpu).unwrap(),
        Tensor::new(&[[0.05f64, -0.02, 3.0]], &Device::Cpu).unwrap(),
        rng.tensor(&[1, nv, 3], 0.2, 0.9),
        rng.tensor(&[1, 3, 9], -0.2, 0.4),
    ];
    let cot_image = rng.tensor(&[1, 120, 160, 3], -1.0, 1.0);
    let cot_mask = rng.tensor(&[1, 120, 160, 1], -1.0, 1.0);
    let run = |device: &Device| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(device).unwrap()).unwrap())
            .collect();
        let out = renderer
            .render(&Scene {
                vertices: vars[0].as_tensor(),
                rotation: vars[1].as_tensor(),
                translation: vars[2].as_tensor(),
                appearance: Appearance::VertexColors(vars[3].as_tensor()),
                lighting: Lighting::SphericalHarmonics(vars[4].as_tensor()),
            })
            .unwrap();
        let loss = ((&out.image * cot_image.to_device(device).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            + (&out.mask * cot_mask.to_device(device).unwrap())
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
            })
            .collect();
        (
            out.image.to_device(&Device::Cpu).unwrap(),
            out.mask.to_device(&Device::Cpu).unwrap(),
            grads,
        )
    };
    let (cpu_image, cpu_mask, cpu_grads) = run(&Device::Cpu);
    let (gpu_image, gpu_mask, gpu_grads) = run(&gpu());
    for (what, a, b) in [
        ("image", &cpu_image, &gpu_image),
        ("mask", &cpu_mask, &gpu_mask),
    ] {
        let error = relative_error(a, b);
        assert!(error < 1e-9, "{what}: relative error {error:e}");
    }
    for (what, (a, b)) in ["vertices", "rotation", "translation", "colours", "light"]
        .iter()
        .zip(cpu_grads.iter().zip(&gpu_grads))
    {
        let error = relative_error(a, b);
        assert!(
            error < 1e-8,
            "gradient to the {what}: relative error {error:e}"
        );
    }
}

/// SH shading on both devices (f64), at image sizes where some thread blocks span two images
/// (5000 pixels each; the light's gradient then falls back from per-block to per-warp sums) and
/// where none does (512), with three channels and with one.
#[test]
fn cuda_sh_shading_matches_cpu() {
    let mut rng = Rng::new(17);
    for (batch, pixels, channels) in [(2, 5000, 3), (3, 512, 1)] {
        let inputs = [
            rng.tensor(&[batch, pixels, channels], 0.0, 1.0),
            normalize(&rng.tensor(&[batch, pixels, 3], -1.0, 1.0)).unwrap(),
            rng.tensor(&[batch, channels, 9], -0.5, 0.5),
        ];
        let cot = rng.tensor(&[batch, pixels, channels], -1.0, 1.0);
        assert_gpu_matches_cpu(
            &format!("SH shading ({batch} x {pixels} x {channels})"),
            &inputs,
            |t| shade_sh(&t[0], &t[1], &t[2]).unwrap(),
            &cot,
            &["albedo", "normals", "light"],
            (1e-12, 1e-10),
        );
    }
}

/// Phong shading with a specular lobe on both devices (f64): the GPU's `pow` rounds differently
/// from the host's, so values agree to rounding.
#[test]
fn cuda_phong_matches_cpu() {
    let mut rng = Rng::new(13);
    let (batch, pixels) = (2, 5000);
    let inputs = [
        rng.tensor(&[batch, pixels, 3], 0.0, 1.0),
        normalize(&rng.tensor(&[batch, pixels, 3], -1.0, 1.0)).unwrap(),
        normalize(&rng.tensor(&[batch, pixels, 3], -1.0, 1.0)).unwrap(),
        rng.tensor(&[batch, 3], -1.0, 1.0),
        rng.tensor(&[batch, 3], 0.3, 1.0),
        rng.tensor(&[batch, 3], 0.0, 0.4),
    ];
    let cot = rng.tensor(&[batch, pixels, 3], -1.0, 1.0);
    let shade = |t: &[Tensor]| {
        let light = PhongLight {
            direction: t[3].clone(),
            color: t[4].clone(),
            ambient: t[5].clone(),
            specular: 0.3,
            shininess: 6.0,
        };
        shade_phong(&t[0], &t[1], &t[2], &light).unwrap()
    };
    assert_gpu_matches_cpu(
        "Phong",
        &inputs,
        shade,
        &cot,
        &[
            "albedo",
            "normals",
            "view",
            "direction",
            "colour",
            "ambient",
        ],
        (1e-12, 1e-10),
    );
}
