"""Engine speed: Azure conversation trace lengths, Llama-3-8B on one H100, `vllm` policy, near saturation.

Run: python bench/speed.py [--trace ../shared/traces/azure_llm_2023_conv.csv] [--sizes 10000 100000]
     python bench/speed.py --default --sizes 100000 1000000   # the embedded default scenario (`servesim run`)
     python bench/speed.py --identical [--sizes 100000]       # issue 28's identical workload, vllm and sarathi
       (bench/identical_workload.yaml: Llama-2-70B, TP 2, A100-80GB, the request list of
       bench/make_identical_workload.py; Vidur 0.0.26 took 300 s (vllm) and 324 s (sarathi) on the same
       100k requests on this 2-core machine, with 1.7 GB peak RSS; target 15 s and 1 GB)
     python bench/speed.py --reader                            # Azure trace reading, whole file and row by row
     add --step-by-step to any of these: every decode step one by one (no skipping ahead: sim/skip_ahead.py)
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


IDENTICAL = Path(__file__).resolve().parent / "identical_workload.yaml"
SARATHI = "scheduler={name: sarathi, token_budget: 512, max_num_seqs: 128}"


def one(trace: str | None, n: int, rate: float, scenario: str = "trace", skip_ahead: bool = True) -> dict:
    from sim.config import load_config
    from sim.engine import simulate

    if scenario.startswith("identical"):
        sets = [f"workloads.0.num_requests={n}"] + ([SARATHI] if scenario == "identical-sarathi" else [])
        config = load_config(IDENTICAL, sets)
    else:
        config = load_config(None, [f"workloads.0.num_requests={n}"] if trace is None else [
            "workloads.0.name=azure-conv",
            f"workloads.0.arrival.rate={rate}",
            f"workloads.0.num_requests={n}",
            "workloads.0.lengths={kind: trace}",
            f"workloads.0.trace={{path: '{trace}'}}",
            "scheduler={name: vllm}",
        ])
    t0 = time.perf_counter()
    results = simulate(config, skip_ahead=skip_ahead)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = results.summary
    return {"requests": n, "wall_s": wall, "req_per_wall_s": n / wall, "steps": s["steps"],
            "steps_per_wall_s": s["steps"] / wall, "peak_rss_mb": peak_mb, "mean_batch": s["mean_batch_size"],
            "throughput_req_s": s["throughput_req_s"], "ttft_p50_s": s["ttft_p50_s"]}


def reader_times(repeats: int = 5) -> None:
    """Median seconds to read the identical workload's 100k-row trace whole (`traces.readers._azure_at_once`,
    pandas' C parser) and row by row (`_azure_by_rows`, the reader of any file with a row off the plain form)."""
    import statistics

    import traces.readers as readers

    path = IDENTICAL.parent / "data" / "identical_workload_100k.csv"
    for name, read in (("whole", readers.read_azure), ("row by row", lambda p: readers._azure_by_rows(p, "error"))):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            read(path)
            times.append(time.perf_counter() - t0)
        print(f"{path.name}, {name}: {statistics.median(times):.3f} s (median of {repeats})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--rate", type=float, default=19.0, help="Poisson rate (req/s); ~95% of measured capacity")
    ap.add_argument("--default", action="store_true", help="the embedded default scenario instead (its own rate)")
    ap.add_argument("--identical", action="store_true", help="issue 28's identical workload, vllm and sarathi")
    ap.add_argument("--step-by-step", action="store_true", help="no skipping ahead (the engine before issue 28)")
    ap.add_argument("--reader", action="store_true", help="time the trace reader alone")
    ap.add_argument("--scenario", help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reader:
        reader_times()
        return
    if args.child:
        print(json.dumps(one(None if args.default else args.trace, args.child, args.rate, args.scenario or "trace",
                             not args.step_by_step)))
        return
    scenarios = ["identical-vllm", "identical-sarathi"] if args.identical else ["trace"]
    print(f"{'scenario':>17s} {'requests':>9s} {'wall s':>8s} {'req/wall s':>11s} {'steps':>8s} {'steps/wall s':>13s} "
          f"{'peak MB':>8s} {'batch':>6s} {'sim req/s':>9s}")
    for scenario in scenarios:
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--trace", args.trace, "--rate", str(args.rate),
                                  *(["--default"] if args.default else []),
                                  *(["--step-by-step"] if args.step_by_step else []), "--scenario", scenario,
                                  "--child", str(n)], check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            name = "default" if args.default else scenario
            print(f"{name:>17s} {r['requests']:9d} {r['wall_s']:8.2f} {r['req_per_wall_s']:11.0f} {r['steps']:8d} "
                  f"{r['steps_per_wall_s']:13.0f} {r['peak_rss_mb']:8.0f} {r['mean_batch']:6.1f} "
                  f"{r['throughput_req_s']:9.2f}")


if __name__ == "__main__":
    main()
