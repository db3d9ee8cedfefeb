"""Steady state of a run: warm-up truncation, the measurement window and a stability verdict.

The rule (README, "Steady state"):
- warm-up: requests in arrival order; MSER-5 (White, Cobb & Spratt, 2000) on the finished ones' end-to-end
  latencies picks how many to drop (batch means of 5, the cut minimising the remaining batches' variance over
  their count squared, searched over the first half); the warm-up ends at that request's arrival, and no
  earlier than one p90 end-to-end latency after the first arrival (the time the system takes to fill, by
  Little's law), capped at half the span of the arrivals.
- window: from the end of the warm-up to the last arrival, while arrivals still come (the drain after it is
  left out). Steady-state latencies, SLO attainment and goodput count the requests arriving in it.
- offered rate = arrivals in the window over its length; sustained throughput = requests (and output tokens)
  completed in it over its length (a fan-out sample cancelled by its group counts as completed).
- backlog growth: the least-squares slope of the requests in the system (arrived, not finished) over the
  window, sampled at 256 instants, with its standard error (the residuals' lag-1 autocorrelation shrinking
  the sample count); queue growth: the same for the waiting ones (arrived, not yet scheduled).
- verdict: 'too_short' when the window holds fewer than 200 requests or lasts less than 3 times the p90
  service time (first scheduled to finish) of its requests (the reason says when its backlog grows too);
  else 'overloaded' when the backlog grows faster than 2% of the offered rate and by more than 3 standard
  errors; 'too_short' too when it grows that fast within 3 standard errors (noise cannot be ruled out);
  else 'stable'.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.state import Requests, Status

GROWTH_SHARE = 0.02  # backlog growth, as a share of the offered rate, beyond which a run is overloaded
GROWTH_ERRORS = 3.0  # ... and beyond this many standard errors of the growth (noise of a stable queue)
MIN_WINDOW_REQUESTS = 200
SERVICE_TIMES = 3.0  # the window must last this many p90 service times
SAMPLES = 256
VERDICTS = ("stable", "overloaded", "too_short")


def mser5(values: np.ndarray) -> int:
    """Observations to drop from the start of `values` (a multiple of 5) by MSER-5: batch means of 5, then
    the cut d (over the first half of the batches) minimising the sum of squared deviations of the batches
    after it over their count squared."""
    m = values.size // 5
    if m < 4:
        return 0
    batches = values[:m * 5].reshape(m, 5).mean(axis=1)
    tail = batches[::-1]
    k = np.arange(1, m + 1)
    total, squares = np.cumsum(tail), np.cumsum(tail ** 2)
    stat = (squares - total ** 2 / k) / k ** 2  # stat[k - 1]: the last k batches
    kept = np.arange(m, m - m // 2 - 1, -1)  # cuts d = 0 .. m // 2 keep m - d batches
    return 5 * int(np.argmin(stat[kept - 1]))


def _slope(times: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of `counts` over `times` and its standard error. Counts sampled on a fine grid are
    strongly autocorrelated, so the error counts n (1 - r) / (1 + r) independent samples, r the residuals'
    lag-1 autocorrelation (the AR(1) effective sample size)."""
    if times.size < 4 or np.ptp(times) <= 0:
        return 0.0, float("inf")
    slope, icpt = np.polyfit(times, counts, 1)
    resid = counts - (slope * times + icpt)
    spread = float(np.sum((times - times.mean()) ** 2))
    if not resid.any():
        return float(slope), 0.0
    r = float(np.clip(np.corrcoef(resid[:-1], resid[1:])[0, 1], 0.0, 0.99)) if np.ptp(resid) > 0 else 0.0
    n_eff = max(3.0, times.size * (1 - r) / (1 + r))
    variance = float(np.sum(resid ** 2)) / (times.size - 2)
    return float(slope), float(np.sqrt(variance / spread * times.size / n_eff))


