"""Planner speed: a 200-configuration search (5 GPU types x TP 1/2/4/8 x 5 schedulers x speculation off/on,
Llama-3-8B, Azure-conversation-like lengths, replicas auto), on the local process pool and on a local Ray
instance with the same number of workers; prints wall time, simulations run and simulations per second.
Probes are sized by simulated time as `servesim plan` sizes them, at least `--requests` requests (default
1,000), with one seed and no verification.

    python bench/plan.py [--workers N] [--requests N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from servesim.planner import PlanSpec, plan


def spec(requests: int, quick: bool) -> PlanSpec:
    gpus = ["h100", "a100"] if quick else ["h100", "h200", "a100", "l40s", "b200"]
    schedulers = [{"name": "vllm"}, {"name": "sarathi"}] if quick else [
        {"name": "vllm"}, {"name": "sarathi"}, {"name": "vllm_v1"}, {"name": "sarathi_decode_maximal"},
        {"name": "sarathi", "token_budget": 1024}]
    return PlanSpec.model_validate({
        "base": {"model": "llama-3-8b", "max_model_len": 8192, "slo": {"ttft_s": 1.0, "tpot_s": 0.05},
                 "workloads": [{"name": "w", "arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": requests,
                                "lengths": {"kind": "lognormal", "prompt_mean": 1155, "prompt_cv": 0.96,
                                            "output_mean": 211, "output_cv": 0.77, "max_prompt": 7000,
                                            "max_output": 1000}}]},
        "rates": [20], "attainment": 0.9, "tolerance": 0.2, "start_rate": 4,
        # probes sized as `servesim plan` sizes them (at least `requests` requests and 60 s of arrivals, longer
        # while a steady window is too short); one seed and no long re-simulation, to time the search itself
        "min_requests": requests, "seeds": 1, "verify_top": 0,
        "search": {"gpus": [{"id": g} for g in gpus], "tp": [1, 2, 4, 8], "schedulers": schedulers,
                   "speculation": [None, {"draft": {"kind": "draft_model", "model": "llama-3.2-1b"}, "k": 4,
                                          "acceptance": {"kind": "iid", "alpha": 0.8}}]},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--requests", type=int, default=1000, help="requests per probe, at least (default 1000)")
    parser.add_argument("--quick", action="store_true", help="16 configurations instead of 200")
    args = parser.parse_args()
    s = spec(args.requests, args.quick)
    for mode in ("local pool", "ray"):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            table = plan(s, out, workers=args.workers, ray=mode == "ray")
            wall = time.perf_counter() - t0
        sized = table[table["pruned"] == ""]
        sims = int(sized["probes"].sum()) + int(sized["replicas_at_20"].notna().sum())
        print(f"{mode:10s}: {len(table)} configurations ({len(sized)} sized, {len(table) - len(sized)} pruned), "
              f"{sims} simulations in {wall:.1f} s wall with {args.workers} workers: {sims / wall:.1f} simulations/s")


if __name__ == "__main__":
    main()
