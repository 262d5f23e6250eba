//! Trainer bookkeeping: exact resume from checkpoints, output files, progress reporting,
//! configuration files and data validation.

use candle_core::{DType, Device, Tensor};
use ganfit_texture::{
    Generator, GeneratorConfig, ParamMap, TextureDataset, TextureError, TrainConfig, Trainer,
};

fn tiny_config() -> TrainConfig {
    TrainConfig {
        generator: GeneratorConfig {
            latent_dim: 4,
            channels: vec![4, 3],
        },
        batch_size: 4,
        mbstd_group_size: 2,
        phase_steps: 2,
        total_steps: 6,
        sample_every: 2,
        sample_count: 3,
        checkpoint_every: 0,
        penalty_every: 2,
        ema_decay: 0.5,
        seed: 5,
        ..TrainConfig::default()
    }
}

/// Six 8x8 textures, each with a quarter of its texels masked out.
fn masked_data() -> TextureDataset {
    let images = Tensor::rand(0f32, 1.0, (6, 3, 8, 8), &Device::Cpu).unwrap();
    let mask: Vec<f32> = (0..6 * 64)
        .map(|i| if (i / 8) % 4 == 0 { 0.0 } else { 1.0 })
        .collect();
    let masks = Tensor::from_vec(mask, (6, 1, 8, 8), &Device::Cpu).unwrap();
    TextureDataset::new(images, Some(masks)).unwrap()
}

fn bits(params: &ParamMap) -> Vec<(String, Vec<u32>)> {
    params
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn resumed_run_equals_uninterrupted_run_and_writes_its_files() {
    let data = masked_data();
    let mut straight = Trainer::new(tiny_config(), &data, &Device::Cpu).unwrap();
    straight.run(|_| {}).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("interrupted.safetensors");
    let mut first = Trainer::new(tiny_config(), &data, &Device::Cpu).unwrap();
    for _ in 0..3 {
        first.step().unwrap();
    }
    first.save_checkpoint(&checkpoint).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&checkpoint, &data, &Device::Cpu)
        .unwrap()
        .with_output_dir(dir.path())
        .unwrap();
    assert_eq!(resumed.step_count(), 3);
    let mut seen = Vec::new();
    resumed
        .run(|p| seen.push((p.stats.step, p.total_steps)))
        .unwrap();
    assert_eq!(seen, vec![(3, 6), (4, 6), (5, 6)]);

    assert_eq!(
        bits(straight.generator().params()),
        bits(resumed.generator().params())
    );
    assert_eq!(
        bits(straight.discriminator().params()),
        bits(resumed.discriminator().params())
    );
    assert_eq!(
        bits(straight.ema_generator().unwrap().params()),
        bits(resumed.ema_generator().unwrap().params())
    );

    let log = std::fs::read_to_string(dir.path().join("log.csv")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], "step,level,alpha,d_loss,g_loss,penalty,seconds");
    assert_eq!(lines.len(), 4, "{log}");
    assert!(lines[1].starts_with("3,1,0.5000,"), "{}", lines[1]);
    for step in [4, 6] {
        let png = image::open(dir.path().join(format!("samples/step_{step:07}.png"))).unwrap();
        assert_eq!(
            (png.width(), png.height()),
            (16, 16),
            "2x2 grid of 8x8 samples"
        );
    }
    let exported = Generator::load(dir.path().join("generator.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        bits(exported.params()),
        bits(resumed.ema_generator().unwrap().params())
    );
    assert!(dir.path().join("checkpoint.safetensors").exists());
}

#[test]
fn schedule_grows_with_linear_fade_in() {
    let config = TrainConfig {
        phase_steps: 4,
        generator: GeneratorConfig {
            latent_dim: 4,
            channels: vec![4, 4, 4],
        },
        ..tiny_config()
    };
    let got: Vec<(usize, f64)> = [0, 3, 4, 6, 8, 12, 14, 16, 100]
        .iter()
        .map(|&s| config.schedule(s))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 1.0),
            (0, 1.0),
            (1, 0.0),
            (1, 0.5),
            (1, 1.0),
            (2, 0.0),
            (2, 0.5),
            (2, 1.0),
            (2, 1.0)
        ]
    );
}

