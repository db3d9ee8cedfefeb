"""Closed-loop clients (`sim.clients`) and the burst arrival (`rate: inf`): the concurrency bound, think
times, Little's law for a closed system, and the errors where a rate is needed."""

from __future__ import annotations

import numpy as np
import pytest

from hardware.errors import ServesimError
from servesim.capacity import with_rate
from sim.config import load_config
from sim.engine import simulate

LENGTHS = "workloads.0.lengths={kind: uniform, prompt: [50, 800], output: [5, 120]}"


def run(arrival: str, n: int = 300, *extra: str):
    return simulate(load_config(None, [f"workloads.0.arrival={arrival}", f"workloads.0.num_requests={n}", LENGTHS,
                                       *extra]))


def in_flight(req) -> np.ndarray:
    """Requests sent and not yet answered just after each arrival."""
    a, f = req["arrival_s"].to_numpy(), req["finish_s"].to_numpy()
    return np.array([np.sum((a <= t) & (f > t)) for t in a])


def test_clients_never_have_more_than_their_concurrency_in_flight() -> None:
    res = run("{kind: closed_loop, concurrency: 6}")
    req = res.requests
    assert (req["status"] == "finished").all()
    flying = in_flight(req)
    assert flying.max() == 6 and (flying <= 6).all()
    assert (req["arrival_s"].to_numpy()[:6] == 0.0).all()  # every client's first request at the start


def test_each_request_follows_an_answer_after_the_think_time() -> None:
    res = run("{kind: closed_loop, concurrency: 4, think_time_s: 0.25}", 200)
    req = res.requests
    later = np.sort(req["arrival_s"].to_numpy())[4:]
    answers = np.sort(req["finish_s"].to_numpy())
    # each later request was sent exactly 0.25 s after some answer, and each answer releases at most one
    idx = np.searchsorted(answers, later - 0.25 - 1e-9)  # the answer each was sent after (rounding aside)
    assert np.allclose(answers[np.minimum(idx, answers.size - 1)], later - 0.25, rtol=0, atol=1e-9)
    sent_after, sends = np.unique(answers[idx], return_counts=True)  # answers at one step release one client each
    assert all(k <= np.sum(answers == t) for t, k in zip(sent_after, sends))


def test_a_closed_system_obeys_littles_law() -> None:
    """N = X (R + Z): clients = throughput x (response time + think time), over the run."""
    n_clients, think = 16, 0.5
    res = run(f"{{kind: closed_loop, concurrency: {n_clients}, think_time_s: {think}, think: exponential}}", 2000)
    req = res.requests
    span = req["finish_s"].max() - req["arrival_s"].min()
    throughput = len(req) / span
    assert n_clients == pytest.approx(throughput * (req["e2e_s"].mean() + think), rel=0.05)


def test_more_clients_more_throughput_and_longer_latency() -> None:
    few, many = run("{kind: closed_loop, concurrency: 2}"), run("{kind: closed_loop, concurrency: 64}")
    assert many.summary["throughput_req_s"] > 3 * few.summary["throughput_req_s"]
    assert many.summary["tpot_p50_s"] > few.summary["tpot_p50_s"]


def test_rate_inf_sends_everything_at_the_start() -> None:
    res = simulate(load_config(None, ["workloads.0.arrival.rate=inf", "workloads.0.num_requests=50",
                                      "workloads.0.start_s=3"]))
    assert res.config.workloads[0].arrival.kind == "burst"
    assert (res.requests["arrival_s"] == 3.0).all() and res.summary["requests_finished"] == 50


def test_closed_loop_runs_are_deterministic() -> None:
    a = run("{kind: closed_loop, concurrency: 5, think_time_s: 0.1, think: exponential}", 150)
    b = run("{kind: closed_loop, concurrency: 5, think_time_s: 0.1, think: exponential}", 150)
    assert a.requests.to_csv() == b.requests.to_csv() and a.summary == b.summary


def test_closed_loop_needs_a_count_and_has_no_rate_to_search() -> None:
    with pytest.raises(ServesimError, match="give num_requests"):
        load_config(None, ["workloads.0.arrival={kind: closed_loop, concurrency: 2}", "workloads.0.num_requests=null",
                           "workloads.0.duration_s=10"])
    cfg = load_config(None, ["workloads.0.arrival={kind: closed_loop, concurrency: 2}"])
    with pytest.raises(ServesimError, match="'closed_loop': a capacity search needs a rate"):
        with_rate(cfg, 3.0)


def test_the_replay_refuses_closed_loops() -> None:
    pytest.importorskip("torch")
    from backend.replay import replay

    with pytest.raises(ServesimError, match="closed_loop' is simulated only"):
        replay(load_config(None, ["workloads.0.arrival={kind: closed_loop, concurrency: 2}"]))
    with pytest.raises(ServesimError, match="sessions is simulated only"):
        replay(load_config(None, ["workloads.0.sessions={turns: 2}"]))