def _count_at(events: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """How many of the (sorted) event times are at or before each instant of `grid`."""
    return np.searchsorted(events, grid, side="right")


def steady_state(r: Requests, finished: np.ndarray, meets: np.ndarray, ttft: np.ndarray, tpot: np.ndarray,
                 e2e: np.ndarray) -> dict[str, Any]:
    """The `steady_*` summary entries and the `stability` verdict with its reason (rule: module docstring)."""
    out: dict[str, Any] = {}
    if r.n == 0:
        return {"stability": "too_short", "stability_reason": "no requests"}
    order = np.argsort(r.arrival, kind="stable")
    arrivals = r.arrival[order]
    done = order[finished[order]]
    first, last = float(arrivals[0]), float(arrivals[-1])
    cut = mser5(e2e[done]) if done.size else 0
    start = float(r.arrival[done[cut]]) if done.size > cut else last
    if done.size:  # the time to fill, capped (as MSER's cut) at half the arrivals' span
        start = max(start, first + min(float(np.percentile(e2e[done], 90)), (last - first) / 2))
    start = min(start, last)
    length = last - start
    inside = (r.arrival >= start) & (r.arrival <= last)
    n = int(inside.sum())
    out["steady_warmup_s"] = start - first
    out["steady_window_s"] = length
    out["steady_window_requests"] = n
    per_s = (lambda x: x / length) if length > 0 else (lambda x: None)
    served = finished | (r.status == Status.CANCELLED)  # a cancelled fan-out sample leaves served too
    completed = served & (r.finish >= start) & (r.finish <= last)
    out["steady_offered_req_s"] = per_s(float(n))
    out["steady_throughput_req_s"] = per_s(float(completed.sum()))
    produced = sum(int(np.count_nonzero((c >= start) & (c <= last)))  # chunked: no copy of every token's time
                   for c in np.array_split(r.token_time, max(1, r.token_time.size >> 22)))
    out["steady_throughput_output_tok_s"] = per_s(float(produced))
    # requests in the system and waiting, over the window (rejected ones leave when they arrive)
    leave = np.sort(np.where(finished, r.finish, np.where(np.isnan(r.finish), r.arrival, r.finish)))
    scheduled = np.sort(np.where(np.isnan(r.first_scheduled), r.arrival, r.first_scheduled))
    grid = np.linspace(start, last, SAMPLES)
    arrived = _count_at(arrivals, grid)
    growth, error = _slope(grid, arrived - _count_at(leave, grid))
    out["steady_backlog_growth_req_s"], out["steady_backlog_growth_se_req_s"] = growth, error
    out["steady_queue_growth_req_s"] = _slope(grid, arrived - _count_at(scheduled, grid))[0]
    ok = inside & finished
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        v = values[ok]
        v = v[~np.isnan(v)]
        for p in (50, 90, 99):
            out[f"steady_{name}_p{p}_s"] = float(np.percentile(v, p)) if v.size else None
    counted = inside & (r.status != Status.CANCELLED)  # a cancelled fan-out sample is neither a hit nor a miss
    out["steady_slo_attainment"] = float(meets[counted].mean()) if counted.any() else None
    out["steady_goodput_req_s"] = per_s(float(meets[inside].sum()))
    service = (r.finish - r.first_scheduled)[ok]
    typical = float(np.percentile(service, 90)) if service.size else 0.0
    offered = out["steady_offered_req_s"] or 0.0
    fast = bool(offered) and growth > GROWTH_SHARE * offered
    growing = fast and growth > GROWTH_ERRORS * error and n >= MIN_WINDOW_REQUESTS  # (else: maybe noise)
    grows = (f"the backlog grows {growth:.3g} ± {error:.2g} req/s ({growth / offered:.0%} of the {offered:.3g} "
             f"req/s offered; sustained {out['steady_throughput_req_s']:.3g} req/s)") if fast else ""
    if n < MIN_WINDOW_REQUESTS or length <= 0 or not ok.any() or length < SERVICE_TIMES * typical:
        verdict = "too_short"
        reason = (f"the steady window holds {n} requests over {length:.3g} s (needs {MIN_WINDOW_REQUESTS} requests "
                  f"and {SERVICE_TIMES:g}x the p90 service time, {typical:.3g} s): run longer"
                  + (f"; {grows}: likely overloaded" if growing else ""))
    elif growing:
        verdict = "overloaded"
        reason = f"{grows}: latencies grow with the run"
    elif fast:
        verdict = "too_short"
        reason = (f"{grows}, within {GROWTH_ERRORS:g} standard errors of no growth: run longer to tell stable "
                  "from overloaded")
    else:
        verdict = "stable"
        reason = (f"backlog growth {growth:.3g} ± {error:.2g} req/s, within {GROWTH_SHARE:.0%} of the {offered:.3g} "
                  f"req/s offered, over {n} requests and {length:.3g} s")
    out["stability"], out["stability_reason"], out["steady_backlog_growing"] = verdict, reason, growing
    return out
