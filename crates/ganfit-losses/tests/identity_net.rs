//! The identity network end to end: gradients through the whole network and both losses,
//! alignment against dlib's own chips, and bad weights or inputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ganfit_assets::{AssetError, Resolver};
use ganfit_losses::LossError;
use ganfit_losses::align::{ChipWarp, DLIB_CHIP_PADDING, chip_transform};
use ganfit_losses::gradcheck::{check_input_gradient_at, seeded_tensor};
use ganfit_losses::identity::{DLIB_RESNET_ASSET_ID, FaceRecognitionNet, INPUT_SIZE};
use ganfit_losses::losses::{content_loss, identity_loss};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    faces: Vec<Face>,
}

#[derive(Deserialize)]
struct Face {
    photo: String,
    descriptor_from_photo: Vec<f32>,
    landmarks5: Vec<[f64; 2]>,
    chip_rect: [f64; 4],
    chip_angle: f64,
    landmarks68: Vec<[f64; 2]>,
    chip68_rect: [f64; 4],
    chip68_angle: f64,
}

fn fixture() -> Fixture {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dlib");
    serde_json::from_str(&std::fs::read_to_string(dir.join("descriptors.json")).unwrap()).unwrap()
}

fn faces_dir() -> PathBuf {
    ganfit_assets::shared_dir_candidates("data/faces")
        .into_iter()
        .find(|p| p.is_dir())
        .expect("../shared/data/faces beside the checkout")
}

