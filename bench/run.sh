#!/usr/bin/env bash
# Every figure of bench/README.md in one command, from the repository root:
#
#     bash bench/run.sh
#
# Needs the Rust toolchain and python3 with torch, safetensors,
# pyyaml and numpy:
#
#     pip install torch safetensors pyyaml numpy
#
# Writes bench/results/{machine.txt,bench.txt,bench.json,kernels.txt}.
# Environment: ITERS (timed runs per figure, default 9), WARMUP (default 2),
# ROUNDS (default 1: each dcdit/PyTorch pair run that many times in turn,
# the round with the median ratio reported per row),
# THREADS (default 2), OUT (default bench/results), KERNELS=0 skips the
# criterion benches. Run it on an otherwise idle machine: every figure is a
# median, but two busy neighbours on a 2-core machine still move them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
ITERS=${ITERS:-9}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-1}
THREADS=${THREADS:-2}
mkdir -p "$OUT"

cargo build --release -p dcdit-cli

load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
if awk -v l="$load" 'BEGIN { exit !(l > 0.5) }'; then
    echo "warning: load average $load before the run: other work is running, and PyTorch's"
    echo "OpenMP threads slow down far more under load than dcdit's; the ratios will be off."
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo ?)"
    lscpu
    python3 -c 'import torch; print("torch", torch.__version__); print(torch.__config__.parallel_info())'
} > "$OUT/machine.txt" 2>&1

./target/release/dcdit-cli bench --against-pytorch \
    --iters "$ITERS" --warmup "$WARMUP" --rounds "$ROUNDS" --threads "$THREADS" \
    --json "$OUT/bench.json" | tee "$OUT/bench.txt"

if [ "${KERNELS:-1}" != 0 ]; then
    DCDIT_BENCH_THREADS="$THREADS" cargo bench -p dcdit-backend-cpu --bench kernels 2>&1 \
        | tee "$OUT/kernels.txt"
fi
echo "results in $OUT/"
