//! CPU custom ops of the identity network: a convolution with constant weights (optionally
//! followed by a ReLU) whose backward pass computes only the input gradient, dlib's zero-padded
//! residual addition followed by a ReLU, and an overlapping max-pool with a backward pass
//! (candle's own max-pool has none for stride ≠ kernel). Fusing these ops saves the separate
//! elementwise passes, allocations and gradient accumulations candle would make for each.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, WithDType, bail,
};
use rayon::prelude::*;

/// The contiguous elements of a CPU tensor given to a custom op.
fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// Output side of a window of `kernel` with `stride` and `padding` over `input` (floor rounding,
/// as dlib and cuDNN do).
fn pooled_len(input: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (input + 2 * padding).saturating_sub(kernel) / stride + 1
}

/// 2-D convolution (cross-correlation) with fixed weights and bias.
///
/// Forward: im2col then one matrix product per image. Backward: the transposed product then
/// col2im, for the input only; the weights are constants of the loss, so computing their
/// gradient (as candle's own convolution does) would only waste time.
#[derive(Debug, Clone)]
pub(crate) struct FixedConv {
    /// `[filters, channels·k·k]`.
    weight: Tensor,
    /// `[channels·k·k, filters]`, contiguous.
    weight_t: Tensor,
    /// `[filters, 1]`.
    bias: Tensor,
    channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Whether a ReLU follows (fused: one pass over the output instead of three).
    relu: bool,
}

impl FixedConv {
    /// `weight` is `[filters, channels, k, k]`, `bias` `[filters]`.
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (filters, channels, kernel, kernel_w) = weight.dims4()?;
        if kernel != kernel_w {
            bail!("FixedConv needs square kernels, got {kernel}×{kernel_w}");
        }
        let weight = weight
            .reshape((filters, channels * kernel * kernel))?
            .contiguous()?;
        let weight_t = weight.t()?.contiguous()?;
        let bias = bias.reshape((filters, 1))?.contiguous()?;
        Ok(Self {
            weight,
            weight_t,
            bias,
            channels,
            kernel,
            stride,
            padding,
            relu: false,
        })
    }

    /// The same convolution followed by a ReLU.
    pub fn with_relu(self) -> Self {
        Self { relu: true, ..self }
    }

    /// The same convolution computing in `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_dtype(dtype)?,
            weight_t: self.weight_t.to_dtype(dtype)?,
            bias: self.bias.to_dtype(dtype)?,
            ..self.clone()
        })
    }

    fn out_len(&self, input: usize) -> usize {
        pooled_len(input, self.kernel, self.stride, self.padding)
    }

    /// Calls `f(row, out_start, in_start, len)` for every run of output pixels of one image row
    /// whose kernel tap `row = ky·k + kx` falls inside an `h`×`w` plane: output pixels
    /// `out_start..out_start + len` (flat, within the row's `oh·ow` block) read input pixels
    /// `in_start, in_start + stride, …` (flat within the plane). Taps in the padding are skipped.
    fn for_each_span(&self, h: usize, w: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (oh, ow, k, s, p) = (
            self.out_len(h),
            self.out_len(w),
            self.kernel,
            self.stride,
            self.padding,
        );
        for ky in 0..k {
            for kx in 0..k {
                // Output columns whose input column ox·s + kx − p lies in [0, w).
                let first = p.saturating_sub(kx).div_ceil(s);
                let end = ((w + p).saturating_sub(kx).div_ceil(s)).min(ow);
                if first >= end {
                    continue;
                }
                for oy in 0..oh {
                    let iy = oy * s + ky;
                    if iy < p || iy - p >= h {
                        continue;
                    }
                    let in_start = (iy - p) * w + first * s + kx - p;
                    f(ky * k + kx, oy * ow + first, in_start, end - first);
                }
            }
        }
    }

    fn forward<T: WithDType>(&self, x: &[T], b: usize, h: usize, w: usize) -> Result<Vec<T>> {
        let (oh, ow) = (self.out_len(h), self.out_len(w));
        let rows = self.channels * self.kernel * self.kernel;
        let mut cols = vec![T::zero(); b * rows * oh * ow];
        let k = self.kernel;
        // One chunk per (image, channel): its k·k rows of the column matrix.
        cols.par_chunks_mut(k * k * oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(chunk, plane)| {
                self.for_each_span(h, w, |row, out_start, in_start, len| {
                    let dst = &mut chunk[row * oh * ow + out_start..][..len];
                    if self.stride == 1 {
                        dst.copy_from_slice(&plane[in_start..in_start + len]);
                    } else {
                        for (j, d) in dst.iter_mut().enumerate() {
                            *d = plane[in_start + j * self.stride];
                        }
                    }
                });
            });
        let cols = Tensor::from_vec(cols, (b, rows, oh * ow), &Device::Cpu)?;
        let weight = self.weight.broadcast_left(b)?;
        let mut out = weight.matmul(&cols)?.flatten_all()?.to_vec1::<T>()?;
        let bias = self.bias.flatten_all()?.to_vec1::<T>()?;
        out.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each(|(plane, values)| {
                let bias = bias[plane % bias.len()];
                for v in values {
                    *v += bias;
                    if self.relu && *v < T::zero() {
                        *v = T::zero();
                    }
                }
            });
        Ok(out)
    }
}

