//! `offset + p_s · U_s + p_e · U_e` as a candle custom op with a hand-written CPU kernel whose
//! backward gives only the coefficients' gradients.
//!
//! Why not candle's matmul: its backward also forms the (here useless) gradient of the
//! 153 × 28k basis, which costs more than the whole forward pass; and for one face the product
//! is two matrix-vector products, which gemm (built for matrix-matrix blocking) runs well below
//! the memory bandwidth they are limited by.
//!
//! The basis is stored as `[K, C]` rows (one mode per row), so both passes stream it
//! contiguously: the forward adds `ROWS` scaled rows at a time into a column tile of the output
//! (which stays in cache between sweeps), the backward dots `ROWS` whole rows at a time with the
//! output gradient. With more than one rayon thread the forward splits the columns into tiles
//! and the backward splits the rows, so each thread reads its own part of the basis once per
//! pass and nothing needs summing across threads. On x86-64 the loops are compiled a second
//! time for AVX2 + FMA, chosen at run time, since the build itself targets baseline x86-64
//! (AVX-512 measured no faster: both passes are bound by reading the basis from cache).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Output columns per forward tile: 16 KiB of each output row stays in L1/L2 while the basis
/// streams through it in runs long enough for the hardware prefetcher (1,024 and 2,048 columns
/// measured slower on the ICT face, 8,192 and whole rows no faster).
const TILE: usize = 4096;
/// Basis rows combined per sweep: each sweep loads and stores the output (or loads the output
/// gradient) once for `ROWS` rows, while `ROWS` sequential streams stay prefetcher-friendly
/// (8 measured slower than 4 with the software prefetch below).
const ROWS: usize = 4;
/// How far ahead of its reads (in f32) each basis stream asks for its data, once per 64-byte
/// line: the hardware prefetcher alone keeps too few lines in flight when other processes
/// compete for the L3 cache (median instance + backward on the ICT face 10–15% faster on the
/// shared 2-core machine, alternating with and without in one process; 256 gained less, 768
/// no more).
const PREFETCH_AHEAD: usize = 512;
/// f32 per 64-byte cache line.
const PREFETCH_STEP: usize = 16;

/// `out[b, :] = offset + Σ_j shape[b, j] · basis[j, :] + Σ_j expression[b, j] ·
/// basis[expression_row + j, :]` for coefficients `[B, k_s]` and `[B, k_e]` (the first `k_s`
/// identity and first `k_e` expression modes), giving `[B, C]`.
#[derive(Debug, Clone)]
pub(crate) struct AffineBlend {
    /// `[K, C]` f32, contiguous: all identity modes, then all expression modes.
    pub basis: Tensor,
    /// The basis row of the first expression mode.
    pub expression_row: usize,
    /// `[C]` f32 (any shape with `C` elements), contiguous, added to every output row.
    pub offset: Tensor,
    /// The shape the `[B, C]` result is given (`None`: `[B, C]` itself). Giving the caller's
    /// final shape here spares the autograd graph reshape nodes, each of which costs the
    /// backward pass a zero fill and an addition of the whole output.
    pub output_shape: Option<Shape>,
}

/// One group of coefficients and the basis rows they weight.
#[derive(Debug, Clone, Copy)]
struct Block<'a> {
    /// `[B, k]`, row-major.
    coeffs: &'a [f32],
    /// `[k, C]`, row-major.
    rows: &'a [f32],
}

/// The f32 elements of a contiguous CPU tensor, passed to `f` while its storage is borrowed.
fn with_cpu_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => f(&values[start..end]),
        _ => candle_core::bail!("affine blend: the {what} must be a contiguous f32 CPU tensor"),
    }
}

/// The f32 elements of a contiguous `[B, k]` argument, and `(B, k)`.
fn coefficients<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(&'a [f32], (usize, usize))> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("affine blend: the coefficients must be f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("affine blend: the coefficients must be contiguous");
    };
    Ok((&values[start..end], layout.shape().dims2()?))
}

