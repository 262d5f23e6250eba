//! The renderer's ops on a CUDA device (feature `cuda`), on the CPU benches' face-sized mesh
//! (18,432 triangles): rasterize alone, rasterize + interpolate + texture (a UV-textured face,
//! as the fit's texture stage draws it), and `Renderer::render` with vertex colours and SH light
//! (the fit's per-iteration render), forward and forward + backward, at 224² and 512², batch
//! 1 and 8; for the render also the host's time until its backward returns, and the 512² b1
//! render on a device with cudarc's event tracking left on. Each iteration waits for the GPU to
//! finish. Names are `cuda/<what>/<size>/b<batch>`; scripts/device-check.sh runs them on the
//! lent GPU.

// The allocator the `ganfit` binary ships with, so that timings match what a fit pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};
use common::{camera, face_like_mesh};
use criterion::{Criterion, criterion_group, criterion_main};
use ganfit_render::{
    Appearance, Camera, Lighting, RasterOptions, RenderOptions, Renderer, Rendering, Scene,
    Triangles, WrapMode, antialias, camera_from_world, interpolate, normalize, rasterize, shade_sh,
    texture, vertex_normals,
};

/// The sum of all of `t`'s values (`[B, H, W, C]`), a row at a time and then the rows' sums:
/// candle's `sum_all` on a CUDA device is one thread block for the whole tensor, 80 µs for a
/// 512² image on an H100, which would time the loss rather than the renderer.
fn sum(t: &Tensor) -> Tensor {
    let (b, h, w, c) = t.dims4().unwrap();
    t.reshape((b * h, w * c))
        .unwrap()
        .sum(1)
        .unwrap()
        .sum_all()
        .unwrap()
}

/// The mean of all of `t`'s values, summed as [`sum`] does.
fn mean(t: &Tensor) -> Tensor {
    (sum(t) / t.elem_count() as f64).unwrap()
}

fn benches(c: &mut Criterion) {
    let dev = ganfit_render::cuda_device(0).expect("the cuda benches need a CUDA device");
    let (verts, tris) = face_like_mesh();
    let nv = tris.num_vertices();
    // The mesh's planar projection as UVs, into a 512² texture.
    let uv: Vec<f32> = verts
        .chunks(3)
        .flat_map(|p| [p[0] / 0.16 + 0.5, p[1] / 0.2 + 0.5])
        .collect();
    let uv = Tensor::from_vec(uv, (nv, 2), &dev).unwrap();
    let tex =
        Var::from_tensor(&Tensor::rand(0.0f32, 1.0, (1, 512, 512, 3), &dev).unwrap()).unwrap();
    let mut group = c.benchmark_group("cuda");
    for size in [224usize, 512] {
        let cam = camera(size);
        for batch in [1usize, 8] {
            let points = Tensor::from_slice(&verts, (1, nv, 3), &Device::Cpu)
                .unwrap()
                .repeat((batch, 1, 1))
                .unwrap();
            let clip = cam.to_clip(&points).unwrap().to_device(&dev).unwrap();
            let var = Var::from_tensor(&clip).unwrap();
            let opts = RasterOptions::default();
            let id = |what: &str| format!("{what}/{size}/b{batch}");
            let sync = || dev.synchronize().unwrap();
            group.bench_function(id("raster_fwd"), |b| {
                b.iter(|| {
                    let rast = rasterize(&clip, &tris, size, size, opts).unwrap();
                    sync();
                    rast
                })
            });
            group.bench_function(id("raster_fwd_bwd"), |b| {
                b.iter(|| {
                    let rast = rasterize(var.as_tensor(), &tris, size, size, opts).unwrap();
                    let grads = sum(&rast).backward().unwrap();
                    sync();
                    grads
                })
            });
            let textured = |clip: &Tensor| {
                let rast = rasterize(clip, &tris, size, size, opts).unwrap();
                let uv_px = interpolate(&uv, &rast, &tris).unwrap();
                texture(tex.as_tensor(), &uv_px, WrapMode::Clamp).unwrap()
            };
            group.bench_function(id("textured_fwd"), |b| {
                b.iter(|| {
                    let image = textured(&clip);
                    sync();
                    image
                })
            });
            group.bench_function(id("textured_fwd_bwd"), |b| {
                b.iter(|| {
                    let grads = mean(&textured(var.as_tensor())).backward().unwrap();
                    sync();
                    grads
                })
            });
            let lit = LitFace::new(&dev, size, batch);
            group.bench_function(id("renderer_fwd_bwd"), |b| {
                b.iter(|| {
                    let grads = lit.render_and_backward();
                    sync();
                    grads
                })
            });
            // The host's part of the row above: the time until `backward` returns, before
            // waiting for the GPU. Close to the full time means the host's launches, not the
            // kernels, set the pace.
            group.bench_function(id("renderer_fwd_bwd_until_queued"), |b| {
                b.iter_custom(|iters| {
                    let mut queuing = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let grads = lit.render_and_backward();
                        queuing += start.elapsed();
                        sync();
                        drop(grads);
                    }
                    queuing
                })
            });
        }
    }
    // The row `renderer_fwd_bwd/512/b1` on a device as candle makes it, with cudarc's event
    // tracking on: what `ganfit_render::cuda_device` saves.
    let tracked = Device::new_cuda(0).expect("the cuda benches need a CUDA device");
    let lit = LitFace::new(&tracked, 512, 1);
    group.bench_function("renderer_fwd_bwd_event_tracking/512/b1", |b| {
        b.iter(|| {
            let grads = lit.render_and_backward();
            tracked.synchronize().unwrap();
            grads
        })
    });
    group.finish();
}