impl CustomOp1 for FixedConv {
    fn name(&self) -> &'static str {
        "fixed-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        if c != self.channels || self.weight.dtype() != storage.dtype() {
            bail!(
                "fixed-conv2d: input has {c} channels of {:?}, the weights expect {} of {:?}",
                storage.dtype(),
                self.channels,
                self.weight.dtype()
            );
        }
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            bail!(
                "fixed-conv2d: input {h}×{w} is smaller than the {0}×{0} kernel",
                self.kernel
            );
        }
        let filters = self.weight.dim(0)?;
        let shape = Shape::from((b, filters, self.out_len(h), self.out_len(w)));
        let out = match storage.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(self.forward(
                contiguous(storage, layout, "conv")?,
                b,
                h,
                w,
            )?),
            DType::F64 => f64::to_cpu_storage_owned(self.forward(
                contiguous(storage, layout, "conv")?,
                b,
                h,
                w,
            )?),
            other => bail!("fixed-conv2d supports f32 and f64, not {other:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, height, width) = arg.dims4()?;
        let grad = if self.relu {
            relu_grad(grad_res, res)?
        } else {
            grad_res.contiguous()?
        };
        let (b, filters, oh, ow) = grad.dims4()?;
        let cols =
            self.weight_t
                .broadcast_left(b)?
                .matmul(&grad.reshape((b, filters, oh * ow))?)?;
        let scatter = Col2Im {
            conv: self.clone(),
            height,
            width,
        };
        cols.apply_op1_no_bwd(&scatter).map(Some)
    }
}

/// The scatter half of [`FixedConv`]'s input gradient: sums the `[B, C·k·k, oh·ow]` column
/// gradients `Wᵀ · grad` back onto the `[B, C, height, width]` input (col2im).
#[derive(Debug)]
struct Col2Im {
    conv: FixedConv,
    height: usize,
    width: usize,
}

impl Col2Im {
    fn scatter<T: WithDType>(&self, cols: &[T], planes: usize) -> Vec<T> {
        let conv = &self.conv;
        let (h, w, k) = (self.height, self.width, conv.kernel);
        let (oh, ow) = (conv.out_len(h), conv.out_len(w));
        let mut out = vec![T::zero(); planes * h * w];
        out.par_chunks_mut(h * w)
            .zip(cols.par_chunks(k * k * oh * ow))
            .for_each(|(plane, chunk)| {
                conv.for_each_span(h, w, |row, out_start, in_start, len| {
                    let src = &chunk[row * oh * ow + out_start..][..len];
                    if conv.stride == 1 {
                        for (d, &g) in plane[in_start..in_start + len].iter_mut().zip(src) {
                            *d += g;
                        }
                    } else {
                        for (j, &g) in src.iter().enumerate() {
                            plane[in_start + j * conv.stride] += g;
                        }
                    }
                });
            });
        out
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let b = layout.shape().dims3()?.0;
        let planes = b * self.conv.channels;
        let shape = Shape::from((b, self.conv.channels, self.height, self.width));
        let out = match storage.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(
                self.scatter(contiguous::<f32>(storage, layout, "col2im")?, planes),
            ),
            DType::F64 => f64::to_cpu_storage_owned(
                self.scatter(contiguous::<f64>(storage, layout, "col2im")?, planes),
            ),
            other => bail!("col2im supports f32 and f64, not {other:?}"),
        };
        Ok((out, shape))
    }
}

