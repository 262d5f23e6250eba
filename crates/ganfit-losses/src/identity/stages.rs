//! The identity network's stages (the stem, then each residual stage) as candle custom ops.
//!
//! A stage op runs all of its layers on one image at a time, the images of a batch in parallel,
//! and keeps the activations its backward pass needs. With batch 2 (GANFIT's render and frontal
//! render) on two threads, each thread runs one image through the whole stage, so the threads
//! meet twice per stage (forward and backward) instead of at every layer, where a thread that
//! the scheduler delays on a shared machine would hold up the other each time.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use super::ops::{FixedConv, MaxPool};
use super::winograd::Scratch;

/// `(channels, height, width)` of one image's tensor.
pub(crate) type Dims = (usize, usize, usize);

/// A residual block, `relu(x' + conv2(relu(conv1(x))))` (affine layers folded into the
/// convolutions), where in a down block `conv1` has stride 2 and `x'` is `x` average-pooled
/// 2×2/2, and the sum zero-pads the smaller tensor at the end of each dimension (dlib's
/// `add_prev`).
#[derive(Debug, Clone)]
pub(crate) struct Block<T> {
    pub conv1: FixedConv<T>,
    pub conv2: FixedConv<T>,
    pub down: bool,
}

/// One stage of the network.
#[derive(Debug, Clone)]
pub(crate) enum Stage<T> {
    /// Convolution (with the input normalisation folded in) and ReLU, then max-pool.
    Stem { conv: FixedConv<T>, pool: MaxPool },
    /// Residual blocks.
    Residual(Vec<Block<T>>),
}

impl<T: Scratch> Block<T> {
    fn cast<U: Scratch>(&self) -> Block<U> {
        Block {
            conv1: self.conv1.cast(),
            conv2: self.conv2.cast(),
            down: self.down,
        }
    }

    /// The block's output dimensions for input `dims`, if the input is large enough.
    fn out_dims(&self, (c, h, w): Dims) -> Option<Dims> {
        if c != self.conv1.channels() || !self.conv1.fits(h, w) {
            return None;
        }
        let (oh, ow) = self.conv1.out_dims(h, w);
        let f = self.conv1.filters();
        Some(if self.down {
            (f.max(c), oh.max(h / 2), ow.max(w / 2))
        } else {
            (f, oh, ow)
        })
    }

    /// Runs the block on `x`; returns the output of `conv1` (after its ReLU) and the block's.
    fn forward(&self, x: &[T], (c, h, w): Dims, pool: &Pool<T>) -> (Vec<T>, Vec<T>) {
        let (oh, ow) = self.conv1.out_dims(h, w);
        let f = self.conv1.filters();
        let mut mid = pool.take(f * oh * ow);
        self.conv1.forward(x, (h, w), None, true, &mut mid);
        if !self.down {
            // Fused: conv2, its bias, the shortcut and the ReLU in one pass over the output.
            let mut out = pool.take(f * oh * ow);
            self.conv2.forward(&mid, (oh, ow), Some(x), true, &mut out);
            return (mid, out);
        }
        let mut main = pool.take(f * oh * ow);
        self.conv2.forward(&mid, (oh, ow), None, false, &mut main);
        let dims = (f.max(c), oh.max(h / 2), ow.max(w / 2));
        let mut out = pool.take(volume(dims));
        out.fill(T::zero());
        add_at_origin(&mut out, dims, &main, (f, oh, ow));
        pool.give(main);
        add_average_pool(&mut out, dims, x, (c, h, w));
        for v in &mut out {
            *v = relu(*v);
        }
        (mid, out)
    }

