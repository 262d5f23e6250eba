//! The ops' CUDA paths (feature `cuda`): launches of the kernels in kernels/render.cu, which
//! build.rs compiles to PTX and the driver JIT-compiles for the GPU at first use.
//!
//! The kernels mirror the CPU kernels operation for operation, so forward outputs agree bit for
//! bit (tests/cuda_kernels_on_host.rs checks that on the host; scripts/device-check.sh on a
//! GPU); gradients are summed with atomics, so they agree up to summation order.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};

use crate::shading_kernels::ShBands;
use crate::texture::WrapMode;
use crate::triangles::Triangles;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/render.ptx"));
const MODULE: &str = "ganfit_render";

/// Threads per block: the largest kernels use about 72 registers per thread, so 1024-thread
/// blocks would not fit an SM's 64K registers.
const BLOCK: u32 = 256;

/// Per triangle and image, the setup kernel's floats and ints (see kernels/render.cu).
const SETUP_FLOATS: usize = 15;
const SETUP_INTS: usize = 5;

/// The float types the kernels are instantiated for.
trait GpuFloat: CudaDType + DeviceRepr + ValidAsZeroBits + Copy {
    const SUFFIX: &'static str;
}
impl GpuFloat for f32 {
    const SUFFIX: &'static str = "f32";
}
impl GpuFloat for f64 {
    const SUFFIX: &'static str = "f64";
}

/// Runs `$body` with `$T` bound to the float type of `$dtype`.
macro_rules! dispatch_gpu_float {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            dt => candle_core::bail!("ganfit-render kernels take f32 or f64 tensors, got {dt:?}"),
        }
    };
}

/// Launches kernel `$name` over `$items` threads with the given arguments (references).
macro_rules! launch {
    ($dev:expr, $name:expr, $items:expr, [$($arg:expr),* $(,)?]) => {{
        let items: usize = $items;
        if items > 0 {
            let func = $dev.get_or_load_custom_func(&$name, MODULE, PTX)?;
            let mut builder = func.builder();
            $(builder.arg($arg);)*
            let config = LaunchConfig {
                grid_dim: ((items as u64).div_ceil(BLOCK as u64) as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // Safety: the argument lists match the kernels' signatures in kernels/render.cu,
            // and every buffer holds what the kernel indexes for `items` threads.
            unsafe { builder.launch(config) }.w()?;
        }
    }};
}

fn kernel<T: GpuFloat>(name: &str) -> String {
    format!("{name}_{}", T::SUFFIX)
}

/// The contiguous data of an op input, from its layout's offset on.
fn input<'a, T: GpuFloat>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    if !layout.is_contiguous() {
        candle_core::bail!("ganfit-render kernels need contiguous inputs");
    }
    Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
}

/// Uninitialised device memory for `len` values (at least one, as the driver refuses empty
/// allocations); every kernel writing to it covers all of its first `len` entries.
fn uninit<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // Safety: callers launch kernels that write every entry before anything reads it.
    unsafe { dev.alloc::<T>(len.max(1)) }
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(len.max(1))
}

/// The `cpu_fwd` of ops that exist only on the GPU: on the CPU, the op that uses them does
/// their work itself (a backward pass, or the silhouette analysis).
fn gpu_only<R>(op: &str) -> Result<R> {
    candle_core::bail!("{op} runs on CUDA devices only")
}

fn i32_of(n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{n} is too large for the GPU kernels")))
}

/// A triangle list's corner indices and edge neighbours in GPU memory, each uploaded on first
/// use and kept with the list.
#[derive(Default)]
pub(crate) struct GpuTriangles {
    indices: GpuCopy,
    neighbours: GpuCopy,
}

type GpuCopy = Mutex<Option<(DeviceId, Arc<CudaSlice<u32>>)>>;

impl std::fmt::Debug for GpuTriangles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GpuTriangles")
    }
}

/// The copy of `rows` held in `copy` for `dev`, uploading it if there is none for that device.
fn upload(copy: &GpuCopy, dev: &CudaDevice, rows: &[[u32; 3]]) -> Result<Arc<CudaSlice<u32>>> {
    let mut copy = copy.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((id, slice)) = copy.as_ref()
        && *id == dev.id()
    {
        return Ok(slice.clone());
    }
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    let slice = Arc::new(if flat.is_empty() {
        zeros::<u32>(dev, 0)?
    } else {
        dev.clone_htod(&flat)?
    });
    *copy = Some((dev.id(), slice.clone()));
    Ok(slice)
}

impl Triangles {
    fn on_gpu(&self, dev: &CudaDevice) -> Result<Arc<CudaSlice<u32>>> {
        upload(&self.gpu_copy().indices, dev, self.as_slice())
    }

    fn neighbours_on_gpu(&self, dev: &CudaDevice) -> Result<Arc<CudaSlice<u32>>> {
        upload(&self.gpu_copy().neighbours, dev, self.neighbours())
    }
}

