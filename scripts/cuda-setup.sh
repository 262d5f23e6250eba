#!/usr/bin/env bash
# One-time, idempotent: nvcc 13.0 and the CUDA 13.0 libraries from PyPI wheels (about 1.2 GB under
# $CUDA13_SITE), plus a link-time stub of libcuda.so.1, for `--features cuda` builds on a machine
# without a GPU. Why exactly 13.0: the GPU machines' driver (580) JITs PTX only up to ISA 9.0, which
# nvcc 13.0 emits and later ones do not (../shared/notes/cuda-build.md).
set -euo pipefail
CUDA13_SITE=${CUDA13_SITE:-/tmp/cuda13site}
CU=$CUDA13_SITE/nvidia/cu13
if [ ! -x "$CU/bin/nvcc" ] || [ ! -e "$CU/lib/stubs/libcuda.so" ]; then
  python3 -m pip install -q --no-deps --no-compile --target "$CUDA13_SITE" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
  cd "$CU/lib"
  # The wheels ship only versioned sonames; the linker wants libX.so.
  for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
  ln -sf libcurand.so.10 libcurand.so
  # Link-time stub of the driver API (soname libcuda.so.1): one symbol per cu* function of cuda.h.
  # It is never carried to a GPU machine, whose driver provides the real library.
  mkdir -p stubs
  gcc -E -P -I"$CU/include" "$CU/include/cuda.h" \
    | grep -oE '\bCUresult\s+(CUDAAPI\s+)?cu[A-Za-z0-9_]+\s*\(' | grep -oE 'cu[A-Za-z0-9_]+' | sort -u \
    | awk '{print "int " $1 "(void){return 999;}"}' > stubs/libcuda_stub.c
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/libcuda_stub.c
fi
"$CU/bin/nvcc" --version | tail -2