    /// Writes to `dx` the gradient of input `dims` for the gradient `grad` of the block's
    /// output `out`, given `mid`, the output of `conv1`.
    fn backward(
        &self,
        (mid, out): (&[T], &[T]),
        grad: &[T],
        (c, h, w): Dims,
        dx: &mut [T],
        pool: &Pool<T>,
    ) {
        let mut gated = pool.take(grad.len());
        for (d, (&g, &o)) in gated.iter_mut().zip(grad.iter().zip(out)) {
            *d = if o > T::zero() { g } else { T::zero() };
        }
        let (oh, ow) = self.conv1.out_dims(h, w);
        let f = self.conv1.filters();
        let mut grad_mid = pool.take(f * oh * ow);
        if !self.down {
            self.conv2
                .input_grad(&gated, None, (oh, ow), None, &mut grad_mid);
            self.conv1
                .input_grad(&grad_mid, Some(mid), (h, w), Some(&gated), dx);
        } else {
            let dims = (f.max(c), oh.max(h / 2), ow.max(w / 2));
            let mut main = pool.take(f * oh * ow);
            crop(&gated, dims, (f, oh, ow), &mut main);
            self.conv2
                .input_grad(&main, None, (oh, ow), None, &mut grad_mid);
            pool.give(main);
            self.conv1
                .input_grad(&grad_mid, Some(mid), (h, w), None, dx);
            // The shortcut: each pooled value spreads a quarter of its gradient over its window.
            let (ph, pw) = (h / 2, w / 2);
            let quarter = T::from_f64(0.25);
            for ch in 0..c {
                for y in 0..ph {
                    let src = &gated[(ch * dims.1 + y) * dims.2..][..pw];
                    for dy in 0..2 {
                        let row = &mut dx[(ch * h + 2 * y + dy) * w..][..2 * pw];
                        for (pair, &g) in row.chunks_mut(2).zip(src) {
                            pair[0] += g * quarter;
                            pair[1] += g * quarter;
                        }
                    }
                }
            }
        }
        pool.give(gated);
        pool.give(grad_mid);
    }
}

impl<T: Scratch> Stage<T> {
    /// The same stage in another element type.
    pub fn cast<U: Scratch>(&self) -> Stage<U> {
        match self {
            Self::Stem { conv, pool } => Stage::Stem {
                conv: conv.cast(),
                pool: *pool,
            },
            Self::Residual(blocks) => Stage::Residual(blocks.iter().map(Block::cast).collect()),
        }
    }

    /// The stage's output dimensions for input `dims`, if the stage can take such inputs.
    fn out_dims(&self, dims: Dims) -> Option<Dims> {
        match self {
            Self::Stem { conv, pool } => {
                let (c, h, w) = dims;
                if c != conv.channels() || !conv.fits(h, w) {
                    return None;
                }
                let (oh, ow) = conv.out_dims(h, w);
                (oh >= pool.kernel && ow >= pool.kernel)
                    .then(|| (conv.filters(), pool.out_len(oh), pool.out_len(ow)))
            }
            Self::Residual(blocks) => blocks
                .iter()
                .try_fold(dims, |dims, block| block.out_dims(dims)),
        }
    }

    /// Runs the stage on one image `x` of `dims` into `out`; returns the activations the
    /// backward pass needs.
    fn forward(&self, x: &[T], dims: Dims, out: &mut [T], pool: &Pool<T>) -> Vec<Vec<T>> {
        match self {
            Self::Stem {
                conv,
                pool: max_pool,
            } => {
                let (oh, ow) = conv.out_dims(dims.1, dims.2);
                let mut activated = pool.take(conv.filters() * oh * ow);
                conv.forward(x, (dims.1, dims.2), None, true, &mut activated);
                max_pool.forward(&activated, (oh, ow), out);
                vec![activated]
            }
            Self::Residual(blocks) => {
                let mut saved: Vec<Vec<T>> = Vec::with_capacity(2 * blocks.len());
                let mut dims = dims;
                for block in blocks {
                    let input = saved.last().map_or(x, Vec::as_slice);
                    let (mid, block_out) = block.forward(input, dims, pool);
                    dims = block.out_dims(dims).unwrap_or(dims);
                    saved.push(mid);
                    saved.push(block_out);
                }
                if let Some(last) = saved.last() {
                    out.copy_from_slice(last);
                }
                saved
            }
        }
    }

