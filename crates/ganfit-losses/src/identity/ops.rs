//! CPU custom ops of the identity network: a convolution with constant weights (optionally
//! followed by a ReLU) whose backward pass computes only the input gradient, dlib's zero-padded
//! residual addition followed by a ReLU, and an overlapping max-pool with a backward pass
//! (candle's own max-pool has none for stride ≠ kernel). Fusing these ops saves the separate
//! elementwise passes, allocations and gradient accumulations candle would make for each.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
    bail,
};
use rayon::prelude::*;

use super::winograd::{Scratch, WinogradFilters, fit};

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

/// Calls `f` with the contiguous elements of a CPU tensor (weights held by an op), borrowed.
pub(super) fn with_cpu_slice<T: WithDType, R>(
    tensor: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(contiguous(cpu, layout, "weights")?)),
        other => bail!(
            "the identity network's ops run on the CPU, weights are on {:?}",
            other.device()
        ),
    }
}

/// Runs `f(state, index, chunk)` on every `size`-element chunk of `data`, `state` made by `init`
/// once per task. In parallel when the rayon pool has several threads; on the calling thread
/// when it has one, where handing each op's work to the single pool thread would only add a
/// wake-up per call (costly on a loaded machine).
pub(super) fn for_each_chunk<T: Send, S>(
    data: &mut [T],
    size: usize,
    init: impl Fn() -> S + Send + Sync,
    f: impl Fn(&mut S, usize, &mut [T]) + Send + Sync,
) {
    if rayon::current_num_threads() > 1 {
        data.par_chunks_mut(size)
            .enumerate()
            .for_each_init(init, |state, (i, chunk)| f(state, i, chunk));
    } else {
        let mut state = init();
        for (i, chunk) in data.chunks_mut(size).enumerate() {
            f(&mut state, i, chunk);
        }
    }
}

/// Output side of a window of `kernel` with `stride` and `padding` over `input` (floor rounding,
/// as dlib and cuDNN do).
fn pooled_len(input: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (input + 2 * padding).saturating_sub(kernel) / stride + 1
}

/// 2-D convolution (cross-correlation) with fixed weights and bias.
///
/// 3×3 "same" convolutions with stride 1 on planes of at least [`WINOGRAD_MIN_SIDE`] pixels use
/// Winograd's F(2×2, 3×3) algorithm both ways. Others: forward by im2col then one matrix
/// product per image; backward by the transposed product then col2im. Backward passes compute
/// the input gradient only: the weights are constants of the loss, so computing their gradient
/// (as candle's own convolution does) would only waste time.
#[derive(Debug, Clone)]
pub(crate) struct FixedConv {
    /// `[filters, channels·k·k]`.
    weight: Tensor,
    /// `[channels·k·k, filters]`, contiguous.
    weight_t: Tensor,
    /// `[filters]`.
    bias: Tensor,
    filters: usize,
    channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Whether a ReLU follows (fused: one pass over the output instead of three).
    relu: bool,
    /// Forward and input-gradient filters where the layer is a 3×3 stride-1 "same" one.
    winograd: Option<(WinogradFilters, WinogradFilters)>,
}

/// Smallest plane side on which the Winograd path beats im2col here. Measured per layer, one
/// thread, batch 2, forward / input gradient: 35²×32 ch 0.51 / 0.51 ms vs 0.71 / 0.62 ms;
/// 17²×64 0.42 / 0.42 vs 0.54 / 0.51; 8²×128 0.36 / 0.36 vs 0.44 / 0.42; but 4²×256
/// 0.66 / 0.66 vs 0.43 / 0.49.
const WINOGRAD_MIN_SIDE: usize = 8;

