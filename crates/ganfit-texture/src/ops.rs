//! Differentiable building blocks: a same-padding convolution as a candle `CustomOp2` with a
//! direct CPU kernel (candle's im2col path is several times slower for the few-channel,
//! large-plane layers of a texture generator), pixel normalisation and leaky ReLU.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::{AddAssign, Mul};

/// Negative slope of every leaky ReLU in ProGAN.
pub const LEAKY_SLOPE: f64 = 0.2;

/// Stride-1 convolution with an odd square kernel and zero padding `k / 2`, so the output has
/// the input's spatial size. `x` is `[B, Cin, H, W]`, `kernel` is `[Cout, Cin, k, k]`.
///
/// On the CPU this runs the custom kernel below; elsewhere it defers to candle's `conv2d`.
pub fn conv2d_same(x: &Tensor, kernel: &Tensor) -> Result<Tensor> {
    let k = kernel.dim(3)?;
    if k % 2 == 0 || kernel.dim(2)? != k {
        candle_core::bail!(
            "conv2d_same needs an odd square kernel, got {:?}",
            kernel.shape()
        )
    }
    if x.device().is_cpu() {
        x.contiguous()?.apply_op2(&kernel.contiguous()?, ConvSame)
    } else {
        x.conv2d(kernel, k / 2, 1, 1, 1)
    }
}

/// The gradient of [`conv2d_same`] with respect to its input, written with differentiable ops
/// so that losses on input gradients (gradient penalties) can be differentiated again.
pub fn conv2d_same_input_grad(grad_out: &Tensor, kernel: &Tensor) -> Result<Tensor> {
    let flipped = kernel.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?;
    conv2d_same(grad_out, &flipped)
}

/// `x / sqrt(mean_c x^2 + eps)` over the channel axis (dim 1), as in ProGAN.
pub fn pixel_norm(x: &Tensor) -> Result<Tensor> {
    let denom = (x.sqr()?.mean_keepdim(1)? + 1e-8)?.sqrt()?;
    x.broadcast_div(&denom)
}

/// Leaky ReLU with slope [`LEAKY_SLOPE`]; also returns its local derivative (a constant mask),
/// needed by hand-written input gradients.
pub fn leaky_relu_with_slope(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let positive = x.ge(0.0)?.to_dtype(x.dtype())?;
    let slope = positive.affine(1.0 - LEAKY_SLOPE, LEAKY_SLOPE)?;
    Ok(((x * &slope)?, slope))
}

/// Leaky ReLU with slope [`LEAKY_SLOPE`].
pub fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok(leaky_relu_with_slope(x)?.0)
}

#[derive(Debug, Clone, Copy)]
struct ConvSame;

#[derive(Debug, Clone, Copy)]
struct ConvSameKernelGrad {
    k: usize,
}

fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("conv2d_same expects contiguous inputs"),
    }
}

/// Sizes of one convolution: batch, input/output channels, plane height/width, kernel size.
#[derive(Debug, Clone, Copy)]
struct ConvDims {
    b: usize,
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    k: usize,
}

impl ConvDims {
    /// Row stride of a zero-padded plane.
    fn padded_w(&self) -> usize {
        self.w + self.k - 1
    }

    /// Length of a padded plane.
    fn padded_len(&self) -> usize {
        (self.h + self.k - 1) * self.padded_w()
    }

    /// Length of the "wide" output layout: rows of `padded_w` texels of which the first `w`
    /// are real. In that layout kernel tap `(ky, kx)` reads the padded input at a constant
    /// offset `ky * padded_w + kx`, so each tap is one long contiguous multiply-add instead of
    /// `h` short ones, which is what makes small planes fast.
    fn wide_len(&self) -> usize {
        (self.h - 1) * self.padded_w() + self.w
    }
}

/// Copies `planes` planes of `h x w` into zero-padded planes (`k / 2` texels on every side).
fn pad_planes<T: Copy + Default>(x: &[T], planes: usize, d: ConvDims) -> Vec<T> {
    let (p, wp) = (d.k / 2, d.padded_w());
    let mut out = vec![T::default(); planes * d.padded_len()];
    for (src, dst) in x
        .chunks_exact(d.h * d.w)
        .zip(out.chunks_exact_mut(d.padded_len()))
    {
        for (y, row) in src.chunks_exact(d.w).enumerate() {
            let start = (y + p) * wp + p;
            dst[start..start + d.w].copy_from_slice(row);
        }
    }
    out
}

fn conv_forward<T>(x: &[T], kernel: &[T], d: ConvDims) -> Vec<T>
where
    T: Copy + Default + Send + Sync + Mul<Output = T> + AddAssign,
{
    let (hw, kk, wp, wide) = (d.h * d.w, d.k * d.k, d.padded_w(), d.wide_len());
    let padded = pad_planes(x, d.b * d.ci, d);
    let mut out = vec![T::default(); d.b * d.co * hw];
    out.par_chunks_mut(hw).enumerate().for_each(|(bo, plane)| {
        let (bi, o) = (bo / d.co, bo % d.co);
        let mut acc = vec![T::default(); wide];
        for i in 0..d.ci {
            let src =
                &padded[(bi * d.ci + i) * d.padded_len()..(bi * d.ci + i + 1) * d.padded_len()];
            let taps = &kernel[(o * d.ci + i) * kk..(o * d.ci + i + 1) * kk];
            for (t, &wv) in taps.iter().enumerate() {
                let offset = (t / d.k) * wp + t % d.k;
                for (a, s) in acc.iter_mut().zip(&src[offset..offset + wide]) {
                    *a += wv * *s;
                }
            }
        }
        for (y, row) in plane.chunks_exact_mut(d.w).enumerate() {
            row.copy_from_slice(&acc[y * wp..y * wp + d.w]);
        }
    });
    out
}

