//! `instance` + backward on the ICT full face area (9,409 vertices, 100 identity + 53
//! expression modes), the per-iteration cost of the geometry in a fit; `instance` alone; and
//! the bench loss + backward alone (on a vertex variable), the part of the first that is not
//! the morphable model.
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo bench -p ganfit-morphable --bench instance -- --warm-up-time 1 --measurement-time 3
//! ```

// The allocator the `ganfit` binary ships with, so that timings match what a fit pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Tensor, Var};
use criterion::{Criterion, criterion_main};
use ganfit_assets::Resolver;
use ganfit_morphable::MorphableModel;

fn instance_and_backward(c: &mut Criterion) {
    let model = MorphableModel::ict(&Resolver::new(), &Device::Cpu)
        .and_then(|m| m.region_model("face"))
        .expect("the ICT model (converted from ../shared/assets/ICT-FaceKit on first use)");
    let p_s = Var::from_tensor(&Tensor::full(0.1f32, model.shape_modes(), &Device::Cpu).unwrap())
        .unwrap();
    let p_e =
        Var::from_tensor(&Tensor::full(0.2f32, model.expression_modes(), &Device::Cpu).unwrap())
            .unwrap();
    let weights = model.mean().affine(1e-3, 0.0).unwrap();
    c.bench_function("ict_face_instance_backward", |b| {
        b.iter(|| {
            let v = model.instance(p_s.as_tensor(), p_e.as_tensor()).unwrap();
            let loss = (v * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            std::hint::black_box(grads.get(p_s.as_tensor()).is_some())
        })
    });
    c.bench_function("ict_face_instance_forward", |b| {
        b.iter(|| std::hint::black_box(model.instance(p_s.as_tensor(), p_e.as_tensor()).unwrap()))
    });
    let vertices = Var::from_tensor(model.mean()).unwrap();
    c.bench_function("ict_face_loss_backward_only", |b| {
        b.iter(|| {
            let loss = (vertices.as_tensor() * &weights)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            std::hint::black_box(grads.get(vertices.as_tensor()).is_some())
        })
    });
}

ganfit_testkit::bench_group!(benches, instance_and_backward);
criterion_main!(benches);
