//! The converted network reproduces dlib's own descriptors (fixtures made by
//! tools/fixtures/make_dlib_fixture.py with dlib 20.0.1).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ganfit_losses::identity::{FaceRecognitionNet, INPUT_SIZE};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    faces: Vec<Face>,
}

#[derive(Deserialize)]
struct Face {
    chip: String,
    descriptor: Vec<f32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dlib")
}

/// `[3, 150, 150]` RGB values 0–255 of a fixture chip.
fn load_chip(name: &str) -> Tensor {
    let img = image::open(fixture_dir().join(name)).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (INPUT_SIZE as u32, INPUT_SIZE as u32));
    let data: Vec<f32> = img.into_raw().into_iter().map(f32::from).collect();
    Tensor::from_vec(data, (INPUT_SIZE, INPUT_SIZE, 3), &Device::Cpu)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
}

#[test]
fn descriptors_match_dlib_within_1e4() {
    let text = std::fs::read_to_string(fixture_dir().join("descriptors.json")).unwrap();
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    assert!(fixture.faces.len() >= 6);
    let net = FaceRecognitionNet::load(&Device::Cpu).unwrap();
    let chips: Vec<Tensor> = fixture.faces.iter().map(|f| load_chip(&f.chip)).collect();
    let batch = Tensor::stack(&chips, 0).unwrap();
    let ours: Vec<Vec<f32>> = net.embed(&batch).unwrap().to_vec2().unwrap();
    let mut worst = 0f32;
    for (face, got) in fixture.faces.iter().zip(&ours) {
        assert_eq!(got.len(), face.descriptor.len());
        let diff = got
            .iter()
            .zip(&face.descriptor)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{}: max |ours − dlib| = {diff:.2e}", face.chip);
        worst = worst.max(diff);
    }
    assert!(worst <= 1e-4, "max abs difference {worst}");
}
