"""Request classes (issue 26): strict priority never admits a less urgent class while a more urgent one waits,
weighted fair queuing shares admissions by weight, per-class SLOs and metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policies
from policies.base import Scheduler
from policies.priority import WaitingQueue
from policies.state import ReplicaState
from sim.engine import simulate
from tests.test_engine import check_conservation, config


def classes_config(mode: str, scheduler: dict, blocks: int = 400, weights: dict | None = None, seed: int = 0,
                   rates: tuple[float, float, float] = (30.0, 30.0, 30.0)):
    work = [{"name": f"class{p}", "priority": p, "arrival": {"kind": "poisson", "rate": rate}, "num_requests": 40,
             "lengths": {"kind": "uniform", "prompt": [20, 600], "output": [1, 60]}}
            for p, rate in zip((0, 1, 2), rates)]
    return config(scheduler=scheduler, workloads=work, kv_cache={"num_blocks": blocks}, max_model_len=2048,
                  priority={"mode": mode, "weights": weights or {}}, seed=seed)


class CheckedStrict(Scheduler):
    """Asserts, every step, that no request started while a more urgent one was left waiting, and that the
    running list stays in class order."""

    def __init__(self, inner: Scheduler) -> None:
        self.inner = inner

    def schedule(self, state: ReplicaState):
        before = set(state.running)
        batch = self.inner.schedule(state)
        p = state.req.priority
        started = [rid for rid in state.running if rid not in before]
        waiting = [rid for rid in state.waiting]
        if started and waiting:
            assert max(p[started]) <= min(p[waiting]), "a less urgent class was admitted while a more urgent waited"
        assert list(p[state.running]) == sorted(p[state.running])
        return batch

    def on_step_end(self, state, batch, result) -> None:
        self.inner.on_step_end(state, batch, result)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scheduler=st.sampled_from([{"name": "vllm"}, {"name": "vllm_v1", "max_num_batched_tokens": 512},
                                  {"name": "sarathi", "token_budget": 256}, {"name": "layered_prefill"}]),
       blocks=st.integers(130, 400), seed=st.integers(0, 50))
def test_strict_priority_never_admits_a_less_urgent_class_first(monkeypatch, scheduler, blocks, seed) -> None:
    original = policies.make_scheduler
    monkeypatch.setattr("sim.engine.make_scheduler", lambda params: CheckedStrict(original(params)))
    cfg = classes_config("strict", scheduler, blocks, seed=seed)
    res = simulate(cfg)
    check_conservation(cfg, res)


def test_strict_priority_serves_the_urgent_class_first_and_fcfs_does_not() -> None:
    ttft = {}
    for mode in ("fcfs", "strict"):
        req = simulate(classes_config(mode, {"name": "vllm_v1", "max_num_batched_tokens": 1024},
                                      rates=(200.0, 200.0, 200.0))).requests
        ttft[mode] = req.groupby("workload")["ttft_s"].mean()
    assert ttft["strict"]["class0"] < ttft["strict"]["class1"] < ttft["strict"]["class2"]
    assert ttft["strict"]["class0"] < 0.5 * ttft["fcfs"]["class0"]


def test_weighted_fair_queue_shares_admitted_tokens_by_weight() -> None:
    """Three classes always waiting, every request 100 tokens: admissions follow the weights 3:2:1."""
    priority = np.array([0, 1, 2] * 400)
    q = WaitingQueue(priority, "weighted_fair", {0: 3.0, 1: 2.0, 2: 1.0}, lambda rid: 100)
    for rid in range(priority.size):
        q.append(rid)
    taken = [priority[q.popleft()] for _ in range(600)]
    counts = np.bincount(taken, minlength=3)
    assert counts.tolist() == pytest.approx([300, 200, 100], abs=2)
    assert len(q) == 600 and q[0] == q.popleft()


def test_an_idle_class_starts_level_and_cannot_claim_its_past() -> None:
    priority = np.array([0] * 50 + [1] * 50)
    q = WaitingQueue(priority, "weighted_fair", {}, lambda rid: 10)
    for rid in range(50):
        q.append(rid)
    for _ in range(40):
        q.popleft()  # class 0 alone: 400 tokens served
    for rid in range(50, 60):
        q.append(rid)  # class 1 arrives: it starts level, not 400 tokens behind
    taken = [int(priority[q.popleft()]) for _ in range(10)]
    assert 4 <= taken.count(1) <= 6


def test_per_class_slos_and_metrics() -> None:
    cfg = classes_config("strict", {"name": "vllm_v1"})
    data = cfg.model_dump(mode="json")
    data["workloads"][0]["slo"] = {"ttft_s": 1e-6}  # nobody meets this
    res = simulate(type(cfg).model_validate(data))
    s = res.summary
    assert s["priority_0_slo_attainment"] == 0.0 and s["priority_1_slo_attainment"] > 0.5
    assert s["priority_0_requests"] == s["priority_1_requests"] == 40
    req = res.requests
    assert not req.loc[req["workload"] == "class0", "meets_slo"].any()
    finished = req[(req["workload"] == "class1") & (req["status"] == "finished")]
    assert s["priority_1_ttft_p50_s"] == pytest.approx(np.percentile(finished["ttft_s"], 50))
    assert "priority_0_ttft_p50_s" not in simulate(config()).summary  # one class: no per-class keys