fn conv_kernel_grad<T>(x: &[T], grad_out: &[T], d: ConvDims) -> Vec<T>
where
    T: Copy + Default + Send + Sync + Mul<Output = T> + AddAssign,
{
    let (hw, kk, wp, wide) = (d.h * d.w, d.k * d.k, d.padded_w(), d.wide_len());
    let padded = pad_planes(x, d.b * d.ci, d);
    // Output gradients in the wide layout, zero in the padding columns.
    let mut grad_wide = vec![T::default(); d.b * d.co * wide];
    for (src, dst) in grad_out
        .chunks_exact(hw)
        .zip(grad_wide.chunks_exact_mut(wide))
    {
        for (y, row) in src.chunks_exact(d.w).enumerate() {
            dst[y * wp..y * wp + d.w].copy_from_slice(row);
        }
    }
    let mut out = vec![T::default(); d.co * d.ci * kk];
    out.par_chunks_mut(kk).enumerate().for_each(|(oi, taps)| {
        let (o, i) = (oi / d.ci, oi % d.ci);
        for bi in 0..d.b {
            let g = &grad_wide[(bi * d.co + o) * wide..(bi * d.co + o + 1) * wide];
            let src =
                &padded[(bi * d.ci + i) * d.padded_len()..(bi * d.ci + i + 1) * d.padded_len()];
            for (t, tap) in taps.iter_mut().enumerate() {
                let offset = (t / d.k) * wp + t % d.k;
                let mut acc = T::default();
                for (gv, s) in g.iter().zip(&src[offset..offset + wide]) {
                    acc += *gv * *s;
                }
                *tap += acc;
            }
        }
    });
    out
}

fn dims_of(x: &Layout, kernel: &Layout) -> Result<ConvDims> {
    let (b, ci, h, w) = x.shape().dims4()?;
    let (co, kci, k, _) = kernel.shape().dims4()?;
    if kci != ci {
        candle_core::bail!("conv2d_same: input has {ci} channels but the kernel expects {kci}")
    }
    Ok(ConvDims { b, ci, co, h, w, k })
}

impl CustomOp2 for ConvSame {
    fn name(&self) -> &'static str {
        "conv2d-same"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims_of(l1, l2)?;
        let shape = Shape::from((d.b, d.co, d.h, d.w));
        let storage = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(conv_forward(
                contiguous::<f32>(s1, l1)?,
                contiguous::<f32>(s2, l2)?,
                d,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(conv_forward(
                contiguous::<f64>(s1, l1)?,
                contiguous::<f64>(s2, l2)?,
                d,
            )),
            _ => candle_core::bail!("conv2d_same supports f32 and f64 tensors of one dtype"),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Skipping untracked operands halves the cost of gradients w.r.t. a generator's latent.
        let grad_x = if x.track_op() {
            Some(conv2d_same_input_grad(grad_res, kernel)?)
        } else {
            None
        };
        let grad_kernel = if kernel.track_op() {
            let k = kernel.dim(3)?;
            Some(x.apply_op2(&grad_res.contiguous()?, ConvSameKernelGrad { k })?)
        } else {
            None
        };
        Ok((grad_x, grad_kernel))
    }
}

/// Kernel gradient of [`ConvSame`]: inputs are the forward input `[B, Cin, H, W]` and the output
/// gradient `[B, Cout, H, W]`; the result is `[Cout, Cin, k, k]`. Only first-order use is needed
/// (it appears when a gradient penalty is differentiated), so it has no backward of its own.
impl CustomOp2 for ConvSameKernelGrad {
    fn name(&self) -> &'static str {
        "conv2d-same-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, ci, h, w) = l1.shape().dims4()?;
        let (gb, co, gh, gw) = l2.shape().dims4()?;
        if (gb, gh, gw) != (b, h, w) {
            candle_core::bail!("conv2d_same kernel grad: mismatched input and gradient shapes")
        }
        let d = ConvDims {
            b,
            ci,
            co,
            h,
            w,
            k: self.k,
        };
        let shape = Shape::from((co, ci, self.k, self.k));
        let storage = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(conv_kernel_grad(
                contiguous::<f32>(s1, l1)?,
                contiguous::<f32>(s2, l2)?,
                d,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(conv_kernel_grad(
                contiguous::<f64>(s1, l1)?,
                contiguous::<f64>(s2, l2)?,
                d,
            )),
            _ => candle_core::bail!("conv2d_same supports f32 and f64 tensors of one dtype"),
        };
        Ok((storage, shape))
    }
}