/// [`crate::rasterize`]: per (image, triangle) setup; nearest depth per pixel; lowest triangle
/// id at that depth; per pixel, barycentrics and depth from the winning setup.
pub(crate) fn rasterize(
    triangles: &Triangles,
    (height, width): (usize, usize),
    cull_backfaces: bool,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (batch, nv, _) = layout.shape().dims3()?;
    let dev = storage.device().clone();
    let tris = triangles.on_gpu(&dev)?;
    let nt = triangles.len();
    let pixels = batch * height * width;
    let (b, nv32, nt32, h, w) = (
        i32_of(batch)?,
        i32_of(nv)?,
        i32_of(nt)?,
        i32_of(height)?,
        i32_of(width)?,
    );
    let (cull, pixels64) = (i32::from(cull_backfaces), pixels as i64);
    let (mut depth, mut ids) = (uninit::<u64>(&dev, pixels)?, uninit::<u32>(&dev, pixels)?);
    launch!(
        dev,
        "raster_clear_keys",
        pixels,
        [&pixels64, &mut depth, &mut ids]
    );
    dispatch_gpu_float!(storage.dtype(), T => {
        let clip = input::<T>(storage, layout)?;
        let mut setups = uninit::<T>(&dev, batch * nt * SETUP_FLOATS)?;
        let mut boxes = uninit::<i32>(&dev, batch * nt * SETUP_INTS)?;
        launch!(dev, kernel::<T>("raster_setup"), batch * nt,
            [&clip, tris.as_ref(), &b, &nv32, &nt32, &h, &w, &cull, &mut setups, &mut boxes]);
        for mode in [0i32, 1] {
            launch!(dev, kernel::<T>("raster_draw"), batch * nt,
                [&setups, &boxes, &b, &nt32, &h, &w, &mode, &mut depth, &mut ids]);
        }
        let mut rast = uninit::<T>(&dev, pixels * 4)?;
        launch!(dev, kernel::<T>("raster_resolve"), pixels,
            [&setups, &ids, &b, &nt32, &h, &w, &mut rast]);
        Ok((CudaStorage::wrap_cuda_slice(rast, dev), Shape::from((batch, height, width, 4))))
    })
}

/// The vector-Jacobian product of [`rasterize`]: d clip_pos from (clip_pos, rast, d rast).
pub(crate) fn rasterize_grad(
    triangles: &Triangles,
    [(clip_s, clip_l), (rast_s, rast_l), (grad_s, grad_l)]: [(&CudaStorage, &Layout); 3],
) -> Result<(CudaStorage, Shape)> {
    let (batch, nv, _) = clip_l.shape().dims3()?;
    let (_, height, width, _) = rast_l.shape().dims4()?;
    let dev = clip_s.device().clone();
    let tris = triangles.on_gpu(&dev)?;
    let (b, nv32, h, w) = (i32_of(batch)?, i32_of(nv)?, i32_of(height)?, i32_of(width)?);
    dispatch_gpu_float!(clip_s.dtype(), T => {
        let (clip, rast, grad) = (input::<T>(clip_s, clip_l)?, input::<T>(rast_s, rast_l)?, input::<T>(grad_s, grad_l)?);
        let mut out = zeros::<T>(&dev, batch * nv * 4)?;
        launch!(dev, kernel::<T>("raster_grad"), batch * height * width,
            [&clip, tris.as_ref(), &rast, &grad, &b, &nv32, &h, &w, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), clip_l.shape().clone()))
    })
}

/// Sizes the interpolation kernels take: (triangles, attribute sets, vertices, channels,
/// pixels per image, pixels in all).
fn interpolate_dims(
    triangles: &Triangles,
    attr: &Shape,
    rast: &Shape,
) -> Result<(i32, i32, i32, i32, i64, i64)> {
    let (attr_batch, nv, c) = attr.dims3()?;
    let (batch, h, w, _) = rast.dims4()?;
    Ok((
        i32_of(triangles.len())?,
        i32_of(attr_batch)?,
        i32_of(nv)?,
        i32_of(c)?,
        (h * w) as i64,
        (batch * h * w) as i64,
    ))
}

/// [`crate::interpolate`]'s forward.
pub(crate) fn interpolate(
    triangles: &Triangles,
    (attr_s, attr_l): (&CudaStorage, &Layout),
    (rast_s, rast_l): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (nt, attr_batch, nv, c, pixels, total) =
        interpolate_dims(triangles, attr_l.shape(), rast_l.shape())?;
    let (batch, h, w, _) = rast_l.shape().dims4()?;
    let dev = attr_s.device().clone();
    let tris = triangles.on_gpu(&dev)?;
    dispatch_gpu_float!(attr_s.dtype(), T => {
        let (attr, rast) = (input::<T>(attr_s, attr_l)?, input::<T>(rast_s, rast_l)?);
        let mut out = uninit::<T>(&dev, total as usize * c as usize)?;
        launch!(dev, kernel::<T>("interpolate_fwd"), total as usize,
            [&attr, &rast, tris.as_ref(), &nt, &attr_batch, &nv, &c, &pixels, &total, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((batch, h, w, c as usize))))
    })
}

