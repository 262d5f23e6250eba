//! Bilinear texture sampling with gradients to the texture and to the sample positions.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::{One, Zero};
use rayon::prelude::*;

use crate::error::{RenderError, Result};
use crate::kernel::{
    PIXEL_CHUNK, Real, add_into, check_float, data, dispatch_float, min_tasks, piece_len,
};

/// What happens to texture coordinates outside `[0, 1]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WrapMode {
    /// Repeat the border texels (OpenGL `CLAMP_TO_EDGE`).
    #[default]
    Clamp,
    /// Tile the texture (OpenGL `REPEAT`).
    Wrap,
}

/// Samples `tex` bilinearly at `uv`.
///
/// * `tex`: `[Bt, Ht, Wt, C]` (Bt = 1 shares one texture across the batch) or `[Ht, Wt, C]`.
/// * `uv`: `[B, H, W, 2]`, same dtype. `u` runs along texture columns, `v` along rows; texel
///   (row r, column c) has its centre at `(u, v) = ((c + 0.5) / Wt, (r + 0.5) / Ht)`, so
///   `v = 0` is the top edge of row 0. (OBJ-style UVs with `v = 0` at the bottom need `1 - v`.)
///
/// Returns `[B, H, W, C]`. Gradients flow to `tex` and to `uv`; the `uv` gradient is the
/// derivative of the bilinear interpolant, which is zero where clamping makes it constant.
pub fn texture(tex: &Tensor, uv: &Tensor, wrap: WrapMode) -> Result<Tensor> {
    let tex = match tex.rank() {
        3 => tex.unsqueeze(0)?,
        _ => tex.clone(),
    };
    check_float(&tex, "tex", "[Ht, Wt, C] or [B, Ht, Wt, C]", 4, None)?;
    check_float(uv, "uv", "[B, H, W, 2]", 4, Some(2))?;
    if tex.dtype() != uv.dtype() {
        return Err(RenderError::DType {
            what: "tex (must match uv)",
            got: tex.dtype(),
        });
    }
    let (tex_batch, batch) = (tex.dim(0)?, uv.dim(0)?);
    if tex_batch != batch && tex_batch != 1 {
        return Err(RenderError::Batch {
            what: "tex",
            got: tex_batch,
            expected: batch,
        });
    }
    if tex.dims()[1..].contains(&0) {
        return Err(RenderError::Shape {
            what: "tex",
            expected: "a texture of at least 1x1 texel and 1 channel".into(),
            got: tex.dims().to_vec(),
        });
    }
    Ok(tex
        .contiguous()?
        .apply_op2(&uv.contiguous()?, Texture { wrap })?)
}

/// Samples a texture at per-vertex texture coordinates, as GANFIT does to colour its mesh.
///
/// * `tex`: `[B, Ht, Wt, C]` or `[Ht, Wt, C]`.
/// * `vertex_uv`: `[V, 2]` (shared) or `[B, V, 2]`, coordinates as in [`texture`].
///
/// Returns `[B, V, C]` with gradients to both inputs.
pub fn sample_vertex_colors(tex: &Tensor, vertex_uv: &Tensor, wrap: WrapMode) -> Result<Tensor> {
    let vertex_uv = match vertex_uv.rank() {
        2 => vertex_uv.unsqueeze(0)?,
        _ => vertex_uv.clone(),
    };
    check_float(&vertex_uv, "vertex_uv", "[V, 2] or [B, V, 2]", 3, Some(2))?;
    let tex_batch = if tex.rank() == 4 { tex.dim(0)? } else { 1 };
    let (uv_batch, nv, _) = vertex_uv.dims3()?;
    let batch = tex_batch.max(uv_batch);
    if uv_batch != batch && uv_batch != 1 {
        return Err(RenderError::Batch {
            what: "vertex_uv",
            got: uv_batch,
            expected: batch,
        });
    }
    let uv = vertex_uv
        .broadcast_as((batch, nv, 2))?
        .reshape((batch, 1, nv, 2))?;
    let colors = texture(tex, &uv, wrap)?;
    let channels = colors.dim(3)?;
    Ok(colors.reshape((batch, nv, channels))?)
}

/// The four texels around a sample and their bilinear weights, plus the fractional offsets.
struct Taps<T> {
    /// Texel indices (row * Wt + column): top-left, top-right, bottom-left, bottom-right.
    texels: [usize; 4],
    weights: [T; 4],
    frac: [T; 2],
}

