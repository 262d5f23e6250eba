# Source before every `--features cuda` build (after scripts/cuda-setup.sh).
CUDA13_SITE=${CUDA13_SITE:-/tmp/cuda13site}
export CUDA_ROOT=$CUDA13_SITE/nvidia/cu13   # cudarc links from $CUDA_ROOT/lib and lib/stubs
export PATH=$CUDA_ROOT/bin:$PATH            # candle-kernels and our build.rs run `nvcc`
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # no nvidia-smi here; 90 = H100/H200
export CUDARC_CUDA_VERSION=13000            # pin cudarc's bindings to CUDA 13.0