impl AffineBlend {
    /// Runs `f` on the basis rows of the first `k_s` identity and first `k_e` expression modes
    /// (`[k_s, C]` and `[k_e, C]`) and the number of columns `C`.
    fn with_rows<R>(
        &self,
        k_s: usize,
        k_e: usize,
        f: impl FnOnce([&[f32]; 2], usize) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (modes, cols) = self.basis.dims2()?;
        if k_s > self.expression_row || self.expression_row + k_e > modes {
            candle_core::bail!(
                "affine blend: {k_s} identity and {k_e} expression coefficients for a basis of \
                 {} identity and {} expression modes",
                self.expression_row,
                modes - self.expression_row
            );
        }
        with_cpu_f32(&self.basis, "basis", |basis| {
            let rows = |first: usize, k: usize| &basis[first * cols..(first + k) * cols];
            f([rows(0, k_s), rows(self.expression_row, k_e)], cols)
        })
    }
}

impl CustomOp2 for AffineBlend {
    fn name(&self) -> &'static str {
        "affine-blend"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (shape, (batch, k_s)) = coefficients(s1, l1)?;
        let (expression, (batch_e, k_e)) = coefficients(s2, l2)?;
        if batch != batch_e {
            candle_core::bail!("affine blend: {batch} identity but {batch_e} expression rows");
        }
        self.with_rows(k_s, k_e, |[rows_s, rows_e], cols| {
            let blocks = [
                Block {
                    coeffs: shape,
                    rows: rows_s,
                },
                Block {
                    coeffs: expression,
                    rows: rows_e,
                },
            ];
            let out = with_cpu_f32(&self.offset, "offset", |offset| {
                if offset.len() != cols {
                    candle_core::bail!(
                        "affine blend: an offset of {} values for {cols} columns",
                        offset.len()
                    );
                }
                let mut out = offset.repeat(batch);
                blend_forward(&mut out, cols, &blocks);
                Ok(out)
            })?;
            let shape = match &self.output_shape {
                Some(shape) if shape.elem_count() != batch * cols => candle_core::bail!(
                    "affine blend: an output of shape {shape:?} for {batch} rows of {cols} values"
                ),
                Some(shape) => shape.clone(),
                None => Shape::from((batch, cols)),
            };
            Ok((CpuStorage::F32(out), shape))
        })
    }

    fn bwd(
        &self,
        shape: &Tensor,
        expression: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let batch = shape.dim(0)?;
        // A constant coefficient block (no gradient wanted) is given no rows, so it costs nothing.
        let wanted = |t: &Tensor| t.track_op().then(|| t.dim(1)).transpose();
        let (k_s, k_e) = (wanted(shape)?, wanted(expression)?);
        let grad_res = grad_res.contiguous()?;
        // Gradients are formed as `[k, B]` (each task then owns whole rows) and handed back
        // transposed: for one face that is the `[1, k]` layout itself.
        let (rows_s, rows_e) = (k_s.unwrap_or(0), k_e.unwrap_or(0));
        let mut grad_s = vec![0f32; rows_s * batch];
        let mut grad_e = vec![0f32; rows_e * batch];
        with_cpu_f32(&grad_res, "output gradient", |grad_out| {
            self.with_rows(rows_s, rows_e, |[rows_s, rows_e], cols| {
                blend_backward(
                    grad_out,
                    cols,
                    [(rows_s, &mut grad_s), (rows_e, &mut grad_e)],
                );
                Ok(())
            })
        })?;
        let as_gradient = |k: Option<usize>, grad: Vec<f32>| {
            k.map(|k| Tensor::from_vec(grad, (k, batch), grad_res.device())?.t())
                .transpose()
        };
        Ok((as_gradient(k_s, grad_s)?, as_gradient(k_e, grad_e)?))
    }
}

