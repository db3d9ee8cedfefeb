#!/usr/bin/env bash
# Refit the committed profiles from the raw measurements and validate them against the reference steps (all
# commands of calibrate/measurements/README.md, in order). Run from the repository root; CPU only, ~2 minutes.
set -euo pipefail
cd calibrate/measurements
R=raw
H100=(--raw $R/h100-sxm-80gb_raw.json --later $R/h100-sxm-80gb_attention_raw.json
      --later $R/h100-sxm-80gb_attention2_raw.json --later $R/h100-sxm-80gb_steps_raw.json)
# the H200's kernels: first session, attention (fourth), GEMMs of the six models and Llama-3-8B's attention (seventh)
H200=(--raw $R/h200-sxm-141gb_raw.json --later $R/h200-sxm-141gb_attention_raw.json
      --later $R/h200-sxm-141gb_gemm_raw.json --later $R/h200-sxm-141gb_attention_llama3_raw.json)
# the H100 under the backend before its paged and fused kernels (the committed replays ran it)
servesim calibrate --refit "${H100[@]}" --later $R/h100-sxm-80gb_reference_raw.json \
  --out h100-sxm-80gb_gather_profile.json > /dev/null
# the H100 under the backend with paged attention and fused elementwise kernels: the first session's GEMMs
# (cuBLAS, unchanged) under the eighth session's elementwise kernels, attention, fixed costs and reference
tmp=$(mktemp -d)
python3 -c "import json, sys; d = json.load(open(sys.argv[1])); d['steps'] = []
d['records'] = [r for r in d['records'] if r['kind'] == 'gemm']; json.dump(d, open(sys.argv[2], 'w'))" \
  $R/h100-sxm-80gb_raw.json $tmp/h100_gemm_raw.json
# (Llama-3-8B's GEMMs again on 106 values of M, every CUDA-graph capture size among them, 2026-12-06; the
# grouped expert GEMMs of Qwen1.5-MoE-A2.7B and Qwen3-30B-A3B, issue 25; then the reference's fixed costs, of
# the backend with piecewise graphs for steps with prefill chunks and one attention output per eager mixed step,
# 2026-12-07; and the GEMMs and paged attention of Llama-3.2-1B, the speculative replays' draft, whose 64-wide
# heads the other models' surfaces do not cover; twelfth session)
H100_PAGED=(--raw $tmp/h100_gemm_raw.json --later $R/h100-sxm-80gb_gemm_raw.json --later $R/h100-sxm-80gb_paged_raw.json
            --later $R/h100-sxm-80gb_moe_raw.json --later $R/h100-sxm-80gb_llama-3.2-1b_gemm_raw.json
            --later $R/h100-sxm-80gb_llama-3.2-1b_attention_raw.json
            --later $R/h100-sxm-80gb_paged_piecewise4_reference_raw.json)
servesim calibrate --refit "${H100_PAGED[@]}" --out ../../hardware/profiles/h100-sxm-80gb.json > /dev/null
# the same inputs with an MoE model's reference steps last: that host's own overheads for its MoE steps
for m in qwen1.5-moe-a2.7b qwen3-30b-a3b; do
  servesim calibrate --refit "${H100_PAGED[@]}" --later $R/h100-sxm-80gb_${m}_reference_raw.json \
    --out h100-sxm-80gb_${m}_host_profile.json > /dev/null
done
# the H200 under the backend before its paged and fused kernels (its references below ran it)
servesim calibrate --refit "${H200[@]}" --later $R/h200-sxm-141gb_x2host_steps_raw.json \
  --later $R/h200-sxm-141gb_steps_raw.json --later $R/h200-sxm-141gb_reference_raw.json \
  --out h200-sxm-141gb_gather_profile.json > /dev/null
# the H200 under the backend now (2026-12-06): the GEMMs and collectives of the first session, the six models'
# GEMMs on 60 values of M (seventh), Llama-3-8B's on 106, its elementwise kernels, paged attention and fixed
# costs, and the reference of the backend with piecewise graphs (no TP steps: the 2-GPU host's, third session,
# ran at another host's dispatch speed and give no `launch_collective` under this host's)
python3 -c "import json, sys; d = json.load(open(sys.argv[1])); d['steps'] = []
d['records'] = [r for r in d['records'] if r['kind'] in ('gemm', 'all-reduce', 'all-gather', 'send-recv')]
json.dump(d, open(sys.argv[2], 'w'))" $R/h200-sxm-141gb_raw.json $tmp/h200_base_raw.json
servesim calibrate --refit --raw $tmp/h200_base_raw.json --later $R/h200-sxm-141gb_gemm_raw.json \
  --later $R/h200-sxm-141gb_llama3_gemm_raw.json --later $R/h200-sxm-141gb_paged_raw.json \
  --later $R/h200-sxm-141gb_paged_reference_raw.json --out ../../hardware/profiles/h200-sxm-141gb.json > /dev/null