/// `grad` where the ReLU output `res` is positive, else 0.
fn relu_grad(grad: &Tensor, res: &Tensor) -> Result<Tensor> {
    grad.contiguous()?
        .apply_op2_no_bwd(&res.contiguous()?, &ReluGrad)
}

#[derive(Debug)]
struct ReluGrad;

impl ReluGrad {
    fn mask<T: WithDType>(grad: &[T], res: &[T]) -> Vec<T> {
        grad.par_iter()
            .zip(res)
            .map(|(&g, &r)| if r > T::zero() { g } else { T::zero() })
            .collect()
    }
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        res: &CpuStorage,
        res_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (grad.dtype(), res.dtype()) {
            (DType::F32, DType::F32) => f32::to_cpu_storage_owned(Self::mask(
                contiguous::<f32>(grad, grad_layout, "relu grad")?,
                contiguous::<f32>(res, res_layout, "relu grad")?,
            )),
            (DType::F64, DType::F64) => f64::to_cpu_storage_owned(Self::mask(
                contiguous::<f64>(grad, grad_layout, "relu grad")?,
                contiguous::<f64>(res, res_layout, "relu grad")?,
            )),
            other => bail!("relu-grad supports f32 and f64, not {other:?}"),
        };
        Ok((out, grad_layout.shape().clone()))
    }
}

/// `relu(a + b)` for `[B, C, H, W]` tensors of the same batch, where the smaller tensor is
/// zero-padded at the end of the channel and spatial dimensions: dlib's `add_prev` (which aligns
/// tensors at their first element) followed by its ReLU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResidualRelu;

impl ResidualRelu {
    fn forward<T: WithDType>(
        a: (&[T], [usize; 4]),
        b: (&[T], [usize; 4]),
        out_dims: [usize; 4],
    ) -> Vec<T> {
        let [_, channels, height, width] = out_dims;
        let mut out = vec![T::zero(); out_dims.iter().product()];
        out.par_chunks_mut(height * width)
            .enumerate()
            .for_each(|(plane_idx, plane)| {
                let (n, c) = (plane_idx / channels, plane_idx % channels);
                for (src, [_, sc, sh, sw]) in [a, b] {
                    if c >= sc {
                        continue;
                    }
                    let src = &src[(n * sc + c) * sh * sw..][..sh * sw];
                    for y in 0..sh {
                        let dst = &mut plane[y * width..y * width + sw];
                        for (d, &v) in dst.iter_mut().zip(&src[y * sw..(y + 1) * sw]) {
                            *d += v;
                        }
                    }
                }
                for v in plane {
                    if *v < T::zero() {
                        *v = T::zero();
                    }
                }
            });
        out
    }
}

impl CustomOp2 for ResidualRelu {
    fn name(&self) -> &'static str {
        "residual-add-relu"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ad, bd) = (a_layout.shape().dims4()?, b_layout.shape().dims4()?);
        let (ad, bd) = ([ad.0, ad.1, ad.2, ad.3], [bd.0, bd.1, bd.2, bd.3]);
        if ad[0] != bd[0] {
            bail!(
                "residual-add-relu: batch sizes {} and {} differ",
                ad[0],
                bd[0]
            );
        }
        let out_dims: [usize; 4] = std::array::from_fn(|i| ad[i].max(bd[i]));
        let out = match (a.dtype(), b.dtype()) {
            (DType::F32, DType::F32) => f32::to_cpu_storage_owned(Self::forward(
                (contiguous::<f32>(a, a_layout, "residual")?, ad),
                (contiguous::<f32>(b, b_layout, "residual")?, bd),
                out_dims,
            )),
            (DType::F64, DType::F64) => f64::to_cpu_storage_owned(Self::forward(
                (contiguous::<f64>(a, a_layout, "residual")?, ad),
                (contiguous::<f64>(b, b_layout, "residual")?, bd),
                out_dims,
            )),
            other => bail!("residual-add-relu supports f32 and f64, not {other:?}"),
        };
        Ok((out, Shape::from(out_dims.to_vec())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = relu_grad(grad_res, res)?;
        let crop = |t: &Tensor| -> Result<Tensor> {
            let (_, c, h, w) = t.dims4()?;
            grad.narrow(1, 0, c)?.narrow(2, 0, h)?.narrow(3, 0, w)
        };
        Ok((Some(crop(a)?), Some(crop(b)?)))
    }
}

