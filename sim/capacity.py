"""Serving capacity: the highest Poisson arrival rate at which a configuration still meets its SLOs.

The rate is found by doubling then bisection on `workloads[i].arrival.rate`, every probe a full simulation
with the same seed (so the search is deterministic). A probe "meets" when the given predicate on its
summary holds; `slo_predicate` builds the usual one from percentile targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hardware.errors import ServesimError
from sim.config import SimConfig
from sim.engine import simulate

Summary = dict[str, Any]


@dataclass
class Capacity:
    """The highest rate found to meet (with its summary), and every probe as (rate, met)."""

    rate: float
    summary: Summary | None
    probes: list[tuple[float, bool]] = field(default_factory=list)


def with_rate(config: SimConfig, rate: float, workload: int = 0) -> SimConfig:
    """The config with workload `workload`'s arrival rate set (it must be Poisson, gamma or constant)."""
    w = config.workloads[workload]
    if w.arrival.kind == "trace":
        raise ServesimError(f"workloads.{workload}.arrival.kind = 'trace': a capacity search needs a rate")
    arrival = w.arrival.model_copy(update={"rate": rate})
    workloads = list(config.workloads)
    workloads[workload] = w.model_copy(update={"arrival": arrival})
    return config.model_copy(update={"workloads": workloads})


def slo_predicate(ttft_p99_s: float | None = None, itl_p99_s: float | None = None,
                  tpot_p99_s: float | None = None, min_finished: float = 1.0) -> Callable[[Summary], bool]:
    """True when every given p99 target holds and at least `min_finished` of the requests finished."""
    targets = {"ttft_p99_s": ttft_p99_s, "itl_p99_s": itl_p99_s, "tpot_p99_s": tpot_p99_s}

    def meets(s: Summary) -> bool:
        if s["requests_finished"] < min_finished * s["requests_total"]:
            return False
        return all(t is None or (s[k] is not None and s[k] <= t) for k, t in targets.items())

    return meets


def find_capacity(config: SimConfig, meets: Callable[[Summary], bool], start: float = 1.0,
                  rel_tol: float = 0.03, max_probes: int = 24, workload: int = 0,
                  run: Callable[[SimConfig], Summary] | None = None) -> Capacity:
    """Highest rate (requests/s) meeting `meets`, to within `rel_tol`; 0 when `start` and its halvings down
    to `start`/1000 all fail. `run` gives a config's summary (default: `simulate`)."""
    result = Capacity(rate=0.0, summary=None)
    run = run or (lambda c: simulate(c).summary)

    def probe(rate: float) -> bool:
        summary = run(with_rate(config, rate, workload))
        ok = bool(meets(summary))
        result.probes.append((rate, ok))
        if ok and rate > result.rate:
            result.rate, result.summary = rate, summary
        return ok

    lo, hi = 0.0, start
    while len(result.probes) < max_probes and probe(hi):  # grow until a rate fails
        lo, hi = hi, hi * 2
    if lo == 0.0:  # even the start failed: shrink instead
        hi_fail = hi
        rate = start / 2
        while len(result.probes) < max_probes and rate >= start / 1000 and not probe(rate):
            hi_fail, rate = rate, rate / 2
        if result.rate == 0.0:
            return result
        lo, hi = result.rate, hi_fail
    while len(result.probes) < max_probes and (hi - lo) > rel_tol * hi:
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return result
