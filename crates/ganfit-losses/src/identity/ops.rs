//! Single-image CPU kernels of the identity network's layers: a convolution with constant
//! weights whose epilogue fuses the bias, a residual addition and a ReLU, its input gradient
//! (the weights are constants of the losses, so their gradient is never needed), and an
//! overlapping max-pool with its gradient. Each kernel runs on the calling thread: the network
//! parallelises over the images of a batch (see `stages`), so that the threads meet once per
//! stage instead of once per layer.

use candle_core::{Device, Result, Tensor, WithDType};

use super::winograd::{Scratch, WinogradFilters, fit};

/// What a convolution does to each output value after the correlation: `relu(v + bias[f] +
/// residual)`, each part optional.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Epilogue<'a, T> {
    /// One value per output plane.
    pub bias: Option<&'a [T]>,
    /// A tensor of the output's shape to add.
    pub residual: Option<&'a [T]>,
    pub relu: bool,
}

impl<T: WithDType> Epilogue<'_, T> {
    /// Nothing: the plain correlation.
    pub const NONE: Self = Self {
        bias: None,
        residual: None,
        relu: false,
    };

    /// Finishes `values`, a run of output plane `f` starting at flat index `at` of the output.
    #[inline(always)]
    pub fn finish(&self, f: usize, at: usize, values: &mut [T]) {
        let offset = self.bias.map_or(T::zero(), |bias| bias[f]);
        let relu = self.relu;
        let act = |y: T| if relu && y < T::zero() { T::zero() } else { y };
        match self.residual {
            Some(residual) => {
                for (v, &r) in values.iter_mut().zip(&residual[at..]) {
                    *v = act(*v + offset + r);
                }
            }
            None if self.bias.is_some() || relu => {
                for v in values.iter_mut() {
                    *v = act(*v + offset);
                }
            }
            None => {}
        }
    }
}

/// Output side of a window of `kernel` with `stride` and `padding` over `input` (floor rounding,
/// as dlib and cuDNN do).
pub(crate) fn pooled_len(input: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (input + 2 * padding).saturating_sub(kernel) / stride + 1
}

/// Elements of the im2col columns handled per matrix product: bands of output rows this size
/// keep the columns in the L2 cache (the stem's whole columns would be 3 MB per image).
const BAND_ELEMENTS: usize = 1 << 16;

/// 2-D convolution (cross-correlation) of one image with fixed weights and bias.
///
/// 3×3 "same" convolutions with stride 1 on planes of at least [`WINOGRAD_MIN_SIDE`] pixels use
/// Winograd's F(2×2, 3×3) algorithm both ways. Others: forward by im2col then a matrix product,
/// backward by the transposed product then col2im, in bands of output rows.
#[derive(Debug, Clone)]
pub(crate) struct FixedConv<T> {
    /// `[filters, channels·k·k]`.
    weight: Vec<T>,
    /// `[channels·k·k, filters]`.
    weight_t: Vec<T>,
    /// `[filters]`.
    bias: Vec<T>,
    filters: usize,
    channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Forward and input-gradient filters where the layer is a 3×3 stride-1 "same" one.
    winograd: Option<(WinogradFilters<T>, WinogradFilters<T>)>,
}

/// Smallest plane side on which the Winograd path beats im2col here. Measured per layer (when
/// layers ran on the whole batch), one thread, batch 2, forward / input gradient: 35²×32 ch 0.51 / 0.51 ms vs 0.71 / 0.62 ms;
/// 17²×64 0.42 / 0.42 vs 0.54 / 0.51; 8²×128 0.36 / 0.36 vs 0.44 / 0.42; but 4²×256
/// 0.66 / 0.66 vs 0.43 / 0.49.
const WINOGRAD_MIN_SIDE: usize = 8;

impl<T: Scratch> FixedConv<T> {
    /// `weight` is `[filters, channels, k, k]` (`dims` = (filters, channels, k)), `bias`
    /// `[filters]`.
    pub fn new(
        weight: Vec<T>,
        bias: Vec<T>,
        (filters, channels, kernel): (usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Self {
        let rows = channels * kernel * kernel;
        debug_assert_eq!(weight.len(), filters * rows);
        let winograd = ((kernel, stride, padding) == (3, 1, 1)).then(|| {
            (
                WinogradFilters::forward(&weight, filters, channels),
                WinogradFilters::input_gradient(&weight, filters, channels),
            )
        });
        let mut weight_t = vec![T::zero(); weight.len()];
        for (f, row) in weight.chunks(rows).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                weight_t[r * filters + f] = v;
            }
        }
        Self {
            weight,
            weight_t,
            bias,
            filters,
            channels,
            kernel,
            stride,
            padding,
            winograd,
        }
    }

