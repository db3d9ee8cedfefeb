"""Where an engine turn's time goes: wall-clock timers around the engine's main calls on issue 28's identical
workload (bench/identical_workload.yaml), or the embedded default scenario (--default), per request.

Run: python bench/turn_costs.py [--requests 20000] [--scheduler vllm|sarathi] [--default]
Prints the run's wall seconds per request, and for each timed call its calls per request, microseconds per call
and microseconds per request (nested calls are counted inside their callers too: `price_decodes` inside
`advance`, `price` inside `executor.run`, `_price` (a step priced afresh, not read from the kept prefill prices)
inside `price`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

SARATHI = "scheduler={name: sarathi, token_budget: 512, max_num_seqs: 128}"


def main() -> None:
    import hardware.cost as cost
    import policies.sarathi as sarathi
    import policies.state as state
    import policies.vllm as vllm
    import sim.engine as engine
    import sim.executor as executor
    import sim.skip_ahead as skip_ahead
    from sim.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--scheduler", choices=["vllm", "sarathi"], default="vllm")
    ap.add_argument("--default", action="store_true", help="the embedded default scenario (its own scheduler)")
    args = ap.parse_args()
    if args.default and args.scheduler != "vllm":
        ap.error("--default runs the default scenario with its own scheduler (vllm); leave --scheduler out")
    sets = [f"workloads.0.num_requests={args.requests}"] + ([SARATHI] if args.scheduler == "sarathi" else [])
    config = load_config(None if args.default else Path(__file__).resolve().parent / "identical_workload.yaml", sets)
    totals: dict[str, list[float]] = {}

    def timed(cls: type, name: str, label: str) -> None:
        inner = getattr(cls, name)

        def call(*a, **k):
            t0 = time.perf_counter()
            out = inner(*a, **k)
            entry = totals.setdefault(label, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t0
            return out

        setattr(cls, name, call)

    for cls, name, label in [(vllm.VllmScheduler, "schedule", "schedule"),
                             (sarathi.SarathiScheduler, "schedule", "schedule"),
                             (skip_ahead.SkipAhead, "advance", "advance"),
                             (cost.CostModel, "price_decodes", "price_decodes"),
                             (executor.CostModelExecutor, "run", "executor.run"),
                             (cost.CostModel, "price", "price"),
                             (cost.CostModel, "_price", "_price"),
                             (state.ReplicaState, "complete_step", "complete_step"),
                             (engine.StepLog, "record", "record"),
                             (engine.StepLog, "record_stretch", "record_stretch")]:
        timed(cls, name, label)
    t0 = time.perf_counter()
    engine.simulate(config)
    wall, n = time.perf_counter() - t0, args.requests
    name = "default" if args.default else args.scheduler
    print(f"{name}: {n} requests in {wall:.2f} s wall, {wall / n * 1e6:.0f} us a request")
    print(f"{'call':>15s} {'calls/req':>10s} {'us/call':>8s} {'us/req':>7s}")
    for label, (calls, seconds) in totals.items():
        print(f"{label:>15s} {calls / n:10.2f} {seconds / calls * 1e6:8.1f} {seconds / n * 1e6:7.1f}")


if __name__ == "__main__":
    main()