impl FixedConv {
    /// `weight` is `[filters, channels, k, k]`, `bias` `[filters]`.
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (filters, channels, kernel, kernel_w) = weight.dims4()?;
        if kernel != kernel_w {
            bail!("FixedConv needs square kernels, got {kernel}×{kernel_w}");
        }
        let winograd = if (kernel, stride, padding) == (3, 1, 1) {
            Some((
                WinogradFilters::forward(weight)?,
                WinogradFilters::input_gradient(weight)?,
            ))
        } else {
            None
        };
        let weight = weight
            .reshape((filters, channels * kernel * kernel))?
            .contiguous()?;
        let weight_t = weight.t()?.contiguous()?;
        Ok(Self {
            weight,
            weight_t,
            bias: bias.contiguous()?,
            filters,
            channels,
            kernel,
            stride,
            padding,
            relu: false,
            winograd,
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
            winograd: match &self.winograd {
                Some((forward, backward)) => {
                    Some((forward.to_dtype(dtype)?, backward.to_dtype(dtype)?))
                }
                None => None,
            },
            ..self.clone()
        })
    }

    fn out_len(&self, input: usize) -> usize {
        pooled_len(input, self.kernel, self.stride, self.padding)
    }

    /// The Winograd filters (forward, input gradient) to use on `h × w` planes, if any.
    fn winograd_for(&self, h: usize, w: usize) -> Option<&(WinogradFilters, WinogradFilters)> {
        self.winograd
            .as_ref()
            .filter(|_| h.min(w) >= WINOGRAD_MIN_SIDE)
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

    fn forward<T: Scratch>(&self, x: &[T], b: usize, h: usize, w: usize) -> Result<Vec<T>> {
        if b == 0 {
            return Ok(Vec::new());
        }
        with_cpu_slice(&self.bias, |bias: &[T]| match self.winograd_for(h, w) {
            Some((filters, _)) => filters.apply(x, None, (b, h, w), Some(bias), self.relu),
            None => self.forward_unfold(x, b, h, w, bias),
        })?
    }

    /// im2col of the batch into `[C·k·k, B·oh·ow]` (images side by side, so that one matrix
    /// product serves the whole batch and the weights are packed once), the product with the
    /// weights, then bias and ReLU while reordering to `[B, F, oh, ow]`.
    fn forward_unfold<T: Scratch>(
        &self,
        x: &[T],
        b: usize,
        h: usize,
        w: usize,
        bias: &[T],
    ) -> Result<Vec<T>> {
        let pixels = self.out_len(h) * self.out_len(w);
        let (taps, columns) = (self.kernel * self.kernel, b * pixels);
        let rows = self.channels * taps;
        let mut out = vec![T::zero(); b * self.filters * pixels];
        T::with_scratch(|cols, products| {
            let cols = fit(cols, rows * columns);
            // One chunk per channel: its k·k rows.
            for_each_chunk(
                cols,
                taps * columns,
                || (),
                |_, c, chunk| {
                    if self.padding > 0 {
                        // Taps in the padding are skipped below and must read as zeros.
                        chunk.fill(T::zero());
                    }
                    for image in 0..b {
                        let plane = &x[(image * self.channels + c) * h * w..][..h * w];
                        self.for_each_span(h, w, |tap, out_start, in_start, len| {
                            let at = tap * columns + image * pixels + out_start;
                            let dst = &mut chunk[at..at + len];
                            if self.stride == 1 {
                                dst.copy_from_slice(&plane[in_start..in_start + len]);
                            } else {
                                for (j, d) in dst.iter_mut().enumerate() {
                                    *d = plane[in_start + j * self.stride];
                                }
                            }
                        });
                    }
                },
            );
            let products = fit(products, self.filters * columns);
            with_cpu_slice(&self.weight, |weight: &[T]| {
                matmul(
                    (products, columns),
                    (weight, rows),
                    (cols, columns),
                    (self.filters, rows, columns),
                );
            })?;
            for_each_chunk(
                &mut out,
                pixels,
                || (),
                |_, plane, values| {
                    let (image, f) = (plane / self.filters, plane % self.filters);
                    let src = &products[f * columns + image * pixels..][..pixels];
                    for (v, &p) in values.iter_mut().zip(src) {
                        let y = p + bias[f];
                        *v = if self.relu && y < T::zero() {
                            T::zero()
                        } else {
                            y
                        };
                    }
                },
            );
            Ok::<(), candle_core::Error>(())
        })?;
        Ok(out)
    }

    /// The input gradient for output gradient `grad` `[B, F, oh, ow]`, gated by the output `res`
    /// when a ReLU is fused, on `h × w` input planes.
    fn input_grad<T: Scratch>(
        &self,
        grad: &[T],
        res: &[T],
        (b, h, w): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        if b == 0 {
            return Ok(Vec::new());
        }
        let gate = self.relu.then_some(res);
        if let Some((_, filters)) = self.winograd_for(h, w) {
            return filters.apply(grad, gate, (b, h, w), None, false);
        }
        let pixels = self.out_len(h) * self.out_len(w);
        let (taps, columns) = (self.kernel * self.kernel, b * pixels);
        let rows = self.channels * taps;
        T::with_scratch(|batched, cols| {
            // The (gated) gradient as [F, B·oh·ow], images side by side as in the forward pass.
            let batched = fit(batched, self.filters * columns);
            for_each_chunk(
                batched,
                columns,
                || (),
                |_, f, row| {
                    for image in 0..b {
                        let at = (image * self.filters + f) * pixels;
                        let dst = &mut row[image * pixels..][..pixels];
                        let src = &grad[at..at + pixels];
                        match gate {
                            Some(res) => {
                                for (d, (&g, &r)) in dst.iter_mut().zip(src.iter().zip(&res[at..]))
                                {
                                    *d = if r > T::zero() { g } else { T::zero() };
                                }
                            }
                            None => dst.copy_from_slice(src),
                        }
                    }
                },
            );
            let cols = fit(cols, rows * columns);
            with_cpu_slice(&self.weight_t, |weight_t: &[T]| {
                matmul(
                    (cols, columns),
                    (weight_t, self.filters),
                    (batched, columns),
                    (rows, self.filters, columns),
                );
            })?;
            Ok(self.col2im(cols, b, h, w))
        })
    }

    /// Sums `[C·k·k, B·oh·ow]` column gradients back onto the `[B, C, h, w]` input (col2im).
    fn col2im<T: WithDType>(&self, cols: &[T], b: usize, h: usize, w: usize) -> Vec<T> {
        let s = self.stride;
        let pixels = self.out_len(h) * self.out_len(w);
        let (taps, columns) = (self.kernel * self.kernel, b * pixels);
        let mut out = vec![T::zero(); b * self.channels * h * w];
        for_each_chunk(
            &mut out,
            h * w,
            || (),
            |_, plane_index, plane| {
                let (image, c) = (plane_index / self.channels, plane_index % self.channels);
                let chunk = &cols[c * taps * columns..][..taps * columns];
                self.for_each_span(h, w, |tap, out_start, in_start, len| {
                    let src = &chunk[tap * columns + image * pixels + out_start..][..len];
                    if s == 1 {
                        for (d, &g) in plane[in_start..in_start + len].iter_mut().zip(src) {
                            *d += g;
                        }
                    } else {
                        for (j, &g) in src.iter().enumerate() {
                            plane[in_start + j * s] += g;
                        }
                    }
                });
            },
        );
        out
    }
}