/// Adds `Σ coeffs[b, j] · rows[j, :]` of every block to each row `b` of `out` (`[B, cols]`).
fn blend_forward(out: &mut [f32], cols: usize, blocks: &[Block<'_>]) {
    if out.is_empty() {
        return; // no faces or no vertices
    }
    let batch = out.len() / cols;
    let threads = rayon::current_num_threads();
    // About `TILE` columns per tile, in a multiple of the thread count so that the threads get
    // equal shares, each a whole number of SIMD registers wide.
    let width = cols
        .div_ceil(cols.div_ceil(TILE).next_multiple_of(threads))
        .next_multiple_of(16);
    let tiles = cols.div_ceil(width);
    // Tile-major pieces of the output rows, so that one task owns one tile of every row and
    // reads that tile of the basis once for the whole batch.
    let mut row_tiles: Vec<_> = out.chunks_mut(cols).map(|r| r.chunks_mut(width)).collect();
    let mut pieces = Vec::with_capacity(tiles * batch);
    for _ in 0..tiles {
        pieces.extend(row_tiles.iter_mut().filter_map(Iterator::next));
    }
    let forward = |(tile, out): (usize, &mut [&mut [f32]])| {
        forward_tile(out, tile * width, cols, blocks);
    };
    if threads > 1 {
        pieces.par_chunks_mut(batch).enumerate().for_each(forward);
    } else {
        // Spares the hand-over to the pool's one worker and back.
        pieces.chunks_mut(batch).enumerate().for_each(forward);
    }
}

/// `grads[i][j, b] = Σ_c grad_out[b, c] · rows_i[j, c]` for `grad_out` `[B, cols]` and each
/// `(rows_i [k_i, cols], grads_i [k_i, B])`.
fn blend_backward(grad_out: &[f32], cols: usize, parts: [(&[f32], &mut [f32]); 2]) {
    if grad_out.is_empty() {
        return; // no faces, or no vertices and so zero gradients
    }
    let batch = grad_out.len() / cols;
    let sweep = |(rows, grads): (&[f32], &mut [f32])| backward_rows(grad_out, cols, rows, grads);
    let [(rows_s, grads_s), (rows_e, grads_e)] = parts;
    if rayon::current_num_threads() > 1 {
        rows_s
            .par_chunks(ROWS * cols)
            .zip(grads_s.par_chunks_mut(ROWS * batch))
            .chain(
                rows_e
                    .par_chunks(ROWS * cols)
                    .zip(grads_e.par_chunks_mut(ROWS * batch)),
            )
            .for_each(sweep);
    } else {
        rows_s
            .chunks(ROWS * cols)
            .zip(grads_s.chunks_mut(ROWS * batch))
            .chain(
                rows_e
                    .chunks(ROWS * cols)
                    .zip(grads_e.chunks_mut(ROWS * batch)),
            )
            .for_each(sweep);
    }
}

/// The forward of one column tile starting at `first_col`; `out` holds that tile of each batch
/// row.
fn forward_tile(out: &mut [&mut [f32]], first_col: usize, cols: usize, blocks: &[Block<'_>]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = Avx2::detect() {
        // SAFETY: an `Avx2` exists only where the CPU has AVX2 and FMA.
        return unsafe { avx2.forward_tile(out, first_col, cols, blocks) };
    }
    forward_tile_with(Portable, out, first_col, cols, blocks);
}

/// The backward of up to `ROWS` basis rows (`[r, cols]`) into their gradients (`[r, B]`).
fn backward_rows(grad_out: &[f32], cols: usize, rows: &[f32], grads: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = Avx2::detect() {
        // SAFETY: an `Avx2` exists only where the CPU has AVX2 and FMA.
        return unsafe { avx2.backward_rows(grad_out, cols, rows, grads) };
    }
    backward_rows_with(Portable, grad_out, cols, rows, grads);
}

#[inline(always)]
fn forward_tile_with<S: Simd>(
    simd: S,
    out: &mut [&mut [f32]],
    first_col: usize,
    cols: usize,
    blocks: &[Block<'_>],
) {
    let width = out.first().map_or(0, |o| o.len());
    for block in blocks {
        let k = block.rows.len() / cols;
        let tile = |j: usize| &block.rows[j * cols + first_col..][..width];
        let mut j = 0;
        while j + ROWS <= k {
            let rows: [&[f32]; ROWS] = std::array::from_fn(|i| tile(j + i));
            for (b, out) in out.iter_mut().enumerate() {
                let c: [f32; ROWS] = std::array::from_fn(|i| block.coeffs[b * k + j + i]);
                add_scaled_rows(simd, out, c, rows);
            }
            j += ROWS;
        }
        for j in j..k {
            for (b, out) in out.iter_mut().enumerate() {
                add_scaled_rows(simd, out, [block.coeffs[b * k + j]], [tile(j)]);
            }
        }
    }
}

#[inline(always)]
fn backward_rows_with<S: Simd>(
    simd: S,
    grad_out: &[f32],
    cols: usize,
    rows: &[f32],
    grads: &mut [f32],
) {
    let batch = grad_out.len() / cols;
    let row = |j: usize| &rows[j * cols..][..cols];
    for (b, g) in grad_out.chunks_exact(cols).enumerate() {
        if rows.len() == ROWS * cols {
            let dots = dot_rows(simd, g, std::array::from_fn::<_, ROWS, _>(row));
            for (j, d) in dots.into_iter().enumerate() {
                grads[j * batch + b] = d;
            }
        } else {
            for j in 0..rows.len() / cols {
                grads[j * batch + b] = dot_rows(simd, g, [row(j)])[0];
            }
        }
    }
}

/// `out[i] += Σ_r c[r] · rows[r][i]`.
#[inline(always)]
fn add_scaled_rows<S: Simd, const R: usize>(
    simd: S,
    out: &mut [f32],
    c: [f32; R],
    rows: [&[f32]; R],
) {
    let n = out.len();
    let rows = rows.map(|r| &r[..n]);
    let c_lanes = c.map(|c| simd.splat(c));
    let body = n - n % S::LANES;
    let mut i = 0;
    while i < body {
        if i % PREFETCH_STEP == 0 {
            for r in rows {
                simd.prefetch(r, i + PREFETCH_AHEAD);
            }
        }
        let mut acc = simd.load(&out[i..]);
        for r in 0..R {
            acc = simd.mul_add(c_lanes[r], simd.load(&rows[r][i..]), acc);
        }
        simd.store(acc, &mut out[i..]);
        i += S::LANES;
    }
    // The same arithmetic as one lane of the body, so that a vertex's position does not
    // depend on where its columns fall (a model of a vertex subset reproduces the whole's).
    for i in body..n {
        for r in 0..R {
            out[i] = simd.mul_add_one(c[r], rows[r][i], out[i]);
        }
    }
}

/// `[Σ_i g[i] · rows[r][i]; R]`.
#[inline(always)]
fn dot_rows<S: Simd, const R: usize>(simd: S, g: &[f32], rows: [&[f32]; R]) -> [f32; R] {
    let n = g.len();
    let rows = rows.map(|r| &r[..n]);
    let body = n - n % S::LANES;
    let mut acc = [simd.splat(0.0); R];
    let mut i = 0;
    while i < body {
        if i % PREFETCH_STEP == 0 {
            for r in rows {
                simd.prefetch(r, i + PREFETCH_AHEAD);
            }
        }
        let g = simd.load(&g[i..]);
        for r in 0..R {
            acc[r] = simd.mul_add(simd.load(&rows[r][i..]), g, acc[r]);
        }
        i += S::LANES;
    }
    std::array::from_fn(|r| {
        let tail: f32 = (body..n).map(|i| rows[r][i] * g[i]).sum();
        simd.sum(acc[r]) + tail
    })
}

/// The few vector operations the kernels need, on registers of `LANES` f32. A value of an
/// implementing type stands for the CPU's support of its instructions, so the kernels are
/// written once and compiled per instruction set.
trait Simd: Copy {
    /// One register.
    type Lanes: Copy;
    /// f32 values per register.
    const LANES: usize;
    fn splat(self, x: f32) -> Self::Lanes;
    /// The first `LANES` values of `from` (which must have that many).
    fn load(self, from: &[f32]) -> Self::Lanes;
    /// Into the first `LANES` values of `to` (which must have that many).
    fn store(self, v: Self::Lanes, to: &mut [f32]);
    /// `a · b + c`.
    fn mul_add(self, a: Self::Lanes, b: Self::Lanes, c: Self::Lanes) -> Self::Lanes;
    /// `a · b + c` rounded as in one lane of [`mul_add`](Self::mul_add).
    fn mul_add_one(self, a: f32, b: f32, c: f32) -> f32;
    /// The sum of the lanes.
    fn sum(self, v: Self::Lanes) -> f32;
    /// Asks for the cache line holding `from[at]` to be loaded, if the instruction set can;
    /// `at` may lie past the end (nothing is read, nor asked for, then).
    fn prefetch(self, from: &[f32], at: usize);
}

/// Plain arrays, which the compiler maps onto the baseline SIMD of any target.
#[derive(Debug, Clone, Copy)]
struct Portable;

impl Simd for Portable {
    type Lanes = [f32; 4];
    const LANES: usize = 4;

    #[inline(always)]
    fn splat(self, x: f32) -> [f32; 4] {
        [x; 4]
    }

    #[inline(always)]
    fn load(self, from: &[f32]) -> [f32; 4] {
        std::array::from_fn(|l| from[l])
    }

    #[inline(always)]
    fn store(self, v: [f32; 4], to: &mut [f32]) {
        to[..4].copy_from_slice(&v);
    }

    #[inline(always)]
    fn mul_add(self, a: [f32; 4], b: [f32; 4], c: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|l| self.mul_add_one(a[l], b[l], c[l]))
    }

    #[inline(always)]
    fn mul_add_one(self, a: f32, b: f32, c: f32) -> f32 {
        // Not `f32::mul_add`: without FMA hardware that is a slow library call.
        a * b + c
    }

    #[inline(always)]
    fn sum(self, v: [f32; 4]) -> f32 {
        (v[0] + v[1]) + (v[2] + v[3])
    }

    #[inline(always)]
    fn prefetch(self, _from: &[f32], _at: usize) {}
}

/// AVX2 registers with fused multiply-add, on x86-64 CPUs that have them.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    fn detect() -> Option<Self> {
        (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Avx2(()))
    }

    #[target_feature(enable = "avx2,fma")]
    fn forward_tile(
        self,
        out: &mut [&mut [f32]],
        first_col: usize,
        cols: usize,
        blocks: &[Block<'_>],
    ) {
        forward_tile_with(self, out, first_col, cols, blocks);
    }

    #[target_feature(enable = "avx2,fma")]
    fn backward_rows(self, grad_out: &[f32], cols: usize, rows: &[f32], grads: &mut [f32]) {
        backward_rows_with(self, grad_out, cols, rows, grads);
    }
}