/// [`crate::interpolate`]'s backward: the gradients to the attributes and to rast.
pub(crate) fn interpolate_grads(
    triangles: &Triangles,
    attr: &Tensor,
    rast: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let both = attr.apply_op3_no_bwd(
        rast,
        &grad.contiguous()?,
        &InterpolateGrads {
            triangles: triangles.clone(),
        },
    )?;
    let [g_attr, g_rast] = split(&both, [attr.shape(), rast.shape()])?;
    Ok((g_attr, g_rast))
}

/// Splits a flat tensor into consecutive pieces of the given shapes: ops that produce several
/// gradients return them concatenated, since a custom op returns a single tensor.
fn split<const N: usize>(flat: &Tensor, shapes: [&Shape; N]) -> Result<[Tensor; N]> {
    let mut start = 0;
    let mut pieces = Vec::with_capacity(N);
    for shape in shapes {
        pieces.push(flat.narrow(0, start, shape.elem_count())?.reshape(shape)?);
        start += shape.elem_count();
    }
    Ok(pieces
        .try_into()
        .unwrap_or_else(|_| unreachable!("one piece per shape")))
}

/// (attr, rast, d out) -> [d attr, d rast] flattened into one tensor, which
/// [`interpolate_grads`] splits: custom ops return a single tensor.
struct InterpolateGrads {
    triangles: Triangles,
}

impl candle_core::CustomOp3 for InterpolateGrads {
    fn name(&self) -> &'static str {
        "ganfit-interpolate-grads"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        gpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        attr_s: &CudaStorage,
        attr_l: &Layout,
        rast_s: &CudaStorage,
        rast_l: &Layout,
        grad_s: &CudaStorage,
        grad_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (nt, attr_batch, nv, c, pixels, total) =
            interpolate_dims(&self.triangles, attr_l.shape(), rast_l.shape())?;
        let dev = attr_s.device().clone();
        let tris = self.triangles.on_gpu(&dev)?;
        let (n_attr, n_rast) = (attr_l.shape().elem_count(), rast_l.shape().elem_count());
        dispatch_gpu_float!(attr_s.dtype(), T => {
            let (attr, rast, grad) = (input::<T>(attr_s, attr_l)?, input::<T>(rast_s, rast_l)?, input::<T>(grad_s, grad_l)?);
            let mut both = zeros::<T>(&dev, n_attr + n_rast)?;
            {
                let (mut g_attr, mut g_rast) = both.split_at_mut(n_attr);
                launch!(dev, kernel::<T>("interpolate_bwd"), total as usize,
                    [&attr, &rast, &grad, tris.as_ref(), &nt, &attr_batch, &nv, &c, &pixels, &total, &mut g_attr, &mut g_rast]);
            }
            Ok((CudaStorage::wrap_cuda_slice(both, dev), Shape::from(n_attr + n_rast)))
        })
    }
}

/// Sizes the texture kernels take: (texture sets, Ht, Wt, channels, samples per image, samples
/// in all, wrap flag).
fn texture_dims(
    tex: &Shape,
    uv: &Shape,
    wrap: WrapMode,
) -> Result<(i32, i32, i32, i32, i64, i64, i32)> {
    let (tex_batch, ht, wt, c) = tex.dims4()?;
    let (batch, h, w, _) = uv.dims4()?;
    Ok((
        i32_of(tex_batch)?,
        i32_of(ht)?,
        i32_of(wt)?,
        i32_of(c)?,
        (h * w) as i64,
        (batch * h * w) as i64,
        i32::from(wrap == WrapMode::Wrap),
    ))
}

/// [`crate::texture`]'s forward.
pub(crate) fn texture(
    wrap: WrapMode,
    (tex_s, tex_l): (&CudaStorage, &Layout),
    (uv_s, uv_l): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (tb, ht, wt, c, samples, total, wrap) = texture_dims(tex_l.shape(), uv_l.shape(), wrap)?;
    let (batch, h, w, _) = uv_l.shape().dims4()?;
    let dev = tex_s.device().clone();
    dispatch_gpu_float!(tex_s.dtype(), T => {
        let (tex, uv) = (input::<T>(tex_s, tex_l)?, input::<T>(uv_s, uv_l)?);
        let mut out = uninit::<T>(&dev, total as usize * c as usize)?;
        launch!(dev, kernel::<T>("texture_fwd"), total as usize,
            [&tex, &uv, &tb, &ht, &wt, &c, &samples, &total, &wrap, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((batch, h, w, c as usize))))
    })
}

