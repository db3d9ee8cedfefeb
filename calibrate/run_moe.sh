#!/usr/bin/env bash
# MoE measurements on one GPU (issue 25), in one device call (carrying .device/: the wheels):
#   OUT=dir [STAGES="check kernels reference"] [MODELS="qwen1.5-moe-a2.7b qwen3-30b-a3b"] bash calibrate/run_moe.sh
# check: calibrate/moe_check.py (the fused MoE kernels against the plain PyTorch layer, eager and in a CUDA
# graph, and both paths' times); kernels: the grouped expert GEMMs of every model in MODELS (`servesim
# calibrate --suites moe`); reference: the whole steps of each model through the backend (its fused MoE
# layer, shared experts; CUDA graphs), with the overhead fit's steps in the same rounds. Afterwards, on any
# machine: refit the GPU's profile with the grouped GEMMs overlaid (`--later <gpu>_moe_raw.json`, see
# calibrate/refit.sh) and `servesim calibrate validate` the reference steps against it: the MoE step MAPE.
set -uo pipefail
. calibrate/device_env.sh
STAGES=" ${STAGES:-check kernels reference} "
MODELS=${MODELS:-qwen1.5-moe-a2.7b qwen3-30b-a3b}
if [[ $STAGES == *" check "* ]]; then
  timeout 150 $PY calibrate/moe_check.py 2>&1 | tail -60 | tee "$OUT/moe_check.txt"
fi
if [[ $STAGES == *" kernels "* ]]; then
  time timeout "${KERNELS_S:-200}" $PY -m servesim calibrate --models "${MODELS// /,}" --suites moe \
    --out "$OUT/${ID}_moe.json" --raw "$OUT/${ID}_moe_raw.json" 2>&1 | tail -8 | tee "$OUT/moe_kernels.txt"
fi
if [[ $STAGES == *" reference "* ]]; then
  for m in $MODELS; do
    time timeout "${REF_S:-240}" $PY -m servesim calibrate reference --model "$m" --out "$OUT/${ID}_${m}_steps.csv" \
      --raw "$OUT/${ID}_${m}_reference_raw.json" 2>&1 | tail -6 | tee -a "$OUT/moe_reference.txt"
  done
fi
