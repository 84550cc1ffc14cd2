#!/usr/bin/env bash
# GPU check, one prepared run of under 5 minutes on one GPU (benchmarks/gpu_check.py says what it measures): makes
# realistic shards with every core, prints one table (ResNet-50 fp16 and the default backbone: r_m, C*r_d, GPU decode,
# T for --decode cpu and gpu, E, fp16 vs fp32 cosine, the tutorial loop and T/T_tutorial), then runs pytest -m gpu.
# GPU_CHECK_SMOKE=1 runs the same steps on the CPU with tiny sizes (no GPU needed; its numbers mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-295}" "$PY" benchmarks/gpu_check.py --json "${1:-gpu_check.json}"
