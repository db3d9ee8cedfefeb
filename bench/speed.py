"""Engine speed: Azure conversation trace lengths, Llama-3-8B on one H100, `vllm` policy, near saturation.

Run: python bench/speed.py [--trace ../shared/traces/azure_llm_2023_conv.csv] [--sizes 10000 100000]
     python bench/speed.py --default --sizes 100000 1000000   # the embedded default scenario (`servesim run`)
Each size runs in a fresh subprocess so its peak memory (max RSS, results included) is its own. Prints wall
seconds, simulated requests per wall second, simulated steps per wall second and peak memory.
Targets: issue 3, 100k requests in under 20 s wall and under 1.5 GB on the 2-core dev machine; issue 23, 1M
requests of the default scenario under 4 GB peak RSS (and under 60 s, which needs issue 28's skipping ahead).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_2023_conv.csv"


def one(trace: str | None, n: int, rate: float) -> dict:
    from sim.config import load_config
    from sim.engine import simulate

    config = load_config(None, [f"workloads.0.num_requests={n}"] if trace is None else [
        "workloads.0.name=azure-conv",
        f"workloads.0.arrival.rate={rate}",
        f"workloads.0.num_requests={n}",
        "workloads.0.lengths={kind: trace}",
        f"workloads.0.trace={{path: '{trace}'}}",
        "scheduler={name: vllm}",
    ])
    t0 = time.perf_counter()
    results = simulate(config)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = results.summary
    return {"requests": n, "wall_s": wall, "req_per_wall_s": n / wall, "steps": s["steps"],
            "steps_per_wall_s": s["steps"] / wall, "peak_rss_mb": peak_mb, "mean_batch": s["mean_batch_size"],
            "throughput_req_s": s["throughput_req_s"], "ttft_p50_s": s["ttft_p50_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--rate", type=float, default=19.0, help="Poisson rate (req/s); ~95% of measured capacity")
    ap.add_argument("--default", action="store_true", help="the embedded default scenario instead (its own rate)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(None if args.default else args.trace, args.child, args.rate)))
        return
    print(f"{'requests':>9s} {'wall s':>8s} {'req/wall s':>11s} {'steps':>8s} {'steps/wall s':>13s} "
          f"{'peak MB':>8s} {'batch':>6s} {'sim req/s':>9s}")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--trace", args.trace, "--rate", str(args.rate),
                              *(["--default"] if args.default else []), "--child", str(n)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        print(f"{r['requests']:9d} {r['wall_s']:8.2f} {r['req_per_wall_s']:11.0f} {r['steps']:8d} "
              f"{r['steps_per_wall_s']:13.0f} {r['peak_rss_mb']:8.0f} {r['mean_batch']:6.1f} "
              f"{r['throughput_req_s']:9.2f}")


if __name__ == "__main__":
    main()
