//! Helpers shared by the CPU kernels: the float trait they are generic over and storage access.

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use crate::error::{RenderError, Result};

/// The element types the kernels run in (f32 for speed, f64 for gradient checks).
pub(crate) trait Real: WithDType + Float + Send + Sync + 'static {
    fn of(x: f64) -> Self {
        <Self as WithDType>::from_f64(x)
    }
}
impl Real for f32 {}
impl Real for f64 {}

/// The contiguous data behind `storage`; public entry points make inputs contiguous first.
pub(crate) fn data<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!("ganfit-render kernels need contiguous inputs"),
    }
}

/// Runs `$body` with `$T` bound to the float type of `$storage`.
macro_rules! dispatch_float {
    ($storage:expr, $T:ident => $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $T = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $T = f64;
                $body
            }
            _ => candle_core::bail!("ganfit-render kernels take f32 or f64 tensors"),
        }
    };
}
pub(crate) use dispatch_float;

/// Centre of pixel `i` of `n` in normalised device coordinates ([-1, 1] spans the image edges).
pub(crate) fn pixel_centre<T: Real>(i: usize, n: usize) -> T {
    T::of((2 * i + 1) as f64 / n as f64 - 1.0)
}

/// A constant tensor of `values` in `like`'s float type, on its device, converted on the host:
/// converting on a GPU would be a kernel launch of its own, per call.
pub(crate) fn constant(values: &[f64], shape: impl Into<Shape>, like: &Tensor) -> Result<Tensor> {
    let device = like.device();
    Ok(match like.dtype() {
        DType::F32 => {
            let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            Tensor::from_vec(values, shape, device)?
        }
        _ => Tensor::from_slice(values, shape, device)?.to_dtype(like.dtype())?,
    })
}

/// `grad` as a custom op's gradient for `input`, or none where `input` is a constant (neither
/// a variable nor computed from one): candle sums every gradient an op returns into a fresh
/// zero tensor, even one nothing reads (a mesh's fixed UV coordinates, a detached texture, a
/// camera's projection), which on a GPU is two allocations, a memset and an add per input.
pub(crate) fn tracked(input: &Tensor, grad: Tensor) -> Option<Tensor> {
    input.track_op().then_some(grad)
}

/// Checks that `t` is a float tensor of rank `rank` whose trailing dim is `last` (if given).
pub(crate) fn check_float(
    t: &Tensor,
    what: &'static str,
    expected: &str,
    rank: usize,
    last: Option<usize>,
) -> Result<()> {
    let dims = t.dims();
    if dims.len() != rank || last.is_some_and(|c| dims[rank - 1] != c) {
        return Err(RenderError::Shape {
            what,
            expected: expected.to_string(),
            got: dims.to_vec(),
        });
    }
    check_dtype(t, what)
}

/// Checks that `t` is f32 or f64.
pub(crate) fn check_dtype(t: &Tensor, what: &'static str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        got => Err(RenderError::DType { what, got }),
    }
}

/// Checks that the rasteriser output has the expected layout.
pub(crate) fn check_rast(rast: &Tensor) -> Result<(usize, usize, usize)> {
    check_float(rast, "rast", "[B, H, W, 4]", 4, Some(4))?;
    let (b, h, w, _) = rast.dims4()?;
    Ok((b, h, w))
}

/// Pixels per parallel task in per-pixel kernels: per-pixel rayon items would cost more than
/// the arithmetic they carry.
pub(crate) const PIXEL_CHUNK: usize = 4096;

/// The `with_min_len` that splits `0..n` into one piece per thread: per-piece scratch buffers
/// can be as large as a texture, so there are as few of them as the parallelism allows. Rayon
/// splits a range only when both halves keep the minimum, so the minimum rounds down (with
/// `n / threads` rounded up, 13 items on 2 threads would not split at all).
pub(crate) fn piece_len(n: usize) -> usize {
    (n / rayon::current_num_threads()).max(1)
}

/// The `with_min_len` for a kernel's outermost parallel loop: everything in one task on a
/// one-thread pool, so that rayon runs the loop in the calling thread. Otherwise it splits the
/// loop once and hands half to its lone worker, and the caller sleeps until that is done.
pub(crate) fn min_tasks() -> usize {
    if rayon::current_num_threads() == 1 {
        usize::MAX
    } else {
        1
    }
}

/// Buffers from this many elements up are copied by the pool (see [`copy`]); below, handing
/// the work to another thread costs more than it saves.
const PARALLEL_COPY_MIN: usize = 1 << 16;