#[test]
fn config_round_trips_through_json_and_rejects_unknown_fields() {
    let config = tiny_config();
    let text = serde_json::to_string(&config).unwrap();
    assert_eq!(serde_json::from_str::<TrainConfig>(&text).unwrap(), config);
    let partial: TrainConfig = serde_json::from_str(
        r#"{"batch_size": 32, "loss": {"kind": "non_saturating_r1", "r1_gamma": 5.0}}"#,
    )
    .unwrap();
    assert_eq!(partial.batch_size, 32);
    assert_eq!(partial.phase_steps, TrainConfig::default().phase_steps);
    assert!(serde_json::from_str::<TrainConfig>(r#"{"batchsize": 32}"#).is_err());
}

#[test]
fn bad_configs_and_data_give_typed_errors() {
    let data = masked_data();
    let odd_batch = TrainConfig {
        batch_size: 5,
        ..tiny_config()
    };
    assert!(matches!(
        Trainer::new(odd_batch, &data, &Device::Cpu),
        Err(TextureError::InvalidConfig(_))
    ));
    let bigger = TrainConfig {
        generator: GeneratorConfig {
            latent_dim: 4,
            channels: vec![4, 4, 4],
        },
        ..tiny_config()
    };
    let err = Trainer::new(bigger, &data, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, TextureError::Data(_)) && err.to_string().contains("8x8"),
        "{err}"
    );
    let bad_ema = TrainConfig {
        ema_decay: 1.0,
        ..tiny_config()
    };
    assert!(matches!(
        Trainer::new(bad_ema, &data, &Device::Cpu),
        Err(TextureError::InvalidConfig(_))
    ));

    let not_square = Tensor::zeros((2, 3, 8, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        TextureDataset::new(not_square, None),
        Err(TextureError::Data(_))
    ));
    let images = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let wrong_masks = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        TextureDataset::new(images, Some(wrong_masks)),
        Err(TextureError::Data(_))
    ));

    let dir = tempfile::tempdir().unwrap();
    let generator_file = dir.path().join("g.safetensors");
    Generator::new_random(tiny_config().generator, 0, &Device::Cpu)
        .unwrap()
        .save(&generator_file)
        .unwrap();
    let err = Trainer::resume(&generator_file, &data, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("ganfit.train_config"), "{err}");
}

/// Textures larger than the generator's output are averaged down where their masks say they
/// are valid: training on them is training on that average.
#[test]
fn larger_textures_train_as_their_masked_average() {
    let (n, size) = (6, 8);
    let images: Vec<f32> = (0..n * 3 * size * size)
        .map(|i| (i * 37 % 101) as f32 / 100.0)
        .collect();
    // A quarter of the texels masked out, in rows that leave some 2x2 blocks half valid.
    let masks: Vec<f32> = (0..n * size * size)
        .map(|i| if (i / 8) % 4 == 0 { 0.0 } else { 1.0 })
        .collect();
    let data = TextureDataset::new(
        Tensor::from_vec(images.clone(), (n, 3, size, size), &Device::Cpu).unwrap(),
        Some(Tensor::from_vec(masks.clone(), (n, 1, size, size), &Device::Cpu).unwrap()),
    )
    .unwrap();
    let half = size / 2;
    let (mut small_images, mut small_masks) = (Vec::new(), Vec::new());
    for i in 0..n {
        let block = |y: usize, x: usize| {
            [(0, 0), (0, 1), (1, 0), (1, 1)]
                .map(|(dy, dx)| (i * size + 2 * y + dy) * size + 2 * x + dx)
        };
        for c in 0..3 {
            for y in 0..half {
                for x in 0..half {
                    let (mut colour, mut weight) = (0.0, 0.0);
                    for m in block(y, x) {
                        let pixel = ((i * 3 + c) * size * size) + (m - i * size * size);
                        colour += images[pixel] * masks[m];
                        weight += masks[m];
                    }
                    small_images.push(colour / f32::max(weight, 1e-6));
                }
            }
        }
        for y in 0..half {
            for x in 0..half {
                let weight: f32 = block(y, x).iter().map(|&m| masks[m]).sum::<f32>() / 4.0;
                small_masks.push(if weight >= 0.5 { 1.0 } else { 0.0 });
            }
        }
    }
    let small = TextureDataset::new(
        Tensor::from_vec(small_images, (n, 3, half, half), &Device::Cpu).unwrap(),
        Some(Tensor::from_vec(small_masks, (n, 1, half, half), &Device::Cpu).unwrap()),
    )
    .unwrap();
    let config = TrainConfig {
        generator: GeneratorConfig {
            latent_dim: 4,
            channels: vec![4],
        },
        ..tiny_config()
    };
    let mut from_large = Trainer::new(config.clone(), &data, &Device::Cpu).unwrap();
    let mut from_small = Trainer::new(config, &small, &Device::Cpu).unwrap();
    for _ in 0..3 {
        let (a, b) = (from_large.step().unwrap(), from_small.step().unwrap());
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-5 * (1.0 + x.abs());
        assert!(
            close(a.d_loss, b.d_loss) && close(a.g_loss, b.g_loss),
            "{a:?} vs {b:?}"
        );
    }
}

#[test]
fn folders_of_images_load_with_alpha_as_mask() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        TextureDataset::from_dir(dir.path(), &Device::Cpu),
        Err(TextureError::File { .. })
    ));
    let mut img = image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 0, 0, 255]));
    img.put_pixel(1, 2, image::Rgba([0, 0, 0, 0]));
    img.save(dir.path().join("a.png")).unwrap();
    image::RgbaImage::from_pixel(8, 8, image::Rgba([0, 255, 0, 255]))
        .save(dir.path().join("b.png"))
        .unwrap();
    let data = TextureDataset::from_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!((data.len(), data.resolution()), (2, 8));
    let (images, masks) = data.tensors();
    assert_eq!(
        images
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        1.0
    );
    assert_eq!(masks.sum_all().unwrap().to_scalar::<f32>().unwrap(), 127.0);
    assert_eq!(
        masks
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(2)
            .unwrap()
            .get(1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );

    image::RgbaImage::new(4, 4)
        .save(dir.path().join("c.png"))
        .unwrap();
    let err = TextureDataset::from_dir(dir.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("resize"), "{err}");
}
