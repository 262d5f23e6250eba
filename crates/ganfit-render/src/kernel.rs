//! Helpers shared by the CPU kernels: the float trait they are generic over and storage access.

use candle_core::{CpuStorage, DType, Layout, Tensor, WithDType};
use num_traits::Float;

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

/// Splits `0..n` into about four pieces per thread, so that per-piece scratch buffers stay few.
pub(crate) fn piece_len(n: usize) -> usize {
    n.div_ceil(4 * rayon::current_num_threads()).max(1)
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