/// A copy of `src`, written by the pool's threads when large: an image-sized copy in the
/// calling thread is serial work beside the parallel kernels.
pub(crate) fn copy<T: Real>(src: &[T]) -> Vec<T> {
    if src.len() < PARALLEL_COPY_MIN || rayon::current_num_threads() == 1 {
        return src.to_vec();
    }
    let mut out = Vec::with_capacity(src.len());
    out.par_extend(src.par_iter().copied().with_min_len(PIXEL_CHUNK));
    out
}

/// Element-wise sum of per-piece gradient buffers.
pub(crate) fn add_into<T: Real>(mut acc: Vec<T>, other: Vec<T>) -> Vec<T> {
    acc.iter_mut().zip(other).for_each(|(a, b)| *a += b);
    acc
}

/// The triangle stored in a rast pixel's id channel, if any.
pub(crate) fn triangle_at<T: Real>(id: T) -> Option<usize> {
    let id = id.to_f64();
    (id >= 1.0).then(|| id as usize - 1)
}

pub(crate) fn cross<T: Real>(a: [T; 3], b: [T; 3]) -> [T; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub(crate) fn dot<T: Real>(a: [T; 3], b: [T; 3]) -> T {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Whether the fused shading kernels can take `t`: f32 or f64 on the CPU, or on a CUDA device
/// with the `cuda` feature (else callers fall back to candle tensor ops).
pub(crate) fn has_fused_kernels(t: &Tensor) -> bool {
    let device_has_them = t.device().is_cpu() || (cfg!(feature = "cuda") && t.device().is_cuda());
    device_has_them && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Runs `f` on the contiguous CPU data of `t`, for backward passes that produce several
/// gradients from one sweep over their inputs.
pub(crate) fn with_data<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(data(cpu, layout)?),
        _ => candle_core::bail!("ganfit-render's fused kernels run on the CPU only"),
    }
}

/// A CPU tensor of `shape` holding `values`.
pub(crate) fn cpu_tensor<T: WithDType>(
    values: Vec<T>,
    shape: impl Into<Shape>,
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Helpers for the crate's unit tests of fused kernels.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor, Var};

    /// Deterministic uniform values in `[lo, hi)` (SplitMix64), as an f64 tensor.
    pub(crate) fn random(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
        let mut state = seed;
        let n: usize = shape.iter().product();
        let values: Vec<f64> = (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                lo + (hi - lo) * ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// `[2, 3n, 4]` clip positions of two images of `n` separate random triangles each (some
    /// overlapping, some partly off screen, every `w` in `[1, 2)`) and their triangle list.
    pub(crate) fn triangle_soup(n: usize, seed: u64) -> (Tensor, crate::Triangles) {
        let xyz = random(&[2, 3 * n, 3], -1.1, 1.1, seed);
        let w = random(&[2, 3 * n, 1], 1.0, 2.0, seed + 1);
        let clip = Tensor::cat(&[xyz.broadcast_mul(&w).unwrap(), w], 2).unwrap();
        let tris = (0..3 * n as u32)
            .step_by(3)
            .map(|t| [t, t + 1, t + 2])
            .collect();
        (clip, crate::Triangles::new(tris, 3 * n).unwrap())
    }

    /// `Σ a ⊙ b`.
    pub(crate) fn dot(a: &Tensor, b: &Tensor) -> f64 {
        (a * b).unwrap().sum_all().unwrap().to_scalar().unwrap()
    }

    /// The gradient of the scalar `f` at `x` by autograd.
    pub(crate) fn gradient(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        let var = Var::from_tensor(x).unwrap();
        let grads = f(var.as_tensor()).backward().unwrap();
        grads
            .get(var.as_tensor())
            .cloned()
            .unwrap_or_else(|| x.zeros_like().unwrap())
    }

    /// Largest difference between autograd and central differences (step 1e-6) of the
    /// scalar `f` at `x` (f64), relative to max(1, |gradient|).
    pub(crate) fn finite_difference_error(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> f64 {
        let analytic: Vec<f64> = gradient(x, &f).flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let at = |i: usize, step: f64| {
            let mut v = base.clone();
            v[i] += step;
            let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
            f(&t).to_scalar::<f64>().unwrap()
        };
        let eps = 1e-6;
        (0..base.len())
            .map(|i| {
                let numeric = (at(i, eps) - at(i, -eps)) / (2.0 * eps);
                (numeric - analytic[i]).abs() / analytic[i].abs().max(1.0)
            })
            .fold(0.0, f64::max)
    }
}
