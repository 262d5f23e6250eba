//! Generator and discriminator: shapes, gradients against finite differences, file round trips
//! and error reporting.

use candle_core::{DType, Device, Tensor, Var};
use ganfit_testkit::max_abs_diff;
use ganfit_texture::{
    Discriminator, Generator, GeneratorConfig, TextureError, TextureModel, conv2d_same,
};

fn tiny_config() -> GeneratorConfig {
    GeneratorConfig {
        latent_dim: 6,
        channels: vec![5, 4, 3],
    }
}

/// Deterministic pseudo-random tensor with values in [-1, 1].
fn pattern(shape: &[usize], salt: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| (i as f64 * 0.7548776662 + salt).fract() * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn output_shapes_at_every_level_and_fade() {
    let g = Generator::new_random(tiny_config(), 1, &Device::Cpu).unwrap();
    let z = g.sample_latent(3, None, 7).unwrap();
    for level in 0..3 {
        for alpha in [0.3, 1.0] {
            let r = 4 << level;
            assert_eq!(g.forward(&z, level, alpha).unwrap().dims(), [3, 3, r, r]);
        }
    }
    assert_eq!(g.generate(&z).unwrap().dims(), [3, 3, 16, 16]);
    assert_eq!(g.resolution(), (16, 16));
    assert_eq!(g.latent_prior(&z).unwrap().dims(), [3]);
    let d = Discriminator::new_random(&tiny_config(), 3, 2, &Device::Cpu).unwrap();
    let x = g.forward(&z, 2, 0.5).unwrap();
    assert_eq!(d.forward(&x, 2, 0.5).unwrap().dims(), [3]);
}

#[test]
fn default_config_is_256_and_progan_widths_follow_the_rule() {
    assert_eq!(GeneratorConfig::default().resolution(), 256);
    let official = GeneratorConfig::progan(1024, 512, 8192, 512).unwrap();
    assert_eq!(
        official.channels,
        vec![512, 512, 512, 512, 256, 128, 64, 32, 16]
    );
}

#[test]
fn fade_in_endpoints_match_the_two_levels() {
    let g = Generator::new_random(tiny_config(), 3, &Device::Cpu).unwrap();
    let z = g.sample_latent(2, None, 1).unwrap();
    let grown = g.forward(&z, 2, 1.0).unwrap();
    let faded_full = g.forward(&z, 2, 0.999_999).unwrap();
    assert!(max_abs_diff(&grown, &faded_full) < 1e-4);
    let coarse = g
        .forward(&z, 1, 1.0)
        .unwrap()
        .upsample_nearest2d(16, 16)
        .unwrap();
    assert!(max_abs_diff(&coarse, &g.forward(&z, 2, 0.0).unwrap()) < 1e-6);
}

/// The gradient of `sum(weights * output(z))` w.r.t. `z`, and that energy.
fn latent_gradient(z: &Tensor, output: impl Fn(&Tensor) -> Tensor) -> (Vec<f64>, f64) {
    let z = Var::from_tensor(z).unwrap();
    let out = output(z.as_tensor());
    let weights = pattern(out.dims(), 0.3, out.dtype());
    let energy = (out * &weights).unwrap().sum_all().unwrap();
    let grads = energy.backward().unwrap();
    let grad = grads
        .get(z.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    (
        grad,
        energy.to_dtype(DType::F64).unwrap().to_scalar().unwrap(),
    )
}

#[test]
fn latent_gradient_matches_central_differences() {
    let g = Generator::new_random(tiny_config(), 4, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let z0 = pattern(&[2, 6], 0.1, DType::F64);
    let base: Vec<f64> = z0.flatten_all().unwrap().to_vec1().unwrap();
    // Fixed weights at alpha = 1 (forward and generate) run the fused latent pass, alpha < 1
    // the candle graph.
    let outputs: [&dyn Fn(&Tensor) -> Tensor; 3] = [
        &|z| g.forward(z, 2, 0.6).unwrap(),
        &|z| g.forward(z, 2, 1.0).unwrap(),
        &|z| g.generate(z).unwrap(),
    ];
    for (which, output) in outputs.iter().enumerate() {
        let (analytic, _) = latent_gradient(&z0, output);
        let h = 1e-5;
        for (i, a) in analytic.iter().enumerate() {
            let shifted = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let z = Tensor::from_vec(v, (2, 6), &Device::Cpu).unwrap();
                latent_gradient(&z, output).1
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
            assert!(
                (a - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "output {which}, component {i}: autodiff {a} vs finite difference {numeric}"
            );
        }
    }
}

#[test]
fn fixed_weight_pass_matches_the_candle_graph() {
    // Fixed weights at alpha = 1 take the fused latent pass; alpha < 1 and trainable (Var)
    // weights take the candle graph. In f64, alpha = 1 - 1e-12 isolates the path difference.
    let config = GeneratorConfig {
        latent_dim: 9,
        channels: vec![6, 5, 4, 3],
    };
    let fixed = Generator::new_random(config.clone(), 5, &Device::Cpu).unwrap();
    let fixed64 = fixed.to_dtype(DType::F64).unwrap();
    let z64 = pattern(&[3, 9], 0.4, DType::F64);
    let graph_texture = |z: &Tensor| {
        let raw = fixed64.forward(z, 3, 1.0 - 1e-12).unwrap();
        raw.affine(0.5, 0.5).unwrap()
    };
    let texture = fixed64.generate(&z64).unwrap();
    assert!(max_abs_diff(&texture, &graph_texture(&z64)) < 1e-10);
    let (fused, _) = latent_gradient(&z64, |z| fixed64.generate(z).unwrap());
    let (graph, _) = latent_gradient(&z64, graph_texture);
    for (x, y) in fused.iter().zip(&graph) {
        assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()), "{x} vs {y}");
    }
    for level in 1..4 {
        let fused = fixed64.forward(&z64, level, 1.0).unwrap();
        let graph = fixed64.forward(&z64, level, 1.0 - 1e-12).unwrap();
        assert!(max_abs_diff(&fused, &graph) < 1e-10, "level {level}");
        let (fused, _) = latent_gradient(&z64, |z| fixed64.forward(z, level, 1.0).unwrap());
        let (graph, _) = latent_gradient(&z64, |z| fixed64.forward(z, level, 1.0 - 1e-12).unwrap());
        for (x, y) in fused.iter().zip(&graph) {
            assert!(
                (x - y).abs() <= 1e-9 * (1.0 + y.abs()),
                "level {level}: {x} vs {y}"
            );
        }
    }
    // Trainable weights are f32; a few rounding steps through 3-channel pixel norms remain.
    let vars = fixed
        .params()
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap().as_tensor().clone()))
        .collect();
    let trainable = Generator::from_params(config, &vars).unwrap();
    let z = z64.to_dtype(DType::F32).unwrap();
    for level in 0..4 {
        let graph = trainable.forward(&z, level, 1.0).unwrap();
        let magnitude = max_abs_diff(&graph, &graph.zeros_like().unwrap());
        let fused = fixed.forward(&z, level, 1.0).unwrap();
        assert!(
            max_abs_diff(&fused, &graph) <= 1e-4 * magnitude,
            "level {level}"
        );
    }
}

