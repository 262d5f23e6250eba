//! Helpers shared by the workspace's tests and benches (a dev-dependency only, never
//! published): the CUDA device of the GPU parity tests, comparing tensors that live on
//! different devices, deterministic pseudo-random inputs, and the process setting the `ganfit`
//! binary runs with, so that benches time what a fit pays.

use candle_core::{DType, Device, Tensor};

/// The first CUDA device. The GPU tests run only where one exists (scripts/device-check.sh),
/// so its absence is a setup error worth stopping the test for.
///
/// # Panics
///
/// Without a CUDA device, or in a build without candle's `cuda` feature.
pub fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

/// What the `ganfit` binary does first: unless `CANDLE_NUM_THREADS` is set, candle's
/// element-wise ops (autograd's gradient sums among them) run in the calling thread instead of
/// on candle's own pool, whose idle workers spin beside the rayon pool ganfit's kernels run on.
/// Call it before any candle op (candle reads the variable once, at its first parallel op).
pub fn run_candle_elementwise_ops_in_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called at start-up, before any other thread reads the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// `work` run on a rayon pool of its own with `threads` threads: for tests that compare a
/// kernel's serial and parallel paths.
///
/// # Panics
///
/// If the pool cannot be built.
pub fn on_threads<R: Send>(threads: usize, work: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool for the test")
        .install(work)
}

/// `criterion_group!` under the process setting every ganfit bench runs with
/// ([`run_candle_elementwise_ops_in_the_calling_thread`], as the `ganfit` binary):
/// `ganfit_testkit::bench_group!(name, target, ...);`, then `criterion_main!(name)`.
#[macro_export]
macro_rules! bench_group {
    ($name:ident, $($target:path),+ $(,)?) => {
        criterion::criterion_group! {
            name = $name;
            config = {
                $crate::run_candle_elementwise_ops_in_the_calling_thread();
                criterion::Criterion::default()
            };
            targets = $($target),+
        }
    };
}

/// Every value of `t` (any device, any float dtype) as f64, in row-major order.
///
/// # Panics
///
/// If `t` cannot be read back (a non-numeric dtype).
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("a numeric tensor")
}

/// Largest entry-wise difference between two tensors of one shape, relative to the largest
/// magnitude in `expected`.
///
/// # Panics
///
/// If the shapes differ, or `expected` is all zeros (a comparison that would check nothing).
pub fn relative_error(expected: &Tensor, got: &Tensor) -> f64 {
    assert_eq!(expected.dims(), got.dims(), "shapes differ");
    let (e, g) = (values(expected), values(got));
    let scale = e.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "an all-zero tensor checks nothing");
    e.iter()
        .zip(&g)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// Largest entry-wise absolute difference between two tensors of one shape (any device, any
/// float dtype).
///
/// # Panics
///
/// If the shapes differ.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    values(a)
        .iter()
        .zip(values(b))
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

/// `n` deterministic values in [-1, 1) for `seed` (a 64-bit LCG: tests need reproducible
/// inputs, not statistics).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_scaled_by_the_expected_magnitude() {
        let a = Tensor::new(&[2.0f32, -4.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[2.0f64, -3.0], &Device::Cpu).unwrap();
        assert_eq!(relative_error(&a, &b), 0.25);
    }

    #[test]
    fn pseudo_random_values_are_reproducible_and_in_range() {
        let v = pseudo_random(1000, 3);
        assert_eq!(v, pseudo_random(1000, 3));
        assert_ne!(v, pseudo_random(1000, 4));
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.1, "{mean}");
    }
}