/// Max-pool over `kernel`×`kernel` windows with `stride`, no padding, floor rounding. The
/// gradient goes to the first maximum of each window, as in dlib and PyTorch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
}

impl MaxPool {
    fn out_len(&self, input: usize) -> usize {
        pooled_len(input, self.kernel, self.stride, 0)
    }

    /// Index in the plane of the first maximum of the window at (`oy`, `ox`).
    fn argmax<T: WithDType>(&self, plane: &[T], w: usize, oy: usize, ox: usize) -> usize {
        let mut best = (oy * self.stride) * w + ox * self.stride;
        for ky in 0..self.kernel {
            for kx in 0..self.kernel {
                let idx = (oy * self.stride + ky) * w + ox * self.stride + kx;
                if plane[idx] > plane[best] {
                    best = idx;
                }
            }
        }
        best
    }

    fn forward<T: WithDType>(&self, x: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
        let (oh, ow) = (self.out_len(h), self.out_len(w));
        let mut out = vec![T::zero(); planes * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, plane)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        dst[oy * ow + ox] = plane[self.argmax(plane, w, oy, ox)];
                    }
                }
            });
        out
    }

    fn backward<T: WithDType>(
        &self,
        x: &[T],
        grad: &[T],
        planes: usize,
        h: usize,
        w: usize,
    ) -> Vec<T> {
        let (oh, ow) = (self.out_len(h), self.out_len(w));
        let mut out = vec![T::zero(); planes * h * w];
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(grad.par_chunks(oh * ow)))
            .for_each(|(dst, (plane, g))| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        dst[self.argmax(plane, w, oy, ox)] += g[oy * ow + ox];
                    }
                }
            });
        out
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        if h < self.kernel || w < self.kernel {
            bail!(
                "max-pool2d: input {h}×{w} is smaller than the {0}×{0} window",
                self.kernel
            );
        }
        let shape = Shape::from((b, c, self.out_len(h), self.out_len(w)));
        let out = match storage.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(self.forward(
                contiguous::<f32>(storage, layout, "max-pool")?,
                b * c,
                h,
                w,
            )),
            DType::F64 => f64::to_cpu_storage_owned(self.forward(
                contiguous::<f64>(storage, layout, "max-pool")?,
                b * c,
                h,
                w,
            )),
            other => bail!("max-pool2d supports f32 and f64, not {other:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        arg.contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPoolGrad(*self))
            .map(Some)
    }
}

