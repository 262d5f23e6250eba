//! Winograd F(2×2, 3×3) convolution for the identity network's 3×3, stride-1, "same" layers
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2×2 output tile comes from a 4×4 input tile with 16 multiplications per channel pair
//! instead of 36, so the matrix products shrink 2.25×; the tile transforms and the smaller,
//! less efficient products eat much of that on this network's small planes (see
//! `WINOGRAD_MIN_SIDE` in `ops`). The transforms only add and subtract (the filter transform's
//! halves are exact), so rounding stays close to a direct convolution's.
//! The input gradient of such a layer is the same kind of convolution with flipped, transposed
//! filters, so one kernel serves both directions.

use std::cell::RefCell;

use super::ops::{Epilogue, matmul};
use candle_core::WithDType;

/// Elements of a transformed 4×4 tile.
const TILE: usize = 16;

/// Transformed filters `G g Gᵀ`, stored `[16, rows, cols]` (one `rows × cols` matrix per tile
/// element).
#[derive(Debug, Clone)]
pub(crate) struct WinogradFilters<T> {
    matrices: Vec<T>,
    rows: usize,
    cols: usize,
}

impl<T: Scratch> WinogradFilters<T> {
    /// Filters for the forward pass of `weight` `[F, C, 3, 3]`: `[16, F, C]`.
    pub fn forward(weight: &[T], filters: usize, channels: usize) -> Self {
        Self::transform(weight, filters, channels, |f, c, ky, kx| {
            ((f * channels + c) * 3 + ky) * 3 + kx
        })
    }

    /// Filters for the input gradient of `weight` `[F, C, 3, 3]`: the correlation with
    /// `w'[c, f, a, b] = w[f, c, 2 − a, 2 − b]`, `[16, C, F]`.
    pub fn input_gradient(weight: &[T], filters: usize, channels: usize) -> Self {
        Self::transform(weight, channels, filters, |c, f, a, b| {
            ((f * channels + c) * 3 + 2 - a) * 3 + 2 - b
        })
    }

    /// `G g Gᵀ` with `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]` for the 3×3 kernel
    /// `g(ky, kx) = weight[index(row, col, ky, kx)]` of every (row, col) pair, computed in f64.
    fn transform(
        weight: &[T],
        rows: usize,
        cols: usize,
        index: impl Fn(usize, usize, usize, usize) -> usize,
    ) -> Self {
        let g_rows = |g: [f64; 3]| {
            [
                g[0],
                (g[0] + g[1] + g[2]) / 2.0,
                (g[0] - g[1] + g[2]) / 2.0,
                g[2],
            ]
        };
        let mut matrices = vec![T::zero(); TILE * rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let g = |ky: usize, kx: usize| weight[index(r, c, ky, kx)].to_f64();
                // G g: 4×3, one column at a time.
                let columns: [[f64; 4]; 3] =
                    std::array::from_fn(|kx| g_rows([g(0, kx), g(1, kx), g(2, kx)]));
                for i in 0..4 {
                    let row = g_rows([columns[0][i], columns[1][i], columns[2][i]]);
                    for (j, value) in row.into_iter().enumerate() {
                        matrices[((i * 4 + j) * rows + r) * cols + c] = T::from_f64(value);
                    }
                }
            }
        }
        Self {
            matrices,
            rows,
            cols,
        }
    }

    /// `out[f] = epilogue(Σ_c filters[f, c] ⋆ src[c])`, a "same" 3×3 correlation of the
    /// `[C, H, W]` planes `src` of one image (each element zeroed where `gate` is not positive,
    /// for the gradient of a ReLU), into `out` `[F, H, W]`.
    pub fn apply(
        &self,
        src: &[T],
        gate: Option<&[T]>,
        (height, width): (usize, usize),
        epilogue: &Epilogue<'_, T>,
        out: &mut [T],
    ) {
        let channels = self.cols;
        let tiles = Tiles::new(height, width);
        T::with_scratch(|transformed, products| {
            let total = tiles.total();
            let transformed = fit(transformed, TILE * channels * total);
            transform_input(src, gate, channels, &tiles, transformed);
            let transformed: &[T] = transformed;
            let products = fit(products, TILE * self.rows * total);
            // For each tile element ξ, [F, C] · [C, tiles] into products laid out [16, F, tiles].
            for (xi, product) in products.chunks_mut(self.rows * total).enumerate() {
                matmul(
                    (product, total),
                    (&self.matrices[xi * self.rows * channels..], channels),
                    (&transformed[xi * total..], TILE * total),
                    (self.rows, channels, total),
                );
            }
            transform_output(products, self.rows, &tiles, epilogue, out);
        });
    }
}

