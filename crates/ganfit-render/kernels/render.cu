// GPU kernels of ganfit-render's custom ops (called from src/cuda.rs).
//
// Each kernel mirrors its CPU kernel in src/*.rs operation for operation, and build.rs compiles
// this file with contraction of multiply-adds into FMAs turned off, so that coverage, triangle ids
// and every forward value come out bit-identical to the CPU; only sums that the GPU accumulates
// with atomics (gradients) differ, by summation order.
//
// Every kernel is one thread per item over a 1-D grid (item = pixel, sample or triangle), and only
// the sums of many items into few values use warps and shared memory, in GPU-only code paths:
// tests/cuda_kernels_on_host.rs compiles this very file for the host, one item at a time, and
// compares it with the CPU ops, which is how it is checked on machines without a GPU.
//
// Kernels come in f32 and f64 instances, named `<kernel>_f32` / `<kernel>_f64`.

#include <stdint.h>

// CUDA's 64-bit atomicMin takes unsigned long long, which uint64_t is not on LP64 hosts.
typedef unsigned long long depth_key_t;

#define ITEM_INDEX(n)                                                   \
    const int64_t item = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; \
    if (item >= (int64_t)(n)) return;

// ---------------------------------------------------------------------------------------------
// Shared helpers

// Adds `value` to `*dst` for every thread of the warp. Where all 32 threads add to the same
// address (a per-image sum such as the light's gradient) the warp sums first and one thread
// adds, since 32 atomics on one address serialise: the SH light gradient of a 512x512 image
// took 8 ms as 7 M single atomics. Every thread of the warp must call it (no early return
// before); the host emulation runs one item at a time and adds directly.
template <typename T>
__device__ __forceinline__ void warp_atomic_add(T* dst, T value) {
#ifdef __CUDA_ARCH__
    const unsigned long long address = (unsigned long long)dst;
    if (__all_sync(0xffffffffu, __shfl_sync(0xffffffffu, address, 0) == address)) {
        for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
        if ((threadIdx.x & 31) == 0) atomicAdd(dst, value);
        return;
    }
#endif
    atomicAdd(dst, value);
}

// Adds `values[k]` to `dst[k]` (k < N) for every thread of the block. Where the whole block adds
// to the same `dst` (`uniform`, which must be the same for every thread of the block), each
// warp sums, the warps' sums meet in shared memory and N threads add them: one atomic per block
// and value. Per-warp atomics alone were too many for a per-image sum such as the SH light's
// gradient (27 values, 8192 warps at 512x512: its backward kernel took 0.32 ms on an H100, the
// renderer's largest; 16 us this way). Every thread of the block must call it, the same number
// of times.
// The host emulation adds directly.
template <typename T, int N>
__device__ __forceinline__ void block_atomic_add(T* dst, const T values[N], bool uniform) {
#ifdef __CUDA_ARCH__
    if (uniform) {
        __shared__ T warp_sums[32][N];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
        for (int k = 0; k < N; ++k) {
            T value = values[k];
            for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
            if (lane == 0) warp_sums[warp][k] = value;
        }
        __syncthreads();
        if (threadIdx.x < N) {
            T sum = (T)0;
            for (int w = 0; w < warps; ++w) sum += warp_sums[w][threadIdx.x];
            atomicAdd(dst + threadIdx.x, sum);
        }
        // The next call writes `warp_sums` again.
        __syncthreads();
        return;
    }
#endif
    for (int k = 0; k < N; ++k) warp_atomic_add(dst + k, values[k]);
}

// Rust's saturating float -> integer casts (NaN -> 0); a plain C cast is undefined out of range.
__device__ __forceinline__ int saturate_i32(double x) {
    if (!(x == x)) return 0;
    if (x <= -2147483648.0) return (-2147483647 - 1);
    if (x >= 2147483647.0) return 2147483647;
    return (int)x;
}

__device__ __forceinline__ int64_t saturate_i64(double x) {
    if (!(x == x)) return 0;
    if (x <= -9223372036854775808.0) return (-9223372036854775807LL - 1);
    if (x >= 9223372036854775807.0) return 9223372036854775807LL;
    return (int64_t)x;
}

// Centre of pixel `i` of `n` in normalised device coordinates, computed in f64 like the CPU.
template <typename T>
__device__ __forceinline__ T pixel_centre(int64_t i, int64_t n) {
    return (T)((double)(2 * i + 1) / (double)n - 1.0);
}

template <typename T>
__device__ __forceinline__ void cross3(const T a[3], const T b[3], T out[3]) {
    out[0] = a[1] * b[2] - a[2] * b[1];
    out[1] = a[2] * b[0] - a[0] * b[2];
    out[2] = a[0] * b[1] - a[1] * b[0];
}

template <typename T>
__device__ __forceinline__ T dot3(const T a[3], const T b[3]) {
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

// The triangle index stored in a rast id channel, or -1 where nothing is drawn.
template <typename T>
__device__ __forceinline__ int64_t triangle_at(T id) {
    double v = (double)id;
    return v >= 1.0 ? saturate_i64(v) - 1 : -1;
}

// ---------------------------------------------------------------------------------------------
// Rasterize: setup per triangle, depth then id per covered centre (atomic minima), then a
// per-pixel pass that writes (u, v, z/w, id + 1) from the winning triangle's setup.

#define FRONT 1
#define BEYOND_FAR 2
#define BEFORE_NEAR 4

// Per triangle and image: 9 edge coefficients then the corners' clip (z, w) (see `Setup::depth`
// in src/raster.rs for why not the depth plane).
#define SETUP_FLOATS 15
// Per triangle and image: pixel box x0, x1, y0, y1 (x0 > x1 when it covers nothing), and the
// tie-ownership bits of the three edges.
#define SETUP_INTS 5

__device__ __forceinline__ int span_first(double lo, int64_t size) {
    return saturate_i32(ceil((lo + 1.0) * (double)size * 0.5 - 0.5 - 1e-3));
}

__device__ __forceinline__ int span_last(double hi, int64_t size) {
    return saturate_i32(floor(fmin((hi + 1.0) * (double)size * 0.5 - 0.5 + 1e-3, (double)size - 1.0)));
}

template <typename T>
__device__ unsigned vertex_flags(const T c[4]) {
    bool front = c[3] > (T)0 && c[2] >= -c[3];
    unsigned flags = front ? FRONT : 0;
    if (c[2] > c[3]) flags |= BEYOND_FAR;
    if (c[2] < -c[3]) flags |= BEFORE_NEAR;
    return flags;
}

template <typename T>
__device__ void vertex_span(const T c[4], int64_t w, int64_t h, int span[4]) {
    T inv_w = (T)1 / c[3];
    double x = (double)(c[0] * inv_w), y = (double)(c[1] * inv_w);
    span[0] = span_first(x, w);
    span[1] = span_last(x, w);
    span[2] = span_first(y, h);
    span[3] = span_last(y, h);
}

// NDC bounds of the part of the triangle in front of the near plane; false when it is wholly
// outside a side plane.
__device__ bool clipped_bounds(const double v[3][4], double lo[2], double hi[2]) {
    for (int axis = 0; axis < 2; ++axis) {
        bool all_above = true, all_below = true;
        for (int i = 0; i < 3; ++i) {
            all_above = all_above && v[i][axis] > v[i][3];
            all_below = all_below && v[i][axis] < -v[i][3];
        }
        if (all_above || all_below) return false;
    }
    lo[0] = lo[1] = 1.0 / 0.0;
    hi[0] = hi[1] = -1.0 / 0.0;
    for (int i = 0; i < 3; ++i) {
        const double* p = v[i];
        const double* q = v[(i + 1) % 3];
        double dp = p[2] + p[3], dq = q[2] + q[3];
        double points[2][4];
        int count = 0;
        if (dp >= 0.0) {
            for (int k = 0; k < 4; ++k) points[count][k] = p[k];
            ++count;
        }
        if ((dp >= 0.0) != (dq >= 0.0)) {
            double t = dp / (dp - dq);
            for (int k = 0; k < 4; ++k) points[count][k] = p[k] + t * (q[k] - p[k]);
            ++count;
        }
        for (int n = 0; n < count; ++n) {
            const double* c = points[n];
            if (!(c[3] == c[3]) || c[3] <= 0.0) {
                lo[0] = lo[1] = -1.0;
                hi[0] = hi[1] = 1.0;
            }
            for (int k = 0; k < 2; ++k) {
                lo[k] = fmin(lo[k], c[k] / c[3]);
                hi[k] = fmax(hi[k], c[k] / c[3]);
            }
        }
    }
    return true;
}

// One thread per (image, triangle): bounding box, edge functions and depth plane.
template <typename T>
__device__ void raster_setup(const T* clip, const uint32_t* tris, int batch, int nv, int nt,
                             int height, int width, int cull_backfaces, T* setups, int* boxes) {
    ITEM_INDEX((int64_t)batch * nt);
    const int64_t b = item / nt, t = item % nt;
    int* box = boxes + item * SETUP_INTS;
    box[0] = 1;
    box[1] = 0;
    T v[3][4];
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 4; ++k) v[i][k] = clip[((int64_t)b * nv + tris[t * 3 + i]) * 4 + k];
    unsigned flags[3] = {vertex_flags(v[0]), vertex_flags(v[1]), vertex_flags(v[2])};
    unsigned all = flags[0] & flags[1] & flags[2];
    if (all & (BEYOND_FAR | BEFORE_NEAR)) return;
    int span[4];
    if (all & FRONT) {
        int s[3][4];
        for (int i = 0; i < 3; ++i) vertex_span(v[i], width, height, s[i]);
        for (int k = 0; k < 4; k += 2) {
            span[k] = min(min(s[0][k], s[1][k]), s[2][k]);
            span[k + 1] = max(max(s[0][k + 1], s[1][k + 1]), s[2][k + 1]);
        }
    } else {
        double wide[3][4], lo[2], hi[2];
        for (int i = 0; i < 3; ++i)
            for (int k = 0; k < 4; ++k) wide[i][k] = (double)v[i][k];
        if (!clipped_bounds(wide, lo, hi)) return;
        span[0] = span_first(lo[0], width);
        span[1] = span_last(hi[0], width);
        span[2] = span_first(lo[1], height);
        span[3] = span_last(hi[1], height);
    }
    int x0 = max(span[0], 0), y0 = max(span[2], 0);
    if (span[1] < x0 || span[3] < y0) return;

    // Homogeneous 2D edge functions e_i = (x, y, 1) . (a_j x a_k), a_i = (x_i, y_i, w_i).
    T a[3][3];
    for (int i = 0; i < 3; ++i) {
        a[i][0] = v[i][0];
        a[i][1] = v[i][1];
        a[i][2] = v[i][3];
    }
    T edges[3][3];
    cross3(a[1], a[2], edges[0]);
    cross3(a[2], a[0], edges[1]);
    cross3(a[0], a[1], edges[2]);
    T det = dot3(a[0], edges[0]);
    if (!isfinite((double)det) || det == (T)0 || (cull_backfaces && det > (T)0)) return;
    T sign = det > (T)0 ? (T)1 : (T)-1;
    unsigned owns = 0;
    for (int i = 0; i < 3; ++i) {
        for (int k = 0; k < 3; ++k) edges[i][k] *= sign;
        if (edges[i][0] > (T)0 || (edges[i][0] == (T)0 && edges[i][1] > (T)0)) owns |= 1u << i;
    }
    T* s = setups + item * SETUP_FLOATS;
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 3; ++k) s[i * 3 + k] = edges[i][k];
    for (int i = 0; i < 3; ++i) {
        s[9 + 2 * i] = v[i][2];
        s[10 + 2 * i] = v[i][3];
    }
    box[0] = x0;
    box[1] = span[1];
    box[2] = y0;
    box[3] = span[3];
    box[4] = (int)owns;
}