/// Input gradient of [`MaxPool`]: arguments are the pool's input and its output gradient.
#[derive(Debug)]
struct MaxPoolGrad(MaxPool);

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = x_layout.shape().dims4()?;
        let out = match (x.dtype(), grad.dtype()) {
            (DType::F32, DType::F32) => f32::to_cpu_storage_owned(self.0.backward(
                contiguous::<f32>(x, x_layout, "max-pool grad")?,
                contiguous::<f32>(grad, grad_layout, "max-pool grad")?,
                b * c,
                h,
                w,
            )),
            (DType::F64, DType::F64) => f64::to_cpu_storage_owned(self.0.backward(
                contiguous::<f64>(x, x_layout, "max-pool grad")?,
                contiguous::<f64>(grad, grad_layout, "max-pool grad")?,
                b * c,
                h,
                w,
            )),
            other => bail!("max-pool2d-grad supports f32 and f64, not {other:?}"),
        };
        Ok((out, x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_gradient, seeded_tensor};

    #[test]
    fn fixed_conv_matches_candle_conv2d() -> Result<()> {
        for (stride, padding, size) in [(1, 1, 7), (2, 0, 9), (2, 0, 8), (2, 1, 6)] {
            let x = seeded_tensor(&[2, 3, size, size], 1)?;
            let weight = seeded_tensor(&[4, 3, 3, 3], 2)?;
            let bias = seeded_tensor(&[4], 3)?;
            let ours = x.apply_op1(FixedConv::new(&weight, &bias, stride, padding)?)?;
            let reference = x
                .conv2d(&weight, padding, stride, 1, 1)?
                .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
            let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "stride {stride} padding {padding}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn fixed_conv_input_gradient_matches_finite_differences() -> Result<()> {
        let weight = seeded_tensor(&[3, 2, 3, 3], 4)?;
        let bias = seeded_tensor(&[3], 5)?;
        for (stride, padding) in [(1, 1), (2, 0)] {
            let conv = FixedConv::new(&weight, &bias, stride, padding)?;
            let x = seeded_tensor(&[2, 2, 7, 7], 6)?;
            check_input_gradient(&x, |x| x.apply_op1(conv.clone()), 1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn residual_relu_pads_at_the_end_and_has_exact_gradients() -> Result<()> {
        let a = seeded_tensor(&[2, 2, 2, 2], 8)?;
        let b = seeded_tensor(&[2, 1, 3, 1], 9)?;
        let out = a.apply_op2(&b, ResidualRelu)?;
        assert_eq!(out.dims(), &[2, 2, 3, 2]);
        let pad = |t: &Tensor| -> Result<Tensor> {
            let (_, c, h, w) = t.dims4()?;
            t.pad_with_zeros(1, 0, 2 - c)?
                .pad_with_zeros(2, 0, 3 - h)?
                .pad_with_zeros(3, 0, 2 - w)
        };
        let expected = (pad(&a)? + pad(&b)?)?.relu()?;
        let diff = (out - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-15, "{diff}");
        check_input_gradient(&a, |a| a.apply_op2(&b, ResidualRelu), 1e-6)?;
        check_input_gradient(&b, |b| a.apply_op2(b, ResidualRelu), 1e-6)
    }

    #[test]
    fn fused_conv_relu_gradient_matches_finite_differences() -> Result<()> {
        let conv = FixedConv::new(
            &seeded_tensor(&[3, 2, 3, 3], 10)?,
            &seeded_tensor(&[3], 11)?,
            1,
            1,
        )?
        .with_relu();
        let x = seeded_tensor(&[1, 2, 5, 5], 12)?;
        let y = x.apply_op1(conv.clone())?;
        assert!(y.min_all()?.to_scalar::<f64>()? >= 0.0);
        check_input_gradient(&x, |x| x.apply_op1(conv.clone()), 1e-6)
    }

    #[test]
    fn max_pool_matches_brute_force_and_its_gradient_finite_differences() -> Result<()> {
        let pool = MaxPool {
            kernel: 3,
            stride: 2,
        };
        let x = seeded_tensor(&[1, 2, 8, 8], 7)?;
        let y = x.apply_op1(pool)?;
        assert_eq!(y.dims(), &[1, 2, 3, 3]);
        let x4: Vec<Vec<Vec<f64>>> = x.squeeze(0)?.to_vec3()?;
        let y4: Vec<Vec<Vec<f64>>> = y.squeeze(0)?.to_vec3()?;
        for c in 0..2 {
            for oy in 0..3 {
                for ox in 0..3 {
                    let expected = (0..3)
                        .flat_map(|ky| (0..3).map(move |kx| (ky, kx)))
                        .map(|(ky, kx)| x4[c][oy * 2 + ky][ox * 2 + kx])
                        .fold(f64::NEG_INFINITY, f64::max);
                    assert_eq!(y4[c][oy][ox], expected);
                }
            }
        }
        check_input_gradient(&x, |x| x.apply_op1(pool), 1e-6)
    }
}
