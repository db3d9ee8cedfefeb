#!/usr/bin/env bash
# The simulator's side of the validation (issue 5): the same scenarios as run_replays.sh, then `servesim
# validate` against the replays in calibrate/measurements/: the backend before its paged and fused kernels
# (real_*, priced with the H100 profile fitted to it) and, where replayed, the backend now (paged_real_* on
# an H100 and paged_h200_real_* on an H200, issue 21, priced with the committed profiles). Run from the
# repository root.
set -euo pipefail
M=calibrate/measurements
sim() {  # prefix config profile name load rate requests [key.path=value ...]: runs named ${prefix}real_${name}_${load}
  # the CUDA-graph mode the replay ran (replays before mixed-step graphs ran every step with a prefill eagerly)
  graphs=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['hardware']['cuda_graphs'])" \
    "$M/${1}real_${4}_$5/config.yaml")
  sets=()
  for kv in "${@:8}"; do sets+=(--set "$kv"); done
  servesim run "$M/$2" --quiet --out "$M/${1}sim_${4}_$5" --set hardware.cuda_graphs=$graphs \
    --set workloads.0.arrival.rate=$6 --set workloads.0.num_requests=$7 "${sets[@]}" > /dev/null
  servesim validate "$M/${1}sim_${4}_$5" "$M/${1}real_${4}_$5" --profile "$3" --out "$M/${1}validation_${4}_$5" \
    | tee "$M/${1}validation_${4}_$5.txt"
}
# the KV-memory policies replayed on the GPU (issue 26: calibrate/run_kv_replays.sh): prefix caching, swap
# preemption, and the prefix scenario without caching (the control: same requests, no shared blocks)
for v in prefix swap; do
  if [ -d "$M/${v}_real_vllm_heavy" ]; then
    sim ${v}_ h100_llama3_8b_$v.yaml calibrated vllm heavy 5.0 150 scheduler.name=vllm
  fi
done
if [ -d "$M/noprefix_real_vllm_heavy" ]; then
  sim noprefix_ h100_llama3_8b_prefix.yaml calibrated vllm heavy 5.0 150 scheduler.name=vllm \
    kv_cache.prefix_caching=false
fi
# speculative decoding (issues 8 and 21: calibrate/run_spec_replays.sh) on the backend now
for gpu in h100 h200; do
  p=paged_; [ $gpu = h200 ] && p=paged_h200_
  for load in "light 1.0 100" "heavy 5.0 150"; do
    set -- $load
    if [ -d "$M/${p}real_spec_$1" ]; then
      sim $p ${gpu}_llama3_8b_spec_paged.yaml calibrated spec "$@"
    fi
  done
done
for sched in vllm sarathi; do
  for load in "light 1.0 100" "heavy 5.0 150"; do
    set -- $load
    sim "" h100_llama3_8b_azure.yaml "$M/h100-sxm-80gb_gather_profile.json" $sched "$@" scheduler.name=$sched
    if [ -d "$M/paged_real_${sched}_$1" ]; then
      sim paged_ h100_llama3_8b_azure_paged.yaml calibrated $sched "$@" scheduler.name=$sched
    fi
    if [ -d "$M/paged_h200_real_${sched}_$1" ]; then  # the same backend on an H200 (2026-12-06)
      sim paged_h200_ h200_llama3_8b_azure_paged.yaml calibrated $sched "$@" scheduler.name=$sched
    fi
  done
done
