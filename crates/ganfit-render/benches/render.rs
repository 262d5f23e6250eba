//! Rasteriser and renderer throughput on a face-sized synthetic mesh of 18,432 triangles (the
//! rasteriser alone, the ops composed by hand, and `Renderer::render` under SH and Phong light),
//! with a plainly written per-triangle bounding-box rasteriser timed alongside for the ratio.
//!
//! Names are `cpu/<what>/<size>/b<batch>`. Run single-threaded for the per-core target:
//! `RAYON_NUM_THREADS=1 cargo bench -p ganfit-render --bench render -- --warm-up-time 1 --measurement-time 3`
//! (under mimalloc, like the `ganfit` binary: candle's autograd allocates image-sized buffers
//! every call, which glibc's default thresholds hand back to the kernel).
//!
//! Like the binary, the bench keeps candle's element-wise ops (autograd's gradient sums among
//! them) in the calling thread: candle's own pool for them spins beside rayon's. One more
//! process setting moves the numbers and is left at its default: mimalloc hands freed
//! image-sized buffers back to the system after 10 ms, so each call faults them in again
//! (`MIMALLOC_PURGE_DELAY=-1` keeps them).

// The allocator the `ganfit` binary ships with, so that timings match what a fit pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use candle_core::{Device, Tensor, Var};
use common::{camera, face_like_mesh};
use criterion::{Criterion, criterion_main};
use ganfit_render::{
    Appearance, Lighting, PhongLight, RasterOptions, RenderOptions, Renderer, Scene, WrapMode,
    antialias, interpolate, rasterize, shade_sh, vertex_normals,
};

/// The textbook rasteriser: for every triangle, every pixel centre in its screen bounding box,
/// 2D edge functions after the perspective divide, 1/w-corrected barycentrics, depth test.
fn reference_rasterize(clip: &[f32], tris: &[[u32; 3]], h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; h * w * 4];
    for (t, tri) in tris.iter().enumerate() {
        let v = tri.map(|i| {
            let c = &clip[i as usize * 4..i as usize * 4 + 4];
            let sx = ((c[0] / c[3]) + 1.0) * 0.5 * w as f32 - 0.5;
            let sy = ((c[1] / c[3]) + 1.0) * 0.5 * h as f32 - 0.5;
            [sx, sy, c[2] / c[3], 1.0 / c[3]]
        });
        let area =
            (v[1][0] - v[0][0]) * (v[2][1] - v[0][1]) - (v[2][0] - v[0][0]) * (v[1][1] - v[0][1]);
        if area == 0.0 {
            continue;
        }
        let x0 = v
            .iter()
            .map(|p| p[0])
            .fold(f32::INFINITY, f32::min)
            .ceil()
            .max(0.0) as usize;
        let x1 = v
            .iter()
            .map(|p| p[0])
            .fold(f32::NEG_INFINITY, f32::max)
            .floor()
            .min(w as f32 - 1.0);
        let y0 = v
            .iter()
            .map(|p| p[1])
            .fold(f32::INFINITY, f32::min)
            .ceil()
            .max(0.0) as usize;
        let y1 = v
            .iter()
            .map(|p| p[1])
            .fold(f32::NEG_INFINITY, f32::max)
            .floor()
            .min(h as f32 - 1.0);
        if x1 < 0.0 || y1 < 0.0 {
            continue;
        }
        for y in y0..=y1 as usize {
            for x in x0..=x1 as usize {
                let (px, py) = (x as f32, y as f32);
                let edge = |a: [f32; 4], b: [f32; 4]| {
                    ((b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0])) / area
                };
                let b = [edge(v[1], v[2]), edge(v[2], v[0]), edge(v[0], v[1])];
                if b.iter().any(|&b| b < 0.0) {
                    continue;
                }
                let z = b[0] * v[0][2] + b[1] * v[1][2] + b[2] * v[2][2];
                let o = &mut out[(y * w + x) * 4..(y * w + x) * 4 + 4];
                if o[3] != 0.0 && z >= o[2] {
                    continue;
                }
                let inv_w = b[0] * v[0][3] + b[1] * v[1][3] + b[2] * v[2][3];
                o.copy_from_slice(&[
                    b[0] * v[0][3] / inv_w,
                    b[1] * v[1][3] / inv_w,
                    z,
                    (t + 1) as f32,
                ]);
            }
        }
    }
    out
}

