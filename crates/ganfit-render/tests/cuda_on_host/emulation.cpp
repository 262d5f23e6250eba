// Host build of kernels/render.cu for tests/cuda_kernels_on_host.rs: the CUDA built-ins the
// kernels use, defined for one thread that runs the grid's items one at a time. Atomics need no
// atomicity then, and the kernels' shared memory and barriers are in GPU-only code paths (their
// host paths add directly), so this runs them exactly.
#include <algorithm>
#include <cmath>
#include <cstring>

struct GridIndex {
    unsigned x, y, z;
};
// Per thread: the test harness runs tests in parallel threads.
static thread_local GridIndex blockIdx, threadIdx, blockDim = {1, 1, 1};

#define __global__
#define __device__
#define __forceinline__ inline
using std::ceil;
using std::pow;
using std::sqrt;
using std::floor;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::max;
using std::min;

inline long long __double_as_longlong(double x) {
    long long bits;
    std::memcpy(&bits, &x, sizeof bits);
    return bits;
}

template <typename T>
T atomicAdd(T* address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}

template <typename T>
T atomicMin(T* address, T value) {
    T old = *address;
    *address = std::min(old, value);
    return old;
}

// Selects the item the next kernel call computes.
extern "C" void emulation_select_item(unsigned item) { blockIdx.x = item; }

#include "../../kernels/render.cu"