/// The texture's gradient (`[Bt, Ht, Wt, C]`, shape `tex_shape`) from (uv, d out).
pub(crate) fn texture_tex_grad(
    wrap: WrapMode,
    tex_shape: &Shape,
    (uv_s, uv_l): (&CudaStorage, &Layout),
    (grad_s, grad_l): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (tb, ht, wt, c, samples, total, wrap) = texture_dims(tex_shape, uv_l.shape(), wrap)?;
    let dev = uv_s.device().clone();
    dispatch_gpu_float!(uv_s.dtype(), T => {
        let (uv, grad) = (input::<T>(uv_s, uv_l)?, input::<T>(grad_s, grad_l)?);
        let mut out = zeros::<T>(&dev, tex_shape.elem_count())?;
        launch!(dev, kernel::<T>("texture_tex_grad"), total as usize,
            [&uv, &grad, &tb, &ht, &wt, &c, &samples, &total, &wrap, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), tex_shape.clone()))
    })
}

/// The uv gradient (`[B, H, W, 2]`) from (texture, uv, d out).
pub(crate) fn texture_uv_grad(
    wrap: WrapMode,
    [(tex_s, tex_l), (uv_s, uv_l), (grad_s, grad_l)]: [(&CudaStorage, &Layout); 3],
) -> Result<(CudaStorage, Shape)> {
    let (tb, ht, wt, c, samples, total, wrap) = texture_dims(tex_l.shape(), uv_l.shape(), wrap)?;
    let dev = tex_s.device().clone();
    dispatch_gpu_float!(tex_s.dtype(), T => {
        let (tex, uv, grad) = (input::<T>(tex_s, tex_l)?, input::<T>(uv_s, uv_l)?, input::<T>(grad_s, grad_l)?);
        let mut out = uninit::<T>(&dev, total as usize * 2)?;
        launch!(dev, kernel::<T>("texture_uv_grad"), total as usize,
            [&tex, &uv, &grad, &tb, &ht, &wt, &c, &samples, &total, &wrap, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), uv_l.shape().clone()))
    })
}

/// Words per crossing slot, two slots per pixel: the slot's target pixel, and its record of 18
/// (see kernels/render.cu).
const CROSSING_WORDS: usize = 1 + 18;

/// Silhouette crossings found on the GPU, with the rast they were found in: what
/// [`crate::antialias`]'s blends and their gradients read.
#[derive(Clone)]
pub(crate) struct GpuCrossings {
    rast: Tensor,
    /// `u32`, [`CROSSING_WORDS`] per slot, two slots per pixel.
    slots: Tensor,
}

impl GpuCrossings {
    /// Finds the crossings (or, with `find` off, records none: the mask still needs rast).
    pub(crate) fn find(
        rast: &Tensor,
        clip: &Tensor,
        triangles: &Triangles,
        find: bool,
    ) -> Result<Self> {
        let (batch, h, w, _) = rast.dims4()?;
        let slots = if find {
            let op = FindCrossings {
                triangles: triangles.clone(),
            };
            rast.contiguous()?
                .apply_op2_no_bwd(&clip.contiguous()?, &op)?
        } else {
            // Only the dense targets: with none set, no kernel opens a record.
            Tensor::full(u32::MAX, batch * h * w * 2, rast.device())?
        };
        Ok(Self {
            rast: rast.contiguous()?,
            slots,
        })
    }

    /// 1 where a triangle covers the pixel, else 0, `[B, H, W, 1]`.
    pub(crate) fn covered(&self, dtype: DType) -> Result<Tensor> {
        self.rast.narrow(3, 3, 1)?.ge(1.0)?.to_dtype(dtype)
    }

    /// Runs `f` with the CUDA storages of rast and of the slots.
    fn with_storages<R>(
        &self,
        f: impl FnOnce(&CudaStorage, &CudaStorage) -> Result<R>,
    ) -> Result<R> {
        let (rast, _) = self.rast.storage_and_layout();
        let (slots, _) = self.slots.storage_and_layout();
        match (&*rast, &*slots) {
            (candle_core::Storage::Cuda(rast), candle_core::Storage::Cuda(slots)) => f(rast, slots),
            _ => candle_core::bail!("silhouettes found on the GPU are used with GPU tensors only"),
        }
    }

    /// The blend of `color` (`[B, H, W, C]`) along the crossings; with `coverage`, of the
    /// coverage itself (`color` is then not read and C is 1).
    pub(crate) fn blend(
        &self,
        (color_s, color_l): (&CudaStorage, &Layout),
        mask: bool,
        coverage: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, height, width, _) = self.rast.dims4()?;
        let c = if coverage {
            1
        } else {
            color_l.shape().dims4()?.3
        };
        let (b, h, w, c32) = (i32_of(batch)?, i32_of(height)?, i32_of(width)?, i32_of(c)?);
        let (mask, coverage) = (i32::from(mask), i32::from(coverage));
        let dev = color_s.device().clone();
        self.with_storages(|rast_s, slots_s| {
            let slots = slots_s.as_cuda_slice::<u32>()?;
            dispatch_gpu_float!(color_s.dtype(), T => {
                let rast = input::<T>(rast_s, self.rast.layout())?;
                let color = input::<T>(color_s, color_l)?;
                let mut out = uninit::<T>(&dev, batch * height * width * c)?;
                launch!(dev, kernel::<T>("blend_fwd"), batch * height * width,
                    [&color, &rast, slots, &b, &h, &w, &c32, &mask, &coverage, &mut out]);
                Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((batch, height, width, c))))
            })
        })
    }
}

