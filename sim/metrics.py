"""Per-request and per-step results and the run summary, with vLLM's serving-benchmark definitions.

Clocks (all in simulated seconds from the start of the run):
- `arrival_s`: the request reaches the router; `first_scheduled_s`: start of the first step it runs in.
- a token's time is the end of the step that sampled it; `first_token_s` is the first one's.
- TTFT = first_token - arrival; E2E = last token - arrival; TPOT = (E2E - TTFT) / (output tokens - 1)
  (requests with one output token have no TPOT); ITL = each gap between consecutive tokens of a request.
- duration = last finish - first arrival; throughputs count finished requests over it.
- steady state (`sim.steady`): the same latencies, attainment and throughput over the window between the
  warm-up and the last arrival (`steady_*`), and a verdict (`stability`: stable, overloaded or too_short).
- energy: every GPU of a replica draws its TDP while the replica runs a step and `IDLE_POWER_FRACTION` of
  it otherwise (a planning assumption, not a measurement); tokens per joule = output tokens / energy.
- pool utilisation = the share of the duration its replicas spent running steps (mean over replicas);
  queue = time-weighted mean of waiting requests per replica, sampled at each step.
- a request meets the SLOs when it finished and its TTFT, TPOT and E2E are within every target given;
  goodput = such requests per second of duration; attainment = their share of all requests (rejected
  ones count as misses).
- fan-out (`workloads[].fan_out`): each sample is a request row (its arrival and TTFT are its prompt's; the
  offered and request rates count samples, the input-token rate each prompt once); a sample cancelled by its
  prompt's `finish_after` has status `cancelled`, its `finish_s` the cancellation, no E2E or TPOT, and counts
  in no latency, request throughput or attainment (the steady state's sustained rate counts it as served: it
  left the system); `fanout_e2e_*` is each prompt's time to its last needed sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hardware.deployment import Deployment
from policies.state import Requests, Status
from sim.config import SimConfig
from sim.steady import steady_state

PERCENTILES = (50, 90, 99)  # the default; `metrics.percentiles` adds others
IDLE_POWER_FRACTION = 0.2  # an idle H100/H200 draws roughly 70-140 W of its 700 W TDP


def pct_key(prefix: str, p: float) -> str:
    """The summary key of percentile `p` of a metric: ttft_p99_s, itl_p99.9_s."""
    return f"{prefix}_p{p:g}_s"


@dataclass
class PoolInfo:
    """A pool of identical replicas: what the summary needs to count its GPUs, cost, energy and KV."""

    name: str
    instances: int
    deployment: Deployment
    num_blocks: int


@dataclass
class Results:
    """A run's outcome: `requests` and `steps` DataFrames, the flat `summary`, every token's time."""

    config: SimConfig
    requests: pd.DataFrame
    steps: pd.DataFrame
    summary: dict[str, Any]
    token_times: np.ndarray
    wall_seconds: float
    free_blocks_at_end: list[int] = field(default_factory=list)  # per replica, blocks no request holds (all)
    links: pd.DataFrame | None = None  # disaggregation: the KV links' rate over time

    def itls(self, request_id: int) -> np.ndarray:
        """Inter-token latencies of one request, in seconds: one per emission after the first, as vLLM's
        benchmark counts a streamed chunk (tokens of one step, such as accepted drafts, share one gap)."""
        row = self.requests.loc[request_id]
        start = int(row["token_offset"])
        gaps = np.diff(self.token_times[start:start + int(row["output_tokens"])])
        return gaps[gaps > 0]


def _stats(prefix: str, values: np.ndarray, out: dict[str, Any], percentiles: Sequence[float] = PERCENTILES) -> None:
    """Mean and percentiles of the finite `values`."""
    values = values[~np.isnan(values)]
    out[f"{prefix}_mean_s"] = float(values.mean(dtype=np.float64)) if values.size else None
    pcts = np.percentile(values, percentiles) if values.size else [None] * len(percentiles)
    for p, v in zip(percentiles, pcts):
        out[pct_key(prefix, p)] = None if v is None else float(v)


ITL_CHUNK = 1 << 20  # tokens differenced per pass
ITL_BINS = np.concatenate([[0.0], np.geomspace(1e-9, 1e9, 1 << 16)])  # gap histogram edges (relative 6e-4)


def _gap_blocks(r: Requests, finished: np.ndarray, itl_max: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The inter-token gaps of finished requests (float64), one per emission (tokens of one step share one),
    block by block of about `ITL_CHUNK` tokens, with no copy of the token times; fills `itl_max` (each
    request's largest gap) when given."""
    times, out, off = r.token_time, r.output, r.token_offset
    i = 0
    while i < r.n:
        j = max(i + 1, int(np.searchsorted(off, off[i] + ITL_CHUNK, side="left")))
        a, b = int(off[i]), int(off[j - 1] + out[j - 1])
        g = np.diff(times[a:b])
        g[off[i + 1:j] - a - 1] = np.nan  # from one request's last token to the next one's first
        for k in np.flatnonzero(~finished[i:j] & (out[i:j] > 1)) + i:  # unfinished requests (rejected: few)
            g[off[k] - a:off[k] - a + out[k] - 1] = np.nan
        multi = np.flatnonzero(out[i:j] > 1) + i
        if itl_max is not None and multi.size:
            itl_max[multi] = np.fmax.reduceat(g, off[multi] - a)
        yield g[g > 0]  # NaN left out; zero: tokens emitted together (accepted drafts) arrive as one chunk
        i = j


