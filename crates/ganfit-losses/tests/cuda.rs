//! The loss networks on a CUDA device against the CPU. The identity network runs its tensor-op
//! path there (the fused CPU stages are CPU-only): feature maps, descriptors and the input
//! gradient of the identity + content losses in f64 to 1e-9 of their scale (the same folded
//! weights, only the summation order differs), descriptors in f32 to 1e-4. MediaPipe's detector
//! and landmarker on the bundled photo: boxes, keypoints and the 468 points within 0.01 px. The
//! chip warp and its image gradient in f64 to 1e-12 (its scatter adds in another order).
//! Built only with the `cuda` feature and run on a machine with a GPU by
//! scripts/device-check.sh, from this crate's folder (the photo is found relative to it).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use ganfit_losses::align::{ChipWarp, SimilarityTransform};
use ganfit_losses::face::{FaceChoice, FaceDetector, FaceLandmarker, load_rgb};
use ganfit_losses::identity::{FaceRecognitionNet, INPUT_SIZE};
use ganfit_losses::losses::{content_loss, identity_loss};
use ganfit_testkit::{gpu, pseudo_random, relative_error};

/// `n` deterministic pixel values in 0–255.
fn pixels(n: usize, seed: u64) -> Vec<f64> {
    pseudo_random(n, seed)
        .into_iter()
        .map(|v| (v + 1.0) * 127.5)
        .collect()
}

/// d `loss` / d `of`.
fn gradient(loss: &Tensor, of: &Var) -> Tensor {
    loss.backward()
        .unwrap()
        .get(of.as_tensor())
        .expect("the variable takes part in the loss")
        .clone()
}

/// The network's maps and descriptors for `images`, and the gradient of identity + content
/// losses against `reference` with respect to the images.
fn features_and_input_gradient(
    net: &FaceRecognitionNet,
    images: &Tensor,
    reference: &Tensor,
) -> (Vec<Tensor>, Tensor) {
    let target = net.forward(reference).unwrap();
    let images = Var::from_tensor(images).unwrap();
    let features = net.forward(images.as_tensor()).unwrap();
    let loss = (identity_loss(&target.embedding, &features.embedding).unwrap()
        + content_loss(&target.maps, &features.maps).unwrap())
    .unwrap();
    let grad = gradient(&loss, &images);
    let mut outputs = features.maps;
    outputs.push(features.embedding);
    (outputs, grad)
}

