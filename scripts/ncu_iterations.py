#!/usr/bin/env python3
"""One iteration of a repeating GPU workload, from Nsight Compute's per-launch times.

    python3 scripts/ncu_iterations.py NCU.csv

NCU.csv is `ncu --csv --metrics gpu__time_duration.sum ...` over launches of a loop that has
settled (a criterion bench, a fit's iterations; skip its start with `--launch-skip`), at least
one and a half of its iterations. Prints the launches per iteration (the shortest period after
which the sequence of kernel names repeats), their summed GPU time (the iteration may start
anywhere in the loop), and the kernels that take most of it. scripts/device-check.sh runs it
on the lent GPU.
"""

import csv
import io
import sys
from collections import defaultdict


def launches(path):
    """(kernel name, GPU microseconds) per launch, in launch order."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    rows = csv.DictReader(io.StringIO("\n".join(lines[header:])))
    return [
        (row["Kernel Name"].split("(")[0], float(row["Metric Value"].replace(",", "")) / 1000)
        for row in rows
        if row["Metric Name"] == "gpu__time_duration.sum"
    ]


def period(names):
    """The shortest p after which the whole sequence repeats (names[i] == names[i + p] for
    every i), among those that leave at least half an iteration to compare."""
    n = len(names)
    for p in range(1, 2 * n // 3 + 1):
        if all(names[i] == names[i + p] for i in range(n - p)):
            return p
    return None


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = launches(sys.argv[1])
    p = period([name for name, _ in runs])
    if p is None:
        sys.exit(f"no repeating iteration in {len(runs)} launches: profile more of them")
    iteration = runs[:p]
    total = sum(t for _, t in iteration)
    print(f"{p} launches per iteration, {total:.1f} us of GPU time")
    by_kernel = defaultdict(lambda: [0, 0.0])
    for name, t in iteration:
        by_kernel[name][0] += 1
        by_kernel[name][1] += t
    for name, (count, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {t:8.1f} us  {count:4d} x  {name[:70]}")


if __name__ == "__main__":
    main()
