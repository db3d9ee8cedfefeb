#!/usr/bin/env bash
# Calibration on a lent GPU machine (the device tool): profile, whole-model reference steps, validation.
# Usage (repository root, on the device): OUT=dir [MODELS=a,b] [TPS=1,2,4,8] [SUITES=...] [REF=1] \
#   [REF_TP="1 2"] bash calibrate/run_device.sh
# The device image has torch; pydantic and simpy come from wheels carried in .device/wheels.
set -euo pipefail
PY=${PY:-/opt/torch/.venv/bin/python}
$PY -m pip install -q --no-index --find-links .device/wheels pydantic simpy >/dev/null 2>&1 || true
export PYTHONPATH=$PWD
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
echo "device: $GPU"
$PY calibrate/gpu_check.py > "$OUT/gpu_check.txt" 2>&1 || true
ID=$($PY -c "from calibrate.cli import GPU_NAMES; import torch; n=torch.cuda.get_device_name(0).upper(); print(next(v for k,v in GPU_NAMES.items() if k in n))")
ARGS=()
[ -n "${MODELS:-}" ] && ARGS+=(--models "$MODELS")
[ -n "${TPS:-}" ] && ARGS+=(--tp "$TPS")
[ -n "${SUITES:-}" ] && ARGS+=(--suites "$SUITES")
time $PY -m servesim calibrate --out "$OUT/$ID.json" --raw "$OUT/${ID}_raw.json" "${ARGS[@]}" > "$OUT/${ID}_summary.json"
if [ "${REF:-1}" = 1 ]; then
  export NCCL_NVLS_ENABLE=0
  for tp in ${REF_TP:-1}; do
    steps="$OUT/${ID}_llama-3-8b_steps.csv"
    [ "$tp" != 1 ] && steps="$OUT/${ID}_llama-3-8b_tp${tp}_steps.csv"
    time $PY -m servesim calibrate reference --tp "$tp" --out "$steps"
    $PY -m servesim calibrate validate "$steps" --gpu "$ID" --profile "$OUT/$ID.json" > /dev/null || true
  done
fi
[ -f "$OUT/gpu_check.txt" ] && tail -4 "$OUT/gpu_check.txt"
