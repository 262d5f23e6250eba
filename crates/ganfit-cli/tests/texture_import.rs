//! `ganfit texture import-progan`: a ProGAN-named .npz becomes a loadable generator, and a
//! file that is not one fails with a hint.

use candle_core::{DType, Device, Tensor};
use ganfit::texture::{Generator, TextureModel};
use std::process::Command;

fn ganfit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ganfit"))
}

#[test]
fn converts_a_tensorflow_npz_into_a_generator() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("progan.npz");
    // A 4x4 ProGAN generator (latent 10, 6 channels) in TensorFlow names and layouts.
    let arrays = [
        ("G_paper/4x4/Dense/weight", vec![10, 16 * 6]),
        ("G_paper/4x4/Dense/bias", vec![6]),
        ("G_paper/4x4/Conv/weight", vec![3, 3, 6, 6]),
        ("G_paper/4x4/Conv/bias", vec![6]),
        ("G_paper/ToRGB_lod0/weight", vec![1, 1, 6, 3]),
        ("G_paper/ToRGB_lod0/bias", vec![3]),
    ]
    .map(|(name, shape)| {
        let t = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu).unwrap();
        (name, t)
    });
    Tensor::write_npz(&arrays, &npz).unwrap();
    let out = dir.path().join("generator.safetensors");
    let run = ganfit()
        .args(["texture", "import-progan"])
        .arg(&npz)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let generator = Generator::load(&out, &Device::Cpu).unwrap();
    assert_eq!(generator.config().channels, vec![6]);
    assert_eq!(generator.latent_dim(), 10);
    let dense = generator.params()["4x4.dense.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    let expected = arrays[0].1.t().unwrap();
    let diff = (dense - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn a_file_that_is_not_an_npz_fails_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("snapshot.pkl");
    std::fs::write(&bogus, b"pickle").unwrap();
    let run = ganfit()
        .args(["texture", "import-progan"])
        .arg(&bogus)
        .arg("--out")
        .arg(dir.path().join("g.safetensors"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("progan_to_npz.py"), "{stderr}");
}