// z/w at a covered centre with edge values e, as the CPU's `depth_at`.
template <typename T>
__device__ __forceinline__ T depth_at(const T* s, const T e[3]) {
    T z = e[0] * s[9] + e[1] * s[11] + e[2] * s[13];
    T w = e[0] * s[10] + e[1] * s[12] + e[2] * s[14];
    return z / w;
}

// Whether the centre (px, py) is covered, and its edge values and depth, exactly as the CPU's
// `draw` computes them (row terms first, then columns).
template <typename T>
__device__ __forceinline__ bool covers(const T* s, unsigned owns, T px, T py, T e[3], T* z) {
    for (int i = 0; i < 3; ++i) {
        T row = s[i * 3 + 1] * py + s[i * 3 + 2];
        e[i] = s[i * 3] * px + row;
        bool inside = (owns >> i) & 1u ? e[i] >= (T)0 : e[i] > (T)0;
        if (!inside) return false;
    }
    T sum = e[0] + e[1] + e[2];
    if (sum <= (T)0) return false;
    *z = depth_at(s, e);
    return *z >= (T)-1 && *z <= (T)1;
}

// Unsigned keys that order like the depths (-0 and +0 are one depth, as on the CPU).
__device__ __forceinline__ depth_key_t depth_key(double z) {
    z = z + 0.0;
    int64_t bits = __double_as_longlong(z);
    return bits < 0 ? ~(depth_key_t)bits : ((depth_key_t)bits | 0x8000000000000000ull);
}

// mode 0: nearest depth per pixel into `depth`; mode 1: lowest triangle index among those at
// that depth into `ids`.
template <typename T>
__device__ void raster_draw(const T* setups, const int* boxes, int batch, int nt, int height,
                            int width, int mode, depth_key_t* depth, uint32_t* ids) {
    ITEM_INDEX((int64_t)batch * nt);
    const int64_t b = item / nt, t = item % nt;
    const int* box = boxes + item * SETUP_INTS;
    if (box[0] > box[1]) return;
    const T* s = setups + item * SETUP_FLOATS;
    const unsigned owns = (unsigned)box[4];
    const int64_t image = b * height * width;
    for (int y = box[2]; y <= box[3]; ++y) {
        T py = pixel_centre<T>(y, height);
        for (int x = box[0]; x <= box[1]; ++x) {
            T e[3], z;
            if (!covers(s, owns, pixel_centre<T>(x, width), py, e, &z)) continue;
            int64_t p = image + (int64_t)y * width + x;
            depth_key_t key = depth_key((double)z);
            if (mode == 0)
                atomicMin(depth + p, key);
            else if (depth[p] == key)
                atomicMin(ids + p, (uint32_t)t);
        }
    }
}

__device__ void raster_clear(int64_t pixels, depth_key_t* depth, uint32_t* ids) {
    ITEM_INDEX(pixels);
    depth[item] = ~0ull;
    ids[item] = ~0u;
}

// One thread per pixel: the winning triangle's barycentrics, depth and id + 1, or zeros.
template <typename T>
__device__ void raster_resolve(const T* setups, const uint32_t* ids, int batch, int nt,
                               int height, int width, T* rast) {
    ITEM_INDEX((int64_t)batch * height * width);
    T* out = rast + item * 4;
    const uint32_t t = ids[item];
    out[0] = out[1] = out[2] = out[3] = (T)0;
    if (t == ~0u) return;
    const int64_t b = item / ((int64_t)height * width);
    const int64_t pixel = item % ((int64_t)height * width);
    const T* s = setups + ((int64_t)b * nt + t) * SETUP_FLOATS;
    T py = pixel_centre<T>(pixel / width, height), px = pixel_centre<T>(pixel % width, width);
    T e[3];
    for (int i = 0; i < 3; ++i) {
        T row = s[i * 3 + 1] * py + s[i * 3 + 2];
        e[i] = s[i * 3] * px + row;
    }
    T sum = e[0] + e[1] + e[2];
    out[0] = e[0] / sum;
    out[1] = e[1] / sum;
    out[2] = depth_at(s, e);
    out[3] = (T)((double)t + 1.0);
}

// One thread per pixel: the pixel's part of d clip_pos (see RasterizeGrad in src/raster.rs; the
// CPU sums the per-pixel terms of a triangle before the cross products, here each pixel does
// its own and adds the result atomically).
template <typename T>
__device__ void raster_grad(const T* clip, const uint32_t* tris, const T* rast, const T* grad,
                            int batch, int nv, int height, int width, T* out) {
    ITEM_INDEX((int64_t)batch * height * width);
    const T* px = rast + item * 4;
    const T* g = grad + item * 4;
    const int64_t t = triangle_at(px[3]);
    if (t < 0) return;
    if (g[0] == (T)0 && g[1] == (T)0 && g[2] == (T)0) return;
    const int64_t b = item / ((int64_t)height * width);
    const int64_t pixel = item % ((int64_t)height * width);
    const T x = pixel_centre<T>(pixel % width, width), y = pixel_centre<T>(pixel / width, height);
    const uint32_t* tri = tris + t * 3;
    T v[3][4];
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 4; ++k) v[i][k] = clip[((int64_t)b * nv + tri[i]) * 4 + k];
    const T bary[3] = {px[0], px[1], (T)1 - px[0] - px[1]};
    const T zw = px[2];
    const T w_p = bary[0] * v[0][3] + bary[1] * v[1][3] + bary[2] * v[2][3];
    const T g_zw = g[2] == (T)0 ? (T)0 : g[2] / w_p;
    const T g_bary[3] = {g[0] + g_zw * (v[0][2] - zw * v[0][3]), g[1] + g_zw * (v[1][2] - zw * v[1][3]),
                         g_zw * (v[2][2] - zw * v[2][3])};
    const T g_dot = g_bary[0] * bary[0] + g_bary[1] * bary[1] + g_bary[2] * bary[2];
    T terms[3][5];
    for (int i = 0; i < 3; ++i) {
        T g_e_det = (g_bary[i] - g_dot) * w_p;
        terms[i][0] = g_e_det * x;
        terms[i][1] = g_e_det * y;
        terms[i][2] = g_e_det;
        terms[i][3] = g_zw * bary[i];
        terms[i][4] = g_zw * bary[i] * zw;
    }
    T a[3][3];
    for (int i = 0; i < 3; ++i) {
        a[i][0] = v[i][0];
        a[i][1] = v[i][1];
        a[i][2] = v[i][3];
    }
    T c12[3];
    cross3(a[1], a[2], c12);
    const T inv_det = (T)1 / dot3(a[0], c12);
    T lever[3][3];
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 3; ++k) lever[i][k] = terms[i][k] * inv_det;
    for (int m = 0; m < 3; ++m) {
        const int prev = (m + 2) % 3, next = (m + 1) % 3;
        T p[3], q[3];
        cross3(a[next], lever[prev], p);
        cross3(a[prev], lever[next], q);
        T* d = out + ((int64_t)b * nv + tri[m]) * 4;
        atomicAdd(d + 0, p[0] - q[0]);
        atomicAdd(d + 1, p[1] - q[1]);
        atomicAdd(d + 2, terms[m][3]);
        atomicAdd(d + 3, (p[2] - q[2]) - terms[m][4]);
    }
}