    /// The weights `[filters, channels, k, k]` and bias `[1, filters, 1, 1]` as tensors on
    /// `device`, with the stride and padding: the layer for candle's own `conv2d`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor, usize, usize)> {
        let (f, c, k) = (self.filters, self.channels, self.kernel);
        let weight = Tensor::from_slice(&self.weight, (f, c, k, k), device)?;
        let bias = Tensor::from_slice(&self.bias, (1, f, 1, 1), device)?;
        Ok((weight, bias, self.stride, self.padding))
    }

    /// The same convolution in another element type.
    pub fn cast<U: Scratch>(&self) -> FixedConv<U> {
        let cast = |v: &[T]| {
            v.iter()
                .map(|x| U::from_f64(x.to_f64()))
                .collect::<Vec<U>>()
        };
        FixedConv::new(
            cast(&self.weight),
            cast(&self.bias),
            (self.filters, self.channels, self.kernel),
            self.stride,
            self.padding,
        )
    }

    /// Output planes.
    pub fn filters(&self) -> usize {
        self.filters
    }

    /// Input planes.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Output plane size of `h × w` inputs.
    pub fn out_dims(&self, h: usize, w: usize) -> (usize, usize) {
        (
            pooled_len(h, self.kernel, self.stride, self.padding),
            pooled_len(w, self.kernel, self.stride, self.padding),
        )
    }

    /// Whether `h × w` inputs are large enough for the kernel.
    pub fn fits(&self, h: usize, w: usize) -> bool {
        h + 2 * self.padding >= self.kernel && w + 2 * self.padding >= self.kernel
    }

    /// The Winograd filters (forward, input gradient) to use on `h × w` planes, if any.
    fn winograd_for(
        &self,
        h: usize,
        w: usize,
    ) -> Option<&(WinogradFilters<T>, WinogradFilters<T>)> {
        self.winograd
            .as_ref()
            .filter(|_| h.min(w) >= WINOGRAD_MIN_SIDE)
    }

    /// `out` `[F, oh, ow]` = the correlation of `x` `[C, h, w]` plus the bias, finished by a
    /// residual addition (`residual`, `[F, oh, ow]`) and a ReLU (`relu`).
    pub fn forward(
        &self,
        x: &[T],
        (h, w): (usize, usize),
        residual: Option<&[T]>,
        relu: bool,
        out: &mut [T],
    ) {
        let epilogue = Epilogue {
            bias: Some(&self.bias),
            residual,
            relu,
        };
        if let Some((filters, _)) = self.winograd_for(h, w) {
            return filters.apply(x, None, (h, w), &epilogue, out);
        }
        self.forward_unfold(x, (h, w), &epilogue, out);
    }

    /// im2col of a band of output rows into `[C·k·k, band pixels]`, the product with the
    /// weights straight into the output, then the epilogue, band after band.
    fn forward_unfold(
        &self,
        x: &[T],
        (h, w): (usize, usize),
        epilogue: &Epilogue<'_, T>,
        out: &mut [T],
    ) {
        let (oh, ow) = self.out_dims(h, w);
        let pixels = oh * ow;
        let rows = self.channels * self.kernel * self.kernel;
        T::with_scratch(|cols, _| {
            for band in self.bands(h, w) {
                let width = band.len() * ow;
                let cols = fit(cols, rows * width);
                if self.padding > 0 {
                    // Taps in the padding are skipped below and must read as zeros.
                    cols.fill(T::zero());
                }
                for c in 0..self.channels {
                    let plane = &x[c * h * w..][..h * w];
                    let chunk = &mut cols[c * self.kernel * self.kernel * width..];
                    self.for_each_span((h, w), band.clone(), |tap, out_start, in_start, len| {
                        let dst = &mut chunk[tap * width + out_start..][..len];
                        if self.stride == 1 {
                            dst.copy_from_slice(&plane[in_start..in_start + len]);
                        } else {
                            for (j, d) in dst.iter_mut().enumerate() {
                                *d = plane[in_start + j * self.stride];
                            }
                        }
                    });
                }
                let first = band.start * ow;
                matmul(
                    (&mut out[first..], pixels),
                    (&self.weight, rows),
                    (cols, width),
                    (self.filters, rows, width),
                );
                for f in 0..self.filters {
                    let at = f * pixels + first;
                    epilogue.finish(f, at, &mut out[at..at + width]);
                }
            }
        });
    }

    /// `out` `[C, h, w]` = the input gradient for the output gradient `grad` `[F, oh, ow]`
    /// (zeroed where `gate`, a ReLU's output, is not positive), plus `residual` `[C, h, w]`.
    pub fn input_grad(
        &self,
        grad: &[T],
        gate: Option<&[T]>,
        (h, w): (usize, usize),
        residual: Option<&[T]>,
        out: &mut [T],
    ) {
        if let Some((_, filters)) = self.winograd_for(h, w) {
            let epilogue = Epilogue {
                residual,
                ..Epilogue::NONE
            };
            return filters.apply(grad, gate, (h, w), &epilogue, out);
        }
        match residual {
            Some(residual) => out.copy_from_slice(residual),
            None => out.fill(T::zero()),
        }
        let (oh, ow) = self.out_dims(h, w);
        let pixels = oh * ow;
        let (taps, rows) = (
            self.kernel * self.kernel,
            self.channels * self.kernel * self.kernel,
        );
        let s = self.stride;
        T::with_scratch(|cols, gated| {
            let grad: &[T] = match gate {
                Some(gate) => {
                    let gated = fit(gated, self.filters * pixels);
                    for (d, (&g, &r)) in gated.iter_mut().zip(grad.iter().zip(gate)) {
                        *d = if r > T::zero() { g } else { T::zero() };
                    }
                    gated
                }
                None => grad,
            };
            for band in self.bands(h, w) {
                let width = band.len() * ow;
                let cols = fit(cols, rows * width);
                matmul(
                    (cols, width),
                    (&self.weight_t, self.filters),
                    (&grad[band.start * ow..], pixels),
                    (rows, self.filters, width),
                );
                // col2im: sum the columns back onto the input planes.
                for (c, plane) in out.chunks_mut(h * w).enumerate() {
                    let chunk = &cols[c * taps * width..][..taps * width];
                    self.for_each_span((h, w), band.clone(), |tap, out_start, in_start, len| {
                        let src = &chunk[tap * width + out_start..][..len];
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
                }
            }
        });
    }

    /// The bands of output rows of `h × w` inputs, each with at most [`BAND_ELEMENTS`] im2col
    /// elements (at least one row).
    fn bands(&self, h: usize, w: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let (oh, ow) = self.out_dims(h, w);
        let row = self.channels * self.kernel * self.kernel * ow;
        let band = (BAND_ELEMENTS / row).clamp(1, oh);
        (0..oh)
            .step_by(band)
            .map(move |start| start..(start + band).min(oh))
    }

    /// Calls `f(tap, out_start, in_start, len)` for every run of output pixels of one output
    /// row in `band` whose kernel tap `tap = ky·k + kx` falls inside an `h`×`w` plane: output
    /// pixels `out_start..out_start + len` (flat, counted from the band's first pixel) read
    /// input pixels `in_start, in_start + stride, …` (flat within the plane). Taps in the
    /// padding are skipped.
    fn for_each_span(
        &self,
        (h, w): (usize, usize),
        band: std::ops::Range<usize>,
        mut f: impl FnMut(usize, usize, usize, usize),
    ) {
        let ow = self.out_dims(h, w).1;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for ky in 0..k {
            for kx in 0..k {
                // Output columns whose input column ox·s + kx − p lies in [0, w).
                let first = p.saturating_sub(kx).div_ceil(s);
                let end = ((w + p).saturating_sub(kx).div_ceil(s)).min(ow);
                if first >= end {
                    continue;
                }
                for oy in band.clone() {
                    let iy = oy * s + ky;
                    if iy < p || iy - p >= h {
                        continue;
                    }
                    let in_start = (iy - p) * w + first * s + kx - p;
                    f(
                        ky * k + kx,
                        (oy - band.start) * ow + first,
                        in_start,
                        end - first,
                    );
                }
            }
        }
    }
}

/// `dst = lhs · rhs` on the calling thread, for row-major matrices given as (elements, row
/// stride), with `(m, k, n)` = (rows of `lhs`, columns of `lhs`, columns of `rhs`).
pub(crate) fn matmul<T: WithDType>(
    (dst, dst_rs): (&mut [T], usize),
    (lhs, lhs_rs): (&[T], usize),
    (rhs, rhs_rs): (&[T], usize),
    (m, k, n): (usize, usize, usize),
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
            gemm::Parallelism::None,
        );
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
    /// Output side of an `input`-sized side.
    pub fn out_len(&self, input: usize) -> usize {
        pooled_len(input, self.kernel, self.stride, 0)
    }

    /// Index in the plane of the first maximum (in row-major window order) of the window at
    /// (`oy`, `ox`). Branch-free: on ReLU outputs the winner is unpredictable, and a
    /// mispredicted branch per tap costs more than the comparisons.
    #[inline(always)]
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

    /// The window maxima of `planes` `h × w` planes `x` into `out`, separably: the maximum over
    /// the window's rows for every column of an output row, then over the columns of each
    /// window (loops without branches that the compiler vectorises).
    pub fn forward<T: WithDType>(&self, x: &[T], (h, w): (usize, usize), out: &mut [T]) {
        let (oh, ow, k, s) = (self.out_len(h), self.out_len(w), self.kernel, self.stride);
        let max = |a: T, b: T| if b > a { b } else { a };
        let mut columns = vec![T::zero(); w];
        for (plane, dst) in x.chunks(h * w).zip(out.chunks_mut(oh * ow)) {
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
        }
    }

    /// `out` (the pool's input shape) = the input gradient for output gradient `grad`, where
    /// `x` is the pool's input, also a ReLU's output: the gradient of an argmax that is not
    /// positive is dropped, which is the ReLU's own gradient.
    pub fn relu_backward<T: WithDType>(
        &self,
        x: &[T],
        grad: &[T],
        (h, w): (usize, usize),
        out: &mut [T],
    ) {
        let (oh, ow) = (self.out_len(h), self.out_len(w));
        out.fill(T::zero());
        for ((plane, g), dst) in x
            .chunks(h * w)
            .zip(grad.chunks(oh * ow))
            .zip(out.chunks_mut(h * w))
        {
            for oy in 0..oh {
                for ox in 0..ow {
                    let at = self.argmax(plane, w, oy, ox);
                    if plane[at] > T::zero() {
                        dst[at] += g[oy * ow + ox];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::seeded_tensor;
    use candle_core::{Result, Tensor};

    #[test]
    fn fixed_conv_matches_candle_conv2d_with_every_epilogue() -> Result<()> {
        // Stride 1, padding 1 takes the Winograd path from 8×8 on (odd and even sides) and
        // im2col below; the stem-like 7×7/2 layer spans several bands.
        for (kernel, stride, padding, size, channels) in [
            (3, 1, 1, 11, 3),
            (3, 1, 1, 8, 3),
            (3, 1, 1, 7, 3),
            (3, 1, 1, 1, 3),
            (3, 2, 0, 9, 3),
            (3, 2, 0, 8, 3),
            (3, 2, 1, 6, 3),
            (7, 2, 0, 150, 3),
        ] {
            let x = seeded_tensor(&[1, channels, size, size], 1)?;
            let weight = seeded_tensor(&[4, channels, kernel, kernel], 2)?;
            let bias = seeded_tensor(&[4], 3)?;
            let conv = FixedConv::new(
                weight.flatten_all()?.to_vec1::<f64>()?,
                bias.to_vec1::<f64>()?,
                (4, channels, kernel),
                stride,
                padding,
            );
            let reference = x
                .conv2d(&weight, padding, stride, 1, 1)?
                .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
            let residual = seeded_tensor(reference.dims(), 4)?;
            let xv = x.flatten_all()?.to_vec1::<f64>()?;
            let rv = residual.flatten_all()?.to_vec1::<f64>()?;
            for (with_residual, relu) in [(false, false), (false, true), (true, true)] {
                let mut out = vec![0.0; reference.elem_count()];
                let res = with_residual.then_some(rv.as_slice());
                conv.forward(&xv, (size, size), res, relu, &mut out);
                let mut expected = reference.clone();
                if with_residual {
                    expected = (expected + &residual)?;
                }
                if relu {
                    expected = expected.relu()?;
                }
                let ours = Tensor::from_vec(out, reference.dims(), x.device())?;
                let diff = (ours - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(
                    diff < 1e-12,
                    "{kernel}×{kernel}/{stride} padding {padding} on {size}²: {diff}"
                );
            }
        }
        Ok(())
    }
}
