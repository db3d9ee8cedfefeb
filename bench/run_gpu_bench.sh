#!/usr/bin/env bash
# The backend's competence checks on a lent GPU machine (the device tool): correctness of the kernels, the
# backend against the static-cache reference and the physics (each part in its own process, so that one
# failing part leaves the others' figures), and optionally the attention launch-config sweep (CONFIGS=1).
# Usage (repository root, on the device): OUT=dir [CONFIGS=1] bash bench/run_gpu_bench.sh
set -uo pipefail
PY=${PY:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=python3
$PY -m pip install -q --no-index --find-links .device/wheels pydantic simpy >/dev/null 2>&1 || true
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
B="$PY bench/backend_vs_reference.py"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
CUDA_LAUNCH_BLOCKING=1 timeout 150 $PY calibrate/gpu_check.py 2>&1 | tail -40 | tee "$OUT/gpu_check.txt"
# a small decode grid with synchronous launches first: a failing kernel shows in its traceback
CUDA_LAUNCH_BLOCKING=1 timeout 120 $B --parts decode --batches 1,8 --contexts 512,4096 --out "$OUT/small.json" 2>&1 \
  | grep -v IndexKernel | tail -40 | tee "$OUT/small.txt"
[ "${OTHER:-1}" = 1 ] && timeout "${OTHER_S:-200}" $B --parts prefill,mixed,kernels --out "$OUT/other.json" 2>&1 \
  | grep -v IndexKernel | tail -40 | tee "$OUT/other.txt"
timeout "${DECODE_S:-220}" $B --parts decode --out "$OUT/decode.json" 2>&1 | grep -v IndexKernel | tail -60 \
  | tee "$OUT/decode.txt"
if [ "${CONFIGS:-0}" = 1 ]; then
  timeout 200 $PY bench/attention_configs.py 2>&1 | tee "$OUT/attention_configs.txt"
fi