/// `dst = lhs · rhs` for row-major matrices given as (elements, row stride), with
/// `(m, k, n)` = (rows of `lhs`, columns of `lhs`, columns of `rhs`), on all of the rayon
/// pool's threads.
pub(super) fn matmul<T: WithDType>(
    dst: (&mut [T], usize),
    lhs: (&[T], usize),
    rhs: (&[T], usize),
    dims: (usize, usize, usize),
) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_checked(dst, lhs, rhs, dims, parallelism);
}

/// [`matmul`] on the calling thread only.
pub(super) fn matmul_serial<T: WithDType>(
    dst: (&mut [T], usize),
    lhs: (&[T], usize),
    rhs: (&[T], usize),
    dims: (usize, usize, usize),
) {
    gemm_checked(dst, lhs, rhs, dims, gemm::Parallelism::None);
}

/// The product by `gemm` with `parallelism`, after checking that the operands hold their shapes.
fn gemm_checked<T: WithDType>(
    (dst, dst_rs): (&mut [T], usize),
    (lhs, lhs_rs): (&[T], usize),
    (rhs, rhs_rs): (&[T], usize),
    (m, k, n): (usize, usize, usize),
    parallelism: gemm::Parallelism,
) {
    let fits = |len: usize, rows: usize, stride: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * stride + cols <= len
    };
    assert!(
        fits(dst.len(), m, dst_rs, n)
            && fits(lhs.len(), m, lhs_rs, k)
            && fits(rhs.len(), k, rhs_rs, n),
        "matmul operands smaller than their shapes"
    );
    // SAFETY: every element the product touches lies inside its slice (asserted above); the
    // slices do not overlap (one is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
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
        let shape = Shape::from((b, self.filters, self.out_len(h), self.out_len(w)));
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
        let op = ConvInputGrad {
            conv: self.clone(),
            height,
            width,
        };
        grad_res
            .contiguous()?
            .apply_op2_no_bwd(&res.contiguous()?, &op)
            .map(Some)
    }
}