// ---------------------------------------------------------------------------------------------
// Interpolate: attributes [A, V, C] (A = 1 or B) at the rasterised barycentrics.

// The corners of the pixel's triangle, or false where it has none (ids beyond the triangle
// list count as none on the GPU; the CPU reports them as an error).
template <typename T>
__device__ __forceinline__ bool pixel_triangle(const T* px, const uint32_t* tris, int nt, uint32_t corner[3]) {
    const int64_t t = triangle_at(px[3]);
    if (t < 0 || t >= nt) return false;
    for (int i = 0; i < 3; ++i) corner[i] = tris[t * 3 + i];
    return true;
}

template <typename T>
__device__ void interpolate_fwd(const T* attr, const T* rast, const uint32_t* tris, int nt,
                                int attr_batch, int nv, int c, int64_t pixels, int64_t total, T* out) {
    ITEM_INDEX(total);
    const T* px = rast + item * 4;
    T* dst = out + item * c;
    for (int k = 0; k < c; ++k) dst[k] = (T)0;
    uint32_t corner[3];
    if (!pixel_triangle(px, tris, nt, corner)) return;
    const int64_t base = attr_batch == 1 ? 0 : item / pixels * nv * c;
    const T wt[3] = {px[0], px[1], (T)1 - px[0] - px[1]};
    for (int i = 0; i < 3; ++i) {
        const T* row = attr + base + (int64_t)corner[i] * c;
        for (int k = 0; k < c; ++k) dst[k] += wt[i] * row[k];
    }
}

// d attr (atomic, into g_attr [A, V, C]) and d rast (g_rast [B, H, W, 4]) per pixel.
template <typename T>
__device__ void interpolate_bwd(const T* attr, const T* rast, const T* grad, const uint32_t* tris,
                                int nt, int attr_batch, int nv, int c, int64_t pixels, int64_t total,
                                T* g_attr, T* g_rast) {
    ITEM_INDEX(total);
    const T* px = rast + item * 4;
    const T* g = grad + item * c;
    uint32_t corner[3];
    if (!pixel_triangle(px, tris, nt, corner)) return;
    bool any = false;
    for (int k = 0; k < c; ++k) any = any || g[k] != (T)0;
    if (!any) return;
    const int64_t base = attr_batch == 1 ? 0 : item / pixels * nv * c;
    const T* a0 = attr + base + (int64_t)corner[0] * c;
    const T* a1 = attr + base + (int64_t)corner[1] * c;
    const T* a2 = attr + base + (int64_t)corner[2] * c;
    T du = (T)0, dv = (T)0;
    for (int k = 0; k < c; ++k) {
        du += g[k] * (a0[k] - a2[k]);
        dv += g[k] * (a1[k] - a2[k]);
    }
    g_rast[item * 4] = du;
    g_rast[item * 4 + 1] = dv;
    const T wt[3] = {px[0], px[1], (T)1 - px[0] - px[1]};
    for (int i = 0; i < 3; ++i) {
        T* dst = g_attr + base + (int64_t)corner[i] * c;
        for (int k = 0; k < c; ++k) atomicAdd(dst + k, wt[i] * g[k]);
    }
}

// ---------------------------------------------------------------------------------------------
// Texture: bilinear samples of [Bt, Ht, Wt, C] at uv [B, H, W, 2] (texel centres at
// (i + 0.5) / size), clamp (wrap = 0) or wrap (wrap = 1) addressing.

template <typename T>
__device__ __forceinline__ T axis_taps(T coord, int64_t size, int wrap, int64_t taps[2]) {
    T x = coord * (T)(double)size - (T)0.5;
    T lower = floor(x);
    int64_t first = saturate_i64((double)lower);
    int64_t second = first == 9223372036854775807LL ? first : first + 1;
    int64_t idx[2] = {first, second};
    for (int k = 0; k < 2; ++k) {
        if (wrap) {
            int64_t r = idx[k] % size;
            taps[k] = r < 0 ? r + size : r;
        } else {
            taps[k] = idx[k] < 0 ? 0 : (idx[k] > size - 1 ? size - 1 : idx[k]);
        }
    }
    return x - lower;
}

template <typename T>
struct Taps {
    int64_t texels[4];
    T weights[4];
    T frac[2];
};

template <typename T>
__device__ __forceinline__ Taps<T> bilinear_taps(T u, T v, int64_t ht, int64_t wt, int wrap) {
    int64_t cols[2], rows[2];
    Taps<T> tap;
    T fx = axis_taps(u, wt, wrap, cols);
    T fy = axis_taps(v, ht, wrap, rows);
    T gx = (T)1 - fx, gy = (T)1 - fy;
    tap.texels[0] = rows[0] * wt + cols[0];
    tap.texels[1] = rows[0] * wt + cols[1];
    tap.texels[2] = rows[1] * wt + cols[0];
    tap.texels[3] = rows[1] * wt + cols[1];
    tap.weights[0] = gy * gx;
    tap.weights[1] = gy * fx;
    tap.weights[2] = fy * gx;
    tap.weights[3] = fy * fx;
    tap.frac[0] = fx;
    tap.frac[1] = fy;
    return tap;
}

template <typename T>
__device__ void texture_fwd(const T* tex, const T* uv, int tex_batch, int ht, int wt, int c,
                            int64_t samples, int64_t total, int wrap, T* out) {
    ITEM_INDEX(total);
    const int64_t base = tex_batch == 1 ? 0 : item / samples * ht * wt * c;
    Taps<T> tap = bilinear_taps(uv[item * 2], uv[item * 2 + 1], ht, wt, wrap);
    T* dst = out + item * c;
    for (int k = 0; k < c; ++k) dst[k] = (T)0;
    for (int n = 0; n < 4; ++n) {
        const T* src = tex + base + tap.texels[n] * c;
        for (int k = 0; k < c; ++k) dst[k] += tap.weights[n] * src[k];
    }
}

template <typename T>
__device__ void texture_tex_grad(const T* uv, const T* grad, int tex_batch, int ht, int wt, int c,
                                 int64_t samples, int64_t total, int wrap, T* out) {
    ITEM_INDEX(total);
    const T* g = grad + item * c;
    bool any = false;
    for (int k = 0; k < c; ++k) any = any || g[k] != (T)0;
    if (!any) return;
    const int64_t base = tex_batch == 1 ? 0 : item / samples * ht * wt * c;
    Taps<T> tap = bilinear_taps(uv[item * 2], uv[item * 2 + 1], ht, wt, wrap);
    for (int n = 0; n < 4; ++n) {
        T* dst = out + base + tap.texels[n] * c;
        for (int k = 0; k < c; ++k) atomicAdd(dst + k, tap.weights[n] * g[k]);
    }
}

template <typename T>
__device__ void texture_uv_grad(const T* tex, const T* uv, const T* grad, int tex_batch, int ht, int wt,
                                int c, int64_t samples, int64_t total, int wrap, T* out) {
    ITEM_INDEX(total);
    const int64_t base = tex_batch == 1 ? 0 : item / samples * ht * wt * c;
    Taps<T> tap = bilinear_taps(uv[item * 2], uv[item * 2 + 1], ht, wt, wrap);
    const T fx = tap.frac[0], fy = tap.frac[1];
    const T* g = grad + item * c;
    const T sw = (T)(double)wt, sh = (T)(double)ht;
    T du = (T)0, dv = (T)0;
    for (int k = 0; k < c; ++k) {
        const T t00 = tex[base + tap.texels[0] * c + k], t01 = tex[base + tap.texels[1] * c + k];
        const T t10 = tex[base + tap.texels[2] * c + k], t11 = tex[base + tap.texels[3] * c + k];
        const T d_fx = ((T)1 - fy) * (t01 - t00) + fy * (t11 - t10);
        const T d_fy = ((T)1 - fx) * (t10 - t00) + fx * (t11 - t01);
        du += g[k] * d_fx * sw;
        dv += g[k] * d_fy * sh;
    }
    out[item * 2] = du;
    out[item * 2 + 1] = dv;
}