/// (rast, clip_pos) -> the crossing slots of every pixel.
struct FindCrossings {
    triangles: Triangles,
}

impl candle_core::CustomOp2 for FindCrossings {
    fn name(&self) -> &'static str {
        "ganfit-antialias-find-crossings"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        gpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        rast_s: &CudaStorage,
        rast_l: &Layout,
        clip_s: &CudaStorage,
        clip_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, height, width, _) = rast_l.shape().dims4()?;
        let (_, nv, _) = clip_l.shape().dims3()?;
        let nt = self.triangles.len();
        let dev = rast_s.device().clone();
        let tris = self.triangles.on_gpu(&dev)?;
        let neighbours = self.triangles.neighbours_on_gpu(&dev)?;
        let (b, nv32, nt32, h, w) = (
            i32_of(batch)?,
            i32_of(nv)?,
            i32_of(nt)?,
            i32_of(height)?,
            i32_of(width)?,
        );
        let words = batch * height * width * 2 * CROSSING_WORDS;
        let mut slots = uninit::<u32>(&dev, words)?;
        let mut facing = uninit::<u8>(&dev, batch * nt)?;
        let mut bits = uninit::<u8>(&dev, batch * nt)?;
        dispatch_gpu_float!(rast_s.dtype(), T => {
            let (rast, clip) = (input::<T>(rast_s, rast_l)?, input::<T>(clip_s, clip_l)?);
            launch!(dev, kernel::<T>("silhouette_facing"), batch * nt,
                [&clip, tris.as_ref(), &b, &nv32, &nt32, &mut facing]);
            launch!(dev, "silhouette_edge_bits", batch * nt,
                [neighbours.as_ref(), &facing, &b, &nt32, &mut bits]);
            launch!(dev, kernel::<T>("silhouette_crossings"), batch * height * width,
                [&rast, &clip, tris.as_ref(), &bits, &b, &nv32, &nt32, &h, &w, &mut slots]);
        });
        Ok((CudaStorage::wrap_cuda_slice(slots, dev), Shape::from(words)))
    }
}

/// d color of a blend: from d out, `[B, H, W, C]`.
pub(crate) struct BlendColorGrad {
    pub(crate) crossings: GpuCrossings,
    pub(crate) mask: bool,
}

impl candle_core::CustomOp1 for BlendColorGrad {
    fn name(&self) -> &'static str {
        "ganfit-antialias-color-grad"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        gpu_only(self.name())
    }

    fn cuda_fwd(&self, grad_s: &CudaStorage, grad_l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (batch, height, width, c) = grad_l.shape().dims4()?;
        let (b, h, w, c32) = (i32_of(batch)?, i32_of(height)?, i32_of(width)?, i32_of(c)?);
        let mask = i32::from(self.mask);
        let dev = grad_s.device().clone();
        self.crossings.with_storages(|rast_s, slots_s| {
            let slots = slots_s.as_cuda_slice::<u32>()?;
            dispatch_gpu_float!(grad_s.dtype(), T => {
                let rast = input::<T>(rast_s, self.crossings.rast.layout())?;
                let grad = input::<T>(grad_s, grad_l)?;
                let mut out = uninit::<T>(&dev, batch * height * width * c)?;
                launch!(dev, kernel::<T>("blend_color_grad"), batch * height * width,
                    [&grad, &rast, slots, &b, &h, &w, &c32, &mask, &mut out]);
                Ok((CudaStorage::wrap_cuda_slice(out, dev), grad_l.shape().clone()))
            })
        })
    }
}

/// d clip_pos (`[B, V, 4]`) of a blend, from (color, d out); with `coverage`, of the blended
/// coverage (the first input is then not read).
pub(crate) struct BlendPositionGrad {
    pub(crate) crossings: GpuCrossings,
    pub(crate) mask: bool,
    pub(crate) coverage: bool,
    pub(crate) num_vertices: usize,
}

impl candle_core::CustomOp2 for BlendPositionGrad {
    fn name(&self) -> &'static str {
        "ganfit-antialias-position-grad"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        gpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        color_s: &CudaStorage,
        color_l: &Layout,
        grad_s: &CudaStorage,
        grad_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, height, width, c) = grad_l.shape().dims4()?;
        let nv = self.num_vertices;
        let (b, nv32, h, w, c32) = (
            i32_of(batch)?,
            i32_of(nv)?,
            i32_of(height)?,
            i32_of(width)?,
            i32_of(c)?,
        );
        let (mask, coverage) = (i32::from(self.mask), i32::from(self.coverage));
        let dev = grad_s.device().clone();
        self.crossings.with_storages(|rast_s, slots_s| {
            let slots = slots_s.as_cuda_slice::<u32>()?;
            dispatch_gpu_float!(grad_s.dtype(), T => {
                let rast = input::<T>(rast_s, self.crossings.rast.layout())?;
                let (color, grad) = (input::<T>(color_s, color_l)?, input::<T>(grad_s, grad_l)?);
                let mut out = zeros::<T>(&dev, batch * nv * 4)?;
                launch!(dev, kernel::<T>("blend_position_grad"), batch * height * width * 2,
                    [&color, &grad, &rast, slots, &b, &nv32, &h, &w, &c32, &mask, &coverage, &mut out]);
                Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((batch, nv, 4))))
            })
        })
    }
}

