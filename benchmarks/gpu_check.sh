#!/usr/bin/env bash
# GPU check for a machine with CUDA: fp16 correctness and throughput with CPU and nvJPEG decode (< 5 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" benchmarks/gpu_check.py --json "${1:-gpu_check.json}"