fn axis_taps<T: Real>(coord: T, size: usize, wrap: WrapMode) -> ([usize; 2], T) {
    let x = coord * T::of(size as f64) - T::of(0.5);
    let lower = x.floor();
    let first = lower.to_f64() as isize;
    let place = |i: isize| match wrap {
        WrapMode::Clamp => i.clamp(0, size as isize - 1) as usize,
        WrapMode::Wrap => i.rem_euclid(size as isize) as usize,
    };
    ([place(first), place(first.saturating_add(1))], x - lower)
}

fn taps<T: Real>(u: T, v: T, ht: usize, wt: usize, wrap: WrapMode) -> Taps<T> {
    let ([c0, c1], fx) = axis_taps(u, wt, wrap);
    let ([r0, r1], fy) = axis_taps(v, ht, wrap);
    let (gx, gy) = (T::one() - fx, T::one() - fy);
    Taps {
        texels: [r0 * wt + c0, r0 * wt + c1, r1 * wt + c0, r1 * wt + c1],
        weights: [gy * gx, gy * fx, fy * gx, fy * fx],
        frac: [fx, fy],
    }
}

/// Sizes shared by the texture kernels.
#[derive(Clone, Copy)]
struct Dims {
    tex_batch: usize,
    ht: usize,
    wt: usize,
    c: usize,
    /// Samples per image.
    samples: usize,
}

impl Dims {
    fn new(tex: &Shape, uv: &Shape) -> candle_core::Result<Self> {
        let (tex_batch, ht, wt, c) = tex.dims4()?;
        let (_, h, w, _) = uv.dims4()?;
        Ok(Self {
            tex_batch,
            ht,
            wt,
            c,
            samples: h * w,
        })
    }

    /// Offset of the texture that sample `i` reads.
    fn tex_base(&self, i: usize) -> usize {
        if self.tex_batch == 1 {
            0
        } else {
            i / self.samples * self.ht * self.wt * self.c
        }
    }
}

struct Texture {
    wrap: WrapMode,
}

