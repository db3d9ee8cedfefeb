"""Capacity search: a known capacity (an M/D/1 queue, whose waiting-time distribution is Erlang's formula),
steady-state gating of probes, run lengths by simulated time, seeds, determinism and errors."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq

from hardware.errors import ServesimError
from servesim.capacity import Horizon, attainment_predicate, find_capacity, slo_predicate, with_duration, with_rate
from sim.config import SimConfig
from sim.engine import simulate
from sim.executor import FixedCostExecutor
from tests.test_engine import config

SERVICE_S = 0.1  # one step of this length serves a request: one replica serving one request at a time


def md1_wait_cdf(rate: float, t: float) -> float:
    """P(W <= t) for the waiting time of an M/D/1 queue with service time SERVICE_S (Erlang, 1909)."""
    total = 0.0
    for k in range(int(math.floor(t / SERVICE_S)) + 1):
        x = rate * (k * SERVICE_S - t)
        total += x ** k / math.factorial(k) * math.exp(-x)
    return (1 - rate * SERVICE_S) * total


def test_capacity_of_an_md1_queue_is_found_within_5_percent_and_never_above() -> None:
    """One replica running one request at a time (max_num_seqs 1), each a single step of fixed length (one
    output token): an M/D/1 queue. With a TTFT target of 0.3 s (a wait of at most 0.2 s) for 90% of the
    requests, the true capacity is where P(W <= 0.2) = 0.9."""
    ttft, attainment = 0.3, 0.9
    true = brentq(lambda lam: md1_wait_cdf(lam, ttft - SERVICE_S) - attainment, 0.01, 1 / SERVICE_S - 1e-6)
    cfg = SimConfig.model_validate({
        "model": "llama-3-8b", "slo": {"ttft_s": ttft}, "scheduler": {"name": "vllm", "max_num_seqs": 1},
        "workloads": [{"arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": 10,
                       "lengths": {"kind": "fixed", "prompt": 100, "output": 1}}]})
    run = lambda c: simulate(c, executor_factory=lambda dep: FixedCostExecutor(SERVICE_S)).summary  # noqa: E731
    cap = find_capacity(cfg, attainment_predicate(attainment), start=4.0, rel_tol=0.02, run=run,
                        horizon=Horizon(min_duration_s=2000.0), seeds=3)
    assert 0.95 * true <= cap.rate <= true, (cap.rate, true)
    low, median, high = cap.range
    assert len(cap.rates) == 3 and low == cap.rate <= median <= high
    assert cap.duration_s == 2000.0 and cap.summary["stability"] == "stable"
    assert cap.summary["requests_total"] >= 2000 * cap.rate  # probes sized by time, not the config's 10


def test_overloaded_probes_never_meet_even_when_their_slos_hold() -> None:
    """A short run can end before its queue builds: the SLOs hold while the backlog grows. The search
    counts such a probe as failing (a stable steady state is required)."""
    summary = {"requests_finished": 10, "requests_total": 10, "steady_ttft_p99_s": 0.1, "stability": "overloaded"}
    rates = []

    def run(c: SimConfig) -> dict:
        rates.append(c.workloads[0].arrival.rate)
        return {**summary, "stability": "stable" if c.workloads[0].arrival.rate <= 6.0 else "overloaded"}

    cap = find_capacity(config(), slo_predicate(ttft_p99_s=1.0), start=4.0, rel_tol=0.02, run=run, horizon=None)
    assert 5.88 <= cap.rate <= 6.0 and max(rates) >= 8.0


def test_capacity_search_brackets_the_saturation_rate() -> None:
    cfg = config(workloads=[{"arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": 400,
                             "lengths": {"kind": "fixed", "prompt": 1000, "output": 200}}])
    meets = slo_predicate(ttft_p99_s=2.0)
    horizon = Horizon(min_duration_s=30.0, min_requests=300)
    cap = find_capacity(cfg, meets, start=4.0, rel_tol=0.05, horizon=horizon)
    assert cap.rate > 0 and cap.summary is not None and meets(cap.summary)
    failed = [r for r, ok in cap.probes if not ok]
    assert failed and min(failed) > cap.rate and (min(failed) - cap.rate) <= 0.05 * min(failed) + 1e-9
    assert all(ok for r, ok in cap.probes if r <= cap.rate)  # monotone on this workload
    again = find_capacity(cfg, meets, start=4.0, rel_tol=0.05, horizon=horizon)
    assert again.rate == cap.rate and again.probes == cap.probes  # deterministic
    # the winning probe ran its arrivals for the horizon (and at least 300 requests), not the config's 400
    assert cap.summary["requests_total"] == max(300, math.ceil(cap.rate * cap.duration_s))


def test_with_duration_sizes_every_rate_driven_workload() -> None:
    lengths = {"kind": "fixed", "prompt": 100, "output": 10}
    cfg = config(workloads=[{"arrival": {"kind": "poisson", "rate": 2.0}, "num_requests": 5, "lengths": lengths},
                            {"arrival": {"kind": "gamma", "rate": 0.5, "cv": 2.0}, "num_requests": 5,
                             "lengths": lengths}])
    sized = with_duration(cfg, 100.0, Horizon(min_requests=300))
    assert [w.num_requests for w in sized.workloads] == [300, 50]
    assert with_duration(cfg, 1000.0).workloads[0].num_requests == 2000


def test_unmeetable_slo_gives_zero_and_trace_arrivals_are_refused(tmp_path) -> None:
    cfg = config()
    assert find_capacity(cfg, slo_predicate(ttft_p99_s=1e-6), start=2.0, horizon=None).rate == 0.0
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n")
    replay = config(workloads=[{"arrival": {"kind": "trace"}, "lengths": {"kind": "trace"},
                                "trace": {"path": str(trace)}}])
    with pytest.raises(ServesimError, match="needs a rate"):
        with_rate(replay, 2.0)
