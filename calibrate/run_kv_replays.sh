#!/usr/bin/env bash
# Replays of the KV-memory policies on the GPU (issue 26), in one device call (carrying .device/: wheels, trace):
#   OUT=dir [VARIANTS="prefix swap noprefix"] bash calibrate/run_kv_replays.sh
# prefix: calibrate/measurements/<gpu>_llama3_8b_prefix.yaml (prefix caching, shared system prompts); swap:
# ..._swap.yaml (swap preemption in a small cache); noprefix: the prefix scenario without caching (the control).
# Each replays the vllm scheduler at the heavy load (5 req/s, 150 requests) through calibrate/run_replays.sh; the archives come back as $OUT/<variant>_replays.tar.gz. Afterwards, on any
# machine, `servesim run` the same config (the sim_ folder) and `servesim validate` the two
# (calibrate/measurements/README.md).
set -uo pipefail
. calibrate/device_env.sh
for v in ${VARIANTS:-prefix swap noprefix}; do
  mkdir -p "$OUT/$v"
  config=${v#no} extra=
  [ "$v" = noprefix ] && extra=kv_cache.prefix_caching=false
  OUT=$OUT/$v PY=$PY TRACE=$PWD/.device/azure_llm_2023_conv.csv CONFIG=calibrate/measurements/${GPU}_llama3_8b_$config.yaml \
    PREFIX=${v}_ SCHEDS=vllm LOADS=heavy EXTRA=$extra bash calibrate/run_replays.sh 2>&1 | tail -14 | tee "$OUT/${v}_replays.txt"
  mv "$OUT/$v/replays.tar.gz" "$OUT/${v}_replays.tar.gz" && rm -rf "${OUT:?}/$v"
done