/// [`crate::normalize`] over the last dim.
pub(crate) fn normalize(
    eps: f64,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let c = layout.shape().dims().last().copied().unwrap_or(1).max(1);
    let rows = layout.shape().elem_count() / c;
    let (rows64, c32) = (rows as i64, i32_of(c)?);
    let dev = storage.device().clone();
    dispatch_gpu_float!(storage.dtype(), T => {
        let v = input::<T>(storage, layout)?;
        let mut out = uninit::<T>(&dev, rows * c)?;
        launch!(dev, kernel::<T>("normalize_fwd"), rows, [&v, &rows64, &c32, &eps, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), layout.shape().clone()))
    })
}

/// The gradient of [`normalize`] from (v, d out).
pub(crate) fn normalize_grad(
    eps: f64,
    (v_s, v_l): (&CudaStorage, &Layout),
    (g_s, g_l): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let c = v_l.shape().dims().last().copied().unwrap_or(1).max(1);
    let rows = v_l.shape().elem_count() / c;
    let (rows64, c32) = (rows as i64, i32_of(c)?);
    let dev = v_s.device().clone();
    dispatch_gpu_float!(v_s.dtype(), T => {
        let (v, g) = (input::<T>(v_s, v_l)?, input::<T>(g_s, g_l)?);
        let mut out = uninit::<T>(&dev, rows * c)?;
        launch!(dev, kernel::<T>("normalize_grad"), rows, [&v, &g, &rows64, &c32, &eps, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), v_l.shape().clone()))
    })
}

/// The area-weighted face-normal sums at each vertex (before [`normalize`]), `[B, V, 3]`.
pub(crate) fn face_normal_sums(
    triangles: &Triangles,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (batch, nv, _) = layout.shape().dims3()?;
    let nt = triangles.len();
    let dev = storage.device().clone();
    let tris = triangles.on_gpu(&dev)?;
    let (b, nv32, nt32) = (i32_of(batch)?, i32_of(nv)?, i32_of(nt)?);
    dispatch_gpu_float!(storage.dtype(), T => {
        let p = input::<T>(storage, layout)?;
        let mut out = zeros::<T>(&dev, batch * nv * 3)?;
        launch!(dev, kernel::<T>("face_normal_sums"), batch * nt, [&p, tris.as_ref(), &b, &nv32, &nt32, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), layout.shape().clone()))
    })
}

/// The gradient of [`face_normal_sums`] from (positions, d out).
pub(crate) fn face_normal_sums_grad(
    triangles: &Triangles,
    (p_s, p_l): (&CudaStorage, &Layout),
    (g_s, g_l): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (batch, nv, _) = p_l.shape().dims3()?;
    let nt = triangles.len();
    let dev = p_s.device().clone();
    let tris = triangles.on_gpu(&dev)?;
    let (b, nv32, nt32) = (i32_of(batch)?, i32_of(nv)?, i32_of(nt)?);
    dispatch_gpu_float!(p_s.dtype(), T => {
        let (p, g) = (input::<T>(p_s, p_l)?, input::<T>(g_s, g_l)?);
        let mut out = zeros::<T>(&dev, batch * nv * 3)?;
        launch!(dev, kernel::<T>("face_normal_sums_grad"), batch * nt,
            [&p, &g, tris.as_ref(), &b, &nv32, &nt32, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), p_l.shape().clone()))
    })
}

/// What a shading kernel computes, with its constants: the kernels take five doubles by value
/// (`ShBands` or `PhongParams` in kernels/render.cu).
#[derive(Clone, Copy)]
pub(crate) enum Shading {
    /// [`crate::shade_sh`]: albedo `[B, N, C]`, normals `[B, N, 3]`, coefficients `[B, C, 9]`.
    SphericalHarmonics([f64; 5]),
    /// [`crate::shade_phong`]: albedo `[B, N, 3]`, geometry `[B, N, 3 or 6]` (the normal, then
    /// with a specular term the view vector), light `[B, 9]` (direction, colour, ambient);
    /// `[specular, shininess, 0, 0, 0]`.
    Phong([f64; 5]),
}

/// The five constants, as the kernels' by-value struct.
#[repr(C)]
#[derive(Clone, Copy)]
struct ShadingConstants([f64; 5]);

