"""Serving capacity: the highest Poisson arrival rate at which a configuration still meets its SLOs.

The rate is found by doubling then bisection on `workloads[i].arrival.rate`, every probe a full simulation
with the same seed (so the search is deterministic). A probe "meets" when its run is stable in steady state
(`sim.steady`: not overloaded, long enough to tell) and the given predicate on its summary holds;
`slo_predicate` builds the usual one from percentile targets over the steady-state window.

Run length (`Horizon`): a probe at rate R simulates max(min_requests, R x duration) requests, duration at
least `min_duration_s` and, where a probe's steady window lasted less than 3 times its p90 service time
while its backlog did not grow, doubled until it does (later probes keep the longer duration), so that
queues have time to build at rates above capacity. With `seeds` > 1 the search is repeated near the boundary
under other seeds (bracketing the first seed's capacity, widened until it holds) and the capacity is the
lowest of them; the range is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hardware.errors import ServesimError
from sim.config import SimConfig
from sim.engine import simulate
from sim.progress import bar as progress_bar
from sim.progress import watched
from traces.workload import RATED_KINDS

Summary = dict[str, Any]


@dataclass(frozen=True)
class Horizon:
    """How long each probe runs: at least `min_requests` requests and `min_duration_s` simulated seconds of
    arrivals, grown (up to `max_requests`) while the steady window is short of its service times."""

    min_duration_s: float = 60.0
    min_requests: int = 1000
    max_requests: int = 200_000

    def __post_init__(self) -> None:
        if not 0 < self.min_duration_s < math.inf:
            raise ServesimError(f"horizon = {self.min_duration_s}: simulated seconds must be finite and above 0")
        if self.min_requests < 1:
            raise ServesimError(f"min_requests = {self.min_requests}: allowed values are 1 or more")

    def requests(self, rate: float, duration_s: float) -> int:
        return int(min(self.max_requests, max(self.min_requests, math.ceil(rate * duration_s))))


@dataclass
class Capacity:
    """The capacity (the lowest over seeds) with its summary, every probe as (rate, met), each seed's
    capacity and the arrival duration the probes ended with."""

    rate: float
    summary: Summary | None
    probes: list[tuple[float, bool]] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def range(self) -> tuple[float, float, float]:
        """(min, median, max) of the capacity over seeds."""
        r = self.rates or [self.rate]
        return float(min(r)), float(np.median(r)), float(max(r))


def with_rate(config: SimConfig, rate: float, workload: int = 0) -> SimConfig:
    """The config with workload `workload`'s arrival rate set (it must be Poisson, gamma or constant)."""
    w = config.workloads[workload]
    if w.arrival.kind not in RATED_KINDS:
        raise ServesimError(f"workloads.{workload}.arrival.kind = {w.arrival.kind!r}: a capacity search needs a "
                            f"rate ({', '.join(RATED_KINDS)})")
    arrival = w.arrival.model_copy(update={"rate": rate})
    workloads = list(config.workloads)
    workloads[workload] = w.model_copy(update={"arrival": arrival})
    return config.model_copy(update={"workloads": workloads})


def with_duration(config: SimConfig, duration_s: float, horizon: Horizon = Horizon(), workload: int = 0
                  ) -> SimConfig:
    """The config with every rate-driven workload's request count set to `duration_s` of its arrivals (the
    searched workload at least `horizon.min_requests`)."""
    workloads = list(config.workloads)
    for i, w in enumerate(workloads):
        if w.arrival.kind not in RATED_KINDS:
            continue
        rate = w.arrival.rate  # type: ignore[union-attr]
        n = horizon.requests(rate, duration_s) if i == workload else max(1, math.ceil(rate * duration_s))
        workloads[i] = w.model_copy(update={"num_requests": n})
    return config.model_copy(update={"workloads": workloads})


def summary_of(config: SimConfig) -> Summary:
    """A run's summary: the probes' default `run`."""
    return simulate(config).summary


def run_sized(config: SimConfig, duration_s: float, horizon: Horizon = Horizon(),
              run: Callable[[SimConfig], Summary] | None = None, workload: int = 0) -> tuple[Summary, float]:
    """The summary of `config` run for `duration_s` of arrivals (`with_duration`), the duration doubled (three
    times at most, within `horizon.max_requests`) while its steady window is too short to tell and its backlog
    does not grow (a short window whose backlog grows fails anyway); and the duration it ran."""
    run = run or summary_of
    rate = config.workloads[workload].arrival.rate
    for attempt in range(4):
        summary = run(with_duration(config, duration_s, horizon, workload))
        if attempt == 3 or summary.get("stability") != "too_short" or summary.get("steady_backlog_growing") or \
                horizon.requests(rate, 2 * duration_s) >= horizon.max_requests:
            break
        duration_s *= 2
    return summary, duration_s


def stable(summary: Summary) -> bool:
    """Whether a run's steady state can be trusted (`sim.steady`; summaries without a verdict pass)."""
    return summary.get("stability", "stable") == "stable"


