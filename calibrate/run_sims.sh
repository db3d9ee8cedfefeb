#!/usr/bin/env bash
# The simulator's side of the validation (issue 5): the same four scenarios as run_replays.sh, then
# `servesim validate` against the replays in calibrate/measurements/. Run from the repository root.
set -euo pipefail
M=calibrate/measurements
for sched in vllm sarathi; do
  for load in "light 1.0 100" "heavy 5.0 150"; do
    set -- $load
    servesim run "$M/h100_llama3_8b_azure.yaml" --quiet --out "$M/sim_${sched}_$1" \
      --set scheduler.name=$sched --set workloads.0.arrival.rate=$2 --set workloads.0.num_requests=$3 > /dev/null
    servesim validate "$M/sim_${sched}_$1" "$M/real_${sched}_$1" --profile $M/h100-sxm-80gb_gather_profile.json --out "$M/validation_${sched}_$1" \
      | tee "$M/validation_${sched}_$1.txt"
  done
done
