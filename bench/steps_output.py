"""What writing a run's step table costs against simulating it (`servesim run --out DIR --steps all|sampled|none`).

Run: python bench/steps_output.py [--requests 100000] [--format csv|parquet]
Simulates the embedded default scenario once with that many requests, then writes its outputs three times, with
every step, sampled to 100,000 steps and with none, and prints the seconds and the rows of each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sim.config import load_config
from sim.engine import simulate
from sim.report import STEP_TABLES, write_outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--format", choices=["csv", "parquet"], default="csv")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = simulate(load_config(None, [f"workloads.0.num_requests={args.requests}"]))
    print(f"simulated {args.requests} requests, {len(results.steps)} steps: {time.perf_counter() - t0:.1f} s")
    for mode in STEP_TABLES:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            write_outputs(results, out, args.format, steps=mode)
            seconds = time.perf_counter() - t0
            table = Path(out) / f"steps.{args.format}"
            rows = sum(1 for _ in table.open()) - 1 if table.exists() and args.format == "csv" else None
            size = table.stat().st_size / 1e6 if table.exists() else 0.0
            print(f"--steps {mode:8s} outputs written in {seconds:6.1f} s; steps table {size:7.1f} MB"
                  + (f", {rows} rows" if rows is not None else ""))


if __name__ == "__main__":
    main()
