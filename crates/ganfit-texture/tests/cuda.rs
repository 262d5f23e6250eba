//! The texture GAN on a CUDA device against the CPU, where candle's convolutions replace the
//! fused CPU kernels: the default generator and its latent gradient in f64 to 1e-9 of their
//! scale (only the summation order differs), and training, whose f32 steps must follow the
//! CPU's to 1e-3 (Adam divides by the gradients' running magnitude, so float rounding grows a
//! little with every step), checkpoints written and resumed on the GPU. Built only with the
//! `cuda` feature and run on a machine with a GPU by scripts/device-check.sh.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use ganfit_testkit::{gpu, pseudo_random, relative_error};
use ganfit_texture::{
    Generator, GeneratorConfig, TextureDataset, TextureModel, TrainConfig, Trainer,
};

/// The generator's output at `level` and the gradient of `<output, cotangent>` w.r.t. `latent`.
fn output_and_latent_vjp(
    generator: &Generator,
    latent: &Tensor,
    level: usize,
    alpha: f64,
) -> (Tensor, Tensor) {
    let latent = Var::from_tensor(latent).unwrap();
    let out = generator.forward(latent.as_tensor(), level, alpha).unwrap();
    let cotangent = Tensor::from_vec(
        pseudo_random(out.elem_count(), 11),
        out.shape(),
        out.device(),
    )
    .unwrap();
    let grads = (&out * cotangent)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = grads.get(latent.as_tensor()).unwrap().clone();
    (out, grad)
}

#[test]
fn cuda_generator_and_latent_gradient_match_cpu() {
    let cpu_generator = Generator::new_random(GeneratorConfig::default(), 7, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let on_gpu = cpu_generator
        .params()
        .iter()
        .map(|(k, t)| (k.clone(), t.to_device(&gpu()).unwrap()))
        .collect();
    let gpu_generator = Generator::from_params(cpu_generator.config().clone(), &on_gpu).unwrap();
    let dim = cpu_generator.config().latent_dim;
    let latent = Tensor::from_vec(pseudo_random(2 * dim, 3), (2, dim), &Device::Cpu).unwrap();
    let final_level = cpu_generator.config().max_level();
    // The fully grown generator (one fused pass on the CPU) and a fade-in (layer by layer).
    for (level, alpha) in [(final_level, 1.0), (2, 0.4)] {
        let (cpu_out, cpu_grad) = output_and_latent_vjp(&cpu_generator, &latent, level, alpha);
        let (gpu_out, gpu_grad) = output_and_latent_vjp(
            &gpu_generator,
            &latent.to_device(&gpu()).unwrap(),
            level,
            alpha,
        );
        let (out_error, grad_error) = (
            relative_error(&cpu_out, &gpu_out),
            relative_error(&cpu_grad, &gpu_grad),
        );
        eprintln!(
            "level {level}, alpha {alpha}: output {out_error:.1e}, latent gradient {grad_error:.1e}"
        );
        assert!(out_error < 1e-9, "level {level}: output {out_error}");
        assert!(
            grad_error < 1e-9,
            "level {level}: latent gradient {grad_error}"
        );
    }
}

/// 16 noisy 16x16 textures (two colour fields in two layouts) with a mask that hides a corner
/// of every other one.
fn small_dataset() -> TextureDataset {
    let size = 16;
    let noise = pseudo_random(16 * 3 * size * size, 5);
    let mut images = Vec::with_capacity(noise.len());
    let mut masks = Vec::with_capacity(16 * size * size);
    for i in 0..16 {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let split = if i % 2 == 0 {
                        x < size / 2
                    } else {
                        y < size / 2
                    };
                    let base = if split {
                        0.2 + 0.2 * c as f64
                    } else {
                        0.8 - 0.3 * c as f64
                    };
                    let n = noise[((i * 3 + c) * size + y) * size + x];
                    images.push((base + 0.05 * n) as f32);
                }
            }
        }
        for y in 0..size {
            for x in 0..size {
                let hidden = i % 2 == 1 && x >= 12 && y >= 12;
                masks.push(if hidden { 0.0f32 } else { 1.0 });
            }
        }
    }
    TextureDataset::new(
        Tensor::from_vec(images, (16, 3, size, size), &Device::Cpu).unwrap(),
        Some(Tensor::from_vec(masks, (16, 1, size, size), &Device::Cpu).unwrap()),
    )
    .unwrap()
}

