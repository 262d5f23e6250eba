#!/usr/bin/env bash
# Times the dlib face-recognition ResNet (batch 2, 150×150, forward + backward to the input) in
# ganfit-losses (candle) and in PyTorch, interleaved: each round runs ours and PyTorch back to
# back with 1 thread, then with 2, so that both see the same load on a shared machine. Prints
# every round's medians and ratio (ours / PyTorch), then the median of each over the rounds.
# Usage, from anywhere: tools/bench/compare_identity.sh [rounds] [python] [bench binary]
#   rounds: default 3; python: an interpreter with torch, safetensors, numpy and pillow (default
#   /tmp/torchvenv/bin/python; see identity_torch.py); bench binary: a prebuilt criterion binary
#   of benches/identity.rs (default: built here by cargo).
set -euo pipefail
rounds=${1:-3}
python=${2:-/tmp/torchvenv/bin/python}
bench=${3:-}
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
for round in $(seq "$rounds"); do
    for threads in 1 2; do
        RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads CRITERION_HOME=$home \
            "$bench" --bench forward_backward --warm-up-time 1 --measurement-time 4 >/dev/null 2>&1
        ours=$("$python" -c "import json, sys
print(json.load(open(sys.argv[1]))['median']['point_estimate'] / 1e6)" \
            "$home/cpu_dlib_resnet_forward_backward_b2/new/estimates.json")
        torch=$(OMP_NUM_THREADS=$threads "$python" tools/bench/identity_torch.py --threads "$threads" \
            --iters 20 --only forward_backward)
        echo "$threads $ours $torch" | tee -a "$results" |
            awk -v r="$round" '{printf "round %s, %s thread(s): ours %.2f ms, PyTorch %.2f ms, ratio %.2f\n", r, $1, $2, $3, $2 / $3}'
    done
done
"$python" - "$results" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for threads in ("1", "2"):
    sel = [(float(o), float(t)) for n, o, t in rows if n == threads]
    ours, torch = statistics.median(o for o, _ in sel), statistics.median(t for _, t in sel)
    ratio = statistics.median(o / t for o, t in sel)
    print(f"median over {len(sel)} rounds, {threads} thread(s): ours {ours:.2f} ms, "
          f"PyTorch {torch:.2f} ms, ratio of rounds {ratio:.2f}")
EOF
