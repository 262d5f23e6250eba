//! Forward + backward (to the input) of the dlib face-recognition ResNet on a batch of two
//! 150×150 images — GANFIT's render R and frontal render R̂ — through the identity and content
//! losses against a fixed photo; the forward pass alone is timed too. `forward_backward_cpu`
//! reports the same step's CPU time (all threads of the process), which on a shared machine
//! moves much less with the load than the wall time. Built with the `cuda` feature it times the
//! same two steps on the first GPU as `cuda/...` (scripts/device-check.sh runs it there).
//!
//! `cargo bench --release -p ganfit-losses --bench identity -- --warm-up-time 2 --measurement-time 5`
//! (tools/bench/identity_torch.py times the same network in PyTorch; tools/bench/compare_identity.sh
//! runs both, interleaved, with 1 and 2 threads).

// The allocator the `ganfit` binary ships with, so that timings match what a fit pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_main};
use ganfit_losses::identity::{FaceRecognitionNet, INPUT_SIZE};
use ganfit_losses::losses::{content_loss, identity_loss};

fn bench(c: &mut Criterion) {
    bench_on(c, &Device::Cpu, "cpu");
    // With the `cuda` feature, the same steps on the first GPU (its tensor-op path).
    #[cfg(feature = "cuda")]
    bench_on(
        c,
        &ganfit_render::cuda_device(0).expect("a CUDA device"),
        "cuda",
    );
}

fn bench_on(c: &mut Criterion, device: &Device, name: &str) {
    let device = device.clone();
    let net = FaceRecognitionNet::load(&device).expect("weights");
    let shape = (2, 3, INPUT_SIZE, INPUT_SIZE);
    let images = (Tensor::rand(0f32, 255f32, shape, &device).unwrap())
        .to_dtype(DType::F32)
        .unwrap();
    let photo = net
        .forward(&Tensor::rand(0f32, 255f32, (1, 3, INPUT_SIZE, INPUT_SIZE), &device).unwrap())
        .unwrap();
    let input = Var::from_tensor(&images).unwrap();

    c.bench_function(&format!("{name}/dlib_resnet/forward/b2"), |b| {
        b.iter(|| {
            let embedding = net.embed(&images).unwrap();
            // A GPU queues its work: wait for it, so that the time is the work's.
            device.synchronize().unwrap();
            embedding
        })
    });
    let step = || {
        let render = net.forward(input.as_tensor()).unwrap();
        let loss = (identity_loss(&photo.embedding, &render.embedding).unwrap()
            + content_loss(&photo.maps, &render.maps).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
        let grads = loss.backward().unwrap();
        let grad = grads.get(input.as_tensor()).unwrap().clone();
        device.synchronize().unwrap();
        grad
    };
    c.bench_function(&format!("{name}/dlib_resnet/forward_backward/b2"), |b| {
        b.iter(step)
    });
    if !device.is_cpu() {
        return;
    }
    c.bench_function("cpu/dlib_resnet/forward_backward_cpu/b2", |b| {
        b.iter_custom(|iters| {
            let start = process_cpu_time();
            for _ in 0..iters {
                std::hint::black_box(step());
            }
            process_cpu_time() - start
        })
    });
}

/// CPU time used so far by all threads of this process.
fn process_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to; the clock id is a constant Linux supports.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(status, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

ganfit_testkit::bench_group!(benches, bench);
criterion_main!(benches);
