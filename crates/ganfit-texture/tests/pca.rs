//! Weighted PCA: recovery of a known low-rank structure from masked data, file round trip
//! and error reporting.

use candle_core::{Device, Tensor};
use ganfit_texture::{PcaFitOptions, PcaTextureModel, TextureDataset, TextureError, TextureModel};

const R: usize = 8;
const D: usize = 3 * R * R;

struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-12), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Orthonormal true components `[3, D]` (Gram-Schmidt of random vectors).
fn true_basis(rng: &mut Lcg) -> Vec<Vec<f64>> {
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for _ in 0..3 {
        let mut v: Vec<f64> = (0..D).map(|_| rng.normal()).collect();
        for b in &basis {
            let dot: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        basis.push(v.into_iter().map(|x| x / norm).collect());
    }
    basis
}

/// `n` textures `mean + sum_k s_k z_k u_k + noise`, with 40% of texels masked out (and those
/// texels overwritten with garbage, which a correct fit must ignore).
fn low_rank_data(n: usize, rng: &mut Lcg, basis: &[Vec<f64>]) -> (TextureDataset, Vec<f32>) {
    let scales = [2.0, 1.0, 0.5];
    let mut clean = Vec::with_capacity(n * D);
    let mut observed = Vec::with_capacity(n * D);
    let mut masks = Vec::with_capacity(n * R * R);
    for _ in 0..n {
        let z: Vec<f64> = scales.iter().map(|s| s * rng.normal()).collect();
        let mask: Vec<f32> = (0..R * R)
            .map(|_| if rng.uniform() < 0.6 { 1.0 } else { 0.0 })
            .collect();
        for d in 0..D {
            let value = 0.5 + (0..3).map(|k| z[k] * basis[k][d]).sum::<f64>() + 1e-3 * rng.normal();
            clean.push(value as f32);
            observed.push(if mask[d % (R * R)] > 0.0 {
                value as f32
            } else {
                7.0
            });
        }
        masks.extend(mask);
    }
    let images = Tensor::from_vec(observed, (n, 3, R, R), &Device::Cpu).unwrap();
    let masks = Tensor::from_vec(masks, (n, 1, R, R), &Device::Cpu).unwrap();
    (TextureDataset::new(images, Some(masks)).unwrap(), clean)
}

/// A PCA model of `data` with default options but for these.
fn fit(data: &TextureDataset, components: usize, iterations: usize) -> PcaTextureModel {
    let options = PcaFitOptions {
        components,
        iterations,
        ..Default::default()
    };
    PcaTextureModel::fit(data, &options).unwrap()
}

#[test]
fn recovers_a_low_rank_subspace_and_fills_masked_texels() {
    let mut rng = Lcg(42);
    let basis = true_basis(&mut rng);
    let (data, clean) = low_rank_data(300, &mut rng, &basis);
    let options = PcaFitOptions {
        components: 3,
        iterations: 500,
        tolerance: 1e-9,
        seed: 1,
    };
    let model = PcaTextureModel::fit(&data, &options).unwrap();

    // Every true component lies in the recovered span: |P u| = 1 up to noise.
    let found: Vec<Vec<f32>> = model
        .components()
        .reshape((3, D))
        .unwrap()
        .to_vec2()
        .unwrap();
    for (k, u) in basis.iter().enumerate() {
        let projected: f64 = found
            .iter()
            .map(|b| {
                b.iter()
                    .zip(u)
                    .map(|(x, y)| f64::from(*x) * y)
                    .sum::<f64>()
                    .powi(2)
            })
            .sum();
        assert!(
            projected > 1.0 - 1e-3,
            "true component {k} is only {projected:.5} inside the fit"
        );
    }
    let stddev: Vec<f32> = model.stddev().to_vec1().unwrap();
    for (got, want) in stddev.iter().zip([2.0, 1.0, 0.5]) {
        assert!(
            (f64::from(*got) - want).abs() < 0.25 * want,
            "stddevs {stddev:?}"
        );
    }

    // Masked texels of the training data are reconstructed from the observed ones.
    let (images, masks) = data.tensors();
    let mask: Vec<f32> = masks
        .broadcast_as((300, 3, R, R))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let flat = images.reshape((300, D)).unwrap();
    let mut err = 0.0f64;
    let mut count = 0usize;
    for i in 0..20 {
        // Least squares on observed texels for this sample's latent, then compare hidden texels.
        let m = &mask[i * D..(i + 1) * D];
        let x: Vec<f32> = flat.get(i).unwrap().to_vec1().unwrap();
        let mean: Vec<f32> = model.mean().flatten_all().unwrap().to_vec1().unwrap();
        let mut normal = [[0.0f64; 3]; 3];
        let mut rhs = [0.0f64; 3];
        for d in (0..D).filter(|&d| m[d] > 0.0) {
            for a in 0..3 {
                rhs[a] += f64::from(found[a][d]) * f64::from(x[d] - mean[d]);
                for b in 0..3 {
                    normal[a][b] += f64::from(found[a][d]) * f64::from(found[b][d]);
                }
            }
        }
        let coef = solve3(normal, rhs);
        for d in (0..D).filter(|&d| m[d] == 0.0) {
            let predicted = f64::from(mean[d])
                + (0..3)
                    .map(|a| coef[a] * f64::from(found[a][d]))
                    .sum::<f64>();
            err += (predicted - f64::from(clean[i * D + d])).powi(2);
            count += 1;
        }
    }
    let rmse = (err / count as f64).sqrt();
    assert!(rmse < 0.02, "hidden-texel RMSE {rmse}");
}

fn solve3(a: [[f64; 3]; 3], b: [f64; 3]) -> [f64; 3] {
    let det = |m: [[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let full = det(a);
    [0, 1, 2].map(|col| {
        let mut m = a;
        for row in 0..3 {
            m[row][col] = b[row];
        }
        det(m) / full
    })
}

#[test]
fn generates_whitened_textures_and_round_trips_through_a_file() {
    let mut rng = Lcg(7);
    let basis = true_basis(&mut rng);
    let (data, _) = low_rank_data(60, &mut rng, &basis);
    let model = fit(&data, 2, 50);
    let z = model.sample_latent(4, None, 3).unwrap();
    let textures = model.generate(&z).unwrap();
    assert_eq!(textures.dims(), [4, 3, R, R]);
    let zero = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let at_zero = model.generate(&zero).unwrap().squeeze(0).unwrap();
    let diff: f32 = (at_zero - model.mean())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
    let prior: Vec<f32> = model.latent_prior(&z).unwrap().to_vec1().unwrap();
    let expected: Vec<f32> = z
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(prior, expected);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pca.safetensors");
    model.save(&path).unwrap();
    let loaded = PcaTextureModel::load(&path, &Device::Cpu).unwrap();
    let again = loaded.generate(&z).unwrap();
    let through_loader = ganfit_texture::load_texture_model(&path, &Device::Cpu)
        .unwrap()
        .generate(&z)
        .unwrap();
    assert_eq!(
        through_loader
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        again.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let diff: f32 = (again - textures)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn bad_requests_give_typed_errors() {
    let mut rng = Lcg(9);
    let basis = true_basis(&mut rng);
    let (data, _) = low_rank_data(10, &mut rng, &basis);
    let too_many = PcaFitOptions {
        components: 10,
        ..Default::default()
    };
    assert!(matches!(
        PcaTextureModel::fit(&data, &too_many),
        Err(TextureError::InvalidConfig(_))
    ));

    let images = Tensor::ones((4, 3, R, R), candle_core::DType::F32, &Device::Cpu).unwrap();
    let masks = Tensor::zeros((4, 1, R, R), candle_core::DType::F32, &Device::Cpu).unwrap();
    let hidden = TextureDataset::new(images, Some(masks)).unwrap();
    let options = PcaFitOptions {
        components: 1,
        ..Default::default()
    };
    assert!(matches!(
        PcaTextureModel::fit(&hidden, &options),
        Err(TextureError::Data(_))
    ));

    let model = fit(&data, 2, 5);
    let wrong = Tensor::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        model.generate(&wrong),
        Err(TextureError::LatentShape { expected: 2, .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let generator_file = dir.path().join("g.safetensors");
    ganfit_texture::Generator::new_random(
        ganfit_texture::GeneratorConfig {
            latent_dim: 2,
            channels: vec![2],
        },
        0,
        &Device::Cpu,
    )
    .unwrap()
    .save(&generator_file)
    .unwrap();
    let err = PcaTextureModel::load(&generator_file, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    // The loader tells a generator file from a PCA file by the generator's configuration.
    let generator = ganfit_texture::load_texture_model(&generator_file, &Device::Cpu).unwrap();
    assert_eq!(generator.latent_dim(), 2);
    assert!(
        generator
            .encode(
                &model.mean().unsqueeze(0).unwrap(),
                &Tensor::ones((1, 1, R, R), candle_core::DType::F32, &Device::Cpu).unwrap()
            )
            .unwrap()
            .is_none()
    );
}

/// The largest `|a - b|` between two tensors.
fn abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn encodes_a_texture_from_its_seen_texels_alone() {
    let mut rng = Lcg(11);
    let basis = true_basis(&mut rng);
    let (data, _) = low_rank_data(300, &mut rng, &basis);
    let model = fit(&data, 3, 300);
    let latent = Tensor::new(&[[1.0f32, -0.5, 0.8]], &Device::Cpu).unwrap();
    let texture = model.generate(&latent).unwrap();
    // Half the texels hidden and overwritten with garbage, which the encoding must ignore.
    let seen: Vec<f32> = (0..R * R).map(|i| ((i / 3) % 2) as f32).collect();
    let seen = Tensor::from_vec(seen, (1, 1, R, R), &Device::Cpu).unwrap();
    let hidden = seen
        .affine(-1.0, 1.0)
        .unwrap()
        .broadcast_as(texture.shape())
        .unwrap();
    let spoiled = (texture.broadcast_mul(&seen).unwrap() + (hidden * 9.0).unwrap()).unwrap();
    let encoded = model.encode(&spoiled, &seen).unwrap().unwrap();
    // The prior shrinks each coordinate by σ² / (σ² + s_k² |u_k|²_seen), at most a few percent
    // for these deviations (2, 1, 0.5) over half the texels.
    let error = abs_diff(&encoded, &latent);
    assert!(error < 0.05, "encoded {encoded} for {latent}");
    let regenerated = model.generate(&encoded).unwrap();
    assert!(abs_diff(&regenerated, &texture) < 0.05);

    let wrong = Tensor::ones((1, 1, R, R + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        model.encode(&texture, &wrong),
        Err(TextureError::Data(_))
    ));
}

#[test]
fn texels_no_map_observes_are_modelled_from_the_maps_values() {
    let mut rng = Lcg(5);
    let basis = true_basis(&mut rng);
    let (data, _) = low_rank_data(40, &mut rng, &basis);
    let (images, masks) = data.tensors();
    // The first row of texels is hidden in every map and holds 0.25 there.
    let row_hidden: Vec<f32> = (0..R * R).map(|i| if i < R { 0.0 } else { 1.0 }).collect();
    let row_hidden = Tensor::from_vec(row_hidden, (1, 1, R, R), &Device::Cpu).unwrap();
    let masks = masks.broadcast_mul(&row_hidden).unwrap();
    let first_row = row_hidden.affine(-1.0, 1.0).unwrap();
    let images = (images.broadcast_mul(&row_hidden).unwrap()
        + first_row
            .affine(0.25, 0.0)
            .unwrap()
            .broadcast_as(images.shape())
            .unwrap())
    .unwrap();
    let data = TextureDataset::new(images, Some(masks)).unwrap();
    let model = fit(&data, 2, 50);
    let mean_first_row: Vec<f32> = model
        .mean()
        .narrow(1, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(
        mean_first_row.iter().all(|v| (v - 0.25).abs() < 1e-4),
        "{mean_first_row:?}"
    );
}
