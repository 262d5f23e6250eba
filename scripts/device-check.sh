#!/usr/bin/env bash
# The CUDA check of issue 8 in one device call (../shared/notes/cuda-build.md explains the build).
#
# Here (no GPU needed):   bash scripts/device-check.sh pack
#   builds the `cuda` test binaries of the renderer, morphable model, loss networks and texture
#   GAN, the CUDA renderer bench, the identity network's bench and the `ganfit` CLI with CUDA,
#   and packs them with the converted ICT model the fit needs (built from ../shared, which does
#   not travel) into one solid archive .devbin/bin.tar.xz (git-ignored), beside this script.
#   Everything that travels (the tracked tree is ~28 MB) must stay under 64 MiB.
# Then one device call from the repository root:
#   run(command="bash .devbin/device-check.sh run", carry=[".devbin"], timeout_s=480)
#   which runs timed default fits of the bundled photo, one on the GPU that includes the
#   driver's JIT of the PTX, then three each on the GPU and the CPU, alternating, a short
#   texture-GAN training run through the CLI on the GPU, where Nsight Compute works each
#   kernel's GPU time in an iteration of the renderer bench and of a fit, then every packed
#   test binary (CPU-vs-CUDA parity of outputs and gradients) and the benches (renderer;
#   identity network on the CPU and the GPU), printing the GPU, the libraries found and the
#   results. With $OUT
#   set (the device tool sets it), the fit's report and renders and the GAN's samples land
#   there; pipe the output into $OUT too, so a run that overruns still brings its log back.
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
  # The crates whose tests compare CUDA with the CPU (`--workspace --features cuda` would link
  # CUDA into every test binary), and the bench through `cargo test` too: the release profile,
  # so candle's CUDA kernels (minutes to build) are built once for all.
  cargo test --release -p ganfit-render -p ganfit-morphable -p ganfit-losses -p ganfit-texture \
    --features cuda --test cuda --bench render_cuda --bench identity --no-run \
    --message-format=json > .devbin/cargo.json
  mkdir .devbin/bin
  jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test)
         | "\(.executable) \(.manifest_path) \(.target.kind[0])"' .devbin/cargo.json |
  while read -r exe manifest kind; do
    packed=$(basename "$exe")
    strip -o ".devbin/bin/$packed" "$exe"
    echo "$packed $(realpath --relative-to=. "$(dirname "$manifest")") $kind" >> .devbin/bin/list
  done
  rm .devbin/cargo.json
  cargo build --release -p ganfit-cli --features cuda
  strip -o .devbin/bin/ganfit "$CARGO_TARGET_DIR/release/ganfit"
  local ict=${XDG_CACHE_HOME:-$HOME/.cache}/ganfit/ict-face-model-light.safetensors
  if [ -f "$ict" ]; then
    cp "$ict" .devbin/bin/
  else
    echo "no converted ICT model at $ict: run one CPU fit first; the device run will skip the fit"
  fi
  # One solid archive with a dictionary larger than any binary: every binary embeds the same
  # candle PTX and libraries, which then compress once (about half the size of packing each).
  tar -C .devbin -cf - bin | xz -T1 -9e --lzma2=dict=192MiB > .devbin/bin.tar.xz
  rm -r .devbin/bin
  cp scripts/device-check.sh .devbin/
  tar -tvf .devbin/bin.tar.xz
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
  # xz may be missing from the image; Python's lzma reads the same archive.
  { xz -dc "$here/bin.tar.xz" 2>/dev/null ||
      python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$here/bin.tar.xz"
  } | tar -C /tmp/devbin -xf -
  local bin=/tmp/devbin/bin
  # The weights: the converted ICT model that travelled, and the repository's own weights/
  # (the resolver's built-in path is the checkout the binaries were built in, not this one).
  mkdir -p /tmp/devbin/assets
  [ -f "$bin/ict-face-model-light.safetensors" ] &&
    mv "$bin/ict-face-model-light.safetensors" /tmp/devbin/assets/
  export GANFIT_ASSETS="/tmp/devbin/assets:$root/weights"
  local rc=0
  # The timed fits and the trainer first: the headline numbers survive a run that overruns.
  if [ -f /tmp/devbin/assets/ict-face-model-light.safetensors ]; then
    # The first GPU fit includes the driver's JIT of the PTX; then three on each device,
    # alternating, so that a busy host slows both alike (report medians and their ratio).
    for device in cuda cuda cpu cuda cpu cuda cpu; do
      echo "=== fit on $device"
      local start
      start=$(date +%s%N)
      "$bin/ganfit" fit "$root/examples/data/astronaut.png" \
        --device "$device" --out "/tmp/devbin/fit-$device" --quiet || rc=1
      echo "wall $(( ($(date +%s%N) - start) / 1000000 )) ms"
      echo "stages on $device: $(grep -o '<h2>Timings</h2>.*</table>' "/tmp/devbin/fit-$device/report.html" |
        sed -e 's/<\/td><td>/ /g; s/<[^>]*>/ /g; s/  */ /g')"
    done
    # The texture GAN's trainer through the CLI on the GPU: the fits' UV maps as data, grown
    # to 128x128 within 5 steps per phase, then 100 steps at 128x128, batch 16.
    mkdir -p /tmp/devbin/uv
    for device in cuda cpu; do cp "/tmp/devbin/fit-$device/texture.png" "/tmp/devbin/uv/$device.png"; done
    echo '{"generator": {"latent_dim": 512, "channels": [128, 128, 64, 32, 16, 8]},
           "phase_steps": 5, "total_steps": 150, "sample_every": 50, "checkpoint_every": 50}' \
      > /tmp/devbin/train.json
    echo "=== texture train on cuda (50 growing steps, then 100 at 128x128)"
    start=$(date +%s%N)
    timeout 150 "$bin/ganfit" texture train /tmp/devbin/uv --config /tmp/devbin/train.json \
      --device cuda --out /tmp/devbin/gan --quiet || rc=1
    echo "wall $(( ($(date +%s%N) - start) / 1000000 )) ms"
    ls /tmp/devbin/gan || true
    tail -3 /tmp/devbin/gan/*.csv 2>/dev/null || true
    if [ -n "${OUT:-}" ]; then
      for f in report.html frontal.png overlay.png; do cp "/tmp/devbin/fit-cuda/$f" "$OUT/cuda-$f" || true; done
      cp /tmp/devbin/gan/samples/"$(ls /tmp/devbin/gan/samples | tail -1)" "$OUT/gan-samples.png" || true
    fi
  fi
  # Per-launch GPU times of the renderer's forward + backward (512², batch 1), where Nsight
  # Compute reads the counters (Firecracker machines; gVisor ones refuse it), summed per
  # iteration by scripts/ncu_iterations.py: set beside the bench's wall time, they tell the
  # kernels' share from the host's.
  local ncu_bin
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
  if [ -n "$ncu_bin" ]; then
    local render_bench
    render_bench=$(awk '$2 == "crates/ganfit-render" && $3 == "bench" {print $1}' "$bin/list")
    echo "=== per-launch GPU times ($ncu_bin), cuda/renderer_fwd_bwd/512/b1"
    (cd "$root/crates/ganfit-render" && timeout 150 "$ncu_bin" --clock-control none \
      --launch-skip 3000 --launch-count 600 --metrics gpu__time_duration.sum --csv \
      "$bin/$render_bench" --bench 'cuda/renderer_fwd_bwd/512/b1$' --warm-up-time 1 \
      --measurement-time 1 > /tmp/devbin/ncu.csv) || echo "ncu failed"
    python3 "$root/scripts/ncu_iterations.py" /tmp/devbin/ncu.csv || true
    [ -n "${OUT:-}" ] && cp /tmp/devbin/ncu.csv "$OUT/" || true
    # The same for an iteration of a fit's full objective (past its first 30,000 launches:
    # detection, alignment and the objective's first iterations), if the fit ran.
    if [ -f /tmp/devbin/assets/ict-face-model-light.safetensors ]; then
      echo "=== per-launch GPU times ($ncu_bin), a fit's full objective"
      timeout 150 "$ncu_bin" --clock-control none --launch-skip 30000 --launch-count 3500 \
        --metrics gpu__time_duration.sum --csv "$bin/ganfit" fit "$root/examples/data/astronaut.png" \
        --device cuda --out /tmp/devbin/fit-ncu --quiet > /tmp/devbin/ncu-fit.csv || echo "ncu failed"
      python3 "$root/scripts/ncu_iterations.py" /tmp/devbin/ncu-fit.csv || true
      [ -n "${OUT:-}" ] && xz -9 < /tmp/devbin/ncu-fit.csv > "$OUT/ncu-fit.csv.xz" || true
    fi
  fi
  while read -r name crate kind; do
    if ldd "$bin/$name" | grep 'not found'; then echo "=== $name: missing libraries"; rc=1; continue; fi
    echo "=== $crate $kind ($name)"
    if [ "$kind" = bench ]; then
      # Warm-up covers the driver's first JIT of the PTX modules.
      (cd "$root/$crate" && timeout 150 "$bin/$name" --bench --warm-up-time 1 --measurement-time 2 --sample-size 20) || rc=1
    else
      # A hung binary must not take the others' device time.
      (cd "$root/$crate" && timeout 150 "$bin/$name" --test-threads=1 --nocapture) || rc=1
    fi
  done < "$bin/list"
  return $rc
}

case "$mode" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
