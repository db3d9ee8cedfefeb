"""Skip-ahead (issue 28): a run that folds stretches of decode steps gives the results of stepping one by one,
to the last bit, for every scheduler that promises stretches, every router, and the cost model's paths
(calibrated attention surfaces, another GPU's profile, sliding windows, eager steps, MoE, TP, PP, DP)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardware.catalog import get_gpu, get_model
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.operators import StepShape
from hardware.profiles import resolve_profile
from policies.routers import ROUTERS
from sim import skip_ahead
from sim.config import SimConfig
from sim.engine import simulate
from sim.skip_ahead import SkipAhead, Stretch, delays_to


def config(scheduler: dict, model: str = "llama-3-8b", hardware: dict | None = None, replicas: int = 1,
           router: str = "round_robin", blocks: int = 400, n: int = 60, rate: float = 4.0, **extra) -> SimConfig:
    return SimConfig.model_validate({
        "model": model, "seed": 3, "scheduler": scheduler, "hardware": {"gpu": "h100", **(hardware or {})},
        "cluster": {"replicas": replicas, "router": router}, "kv_cache": {"num_blocks": blocks},
        "max_model_len": 1536,
        "workloads": [{"arrival": {"kind": "poisson", "rate": rate}, "num_requests": n,
                       "lengths": {"kind": "uniform", "prompt": [20, 900], "output": [1, 300]}}], **extra})


def assert_identical(cfg: SimConfig, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run `cfg` both ways, check every output is equal, and return the steps the stretches covered."""
    folded = []
    original = SkipAhead.advance

    def counting(self, state, batch, now):
        stretch = original(self, state, batch, now)
        folded.append(stretch.steps if isinstance(stretch, Stretch) else 0)
        return stretch

    monkeypatch.setattr(SkipAhead, "advance", counting)
    fast = simulate(cfg)
    monkeypatch.setattr(SkipAhead, "advance", original)
    slow = simulate(cfg, skip_ahead=False)
    assert fast.summary.keys() == slow.summary.keys()
    for key, value in slow.summary.items():
        assert fast.summary[key] == value or (value != value and fast.summary[key] != fast.summary[key]), key
    pd.testing.assert_frame_equal(fast.requests, slow.requests, check_exact=True)
    pd.testing.assert_frame_equal(fast.steps, slow.steps, check_exact=True)
    np.testing.assert_array_equal(fast.token_times, slow.token_times)
    assert fast.free_blocks_at_end == slow.free_blocks_at_end
    return sum(folded)


SCHEDULERS = [
    {"name": "vllm", "max_num_seqs": 16},
    {"name": "vllm_v1", "max_num_batched_tokens": 512, "max_num_seqs": 16},
    {"name": "sarathi", "token_budget": 256, "max_num_seqs": 16},
    {"name": "sarathi_decode_maximal", "chunk_size": 128},
    {"name": "layered_prefill", "layer_groups": 4, "max_prefill_tokens": 512},
    {"name": "orca", "max_batch_size": 8, "reserve": "oracle"},
]


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=lambda s: s["name"])
def test_every_scheduler_folds_to_the_same_results(scheduler: dict, monkeypatch) -> None:
    """Light load (long stretches) and a cache small enough that decodes preempt at the heavier load."""
    assert assert_identical(config(scheduler), monkeypatch) > 300
    assert assert_identical(config(scheduler, blocks=120, rate=20.0), monkeypatch) > 0


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_sees_the_same_replicas(router: str, monkeypatch) -> None:
    """Three replicas: a stretch ends before the next arrival, whichever replica the router then reads."""
    cfg = config({"name": "vllm", "max_num_seqs": 8}, replicas=3, router=router, rate=6.0, n=90)
    assert assert_identical(cfg, monkeypatch) > 300


@pytest.mark.parametrize("replicas,router,runs_alone", [(1, "round_robin", False), (3, "round_robin", False),
                                                        (3, "least_outstanding", True)])
def test_a_blind_router_lets_a_stretch_run_through_an_arrival(replicas: int, router: str, runs_alone: bool,
                                                              monkeypatch) -> None:
    """One replica, or a router that reads no replica's state: the step an arrival falls in runs in the
    stretch (at light load no decode-only step runs one by one); a router that reads the replicas' state
    must see them at the arrival, so that step runs alone. The same results either way."""
    cfg = config({"name": "vllm", "max_num_seqs": 8}, replicas=replicas, router=router, rate=2.0 * replicas, n=60)
    assert assert_identical(cfg, monkeypatch) > 300
    alone, original = [], SkipAhead.advance  # (a decode step that does not run in a stretch runs alone)

    def advance(self, state, batch, now):
        ahead = original(self, state, batch, now)
        alone.append(not isinstance(ahead, Stretch) and not batch.prefill_ids.size)
        return ahead

    monkeypatch.setattr(SkipAhead, "advance", advance)
    simulate(cfg)
    assert (sum(alone) > 0) == runs_alone and len(alone) >= 60


# the cost model's paths (`bench/output_hashes.py` hashes the same runs)
COST_PATHS = {
    "calibrated": {"hardware": {"profile": "calibrated"}},  # measured attention surfaces (decode: mean, longest)
    "what-if": {"hardware": {"gpu": "h200", "profile": "h100"}},  # another GPU's profile: the what-if rule
    "eager": {"hardware": {"cuda_graphs": False}},  # eager steps (the host-pipelined window)
    "gather": {"hardware": {"kv_access": "gather"}},  # a K/V gather per decode
    "window": {"model": "mistral-7b"},  # sliding window
    "moe": {"model": "qwen1.5-moe-a2.7b"},  # MoE
    "tp2": {"hardware": {"tp": 2}},
    "pp2": {"hardware": {"pp": 2}},
    "dp2": {"model": "deepseek-v2-lite", "hardware": {"dp": 2, "expert_parallel": True}},  # DP attention, MLA
}