// ---------------------------------------------------------------------------------------------
// Antialias (src/antialias.rs): per triangle, whether it faces the camera and which of its edges
// are silhouettes; per pixel, the crossings of silhouette edges with the segments to its right
// and lower neighbours; blends along those crossings and their gradients.
//
// Crossing slots: two per pixel (0: with the right neighbour, 1: with the one below), slot
// k = 2 * pixel + direction over the whole batch. The buffer holds first every slot's target
// pixel (NO_CROSSING when there is none), then per slot a record of CROSSING_WORDS 32-bit words:
// four unsigned ints (target pixel, source pixel, the edge's two vertices), then seven doubles
// (weight, then d weight / d (x, y, w) of the edge's two vertices), written only for a crossing.
// Most pixels have none: kernels read the dense targets and open a record only for a crossing
// (touching a 72-byte record for every slot cost more than the rest of the kernels' work:
// finding the crossings of a 512x512 face took 51 us that way, 13 us this way). One u32 buffer
// holds both kinds, so that the op that finds them returns a single tensor.

#define CROSSING_WORDS 18
#define NO_CROSSING 0xffffffffu
#define NO_NEIGHBOUR 0xffffffffu

template <typename T>
__device__ void silhouette_facing(const T* clip, const uint32_t* tris, int batch, int nv, int nt,
                                  unsigned char* facing) {
    ITEM_INDEX((int64_t)batch * nt);
    const int64_t b = item / nt, t = item % nt;
    T a[3][3];
    for (int i = 0; i < 3; ++i) {
        const T* c = clip + ((int64_t)b * nv + tris[t * 3 + i]) * 4;
        a[i][0] = c[0];
        a[i][1] = c[1];
        a[i][2] = c[3];
    }
    T c12[3];
    cross3(a[1], a[2], c12);
    facing[item] = dot3(a[0], c12) > (T)0;
}

// Slot k's record in a buffer of `slots` slots: its ints, then (at word 4) its doubles.
__device__ __forceinline__ uint32_t* slot_record(uint32_t* buffer, int64_t slots, int64_t k) {
    return buffer + slots + k * CROSSING_WORDS;
}
__device__ __forceinline__ const uint32_t* slot_record(const uint32_t* buffer, int64_t slots, int64_t k) {
    return buffer + slots + k * CROSSING_WORDS;
}
__device__ __forceinline__ double* record_reals(uint32_t* record) { return (double*)(record + 4); }
__device__ __forceinline__ const double* record_reals(const uint32_t* record) { return (const double*)(record + 4); }

__device__ void silhouette_edges(const uint32_t* neighbours, const unsigned char* facing, int batch,
                                 int nt, unsigned char* bits) {
    ITEM_INDEX((int64_t)batch * nt);
    const int64_t b = item / nt, t = item % nt;
    unsigned char out = 0;
    for (int k = 0; k < 3; ++k) {
        uint32_t nb = neighbours[t * 3 + k];
        bool open = nb == NO_NEIGHBOUR || facing[b * nt + nb] != facing[item];
        out |= (unsigned char)(open ? 1u << k : 0u);
    }
    bits[item] = out;
}

// The crossing of pixel p and its neighbour q, as the CPU's `Scene::crossing` finds it: its
// target pixel into `target` (NO_CROSSING if none) and, if there is one, its `record`.
template <typename T>
__device__ void find_crossing(const T* rast, const T* verts, const uint32_t* tris, const unsigned char* bits,
                              int nt, int height, int width, int64_t p, int64_t q, uint32_t* target,
                              uint32_t* record) {
    *target = NO_CROSSING;
    const T* rp = rast + p * 4;
    const T* rq = rast + q * 4;
    const int64_t tp = triangle_at(rp[3]), tq = triangle_at(rq[3]);
    if (tp == tq) return;
    int64_t near_px, far_px, t;
    if (tq < 0) {
        near_px = p; far_px = q; t = tp;
    } else if (tp < 0) {
        near_px = q; far_px = p; t = tq;
    } else if (rq[2] < rp[2]) {
        near_px = q; far_px = p; t = tq;
    } else {
        near_px = p; far_px = q; t = tp;
    }
    if (t >= nt) return;
    const unsigned silhouettes = bits[t];
    if (silhouettes == 0) return;
    T cs[3][4];
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 4; ++k) cs[i][k] = verts[(int64_t)tris[t * 3 + i] * 4 + k];
    const T pn[2] = {pixel_centre<T>(near_px % width, width), pixel_centre<T>(near_px / width, height)};
    const T pf[2] = {pixel_centre<T>(far_px % width, width), pixel_centre<T>(far_px / width, height)};
    bool found = false;
    T best_alpha = (T)0, best_near = (T)0, best_far = (T)0;
    int best_k = 0;
    for (int k = 0; k < 3; ++k) {
        if (!(silhouettes & (1u << k))) continue;
        const T* a = cs[k];
        const T* b = cs[(k + 1) % 3];
        if (a[3] <= (T)0 || b[3] <= (T)0) continue;
        const T e1[2] = {a[0] / a[3], a[1] / a[3]}, e2[2] = {b[0] / b[3], b[1] / b[3]};
        const T f_near = (e2[0] - e1[0]) * (pn[1] - e1[1]) - (e2[1] - e1[1]) * (pn[0] - e1[0]);
        const T f_far = (e2[0] - e1[0]) * (pf[1] - e1[1]) - (e2[1] - e1[1]) * (pf[0] - e1[0]);
        if (!(f_near * f_far < (T)0)) continue;
        const T alpha = f_near / (f_near - f_far);
        const T hit[2] = {pn[0] + alpha * (pf[0] - pn[0]), pn[1] + alpha * (pf[1] - pn[1])};
        const T along[2] = {e2[0] - e1[0], e2[1] - e1[1]};
        const T beta = ((hit[0] - e1[0]) * along[0] + (hit[1] - e1[1]) * along[1]) /
                       (along[0] * along[0] + along[1] * along[1]);
        if (!(beta >= (T)0 && beta <= (T)1)) continue;
        if (!found || alpha < best_alpha) {
            found = true;
            best_alpha = alpha;
            best_k = k;
            best_near = f_near;
            best_far = f_far;
        }
    }
    if (!found) return;
    const T half = (T)0.5;
    const bool beyond_half = best_alpha > half;
    const T weight = beyond_half ? best_alpha - half : half - best_alpha;
    const T sign = beyond_half ? (T)1 : (T)-1;
    const T* a = cs[best_k];
    const T* b = cs[(best_k + 1) % 3];
    const T e1[2] = {a[0] / a[3], a[1] / a[3]}, e2[2] = {b[0] / b[3], b[1] / b[3]};
    // d side / d e1 and d side / d e2 at the near and far centres.
    const T dn[2][2] = {{e2[1] - pn[1], pn[0] - e2[0]}, {pn[1] - e1[1], e1[0] - pn[0]}};
    const T df[2][2] = {{e2[1] - pf[1], pf[0] - e2[0]}, {pf[1] - e1[1], e1[0] - pf[0]}};
    const T denom = (best_near - best_far) * (best_near - best_far);
    *target = (uint32_t)(beyond_half ? far_px : near_px);
    uint32_t* ints = record;
    double* reals = record_reals(record);
    ints[0] = *target;
    ints[1] = (uint32_t)(beyond_half ? near_px : far_px);
    ints[2] = tris[t * 3 + best_k];
    ints[3] = tris[t * 3 + (best_k + 1) % 3];
    reals[0] = (double)weight;
    for (int i = 0; i < 2; ++i) {
        const T* v = i == 0 ? a : b;
        T d_e[2];
        for (int m = 0; m < 2; ++m) d_e[m] = sign * (best_near * df[i][m] - best_far * dn[i][m]) / denom;
        const T inv_w = (T)1 / v[3];
        reals[1 + i * 3] = (double)(d_e[0] * inv_w);
        reals[2 + i * 3] = (double)(d_e[1] * inv_w);
        reals[3 + i * 3] = (double)(-(d_e[0] * v[0] + d_e[1] * v[1]) * inv_w * inv_w);
    }
}

// One thread per pixel: its two crossing slots.
template <typename T>
__device__ void silhouette_crossings(const T* rast, const T* clip, const uint32_t* tris, const unsigned char* bits,
                                     int batch, int nv, int nt, int height, int width, uint32_t* slots) {
    ITEM_INDEX((int64_t)batch * height * width);
    const int64_t pixels = (int64_t)height * width;
    const int64_t b = item / pixels, i = item % pixels;
    const int64_t x = i % width, y = i / width;
    const T* image = rast + b * pixels * 4;
    const T* verts = clip + (int64_t)b * nv * 4;
    const int64_t all_slots = (int64_t)batch * pixels * 2;
    for (int dir = 0; dir < 2; ++dir) {
        const int64_t k = item * 2 + dir;
        slots[k] = NO_CROSSING;
        const bool inside = dir == 0 ? x + 1 < width : y + 1 < height;
        if (!inside) continue;
        find_crossing(image, verts, tris, bits + b * nt, nt, height, width, i, dir == 0 ? i + 1 : i + width,
                      slots + k, slot_record(slots, all_slots, k));
    }
}

// The colour blended at pixel j: the input colour, zero outside the mesh when masking, or the
// coverage itself (1 on the mesh, 0 off it) when `coverage` is set.
template <typename T>
__device__ __forceinline__ T blend_source(const T* color, const T* image_rast, int64_t j, int c, int ch,
                                          int mask, int coverage) {
    const bool covered = image_rast[j * 4 + 3] >= (T)1;
    if (coverage) return covered ? (T)1 : (T)0;
    return !mask || covered ? color[j * c + ch] : (T)0;
}