/// `[1, 3, H, W]` RGB 0–255 of an image file.
fn load_rgb(path: &Path) -> Tensor {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.into_raw().into_iter().map(f32::from).collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn loss_gradients_through_the_whole_network_match_finite_differences() {
    let net = FaceRecognitionNet::load(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let photo_image = ((seeded_tensor(&[1, 3, INPUT_SIZE, INPUT_SIZE], 1).unwrap() + 1.0).unwrap()
        * 127.0)
        .unwrap();
    let photo = net.forward(&photo_image).unwrap();
    let render = ((seeded_tensor(&[1, 3, INPUT_SIZE, INPUT_SIZE], 2).unwrap() + 1.0).unwrap()
        * 127.0)
        .unwrap();
    let loss = |x: &Tensor| -> candle_core::Result<Tensor> {
        let r = net.forward(x).map_err(candle_core::Error::wrap)?;
        let id = identity_loss(&photo.embedding, &r.embedding).map_err(candle_core::Error::wrap)?;
        let content = content_loss(&photo.maps, &r.maps).map_err(candle_core::Error::wrap)?;
        id + content
    };
    let worst = check_input_gradient_at(&render, loss, 1e-5, 7).unwrap();
    println!("largest relative gradient error: {worst:.2e}");
}

/// Checks our fit against the rectangle and angle dlib's `get_face_chip_details` made from the
/// same landmarks.
fn assert_same_chip(what: &str, landmarks: &[[f64; 2]], rect: [f64; 4], angle: f64) {
    let t = chip_transform(landmarks, INPUT_SIZE, DLIB_CHIP_PADDING).unwrap();
    let [l, top, r, b] = rect;
    let centre = t.apply([INPUT_SIZE as f64 / 2.0; 2]);
    // dlib's drectangle spans right − left + 1 pixels.
    let scale = (r - l + 1.0) / INPUT_SIZE as f64;
    assert!((centre[0] - (l + r) / 2.0).abs() < 1e-6, "{what}: centre x");
    assert!(
        (centre[1] - (top + b) / 2.0).abs() < 1e-6,
        "{what}: centre y"
    );
    assert!(
        (t.scale() - scale).abs() < 1e-9 * scale.max(1.0),
        "{what}: scale"
    );
    assert!((t.angle() - angle).abs() < 1e-9, "{what}: angle");
}

#[test]
fn chip_transform_equals_dlibs_face_chip_details_for_5_and_68_landmarks() {
    for face in fixture().faces {
        assert_same_chip(
            &face.photo,
            &face.landmarks5,
            face.chip_rect,
            face.chip_angle,
        );
        assert_eq!(face.landmarks68.len(), 68);
        let what = format!("{} (68 points)", face.photo);
        assert_same_chip(
            &what,
            &face.landmarks68,
            face.chip68_rect,
            face.chip68_angle,
        );
    }
}

/// Our differentiable warp of the photo against dlib's `compute_face_descriptor(img, shape)`
/// (dlib's own chip). Where the face is at most twice the chip's size dlib samples the photo
/// bilinearly as we do, and the descriptors agree closely (JPEG decoders differ slightly). Larger
/// faces dlib first shrinks with an image pyramid (`pyramid_down<2>`), which our warp does not;
/// those descriptors still stay far inside dlib's same-person threshold of 0.6.
#[test]
fn warped_photo_chips_embed_like_dlibs_chips() {
    let net = FaceRecognitionNet::load(&Device::Cpu).unwrap();
    let dir = faces_dir();
    for face in fixture().faces {
        let photo = load_rgb(&dir.join(&face.photo));
        let (_, _, h, w) = photo.dims4().unwrap();
        let warp = ChipWarp::dlib_chip(&face.landmarks5, h, w, DType::F32, &Device::Cpu).unwrap();
        let ours: Vec<f32> = net
            .embed(&warp.apply(&photo).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let dist = ours
            .iter()
            .zip(&face.descriptor_from_photo)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        let [l, _, r, _] = face.chip_rect;
        let scale = (r - l + 1.0) / INPUT_SIZE as f64;
        println!(
            "{} (chip scale {scale:.2}): descriptor distance to dlib's chip {dist:.4}",
            face.photo
        );
        let limit = if scale <= 2.0 { 0.01 } else { 0.12 };
        assert!(dist < limit, "{}: distance {dist} ≥ {limit}", face.photo);
    }
}

#[test]
fn empty_batches_give_empty_outputs() {
    let net = FaceRecognitionNet::load(&Device::Cpu).unwrap();
    let x = Tensor::zeros((0, 3, INPUT_SIZE, INPUT_SIZE), DType::F32, &Device::Cpu).unwrap();
    let features = net.forward(&x).unwrap();
    assert_eq!(features.embedding.dims(), &[0, 128]);
    assert_eq!(features.maps.len(), 6);
}

#[test]
fn wrong_input_shapes_are_errors() {
    let net = FaceRecognitionNet::load(&Device::Cpu).unwrap();
    for shape in [
        vec![1, 3, 128, 128],
        vec![1, 1, 150, 150],
        vec![3, 150, 150],
    ] {
        let x = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let err = net.forward(&x).unwrap_err();
        assert!(matches!(err, LossError::InputShape { .. }), "{err}");
        assert!(err.to_string().contains("150"), "{err}");
    }
}

#[test]
fn bad_weight_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::Cpu;

    let missing = dir.path().join("missing.safetensors");
    let err = FaceRecognitionNet::from_file(&missing, &device).unwrap_err();
    assert!(matches!(err, LossError::WeightsFile { .. }), "{err}");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not safetensors").unwrap();
    let err = FaceRecognitionNet::from_file(&garbage, &device).unwrap_err();
    assert!(err.to_string().contains("convert_dlib"), "{err}");

    let mean = Tensor::new(&[122.782f32, 117.001, 104.298], &device).unwrap();
    let err =
        FaceRecognitionNet::from_tensors(&HashMap::from([("input.mean_rgb".to_string(), mean)]))
            .unwrap_err();
    assert!(
        matches!(&err, LossError::MissingTensor { name } if name == "stem.conv.weight"),
        "{err}"
    );

    let wrong = Tensor::zeros(4, DType::F32, &device).unwrap();
    let err =
        FaceRecognitionNet::from_tensors(&HashMap::from([("input.mean_rgb".to_string(), wrong)]))
            .unwrap_err();
    assert!(matches!(err, LossError::TensorShape { .. }), "{err}");

    // Through the resolver, a file that is not the manifest's fails its checksum.
    let tampered = dir.path().join("tampered.safetensors");
    std::fs::write(&tampered, b"tampered").unwrap();
    let resolver = Resolver::builder()
        .path(DLIB_RESNET_ASSET_ID, &tampered)
        .build();
    let err = FaceRecognitionNet::from_resolver(&resolver, &device).unwrap_err();
    assert!(
        matches!(
            err,
            LossError::Asset(AssetError::SizeMismatch { .. } | AssetError::ChecksumMismatch { .. })
        ),
        "{err}"
    );
}
