#!/usr/bin/env bash
# Times the dlib face-recognition ResNet (batch 2, 150×150, forward and forward + backward to the
# input) in ganfit-losses (candle) and in PyTorch, one after the other on the same machine.
# Usage, from the repository root: tools/bench/compare_identity.sh [threads] [python]
#   threads: CPU threads for both (default 2); python: an interpreter with torch, safetensors,
#   numpy and pillow (default /tmp/torchvenv/bin/python; see identity_torch.py).
set -euo pipefail
threads=${1:-2}
python=${2:-/tmp/torchvenv/bin/python}
cd "$(dirname "$0")/../.."
echo "== ganfit-losses (candle), ${threads} thread(s)"
RAYON_NUM_THREADS=$threads cargo bench -p ganfit-losses --bench identity -- \
    --warm-up-time 2 --measurement-time 6 2>&1 | grep -E '^cpu/|time:'
for name in forward forward_backward; do
    "$python" -c "import json, sys; e = json.load(open(sys.argv[1])); \
print(f'{sys.argv[2]} b2: median {e[\"median\"][\"point_estimate\"] / 1e6:.2f} ms')" \
        "target/criterion/cpu_dlib_resnet_${name}_b2/new/estimates.json" "$name"
done
echo "== PyTorch, ${threads} thread(s)"
"$python" tools/bench/identity_torch.py --threads "$threads" --iters 40