/// Element types with per-thread scratch buffers for the convolutions' intermediates (transformed
/// tiles and their products, im2col columns): these are several times the size of a layer's
/// input and output, so reusing them saves the allocator's zeroing and page faults on every
/// layer. Each thread that runs the network keeps the largest (about 1.3 MB for f32, from the
/// 35×35 layers' Winograd products) until it exits.
pub(crate) trait Scratch: WithDType {
    /// Calls `f` with two buffers of any length and contents, this thread's own unless `f` is
    /// already running on this thread.
    fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>, &mut Vec<Self>) -> R) -> R;
}

macro_rules! scratch {
    ($($t:ty),*) => {$(
        impl Scratch for $t {
            fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>, &mut Vec<Self>) -> R) -> R {
                thread_local! {
                    static BUFFERS: RefCell<(Vec<$t>, Vec<$t>)> = const {
                        RefCell::new((Vec::new(), Vec::new()))
                    };
                }
                BUFFERS.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut buffers) => {
                        let (a, b) = &mut *buffers;
                        f(a, b)
                    }
                    Err(_) => f(&mut Vec::new(), &mut Vec::new()),
                })
            }
        }
    )*};
}
scratch!(f32, f64);

/// The first `len` elements of `buffer`, grown if needed; old contents are left as they are
/// (every user overwrites all of them).
pub(crate) fn fit<T: WithDType>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.resize(len, T::zero());
    }
    &mut buffer[..len]
}

/// How a `height × width` plane splits into 2×2 output tiles.
struct Tiles {
    height: usize,
    width: usize,
    /// Tile rows and columns.
    rows: usize,
    cols: usize,
}

impl Tiles {
    fn new(height: usize, width: usize) -> Self {
        Self {
            height,
            width,
            rows: height.div_ceil(2),
            cols: width.div_ceil(2),
        }
    }

    fn total(&self) -> usize {
        self.rows * self.cols
    }
}

/// Defines `$avx2`, on x86-64 only: the function `$name` (which must be `#[inline(always)]`, as
/// must everything it calls) compiled for AVX2. The build targets baseline x86-64 (SSE2), where
/// the transforms' elementwise loops handle 4 floats at a time; compiled for AVX2 they handle 8.
macro_rules! avx2_twin {
    ($avx2:ident = $name:ident ($($arg:ident: $ty:ty),* $(,)?)) => {
        #[doc = concat!("[`", stringify!($name), "`] compiled for AVX2.")]
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2<T: WithDType>($($arg: $ty),*) {
            $name($($arg),*)
        }
    };
}

/// Whether the CPU has AVX2 (the standard library caches the answer).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

/// `Bᵀ d B` of every 4×4 input tile `d` (rows and columns from `2t − 1`, zero outside the
/// plane), with `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`, written to
/// `out` laid out `[C, 16, tiles]`.
fn transform_input<T: WithDType>(
    src: &[T],
    gate: Option<&[T]>,
    channels: usize,
    tiles: &Tiles,
    out: &mut [T],
) {
    // The plane with a zero border of one pixel, rounded up to whole tiles, is split into four
    // quarters by row and column parity, each `(rows + 1) × (cols + 1)`. Element (i, k) of
    // tile (ty, tx) is then quarter (i % 2, k % 2) at (ty + i / 2, tx + k / 2): with tiles
    // numbered ty·(cols + 1) + tx (one unused tile per row), every element of every tile is a
    // shifted contiguous run of a quarter, so each step below is one loop over the whole plane.
    let half = tiles.cols + 1;
    let quarter = (tiles.rows + 1) * half;
    let spread = tiles.rows * half;
    let plane = tiles.height * tiles.width;
    // One element more: the unused tile of the last row reads one past the last quarter.
    let mut quarters = vec![T::zero(); 4 * quarter + 1];
    let mut work = vec![T::zero(); 2 * TILE * spread];
    let avx2 = has_avx2();
    for (c, dst) in out
        .chunks_mut(TILE * tiles.total())
        .enumerate()
        .take(channels)
    {
        let channel = InputChannel {
            src: &src[c * plane..][..plane],
            gate: gate.map(|gate| &gate[c * plane..][..plane]),
            tiles,
            quarters: &mut quarters,
            work: &mut work,
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2, the only requirement of the function.
            unsafe { transform_input_channel_avx2(channel, dst) };
            continue;
        }
        let _ = avx2;
        transform_input_channel(channel, dst);
    }
}