servesim calibrate --refit "${H200[@]}" --later $R/h200-sxm-141gb_x2host_steps_raw.json \
  --out h200-sxm-141gb_x2host_profile.json > /dev/null
v() { echo "== $*" >&2; servesim calibrate validate "$@" > /dev/null; }
v h100-sxm-80gb_llama-3-8b_steps.csv --gpu h100 --profile h100-sxm-80gb_gather_profile.json --out validation_h100
v h100-sxm-80gb_paged_llama-3-8b_steps.csv --gpu h100 --out validation_h100_paged
# the backend with mixed steps as full graphs (2026-12-06), then as piecewise graphs (attention between pieces)
v h100-sxm-80gb_paged_mixedgraphs_llama-3-8b_steps.csv --gpu h100 --out validation_h100_paged_mixedgraphs
v h100-sxm-80gb_paged_piecewise_llama-3-8b_steps.csv --gpu h100 --out validation_h100_paged_piecewise
# the same backend's reference measured again in a later session (not in the fit)
v h100-sxm-80gb_paged_piecewise2_llama-3-8b_steps.csv --gpu h100 --out validation_h100_paged_piecewise2
# and on the H100 of the light replays of 2026-12-06's seventh session (the same call: not in the fit)
v h100-sxm-80gb_paged_piecewise3_llama-3-8b_steps.csv --gpu h100 --out validation_h100_paged_piecewise3
# and the backend whose eager mixed steps write both attention calls into one output (2026-12-07; the fit's)
v h100-sxm-80gb_paged_piecewise4_llama-3-8b_steps.csv --gpu h100 --out validation_h100_paged_piecewise4
# Llama-3.2-1B (the speculative replays' draft) on the same backend (twelfth session; not in the fit)
v h100-sxm-80gb_paged_llama-3.2-1b_steps.csv --gpu h100 --out validation_h100_paged_llama-3.2-1b
v h200-sxm-141gb_paged_llama-3-8b_steps.csv --gpu h200 --out validation_h200_paged
for m in qwen1.5-moe-a2.7b qwen3-30b-a3b; do  # MoE steps (issues 25 and 21: the backend's fused MoE layer)
  v h100-sxm-80gb_${m}_steps.csv --gpu h100 --out validation_h100_moe_$m
  v h100-sxm-80gb_${m}_steps.csv --gpu h100 --overheads h100-sxm-80gb_${m}_host_profile.json \
    --out validation_h100_moe_${m}_own_host
done
v h200-sxm-141gb_llama-3-8b_steps.csv --gpu h200 --profile h200-sxm-141gb_gather_profile.json --out validation_h200
v h200-sxm-141gb_llama-3-8b_steps.csv --gpu h200 --profile h100-sxm-80gb_gather_profile.json \
  --out validation_h200_from_h100_profile
v h200-sxm-141gb_llama-3-8b_tp2_steps.csv --gpu h200 --profile h200-sxm-141gb_gather_profile.json \
  --overheads h200-sxm-141gb_x2host_profile.json --out validation_h200_tp2
v h200-sxm-141gb_x2host_llama-3-8b_steps.csv --gpu h200 --profile h200-sxm-141gb_gather_profile.json \
  --overheads h200-sxm-141gb_x2host_profile.json --out validation_h200_x2host
# the same H200 profile against references of three other lent H200s, each with its own host's overheads (and
# kernels where that machine timed Llama-3-8B's; calibrate/measurements/README.md)
O=h200_other_machines
for m in a c d; do
  kernels=$O/${m}_kernels_raw.json; [ $m = a ] && kernels=$O/a_gemm_raw.json
  servesim calibrate --refit "${H200[@]}" --later $kernels --later $O/${m}_reference_raw.json \
    --out $tmp/$m.json > /dev/null
  v $O/${m}_steps.csv --gpu h200 --profile $tmp/$m.json --out $O/validation_$m
done
