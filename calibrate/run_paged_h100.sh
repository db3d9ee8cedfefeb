#!/usr/bin/env bash
# Recalibration against the backend with paged attention and fused elementwise kernels, in one device call
# (one H100, carrying .device/): Llama-3-8B's elementwise kernels, attention surfaces and whole-step fixed
# costs, then the reference steps with the overhead fit's steps in the same rounds.
# Usage (repository root, on the device): OUT=dir bash calibrate/run_paged_h100.sh
set -uo pipefail
PY=${PY:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=python3
$PY -m pip install -q --no-index --find-links .device/wheels pydantic simpy >/dev/null 2>&1 || true
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:?set OUT}
ID=h100-sxm-80gb
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
time timeout "${KERNELS_S:-330}" $PY -m sim calibrate --out "$OUT/${ID}_paged.json" --raw "$OUT/${ID}_paged_raw.json" \
  --models llama-3-8b --suites elementwise,attention,fixed 2>&1 | tail -30 | tee "$OUT/kernels.txt"
time timeout "${REF_S:-170}" $PY -m sim calibrate reference --out "$OUT/${ID}_paged_llama-3-8b_steps.csv" \
  --raw "$OUT/${ID}_paged_reference_raw.json" 2>&1 | tail -10 | tee "$OUT/reference.txt"
