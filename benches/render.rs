//! Renderer throughput on the real workload: the ICT Face Model's full face area (9,409
//! vertices, ~18.5k triangles), rasterise + interpolate + SH shading + antialias, forward and
//! forward + backward to the vertices, at 224² and 512², batch 1 and 8.
//!
//! `RAYON_NUM_THREADS=1 cargo bench --bench render -- --warm-up-time 1 --measurement-time 3`
//! gives the one-core numbers. Names are `cpu/<what>/<size>/b<batch>`.

// The allocator the `ganfit` binary ships with, so that timings match what a fit pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_main};
use ganfit::morphable::MorphableModel;
use ganfit::render::{Appearance, Camera, Lighting, RenderOptions, Renderer, Scene, Triangles};

fn bench(c: &mut Criterion) {
    let device = Device::Cpu;
    let face = MorphableModel::ict(&ganfit::assets::Resolver::new(), &device)
        .unwrap()
        .region_model("face")
        .unwrap();
    let triangles = Triangles::new(face.triangles().to_vec(), face.n_vertices()).unwrap();
    let centre: Vec<f32> = face.mean().mean(0).unwrap().to_vec1().unwrap();
    let mut group = c.benchmark_group("cpu");
    group.sample_size(20);
    for size in [224usize, 512] {
        let half = (size as f64 - 1.0) / 2.0;
        let focal = 3.2 * size as f64;
        let camera = Camera::new(focal, focal, half, half, size, size, 10.0, 2000.0).unwrap();
        let renderer = Renderer::new(triangles.clone(), camera, RenderOptions::default());
        for batch in [1usize, 8] {
            let vertices = Var::from_tensor(
                &face
                    .mean()
                    .unsqueeze(0)
                    .unwrap()
                    .repeat((batch, 1, 1))
                    .unwrap(),
            )
            .unwrap();
            let rotation = Tensor::new(&[[std::f32::consts::PI, 0.1, 0.0]], &device)
                .unwrap()
                .repeat((batch, 1))
                .unwrap();
            let translation = Tensor::new(&[[-centre[0], centre[1], centre[2] + 600.0]], &device)
                .unwrap()
                .repeat((batch, 1))
                .unwrap();
            let albedo = Tensor::full(0.7f32, (batch, face.n_vertices(), 3), &device).unwrap();
            let mut sh = vec![0.0f32; batch * 3 * 9];
            for b in 0..batch {
                for ch in 0..3 {
                    sh[(b * 3 + ch) * 9] = 0.8;
                    sh[(b * 3 + ch) * 9 + 2] = -0.3;
                }
            }
            let sh = Tensor::from_vec(sh, (batch, 3, 9), &device).unwrap();
            let scene = || Scene {
                vertices: vertices.as_tensor(),
                rotation: &rotation,
                translation: &translation,
                appearance: Appearance::VertexColors(&albedo),
                lighting: Lighting::SphericalHarmonics(&sh),
            };
            group.bench_function(format!("render_fwd/{size}/b{batch}"), |b| {
                b.iter(|| renderer.render(&scene()).unwrap().image)
            });
            group.bench_function(format!("render_fwd_bwd/{size}/b{batch}"), |b| {
                b.iter(|| {
                    let image = renderer.render(&scene()).unwrap().image;
                    image
                        .to_dtype(DType::F32)
                        .unwrap()
                        .mean_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

ganfit_testkit::bench_group!(benches, bench);
criterion_main!(benches);