/// One channel's plane, its gate and the work buffers of its input transform.
struct InputChannel<'a, T> {
    src: &'a [T],
    gate: Option<&'a [T]>,
    tiles: &'a Tiles,
    quarters: &'a mut [T],
    work: &'a mut [T],
}

/// The input transform of one channel into `dst` (`[16, tiles]`).
#[inline(always)]
fn transform_input_channel<T: WithDType>(channel: InputChannel<'_, T>, dst: &mut [T]) {
    let InputChannel {
        src,
        gate,
        tiles,
        quarters,
        work,
    } = channel;
    let (h, w) = (tiles.height, tiles.width);
    let half = tiles.cols + 1;
    let quarter = (tiles.rows + 1) * half;
    let spread = tiles.rows * half;
    for y in 0..h {
        let from = y * w;
        // Padded row y + 1; padded columns 2j + 1 (odd) and 2j + 2 (even) hold
        // pixels 2j and 2j + 1.
        let (row, parity) = (y.div_ceil(2) * half, (y + 1) % 2);
        let (even, odd) = quarters[2 * parity * quarter..][..2 * quarter].split_at_mut(quarter);
        let pairs = src[from..from + w].chunks(2);
        let (even, odd) = (
            &mut even[row + 1..][..w / 2],
            &mut odd[row..][..w.div_ceil(2)],
        );
        match gate {
            Some(gate) => {
                let open = |v: T, g: T| if g > T::zero() { v } else { T::zero() };
                let gates = gate[from..from + w].chunks(2);
                for (j, (pair, g)) in pairs.zip(gates).enumerate() {
                    odd[j] = open(pair[0], g[0]);
                    if let (Some(e), Some(&v)) = (even.get_mut(j), pair.get(1)) {
                        *e = open(v, g[1]);
                    }
                }
            }
            None => {
                for (j, pair) in pairs.enumerate() {
                    odd[j] = pair[0];
                    if let (Some(e), Some(&v)) = (even.get_mut(j), pair.get(1)) {
                        *e = v;
                    }
                }
            }
        }
    }
    let d = |i: usize, k: usize| {
        let base = (2 * (i % 2) + k % 2) * quarter + (i / 2) * half + k / 2;
        &quarters[base..base + spread]
    };
    let (columns, rows) = work.split_at_mut(TILE * spread);
    // d B: the combination of the columns of each row i, into columns[4i + k].
    for i in 0..4 {
        let [c0, c1, c2, c3] = split4(&mut columns[4 * i * spread..][..4 * spread]);
        combine_b([d(i, 0), d(i, 1), d(i, 2), d(i, 3)], [c0, c1, c2, c3]);
    }
    // Bᵀ (d B): the same combination of the rows, into rows[4i + k].
    for k in 0..4 {
        let c = |i: usize| &columns[(4 * i + k) * spread..][..spread];
        let (r01, r23) = rows.split_at_mut(8 * spread);
        let (r0, r1) = r01.split_at_mut(4 * spread);
        let (r2, r3) = r23.split_at_mut(4 * spread);
        let at = k * spread;
        combine_b(
            [c(0), c(1), c(2), c(3)],
            [
                &mut r0[at..at + spread],
                &mut r1[at..at + spread],
                &mut r2[at..at + spread],
                &mut r3[at..at + spread],
            ],
        );
    }
    // Drop the unused tile of each row while copying out.
    for (xi, values) in rows.chunks(spread).enumerate() {
        let row = &mut dst[xi * tiles.total()..][..tiles.total()];
        for (to, from) in row.chunks_mut(tiles.cols).zip(values.chunks(half)) {
            to.copy_from_slice(&from[..tiles.cols]);
        }
    }
}