    /// Writes to `dx` the gradient of the image's input (`dims`) for the gradient `grad` of
    /// its output, given what [`Self::forward`] saved.
    fn backward(&self, saved: &[Vec<T>], grad: &[T], dims: Dims, dx: &mut [T], pool: &Pool<T>) {
        match self {
            Self::Stem {
                conv,
                pool: max_pool,
            } => {
                let (oh, ow) = conv.out_dims(dims.1, dims.2);
                let mut grad_activated = pool.take(conv.filters() * oh * ow);
                max_pool.relu_backward(&saved[0], grad, (oh, ow), &mut grad_activated);
                conv.input_grad(&grad_activated, None, (dims.1, dims.2), None, dx);
                pool.give(grad_activated);
            }
            Self::Residual(blocks) => {
                // Input dimensions of every block.
                let mut inputs = vec![dims];
                for block in blocks {
                    let last = inputs[inputs.len() - 1];
                    inputs.push(block.out_dims(last).unwrap_or(last));
                }
                // The gradient of the current block's output: the stage's, then each block's
                // input gradient in turn (the first block's goes straight to `dx`).
                let mut grad_out: Option<Vec<T>> = None;
                for (b, block) in blocks.iter().enumerate().rev() {
                    let g = grad_out.as_deref().unwrap_or(grad);
                    let saved = (saved[2 * b].as_slice(), saved[2 * b + 1].as_slice());
                    let grad_in = if b == 0 {
                        block.backward(saved, g, inputs[b], dx, pool);
                        None
                    } else {
                        let mut grad_in = pool.take(volume(inputs[b]));
                        block.backward(saved, g, inputs[b], &mut grad_in, pool);
                        Some(grad_in)
                    };
                    if let Some(done) = std::mem::replace(&mut grad_out, grad_in) {
                        pool.give(done);
                    }
                }
            }
        }
    }
}

/// Buffers for activations and gradients, kept between passes: freed, buffers this size go
/// back to the system and fault in again, zeroed page by page, on every pass (kernel page
/// clearing fell from about 8% to 5% of a forward + backward pass's profile samples with this
/// pool; the rest comes from candle's and gemm's own buffers). Buffers come back with any
/// contents, and every user overwrites or clears them first.
#[derive(Debug, Default)]
pub(crate) struct Pool<T>(Mutex<Vec<Vec<T>>>);

/// Most buffers a pool keeps (about 12 per image and pass).
const POOL_MAX_BUFFERS: usize = 256;

impl<T: Scratch> Pool<T> {
    /// A buffer of `len` elements with any contents: the smallest kept one that is large
    /// enough, else a new one.
    fn take(&self, len: usize) -> Vec<T> {
        let found = {
            let mut buffers = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let best = buffers
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| buffers.swap_remove(i))
        };
        match found {
            Some(mut buffer) => {
                // Growing within the capacity writes zeros to memory that is already mapped.
                if buffer.len() > len {
                    buffer.truncate(len);
                } else {
                    buffer.resize(len, T::zero());
                }
                buffer
            }
            None => vec![T::zero(); len],
        }
    }

    fn give(&self, buffer: Vec<T>) {
        let mut buffers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if buffers.len() < POOL_MAX_BUFFERS {
            buffers.push(buffer);
        }
    }
}

fn relu<T: Scratch>(v: T) -> T {
    if v < T::zero() { T::zero() } else { v }
}

/// Adds to `dst` (`dst_dims`, at least as large in every dimension) at its origin the 2×2/2
/// average pooling of `x`, which drops an odd last row or column, as dlib does.
fn add_average_pool<T: Scratch>(dst: &mut [T], (_, dh, dw): Dims, x: &[T], (c, h, w): Dims) {
    let (ph, pw) = (h / 2, w / 2);
    let quarter = T::from_f64(0.25);
    for (ch, plane) in x.chunks(h * w).take(c).enumerate() {
        for y in 0..ph {
            let (top, bottom) = (&plane[2 * y * w..][..w], &plane[(2 * y + 1) * w..][..w]);
            let row = &mut dst[(ch * dh + y) * dw..][..pw];
            for (x, d) in row.iter_mut().enumerate() {
                *d += (top[2 * x] + top[2 * x + 1] + bottom[2 * x] + bottom[2 * x + 1]) * quarter;
            }
        }
    }
}

