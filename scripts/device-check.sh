#!/usr/bin/env bash
# The CUDA check of issue 8 in one device call (../shared/notes/cuda-build.md explains the build).
#
# Here (no GPU needed):   bash scripts/device-check.sh pack
#   builds the `cuda` test binaries, the CUDA renderer bench and the `ganfit` CLI with CUDA,
#   strips and xz-packs them into .devbin/ (git-ignored, about 5 MB per binary) with this script
#   and the converted ICT model the fit needs (it is built from ../shared, which does not
#   travel; 16 MB packed). Everything that travels must stay under 64 MiB.
# Then one device call from the repository root:
#   run(command="bash .devbin/device-check.sh run", carry=[".devbin"], timeout_s=480)
#   which runs every packed test binary (CPU-vs-CUDA parity of outputs and gradients), the
#   `cuda/` benches and timed default fits of the bundled photo on the GPU (twice: the first
#   includes the driver's JIT of the PTX) and on the CPU, printing the GPU, the libraries found
#   and the results.
set -euo pipefail
mode=${1:-}
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"

pack() {
  bash scripts/cuda-setup.sh
  . scripts/cuda-env.sh
  # Its own target folder: the CUDA build of candle takes minutes and should not replace the
  # CPU build's artefacts.
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-cuda}
  grep -qx '/.devbin/' .git/info/exclude 2>/dev/null || echo '/.devbin/' >> .git/info/exclude
  rm -rf .devbin && mkdir .devbin
  # Only the crates with CUDA kernels: `--workspace --features cuda` would link CUDA into every
  # test binary.
  # The bench through `cargo test` too: the release profile, so candle's CUDA kernels (minutes
  # to build) are built once for both.
  cargo test --release -p ganfit-render --features cuda --tests --bench render_cuda --no-run \
    --message-format=json > .devbin/cargo.json
  jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test)
         | "\(.executable) \(.manifest_path) \(.target.kind[0]) \(.target.name)"' .devbin/cargo.json |
  while read -r exe manifest kind name; do
    # Only the binaries that touch the GPU: the CUDA parity tests and the CUDA bench.
    case "$kind/$name" in test/cuda | bench/render_cuda) ;; *) continue ;; esac
    packed=$(basename "$exe")
    strip -o ".devbin/$packed" "$exe"
    xz -T0 -9 ".devbin/$packed"
    echo "$packed.xz $(realpath --relative-to=. "$(dirname "$manifest")") $kind" >> .devbin/list
  done
  rm .devbin/cargo.json
  cargo build --release -p ganfit-cli --features cuda
  strip -o .devbin/ganfit "$CARGO_TARGET_DIR/release/ganfit" && xz -T0 -9 .devbin/ganfit
  local ict=${XDG_CACHE_HOME:-$HOME/.cache}/ganfit/ict-face-model-light.safetensors
  if [ -f "$ict" ]; then
    xz -T0 -6 -c "$ict" > .devbin/ict-face-model-light.safetensors.xz
  else
    echo "no converted ICT model at $ict: run one CPU fit first; the device run will skip the fit"
  fi
  cp scripts/device-check.sh .devbin/
  cat .devbin/list
  du -ch .devbin/* | tail -1
}

run() {
  nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader || true
  local here libs
  here=$(cd "$(dirname "$0")" && pwd)
  # The CUDA 13 libraries of the image's PyTorch wheels (the binaries link libcublas.so.13,
  # libcurand.so.10 and libcudart.so.13; the driver brings libcuda.so.1), unless CUDA_LIBS
  # names the folder.
  libs=${CUDA_LIBS:-}
  [ -n "$libs" ] || libs=$(python3 -c 'import site, glob, os; print(":".join(sorted({d for s in site.getsitepackages() for d in glob.glob(os.path.join(s, "nvidia", "cu13", "lib"))})))' 2>/dev/null || true)
  [ -n "$libs" ] || libs=$(dirname "$(find / -xdev -name 'libcublasLt.so.13*' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [ -e /usr/local/nvidia/lib64/libcuda.so.1 ] && LD_LIBRARY_PATH=$LD_LIBRARY_PATH:/usr/local/nvidia/lib64
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  mkdir -p /tmp/devbin
  local rc=0
  while read -r packed crate kind; do
    local bin=/tmp/devbin/${packed%.xz}
    xz -dc "$here/$packed" > "$bin" 2>/dev/null ||
      python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$here/$packed" > "$bin"
    chmod +x "$bin"
    if ldd "$bin" | grep 'not found'; then echo "=== $packed: missing libraries"; rc=1; continue; fi
    echo "=== $packed ($kind)"
    if [ "$kind" = bench ]; then
      # Warm-up covers the driver's first JIT of the PTX modules.
      (cd "$root/$crate" && "$bin" --bench --warm-up-time 1 --measurement-time 2 --sample-size 20) || rc=1
    else
      (cd "$root/$crate" && "$bin" --test-threads=1) || rc=1
    fi
  done < "$here/list"
  if [ -f "$here/ict-face-model-light.safetensors.xz" ]; then
    mkdir -p /tmp/devbin/assets
    xz -dc "$here/ict-face-model-light.safetensors.xz" > /tmp/devbin/assets/ict-face-model-light.safetensors
    xz -dc "$here/ganfit.xz" > /tmp/devbin/ganfit && chmod +x /tmp/devbin/ganfit
    for device in cuda cuda cpu; do
      echo "=== fit on $device"
      local start
      start=$(date +%s%N)
      GANFIT_ASSETS=/tmp/devbin/assets /tmp/devbin/ganfit fit "$root/examples/data/astronaut.png" \
        --device "$device" --out "/tmp/devbin/fit-$device" --quiet || rc=1
      echo "wall $(( ($(date +%s%N) - start) / 1000000 )) ms"
    done
  fi
  return $rc
}

case "$mode" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
