"""Where a full-graph step's GPU time goes: the backend's kernels in one replay (torch.profiler: CUPTI traces
the kernels of a CUDA-graph replay), summed by kernel name, against the step's CUDA-event time and the cost
model's operators for the same shape. Run on a GPU from the repository root:

    python calibrate/step_breakdown.py --out breakdown.json [--cases llama-3.2-1b:1:1100:1,llama-3-8b:8:1100:5]

A case is model:sequences:context:queries (queries 1: decodes; k + 1: a uniform batch of verifications).
The gap between the event time and the kernels' sum is the GPU idle between kernels of the replay.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import numpy as np
import torch

from backend.block_table import BlockTables
from backend.graphs import GraphCache
from backend.model import PagedKVCache, build_model, warm_up_kernels
from calibrate.timing import Timer
from hardware.catalog import get_model
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.operators import StepShape

DEFAULT_CASES = ("llama-3.2-1b:1:1100:1,llama-3.2-1b:4:1100:1,llama-3.2-1b:16:1100:1,llama-3.2-1b:4:1100:2,"
                 "llama-3-8b:1:1100:1,llama-3-8b:8:1100:1,llama-3-8b:1:1100:5,llama-3-8b:8:1100:5")
BLOCK = 16


def kernel_times(replay: object, reps: int = 5) -> dict[str, tuple[float, float]]:
    """(launches, microseconds) per replay of each kernel name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            rec = out[e.name]
            rec[0] += 1 / reps
            rec[1] += e.time_range.elapsed_us()
    return {k: (v[0], v[1] / reps) for k, v in out.items()}


def run_case(model_id: str, seqs: int, context: int, queries: int, built: dict) -> dict:
    spec = get_model(model_id)
    dev = torch.device("cuda")
    need = -(-(context + queries) // BLOCK)
    if model_id not in built:
        num_blocks = 16 * need + 8
        model = build_model(spec, dev, torch.bfloat16, seed=0)
        cache = PagedKVCache(spec.num_hidden_layers, num_blocks + 1, BLOCK, spec.num_key_value_heads,
                             spec.head_size, torch.bfloat16, dev)
        warm_up_kernels(spec, 1, spec.num_key_value_heads, BLOCK, torch.bfloat16, dev)
        built.clear()
        built[model_id] = GraphCache(model, cache, num_blocks, BLOCK)
    graphs = built[model_id]
    tables = BlockTables(graphs.num_blocks)
    for rid in range(seqs):
        tables.resize(rid, need)
    ids, done = list(range(seqs)), np.full(seqs, context, dtype=np.int64)
    tokens = np.zeros(seqs * queries, dtype=np.int64)

    def replay() -> None:
        graphs.decode(tables, ids, tokens, done, queries=queries)

    replay()  # captures
    torch.cuda.synchronize()
    timer = Timer(dev)
    gpu_ms = statistics.median(timer.events(replay) for _ in range(50)) * 1e3
    kernels = kernel_times(replay)
    shape = (StepShape.build(decode=[context] * seqs) if queries == 1 else
             StepShape.build(verify=[queries] * seqs, verify_context=[context] * seqs))
    cost = CostModel(Deployment.build(model_id, "h100")).price(shape)
    return {"case": f"{model_id}:{seqs}:{context}:{queries}", "event_ms": gpu_ms,
            "kernel_sum_ms": sum(us for _, us in kernels.values()) / 1e3,
            "kernels": sorted(({"name": k[:90], "per_step": round(n, 2), "us": round(us, 2)}
                               for k, (n, us) in kernels.items()), key=lambda r: -r["us"]),
            "priced_ms": cost.seconds * 1e3, "priced_overhead_ms": cost.overhead_seconds * 1e3,
            "priced": [{"name": r.name, "count": r.count, "us": round(r.seconds * 1e6, 2)} for r in cost.breakdown]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=DEFAULT_CASES)
    args = parser.parse_args()
    built: dict = {}
    results = []
    for case in args.cases.split(","):
        model_id, seqs, context, queries = case.split(":")
        r = run_case(model_id, int(seqs), int(context), int(queries), built)
        print(f"{r['case']}: event {r['event_ms']:.3f} ms, kernels {r['kernel_sum_ms']:.3f} ms, priced "
              f"{r['priced_ms']:.3f} ms (host {r['priced_overhead_ms']:.3f}), {len(r['kernels'])} kernel names",
              flush=True)
        results.append(r)
        json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