/// Adds `src` (`src_dims`) to the first elements of each dimension of `dst` (`dst_dims`, at
/// least as large in every dimension).
fn add_at_origin<T: Scratch>(dst: &mut [T], (_, dh, dw): Dims, src: &[T], (sc, sh, sw): Dims) {
    for (ch, plane) in src.chunks(sh * sw).take(sc).enumerate() {
        for (y, row) in plane.chunks(sw).enumerate() {
            for (d, &v) in dst[(ch * dh + y) * dw..][..sw].iter_mut().zip(row) {
                *d += v;
            }
        }
    }
}

/// Writes to `out` the first `to` elements of each dimension of `src` (`from`).
fn crop<T: Scratch>(src: &[T], from: Dims, to: Dims, out: &mut [T]) {
    for (i, row) in out.chunks_mut(to.2).enumerate() {
        let (ch, y) = (i / to.1, i % to.1);
        row.copy_from_slice(&src[(ch * from.1 + y) * from.2..][..to.2]);
    }
}

/// Runs `f(image, chunk)` on every `len`-element chunk of `out` (one per image), on the rayon
/// pool's threads when it has several and there are several images.
fn per_image<T: Send, R: Send>(
    out: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Send + Sync,
) -> Vec<R> {
    let len = len.max(1);
    if out.len() > len && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(len)
            .enumerate()
            .map(|(i, chunk)| f(i, chunk))
            .collect()
    } else {
        out.chunks_mut(len)
            .enumerate()
            .map(|(i, chunk)| f(i, chunk))
            .collect()
    }
}

/// The contiguous elements of a CPU tensor.
fn cpu_slice<'a, T: Scratch>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("dlib-resnet-stage: the input must be contiguous"),
    }
}

/// One application of a [`Stage`] to a batch: the forward pass keeps each image's activations
/// here for the backward pass, so a fresh op is made per forward pass; they go back to the
/// pool with the op.
pub(crate) struct StageOp<T: Scratch> {
    stage: Arc<Stage<T>>,
    pool: Arc<Pool<T>>,
    saved: Mutex<Vec<Vec<Vec<T>>>>,
}

impl<T: Scratch> StageOp<T> {
    pub fn new(stage: Arc<Stage<T>>, pool: Arc<Pool<T>>) -> Self {
        Self {
            stage,
            pool,
            saved: Mutex::new(Vec::new()),
        }
    }
}

impl<T: Scratch> Drop for StageOp<T> {
    fn drop(&mut self) {
        let saved = self.saved.get_mut().unwrap_or_else(|e| e.into_inner());
        for buffer in saved.drain(..).flatten() {
            self.pool.give(buffer);
        }
    }
}

impl<T: Scratch> StageOp<T> {
    fn dims(&self, shape: &Shape) -> Result<(usize, Dims, Dims)> {
        let (b, c, h, w) = shape.dims4()?;
        match self.stage.out_dims((c, h, w)) {
            Some(out) => Ok((b, (c, h, w), out)),
            None => bail!("dlib-resnet-stage: this stage cannot take inputs of shape {shape:?}"),
        }
    }
}

fn volume((c, h, w): Dims) -> usize {
    c * h * w
}

