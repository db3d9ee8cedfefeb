"""A rate sweep as GuideLLM's `sweep` profile runs one: synchronous, throughput, then rates between.

- synchronous: one client, one request at a time (a closed loop of concurrency 1): the latency floor and
  the rate a single user sees;
- throughput: every request at once (`rate: inf`): the most the deployment completes per second;
- then `rates` Poisson rates evenly spaced strictly between those two throughputs.

The swept workload is the config's first; the others keep their settings. Each rated probe runs at least
`Horizon` (60 s of arrivals and 1,000 requests by default, grown while its steady window is too short:
`servesim.capacity.run_sized`), and reports its steady-state metrics (`sim.steady`) with its verdict; the two
end points report their whole run (a closed loop and a burst have no offered rate to hold).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hardware.errors import ServesimError
from servesim.capacity import Horizon, run_sized, with_duration, with_rate
from sim.config import SimConfig
from sim.engine import simulate
from sim.progress import bar as progress_bar
from sim.progress import watched
from traces.workload import RATED_KINDS

METRICS = ("ttft", "tpot", "itl", "e2e")
SYNCHRONOUS_REQUESTS = 200  # the one-client probe: requests one after another
COLUMNS = ["profile", "rate_req_s", "throughput_req_s", "output_tok_s",
           *(f"{m}_p{p}_s" for m in METRICS for p in (50, 90, 99)), "slo_attainment", "stability", "window"]


def _with_arrival(config: SimConfig, arrival: dict[str, Any], n: int) -> SimConfig:
    workloads = list(config.workloads)
    w = workloads[0]
    workloads[0] = type(w).model_validate({**w.model_dump(), "arrival": arrival, "num_requests": n,
                                           "duration_s": None})
    return config.model_copy(update={"workloads": workloads})


def _row(profile: str, s: dict[str, Any], steady: bool) -> dict[str, Any]:
    """One table row from a run's summary: its steady-state window's figures where it has them."""
    use = steady and s.get("steady_window_requests")
    pick = (lambda k: s.get(f"steady_{k}") if s.get(f"steady_{k}") is not None else s.get(k)) if use else s.get
    row: dict[str, Any] = {
        "profile": profile,
        "rate_req_s": s.get("steady_offered_req_s") if use else s["throughput_req_s"],
        "throughput_req_s": pick("throughput_req_s"),
        "output_tok_s": pick("throughput_output_tok_s"),
        "slo_attainment": pick("slo_attainment"),
        "stability": s.get("stability") if steady else "-",
        "window": "steady" if use else "whole",
    }
    for m in METRICS:
        for p in (50, 90, 99):
            row[f"{m}_p{p}_s"] = pick(f"{m}_p{p}_s")
    return row


def _probe(job: tuple[str, SimConfig, float | None, Horizon]) -> dict[str, Any]:
    profile, config, duration, horizon = job
    if duration is None:
        return _row(profile, simulate(config).summary, steady=False)
    summary, _ = run_sized(config, duration, horizon)
    return _row(profile, summary, steady=True)


def sweep(config: SimConfig, rates: int = 8, horizon: Horizon = Horizon(), workers: int | None = None,
          progress: bool = False) -> pd.DataFrame:
    """The sweep's table (`COLUMNS`), one row per probe in rate order; a progress bar when `progress` and
    someone watches."""
    if config.workloads[0].sessions is not None:
        raise ServesimError("sweep: workloads.0.sessions is set; a sweep sends single requests (remove sessions)")
    bar = progress_bar(rates + 2, "servesim sweep", "probe", progress and watched())
    n = horizon.min_requests
    ends = [("synchronous", _with_arrival(config, {"kind": "closed_loop", "concurrency": 1}, SYNCHRONOUS_REQUESTS),
             None, horizon),
            ("throughput", _with_arrival(config, {"kind": "burst"}, n), None, horizon)]
    workers = workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        pool_map = stack.enter_context(ProcessPoolExecutor(max_workers=workers)).map if workers > 1 else map
        low, high = pool_map(_probe, ends)
        bar.update(2)
        between = np.linspace(low["throughput_req_s"], high["throughput_req_s"], rates + 2)[1:-1] if rates else []
        base = config if config.workloads[0].arrival.kind in RATED_KINDS else _with_arrival(
            config, {"kind": "poisson", "rate": 1.0}, n)
        jobs = [(f"rate {r:.3g}", with_duration(with_rate(base, float(r)), horizon.min_duration_s, horizon),
                 horizon.min_duration_s, horizon) for r in between]
        middle = []
        for row in pool_map(_probe, jobs):
            middle.append(row)
            bar.update(1)
    bar.close()
    return pd.DataFrame([low, *middle, high], columns=COLUMNS)


def plot(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Throughput against the offered rate, and latency percentiles against it (log axis), as GuideLLM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = table["rate_req_s"]
    ax1.plot(x, table["throughput_req_s"], "o-", label="completed")
    ax1.plot(x, x, ":", color="grey", label="offered")
    for i, row in table.iterrows():
        if row["stability"] == "overloaded":
            ax1.annotate("overloaded", (row["rate_req_s"], row["throughput_req_s"]), fontsize=7, rotation=30)
    ax1.set(xlabel="offered rate (req/s)", ylabel="throughput (req/s)", title="throughput")
    ax1.legend()
    for metric, style in (("ttft", "o-"), ("tpot", "s-"), ("e2e", "^-")):
        for p, alpha in ((50, 1.0), (99, 0.5)):
            ax2.plot(x, table[f"{metric}_p{p}_s"] * 1e3, style, alpha=alpha, label=f"{metric.upper()} p{p}")
    ax2.set_yscale("log")
    ax2.set(xlabel="offered rate (req/s)", ylabel="ms", title="latency")
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
