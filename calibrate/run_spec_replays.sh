#!/usr/bin/env bash
# Speculative-decoding replays on the GPU (issue 8). Run from the repository root on the device machine:
#   OUT=<dir> TRACE=<absolute path of azure_llm_2023_conv.csv> bash calibrate/run_spec_replays.sh
# Needs torch and CUDA; pydantic and simpy come from wheels in .device/wheels when not installed.
set -euo pipefail
OUT=${OUT:-out}
PY=${PY:-python3}
TRACE=${TRACE:-$PWD/../shared/traces/azure_llm_2023_conv.csv}
$PY -c "import pydantic, simpy" 2>/dev/null || $PY -m pip install -q --no-index --find-links .device/wheels pydantic simpy
export PYTHONPATH=$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
CONFIG=calibrate/measurements/h100_llama3_8b_spec.yaml
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for load in "light 1.0 100" "heavy 5.0 150"; do
  set -- $load
  timeout 200 $PY -m servesim replay "$CONFIG" --device cuda --asap --acceptance oracle --out "$OUT/real_spec_$1" \
    --set workloads.0.arrival.rate=$2 --set workloads.0.num_requests=$3 \
    --set "workloads.0.trace.path=$TRACE" | tail -14 || echo "replay $1 did not finish"
done
tar -czf "$OUT/spec_replays.tar.gz" -C "$OUT" --exclude=token_times.npy --exclude='*.png' $(cd "$OUT" && ls -d real_spec_*)