#[test]
fn cuda_identity_network_matches_cpu() {
    let dims = (2, 3, INPUT_SIZE, INPUT_SIZE);
    let n = 2 * 3 * INPUT_SIZE * INPUT_SIZE;
    let images = Tensor::from_vec(pixels(n, 1), dims, &Device::Cpu).unwrap();
    let reference = Tensor::from_vec(pixels(n, 2), dims, &Device::Cpu).unwrap();
    let load = |device: &Device, dtype| {
        FaceRecognitionNet::load(device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let (cpu, on_gpu) = (load(&Device::Cpu, DType::F64), load(&gpu(), DType::F64));
    let to_gpu = |t: &Tensor| t.to_device(&gpu()).unwrap();
    let (expected, expected_grad) = features_and_input_gradient(&cpu, &images, &reference);
    let (got, got_grad) =
        features_and_input_gradient(&on_gpu, &to_gpu(&images), &to_gpu(&reference));
    for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
        let error = relative_error(e, g);
        eprintln!("f64 output {i} {:?}: {error:.1e}", e.dims());
        assert!(error < 1e-9, "output {i} differs by {error}");
    }
    let grad_error = relative_error(&expected_grad, &got_grad);
    eprintln!("f64 input gradient: {grad_error:.1e}");
    assert!(grad_error < 1e-9, "input gradient differs by {grad_error}");

    let images = images.to_dtype(DType::F32).unwrap();
    let cpu_f32 = load(&Device::Cpu, DType::F32).embed(&images).unwrap();
    let gpu_f32 = load(&gpu(), DType::F32).embed(&to_gpu(&images)).unwrap();
    let error = relative_error(&cpu_f32, &gpu_f32);
    eprintln!("f32 descriptors: {error:.1e}");
    assert!(error < 1e-4, "f32 descriptors differ by {error}");
}

#[test]
fn cuda_face_detection_and_landmarks_match_cpu() {
    let image = load_rgb("../../examples/data/astronaut.png")
        .expect("run from crates/ganfit-losses: the test reads ../../examples/data/astronaut.png");
    let found = |device: &Device| {
        let detector = FaceDetector::new(device).unwrap();
        let face = detector.detect_face(&image, FaceChoice::Largest).unwrap();
        let points = FaceLandmarker::new(device)
            .unwrap()
            .landmarks(&image, &face)
            .unwrap();
        (face, points)
    };
    let ((cpu_face, cpu_points), (gpu_face, gpu_points)) = (found(&Device::Cpu), found(&gpu()));
    let distance = |a: [f32; 2], b: [f32; 2]| (a[0] - b[0]).hypot(a[1] - b[1]);
    let box_corners = |b: [f32; 4]| [[b[0], b[1]], [b[2], b[3]]];
    let detection_error = box_corners(cpu_face.bbox)
        .iter()
        .chain(&cpu_face.keypoints)
        .zip(box_corners(gpu_face.bbox).iter().chain(&gpu_face.keypoints))
        .map(|(a, b)| distance(*a, *b))
        .fold(0.0f32, f32::max);
    let mesh_error = (0..cpu_points.points.len())
        .map(|i| distance(cpu_points.xy(i), gpu_points.xy(i)))
        .fold(0.0f32, f32::max);
    eprintln!("detection {detection_error:.2e} px, 468 points {mesh_error:.2e} px");
    assert!((cpu_face.score - gpu_face.score).abs() < 1e-4);
    assert!(
        detection_error < 0.01,
        "detection differs by {detection_error} px"
    );
    assert!(mesh_error < 0.01, "landmarks differ by {mesh_error} px");
}

#[test]
fn cuda_chip_warp_and_its_image_gradient_match_cpu() {
    let (batch, height, width) = (2, 181, 203);
    let dims = (batch, 3, height, width);
    let images =
        Tensor::from_vec(pixels(batch * 3 * height * width, 3), dims, &Device::Cpu).unwrap();
    let cotangent = Tensor::from_vec(
        pseudo_random(batch * 3 * INPUT_SIZE * INPUT_SIZE, 4),
        (batch, 3, INPUT_SIZE, INPUT_SIZE),
        &Device::Cpu,
    )
    .unwrap();
    // Rotated and scaled so that samples fall between pixels and some chip corners leave the
    // image.
    let transform = SimilarityTransform {
        a: 1.3 * 0.35f64.cos(),
        b: 1.3 * 0.35f64.sin(),
        t: [-12.0, 4.5],
    };
    let warp_and_gradient = |device: &Device| {
        let warp =
            ChipWarp::new(&transform, height, width, INPUT_SIZE, DType::F64, device).unwrap();
        let images = Var::from_tensor(&images.to_device(device).unwrap()).unwrap();
        let chips = warp.apply(images.as_tensor()).unwrap();
        let loss = (&chips * cotangent.to_device(device).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        (chips, gradient(&loss, &images))
    };
    let (cpu_chips, cpu_grad) = warp_and_gradient(&Device::Cpu);
    let (gpu_chips, gpu_grad) = warp_and_gradient(&gpu());
    let (chip_error, grad_error) = (
        relative_error(&cpu_chips, &gpu_chips),
        relative_error(&cpu_grad, &gpu_grad),
    );
    eprintln!("chip warp {chip_error:.1e}, image gradient {grad_error:.1e}");
    assert!(chip_error < 1e-12, "chips differ by {chip_error}");
    assert!(grad_error < 1e-12, "image gradients differ by {grad_error}");
}
