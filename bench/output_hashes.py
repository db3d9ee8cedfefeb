"""Hashes of simulation outputs over a fixed set of configurations, to show that an engine change leaves
every output byte-identical: run it in a checkout before the change and in one after, and compare.

Run: python bench/output_hashes.py [--out hashes.json]
Configurations: the skip-ahead tests' (`tests/test_skip_ahead.py`: six schedulers at light and heavy load, nine
cost-model paths), 3,000 requests of bench/identical_workload.yaml under vllm and sarathi, and the default
scenario. Each is hashed (requests and steps tables, token times, summary) with skipping ahead and without.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def digest(results) -> str:
    h = hashlib.sha256()
    h.update(results.requests.to_csv().encode())
    h.update(results.steps.to_csv().encode())
    h.update(np.asarray(results.token_times).tobytes())
    h.update(json.dumps(results.summary, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the hashes here (JSON)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_skip_ahead import COST_PATHS, SCHEDULERS, config

    from sim.config import load_config
    from sim.engine import simulate

    cases = {}
    for s in SCHEDULERS:
        cases[s["name"]] = config(s)
        cases[s["name"] + "_heavy"] = config(s, blocks=120, rate=20.0)
    for i, case in enumerate(COST_PATHS.values()):
        cases[f"path{i}"] = config({"name": "sarathi", "token_budget": 256, "max_num_seqs": 16}, blocks=2000, **case)
    identical = HERE / "identical_workload.yaml"
    cases["identical_vllm"] = load_config(identical, ["workloads.0.num_requests=3000"])
    sarathi = "scheduler={name: sarathi, token_budget: 512, max_num_seqs: 128}"
    cases["identical_sarathi"] = load_config(identical, ["workloads.0.num_requests=3000", sarathi])
    cases["default"] = load_config(None, [])
    out = {}
    for name, cfg in cases.items():
        out[name] = f"{digest(simulate(cfg))} {digest(simulate(cfg, skip_ahead=False))}"
        print(f"{name:30s} {out[name]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