avx2_twin!(transform_input_channel_avx2 = transform_input_channel(channel: InputChannel<'_, T>, dst: &mut [T]));

/// Four equal consecutive parts of `values`.
#[inline(always)]
fn split4<T>(values: &mut [T]) -> [&mut [T]; 4] {
    let n = values.len() / 4;
    let (a, rest) = values.split_at_mut(n);
    let (b, rest) = rest.split_at_mut(n);
    let (c, d) = rest.split_at_mut(n);
    [a, b, c, &mut d[..n]]
}

/// One `Bᵀ` (or `B`) combination, elementwise over runs: `[d0 − d2, d1 + d2, d2 − d1, d1 − d3]`.
#[inline(always)]
fn combine_b<T: WithDType>(d: [&[T]; 4], out: [&mut [T]; 4]) {
    let [o0, o1, o2, o3] = out;
    let n = o0.len();
    let (d0, d1, d2, d3) = (&d[0][..n], &d[1][..n], &d[2][..n], &d[3][..n]);
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for t in 0..n {
        o0[t] = d0[t] - d2[t];
        o1[t] = d1[t] + d2[t];
        o2[t] = d2[t] - d1[t];
        o3[t] = d1[t] - d3[t];
    }
}

/// One `Aᵀ` (or `A`) combination, elementwise over runs: `[m0 + m1 + m2, m1 − m2 − m3]`.
#[inline(always)]
fn combine_a<T: WithDType>(m: [&[T]; 4], out: [&mut [T]; 2]) {
    let [o0, o1] = out;
    let n = o0.len();
    let (m0, m1, m2, m3) = (&m[0][..n], &m[1][..n], &m[2][..n], &m[3][..n]);
    let o1 = &mut o1[..n];
    for t in 0..n {
        o0[t] = m0[t] + m1[t] + m2[t];
        o1[t] = m1[t] - m2[t] - m3[t];
    }
}

/// `Aᵀ m A` of every transformed tile, `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`, cropped to the
/// planes and finished by `epilogue`, into `out` `[F, H, W]`.
fn transform_output<T: WithDType>(
    products: &[T],
    outputs: usize,
    tiles: &Tiles,
    epilogue: &Epilogue<'_, T>,
    out: &mut [T],
) {
    let plane = tiles.height * tiles.width;
    let mut work = vec![T::zero(); 12 * tiles.total()];
    let avx2 = has_avx2();
    for (f, dst) in out.chunks_mut(plane).enumerate().take(outputs) {
        let context = OutputPlane {
            products,
            outputs,
            tiles,
            epilogue,
            f,
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2, the only requirement of the function.
            unsafe { transform_output_plane_avx2(&context, &mut work, dst) };
            continue;
        }
        let _ = avx2;
        transform_output_plane(&context, &mut work, dst);
    }
}

/// What one output plane's transform reads.
struct OutputPlane<'a, T> {
    products: &'a [T],
    outputs: usize,
    tiles: &'a Tiles,
    epilogue: &'a Epilogue<'a, T>,
    /// The plane's filter.
    f: usize,
}

/// The output transform of one plane into `dst`.
#[inline(always)]
fn transform_output_plane<T: WithDType>(
    context: &OutputPlane<'_, T>,
    work: &mut [T],
    dst: &mut [T],
) {
    let OutputPlane {
        products,
        outputs,
        tiles,
        epilogue,
        f,
    } = *context;
    let n = tiles.total();
    let w = tiles.width;
    let m = |xi: usize| &products[(xi * outputs + f) * n..][..n];
    // Each step is one loop over all the plane's tiles, element by element.
    let (rows, corners) = work.split_at_mut(8 * n);
    // Aᵀ m: rows[k] and rows[4 + k] from column k of the four rows.
    for k in 0..4 {
        let (r0, r1) = rows.split_at_mut(4 * n);
        combine_a(
            [m(k), m(4 + k), m(8 + k), m(12 + k)],
            [&mut r0[k * n..][..n], &mut r1[k * n..][..n]],
        );
    }
    // (Aᵀ m) A: the four outputs of every tile, corners[2·dy + dx].
    for dy in 0..2 {
        let r = |k: usize| &rows[(4 * dy + k) * n..][..n];
        let (left, right) = corners[2 * dy * n..][..2 * n].split_at_mut(n);
        combine_a([r(0), r(1), r(2), r(3)], [left, right]);
    }
    let corner = |dy: usize, dx: usize| &corners[(2 * dy + dx) * n..][..n];
    for (y, row) in dst.chunks_mut(w).enumerate() {
        let first = y / 2 * tiles.cols;
        let left = &corner(y % 2, 0)[first..][..tiles.cols];
        let right = &corner(y % 2, 1)[first..][..tiles.cols];
        for (pair, (&l, &r)) in row.chunks_mut(2).zip(left.iter().zip(right)) {
            pair[0] = l;
            if let Some(second) = pair.get_mut(1) {
                *second = r;
            }
        }
        epilogue.finish(f, (f * tiles.height + y) * w, row);
    }
}

avx2_twin!(transform_output_plane_avx2 = transform_output_plane(context: &OutputPlane<'_, T>, work: &mut [T], dst: &mut [T]));
