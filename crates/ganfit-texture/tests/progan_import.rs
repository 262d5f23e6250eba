//! Importing official ProGAN (TensorFlow) generator weights from an `.npz` of TF variable names:
//! a generator written out under those names and layouts (the inverse mapping, below) must
//! come back bit-identical.

use candle_core::{Device, Tensor};
use ganfit_texture::{Generator, GeneratorConfig, TextureError, TextureModel, import_progan_npz};

/// Our parameters renamed and laid out as the official TF code stores them; level 2 uses the
/// fused `Conv0_up` layer (as the official 1024x1024 models do), level 1 the plain `Conv0`.
fn as_tensorflow(g: &Generator, scope: &str) -> Vec<(String, Tensor)> {
    let p = g.params();
    let conv = |t: &Tensor| t.permute((2, 3, 1, 0)).unwrap().contiguous().unwrap();
    let mut out = vec![
        (
            "4x4/Dense/weight".to_string(),
            p["4x4.dense.weight"].t().unwrap().contiguous().unwrap(),
        ),
        ("4x4/Dense/bias".to_string(), p["4x4.dense.bias"].clone()),
        ("4x4/Conv/weight".to_string(), conv(&p["4x4.conv.weight"])),
        ("4x4/Conv/bias".to_string(), p["4x4.conv.bias"].clone()),
    ];
    let top = g.config().max_level();
    for level in 1..=top {
        let r = 4 << level;
        let w0 = &p[&format!("{r}x{r}.conv0.weight")];
        let (name0, w0) = if level == 2 {
            let tf = w0.flip(&[2, 3]).unwrap().permute((2, 3, 0, 1)).unwrap();
            ("Conv0_up", tf.contiguous().unwrap())
        } else {
            ("Conv0", conv(w0))
        };
        out.push((format!("{r}x{r}/{name0}/weight"), w0));
        out.push((
            format!("{r}x{r}/{name0}/bias"),
            p[&format!("{r}x{r}.conv0.bias")].clone(),
        ));
        out.push((
            format!("{r}x{r}/Conv1/weight"),
            conv(&p[&format!("{r}x{r}.conv1.weight")]),
        ));
        out.push((
            format!("{r}x{r}/Conv1/bias"),
            p[&format!("{r}x{r}.conv1.bias")].clone(),
        ));
    }
    for level in 0..=top {
        let r = 4 << level;
        let lod = top - level;
        out.push((
            format!("ToRGB_lod{lod}/weight"),
            conv(&p[&format!("to_rgb.{r}x{r}.weight")]),
        ));
        out.push((
            format!("ToRGB_lod{lod}/bias"),
            p[&format!("to_rgb.{r}x{r}.bias")].clone(),
        ));
    }
    out.into_iter()
        .map(|(k, t)| (format!("{scope}{k}"), t))
        .collect()
}

/// A random generator with non-zero biases (fresh ones are zero, which would hide mix-ups).
fn random_generator() -> Generator {
    let config = GeneratorConfig {
        latent_dim: 12,
        channels: vec![8, 6, 5],
    };
    let g = Generator::new_random(config.clone(), 7, &Device::Cpu).unwrap();
    let params = g
        .params()
        .iter()
        .map(|(k, t)| {
            let t = if k.ends_with(".bias") {
                Tensor::randn(0f32, 1.0, t.dims(), &Device::Cpu).unwrap()
            } else {
                t.clone()
            };
            (k.clone(), t)
        })
        .collect();
    Generator::from_params(config, &params).unwrap()
}

#[test]
fn tensorflow_npz_imports_bit_identically() {
    let g = random_generator();
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("progan.npz");
    Tensor::write_npz(&as_tensorflow(&g, "G_paper/"), &npz).unwrap();

    let imported = import_progan_npz(&npz, &Device::Cpu).unwrap();
    assert_eq!(imported.config(), g.config());
    for (name, t) in g.params() {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = imported.params()[name]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs"
        );
    }
    let z = g.sample_latent(3, None, 1).unwrap();
    let (expected, got) = (g.generate(&z).unwrap(), imported.generate(&z).unwrap());
    let diff = (expected - got).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

    // And the result saves and loads like any generator.
    let out = dir.path().join("progan.safetensors");
    imported.save(&out).unwrap();
    assert_eq!(
        Generator::load(&out, &Device::Cpu).unwrap().config(),
        g.config()
    );
}

#[test]
fn incomplete_or_foreign_files_give_file_errors() {
    let g = random_generator();
    let dir = tempfile::tempdir().unwrap();
    let mut arrays = as_tensorflow(&g, "");
    arrays.retain(|(k, _)| k != "ToRGB_lod0/bias");
    let missing = dir.path().join("missing.npz");
    Tensor::write_npz(&arrays, &missing).unwrap();
    let err = import_progan_npz(&missing, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, TextureError::File { reason, .. } if reason.contains("ToRGB_lod0/bias")),
        "{err}"
    );

    let mut arrays = as_tensorflow(&g, "");
    for (k, t) in arrays.iter_mut() {
        if k == "8x8/Conv1/weight" {
            *t = Tensor::zeros((3, 3, 5, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        }
    }
    let mismatched = dir.path().join("mismatched.npz");
    Tensor::write_npz(&arrays, &mismatched).unwrap();
    let err = import_progan_npz(&mismatched, &Device::Cpu).unwrap_err();
    assert!(matches!(err, TextureError::File { .. }), "{err}");

    let not_npz = dir.path().join("weights.pkl");
    std::fs::write(&not_npz, b"not a zip archive").unwrap();
    let err = import_progan_npz(&not_npz, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("progan_to_npz.py"), "{err}");
}
