//! Trainer: a real learning test on four synthetic colour patterns, determinism across
//! checkpoint/resume, output files and data validation.

use candle_core::{Device, Tensor};
use ganfit_texture::{
    Generator, GeneratorConfig, TextureDataset, TextureModel, TrainConfig, Trainer,
};

const SIZE: usize = 32;

/// The four prototype textures `[3, 32, 32]`: red over dark red, green beside dark green,
/// blue/white quadrants and a yellow field with a dark square (all resolvable at 4x4, so the
/// first phase of progressive growing can already tell them apart; finer levels sharpen the
/// edges).
fn prototypes() -> Vec<Vec<f32>> {
    let plane = SIZE * SIZE;
    (0..4)
        .map(|k| {
            let mut v = vec![0.0f32; 3 * plane];
            for y in 0..SIZE {
                for x in 0..SIZE {
                    let rgb = match k {
                        0 => {
                            if y < SIZE / 2 {
                                [0.9, 0.1, 0.1]
                            } else {
                                [0.2, 0.0, 0.0]
                            }
                        }
                        1 => {
                            if x < SIZE / 2 {
                                [0.1, 0.9, 0.1]
                            } else {
                                [0.0, 0.2, 0.0]
                            }
                        }
                        2 => {
                            if (2 * x / SIZE + 2 * y / SIZE).is_multiple_of(2) {
                                [0.1, 0.1, 0.9]
                            } else {
                                [0.9, 0.9, 0.9]
                            }
                        }
                        _ => {
                            if (SIZE / 4..3 * SIZE / 4).contains(&x)
                                && (SIZE / 4..3 * SIZE / 4).contains(&y)
                            {
                                [0.2, 0.2, 0.0]
                            } else {
                                [0.9, 0.8, 0.1]
                            }
                        }
                    };
                    for c in 0..3 {
                        v[c * plane + y * SIZE + x] = rgb[c];
                    }
                }
            }
            v
        })
        .collect()
}

/// `n` noisy copies of the prototypes, in turn.
fn dataset(n: usize) -> TextureDataset {
    let protos = prototypes();
    let mut data = Vec::new();
    let mut state = 12345u64;
    let mut noise = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    };
    for i in 0..n {
        data.extend(protos[i % 4].iter().map(|v| (v + noise()).clamp(0.0, 1.0)));
    }
    TextureDataset::new(
        Tensor::from_vec(data, (n, 3, SIZE, SIZE), &Device::Cpu).unwrap(),
        None,
    )
    .unwrap()
}

/// How many of `textures` ([N, 3, 32, 32] in [0, 1]) are nearest to each prototype, and the
/// mean RMS distance to the nearest one.
fn nearest_prototype_histogram(textures: &Tensor) -> ([usize; 4], f32) {
    let protos = prototypes();
    let mut hist = [0; 4];
    let mut total = 0.0;
    let n = textures.dim(0).unwrap();
    for i in 0..n {
        let t: Vec<f32> = textures
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rms = |p: &Vec<f32>| {
            (p.iter().zip(&t).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / t.len() as f32).sqrt()
        };
        let best = (0..4)
            .min_by(|&a, &b| rms(&protos[a]).total_cmp(&rms(&protos[b])))
            .unwrap();
        hist[best] += 1;
        total += rms(&protos[best]);
    }
    (hist, total / n as f32)
}

/// Grows 4x4 -> 32x32 in 80-step phases (7 phases, 560 steps) with narrow layers, a batch of
/// 8 and lazy penalties: about 40 s on two idle cores.
fn small_config() -> TrainConfig {
    TrainConfig {
        generator: GeneratorConfig {
            latent_dim: 32,
            channels: vec![32, 32, 16, 8],
        },
        batch_size: 8,
        phase_steps: 80,
        total_steps: 560,
        learning_rate: 2e-3,
        ema_decay: 0.99,
        penalty_every: 8,
        seed: 3,
        ..TrainConfig::default()
    }
}

/// Learning test within a CI budget. Untrained samples land on one or two patterns; trained
/// ones must represent every pattern (each nearest to at least 1/64 of the samples) and sit
/// markedly closer to the data. The same coverage criterion is asserted to fail before
/// training. The thresholds are loose on purpose: a GAN this small and this briefly trained is
/// blurry and its modes are unevenly populated. Training is deterministic on a given CPU path
/// (the outcome was identical on an AMD EPYC and an Intel Xeon, both using the AVX2/FMA kernels).
#[test]
fn training_covers_all_four_patterns_where_an_untrained_generator_does_not() {
    let config = small_config();
    let samples = 256;
    let untrained =
        Generator::new_random(config.generator.clone(), config.seed, &Device::Cpu).unwrap();
    let z = untrained.sample_latent(samples, None, 99).unwrap();
    let (before, before_rms) = nearest_prototype_histogram(&untrained.generate(&z).unwrap());

    let mut trainer = Trainer::new(config, &dataset(256), &Device::Cpu).unwrap();
    let start = std::time::Instant::now();
    trainer.run(|_| {}).unwrap();
    let (after, after_rms) =
        nearest_prototype_histogram(&trainer.ema_generator().unwrap().generate(&z).unwrap());
    eprintln!(
        "{} steps in {:.1} s; nearest-pattern histogram of {samples} samples (mean RMS distance): untrained {before:?} ({before_rms:.3}), trained {after:?} ({after_rms:.3})",
        trainer.step_count(),
        start.elapsed().as_secs_f64()
    );
    let covers_all = |h: [usize; 4]| h.iter().all(|&c| c >= samples / 64);
    assert!(
        !covers_all(before),
        "an untrained generator should not cover every pattern: {before:?}"
    );
    assert!(
        covers_all(after),
        "trained generator misses a pattern: {after:?}"
    );
    assert!(
        after_rms < 0.8 * before_rms,
        "samples did not move onto the data: {before_rms} -> {after_rms}"
    );
}
