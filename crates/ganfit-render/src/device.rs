//! The CUDA device as ganfit's ops use it.

use candle_core::Device;

/// CUDA device `ordinal` with cudarc's event tracking off: otherwise every GPU allocation
/// creates two CUDA events and every free destroys them, four driver calls per tensor, which
/// only serve programs that run work on several streams. Candle runs all of a device's work on
/// one stream per host thread and never enters cudarc's multi-stream mode, so the events are
/// never used. Use it for every device handed to ganfit (`ganfit fit --device cuda` does);
/// a device from [`Device::new_cuda`] works the same, more slowly.
///
/// Without the `cuda` feature this fails as [`Device::new_cuda`] does.
pub fn cuda_device(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: cudarc's tracking synchronises only streams it created itself, and none
        // exist on this context (see above): turning it off changes no ordering of work.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}