// The crossing slots that touch pixel i, in the order the CPU applies them: the pair with the
// pixel above, with the pixel to the left, with the right one, with the one below.
__device__ __forceinline__ int touching_slots(int64_t i, int height, int width, int64_t slots[4]) {
    const int64_t x = i % width, y = i / width;
    int n = 0;
    if (y > 0) slots[n++] = (i - width) * 2 + 1;
    if (x > 0) slots[n++] = (i - 1) * 2;
    slots[n++] = i * 2;
    slots[n++] = i * 2 + 1;
    return n;
}

template <typename T>
__device__ void blend_fwd(const T* color, const T* rast, const uint32_t* slots, int batch,
                          int height, int width, int c, int mask, int coverage, T* out) {
    ITEM_INDEX((int64_t)batch * height * width);
    const int64_t pixels = (int64_t)height * width;
    const int64_t b = item / pixels, i = item % pixels;
    const T* image_rast = rast + b * pixels * 4;
    const T* image_color = coverage ? color : color + b * pixels * c;
    const int64_t all_slots = (int64_t)batch * pixels * 2, image_slots = b * pixels * 2;
    T* dst = out + item * c;
    for (int ch = 0; ch < c; ++ch) dst[ch] = blend_source(image_color, image_rast, i, c, ch, mask, coverage);
    int64_t touching[4];
    const int n = touching_slots(i, height, width, touching);
    for (int s = 0; s < n; ++s) {
        const int64_t k = image_slots + touching[s];
        if (slots[k] != (uint32_t)i) continue;
        const uint32_t* x = slot_record(slots, all_slots, k);
        const T weight = (T)record_reals(x)[0];
        for (int ch = 0; ch < c; ++ch)
            dst[ch] += weight * (blend_source(image_color, image_rast, x[1], c, ch, mask, coverage) -
                                 blend_source(image_color, image_rast, x[0], c, ch, mask, coverage));
    }
}

template <typename T>
__device__ void blend_color_grad(const T* grad, const T* rast, const uint32_t* slots, int batch,
                                 int height, int width, int c, int mask, T* out) {
    ITEM_INDEX((int64_t)batch * height * width);
    const int64_t pixels = (int64_t)height * width;
    const int64_t b = item / pixels, i = item % pixels;
    const T* g = grad + b * pixels * c;
    const int64_t all_slots = (int64_t)batch * pixels * 2, image_slots = b * pixels * 2;
    T* dst = out + item * c;
    for (int ch = 0; ch < c; ++ch) dst[ch] = g[i * c + ch];
    int64_t touching[4];
    const int n = touching_slots(i, height, width, touching);
    for (int s = 0; s < n; ++s) {
        const int64_t k = image_slots + touching[s];
        if (slots[k] == NO_CROSSING) continue;
        const uint32_t* x = slot_record(slots, all_slots, k);
        const T weight = (T)record_reals(x)[0];
        for (int ch = 0; ch < c; ++ch) {
            const T moved = weight * g[(int64_t)x[0] * c + ch];
            if (x[0] == (uint32_t)i) dst[ch] -= moved;
            if (x[1] == (uint32_t)i) dst[ch] += moved;
        }
    }
    if (mask && !(rast[item * 4 + 3] >= (T)1))
        for (int ch = 0; ch < c; ++ch) dst[ch] = (T)0;
}

// One thread per crossing slot: d clip_pos of the crossing's edge vertices (atomic).
template <typename T>
__device__ void blend_position_grad(const T* color, const T* grad, const T* rast, const uint32_t* slots,
                                    int batch, int nv, int height, int width, int c,
                                    int mask, int coverage, T* out) {
    ITEM_INDEX((int64_t)batch * height * width * 2);
    if (slots[item] == NO_CROSSING) return;
    const int64_t pixels = (int64_t)height * width;
    const uint32_t* x = slot_record(slots, (int64_t)batch * pixels * 2, item);
    const double* r = record_reals(x);
    const int64_t b = item / 2 / pixels;
    const T* image_rast = rast + b * pixels * 4;
    const T* image_color = coverage ? color : color + b * pixels * c;
    const T* g = grad + b * pixels * c;
    T g_weight = (T)0;
    for (int ch = 0; ch < c; ++ch)
        g_weight = g_weight + g[(int64_t)x[0] * c + ch] *
                                  (blend_source(image_color, image_rast, x[1], c, ch, mask, coverage) -
                                   blend_source(image_color, image_rast, x[0], c, ch, mask, coverage));
    for (int i = 0; i < 2; ++i) {
        T* d = out + ((int64_t)b * nv + x[2 + i]) * 4;
        atomicAdd(d + 0, g_weight * (T)r[1 + i * 3]);
        atomicAdd(d + 1, g_weight * (T)r[2 + i * 3]);
        atomicAdd(d + 3, g_weight * (T)r[3 + i * 3]);
    }
}

// ---------------------------------------------------------------------------------------------
// Shading (src/shading_kernels.rs): normalisation, area-weighted face-normal sums, and
// Lambertian shading under second-order spherical harmonics.

// One thread per row of `c` values: v / sqrt(|v|^2 + eps).
template <typename T>
__device__ void normalize_fwd(const T* v, int64_t rows, int c, double eps, T* out) {
    ITEM_INDEX(rows);
    const T* x = v + item * c;
    T sq = (T)0;
    for (int k = 0; k < c; ++k) sq = sq + x[k] * x[k];
    const T norm = sqrt(sq + (T)eps);
    for (int k = 0; k < c; ++k) out[item * c + k] = x[k] / norm;
}

template <typename T>
__device__ void normalize_grad(const T* v, const T* grad, int64_t rows, int c, double eps, T* out) {
    ITEM_INDEX(rows);
    const T* x = v + item * c;
    const T* g = grad + item * c;
    T sq = (T)0, vg = (T)0;
    for (int k = 0; k < c; ++k) sq = sq + x[k] * x[k];
    sq = sq + (T)eps;
    const T inv = (T)1 / sqrt(sq);
    for (int k = 0; k < c; ++k) vg = vg + x[k] * g[k];
    const T along = vg * inv / sq;
    for (int k = 0; k < c; ++k) out[item * c + k] = g[k] * inv - x[k] * along;
}

// One thread per (image, triangle): its face normal (v1 - v0) x (v2 - v0), added to its corners.
template <typename T>
__device__ void face_normal_sums(const T* p, const uint32_t* tris, int batch, int nv, int nt, T* out) {
    ITEM_INDEX((int64_t)batch * nt);
    const int64_t b = item / nt, t = item % nt;
    const T* pos = p + (int64_t)b * nv * 3;
    T c[3][3];
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 3; ++k) c[i][k] = pos[(int64_t)tris[t * 3 + i] * 3 + k];
    const T e1[3] = {c[1][0] - c[0][0], c[1][1] - c[0][1], c[1][2] - c[0][2]};
    const T e2[3] = {c[2][0] - c[0][0], c[2][1] - c[0][1], c[2][2] - c[0][2]};
    T face[3];
    cross3(e1, e2, face);
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 3; ++k) atomicAdd(out + ((int64_t)b * nv + tris[t * 3 + i]) * 3 + k, face[k]);
}

template <typename T>
__device__ void face_normal_sums_grad(const T* p, const T* grad, const uint32_t* tris, int batch, int nv,
                                      int nt, T* out) {
    ITEM_INDEX((int64_t)batch * nt);
    const int64_t b = item / nt, t = item % nt;
    const T* pos = p + (int64_t)b * nv * 3;
    const T* g = grad + (int64_t)b * nv * 3;
    T c[3][3], gf[3];
    for (int i = 0; i < 3; ++i)
        for (int k = 0; k < 3; ++k) c[i][k] = pos[(int64_t)tris[t * 3 + i] * 3 + k];
    for (int k = 0; k < 3; ++k)
        gf[k] = g[(int64_t)tris[t * 3] * 3 + k] + g[(int64_t)tris[t * 3 + 1] * 3 + k] + g[(int64_t)tris[t * 3 + 2] * 3 + k];
    const T e1[3] = {c[1][0] - c[0][0], c[1][1] - c[0][1], c[1][2] - c[0][2]};
    const T e2[3] = {c[2][0] - c[0][0], c[2][1] - c[0][1], c[2][2] - c[0][2]};
    T d1[3], d2[3];
    cross3(e2, gf, d1);
    cross3(gf, e1, d2);
    T* o = out + (int64_t)b * nv * 3;
    for (int k = 0; k < 3; ++k) {
        atomicAdd(o + (int64_t)tris[t * 3] * 3 + k, -(d1[k] + d2[k]));
        atomicAdd(o + (int64_t)tris[t * 3 + 1] * 3 + k, d1[k]);
        atomicAdd(o + (int64_t)tris[t * 3 + 2] * 3 + k, d2[k]);
    }
}

// The band constants of the irradiance basis: dc, linear, cross, zonal, square (ShBands).
struct ShBands {
    double dc, linear, cross, zonal, square;
};