/// The input gradient of a [`FixedConv`] on `height × width` inputs; arguments are the output
/// gradient and the output (whose sign gates the gradient when a ReLU is fused).
#[derive(Debug)]
struct ConvInputGrad {
    conv: FixedConv,
    height: usize,
    width: usize,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "fixed-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        res: &CpuStorage,
        res_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = grad_layout.shape().dims4()?.0;
        let dims = (b, self.height, self.width);
        let shape = Shape::from((b, self.conv.channels, self.height, self.width));
        let out = match (grad.dtype(), res.dtype()) {
            (DType::F32, DType::F32) => f32::to_cpu_storage_owned(self.conv.input_grad(
                contiguous::<f32>(grad, grad_layout, "conv grad")?,
                contiguous::<f32>(res, res_layout, "conv grad")?,
                dims,
            )?),
            (DType::F64, DType::F64) => f64::to_cpu_storage_owned(self.conv.input_grad(
                contiguous::<f64>(grad, grad_layout, "conv grad")?,
                contiguous::<f64>(res, res_layout, "conv grad")?,
                dims,
            )?),
            other => bail!("fixed-conv2d-input-grad supports f32 and f64, not {other:?}"),
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
        const CHUNK: usize = 1 << 14;
        let mut out = vec![T::zero(); grad.len()];
        for_each_chunk(
            &mut out,
            CHUNK,
            || (),
            |_, i, dst| {
                let (grad, res) = (&grad[i * CHUNK..], &res[i * CHUNK..]);
                for (d, (&g, &r)) in dst.iter_mut().zip(grad.iter().zip(res)) {
                    *d = if r > T::zero() { g } else { T::zero() };
                }
            },
        );
        out
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
        let relu = |v: T| if v < T::zero() { T::zero() } else { v };
        if a.1 == b.1 {
            // Every block but the down blocks: one pass, no padding.
            const CHUNK: usize = 1 << 14;
            let mut out = vec![T::zero(); a.0.len()];
            for_each_chunk(
                &mut out,
                CHUNK,
                || (),
                |_, i, dst| {
                    let (a, b) = (&a.0[i * CHUNK..], &b.0[i * CHUNK..]);
                    for (d, (&x, &y)) in dst.iter_mut().zip(a.iter().zip(b)) {
                        *d = relu(x + y);
                    }
                },
            );
            return out;
        }
        let mut out = vec![T::zero(); out_dims.iter().product()];
        for_each_chunk(
            &mut out,
            height * width,
            || (),
            |_, plane_idx, plane| {
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
                    *v = relu(*v);
                }
            },
        );
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