// Safety: `#[repr(C)]` five f64s, the layout of the kernels' `ShBands` and `PhongParams`.
unsafe impl DeviceRepr for ShadingConstants {}

impl Shading {
    pub(crate) fn sh(bands: &ShBands) -> Self {
        Self::SphericalHarmonics([
            bands.dc,
            bands.linear,
            bands.cross,
            bands.zonal,
            bands.square,
        ])
    }

    pub(crate) fn phong(specular: f64, shininess: f64) -> Self {
        Self::Phong([specular, shininess, 0.0, 0.0, 0.0])
    }

    fn kernel(&self) -> &'static str {
        match self {
            Self::SphericalHarmonics(_) => "shade_sh",
            Self::Phong(_) => "shade_phong",
        }
    }

    fn constants(&self) -> ShadingConstants {
        match *self {
            Self::SphericalHarmonics(c) | Self::Phong(c) => ShadingConstants(c),
        }
    }

    /// The kernels' row length: SH's channel count, Phong's geometry row length.
    fn width(&self, albedo: &Shape, geometry: &Shape) -> Result<i32> {
        i32_of(match self {
            Self::SphericalHarmonics(_) => albedo.dims3()?.2,
            Self::Phong(_) => geometry.dims3()?.2,
        })
    }
}

/// A shading op's forward from (albedo, normals or geometry, coefficients or light).
pub(crate) fn shade(
    shading: Shading,
    [(a_s, a_l), (g_s, g_l), (l_s, l_l)]: [(&CudaStorage, &Layout); 3],
) -> Result<(CudaStorage, Shape)> {
    let (batch, pixels, _) = a_l.shape().dims3()?;
    let (pixels64, total) = (pixels as i64, (batch * pixels) as i64);
    let (width, constants) = (
        shading.width(a_l.shape(), g_l.shape())?,
        shading.constants(),
    );
    let dev = a_s.device().clone();
    dispatch_gpu_float!(a_s.dtype(), T => {
        let (albedo, geometry, light) = (input::<T>(a_s, a_l)?, input::<T>(g_s, g_l)?, input::<T>(l_s, l_l)?);
        let mut out = uninit::<T>(&dev, a_l.shape().elem_count())?;
        launch!(dev, kernel::<T>(&format!("{}_fwd", shading.kernel())), batch * pixels,
            [&albedo, &geometry, &light, &pixels64, &total, &width, &constants, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), a_l.shape().clone()))
    })
}

/// A shading op's backward: the gradients to its three inputs.
pub(crate) fn shade_grads(
    shading: Shading,
    [albedo, geometry, light]: [&Tensor; 3],
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = ShadingGrads {
        shading,
        light: light.contiguous()?,
    };
    let all =
        albedo
            .contiguous()?
            .apply_op3_no_bwd(&geometry.contiguous()?, &grad.contiguous()?, &op)?;
    let [g_albedo, g_geometry, g_light] =
        split(&all, [albedo.shape(), geometry.shape(), light.shape()])?;
    Ok((g_albedo, g_geometry, g_light))
}

/// (albedo, normals or geometry, d out) -> the three gradients flattened; the coefficients or
/// light ride along in the op, since custom ops take at most three inputs.
struct ShadingGrads {
    shading: Shading,
    light: Tensor,
}

impl candle_core::CustomOp3 for ShadingGrads {
    fn name(&self) -> &'static str {
        "ganfit-shading-grads"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        gpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        a_s: &CudaStorage,
        a_l: &Layout,
        geo_s: &CudaStorage,
        geo_l: &Layout,
        g_s: &CudaStorage,
        g_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, pixels, _) = a_l.shape().dims3()?;
        let (pixels64, total) = (pixels as i64, (batch * pixels) as i64);
        let (width, constants) = (
            self.shading.width(a_l.shape(), geo_l.shape())?,
            self.shading.constants(),
        );
        let n_albedo = a_l.shape().elem_count();
        let n_geometry = geo_l.shape().elem_count();
        let n = n_albedo + n_geometry + self.light.elem_count();
        let dev = a_s.device().clone();
        let (light_storage, light_layout) = self.light.storage_and_layout();
        let candle_core::Storage::Cuda(l_s) = &*light_storage else {
            candle_core::bail!("shading's coefficients or light must be on the GPU with the image");
        };
        dispatch_gpu_float!(a_s.dtype(), T => {
            let (albedo, geometry, grad) = (input::<T>(a_s, a_l)?, input::<T>(geo_s, geo_l)?, input::<T>(g_s, g_l)?);
            let light = input::<T>(l_s, light_layout)?;
            let mut all = zeros::<T>(&dev, n)?;
            {
                let (mut g_albedo, mut rest) = all.split_at_mut(n_albedo);
                let (mut g_geometry, mut g_light) = rest.split_at_mut(n_geometry);
                launch!(dev, kernel::<T>(&format!("{}_bwd", self.shading.kernel())), batch * pixels,
                    [&albedo, &geometry, &light, &grad, &pixels64, &total, &width, &constants,
                     &mut g_albedo, &mut g_geometry, &mut g_light]);
            }
            Ok((CudaStorage::wrap_cuda_slice(all, dev), Shape::from(n)))
        })
    }
}