template <typename T>
__device__ __forceinline__ void sh_basis(const ShBands& s, T x, T y, T z, T out[9]) {
    const T lin = (T)s.linear, cr = (T)s.cross;
    out[0] = (T)s.dc;
    out[1] = lin * y;
    out[2] = lin * z;
    out[3] = lin * x;
    out[4] = cr * (x * y);
    out[5] = cr * (y * z);
    out[6] = (T)s.zonal * ((T)3 * z * z - (T)1);
    out[7] = cr * (x * z);
    out[8] = (T)s.square * (x * x - y * y);
}

// One thread per pixel: albedo times the irradiance of its normal, per channel.
template <typename T>
__device__ void shade_sh_fwd(const T* albedo, const T* normals, const T* coeffs, int64_t pixels, int64_t total,
                             int c, ShBands bands, T* out) {
    ITEM_INDEX(total);
    const T* l = coeffs + item / pixels * c * 9;
    const T* n = normals + item * 3;
    T basis[9];
    sh_basis(bands, n[0], n[1], n[2], basis);
    for (int ch = 0; ch < c; ++ch) {
        T irradiance = (T)0;
        for (int k = 0; k < 9; ++k) irradiance = irradiance + l[ch * 9 + k] * basis[k];
        out[item * c + ch] = albedo[item * c + ch] * irradiance;
    }
}

// One thread per pixel: d albedo and d normals; d coeffs summed per block, then atomically.
template <typename T>
__device__ void shade_sh_bwd(const T* albedo, const T* normals, const T* coeffs, const T* grad, int64_t pixels,
                             int64_t total, int c, ShBands bands, T* g_albedo, T* g_normals, T* g_coeffs) {
    // Threads past the end still take part in the block sums (adding zero).
    const int64_t first = (int64_t)blockIdx.x * blockDim.x;
    const int64_t thread_item = first + threadIdx.x;
    const bool in_range = thread_item < total;
    const int64_t item = in_range ? thread_item : total - 1;
    const int64_t last = min(first + (int64_t)blockDim.x, total) - 1;
    const bool block_in_one_image = first / pixels == last / pixels;
    const T* g = grad + item * c;
    bool any = false;
    for (int ch = 0; ch < c; ++ch) any = any || g[ch] != (T)0;
    const bool active = in_range && any;
    const int64_t b = item / pixels;
    const T* l = coeffs + b * c * 9;
    const T* a = albedo + item * c;
    const T* n = normals + item * 3;
    T basis[9], combined[9];
    sh_basis(bands, n[0], n[1], n[2], basis);
    for (int k = 0; k < 9; ++k) combined[k] = (T)0;
    for (int ch = 0; ch < c; ++ch) {
        const T* lc = l + ch * 9;
        T irradiance = (T)0;
        for (int k = 0; k < 9; ++k) irradiance = irradiance + lc[k] * basis[k];
        if (active) g_albedo[item * c + ch] = g[ch] * irradiance;
        const T t = active ? g[ch] * a[ch] : (T)0;
        T g_light[9];
        for (int k = 0; k < 9; ++k) {
            g_light[k] = t * basis[k];
            combined[k] += t * lc[k];
        }
        block_atomic_add<T, 9>(g_coeffs + (b * c + ch) * 9, g_light, block_in_one_image);
    }
    if (!active) return;
    const T lin = (T)bands.linear, cr = (T)bands.cross;
    const T zonal6 = (T)(6.0 * bands.zonal), square2 = (T)(2.0 * bands.square);
    const T x = n[0], y = n[1], z = n[2];
    const T* m = combined;
    g_normals[item * 3] = lin * m[3] + cr * (m[4] * y + m[7] * z) + square2 * m[8] * x;
    g_normals[item * 3 + 1] = lin * m[1] + cr * (m[4] * x + m[5] * z) - square2 * m[8] * y;
    g_normals[item * 3 + 2] = lin * m[2] + cr * (m[5] * y + m[7] * x) + zonal6 * m[6] * z;
}

// One directional light plus ambient with a specular lobe (ShadePhong): geometry rows hold the
// unit normal, then (with a specular term) the unit vector towards the camera; the light row
// holds direction, colour and ambient.
// The Phong constants, passed like ShBands: five doubles by value.
struct PhongParams {
    double specular, shininess, unused[3];
};

template <typename T>
struct PhongPixel {
    T n[3], v[3], n_dot_l, r_dot_v, diffuse, lobe;
};

template <typename T>
__device__ __forceinline__ T positive(T x) {
    return x > (T)0 ? x : (T)0;
}

template <typename T>
__device__ __forceinline__ PhongPixel<T> phong_pixel(const T* geometry, const T l[3], PhongParams params) {
    const double specular = params.specular, shininess = params.shininess;
    PhongPixel<T> p;
    for (int i = 0; i < 3; ++i) p.n[i] = geometry[i];
    p.n_dot_l = dot3(p.n, l);
    p.diffuse = positive(p.n_dot_l);
    if (specular == 0.0) {
        for (int i = 0; i < 3; ++i) p.v[i] = (T)0;
        p.r_dot_v = (T)0;
        p.lobe = (T)0;
        return p;
    }
    for (int i = 0; i < 3; ++i) p.v[i] = geometry[3 + i];
    p.r_dot_v = (T)2 * p.n_dot_l * dot3(p.n, p.v) - dot3(l, p.v);
    p.lobe = (T)specular * pow(positive(p.r_dot_v), (T)shininess);
    return p;
}

template <typename T>
__device__ void shade_phong_fwd(const T* albedo, const T* geometry, const T* light, int64_t pixels, int64_t total,
                                int stride, PhongParams params, T* out) {
    ITEM_INDEX(total);
    const T* lb = light + item / pixels * 9;
    const T l[3] = {lb[0], lb[1], lb[2]};
    PhongPixel<T> p = phong_pixel(geometry + item * stride, l, params);
    for (int c = 0; c < 3; ++c)
        out[item * 3 + c] = albedo[item * 3 + c] * (lb[6 + c] + lb[3 + c] * p.diffuse) + lb[3 + c] * p.lobe;
}

// d albedo and d geometry per pixel; d light summed per warp, then atomically.
template <typename T>
__device__ void shade_phong_bwd(const T* albedo, const T* geometry, const T* light, const T* grad, int64_t pixels,
                                int64_t total, int stride, PhongParams params, T* g_albedo, T* g_geometry,
                                T* g_light) {
    const double specular = params.specular, shininess = params.shininess;
    // Threads past the end still take part in the block sums (adding zero).
    const int64_t first = (int64_t)blockIdx.x * blockDim.x;
    const int64_t thread_item = first + threadIdx.x;
    const bool in_range = thread_item < total;
    const int64_t item = in_range ? thread_item : total - 1;
    const int64_t last = min(first + (int64_t)blockDim.x, total) - 1;
    const T* g = grad + item * 3;
    const bool active = in_range && (g[0] != (T)0 || g[1] != (T)0 || g[2] != (T)0);
    const int64_t b = item / pixels;
    const T* lb = light + b * 9;
    // This pixel's share of d light: direction, colour, ambient.
    T gl[9];
    for (int i = 0; i < 9; ++i) gl[i] = (T)0;
    if (active) {
        const T l[3] = {lb[0], lb[1], lb[2]};
        const T* a = albedo + item * 3;
        T* gg = g_geometry + item * stride;
        PhongPixel<T> p = phong_pixel(geometry + item * stride, l, params);
        T g_diffuse = (T)0, g_lobe = (T)0;
        for (int c = 0; c < 3; ++c) {
            const T color = lb[3 + c], ambient = lb[6 + c];
            g_albedo[item * 3 + c] = g[c] * (ambient + color * p.diffuse);
            gl[3 + c] = g[c] * (a[c] * p.diffuse + p.lobe);
            gl[6 + c] = g[c] * a[c];
            g_diffuse += g[c] * a[c] * color;
            g_lobe += g[c] * color;
        }
        T g_n_dot_l = p.n_dot_l > (T)0 ? g_diffuse : (T)0;
        if (p.r_dot_v > (T)0 && specular != 0.0) {
            const T k = (T)shininess;
            const T g_rv = g_lobe * (T)specular * k * pow(p.r_dot_v, k - (T)1);
            const T n_dot_v = dot3(p.n, p.v);
            g_n_dot_l += g_rv * (T)2 * n_dot_v;
            const T g_n_dot_v = g_rv * (T)2 * p.n_dot_l;
            for (int i = 0; i < 3; ++i) {
                gg[3 + i] = g_n_dot_v * p.n[i] - g_rv * l[i];
                gg[i] = g_n_dot_v * p.v[i];
                gl[i] = -g_rv * p.v[i];
            }
        }
        for (int i = 0; i < 3; ++i) {
            gg[i] += g_n_dot_l * l[i];
            gl[i] += g_n_dot_l * p.n[i];
        }
    }
    block_atomic_add<T, 9>(g_light + b * 9, gl, first / pixels == last / pixels);
}

// ---------------------------------------------------------------------------------------------
// Camera: the axis-angle rotation (Rodrigues, in double like the CPU: a handful of values per
// image) and points · matrix + offset per image.