def _itls(r: Requests, finished: np.ndarray, out: dict[str, Any], percentiles: Sequence[float] = PERCENTILES
          ) -> np.ndarray:
    """ITL mean and percentiles into `out` (as `_stats` names them) and each request's largest gap (NaN when
    none), exact and in bounded memory: a first pass over the gaps (`_gap_blocks`) counts them into a fine
    histogram, a second keeps only the gaps in the bins that hold the order statistics the percentiles need
    (numpy's linear interpolation between the two around each rank)."""
    itl_max = np.full(r.n, np.nan)
    counts = np.zeros(ITL_BINS.size, dtype=np.int64)
    for g in _gap_blocks(r, finished, itl_max):
        counts += np.bincount(np.searchsorted(ITL_BINS, g, side="right") - 1, minlength=ITL_BINS.size)
    n = int(counts.sum())
    spans = finished & (r.output > 1)  # the gaps of a request add up to its last token's time minus its first's
    first = r.token_offset[spans]
    total = float(np.sum(r.token_time[first + r.output[spans] - 1] - r.token_time[first]))
    out["itl_mean_s"] = total / n if n else None
    if not n:
        out.update({pct_key("itl", p): None for p in percentiles})
        return itl_max
    positions = [(n - 1) * p / 100 for p in percentiles]
    ranks = sorted({int(np.floor(h)) for h in positions} | {int(np.ceil(h)) for h in positions})
    upto = np.cumsum(counts)  # gaps in each bin and the bins before it
    bin_of = {k: int(np.searchsorted(upto, k, side="right")) for k in ranks}
    kept: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {b: [] for b in bin_of.values()}
    for g in _gap_blocks(r, finished):
        where = np.searchsorted(ITL_BINS, g, side="right") - 1
        for b in kept:  # distinct values with their counts: equal gaps (fixed step times) take no room
            kept[b].append(np.unique(g[where == b], return_counts=True))
    value = {}
    for k, b in bin_of.items():
        values, times = np.unique(np.concatenate([v for v, _ in kept[b]]), return_inverse=True)
        seen = np.cumsum(np.bincount(times, weights=np.concatenate([c for _, c in kept[b]])))
        value[k] = float(values[np.searchsorted(seen, k - (upto[b] - counts[b]), side="right")])
    for p, h in zip(percentiles, positions):
        lo, hi = value[int(np.floor(h))], value[int(np.ceil(h))]
        out[pct_key("itl", p)] = lo + (hi - lo) * (h - np.floor(h))
    return itl_max


