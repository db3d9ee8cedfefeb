"""Steady-state verdicts over seeds: how often short and long runs of the default scenario are called
stable, overloaded or too short to tell (`sim.steady`), with each run's backlog growth in req/s.

Run: python bench/steady_verdicts.py [--seeds 8]   (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse

from sim.config import load_config
from sim.engine import simulate

CASES = [(15, 500), (15, 1000), (18, 2000), (22, 2000), (26, 1000), (26, 4000)]  # (req/s, requests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    for rate, n in CASES:
        runs = []
        for seed in range(args.seeds):
            s = simulate(load_config(None, [f"workloads.0.arrival.rate={rate}", f"workloads.0.num_requests={n}",
                                            f"seed={seed}"])).summary
            runs.append(f"{s['stability']}({s['steady_backlog_growth_req_s']:+.2f})")
        print(f"{rate:>4} req/s x {n:>5}: " + " ".join(runs), flush=True)


if __name__ == "__main__":
    main()