// R = I + a K + b (r rᵀ - |r|² I), K the cross-product matrix of r, a = sin θ / θ,
// b = (1 - cos θ) / θ², θ = sqrt(|r|² + 1e-16); and a', b' (d/dθ), by series for small θ.
struct RodriguesTerms {
    double theta, a, b, da, db;
};

__device__ __forceinline__ RodriguesTerms rodrigues_terms(const double r[3]) {
    const double sq = r[0] * r[0] + r[1] * r[1] + r[2] * r[2];
    RodriguesTerms t;
    t.theta = sqrt(sq + 1e-16);
    const double th = t.theta, s = sin(th), h = sin(0.5 * th);
    t.a = s / th;
    t.b = 2.0 * (h / th) * (h / th);
    if (th < 1e-2) {
        const double th3 = th * th * th;
        t.da = -th / 3.0 + th3 / 30.0;
        t.db = -th / 12.0 + th3 / 180.0;
    } else {
        t.da = (th * cos(th) - s) / (th * th);
        t.db = (s * th - 4.0 * h * h) / (th * th * th);
    }
    return t;
}

template <typename T>
__device__ void rotation_fwd(const T* axis_angle, int batch, T* out) {
    ITEM_INDEX(batch);
    const double r[3] = {(double)axis_angle[item * 3], (double)axis_angle[item * 3 + 1],
                         (double)axis_angle[item * 3 + 2]};
    const RodriguesTerms t = rodrigues_terms(r);
    const double sq = r[0] * r[0] + r[1] * r[1] + r[2] * r[2];
    const double k[9] = {0.0, -r[2], r[1], r[2], 0.0, -r[0], -r[1], r[0], 0.0};
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
            const double eye = i == j ? 1.0 : 0.0;
            out[item * 9 + i * 3 + j] = (T)(eye + t.a * k[i * 3 + j] + t.b * (r[i] * r[j] - sq * eye));
        }
}

// d r = a' (r/θ) <G, K> + a w + b' (r/θ) (rᵀ G r - |r|² tr G) + b (G r + Gᵀ r - 2 r tr G), with
// w = (G₂₁ - G₁₂, G₀₂ - G₂₀, G₁₀ - G₀₁) = d <G, K> / d r.
template <typename T>
__device__ void rotation_grad(const T* axis_angle, const T* grad, int batch, T* out) {
    ITEM_INDEX(batch);
    const double r[3] = {(double)axis_angle[item * 3], (double)axis_angle[item * 3 + 1],
                         (double)axis_angle[item * 3 + 2]};
    double g[9];
    for (int i = 0; i < 9; ++i) g[i] = (double)grad[item * 9 + i];
    const RodriguesTerms t = rodrigues_terms(r);
    const double sq = r[0] * r[0] + r[1] * r[1] + r[2] * r[2];
    const double w[3] = {g[7] - g[5], g[2] - g[6], g[3] - g[1]};
    const double gk = r[0] * w[0] + r[1] * w[1] + r[2] * w[2];
    const double trace = g[0] + g[4] + g[8];
    double gr[3], gtr[3];
    for (int i = 0; i < 3; ++i) {
        gr[i] = g[i * 3] * r[0] + g[i * 3 + 1] * r[1] + g[i * 3 + 2] * r[2];
        gtr[i] = g[i] * r[0] + g[3 + i] * r[1] + g[6 + i] * r[2];
    }
    const double q = r[0] * gr[0] + r[1] * gr[1] + r[2] * gr[2] - sq * trace;
    for (int i = 0; i < 3; ++i) {
        const double along = r[i] / t.theta;
        out[item * 3 + i] = (T)(t.da * along * gk + t.a * w[i] + t.db * along * q +
                                t.b * (gr[i] + gtr[i] - 2.0 * r[i] * trace));
    }
}

// out[b, v] = points[b or 0, v] · matrix[b] (3 x k) + offset[b].
template <typename T>
__device__ void affine_points_fwd(const T* points, const T* matrix, const T* offset, int batch, int shared,
                                  int64_t nv, int k, T* out) {
    ITEM_INDEX((int64_t)batch * nv);
    const int64_t b = item / nv;
    const T* p = points + (shared ? item % nv : item) * 3;
    const T* m = matrix + b * 3 * k;
    const T* t = offset + b * k;
    for (int j = 0; j < k; ++j) out[item * k + j] = p[0] * m[j] + p[1] * m[k + j] + p[2] * m[2 * k + j] + t[j];
}

// d points (added up over the batch when the points are shared), and d matrix = Σ_v p gᵀ,
// d offset = Σ_v g per image, summed per warp.
template <typename T>
__device__ void affine_points_grad(const T* points, const T* matrix, const T* grad, int batch, int shared,
                                   int64_t nv, int k, T* g_points, T* g_matrix, T* g_offset) {
    // Threads past the end still take part in the warp sums (adding zero).
    const int64_t total = (int64_t)batch * nv;
    const int64_t thread_item = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool in_range = thread_item < total;
    const int64_t item = in_range ? thread_item : total - 1;
    const int64_t b = item / nv, point = shared ? item % nv : item;
    const T* p = points + point * 3;
    const T* m = matrix + b * 3 * k;
    const T* g = grad + item * k;
    if (in_range)
        for (int i = 0; i < 3; ++i) {
            T sum = (T)0;
            for (int j = 0; j < k; ++j) sum = sum + g[j] * m[i * k + j];
            if (shared)
                atomicAdd(g_points + point * 3 + i, sum);
            else
                g_points[point * 3 + i] = sum;
        }
    for (int j = 0; j < k; ++j) {
        const T gj = in_range ? g[j] : (T)0;
        for (int i = 0; i < 3; ++i) warp_atomic_add(g_matrix + b * 3 * k + i * k + j, p[i] * gj);
        warp_atomic_add(g_offset + b * k + j, gj);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: one f32 and one f64 instance of each kernel.

#define FLOAT_KERNELS(KERNEL)                                                         \
    KERNEL(float, f32)                                                                \
    KERNEL(double, f64)

#define RASTER_SETUP(T, S)                                                                          \
    extern "C" __global__ void raster_setup_##S(const T* clip, const uint32_t* tris, int batch,       \
                                                int nv, int nt, int height, int width, int cull,     \
                                                T* setups, int* boxes) {                             \
        raster_setup<T>(clip, tris, batch, nv, nt, height, width, cull, setups, boxes);              \
    }
FLOAT_KERNELS(RASTER_SETUP)

#define RASTER_DRAW(T, S)                                                                           \
    extern "C" __global__ void raster_draw_##S(const T* setups, const int* boxes, int batch, int nt, \
                                               int height, int width, int mode, depth_key_t* depth,     \
                                               uint32_t* ids) {                                      \
        raster_draw<T>(setups, boxes, batch, nt, height, width, mode, depth, ids);                   \
    }
FLOAT_KERNELS(RASTER_DRAW)

extern "C" __global__ void raster_clear_keys(int64_t pixels, depth_key_t* depth, uint32_t* ids) {
    raster_clear(pixels, depth, ids);
}

#define RASTER_RESOLVE(T, S)                                                                        \
    extern "C" __global__ void raster_resolve_##S(const T* setups, const uint32_t* ids, int batch,    \
                                                  int nt, int height, int width, T* rast) {          \
        raster_resolve<T>(setups, ids, batch, nt, height, width, rast);                              \
    }
FLOAT_KERNELS(RASTER_RESOLVE)

#define RASTER_GRAD(T, S)                                                                           \
    extern "C" __global__ void raster_grad_##S(const T* clip, const uint32_t* tris, const T* rast,    \
                                               const T* grad, int batch, int nv, int height,         \
                                               int width, T* out) {                                  \
        raster_grad<T>(clip, tris, rast, grad, batch, nv, height, width, out);                       \
    }
FLOAT_KERNELS(RASTER_GRAD)

#define INTERPOLATE_FWD(T, S)                                                                       \
    extern "C" __global__ void interpolate_fwd_##S(const T* attr, const T* rast, const uint32_t* tris, \
                                                   int nt, int attr_batch, int nv, int c,            \
                                                   int64_t pixels, int64_t total, T* out) {          \
        interpolate_fwd<T>(attr, rast, tris, nt, attr_batch, nv, c, pixels, total, out);             \
    }
FLOAT_KERNELS(INTERPOLATE_FWD)

#define INTERPOLATE_BWD(T, S)                                                                       \
    extern "C" __global__ void interpolate_bwd_##S(const T* attr, const T* rast, const T* grad,       \
                                                   const uint32_t* tris, int nt, int attr_batch,     \
                                                   int nv, int c, int64_t pixels, int64_t total,     \
                                                   T* g_attr, T* g_rast) {                           \
        interpolate_bwd<T>(attr, rast, grad, tris, nt, attr_batch, nv, c, pixels, total, g_attr,     \
                           g_rast);                                                                  \
    }
FLOAT_KERNELS(INTERPOLATE_BWD)

#define TEXTURE_FWD(T, S)                                                                           \
    extern "C" __global__ void texture_fwd_##S(const T* tex, const T* uv, int tex_batch, int ht,      \
                                               int wt, int c, int64_t samples, int64_t total,        \
                                               int wrap, T* out) {                                   \
        texture_fwd<T>(tex, uv, tex_batch, ht, wt, c, samples, total, wrap, out);                    \
    }