impl<T: Scratch> CustomOp1 for StageOp<T> {
    fn name(&self) -> &'static str {
        "dlib-resnet-stage"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, dims, out_dims) = self.dims(layout.shape())?;
        let x = cpu_slice::<T>(storage, layout)?;
        let mut out = vec![T::zero(); b * volume(out_dims)];
        let saved = per_image(&mut out, volume(out_dims), |i, chunk| {
            self.stage.forward(
                &x[i * volume(dims)..][..volume(dims)],
                dims,
                chunk,
                &self.pool,
            )
        });
        let previous = std::mem::replace(
            &mut *self.saved.lock().unwrap_or_else(|e| e.into_inner()),
            saved,
        );
        for buffer in previous.into_iter().flatten() {
            self.pool.give(buffer);
        }
        Ok((
            T::to_cpu_storage_owned(out),
            Shape::from((b, out_dims.0, out_dims.1, out_dims.2)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (b, dims, out_dims) = self.dims(arg.shape())?;
        let grad_res = grad_res.contiguous()?;
        let (storage, layout) = grad_res.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            bail!("dlib-resnet-stage runs on the CPU only");
        };
        let grad = cpu_slice::<T>(cpu, layout)?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if saved.len() != b {
            bail!("dlib-resnet-stage: backward without its forward pass");
        }
        let mut dx = vec![T::zero(); b * volume(dims)];
        per_image(&mut dx, volume(dims), |i, chunk| {
            let g = &grad[i * volume(out_dims)..][..volume(out_dims)];
            self.stage.backward(&saved[i], g, dims, chunk, &self.pool);
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_gradient, seeded_tensor};

    fn conv(
        seed: u64,
        (filters, channels): (usize, usize),
        kernel: usize,
        stride: usize,
    ) -> FixedConv<f64> {
        let weight = seeded_tensor(&[filters, channels, kernel, kernel], seed).unwrap();
        let bias = seeded_tensor(&[filters], seed + 1).unwrap();
        FixedConv::new(
            weight.flatten_all().unwrap().to_vec1().unwrap(),
            bias.to_vec1().unwrap(),
            (filters, channels, kernel),
            stride,
            if stride == 1 { kernel / 2 } else { 0 },
        )
    }

    fn apply(stage: &Arc<Stage<f64>>, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op1(StageOp::new(stage.clone(), Arc::default()))
    }

    /// The reference: the same stage from candle's own operations.
    fn reference(stage: &Stage<f64>, x: &Tensor, weights: &[(Tensor, Tensor)]) -> Result<Tensor> {
        let conv = |x: &Tensor, (w, b): &(Tensor, Tensor), stride: usize| -> Result<Tensor> {
            let padding = if stride == 1 { w.dim(3)? / 2 } else { 0 };
            x.conv2d(w, padding, stride, 1, 1)?
                .broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)
        };
        match stage {
            Stage::Stem { .. } => {
                let y = conv(x, &weights[0], 2)?.relu()?;
                // 3×3/2 max-pool from candle's 2×2/2 one is not available: take the maximum of
                // the nine shifted, strided views.
                let (_, _, h, w) = y.dims4()?;
                let (oh, ow) = ((h - 3) / 2 + 1, (w - 3) / 2 + 1);
                let mut best: Option<Tensor> = None;
                for ky in 0..3 {
                    for kx in 0..3 {
                        let mut rows = Vec::new();
                        for oy in 0..oh {
                            let row = y.narrow(2, oy * 2 + ky, 1)?;
                            let cols: Vec<Tensor> = (0..ow)
                                .map(|ox| row.narrow(3, ox * 2 + kx, 1))
                                .collect::<Result<_>>()?;
                            rows.push(Tensor::cat(&cols, 3)?);
                        }
                        let view = Tensor::cat(&rows, 2)?;
                        best = Some(match best {
                            Some(b) => b.maximum(&view)?,
                            None => view,
                        });
                    }
                }
                best.ok_or_else(|| candle_core::Error::Msg("empty window".into()))
            }
            Stage::Residual(blocks) => {
                let mut x = x.clone();
                for (i, block) in blocks.iter().enumerate() {
                    let stride = if block.down { 2 } else { 1 };
                    let mid = conv(&x, &weights[2 * i], stride)?.relu()?;
                    let main = conv(&mid, &weights[2 * i + 1], 1)?;
                    let shortcut = if block.down {
                        let (_, _, h, w) = x.dims4()?;
                        x.narrow(2, 0, h / 2 * 2)?
                            .narrow(3, 0, w / 2 * 2)?
                            .contiguous()?
                            .avg_pool2d(2)?
                    } else {
                        x.clone()
                    };
                    let pad = |t: &Tensor, like: &Tensor| -> Result<Tensor> {
                        let (_, c, h, w) = t.dims4()?;
                        let (_, lc, lh, lw) = like.dims4()?;
                        t.pad_with_zeros(1, 0, lc.max(c) - c)?
                            .pad_with_zeros(2, 0, lh.max(h) - h)?
                            .pad_with_zeros(3, 0, lw.max(w) - w)
                    };
                    x = (pad(&main, &shortcut)? + pad(&shortcut, &main)?)?.relu()?;
                }
                Ok(x)
            }
        }
    }

    fn weights(specs: &[((usize, usize), usize)], seed: u64) -> Vec<(Tensor, Tensor)> {
        specs
            .iter()
            .enumerate()
            .map(|(i, &((f, c), k))| {
                let s = seed + 2 * i as u64;
                (
                    seeded_tensor(&[f, c, k, k], s).unwrap(),
                    seeded_tensor(&[f], s + 1).unwrap(),
                )
            })
            .collect()
    }

    /// Checks the stage against candle's operations and its gradient against finite
    /// differences, on a batch of two.
    fn check(stage: Stage<f64>, weights: &[(Tensor, Tensor)], input: &[usize]) -> Result<()> {
        let stage = Arc::new(stage);
        let x = seeded_tensor(input, 21)?;
        let ours = apply(&stage, &x)?;
        let expected = reference(&stage, &x, weights)?;
        assert_eq!(ours.dims(), expected.dims());
        let diff = (ours - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        check_input_gradient(&x, |x| apply(&stage, x), 1e-6)
    }

    #[test]
    fn stem_matches_candle_and_finite_differences() -> Result<()> {
        let specs = [((3, 2), 7)];
        let w = weights(&specs, 30);
        let stage = Stage::Stem {
            conv: conv(30, (3, 2), 7, 2),
            pool: MaxPool {
                kernel: 3,
                stride: 2,
            },
        };
        check(stage, &w, &[2, 2, 23, 21])
    }

    #[test]
    fn residual_stage_matches_candle_and_finite_differences() -> Result<()> {
        // Identity blocks on the Winograd path (9×9), a down block whose shortcut pads the
        // channels (9×9 → 4×4), then identity blocks on the im2col path (4×4).
        let specs = [
            ((2, 2), 3),
            ((2, 2), 3),
            ((3, 2), 3),
            ((3, 3), 3),
            ((3, 3), 3),
            ((3, 3), 3),
        ];
        let w = weights(&specs, 40);
        let block = |i: usize, down: bool| Block {
            conv1: conv(
                40 + 4 * i as u64,
                specs[2 * i].0,
                3,
                if down { 2 } else { 1 },
            ),
            conv2: conv(42 + 4 * i as u64, specs[2 * i + 1].0, 3, 1),
            down,
        };
        let stage = Stage::Residual(vec![block(0, false), block(1, true), block(2, false)]);
        check(stage, &w, &[2, 2, 9, 9])
    }

    #[test]
    fn down_block_pads_the_convolution_spatially() -> Result<()> {
        // dlib's last stages: 8×8 → conv 3×3 but pool 4×4, and 4×4 → conv 1×1 but pool 2×2.
        for size in [8, 4] {
            let specs = [((3, 2), 3), ((3, 3), 3)];
            let w = weights(&specs, 50);
            let stage = Stage::Residual(vec![Block {
                conv1: conv(50, (3, 2), 3, 2),
                conv2: conv(52, (3, 3), 3, 1),
                down: true,
            }]);
            check(stage, &w, &[2, 2, size, size])?;
        }
        Ok(())
    }

    #[test]
    fn inputs_the_stage_cannot_take_are_errors() -> Result<()> {
        let stage = Arc::new(Stage::Residual(vec![Block {
            conv1: conv(60, (3, 2), 3, 2),
            conv2: conv(62, (3, 3), 3, 1),
            down: true,
        }]));
        for shape in [[1, 3, 8, 8], [1, 2, 2, 2]] {
            let x = seeded_tensor(&shape, 1)?;
            assert!(apply(&stage, &x).is_err(), "{shape:?}");
        }
        Ok(())
    }
}
