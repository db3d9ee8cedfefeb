#!/usr/bin/env bash
# Recalibration and replays against the backend (paged attention, fused elementwise kernels, decode and
# mixed-step CUDA graphs), in one device call on one GPU (carrying .device/: wheels and the trace):
#   OUT=dir [STAGES="check kernels reference replays"] [LOADS="light heavy"] [SCHEDS="vllm sarathi"]
#   bash calibrate/run_paged.sh
# check: calibrate/gpu_check.py; kernels: Llama-3-8B's elementwise kernels, attention surfaces and whole-step
# fixed costs; reference: the reference steps, with the overhead fit's steps in the same rounds; replays:
# calibrate/run_replays.sh on the paged config of that GPU (H100 or H200). The GPU comes from nvidia-smi.
set -uo pipefail
. calibrate/device_env.sh
STAGES=" ${STAGES:-check kernels reference} "
if [[ $STAGES == *" check "* ]]; then
  timeout 150 $PY calibrate/gpu_check.py 2>&1 | tail -40 | tee "$OUT/gpu_check.txt"
fi
if [[ $STAGES == *" kernels "* ]]; then
  time timeout "${KERNELS_S:-330}" $PY -m servesim calibrate --out "$OUT/${ID}_paged.json" --raw "$OUT/${ID}_paged_raw.json" \
    --models llama-3-8b --suites elementwise,attention,fixed 2>&1 | tail -30 | tee "$OUT/kernels.txt"
fi
if [[ $STAGES == *" reference "* ]]; then
  time timeout "${REF_S:-220}" $PY -m servesim calibrate reference --out "$OUT/${ID}_paged_llama-3-8b_steps.csv" \
    --raw "$OUT/${ID}_paged_reference_raw.json" 2>&1 | tail -10 | tee "$OUT/reference.txt"
fi
if [[ $STAGES == *" replays "* ]]; then
  mkdir -p "$OUT/work"  # the device tool brings back a few files: only the replays' archive leaves
  OUT=$OUT/work PY=$PY TRACE=$PWD/.device/azure_llm_2023_conv.csv CONFIG=calibrate/measurements/${GPU}_llama3_8b_azure_paged.yaml \
    PREFIX=$PREFIX bash calibrate/run_replays.sh 2>&1 | tail -60 | tee "$OUT/replays.txt"
  mv "$OUT/work/replays.tar.gz" "$OUT/" && rm -rf "$OUT/work"
fi
