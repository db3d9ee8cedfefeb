#!/usr/bin/env bash
# Speculative-decoding replays on the GPU (issue 8). Run from the repository root on the device machine:
#   OUT=<dir> TRACE=<absolute path of azure_llm_2023_conv.csv> [CONFIG=...] [PREFIX=paged_] bash calibrate/run_spec_replays.sh
# CONFIG: the H100 scenario of the backend now by default (h100_llama3_8b_spec_paged.yaml; the H200's:
# CONFIG=calibrate/measurements/h200_llama3_8b_spec_paged.yaml PREFIX=paged_h200_); replays land in
# $OUT/${PREFIX}real_spec_{light,heavy}. CHECK=1 first replays 30 requests with the target as its own draft
# and the real greedy rule (--acceptance model, 2,000 blocks: two 8B models and caches fit 80 GB): a draft is
# rejected only where the target's verification and the draft's passes round to different argmaxes (bf16
# over random weights, whose top logits nearly tie: 0.90 accepted on an H100, as with every step eager).
# Needs torch and CUDA; pydantic and simpy come from wheels in .device/wheels when not installed.
set -euo pipefail
OUT=${OUT:-out}
PY=${PY:-python3}
TRACE=${TRACE:-$PWD/../shared/traces/azure_llm_2023_conv.csv}
$PY -c "import pydantic, simpy" 2>/dev/null || $PY -m pip install -q --no-index --find-links .device/wheels pydantic simpy
export PYTHONPATH=$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
CONFIG=${CONFIG:-calibrate/measurements/h100_llama3_8b_spec_paged.yaml}
PREFIX=${PREFIX-paged_}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/${PREFIX}spec_gpu.txt"
if [ "${CHECK:-0}" = 1 ]; then
  timeout 200 $PY -m servesim replay "$CONFIG" --device cuda --asap --acceptance model --out "$OUT/self_check" \
    --set speculation.draft.model=llama-3-8b --set kv_cache.num_blocks=2000 --set workloads.0.num_requests=30 \
    --set "workloads.0.trace.path=$TRACE" \
    > /dev/null && $PY -c "import json, sys; s = json.load(open(sys.argv[1])); print('self-draft check: acceptance',
    s['spec_acceptance_rate'], 'over', s['spec_draft_tokens'], 'drafts')" "$OUT/self_check/summary.json" \
    | tee "$OUT/${PREFIX}spec_self_check.txt" || echo "self-draft check did not finish"
  rm -rf "$OUT/self_check"
fi
for load in "light 1.0 100" "heavy 5.0 150"; do
  set -- $load
  timeout 200 $PY -m servesim replay "$CONFIG" --device cuda --asap --acceptance oracle --out "$OUT/${PREFIX}real_spec_$1" \
    --set workloads.0.arrival.rate=$2 --set workloads.0.num_requests=$3 \
    --set "workloads.0.trace.path=$TRACE" | tail -14 || echo "replay $1 did not finish"
done
tar -czf "$OUT/${PREFIX}spec_replays.tar.gz" -C "$OUT" --exclude=token_times.npy --exclude='*.png' \
  $(cd "$OUT" && ls -d "${PREFIX}"real_spec_* "${PREFIX}"spec_*.txt 2>/dev/null)