def slo_predicate(ttft_p99_s: float | None = None, itl_p99_s: float | None = None,
                  tpot_p99_s: float | None = None, min_finished: float = 1.0) -> Callable[[Summary], bool]:
    """True when every given p99 target holds over the steady-state window (the whole run's ITL) and at
    least `min_finished` of the requests finished."""
    targets = {"steady_ttft_p99_s": ttft_p99_s, "itl_p99_s": itl_p99_s, "steady_tpot_p99_s": tpot_p99_s}

    def meets(s: Summary) -> bool:
        served = s["requests_finished"] + s.get("requests_cancelled", 0)  # (a cancelled fan-out sample was served)
        if served < min_finished * s["requests_total"]:
            return False
        return all(t is None or (s.get(k) is not None and s[k] <= t) for k, t in targets.items())

    return meets


def attainment_predicate(attainment: float) -> Callable[[Summary], bool]:
    """True when at least `attainment` of the steady-state window's requests meet every SLO."""
    return lambda s: (s.get("steady_slo_attainment", s.get("slo_attainment")) or 0.0) >= attainment


def find_capacity(config: SimConfig, meets: Callable[[Summary], bool], start: float = 1.0,
                  rel_tol: float = 0.03, max_probes: int = 24, workload: int = 0,
                  run: Callable[[SimConfig], Summary] | None = None, horizon: Horizon | None = Horizon(),
                  seeds: int = 1) -> Capacity:
    """Highest rate (requests/s) whose run is stable and meets `meets`, to within `rel_tol`; 0 when `start`
    and its halvings down to `start`/1000 all fail. `run` gives a config's summary (default: `simulate`);
    `horizon` sizes each probe (None: the config's own request counts); `seeds` > 1 repeats the search near
    the boundary under seeds config.seed + 1, ... and reports the lowest (module docstring)."""
    result = Capacity(rate=0.0, summary=None)
    run = run or summary_of
    duration = horizon.min_duration_s if horizon is not None else 0.0

    def prober(cfg: SimConfig, best: dict[str, Any]) -> Callable[[float], bool]:
        def probe(rate: float) -> bool:
            nonlocal duration
            c = with_rate(cfg, rate, workload)
            if horizon is None:
                summary = run(c)
            else:
                summary, duration = run_sized(c, duration, horizon, run, workload)
            ok = bool(stable(summary) and meets(summary))
            result.probes.append((rate, ok))
            if ok and rate > best["rate"]:
                best.update(rate=rate, summary=summary)
            return ok
        return probe

    first: dict[str, Any] = {"rate": 0.0, "summary": None}
    _search(prober(config, first), start, rel_tol, max_probes)
    result.rate, result.summary, result.rates = first["rate"], first["summary"], [first["rate"]]
    for k in range(1, seeds if first["rate"] > 0 else 1):
        best: dict[str, Any] = {"rate": 0.0, "summary": None}
        _bracket(prober(config.model_copy(update={"seed": config.seed + k}), best), first["rate"], rel_tol,
                 max_probes)
        result.rates.append(best["rate"])
        if best["rate"] < result.rate:
            result.rate, result.summary = best["rate"], best["summary"]
    result.duration_s = duration
    return result


def _counted(probe: Callable[[float], bool]) -> tuple[Callable[[float], bool], Callable[[], int]]:
    calls = 0

    def counted(rate: float) -> bool:
        nonlocal calls
        calls += 1
        return probe(rate)
    return counted, lambda: calls


def _search(probe: Callable[[float], bool], start: float, rel_tol: float, max_probes: int) -> None:
    """Doubling from `start` until a rate fails (halving when `start` fails), then bisection."""
    probe, used = _counted(probe)
    lo, hi = 0.0, start
    while used() < max_probes and probe(hi):  # grow until a rate fails
        lo, hi = hi, hi * 2
    if lo == 0.0:  # even the start failed: shrink instead
        hi_fail, rate = hi, start / 2
        while used() < max_probes and rate >= start / 1000 and not probe(rate):
            hi_fail, rate = rate, rate / 2
        if rate < start / 1000 or used() >= max_probes:
            return
        lo, hi = rate, hi_fail
    _bisect(probe, used, lo, hi, rel_tol, max_probes)


def _bracket(probe: Callable[[float], bool], near: float, rel_tol: float, max_probes: int) -> None:
    """Bisection between a rate that meets and one that fails, found around `near` (widened by 1.5x steps)."""
    probe, used = _counted(probe)
    lo, hi = near / (1 + 2 * rel_tol), near * (1 + 2 * rel_tol)
    failed_hi = False  # whether `hi` is a rate already seen to fail
    while not probe(lo):
        if used() >= max_probes or lo < near / 1000:
            return
        hi, lo, failed_hi = lo, lo / 1.5, True
    while not failed_hi and used() < max_probes and probe(hi):
        lo, hi = hi, hi * 1.5
    _bisect(probe, used, lo, hi, rel_tol, max_probes)


def _bisect(probe: Callable[[float], bool], used: Callable[[], int], lo: float, hi: float, rel_tol: float,
            max_probes: int) -> None:
    while used() < max_probes and (hi - lo) > rel_tol * hi:
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid


class SearchProgress:
    """Configurations done, the best so far and an ETA (`sim.progress`: a terminal or a notebook only)."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        self.bar = progress_bar(total, name, "config", enabled and watched())

    def update(self, best: str) -> None:
        self.bar.set_postfix_str(f"best so far: {best[:60]}", refresh=False)
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.bar.close()
