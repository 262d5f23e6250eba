#!/usr/bin/env bash
# Times the dlib face-recognition ResNet (batch 2, 150×150, forward + backward to the input) in
# ganfit-losses (candle) and in PyTorch, interleaved: each round runs ours, optionally a baseline
# build of ours, and PyTorch back to back with 1 thread, then with 2, so that all see the same
# load on a shared machine. Each gets its median wall time and its median CPU time (all threads
# of the process) per step; CPU time moves much less with the machine's load. Prints every
# round, then the median of each number over the rounds and the ratio ours / PyTorch.
# Usage, from anywhere: tools/bench/compare_identity.sh [rounds] [python] [bench binary] [baseline]
#   rounds: default 3; python: an interpreter with torch, safetensors, numpy and pillow (default
#   /tmp/torchvenv/bin/python; see identity_torch.py); bench binary: a prebuilt criterion binary
#   of benches/identity.rs (default, or "": built here by cargo); baseline: another such binary,
#   e.g. one built from an earlier commit, timed the same way in every round (optional; a
#   binary without the CPU-time bench reports its CPU time as nan).
# Quiet-machine numbers for both thread counts in one go: tools/bench/compare_identity.sh 5
set -euo pipefail
rounds=${1:-3}
python=${2:-/tmp/torchvenv/bin/python}
bench=${3:-}
baseline=${4:-}
cd "$(dirname "$0")/../.."
if [[ -z "$bench" ]]; then
    bench=$(cargo bench -p ganfit-losses --bench identity --no-run --message-format=json 2>/dev/null |
        "$python" -c "import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'identity':
        print(m['executable'])")
fi
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
results=$home/results.txt

# Prints "wall cpu" (ms) of the criterion binary $2 run with $1 threads.
time_ours() {
    local threads=$1 binary=$2 out=$home/criterion
    rm -rf "$out"
    RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads CRITERION_HOME=$out \
        "$binary" --bench forward_backward --warm-up-time 1 --measurement-time 4 >/dev/null 2>&1
    "$python" - "$out" <<'PY'
import json, pathlib, sys
def median(name):
    path = pathlib.Path(sys.argv[1]) / name / "new" / "estimates.json"
    return json.loads(path.read_text())["median"]["point_estimate"] / 1e6 if path.exists() else float("nan")
print(median("cpu_dlib_resnet_forward_backward_b2"), median("cpu_dlib_resnet_forward_backward_cpu_b2"))
PY
}

for round in $(seq "$rounds"); do
    for threads in 1 2; do
        ours=$(time_ours "$threads" "$bench")
        base="nan nan"
        if [[ -n "$baseline" ]]; then
            base=$(time_ours "$threads" "$baseline")
        fi
        torch=$(OMP_NUM_THREADS=$threads "$python" tools/bench/identity_torch.py --threads "$threads" \
            --iters 20 --only forward_backward)
        echo "$threads $ours $base $torch" | tee -a "$results" |
            awk -v r="$round" '{printf "round %s, %s thread(s), wall (CPU) ms: ours %.2f (%.2f), baseline %.2f (%.2f), PyTorch %.2f (%.2f), ratio %.2f\n", r, $1, $2, $3, $4, $5, $6, $7, $2 / $6}'
    done
done
"$python" - "$results" <<'EOF2'
import math, statistics, sys
rows = [[float(v) for v in line.split()] for line in open(sys.argv[1])]
for threads in (1, 2):
    sel = [r[1:] for r in rows if r[0] == threads]
    med = [statistics.median(r[i] for r in sel) for i in range(6)]
    ratio = statistics.median(r[0] / r[4] for r in sel)
    base = "" if math.isnan(med[2]) else f"baseline {med[2]:.2f} ({med[3]:.2f}), "
    print(f"median over {len(sel)} rounds, {threads} thread(s), wall (CPU) ms: ours {med[0]:.2f} "
          f"({med[1]:.2f}), {base}PyTorch {med[4]:.2f} ({med[5]:.2f}), ratio of rounds {ratio:.2f}")
EOF2