def build_results(config: SimConfig, pools: list[PoolInfo], r: Requests, workload_names: list[str],
                  step_columns: dict[str, np.ndarray], skipped_rows: int, wall_seconds: float,
                  cache_stats: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> Results:
    """Per-request and per-step tables and the summary; `extra` (from a disaggregated cluster) adds request
    columns, summary entries and the link timeline. `step_columns` is emptied (the table takes its data)."""
    finished = r.status == Status.FINISHED
    ttft = r.first_token - r.arrival
    e2e = np.where(r.status == Status.CANCELLED, np.nan, r.finish - r.arrival)  # (a cancelled sample never ended)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(r.output > 1, (e2e - ttft) / (r.output - 1), np.nan)
    itl: dict[str, Any] = {}
    itl_max = _itls(r, finished, itl, config.metrics.reported())
    meets = finished.copy()
    slos = [w.slo or config.slo for w in config.workloads]  # each request is held to its workload's targets
    for target, values in (("ttft_s", ttft), ("tpot_s", tpot), ("e2e_s", e2e)):
        targets = np.array([np.inf if getattr(s, target) is None else getattr(s, target) for s in slos])[r.workload]
        meets &= np.nan_to_num(values, nan=0.0) <= targets
    requests = pd.DataFrame({
        "request_id": np.arange(r.n),
        "workload": np.asarray(workload_names, dtype=object)[r.workload] if r.n else [],
        "replica": r.replica,
        "status": np.select([finished, r.status == Status.CANCELLED], ["finished", "cancelled"], "rejected"),
        "reject_code": [r.reject_code.get(i, "") for i in range(r.n)],
        "reject_reason": [r.reject_reason.get(i, "") for i in range(r.n)],
        "arrival_s": r.arrival,
        "first_scheduled_s": r.first_scheduled,
        "first_token_s": r.first_token,
        "finish_s": r.finish,
        "prompt_tokens": r.prompt,
        "output_tokens": r.output,
        "queue_s": r.first_scheduled - r.arrival,
        "ttft_s": ttft,
        "tpot_s": tpot,
        "e2e_s": e2e,
        "itl_max_s": itl_max,
        "preemptions": r.preemptions,
        "cached_tokens": r.cached_tokens,
        "meets_slo": meets,
        "token_offset": r.token_offset,
    })
    if (r.session >= 0).any():  # multi-turn sessions (ids: workload << 32 | session)
        requests["session"], requests["next_turn"] = r.session, r.next_turn
    fanned = bool((r.group >= 0).any())
    if fanned:  # fan-out: each sample's first sample, and the tokens it produced (fewer when cancelled)
        requests["group"], requests["generated_tokens"] = r.group, r.generated
    extra = extra or {}
    for name, values in extra.get("request_columns", {}).items():
        requests[name] = values
    steps = pd.DataFrame(step_columns, copy=False)  # the table takes the arrays as they are
    step_columns.clear()
    blocks = {p.name: p.num_blocks for p in pools}
    steps["kv_usage"] = steps["kv_blocks_used"] / steps["pool"].map(blocks).astype(float) if len(steps) else np.nan
    summary = _summary(config, pools, r, finished, meets, ttft, tpot, itl, e2e, steps, skipped_rows)
    summary.update(_class_summary(r, finished, meets, ttft, tpot, e2e, float(summary["duration_s"] or 0.0)))
    if fanned:
        summary.update(_fan_out_summary(r, finished, config.metrics.reported()))
    summary.update(extra.get("summary", {}))
    if config.kv_cache.prefix_caching and cache_stats is not None:
        c = cache_stats
        summary["prefix_cache_hit_rate"] = c["hit_tokens"] / c["lookup_tokens"] if c["lookup_tokens"] else 0.0
        summary["prefix_cache_block_hit_rate"] = c["hit_blocks"] / c["lookup_blocks"] if c["lookup_blocks"] else 0.0
        summary["prefill_tokens_saved"] = c["hit_tokens"]
        if config.kv_cache.host_cache_gb:  # the share of the block hits that came from the host tier
            summary["prefix_cache_host_hit_rate"] = c["host_hit_blocks"] / c["lookup_blocks"] if c["lookup_blocks"] \
                else 0.0
            summary["prefix_cache_gpu_hit_rate"] = summary["prefix_cache_block_hit_rate"] - \
                summary["prefix_cache_host_hit_rate"]
    return Results(config, requests, steps, summary, r.token_time, wall_seconds, links=extra.get("links"))


def _speculation_summary(steps: pd.DataFrame, busy: float, s: dict[str, Any]) -> None:
    """Acceptance, tokens per verification, how often speculation ran and the draft's share of the time."""
    drafts, accepted = int(steps["draft_tokens"].sum()), int(steps["accepted_tokens"].sum())
    verifies = int(steps["verify_requests"].sum())
    decodes = verifies + int(steps["decode_requests"].sum())
    spec_steps = steps["verify_requests"] > 0
    s["spec_draft_tokens"], s["spec_accepted_tokens"] = drafts, accepted
    s["spec_acceptance_rate"] = accepted / drafts if drafts else None
    s["spec_tokens_per_verify"] = (accepted + verifies) / verifies if verifies else None
    s["spec_share_of_decodes"] = verifies / decodes if decodes else None
    s["spec_steps_share"] = float(spec_steps.mean()) if len(steps) else None
    s["spec_draft_time_share"] = float(steps["draft_s"].sum()) / busy if busy else None
    s["spec_verify_time_share"] = (float((steps["duration_s"] - steps["draft_s"])[spec_steps].sum()) / busy
                                   if busy else None)


def _fan_out_summary(r: Requests, finished: np.ndarray, percentiles: Sequence[float]) -> dict[str, Any]:
    """Fan-out requests as their users see them: prompts, samples cancelled and the tokens that saved, and
    each prompt's latency to its last needed sample (its group's latest finish; `fanout_e2e_*`)."""
    fanned = r.group >= 0
    firsts = np.flatnonzero(fanned & (r.group == np.arange(r.n)))
    cancelled = r.status == Status.CANCELLED
    end = np.full(r.n, -np.inf)
    np.maximum.at(end, r.group[fanned & finished], r.finish[fanned & finished])
    out: dict[str, Any] = {"fanout_requests": int(firsts.size), "fanout_samples": int(fanned.sum()),
                           "requests_cancelled": int(cancelled.sum()),
                           "fanout_cancelled_tokens": int((r.output - r.generated)[cancelled].sum())}
    done = firsts[np.isfinite(end[firsts])]
    _stats("fanout_e2e", end[done] - r.arrival[done], out, percentiles)
    return out


def _class_summary(r: Requests, finished: np.ndarray, meets: np.ndarray, ttft: np.ndarray, tpot: np.ndarray,
                   e2e: np.ndarray, duration: float) -> dict[str, Any]:
    """Per request class (`priority_<p>_...`, only when the workloads have more than one): requests, SLO
    attainment, goodput and mean, p50 and p99 TTFT, TPOT and E2E of the finished ones."""
    out: dict[str, Any] = {}
    classes = np.unique(r.priority)
    if classes.size < 2:
        return out
    for p in classes.tolist():
        mine = r.priority == p
        done = mine & finished
        key = f"priority_{p}_"
        out[key + "requests"] = int(mine.sum())
        counted = mine & (r.status != Status.CANCELLED)
        out[key + "slo_attainment"] = float(meets[counted].mean()) if counted.any() else None
        out[key + "goodput_req_s"] = float(meets[mine].sum() / duration) if duration > 0 else None
        for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
            _stats(key + name, values[done], out, (50, 99))
    return out


def _summary(config: SimConfig, pools: list[PoolInfo], r: Requests, finished: np.ndarray,
             meets: np.ndarray, ttft: np.ndarray, tpot: np.ndarray, itl: dict[str, Any], e2e: np.ndarray,
             steps: pd.DataFrame, skipped_rows: int) -> dict[str, Any]:
    s: dict[str, Any] = {
        "requests_total": int(r.n),
        "requests_finished": int(finished.sum()),
        "requests_rejected": int((r.status == Status.REJECTED).sum()),
    }
    for code in sorted(set(r.reject_code.values())):
        s[f"rejected_{code}"] = sum(1 for c in r.reject_code.values() if c == code)
    s["trace_rows_skipped"] = skipped_rows
    end = float(np.nanmax(r.finish)) if finished.any() else float(r.arrival.max(initial=0.0))
    duration = end - float(r.arrival.min()) if r.n else 0.0
    s["duration_s"] = duration
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: float("nan"))
    s["throughput_req_s"] = per_s(float(finished.sum()))
    prompts = finished & (r.group < 0)
    prompts[r.group[finished & (r.group >= 0)]] = True  # a fan-out's prompt once, when any of its samples finished
    s["throughput_input_tok_s"] = per_s(float(r.prompt[prompts].sum()))
    s["throughput_output_tok_s"] = per_s(float(r.output[finished].sum()))
    for name, values in (("ttft", ttft[finished]), ("tpot", tpot[finished]), ("e2e", e2e[finished]),
                         ("queue", (r.first_scheduled - r.arrival)[finished])):
        _stats(name, values, s, config.metrics.reported())
    s.update(itl)
    s["slo_ttft_s"], s["slo_tpot_s"], s["slo_e2e_s"] = config.slo.ttft_s, config.slo.tpot_s, config.slo.e2e_s
    s["goodput_req_s"] = per_s(float(meets.sum()))
    counted = r.n - int(np.count_nonzero(r.status == Status.CANCELLED))  # a cancelled sample: neither hit nor miss
    s["slo_attainment"] = float(meets.sum() / counted) if counted else float("nan")
    s["steps"] = int(len(steps))
    busy = float(steps["duration_s"].sum()) if len(steps) else 0.0
    s["mean_batch_size"] = (float((steps["prefill_requests"] + steps["decode_requests"]
                                   + steps["verify_requests"]).mean()) if len(steps) else 0.0)
    s["mean_kv_usage"] = float((steps["kv_usage"] * steps["duration_s"]).sum() / busy) if busy else 0.0
    s["peak_kv_usage"] = float(steps["kv_usage"].max()) if len(steps) else 0.0
    s["preemptions"] = int(r.preemptions.sum())
    s["replicas"] = sum(p.instances for p in pools)
    s["gpus"] = sum(p.instances * p.deployment.num_gpus for p in pools)
    s["kv_blocks_per_replica"] = pools[0].num_blocks
    s["cost_per_hour"] = sum(p.instances * p.deployment.num_gpus * p.deployment.gpu.price_per_hour for p in pools)
    out_tokens = float(r.output[finished].sum())
    s["cost_per_million_output_tokens"] = (s["cost_per_hour"] * duration / 3600 / out_tokens * 1e6
                                           if out_tokens else None)
    energy = 0.0
    for p in pools:
        own = steps[steps["pool"] == p.name]
        gpus, tdp = p.deployment.num_gpus, p.deployment.gpu.tdp_watts
        pool_busy = float(own["duration_s"].sum())
        idle = max(p.instances * duration - pool_busy, 0.0)
        energy += gpus * tdp * (pool_busy + IDLE_POWER_FRACTION * idle)
        if len(pools) > 1 or p.name != "colocated":
            s[f"{p.name}_instances"] = p.instances
            s[f"{p.name}_gpus"] = p.instances * gpus
            s[f"{p.name}_kv_blocks_per_instance"] = p.num_blocks
        s[f"{p.name}_utilisation"] = pool_busy / (p.instances * duration) if duration > 0 else None
        s[f"{p.name}_queue_mean"] = (float((own["waiting"] * own["duration_s"]).sum() / (p.instances * duration))
                                     if duration > 0 else None)
    s["energy_j"] = energy
    s["output_tokens_per_joule"] = out_tokens / energy if energy else None
    if config.speculation is not None:
        _speculation_summary(steps, busy, s)
    s.update(steady_state(r, finished, meets, ttft, tpot, e2e))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()}