#[test]
fn custom_convolution_matches_candle_and_its_gradients_match_finite_differences() {
    let x0 = pattern(&[2, 3, 5, 6], 0.2, DType::F64);
    let w0 = pattern(&[4, 3, 3, 3], 0.6, DType::F64);
    let reference = x0.conv2d(&w0, 1, 1, 1, 1).unwrap();
    assert!(max_abs_diff(&conv2d_same(&x0, &w0).unwrap(), &reference) < 1e-12);
    let w1 = pattern(&[4, 3, 1, 1], 0.9, DType::F64);
    assert!(
        max_abs_diff(
            &conv2d_same(&x0, &w1).unwrap(),
            &x0.conv2d(&w1, 0, 1, 1, 1).unwrap()
        ) < 1e-12
    );

    let probe = pattern(&[2, 4, 5, 6], 0.45, DType::F64);
    let energy = |x: &Tensor, w: &Tensor| {
        (conv2d_same(x, w).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let (x, w) = (
        Var::from_tensor(&x0).unwrap(),
        Var::from_tensor(&w0).unwrap(),
    );
    let grads = energy(x.as_tensor(), w.as_tensor()).backward().unwrap();
    for (var, other, is_x) in [(&x, &w0, true), (&w, &x0, false)] {
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..base.len()).step_by(7) {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap();
                let e = if is_x {
                    energy(&t, other)
                } else {
                    energy(other, &t)
                };
                e.to_scalar::<f64>().unwrap()
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!(
                (analytic[i] - numeric).abs() < 1e-7,
                "entry {i}: {} vs {numeric}",
                analytic[i]
            );
        }
    }
}

fn f64_discriminator(group: usize) -> Discriminator {
    let d = Discriminator::new_random(&tiny_config(), group, 5, &Device::Cpu).unwrap();
    let params = d
        .params()
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F64).unwrap()))
        .collect();
    Discriminator::from_params(&tiny_config(), group, params).unwrap()
}