    /// Index in the plane of the first maximum (in row-major window order) of the window at
    /// (`oy`, `ox`). Branch-free: on ReLU outputs the winner is unpredictable, and a
    /// mispredicted branch per tap costs more than the comparisons.
    fn argmax<T: WithDType>(&self, plane: &[T], w: usize, oy: usize, ox: usize) -> usize {
        let (k, s) = (self.kernel, self.stride);
        let first = oy * s * w + ox * s;
        let (mut best, mut at) = (plane[first], first);
        for ky in 0..k {
            let start = first + ky * w;
            for (kx, &v) in plane[start..start + k].iter().enumerate() {
                let better = v > best;
                best = if better { v } else { best };
                at = if better { start + kx } else { at };
            }
        }
        at
    }

    /// The window maxima, separably: the maximum over the window's rows for every column of
    /// an output row, then over the columns of each window (loops without branches that the
    /// compiler vectorises).
    fn forward<T: WithDType>(&self, x: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
        let (oh, ow, k, s) = (self.out_len(h), self.out_len(w), self.kernel, self.stride);
        let max = |a: T, b: T| if b > a { b } else { a };
        let mut out = vec![T::zero(); planes * oh * ow];
        for_each_chunk(
            &mut out,
            oh * ow,
            || vec![T::zero(); w],
            |columns, p, dst| {
                let plane = &x[p * h * w..][..h * w];
                for (oy, dst) in dst.chunks_mut(ow).enumerate() {
                    let rows = &plane[oy * s * w..][..k * w];
                    columns.copy_from_slice(&rows[..w]);
                    for row in rows.chunks(w).skip(1) {
                        for (c, &v) in columns.iter_mut().zip(row) {
                            *c = max(*c, v);
                        }
                    }
                    for (ox, d) in dst.iter_mut().enumerate() {
                        *d = columns[ox * s..ox * s + k]
                            .iter()
                            .fold(columns[ox * s], |a, &b| max(a, b));
                    }
                }
            },
        );
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
        for_each_chunk(
            &mut out,
            h * w,
            || (),
            |_, p, dst| {
                let (plane, g) = (&x[p * h * w..][..h * w], &grad[p * oh * ow..][..oh * ow]);
                for oy in 0..oh {
                    for ox in 0..ow {
                        dst[self.argmax(plane, w, oy, ox)] += g[oy * ow + ox];
                    }
                }
            },
        );
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
        // Stride 1, padding 1 takes the Winograd path from 8×8 on (odd and even sides) and
        // im2col below.
        for (stride, padding, size) in [
            (1, 1, 11),
            (1, 1, 8),
            (1, 1, 7),
            (1, 1, 1),
            (2, 0, 9),
            (2, 0, 8),
            (2, 1, 6),
        ] {
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
        for (stride, padding, size) in [(1, 1, 9), (1, 1, 7), (2, 0, 7)] {
            let conv = FixedConv::new(&weight, &bias, stride, padding)?;
            let x = seeded_tensor(&[2, 2, size, size], 6)?;
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
    fn residual_relu_of_equal_shapes_is_relu_of_the_sum_with_exact_gradients() -> Result<()> {
        let a = seeded_tensor(&[2, 3, 4, 5], 13)?;
        let b = seeded_tensor(&[2, 3, 4, 5], 14)?;
        let out = a.apply_op2(&b, ResidualRelu)?;
        let expected = (&a + &b)?.relu()?;
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
        // Winograd (8×8) and im2col (5×5) paths.
        for size in [8, 5] {
            let x = seeded_tensor(&[1, 2, size, size], 12)?;
            let y = x.apply_op1(conv.clone())?;
            assert!(y.min_all()?.to_scalar::<f64>()? >= 0.0);
            check_input_gradient(&x, |x| x.apply_op1(conv.clone()), 1e-6)?;
        }
        Ok(())
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