// SAFETY (every `unsafe` below): an `Avx2` value exists only where the CPU has AVX2 and FMA
// (`Avx2::detect`), each load or store first checks its slice holds 8 values, and a prefetch
// names an element of its slice.
#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    type Lanes = std::arch::x86_64::__m256;
    const LANES: usize = 8;

    #[inline(always)]
    fn splat(self, x: f32) -> Self::Lanes {
        unsafe { std::arch::x86_64::_mm256_set1_ps(x) }
    }

    #[inline(always)]
    fn load(self, from: &[f32]) -> Self::Lanes {
        let from = &from[..8];
        unsafe { std::arch::x86_64::_mm256_loadu_ps(from.as_ptr()) }
    }

    #[inline(always)]
    fn store(self, v: Self::Lanes, to: &mut [f32]) {
        let to = &mut to[..8];
        unsafe { std::arch::x86_64::_mm256_storeu_ps(to.as_mut_ptr(), v) }
    }

    #[inline(always)]
    fn mul_add(self, a: Self::Lanes, b: Self::Lanes, c: Self::Lanes) -> Self::Lanes {
        unsafe { std::arch::x86_64::_mm256_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    fn mul_add_one(self, a: f32, b: f32, c: f32) -> f32 {
        // One instruction where inlined into the kernels (compiled with FMA enabled).
        a.mul_add(b, c)
    }

    #[inline(always)]
    fn sum(self, v: Self::Lanes) -> f32 {
        let mut lanes = [0f32; 8];
        self.store(v, &mut lanes);
        lanes.iter().sum()
    }

    #[inline(always)]
    fn prefetch(self, from: &[f32], at: usize) {
        if let Some(line) = from.get(at) {
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    std::ptr::from_ref(line).cast(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use ganfit_testkit::max_abs_diff;

    use super::*;

    /// Values in [-1, 1) from a fixed seed.
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn tensor(values: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// A basis of 13 identity and 10 expression modes over two and a bit forward tiles, with a
    /// column count that is no multiple of any SIMD width.
    const SHAPE_MODES: usize = 13;
    const EXPRESSION_MODES: usize = 10;
    const COLS: usize = 2 * TILE + 37;

    fn op() -> AffineBlend {
        let modes = SHAPE_MODES + EXPRESSION_MODES;
        AffineBlend {
            basis: tensor(random(modes * COLS, 1), &[modes, COLS]),
            expression_row: SHAPE_MODES,
            offset: tensor(random(COLS, 2), &[COLS]),
            output_shape: None,
        }
    }

    /// `offset + p_s · U_s[..k_s] + p_e · U_e[..k_e]` with candle's matmul and autograd.
    fn reference(op: &AffineBlend, p_s: &Tensor, p_e: &Tensor) -> Tensor {
        let (k_s, k_e) = (p_s.dim(1).unwrap(), p_e.dim(1).unwrap());
        let u_s = op.basis.narrow(0, 0, k_s).unwrap();
        let u_e = op.basis.narrow(0, op.expression_row, k_e).unwrap();
        (p_s.matmul(&u_s).unwrap() + p_e.matmul(&u_e).unwrap())
            .unwrap()
            .broadcast_add(&op.offset)
            .unwrap()
    }

    /// The op's outputs and coefficient gradients (of `Σ weights · out`) equal those of the
    /// matmul reference, for one and several faces, all or only the first modes, and one or
    /// several rayon threads (the serial and the tiled parallel paths).
    #[test]
    fn outputs_and_gradients_match_a_matmul_reference() {
        let op = op();
        for threads in [1, 3] {
            for (batch, k_s, k_e) in [
                (1, SHAPE_MODES, EXPRESSION_MODES),
                (3, SHAPE_MODES, EXPRESSION_MODES),
                (1, 6, 3),
                (2, 11, 0),
                (2, 0, 5),
            ] {
                let seed = (batch * 100 + k_s * 10 + k_e) as u64;
                let p_s =
                    Var::from_tensor(&tensor(random(batch * k_s, seed), &[batch, k_s])).unwrap();
                let p_e = Var::from_tensor(&tensor(random(batch * k_e, seed + 1), &[batch, k_e]))
                    .unwrap();
                let weights = tensor(random(batch * COLS, seed + 2), &[batch, COLS]);
                let run = |out: Tensor| {
                    let grads = (&out * &weights)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                    (out, grad(&p_s), grad(&p_e))
                };
                let (out, grad_s, grad_e) = ganfit_testkit::on_threads(threads, || {
                    run(p_s
                        .as_tensor()
                        .apply_op2(p_e.as_tensor(), op.clone())
                        .unwrap())
                });
                let (want, want_s, want_e) = run(reference(&op, p_s.as_tensor(), p_e.as_tensor()));
                let case = format!("{threads} threads, batch {batch}, {k_s} + {k_e} modes");
                // Sums of up to 23 products of values in [-1, 1]; gradients sum over 8229.
                assert!(max_abs_diff(&out, &want) < 1e-5, "output, {case}");
                assert!(
                    max_abs_diff(&grad_s, &want_s) < 1e-3,
                    "identity gradient, {case}"
                );
                assert!(
                    max_abs_diff(&grad_e, &want_e) < 1e-3,
                    "expression gradient, {case}"
                );
            }
        }
    }

    /// Central differences of a quadratic loss of the op's output agree with its backward.
    #[test]
    fn gradients_equal_central_differences() {
        let op = op();
        let (batch, k_s, k_e) = (2, 9, 7);
        let target = tensor(random(batch * COLS, 7), &[batch, COLS]);
        let loss = |p_s: &Tensor, p_e: &Tensor| {
            (p_s.apply_op2(p_e, op.clone()).unwrap() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let s0 = random(batch * k_s, 8);
        let e0 = random(batch * k_e, 9);
        let p_s = Var::from_tensor(&tensor(s0.clone(), &[batch, k_s])).unwrap();
        let p_e = Var::from_tensor(&tensor(e0.clone(), &[batch, k_e])).unwrap();
        let grads = loss(p_s.as_tensor(), p_e.as_tensor()).backward().unwrap();
        let analytic = [&p_s, &p_e].map(|v| {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        });
        // The loss is quadratic, so central differences have no truncation error; f64 sums of
        // the f32 outputs keep rounding small against the difference.
        let h = 0.25f32;
        let loss_at = |s: Vec<f32>, e: Vec<f32>| {
            let out = tensor(s, &[batch, k_s])
                .apply_op2(&tensor(e, &[batch, k_e]), op.clone())
                .unwrap();
            (out.to_dtype(DType::F64).unwrap() - target.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (which, len) in [(0, batch * k_s), (1, batch * k_e)] {
            for i in [0, 1, len / 2, len - 1] {
                let shifted = |delta: f32| {
                    let (mut s, mut e) = (s0.clone(), e0.clone());
                    [&mut s, &mut e][which][i] += delta;
                    loss_at(s, e)
                };
                let numeric = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
                let a = analytic[which][i] as f64;
                assert!(
                    (a - numeric).abs() <= 1e-4 * numeric.abs().max(1.0),
                    "block {which}, coefficient {i}: backward {a}, central difference {numeric}"
                );
            }
        }
    }

    /// Every instruction set's primitives equal plain f64 sums, for lengths around the SIMD
    /// widths (so both the vector body and the scalar tail are covered).
    #[test]
    fn simd_primitives_equal_plain_sums() {
        fn check<S: Simd>(simd: S, name: &str) {
            for n in [0, 1, 3, 4, 7, 8, 9, 17, 33, 100] {
                let rows: [Vec<f32>; ROWS] = std::array::from_fn(|r| random(n, 20 + r as u64));
                let rows = std::array::from_fn::<_, ROWS, _>(|r| rows[r].as_slice());
                let c: [f32; ROWS] = std::array::from_fn(|r| 0.5 - r as f32);
                let g = random(n, 30);
                let start = random(n, 31);
                let mut out = start.clone();
                add_scaled_rows(simd, &mut out, c, rows);
                let dots = dot_rows(simd, &g, rows);
                let mut single = start.clone();
                add_scaled_rows(simd, &mut single, [c[0]], [rows[0]]);
                for i in 0..n {
                    let want: f64 = start[i] as f64
                        + (0..ROWS).map(|r| (c[r] * rows[r][i]) as f64).sum::<f64>();
                    assert!((out[i] as f64 - want).abs() < 1e-5, "{name} add, n {n}");
                    let want = start[i] as f64 + (c[0] * rows[0][i]) as f64;
                    assert!(
                        (single[i] as f64 - want).abs() < 1e-5,
                        "{name} add 1, n {n}"
                    );
                }
                for r in 0..ROWS {
                    let want: f64 = (0..n).map(|i| g[i] as f64 * rows[r][i] as f64).sum();
                    assert!((dots[r] as f64 - want).abs() < 1e-4, "{name} dot, n {n}");
                }
                assert_eq!(
                    dot_rows(simd, &g, [rows[1]])[0],
                    dots[1],
                    "{name} dot 1, n {n}"
                );
            }
        }
        check(Portable, "portable");
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Avx2::detect() {
            check(avx2, "avx2");
        }
    }

    /// The result takes the requested shape, and a shape of another element count is an
    /// error, not a panic.
    #[test]
    fn output_shape_is_given_or_refused() {
        let p_s = tensor(random(SHAPE_MODES, 10), &[1, SHAPE_MODES]);
        let p_e = tensor(random(EXPRESSION_MODES, 11), &[1, EXPRESSION_MODES]);
        let plain = p_s.apply_op2(&p_e, op()).unwrap();
        let shaped = AffineBlend {
            output_shape: Some((COLS, 1).into()),
            ..op()
        };
        let out = p_s.apply_op2(&p_e, shaped).unwrap();
        assert_eq!(out.dims(), [COLS, 1]);
        assert_eq!(max_abs_diff(&out.t().unwrap(), &plain), 0.0);
        let wrong = AffineBlend {
            output_shape: Some((COLS, 2).into()),
            ..op()
        };
        let error = p_s.apply_op2(&p_e, wrong).unwrap_err().to_string();
        assert!(error.contains("output of shape"), "{error}");
    }

    /// No faces, no vertices or no modes give empty or zero results, not panics.
    #[test]
    fn empty_batches_columns_and_blocks() {
        for (batch, cols, k_s, k_e) in [(0, 5, 2, 1), (2, 0, 2, 1), (2, 5, 0, 0)] {
            let op = AffineBlend {
                basis: tensor(random(4 * cols, 3), &[4, cols]),
                expression_row: 2,
                offset: tensor(random(cols, 4), &[cols]),
                output_shape: None,
            };
            let p_s = Var::from_tensor(&tensor(random(batch * k_s, 5), &[batch, k_s])).unwrap();
            let p_e = Var::from_tensor(&tensor(random(batch * k_e, 6), &[batch, k_e])).unwrap();
            let out = p_s
                .as_tensor()
                .apply_op2(p_e.as_tensor(), op.clone())
                .unwrap();
            assert_eq!(out.dims(), [batch, cols]);
            let want = op.offset.unsqueeze(0).unwrap().repeat((batch, 1)).unwrap();
            assert_eq!(max_abs_diff(&out, &want), 0.0);
            let grads = out.sum_all().unwrap().backward().unwrap();
            for (p, k) in [(&p_s, k_s), (&p_e, k_e)] {
                let grad = grads.get(p.as_tensor()).unwrap();
                assert_eq!(grad.dims(), [batch, k]);
                // Empty, or (no vertices) zero.
                let values = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(values.iter().all(|g| *g == 0.0), "{values:?}");
            }
        }
    }
}