@pytest.mark.parametrize("case", COST_PATHS.values(), ids=COST_PATHS.keys())
def test_cost_model_paths_fold_to_the_same_results(case: dict, monkeypatch) -> None:
    cfg = config({"name": "sarathi", "token_budget": 256, "max_num_seqs": 16}, blocks=2000, **case)
    assert assert_identical(cfg, monkeypatch) > 300


def test_fan_out_samples_finishing_end_a_stretch(monkeypatch) -> None:
    """A fan-out sample finishing may cancel its siblings: that step runs alone, the rest still folds."""
    cfg = SimConfig.model_validate({
        "model": "llama-3-8b", "seed": 1, "scheduler": {"name": "vllm", "max_num_seqs": 32},
        "hardware": {"gpu": "h100"}, "kv_cache": {"num_blocks": 800},
        "workloads": [{"arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": 12,
                       "fan_out": {"n": 4, "finish_after": 2},
                       "lengths": {"kind": "uniform", "prompt": [50, 400], "output": [5, 200]}}]})
    assert assert_identical(cfg, monkeypatch) > 100


def test_a_stretch_prices_each_step_as_alone() -> None:
    """`price_decodes` gives, per step, the seconds, MFU and MBU that `price` gives that step alone, exactly."""
    rng = np.random.default_rng(0)
    cases = [("llama-3-8b", "h100", 1, "calibrated", True), ("llama-3-8b", "h200", 1, "h100", "none"),
             ("mistral-7b", "l40s", 1, None, True), ("qwen3-30b-a3b", "h100", 1, "calibrated", True),
             ("llama-2-70b", "a100-80gb", 2, None, "none")]
    for model, gpu, tp, profile, graphs in cases:
        dep = Deployment.build(get_model(model), get_gpu(gpu), tp=tp)
        cost = CostModel(dep, profile=resolve_profile(profile, dep.gpu.id), cuda_graphs=graphs)
        for _ in range(6):
            context = rng.integers(1, 6000, int(rng.integers(1, 600)))
            steps = int(rng.integers(1, 30))
            run = cost.price_decodes(context, steps)
            for i in range(steps):
                alone = cost.price(StepShape(decode_context=context + i))
                assert (alone.seconds, alone.mfu, alone.mbu, alone.execution) == \
                       (run.seconds[i], run.mfu[i], run.mbu[i], "graph" if run.graph[i] else "eager")


def test_the_clock_lands_on_the_last_step_end() -> None:
    """The replica's timeouts land on the stretch's last end exactly, with a second one only where no single
    delay from its start can (a case a random run met: the sum rounds past `end` to even)."""
    def land(now: float, end: float) -> list[float]:
        delays = delays_to(now, end)
        for d in delays:
            now += d
        assert now == end
        return delays

    rng = np.random.default_rng(1)
    for now, step in zip(rng.uniform(0, 1e5, 2000), rng.uniform(1e-4, 1.0, 2000)):
        end = now
        for _ in range(int(rng.integers(2, 40))):
            end += step
        assert len(land(float(now), float(end))) == 1
    assert land(0.0, 3.0) == [3.0]
    assert len(land(0.11669909372082506, 0.24508606127010388)) == 2
    singles = sum(len(land(float(a), float(a + b))) == 1 for a, b in rng.uniform(0, 1, (2000, 2)))
    assert singles > 1000


def test_runs_that_cannot_prove_a_stretch_step_one_by_one(monkeypatch) -> None:
    """Speculation, closed-loop clients, prefix caching and KV token budgets: no replica gets a skip-ahead."""
    made = []
    original = SkipAhead.__init__
    monkeypatch.setattr(SkipAhead, "__init__", lambda self, *a: made.append(1) or original(self, *a))
    base = config({"name": "vllm"}, n=5).model_dump()
    simulate(SimConfig.model_validate(base))
    assert made == [1]
    for update in ({"kv_cache": {"num_blocks": 400, "prefix_caching": True}},
                   {"hardware": {"gpu": "h100", "kv_token_budget": 512}},
                   {"workloads": [{"arrival": {"kind": "closed_loop", "concurrency": 2}, "num_requests": 5,
                                   "lengths": {"kind": "fixed", "prompt": 50, "output": 20}}]},
                   {"speculation": {"draft": {"kind": "draft_model", "model": "llama-3.2-1b"}, "k": 3}}):
        res = simulate(SimConfig.model_validate(base | update))
        assert res.summary["requests_finished"] == 5
    assert made == [1]
    assert math.isinf(skip_ahead.ArrivalClock(np.zeros(0)).next())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheduler=st.sampled_from(SCHEDULERS), replicas=st.integers(1, 3), router=st.sampled_from(ROUTERS),
       blocks=st.integers(100, 600), rate=st.floats(0.5, 40.0), seed=st.integers(0, 10_000),
       output=st.integers(1, 400))
def test_random_runs_fold_to_the_same_results(scheduler, replicas, router, blocks, rate, seed, output,
                                              monkeypatch) -> None:
    """Random loads, cache sizes, output lengths, replicas and routers: skipping changes nothing."""
    cfg = config(scheduler, replicas=replicas, router=router, blocks=blocks, rate=rate, n=40)
    cfg = cfg.model_copy(update={"seed": seed, "workloads": [cfg.workloads[0].model_copy(update={
        "lengths": cfg.workloads[0].lengths.model_copy(update={"output": (1, output)})})]})
    assert_identical(cfg, monkeypatch)
