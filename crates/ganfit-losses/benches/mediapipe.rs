//! MediaPipe's BlazeFace detector and Face Mesh landmark network on the astronaut photo
//! (`examples/data/astronaut.png`), from a prepared input tensor (the network plus, for the
//! detector, anchor decoding and weighted NMS) and from the photo (resampling included).
//!
//! `cargo bench -p ganfit-losses --bench mediapipe -- --warm-up-time 1 --measurement-time 4`;
//! medians are in `target/criterion/<name>/new/estimates.json` (`median.point_estimate`, ns).
//! Set `RAYON_NUM_THREADS=1` for single-thread numbers.

// The allocator the `ganfit` binary ships with, so that timings match what a fit pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::Path;

use candle_core::Device;
use criterion::{Criterion, criterion_main};
use ganfit_losses::face::{FaceChoice, FaceDetector, FaceLandmarker, load_rgb, roi_from_detection};

fn bench(c: &mut Criterion) {
    let device = Device::Cpu;
    let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/astronaut.png");
    let image = load_rgb(&photo).expect("the astronaut photo");
    let detector = FaceDetector::new(&device).expect("detector weights");
    let landmarker = FaceLandmarker::new(&device).expect("landmark weights");
    let face = detector
        .detect_face(&image, FaceChoice::Largest)
        .expect("a face in the astronaut photo");
    let (detector_input, _) = detector.input_tensor(&image).unwrap();
    let mesh_input = landmarker
        .input_tensor(&image, &roi_from_detection(&face))
        .unwrap();

    c.bench_function("cpu/mediapipe/detector/tensor_128", |b| {
        b.iter(|| detector.detect_in_tensor(&detector_input).unwrap())
    });
    c.bench_function("cpu/mediapipe/detector/photo", |b| {
        b.iter(|| detector.detect(&image).unwrap())
    });
    c.bench_function("cpu/mediapipe/landmarks/tensor_192", |b| {
        b.iter(|| landmarker.run_tensor(&mesh_input).unwrap())
    });
    c.bench_function("cpu/mediapipe/landmarks/photo", |b| {
        b.iter(|| landmarker.landmarks(&image, &face).unwrap())
    });
}

ganfit_testkit::bench_group!(benches, bench);
criterion_main!(benches);
