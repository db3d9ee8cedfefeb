#!/usr/bin/env bash
# The backend's competence checks on a lent GPU machine (the device tool): correctness of the kernels,
# the attention launch-config sweep, and the backend against the static-cache reference and the physics.
# Usage (repository root, on the device): OUT=dir bash bench/run_gpu_bench.sh
set -uo pipefail
PY=${PY:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=python3
$PY -m pip install -q --no-index --find-links .device/wheels pydantic simpy >/dev/null 2>&1 || true
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 $PY calibrate/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
timeout "${CONFIGS_S:-200}" $PY bench/attention_configs.py 2>&1 | tee "$OUT/attention_configs.txt"
timeout "${BENCH_S:-240}" $PY bench/backend_vs_reference.py --out "$OUT/backend_vs_reference.json" 2>&1 \
  | tee "$OUT/backend_vs_reference.txt"