fn benches(c: &mut Criterion) {
    let (verts, tris) = face_like_mesh();
    let nv = tris.num_vertices();
    let dev = Device::Cpu;
    // Few samples: the 512² batch-8 cases take a good fraction of a second each.
    let mut group = c.benchmark_group("cpu");
    group.sample_size(10);
    for size in [224usize, 512] {
        let cam = camera(size);
        for batch in [1usize, 8] {
            let points = Tensor::from_slice(&verts, (1, nv, 3), &dev)
                .unwrap()
                .repeat((batch, 1, 1))
                .unwrap();
            let clip = cam.to_clip(&points).unwrap();
            let var = Var::from_tensor(&clip).unwrap();
            let colors = Tensor::full(0.7f32, (nv, 3), &dev).unwrap();
            let sh = Tensor::rand(0.0f32, 0.3, (batch, 3, 9), &dev).unwrap();
            let normals = vertex_normals(&points, &tris).unwrap();
            let opts = RasterOptions::default();
            let id = |what: &str| format!("{what}/{size}/b{batch}");

            group.bench_function(id("raster_fwd"), |b| {
                b.iter(|| rasterize(&clip, &tris, size, size, opts).unwrap())
            });
            group.bench_function(id("raster_fwd_bwd"), |b| {
                b.iter(|| {
                    let rast = rasterize(var.as_tensor(), &tris, size, size, opts).unwrap();
                    rast.sum_all().unwrap().backward().unwrap()
                })
            });
            // Raster + interpolated normals and colour + SH shading + antialias.
            let render = |clip: &Tensor| {
                let rast = rasterize(clip, &tris, size, size, opts).unwrap();
                let n = interpolate(&normals, &rast, &tris)
                    .unwrap()
                    .reshape((batch, size * size, 3))
                    .unwrap();
                let a = interpolate(&colors, &rast, &tris)
                    .unwrap()
                    .reshape((batch, size * size, 3))
                    .unwrap();
                let img = shade_sh(&a, &n, &sh)
                    .unwrap()
                    .reshape((batch, size, size, 3))
                    .unwrap();
                antialias(&img, &rast, clip, &tris).unwrap()
            };
            group.bench_function(id("render_fwd"), |b| b.iter(|| render(&clip)));
            group.bench_function(id("render_fwd_bwd"), |b| {
                b.iter(|| {
                    render(var.as_tensor())
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                })
            });
            // The composed renderer as the fit calls it: gradients to the vertices, pose, vertex
            // colours and light.
            let renderer = Renderer::new(tris.clone(), cam, RenderOptions::default());
            let world = Var::from_tensor(&points).unwrap();
            let rotation = Var::from_tensor(
                &Tensor::new(&[[0.02f32, -0.03, 0.01]], &dev)
                    .unwrap()
                    .repeat((batch, 1))
                    .unwrap(),
            )
            .unwrap();
            let translation = Var::zeros((batch, 3), candle_core::DType::F32, &dev).unwrap();
            let albedo =
                Var::from_tensor(&colors.unsqueeze(0).unwrap().repeat((batch, 1, 1)).unwrap())
                    .unwrap();
            let light = Var::from_tensor(&sh).unwrap();
            let scene = || Scene {
                vertices: world.as_tensor(),
                rotation: rotation.as_tensor(),
                translation: translation.as_tensor(),
                appearance: Appearance::VertexColors(albedo.as_tensor()),
                lighting: Lighting::SphericalHarmonics(light.as_tensor()),
            };
            group.bench_function(id("renderer_fwd"), |b| {
                b.iter(|| renderer.render(&scene()).unwrap().image)
            });
            group.bench_function(id("renderer_fwd_bwd"), |b| {
                b.iter(|| {
                    let out = renderer.render(&scene()).unwrap();
                    (out.image.mean_all().unwrap() + out.mask.mean_all().unwrap())
                        .unwrap()
                        .backward()
                        .unwrap()
                })
            });
            // GANFIT's own illumination: one directional light plus ambient, with a specular lobe.
            let phong_param = |v: [f32; 3]| {
                Var::from_tensor(&Tensor::new(&[v], &dev).unwrap().repeat((batch, 1)).unwrap())
                    .unwrap()
            };
            let (direction, light_color, ambient) = (
                phong_param([0.3, -0.2, -1.0]),
                phong_param([0.8, 0.8, 0.8]),
                phong_param([0.2, 0.2, 0.2]),
            );
            let phong = PhongLight {
                direction: direction.as_tensor().clone(),
                color: light_color.as_tensor().clone(),
                ambient: ambient.as_tensor().clone(),
                specular: 0.2,
                shininess: 8.0,
            };
            group.bench_function(id("renderer_phong_fwd_bwd"), |b| {
                b.iter(|| {
                    let out = renderer
                        .render(&Scene {
                            lighting: Lighting::Phong(&phong),
                            ..scene()
                        })
                        .unwrap();
                    (out.image.mean_all().unwrap() + out.mask.mean_all().unwrap())
                        .unwrap()
                        .backward()
                        .unwrap()
                })
            });
            // As the fit's texture stage calls it: a 512² UV texture (here the mesh's planar
            // projection) under SH light, gradients to the texture as well.
            let uv: Vec<f32> = verts
                .chunks(3)
                .flat_map(|p| [p[0] / 0.16 + 0.5, p[1] / 0.2 + 0.5])
                .collect();
            let uv = Tensor::from_vec(uv, (nv, 2), &dev).unwrap();
            let tex = Var::from_tensor(&Tensor::rand(0.2f32, 0.9, (1, 512, 512, 3), &dev).unwrap())
                .unwrap();
            let textured = || Scene {
                appearance: Appearance::Texture {
                    texture: tex.as_tensor(),
                    uv: &uv,
                    uv_triangles: None,
                    wrap: WrapMode::Clamp,
                },
                ..scene()
            };
            group.bench_function(id("renderer_textured_fwd_bwd"), |b| {
                b.iter(|| {
                    let out = renderer.render(&textured()).unwrap();
                    (out.image.mean_all().unwrap() + out.mask.mean_all().unwrap())
                        .unwrap()
                        .backward()
                        .unwrap()
                })
            });
            if batch == 1 {
                let flat: Vec<f32> = clip.flatten_all().unwrap().to_vec1().unwrap();
                group.bench_function(id("reference_raster_fwd"), |b| {
                    b.iter(|| reference_rasterize(&flat, tris.as_slice(), size, size))
                });
                // The two rasterisers must agree on coverage for the ratio to mean anything.
                let ours: Vec<f32> = rasterize(&clip, &tris, size, size, opts)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let theirs = reference_rasterize(&flat, tris.as_slice(), size, size);
                let differ = ours
                    .chunks(4)
                    .zip(theirs.chunks(4))
                    .filter(|(a, b)| (a[3] > 0.0) != (b[3] > 0.0))
                    .count();
                let covered = ours.chunks(4).filter(|a| a[3] > 0.0).count();
                eprintln!(
                    "{size}x{size}: {covered} pixels covered, coverage differs from the reference at {differ}"
                );
            }
        }
    }
    group.finish();
}

ganfit_testkit::bench_group!(render, benches);
criterion_main!(render);