impl CustomOp2 for Texture {
    fn name(&self) -> &'static str {
        "ganfit-texture"
    }

    fn cpu_fwd(
        &self,
        tex: &CpuStorage,
        tex_l: &Layout,
        uv: &CpuStorage,
        uv_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::new(tex_l.shape(), uv_l.shape())?;
        let (b, h, w, _) = uv_l.shape().dims4()?;
        dispatch_float!(tex, T => {
            let (tex, uv) = (data::<T>(tex, tex_l)?, data::<T>(uv, uv_l)?);
            let mut out = vec![T::zero(); b * h * w * d.c];
            let blocks = out.par_chunks_mut(PIXEL_CHUNK * d.c).zip(uv.par_chunks(PIXEL_CHUNK * 2));
            blocks.with_min_len(min_tasks()).enumerate().for_each(|(block, (dst, uv))| {
                for (j, (dst, uv)) in dst.chunks_exact_mut(d.c).zip(uv.chunks_exact(2)).enumerate() {
                    let base = d.tex_base(block * PIXEL_CHUNK + j);
                    let tap = taps(uv[0], uv[1], d.ht, d.wt, self.wrap);
                    for (texel, wt) in tap.texels.into_iter().zip(tap.weights) {
                        let src = &tex[base + texel * d.c..base + texel * d.c + d.c];
                        dst.iter_mut().zip(src).for_each(|(o, &t)| *o += wt * t);
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(out), Shape::from((b, h, w, d.c))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        tex: &candle_core::CudaStorage,
        tex_l: &Layout,
        uv: &candle_core::CudaStorage,
        uv_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::texture(self.wrap, (tex, tex_l), (uv, uv_l))
    }

    fn bwd(
        &self,
        tex: &Tensor,
        uv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Each gradient is its own pass: none for a constant texture (e.g. a detached copy) or
        // constant coordinates (e.g. a fixed warp).
        let grad = grad.contiguous()?;
        let grad_tex = tex
            .track_op()
            .then(|| {
                let op = TexGrad {
                    wrap: self.wrap,
                    tex_shape: tex.shape().clone(),
                };
                uv.apply_op2_no_bwd(&grad, &op)
            })
            .transpose()?;
        let grad_uv = uv
            .track_op()
            .then(|| tex.apply_op3_no_bwd(uv, &grad, &UvGrad { wrap: self.wrap }))
            .transpose()?;
        Ok((grad_tex, grad_uv))
    }
}

/// d tex of [`Texture`]: (uv, d out) -> d tex.
struct TexGrad {
    wrap: WrapMode,
    tex_shape: Shape,
}

impl CustomOp2 for TexGrad {
    fn name(&self) -> &'static str {
        "ganfit-texture-tex-grad"
    }

    fn cpu_fwd(
        &self,
        uv: &CpuStorage,
        uv_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::new(&self.tex_shape, uv_l.shape())?;
        dispatch_float!(uv, T => {
            let (uv, grad) = (data::<T>(uv, uv_l)?, data::<T>(grad, grad_l)?);
            let per_tex = d.ht * d.wt * d.c;
            let n = uv.len() / 2;
            // A shared texture collects from every image; otherwise each image has its own.
            let span = if d.tex_batch == 1 { n } else { d.samples };
            let mut out = vec![T::zero(); d.tex_batch * per_tex];
            out.par_chunks_mut(per_tex).with_min_len(min_tasks()).enumerate().for_each(|(b, dst)| {
                let samples = b * span..(b + 1) * span;
                let uv = &uv[samples.start * 2..samples.end * 2];
                let grad = &grad[samples.start * d.c..samples.end * d.c];
                let sum = uv
                    .par_chunks(PIXEL_CHUNK * 2)
                    .zip(grad.par_chunks(PIXEL_CHUNK * d.c))
                    .with_min_len(piece_len(span.div_ceil(PIXEL_CHUNK)))
                    .fold(
                        || vec![T::zero(); per_tex],
                        |mut acc, (uv, grad)| {
                            for (uv, g) in uv.chunks_exact(2).zip(grad.chunks_exact(d.c)) {
                                // Samples the loss ignores (e.g. masked background) add nothing.
                                if g.iter().all(|&g| g == T::zero()) {
                                    continue;
                                }
                                let tap = taps(uv[0], uv[1], d.ht, d.wt, self.wrap);
                                for (texel, wt) in tap.texels.into_iter().zip(tap.weights) {
                                    acc[texel * d.c..texel * d.c + d.c]
                                        .iter_mut()
                                        .zip(g)
                                        .for_each(|(a, &g)| *a += wt * g);
                                }
                            }
                            acc
                        },
                    )
                    .reduce_with(add_into);
                if let Some(sum) = sum {
                    dst.copy_from_slice(&sum);
                }
            });
            Ok((T::to_cpu_storage_owned(out), self.tex_shape.clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        uv: &candle_core::CudaStorage,
        uv_l: &Layout,
        grad: &candle_core::CudaStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::texture_tex_grad(self.wrap, &self.tex_shape, (uv, uv_l), (grad, grad_l))
    }
}

/// d uv of [`Texture`]: (tex, uv, d out) -> d uv.
struct UvGrad {
    wrap: WrapMode,
}

impl CustomOp3 for UvGrad {
    fn name(&self) -> &'static str {
        "ganfit-texture-uv-grad"
    }

    fn cpu_fwd(
        &self,
        tex: &CpuStorage,
        tex_l: &Layout,
        uv: &CpuStorage,
        uv_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::new(tex_l.shape(), uv_l.shape())?;
        dispatch_float!(tex, T => {
            let (tex, uv, grad) = (data::<T>(tex, tex_l)?, data::<T>(uv, uv_l)?, data::<T>(grad, grad_l)?);
            let mut out = vec![T::zero(); uv.len()];
            let (sw, sh) = (T::of(d.wt as f64), T::of(d.ht as f64));
            let blocks = out.par_chunks_mut(PIXEL_CHUNK * 2).zip(uv.par_chunks(PIXEL_CHUNK * 2));
            blocks.with_min_len(min_tasks()).enumerate().for_each(|(block, (dst, uv))| {
                for (j, (dst, uv)) in dst.chunks_exact_mut(2).zip(uv.chunks_exact(2)).enumerate() {
                    let i = block * PIXEL_CHUNK + j;
                    let base = d.tex_base(i);
                    let tap = taps(uv[0], uv[1], d.ht, d.wt, self.wrap);
                    let [fx, fy] = tap.frac;
                    let texel = |k: usize, ch: usize| tex[base + tap.texels[k] * d.c + ch];
                    let g = &grad[i * d.c..i * d.c + d.c];
                    for (ch, &g) in g.iter().enumerate() {
                        let (t00, t01, t10, t11) = (texel(0, ch), texel(1, ch), texel(2, ch), texel(3, ch));
                        let d_fx = (T::one() - fy) * (t01 - t00) + fy * (t11 - t10);
                        let d_fy = (T::one() - fx) * (t10 - t00) + fx * (t11 - t01);
                        dst[0] += g * d_fx * sw;
                        dst[1] += g * d_fy * sh;
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(out), uv_l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        tex: &candle_core::CudaStorage,
        tex_l: &Layout,
        uv: &candle_core::CudaStorage,
        uv_l: &Layout,
        grad: &candle_core::CudaStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::texture_uv_grad(self.wrap, [(tex, tex_l), (uv, uv_l), (grad, grad_l)])
    }
}