#[test]
fn discriminator_input_gradient_matches_autodiff() {
    let d = f64_discriminator(4);
    for (level, alpha) in [(2, 0.35), (2, 1.0), (0, 1.0)] {
        let r = 4 << level;
        let x = Var::from_tensor(&pattern(&[8, 3, r, r], 0.15, DType::F64)).unwrap();
        let (score, manual) = d
            .forward_with_input_grad(x.as_tensor(), level, alpha)
            .unwrap();
        let autodiff = score.sum_all().unwrap().backward().unwrap();
        let autodiff = autodiff.get(x.as_tensor()).unwrap();
        let scale = autodiff
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            max_abs_diff(&manual, autodiff) < 1e-10 * (1.0 + scale),
            "level {level} alpha {alpha}"
        );
    }
}

#[test]
fn gradient_penalty_is_differentiable_wrt_discriminator_weights() {
    let d = f64_discriminator(2);
    let x = pattern(&[4, 3, 8, 8], 0.8, DType::F64);
    let name = "8x8.conv0.weight";
    let penalty = |d: &Discriminator| {
        let (_, g) = d.forward_with_input_grad(&x, 1, 0.5).unwrap();
        g.sqr().unwrap().sum_all().unwrap()
    };
    let vars: std::collections::BTreeMap<String, Var> = d
        .params()
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let traced = Discriminator::from_params(
        &tiny_config(),
        2,
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
    )
    .unwrap();
    let grads = penalty(&traced).backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(vars[name].as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = d.params()[name].flatten_all().unwrap().to_vec1().unwrap();
    for i in (0..base.len()).step_by(11) {
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let mut params = d.params().clone();
            params.insert(
                name.into(),
                Tensor::from_vec(v, d.params()[name].dims(), &Device::Cpu).unwrap(),
            );
            penalty(&Discriminator::from_params(&tiny_config(), 2, params).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
        assert!(
            (analytic[i] - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
            "entry {i}: {} vs {numeric}",
            analytic[i]
        );
    }
}

/// A generator built around given parameters keeps their dtype: an f64 copy for gradient and
/// device parity checks must not be rounded to f32 on the way.
#[test]
fn generators_around_given_parameters_keep_their_dtype_and_refuse_mixed_ones() {
    let g = Generator::new_random(tiny_config(), 4, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let rebuilt = Generator::from_params(g.config().clone(), g.params()).unwrap();
    let z = pattern(&[2, 6], 0.3, DType::F64);
    let level = g.config().max_level();
    let (a, b) = (
        g.forward(&z, level, 1.0).unwrap(),
        rebuilt.forward(&z, level, 1.0).unwrap(),
    );
    assert_eq!(b.dtype(), DType::F64);
    // The same weights through the fused pass and through the layer-by-layer graph.
    assert!(max_abs_diff(&a, &b) < 1e-12, "{}", max_abs_diff(&a, &b));

    let mut mixed = g.params().clone();
    let first = mixed.keys().next().unwrap().clone();
    let as_f32 = mixed[&first].to_dtype(DType::F32).unwrap();
    mixed.insert(first, as_f32);
    assert!(matches!(
        Generator::from_params(g.config().clone(), &mixed),
        Err(TextureError::InvalidConfig(_))
    ));
}

#[test]
fn save_then_load_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.safetensors");
    let g = Generator::new_random(tiny_config(), 9, &Device::Cpu).unwrap();
    g.save(&path).unwrap();
    let loaded = Generator::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), g.config());
    assert_eq!(
        loaded.params().keys().collect::<Vec<_>>(),
        g.params().keys().collect::<Vec<_>>()
    );
    for (name, t) in g.params() {
        let a: Vec<u32> = t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let b: Vec<u32> = loaded.params()[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(a, b, "{name}");
    }
    let z = g.sample_latent(2, Some(1.5), 3).unwrap();
    let (a, b) = (g.generate(&z).unwrap(), loaded.generate(&z).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn truncated_latents_respect_the_threshold_and_are_seeded() {
    let g = Generator::new_random(tiny_config(), 1, &Device::Cpu).unwrap();
    let z = g.sample_latent(50, Some(0.5), 11).unwrap();
    let max = z
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max <= 0.5);
    assert_eq!(
        max_abs_diff(&z, &g.sample_latent(50, Some(0.5), 11).unwrap()),
        0.0
    );
    assert!(max_abs_diff(&z, &g.sample_latent(50, Some(0.5), 12).unwrap()) > 0.0);
    assert!(matches!(
        g.sample_latent(1, Some(0.0), 1),
        Err(TextureError::InvalidConfig(_))
    ));
}

#[test]
fn shell_prior_is_zero_on_the_shell_and_grows_off_it() {
    let g = Generator::new_random(tiny_config(), 1, &Device::Cpu).unwrap();
    let on_shell = Tensor::ones((1, 6), DType::F32, &Device::Cpu).unwrap();
    let off_shell = (&on_shell * 2.0).unwrap();
    let p: Vec<f32> = g
        .latent_prior(&Tensor::cat(&[&on_shell, &off_shell], 0).unwrap())
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(p[0].abs() < 1e-6);
    assert!(
        (p[1] - 0.5 * 6.0).abs() < 1e-4,
        "0.5 * (2*sqrt(6) - sqrt(6))^2 = 3, got {}",
        p[1]
    );
}

#[test]
fn bad_inputs_give_typed_errors() {
    let g = Generator::new_random(tiny_config(), 1, &Device::Cpu).unwrap();
    let wrong = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let err = g.generate(&wrong).unwrap_err();
    assert!(
        matches!(err, TextureError::LatentShape { expected: 6, .. }),
        "{err}"
    );
    assert!(matches!(
        g.forward(&g.sample_latent(1, None, 0).unwrap(), 3, 1.0),
        Err(TextureError::InvalidConfig(_))
    ));
    let bad_config = GeneratorConfig {
        latent_dim: 0,
        channels: vec![4],
    };
    assert!(matches!(
        Generator::new_random(bad_config, 0, &Device::Cpu),
        Err(TextureError::InvalidConfig(_))
    ));
    assert!(matches!(
        GeneratorConfig::progan(100, 512, 8192, 512),
        Err(TextureError::InvalidConfig(_))
    ));

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    assert!(matches!(
        Generator::load(&missing, &Device::Cpu),
        Err(TextureError::File { .. })
    ));
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a tensor file").unwrap();
    let err = Generator::load(&junk, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("not a safetensors file"), "{err}");

    // A safetensors file without our metadata, and weights missing a tensor, are explained.
    let bare = dir.path().join("bare.safetensors");
    let as_map: std::collections::HashMap<_, _> = g.params().clone().into_iter().collect();
    candle_core::safetensors::save(&as_map, &bare).unwrap();
    let err = Generator::load(&bare, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("ganfit.generator_config"), "{err}");
    let mut incomplete = g.params().clone();
    incomplete.remove("8x8.conv1.weight");
    let err = Generator::from_params(g.config().clone(), &incomplete).unwrap_err();
    assert!(err.to_string().contains("8x8.conv1.weight"), "{err}");
}