FLOAT_KERNELS(TEXTURE_FWD)

#define TEXTURE_TEX_GRAD(T, S)                                                                      \
    extern "C" __global__ void texture_tex_grad_##S(const T* uv, const T* grad, int tex_batch,       \
                                                    int ht, int wt, int c, int64_t samples,          \
                                                    int64_t total, int wrap, T* out) {               \
        texture_tex_grad<T>(uv, grad, tex_batch, ht, wt, c, samples, total, wrap, out);              \
    }
FLOAT_KERNELS(TEXTURE_TEX_GRAD)

#define TEXTURE_UV_GRAD(T, S)                                                                       \
    extern "C" __global__ void texture_uv_grad_##S(const T* tex, const T* uv, const T* grad,         \
                                                   int tex_batch, int ht, int wt, int c,             \
                                                   int64_t samples, int64_t total, int wrap, T* out) { \
        texture_uv_grad<T>(tex, uv, grad, tex_batch, ht, wt, c, samples, total, wrap, out);          \
    }
FLOAT_KERNELS(TEXTURE_UV_GRAD)

#define SILHOUETTE_FACING(T, S)                                                                     \
    extern "C" __global__ void silhouette_facing_##S(const T* clip, const uint32_t* tris, int batch,  \
                                                     int nv, int nt, unsigned char* facing) {        \
        silhouette_facing<T>(clip, tris, batch, nv, nt, facing);                                     \
    }
FLOAT_KERNELS(SILHOUETTE_FACING)

extern "C" __global__ void silhouette_edge_bits(const uint32_t* neighbours, const unsigned char* facing,
                                                int batch, int nt, unsigned char* bits) {
    silhouette_edges(neighbours, facing, batch, nt, bits);
}

#define SILHOUETTE_CROSSINGS(T, S)                                                                  \
    extern "C" __global__ void silhouette_crossings_##S(const T* rast, const T* clip,                 \
                                                        const uint32_t* tris, const unsigned char* bits, \
                                                        int batch, int nv, int nt, int height,       \
                                                        int width, uint32_t* slots) {                \
        silhouette_crossings<T>(rast, clip, tris, bits, batch, nv, nt, height, width, slots);        \
    }
FLOAT_KERNELS(SILHOUETTE_CROSSINGS)

#define BLEND_FWD(T, S)                                                                             \
    extern "C" __global__ void blend_fwd_##S(const T* color, const T* rast, const uint32_t* slots,    \
                                             int batch, int height, int width, int c, int mask,      \
                                             int coverage, T* out) {                                 \
        blend_fwd<T>(color, rast, slots, batch, height, width, c, mask, coverage, out);              \
    }
FLOAT_KERNELS(BLEND_FWD)

#define BLEND_COLOR_GRAD(T, S)                                                                      \
    extern "C" __global__ void blend_color_grad_##S(const T* grad, const T* rast,                     \
                                                    const uint32_t* slots, int batch, int height,    \
                                                    int width, int c, int mask, T* out) {            \
        blend_color_grad<T>(grad, rast, slots, batch, height, width, c, mask, out);                  \
    }
FLOAT_KERNELS(BLEND_COLOR_GRAD)

#define BLEND_POSITION_GRAD(T, S)                                                                   \
    extern "C" __global__ void blend_position_grad_##S(const T* color, const T* grad, const T* rast,  \
                                                       const uint32_t* slots, int batch, int nv,     \
                                                       int height, int width, int c, int mask,       \
                                                       int coverage, T* out) {                       \
        blend_position_grad<T>(color, grad, rast, slots, batch, nv, height, width, c, mask, coverage, \
                               out);                                                                 \
    }
FLOAT_KERNELS(BLEND_POSITION_GRAD)

#define NORMALIZE_FWD(T, S)                                                                         \
    extern "C" __global__ void normalize_fwd_##S(const T* v, int64_t rows, int c, double eps, T* out) { \
        normalize_fwd<T>(v, rows, c, eps, out);                                                      \
    }
FLOAT_KERNELS(NORMALIZE_FWD)

#define NORMALIZE_GRAD(T, S)                                                                        \
    extern "C" __global__ void normalize_grad_##S(const T* v, const T* grad, int64_t rows, int c,     \
                                                  double eps, T* out) {                              \
        normalize_grad<T>(v, grad, rows, c, eps, out);                                               \
    }
FLOAT_KERNELS(NORMALIZE_GRAD)

#define FACE_NORMAL_SUMS(T, S)                                                                      \
    extern "C" __global__ void face_normal_sums_##S(const T* p, const uint32_t* tris, int batch,      \
                                                    int nv, int nt, T* out) {                        \
        face_normal_sums<T>(p, tris, batch, nv, nt, out);                                            \
    }
FLOAT_KERNELS(FACE_NORMAL_SUMS)

#define FACE_NORMAL_SUMS_GRAD(T, S)                                                                 \
    extern "C" __global__ void face_normal_sums_grad_##S(const T* p, const T* grad, const uint32_t* tris, \
                                                         int batch, int nv, int nt, T* out) {        \
        face_normal_sums_grad<T>(p, grad, tris, batch, nv, nt, out);                                 \
    }
FLOAT_KERNELS(FACE_NORMAL_SUMS_GRAD)

#define SHADE_SH_FWD(T, S)                                                                          \
    extern "C" __global__ void shade_sh_fwd_##S(const T* albedo, const T* normals, const T* coeffs,   \
                                                int64_t pixels, int64_t total, int c, ShBands bands, \
                                                T* out) {                                            \
        shade_sh_fwd<T>(albedo, normals, coeffs, pixels, total, c, bands, out);                      \
    }
FLOAT_KERNELS(SHADE_SH_FWD)

#define SHADE_SH_BWD(T, S)                                                                          \
    extern "C" __global__ void shade_sh_bwd_##S(const T* albedo, const T* normals, const T* coeffs,   \
                                                const T* grad, int64_t pixels, int64_t total, int c, \
                                                ShBands bands, T* g_albedo, T* g_normals,            \
                                                T* g_coeffs) {                                       \
        shade_sh_bwd<T>(albedo, normals, coeffs, grad, pixels, total, c, bands, g_albedo, g_normals, \
                        g_coeffs);                                                                   \
    }
FLOAT_KERNELS(SHADE_SH_BWD)

#define SHADE_PHONG_FWD(T, S)                                                                       \
    extern "C" __global__ void shade_phong_fwd_##S(const T* albedo, const T* geometry, const T* light, \
                                                   int64_t pixels, int64_t total, int stride,        \
                                                   PhongParams params, T* out) {                     \
        shade_phong_fwd<T>(albedo, geometry, light, pixels, total, stride, params, out);             \
    }
FLOAT_KERNELS(SHADE_PHONG_FWD)

#define SHADE_PHONG_BWD(T, S)                                                                       \
    extern "C" __global__ void shade_phong_bwd_##S(const T* albedo, const T* geometry, const T* light, \
                                                   const T* grad, int64_t pixels, int64_t total,     \
                                                   int stride, PhongParams params, T* g_albedo,      \
                                                   T* g_geometry, T* g_light) {                      \
        shade_phong_bwd<T>(albedo, geometry, light, grad, pixels, total, stride, params, g_albedo,    \
                           g_geometry, g_light);                                                     \
    }
FLOAT_KERNELS(SHADE_PHONG_BWD)

#define ROTATION_FWD(T, S)                                                                          \
    extern "C" __global__ void rotation_fwd_##S(const T* axis_angle, int batch, T* out) {            \
        rotation_fwd<T>(axis_angle, batch, out);                                                     \
    }
FLOAT_KERNELS(ROTATION_FWD)

#define ROTATION_GRAD(T, S)                                                                         \
    extern "C" __global__ void rotation_grad_##S(const T* axis_angle, const T* grad, int batch,      \
                                                 T* out) {                                           \
        rotation_grad<T>(axis_angle, grad, batch, out);                                              \
    }
FLOAT_KERNELS(ROTATION_GRAD)

#define AFFINE_POINTS_FWD(T, S)                                                                     \
    extern "C" __global__ void affine_points_fwd_##S(const T* points, const T* matrix,               \
                                                     const T* offset, int batch, int shared,         \
                                                     int64_t nv, int k, T* out) {                    \
        affine_points_fwd<T>(points, matrix, offset, batch, shared, nv, k, out);                     \
    }
FLOAT_KERNELS(AFFINE_POINTS_FWD)

#define AFFINE_POINTS_GRAD(T, S)                                                                    \
    extern "C" __global__ void affine_points_grad_##S(const T* points, const T* matrix,              \
                                                      const T* grad, int batch, int shared,          \
                                                      int64_t nv, int k, T* g_points,                \
                                                      T* g_matrix, T* g_offset) {                    \
        affine_points_grad<T>(points, matrix, grad, batch, shared, nv, k, g_points, g_matrix,        \
                              g_offset);                                                             \
    }
FLOAT_KERNELS(AFFINE_POINTS_GRAD)
