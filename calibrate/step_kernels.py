"""Where a step's GPU time goes: Llama-3-8B steps through the backend's executor, graphed (decode graphs and
piecewise graphs) and eager, each timed as `calibrate reference` times it and then traced with torch.profiler.

Per step and execution it prints the step's GPU window (CUDA events, as the reference), the kernels' summed
time by family (GEMMs, attention, elementwise and the rest), the idle time in the window (window less the
union of the kernels' intervals) and the kernel count, per step; with `--kernels` also each kernel name's
time. Set beside the cost model's breakdown of the same shapes, this tells a kernel priced wrong from a GPU
that waits (for the host, or for a graph's launch).

Run: python calibrate/step_kernels.py [--runs 5] [--kernels] [--out steps.json]   (CUDA; about a minute)
     python calibrate/step_kernels.py --cpu-smoke   (tiny-llama on the CPU, its operators traced as kernels)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from calibrate.steps import StepRunner, agreed_blocks, release_memory  # noqa: E402
from hardware.catalog import get_model  # noqa: E402
from hardware.operators import StepShape  # noqa: E402

SHAPES = {  # the reference's graphed prefill and mixed steps, and a decode graph beside them
    "P131": StepShape.build(prefill=[131]),
    "P397": StepShape.build(prefill=[397]),
    "P61+D9@450": StepShape.build(prefill=[61], decode=[450] * 9),
    "P230@1100+D19@1700": StepShape.build(prefill=[230], prefill_cached=[1100], decode=[1700] * 19),
    "P500+D7@700": StepShape.build(prefill=[500], decode=[700] * 7),
    "P90+D170@610": StepShape.build(prefill=[90], decode=[610] * 170),
    "D64@1000": StepShape.build(decode=[1000] * 64),
}
FAMILIES = (("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
            ("attention", ("_prefill_kernel", "_decode_kernel", "_reduce_kernel", "flash", "attn")),
            ("elementwise", ("_add_rmsnorm", "_rope_cache", "_silu_mul", "elementwise", "vectorized", "reduce",
                             "index", "gather", "scatter", "copy", "fill", "argmax", "embedding")))


def family(name: str) -> str:
    low = name.lower()
    return next((f for f, keys in FAMILIES if any(k.lower() in low for k in keys)), "other")


def union(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, -np.inf
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def trace(runner: StepRunner, shape: StepShape, runs: int, cuda: bool = True) -> dict:
    """One shape: `runs` timed runs (after a warm-up that captures graphs), then `runs` traced runs."""
    from torch.profiler import ProfilerActivity, profile

    def once():
        outcome = runner.executor.run(runner.batch(shape))
        runner.release()
        return outcome

    once()
    timed = [once() for _ in range(runs)]
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            once()
        if cuda:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [e for e in prof.events() if e.device_type == kind and (cuda or e.name.startswith("aten::"))]
    by_name: dict[str, float] = defaultdict(float)
    by_family: dict[str, float] = defaultdict(float)
    for e in kernels:
        us = e.time_range.end - e.time_range.start
        by_name[e.name] += us / runs
        by_family[family(e.name)] += us / runs
    # the runs' kernels, split where the GPU idles longer than any step's window could hold (the host's release
    # and the next batch's set-up run between the runs)
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    starts = np.array([s for s, _ in spans])
    ends = np.maximum.accumulate(np.array([e for _, e in spans]))
    gaps = starts[1:] - ends[:-1]
    cuts = np.sort(np.argsort(gaps)[len(gaps) - (runs - 1):]) + 1 if runs > 1 else np.array([], dtype=int)
    groups = np.split(np.arange(len(spans)), cuts)
    busy = [union([spans[i] for i in g]) for g in groups]
    window = [spans[g[-1]][1] - spans[g[0]][0] for g in groups]
    return {"execution": timed[-1].execution, "wall_ms": statistics.median(o.seconds for o in timed) * 1e3,
            "gpu_ms": statistics.median(o.gpu_seconds for o in timed) * 1e3,
            "kernel_window_ms": statistics.median(window) / 1e3, "busy_ms": statistics.median(busy) / 1e3,
            "kernels": len(kernels) / runs, "families_ms": {f: v / 1e3 for f, v in sorted(by_family.items())},
            "names_us": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernels", action="store_true", help="print each kernel name's time too")
    ap.add_argument("--out", help="write the results as JSON")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny-llama on the CPU, no graphs")
    args = ap.parse_args(argv)
    spec, device = get_model("tiny-llama" if args.cpu_smoke else "llama-3-8b"), "cpu" if args.cpu_smoke else "cuda"
    results = {}
    for graphs in (False,) if args.cpu_smoke else (True, False):
        runner = StepRunner(spec, device, 16384 if args.cpu_smoke else agreed_blocks(spec, device), cuda_graphs=graphs,
                            max_requests=512)
        for name, shape in SHAPES.items():
            r = trace(runner, shape, args.runs, cuda=not args.cpu_smoke)
            results[f"{name} {r['execution']}"] = r
            fam = " ".join(f"{f} {v:.2f}" for f, v in r["families_ms"].items())
            idle = r["kernel_window_ms"] - r["busy_ms"]
            print(f"{name:20s} {r['execution']:5s} wall {r['wall_ms']:6.2f} gpu {r['gpu_ms']:6.2f} kernels-window "
                  f"{r['kernel_window_ms']:6.2f} busy {r['busy_ms']:6.2f} idle {idle:5.2f} n {r['kernels']:5.0f}"
                  f" | {fam}", flush=True)
            if args.kernels:
                for k, us in list(r["names_us"].items())[:14]:
                    print(f"      {us:9.1f} us  {k[:110]}")
        del runner
        release_memory(device)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
