#!/usr/bin/env bash
# One prepared GPU session: kernel parity at real shapes, then timings (scripts/bench_kernels.py).
# Works without installing leanlm (the GPU machine has no package registry): the three package
# folders are linked under a temporary leanlm/ namespace on PYTHONPATH.
#   bash scripts/gpu_check.sh [--quick]        # writes $OUT/gpu_check.txt when $OUT is set
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
NS=$(mktemp -d)
mkdir -p "$NS/leanlm"
for pkg in engine optim kernels; do ln -s "$ROOT/$pkg" "$NS/leanlm/$pkg"; done
export PYTHONPATH="$NS${PYTHONPATH:+:$PYTHONPATH}"
LOG="${OUT:-/tmp}/gpu_check.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  date -u
  # Parity at 1B shapes, then the timing table: the numbers BENCHMARKS.md needs, first.
  python scripts/bench_kernels.py "$@" || echo "bench_kernels.py FAILED (above)"
  # Int8 weights against bf16 on the device: one 7B MLP layer's matmuls and update (issue 26).
  python scripts/bench_int8.py --layer --tokens 4096 || echo "bench_int8.py FAILED (above)"
  if python -c "import pytest" 2>/dev/null; then
    # The kernel tests on the real device (no interpreter): small ragged shapes, every φ, plus
    # the gpu-marked ones. --confcutdir keeps the engine's conftest (yaml, datasets) out.
    python -m pytest -q -p no:cacheprovider --confcutdir=tests/kernels tests/kernels 2>&1 \
      | tail -8 || echo "kernel tests FAILED (above)"
  fi
  date -u
} 2>&1 | tee "$LOG"
