"""Goodput placement search for disaggregation (DistServe, Zhong et al., OSDI 2024, section 4).

For a workload, SLOs (TTFT and TPOT targets with an attainment target, e.g. 90% of requests within both)
and a GPU budget, every placement (prefill TP x instances, decode TP x instances) and every colocated
configuration (TP x replicas, per scheduler) that fits the budget gets its goodput: the highest Poisson
rate whose steady-state SLO attainment meets the target in a stable run (`servesim.capacity.find_capacity`: probes
sized by simulated time, `Horizon`; the lowest over `seeds` seeds near the boundary, the range kept).
Placements are ranked by goodput per GPU. Configurations run in parallel processes (`workers`); each is a
pure function of its config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd

from hardware.errors import ServesimError
from servesim.capacity import Horizon, SearchProgress, attainment_predicate, find_capacity
from sim.config import SimConfig, parse_config
from sim.setup import build_pools


@dataclass(frozen=True)
class Candidate:
    """One configuration to size: a label, its config, and its GPUs."""

    kind: str  # "disaggregated" or "colocated"
    label: str
    config: SimConfig
    gpus: int


def _fits(config: SimConfig) -> bool:
    try:
        build_pools(config)
    except ServesimError:
        return False
    return True


def candidates(base: SimConfig, gpus: int, tps: Sequence[int], colocated: Sequence[str],
               link: str | None = None, transfer: str | None = None) -> list[Candidate]:
    """Every placement within `gpus` GPUs whose pools fit in memory (TP from `tps`), and every colocated
    configuration for each scheduler in `colocated`. Every pool takes the base config's top-level hardware
    (with the placement's TP) and scheduler: per-pool sections of the base config are replaced."""
    if gpus < 1:
        raise ServesimError(f"--gpus = {gpus}: the budget must be at least 1 GPU")
    data = base.model_dump(mode="json")
    disagg = dict(data.get("disaggregation") or {})
    disagg.pop("mixed", None)
    if link:
        disagg["link"] = link
    if transfer:
        disagg["transfer"] = transfer
    hw = data["hardware"]
    out: list[Candidate] = []
    for tp_p in tps:
        for tp_d in tps:
            for n_p in range(1, gpus // tp_p + 1):
                for n_d in range(1, (gpus - n_p * tp_p) // tp_d + 1):
                    pools = {"prefill": {"instances": n_p, "hardware": {**hw, "tp": tp_p}},
                             "decode": {"instances": n_d, "hardware": {**hw, "tp": tp_d}}}
                    cfg = parse_config({**data, "disaggregation": {**disagg, **pools}},
                                       "disagg-search (disaggregated placement)")
                    if _fits(cfg):
                        out.append(Candidate("disaggregated", f"{n_p}P(tp{tp_p}) + {n_d}D(tp{tp_d})", cfg,
                                             n_p * tp_p + n_d * tp_d))
    for name in colocated:
        for tp in tps:
            for replicas in range(1, gpus // tp + 1):
                cfg = parse_config({
                    **data, "disaggregation": None, "hardware": {**hw, "tp": tp}, "scheduler": {"name": name},
                    "cluster": {**data["cluster"], "replicas": replicas, "router": "least_outstanding"}},
                    f"disagg-search (colocated {name})")
                if _fits(cfg):
                    out.append(Candidate("colocated", f"{name} {replicas}x tp{tp}", cfg, replicas * tp))
    if not out:
        raise ServesimError(f"no configuration of {base.model} fits within {gpus} GPUs of {hw['gpu']} "
                            f"with tp in {list(tps)}")
    return out


def _size(job: tuple[Candidate, float, float, float, Horizon, int]) -> dict[str, Any]:
    cand, attainment, start, rel_tol, horizon, seeds = job
    cap = find_capacity(cand.config, attainment_predicate(attainment), start=start, rel_tol=rel_tol,
                        horizon=horizon, seeds=seeds)
    s = cap.summary or {}
    low, median, high = cap.range
    return {"kind": cand.kind, "placement": cand.label, "gpus": cand.gpus, "goodput_req_s": cap.rate,
            "goodput_median_req_s": median, "goodput_max_req_s": high, "goodput_per_gpu": cap.rate / cand.gpus,
            "slo_attainment": s.get("steady_slo_attainment"), "ttft_p90_s": s.get("steady_ttft_p90_s"),
            "tpot_p90_s": s.get("steady_tpot_p90_s"),
            "cost_per_million_output_tokens": s.get("cost_per_million_output_tokens"),
            "probes": len(cap.probes), "probe_horizon_s": cap.duration_s}


def search(base: SimConfig, gpus: int, tps: Sequence[int] = (1, 2, 4, 8), colocated: Sequence[str] = ("vllm",
           "sarathi"), attainment: float = 0.9, link: str | None = None, transfer: str | None = None,
           start: float = 1.0, rel_tol: float = 0.05, workers: int | None = None, horizon: Horizon = Horizon(),
           seeds: int = 3, progress: bool = False) -> pd.DataFrame:
    """Goodput of every candidate, best goodput per GPU first (ties: fewer GPUs, then the label);
    `workers` processes (default: all cores), a progress line on a terminal when `progress`."""
    if not 0 < attainment <= 1:
        raise ServesimError(f"--attainment = {attainment}: allowed values are in (0, 1]")
    if start <= 0:
        raise ServesimError(f"--start = {start}: the first rate must be above 0")
    if not 0 < rel_tol < 1:
        raise ServesimError(f"--tolerance = {rel_tol}: allowed values are in (0, 1)")
    if seeds < 1:
        raise ServesimError(f"--seeds = {seeds}: allowed values are 1 or more")
    if base.slo.ttft_s is None and base.slo.tpot_s is None:
        raise ServesimError("slo: give slo.ttft_s and/or slo.tpot_s (or --ttft / --tpot) to search for goodput")
    cands = candidates(base, gpus, tps, colocated, link, transfer)
    work = [(c, attainment, start, rel_tol, horizon, seeds) for c in cands]
    workers = workers or os.cpu_count() or 1
    bar = SearchProgress("disagg-search", len(work), progress)
    rows, best = [], ""
    with contextlib.ExitStack() as stack:
        results = (stack.enter_context(ProcessPoolExecutor(max_workers=workers)).map(_size, work) if workers > 1
                   else map(_size, work))
        for row in results:
            rows.append(row)
            if not best or row["goodput_per_gpu"] > best[1]:
                best = (f"{row['placement']} {row['goodput_per_gpu']:.2f} req/s per GPU", row["goodput_per_gpu"])
            bar.update(best[0])
    table = pd.DataFrame(rows).sort_values(["goodput_per_gpu", "gpus", "placement"], ascending=[False, True, True])
    return table.reset_index(drop=True)


def best_ratio(table: pd.DataFrame) -> float | None:
    """Best disaggregated goodput per GPU over the best colocated one (None when either is missing or 0)."""
    best = table.groupby("kind")["goodput_per_gpu"].max()
    if "disaggregated" not in best or "colocated" not in best or not best["colocated"]:
        return None
    return float(best["disaggregated"] / best["colocated"])