/// [`crate::rotation_matrix`]: axis-angle `[B, 3]` -> `[B, 3, 3]`.
pub(crate) fn rotation(storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
    let batch = layout.shape().dims()[0];
    let b = i32_of(batch)?;
    let dev = storage.device().clone();
    dispatch_gpu_float!(storage.dtype(), T => {
        let r = input::<T>(storage, layout)?;
        let mut out = uninit::<T>(&dev, batch * 9)?;
        launch!(dev, kernel::<T>("rotation_fwd"), batch, [&r, &b, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((batch, 3, 3))))
    })
}

/// The gradient of [`rotation`] from (axis-angle, d R).
pub(crate) fn rotation_grad(
    (r_s, r_l): (&CudaStorage, &Layout),
    (g_s, g_l): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let batch = r_l.shape().dims()[0];
    let b = i32_of(batch)?;
    let dev = r_s.device().clone();
    dispatch_gpu_float!(r_s.dtype(), T => {
        let (r, g) = (input::<T>(r_s, r_l)?, input::<T>(g_s, g_l)?);
        let mut out = uninit::<T>(&dev, batch * 3)?;
        launch!(dev, kernel::<T>("rotation_grad"), batch, [&r, &g, &b, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), r_l.shape().clone()))
    })
}

/// `points · matrix + offset` per image (the camera's `AffinePoints`): `dims` are (images,
/// points shared by them, points per image, output coordinates).
pub(crate) fn affine_points(
    (p_s, p_l): (&CudaStorage, &Layout),
    (m_s, m_l): (&CudaStorage, &Layout),
    (o_s, o_l): (&CudaStorage, &Layout),
    (batch, shared, nv, k): (usize, bool, usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let (b, shared32, nv64, k32) = (i32_of(batch)?, i32::from(shared), nv as i64, i32_of(k)?);
    let dev = p_s.device().clone();
    dispatch_gpu_float!(p_s.dtype(), T => {
        let (points, matrix, offset) = (input::<T>(p_s, p_l)?, input::<T>(m_s, m_l)?, input::<T>(o_s, o_l)?);
        let mut out = uninit::<T>(&dev, batch * nv * k)?;
        launch!(dev, kernel::<T>("affine_points_fwd"), batch * nv,
            [&points, &matrix, &offset, &b, &shared32, &nv64, &k32, &mut out]);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((batch, nv, k))))
    })
}

/// The gradients of [`affine_points`] to its points, matrices and offsets.
pub(crate) fn affine_points_grads(
    [points, matrix, offset]: [&Tensor; 3],
    grad: &Tensor,
    shared: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = AffinePointsGrads { shared };
    let all =
        points
            .contiguous()?
            .apply_op3_no_bwd(&matrix.contiguous()?, &grad.contiguous()?, &op)?;
    let [g_points, g_matrix, g_offset] =
        split(&all, [points.shape(), matrix.shape(), offset.shape()])?;
    Ok((g_points, g_matrix, g_offset))
}

/// (points, matrix, d out) -> the three gradients flattened.
struct AffinePointsGrads {
    shared: bool,
}

impl candle_core::CustomOp3 for AffinePointsGrads {
    fn name(&self) -> &'static str {
        "ganfit-affine-points-grads"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        gpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        p_s: &CudaStorage,
        p_l: &Layout,
        m_s: &CudaStorage,
        m_l: &Layout,
        g_s: &CudaStorage,
        g_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, _, k) = m_l.shape().dims3()?;
        let nv = p_l.shape().dims3()?.1;
        let (b, shared, nv64, k32) = (
            i32_of(batch)?,
            i32::from(self.shared),
            nv as i64,
            i32_of(k)?,
        );
        let (n_points, n_matrix) = (p_l.shape().elem_count(), batch * 3 * k);
        let dev = p_s.device().clone();
        dispatch_gpu_float!(p_s.dtype(), T => {
            let (points, matrix, grad) = (input::<T>(p_s, p_l)?, input::<T>(m_s, m_l)?, input::<T>(g_s, g_l)?);
            let mut all = zeros::<T>(&dev, n_points + n_matrix + batch * k)?;
            {
                let (mut g_points, mut rest) = all.split_at_mut(n_points);
                let (mut g_matrix, mut g_offset) = rest.split_at_mut(n_matrix);
                launch!(dev, kernel::<T>("affine_points_grad"), batch * nv,
                    [&points, &matrix, &grad, &b, &shared, &nv64, &k32, &mut g_points, &mut g_matrix, &mut g_offset]);
            }
            Ok((CudaStorage::wrap_cuda_slice(all, dev), Shape::from(n_points + n_matrix + batch * k)))
        })
    }
}