/// Grows 4x4 -> 16x16 in two-step phases, with the gradient penalty every other step.
fn small_config() -> TrainConfig {
    TrainConfig {
        generator: GeneratorConfig {
            latent_dim: 16,
            channels: vec![16, 16, 8],
        },
        batch_size: 8,
        phase_steps: 2,
        total_steps: 8,
        penalty_every: 2,
        seed: 5,
        sample_every: 4,
        sample_count: 4,
        ..TrainConfig::default()
    }
}

#[test]
fn cuda_training_follows_the_cpu_and_resumes_from_its_checkpoint() {
    let data = small_dataset();
    let mut cpu = Trainer::new(small_config(), &data, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut on_gpu = Trainer::new(small_config(), &data, &gpu())
        .unwrap()
        .with_output_dir(out.path())
        .unwrap();
    let mut gpu_stats = Vec::new();
    on_gpu
        .run(|progress| gpu_stats.push(progress.stats))
        .unwrap();
    assert_eq!(gpu_stats.len(), small_config().total_steps);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * (1.0 + a.abs());
    for g in &gpu_stats {
        let c = cpu.step().unwrap();
        eprintln!(
            "step {} (level {}, alpha {:.2}): D {:.6} / {:.6}, G {:.6} / {:.6} (CPU / CUDA)",
            c.step, c.level, c.alpha, c.d_loss, g.d_loss, c.g_loss, g.g_loss
        );
        assert_eq!((c.step, c.level), (g.step, g.level));
        assert!(
            close(c.d_loss, g.d_loss) && close(c.g_loss, g.g_loss),
            "step {}",
            c.step
        );
        assert_eq!(c.penalty.is_some(), g.penalty.is_some());
        if let (Some(a), Some(b)) = (c.penalty, g.penalty) {
            assert!(close(a, b), "step {}: penalty {a} vs {b}", c.step);
        }
    }
    // The exported EMA generators agree too.
    let latent = Tensor::from_vec(pseudo_random(4 * 16, 9), (4, 16), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let from_cpu = cpu.ema_generator().unwrap().generate(&latent).unwrap();
    let exported = Generator::load(out.path().join("generator.safetensors"), &Device::Cpu).unwrap();
    let from_gpu = exported.generate(&latent).unwrap();
    let ema_error = relative_error(&from_cpu, &from_gpu);
    eprintln!(
        "EMA generator after {} steps: {ema_error:.1e}",
        gpu_stats.len()
    );
    assert!(ema_error < 1e-3, "EMA generators differ by {ema_error}");
    assert!(out.path().join("samples/step_0000004.png").is_file());

    // Resuming on the GPU continues exactly where the run stopped.
    let checkpoint = out.path().join("checkpoint.safetensors");
    let mut resumed = Trainer::resume(&checkpoint, &data, &gpu()).unwrap();
    assert_eq!(resumed.step_count(), on_gpu.step_count());
    let (a, b) = (on_gpu.step().unwrap(), resumed.step().unwrap());
    assert_eq!(a.step, b.step);
    assert!(
        close(a.d_loss, b.d_loss) && close(a.g_loss, b.g_loss),
        "{a:?} vs {b:?}"
    );
    let sample = |t: &Trainer| {
        t.generator()
            .generate(&latent.to_device(&gpu()).unwrap())
            .unwrap()
    };
    let resume_error = relative_error(&sample(&on_gpu), &sample(&resumed));
    assert!(
        resume_error < 1e-5,
        "resumed weights differ by {resume_error}"
    );
}
