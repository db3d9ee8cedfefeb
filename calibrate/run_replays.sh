#!/usr/bin/env bash
# Replays on the GPU for validation (issue 5). Run from the repository root on the device machine:
#   OUT=<dir> TRACE=<azure_llm_2023_conv.csv> [SCHEDS="vllm sarathi"] [LOADS="light heavy"] [CONFIG=...]
#   [PREFIX=paged_] [EXTRA=key.path=value] bash calibrate/run_replays.sh
# (defaults: the H100 scenario of the backend now, prefix paged_; `servesim replay` refuses the configs of the
# backend before its paged and fused kernels, which it no longer runs)
# Needs torch and CUDA there; pydantic and simpy come from wheels in .device/wheels when not installed.
set -euo pipefail
OUT=${OUT:-out}
TRACE=${TRACE:-../shared/traces/azure_llm_2023_conv.csv}
PY=${PY:-python3}
$PY -c "import pydantic, simpy" 2>/dev/null || $PY -m pip install -q --no-index --find-links .device/wheels pydantic simpy
export PYTHONPATH=$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
CONFIG=${CONFIG:-calibrate/measurements/h100_llama3_8b_azure_paged.yaml}  # (the backend as it is)
PREFIX=${PREFIX-paged_}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
for sched in ${SCHEDS:-vllm sarathi}; do
  for load in "light 1.0 100" "heavy 5.0 150"; do
    set -- $load
    case " ${LOADS:-light heavy} " in *" $1 "*) ;; *) continue ;; esac
    timeout 150 $PY -m servesim replay "$CONFIG" --device cuda --asap --out "$OUT/${PREFIX}real_${sched}_$1" \
      --set scheduler.name=$sched --set workloads.0.arrival.rate=$2 --set workloads.0.num_requests=$3 \
      --set "workloads.0.trace.path=$TRACE" ${EXTRA:+--set "$EXTRA"} | tail -12 || echo "replay $sched $1 did not finish"
  done
done
# The device tool brings back at most 8 files: pack the small ones of every run into one archive.
tar -czf "$OUT/replays.tar.gz" -C "$OUT" --exclude=token_times.npy --exclude='*.png' $(cd "$OUT" && ls -d "${PREFIX}"real_*)