/// The fit's per-iteration render of the benches' face (vertex colours under SH light), as
/// variables on one device.
struct LitFace {
    triangles: Triangles,
    camera: Camera,
    renderer: Renderer,
    /// World vertices, rotation, translation, vertex colours, SH light.
    vars: [Var; 5],
}

impl LitFace {
    fn new(dev: &Device, size: usize, batch: usize) -> Self {
        let (verts, tris) = face_like_mesh();
        let nv = tris.num_vertices();
        let var = |t: candle_core::Result<Tensor>| Var::from_tensor(&t.unwrap()).unwrap();
        let pose = |v: [f32; 3]| var(Tensor::new(&[v], dev).unwrap().repeat((batch, 1)));
        Self {
            renderer: Renderer::new(tris.clone(), camera(size), RenderOptions::default()),
            triangles: tris,
            camera: camera(size),
            vars: [
                var(Tensor::from_slice(&verts, (1, nv, 3), dev)
                    .and_then(|t| t.repeat((batch, 1, 1)))),
                pose([0.02, -0.03, 0.01]),
                pose([0.0; 3]),
                var(Tensor::full(0.7f32, (batch, nv, 3), dev)),
                var(Tensor::rand(0.0f32, 0.3, (batch, 3, 9), dev)),
            ],
        }
    }

    fn render(&self) -> Rendering {
        let [world, rotation, translation, albedo, light] = &self.vars;
        self.renderer
            .render(&Scene {
                vertices: world.as_tensor(),
                rotation: rotation.as_tensor(),
                translation: translation.as_tensor(),
                appearance: Appearance::VertexColors(albedo.as_tensor()),
                lighting: Lighting::SphericalHarmonics(light.as_tensor()),
            })
            .unwrap()
    }

    /// Forward and backward of the image's and the mask's means.
    fn render_and_backward(&self) -> candle_core::backprop::GradStore {
        let out = self.render();
        (mean(&out.image) + mean(&out.mask))
            .unwrap()
            .backward()
            .unwrap()
    }
}

/// Where `Renderer::render`'s time goes at 512², batch 1: its pipeline rebuilt from the public
/// ops and cut after each step (`cuda_stages/<n>_<last step>`, forward + backward, each
/// including the steps before it), and the forward pass alone.
fn stages(c: &mut Criterion) {
    let dev = ganfit_render::cuda_device(0).expect("the cuda benches need a CUDA device");
    let size = 512;
    let lit = LitFace::new(&dev, size, 1);
    let (tris, cam) = (&lit.triangles, &lit.camera);
    let [world, rotation, translation, albedo, light] = &lit.vars;
    let pipeline = |steps: usize| -> Tensor {
        let camera_vertices = camera_from_world(
            world.as_tensor(),
            rotation.as_tensor(),
            translation.as_tensor(),
        )
        .unwrap();
        let clip = cam.to_clip(&camera_vertices).unwrap();
        let rast = rasterize(&clip, tris, size, size, RasterOptions::default()).unwrap();
        let mut loss = sum(&rast);
        if steps < 2 {
            return loss;
        }
        let normals = normalize(
            &interpolate(
                &vertex_normals(&camera_vertices, tris).unwrap(),
                &rast,
                tris,
            )
            .unwrap(),
        )
        .unwrap();
        if steps < 3 {
            return (loss + sum(&normals)).unwrap();
        }
        let colours = interpolate(albedo.as_tensor(), &rast, tris).unwrap();
        if steps < 4 {
            return (loss + (sum(&colours) + sum(&normals))).unwrap();
        }
        let shaded = shade_sh(&colours, &normals, light.as_tensor()).unwrap();
        if steps < 5 {
            return (loss + mean(&shaded)).unwrap();
        }
        let image = antialias(&shaded, &rast, &clip, tris).unwrap();
        loss = (loss + mean(&image)).unwrap();
        loss
    };
    let sync = || dev.synchronize().unwrap();
    let mut group = c.benchmark_group("cuda_stages");
    for (steps, name) in [
        (1, "1_camera_raster"),
        (2, "2_normals"),
        (3, "3_albedo"),
        (4, "4_sh_shading"),
        (5, "5_antialias"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let grads = pipeline(steps).backward().unwrap();
                sync();
                grads
            })
        });
    }
    group.bench_function("5_antialias_fwd_only", |b| {
        b.iter(|| {
            let loss = pipeline(5).detach();
            sync();
            loss
        })
    });
    group.bench_function("renderer_fwd_only", |b| {
        b.iter(|| {
            let out = lit.render();
            sync();
            out.image
        })
    });
    group.finish();
}

criterion_group!(render_cuda, stages, benches);
criterion_main!(render_cuda);
