//! Timing of the two hot paths: the fitter's generator forward + backward w.r.t. the latent
//! at 256x256, and one training step (G + D, batch 16) at 128x128.

// The allocator the `ganfit` binary ships with, so that timings match what a fit pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Tensor, Var};
use criterion::{Criterion, criterion_main};
use ganfit_texture::{
    Generator, GeneratorConfig, TextureDataset, TextureModel, TrainConfig, Trainer,
};

fn generator_latent_gradient(c: &mut Criterion) {
    let generator = Generator::new_random(GeneratorConfig::default(), 0, &Device::Cpu).unwrap();
    eprintln!(
        "default generator: {}x{0}, channels {:?}, {} parameters",
        generator.config().resolution(),
        generator.config().channels,
        generator.parameter_count()
    );
    let latent = Var::from_tensor(&generator.sample_latent(1, None, 1).unwrap()).unwrap();
    let target = Tensor::full(0.5f32, (1, 3, 256, 256), &Device::Cpu).unwrap();
    c.bench_function("generator_256_forward_backward_latent", |b| {
        b.iter(|| {
            let texture = generator.generate(latent.as_tensor()).unwrap();
            let loss = (texture - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            loss.backward().unwrap()
        })
    });
}

/// A trainer at the fully grown 128x128 level (with one-step phases the schedule gets there
/// after 11 steps).
fn trainer_at_128() -> Trainer {
    let mut channels = GeneratorConfig::default().channels;
    channels.truncate(6);
    let config = TrainConfig {
        generator: GeneratorConfig {
            latent_dim: 512,
            channels,
        },
        batch_size: 16,
        phase_steps: 1,
        ..TrainConfig::default()
    };
    let images = Tensor::rand(0f32, 1.0, (32, 3, 128, 128), &Device::Cpu).unwrap();
    let data = TextureDataset::new(images, None).unwrap();
    let mut trainer = Trainer::new(config, &data, &Device::Cpu).unwrap();
    while trainer.config().schedule(trainer.step_count()) != (5, 1.0) {
        trainer.step().unwrap();
    }
    trainer
}

fn training_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("training");
    group.sample_size(10);
    // Built on the first call of the routine, which criterion makes only when its filter
    // selects this bench (so timing the generator alone skips the 11 set-up steps).
    let mut trainer = None;
    group.bench_function("step_g_and_d_batch16_128", |b| {
        let trainer = trainer.get_or_insert_with(trainer_at_128);
        b.iter(|| trainer.step().unwrap())
    });
    group.finish();
}

ganfit_testkit::bench_group!(benches, generator_latent_gradient, training_step);
criterion_main!(benches);
