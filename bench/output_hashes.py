"""Hashes of simulation outputs over a fixed set of configurations, to show that an engine change leaves
every output byte-identical: run it in a checkout before the change and in one after, and compare.

Run: python bench/output_hashes.py [--out hashes.json]
Configurations: the skip-ahead tests' (`tests/test_skip_ahead.py`: six schedulers at light and heavy load, nine
cost-model paths), 3,000 requests of bench/identical_workload.yaml under vllm and sarathi, and the default
scenario, and twelve speculation configurations (chains, padded, budgeted, adaptive, Beta, positional and
trace acceptance, draft heads, prompt lookup, static, Sequoia, OPT-Tree and DySpec trees). Each is hashed
(requests and steps tables, token times, summary) with skipping ahead and without.
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


SPECULATION = {  # `speculation:` sections over examples/speculative_decoding.yaml (the default is a chain of 4)
    "iid": {},
    "padded": {"batching": "padded"},
    "budgeted": {"batching": "budgeted", "verify_budget": 24},
    "adaptive_beta": {"acceptance": {"kind": "beta", "mean": 0.7}, "adaptive": {"full_batch": 2, "off_batch": 8}},
    "positional_heads": {"acceptance": {"kind": "positional", "alphas": [0.9, 0.6]},
                         "draft": {"kind": "draft_heads", "layers": 1, "sequential": False}},
    "trace_ngram": {"acceptance": {"kind": "trace", "path": "TRACE"}, "draft": {"kind": "ngram"}},
    "static_tree": {"acceptance": {"kind": "ranked", "probs": [0.6, 0.2]},
                    "tree": {"kind": "static", "widths": [2, 2, 1]}},
    "sequoia": {"acceptance": {"kind": "ranked", "probs": [0.6, 0.2]}, "tree": {"kind": "sequoia", "nodes": 12}},
    "sequoia_budget": {"acceptance": {"kind": "ranked", "probs": [0.6, 0.2]}, "batching": "budgeted",
                       "verify_budget": 40, "tree": {"kind": "sequoia", "nodes": 12}},
    "opt_tree": {"acceptance": {"kind": "confidence"}, "tree": {"kind": "opt_tree", "nodes": 12}},
    "dyspec": {"acceptance": {"kind": "confidence"}, "tree": {"kind": "dyspec", "nodes": 12}},
    "dyspec_budget": {"acceptance": {"kind": "confidence"}, "batching": "budgeted", "verify_budget": 48,
                      "tree": {"kind": "dyspec", "nodes": 12}},
}


def speculation_cases() -> dict:
    """The `SPECULATION` variants, each on 120 requests of the speculative-decoding example at 8 req/s."""
    import tempfile

    import yaml

    from sim.config import SimConfig

    trace = Path(tempfile.mkdtemp()) / "accepted.jsonl"
    trace.write_text("\n".join(json.dumps({"accepted": [i % 5, (3 * i) % 4, 2]}) for i in range(7)) + "\n")
    base = yaml.safe_load((HERE.parent / "examples" / "speculative_decoding.yaml").read_text())
    base["workloads"][0].update(num_requests=120, arrival={"kind": "poisson", "rate": 8})
    cases = {}
    for name, change in SPECULATION.items():
        spec = {**base["speculation"], "compare_baseline": False, **change}
        if spec["acceptance"].get("path") == "TRACE":
            spec["acceptance"] = {**spec["acceptance"], "path": str(trace)}
        cases[f"spec_{name}"] = SimConfig.model_validate({**base, "speculation": spec})
    return cases


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
    cases.update(speculation_cases())
    out = {}
    for name, cfg in cases.items():
        out[name] = f"{digest(simulate(cfg))} {digest(simulate(cfg, skip_ahead=False))}"
        print(f"{name:30s} {out[name]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
