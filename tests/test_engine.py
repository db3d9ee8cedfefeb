"""Engine correctness: conservation, hand-computable latencies, queueing sanity, determinism."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardware.cost import CostModel
from hardware.operators import StepShape
from policies.state import Status
from sim.config import SimConfig, load_config
from sim.engine import simulate
from sim.executor import FixedCostExecutor
from sim.setup import build_deployment


def config(**sections) -> SimConfig:
    base = {
        "model": "llama-3-8b",
        "workloads": [{"arrival": {"kind": "poisson", "rate": 5.0}, "lengths": {"kind": "fixed", "prompt": 100,
                                                                                "output": 10}, "num_requests": 20}],
    }
    base.update(sections)
    return SimConfig.model_validate(base)


def check_conservation(cfg: SimConfig, res) -> None:
    req, steps = res.requests, res.steps
    assert len(req) == sum(1 for _ in range(len(req)))
    assert set(req["status"]) <= {"finished", "rejected"}  # every arrival ends one way or the other
    rejected = req[req["status"] == "rejected"]
    assert (rejected["reject_code"] != "").all() and (rejected["reject_code"] != "stalled").all()
    done = req[req["status"] == "finished"]
    r_tokens = res.token_times
    for row in done.itertuples():
        times = r_tokens[row.token_offset:row.token_offset + row.output_tokens]
        assert not np.isnan(times).any()  # generated tokens == requested output length
        assert (np.diff(times) > 0).all() and times[0] >= row.arrival_s
        assert times[0] == row.first_token_s and times[-1] == row.finish_s
        assert row.first_scheduled_s >= row.arrival_s
    for _, rows in steps.groupby("replica"):
        start, dur = rows["start_s"].to_numpy(), rows["duration_s"].to_numpy()
        assert (dur > 0).all() and (start[1:] >= start[:-1] + dur[:-1] - 1e-12).all()  # clock never goes back
    assert (steps["kv_blocks_used"] <= res.summary["kv_blocks_per_replica"]).all()
    assert res.free_blocks_at_end == [res.summary["kv_blocks_per_replica"]] * cfg.cluster.replicas
    assert res.summary["requests_finished"] + res.summary["requests_rejected"] == res.summary["requests_total"]


schedulers = st.one_of(
    st.fixed_dictionaries({"name": st.just("vllm"), "max_num_seqs": st.integers(1, 16),
                           "max_num_batched_tokens": st.sampled_from([None, 256, 2048])}),
    st.fixed_dictionaries({"name": st.just("orca"), "max_batch_size": st.integers(1, 16),
                           "reserve": st.sampled_from(["max", "pow2", "oracle"])}),
    st.fixed_dictionaries({"name": st.just("static"), "batch_size": st.integers(1, 8)}),
)
workloads = st.fixed_dictionaries({
    "arrival": st.one_of(
        st.fixed_dictionaries({"kind": st.just("poisson"), "rate": st.floats(0.5, 200)}),
        st.fixed_dictionaries({"kind": st.just("gamma"), "rate": st.floats(0.5, 200), "cv": st.floats(0.2, 4)})),
    "lengths": st.fixed_dictionaries({"kind": st.just("uniform"),
                                      "prompt": st.tuples(st.integers(1, 300), st.integers(300, 1500)),
                                      "output": st.tuples(st.integers(1, 20), st.integers(20, 300))}),
    "num_requests": st.integers(1, 40),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sched=schedulers, wls=st.lists(workloads, min_size=1, max_size=2), replicas=st.integers(1, 3),
       router=st.sampled_from(["round_robin", "least_outstanding", "least_kv"]), blocks=st.integers(60, 400),
       seed=st.integers(0, 1000))
def test_conservation_over_random_workloads(sched, wls, replicas, router, blocks, seed) -> None:
    cfg = config(scheduler=sched, workloads=[{**w, "name": f"w{i}"} for i, w in enumerate(wls)],
                 cluster={"replicas": replicas, "router": router}, kv_cache={"num_blocks": blocks, "block_size": 16},
                 max_model_len=min(2048, blocks * 16), seed=seed)
    res = simulate(cfg)
    check_conservation(cfg, res)
    steps = res.steps
    if sched["name"] == "vllm":
        budget = sched["max_num_batched_tokens"] or max(cfg.max_model_len, 2048)
        assert (steps["prefill_tokens"] <= budget).all()
        assert (steps["prefill_requests"] + steps["decode_requests"] <= sched["max_num_seqs"]).all()
        assert not ((steps["prefill_requests"] > 0) & (steps["decode_requests"] > 0)).any()  # V0: never mixed
    if sched["name"] != "vllm":
        assert res.summary["preemptions"] == 0  # they reserve KV up front


def test_preemption_under_memory_pressure_conserves() -> None:
    cfg = config(scheduler={"name": "vllm"}, kv_cache={"num_blocks": 80}, max_model_len=1280,
                 workloads=[{"arrival": {"kind": "poisson", "rate": 50}, "num_requests": 60,
                             "lengths": {"kind": "uniform", "prompt": [50, 400], "output": [50, 400]}}])
    res = simulate(cfg)
    assert res.summary["preemptions"] > 0
    check_conservation(cfg, res)
    assert (res.requests["preemptions"] > 0).any()


def test_hand_computable_single_request() -> None:
    """One request, prompt 100, output 5, arriving at t=1; each step costs 10 ms + 1 ms per token."""
    cfg = config(workloads=[{"arrival": {"kind": "constant", "rate": 1.0}, "num_requests": 1,
                             "lengths": {"kind": "fixed", "prompt": 100, "output": 5}}])
    res = simulate(cfg, executor_factory=lambda dep: FixedCostExecutor(0.010, 0.001))
    row = res.requests.iloc[0]
    prefill, decode = 0.010 + 0.100, 0.010 + 0.001
    assert row.arrival_s == 1.0 and row.first_scheduled_s == 1.0
    assert row.ttft_s == pytest.approx(prefill)
    assert row.e2e_s == pytest.approx(prefill + 4 * decode)
    assert row.tpot_s == pytest.approx(decode)
    assert res.itls(0) == pytest.approx([decode] * 4)
    assert res.summary["steps"] == 5 and res.summary["itl_p99_s"] == pytest.approx(decode)


def test_static_batches_run_to_completion_with_padding() -> None:
    cfg = config(scheduler={"name": "static", "batch_size": 4},
                 workloads=[{"arrival": {"kind": "constant", "rate": 1000.0}, "num_requests": 8,
                             "lengths": {"kind": "uniform", "prompt": [10, 200], "output": [2, 30]}}])
    res = simulate(cfg, executor_factory=lambda dep: FixedCostExecutor(0.01))
    batches = [g for _, g in res.requests.groupby("first_scheduled_s")]
    assert len(batches) >= 2 and all(len(g) <= 4 for g in batches)
    for prev, nxt in zip(batches, batches[1:]):
        assert nxt["first_scheduled_s"].iloc[0] >= prev["finish_s"].max() - 1e-12  # nobody joins mid-batch
    steps = res.steps
    for g in batches:  # finished rows keep being computed until the batch's longest request ends
        inside = steps[(steps["start_s"] > g["first_scheduled_s"].iloc[0]) & (steps["start_s"] < g["finish_s"].max())]
        assert (inside["decode_requests"] + inside["pad_rows"] == len(g)).all()
        assert inside["pad_rows"].iloc[-1] == (g["output_tokens"] < g["output_tokens"].max()).sum()


def test_low_load_latency_equals_unloaded_service_time() -> None:
    cfg = config(workloads=[{"arrival": {"kind": "constant", "rate": 0.05}, "num_requests": 5,
                             "lengths": {"kind": "fixed", "prompt": 1000, "output": 50}}])
    res = simulate(cfg)
    cost = CostModel(build_deployment(cfg))
    expected = cost.price(StepShape.build(prefill=[1000])).seconds + sum(
        cost.price(StepShape.build(decode=[1000 + i])).seconds for i in range(49))
    assert res.requests["e2e_s"].to_numpy() == pytest.approx(np.full(5, expected), rel=1e-9)
    assert res.summary["queue_p99_s"] == 0.0


def test_past_saturation_throughput_plateaus_and_queues_grow() -> None:
    def run(rate: float):
        return simulate(config(workloads=[{"arrival": {"kind": "poisson", "rate": rate}, "num_requests": 1500,
                                           "lengths": {"kind": "fixed", "prompt": 1000, "output": 200}}])).summary

    low, sat, over = run(5.0), run(60.0), run(120.0)
    assert low["throughput_req_s"] == pytest.approx(5.0, rel=0.1)
    assert over["throughput_req_s"] == pytest.approx(sat["throughput_req_s"], rel=0.05)  # capacity plateau
    assert sat["throughput_req_s"] < 60 * 0.9  # really saturated
    assert over["ttft_p50_s"] > sat["ttft_p50_s"] > 10 * low["ttft_p50_s"]


def test_requests_longer_than_the_context_are_rejected_and_counted() -> None:
    cfg = config(max_model_len=1000, workloads=[{"arrival": {"kind": "poisson", "rate": 5}, "num_requests": 30,
                                                 "lengths": {"kind": "uniform", "prompt": [100, 1500],
                                                             "output": [1, 10]}}])
    res = simulate(cfg)
    rej = res.requests[res.requests["status"] == "rejected"]
    assert len(rej) > 0 and (rej["prompt_tokens"] + rej["output_tokens"] > 1000).all()
    assert res.summary["rejected_exceeds_max_model_len"] == len(rej)
    assert "exceeds max_model_len=1000" in rej["reject_reason"].iloc[0]
    check_conservation(cfg, res)


def test_vllm_rejects_prompts_beyond_its_token_budget() -> None:
    cfg = config(scheduler={"name": "vllm", "max_num_batched_tokens": 512},
                 workloads=[{"arrival": {"kind": "poisson", "rate": 5}, "num_requests": 20,
                             "lengths": {"kind": "uniform", "prompt": [100, 1000], "output": [1, 10]}}])
    res = simulate(cfg)
    assert res.summary["rejected_exceeds_token_budget"] == int((res.requests["prompt_tokens"] > 512).sum()) > 0


def test_routers_spread_load() -> None:
    busy = [{"arrival": {"kind": "poisson", "rate": 200.0}, "num_requests": 90,
             "lengths": {"kind": "fixed", "prompt": 500, "output": 50}}]
    for router in ("round_robin", "least_outstanding", "least_kv"):
        res = simulate(config(cluster={"replicas": 3, "router": router}, workloads=busy))
        counts = res.requests["replica"].value_counts()
        assert len(counts) == 3 and counts.min() >= 20, router
    idle = simulate(config(cluster={"replicas": 3, "router": "least_outstanding"}))  # 5 req/s: never busy
    assert idle.requests["replica"].value_counts().idxmax() == 0  # ties go to the lowest index
    rr = simulate(config(cluster={"replicas": 3, "router": "round_robin"})).requests["replica"]
    assert rr.tolist()[:6] == [0, 1, 2, 0, 1, 2]


def test_default_scenario_runs_and_is_deterministic() -> None:
    cfg = load_config(None, ["workloads.0.num_requests=300"])
    a, b = simulate(cfg), simulate(cfg)
    assert a.summary == b.summary
    assert a.requests.equals(b.requests) and a.steps.equals(b.steps)
    assert a.summary["requests_finished"] == 300 and a.summary["slo_attainment"] > 0.9
    other = simulate(load_config(None, ["workloads.0.num_requests=300", "seed=1"]))
    assert other.summary != a.summary


def test_status_enum_covers_the_table() -> None:
    assert [s.name for s in Status] == ["PENDING", "WAITING", "RUNNING", "FINISHED", "REJECTED", "CANCELLED"]


def test_itl_counts_only_finished_requests() -> None:
    from policies.state import Requests
    from sim.metrics import _itls

    r = Requests(np.zeros(3), np.ones(3, np.int64), np.array([3, 2, 2]), np.zeros(3, np.int64))
    r.token_time[:] = [1.0, 1.5, 2.5, 3.0, 3.1, 4.0, 6.0]  # request 1 emitted tokens, then was rejected
    finished = np.array([True, False, True])
    out: dict = {}
    itl_max = _itls(r, finished, out)
    assert out["itl_mean_s"] == pytest.approx(3.5 / 3) and out["itl_p50_s"] == 1.0  # gaps 0.5, 1.0, 2.0
    assert out["itl_p90_s"] == pytest.approx(np.percentile([0.5, 1.0, 2.0], 90), rel=1e-12)
    assert itl_max[0] == 1.0 and itl_max[2] == 2.0 and np.isnan(itl_max[1])


def test_itls_in_blocks_give_every_gap_and_exact_largest_gaps(monkeypatch) -> None:
    """Gaps are differenced in blocks of requests (no copy of the token times): any block size gives the same
    gaps, and each request's largest gap is exact (float64), equal to its own tokens' largest difference."""
    from sim import metrics

    res = simulate(config(workloads=[{"arrival": {"kind": "poisson", "rate": 20.0}, "num_requests": 300,
                                      "lengths": {"kind": "uniform", "prompt": [50, 900], "output": [1, 120]}}]))
    r = res.requests
    want = [res.itls(i).max() if len(res.itls(i)) else np.nan for i in range(len(r))]
    assert np.allclose(r["itl_max_s"].to_numpy(), want, equal_nan=True, rtol=0, atol=0)
    all_gaps = np.concatenate([res.itls(i) for i in range(len(r))])
    for p in (50, 90, 99):  # exact: numpy's percentile over every gap, held at once
        assert res.summary[f"itl_p{p}_s"] == pytest.approx(np.percentile(all_gaps, p), rel=1e-12)
    assert res.summary["itl_mean_s"] == pytest.approx(all_gaps.mean(), rel=1e-12)
    monkeypatch.setattr(metrics, "ITL_CHUNK", 7)  # blocks of a request or two
    small = simulate(res.config)
    assert small.summary == res.summary and small.requests.equals(res.requests)


def test_itl_percentiles_are_exact_over_ties_and_spread_values() -> None:
    """The two-pass quantiles against numpy over every gap: many equal gaps (fixed step times) and a spread."""
    from policies.state import Requests
    from sim.metrics import _itls

    rng = np.random.default_rng(3)
    outputs = rng.integers(2, 60, 400)
    r = Requests(np.zeros(400), np.ones(400, np.int64), outputs, np.zeros(400, np.int64))
    gaps = np.where(rng.random(r.token_time.size) < 0.7, 0.025, rng.lognormal(-4, 1, r.token_time.size))
    r.token_time[:] = np.cumsum(gaps)
    finished = np.ones(400, dtype=bool)
    out: dict = {}
    _itls(r, finished, out, (1, 50, 90, 99, 99.9))
    every = np.concatenate([np.diff(r.token_time[o:o + n]) for o, n in zip(r.token_offset, outputs)])
    for p in (1, 50, 90, 99, 99.9):
        assert out[f"itl_p{p:g}_s"] == pytest.approx(np.percentile(every, p), rel=1e-12, abs=1e-15), p


class _Batches:
    """A fixed-cost executor that keeps every batch it runs (`sleep`: and takes that long on the wall clock)."""

    def __init__(self, base_s: float = 1.0, per_token_s: float = 0.01, sleep: bool = False) -> None:
        self.inner, self.sleep, self.batches = FixedCostExecutor(base_s, per_token_s), sleep, []

    def run(self, batch):
        self.batches.append(batch.shape().to_dict())
        outcome = self.inner.run(batch)
        if self.sleep:
            time.sleep(outcome.seconds)
        return outcome


def _drive(cfg: SimConfig, env, **executor) -> tuple:
    from sim.engine import drive
    from sim.setup import prepare

    executors = []

    def factory(dep):
        executors.append(_Batches(**executor))
        return executors[-1]

    return drive(prepare(cfg), env, factory, skip_ahead=False), [e.batches for e in executors]


@pytest.mark.parametrize("scheduler", [{"name": "vllm", "max_num_seqs": 8},
                                       {"name": "sarathi", "token_budget": 256, "max_num_seqs": 8}],
                         ids=["vllm", "sarathi"])
def test_both_clocks_make_the_same_batches(scheduler: dict) -> None:
    """The one replica loop on simulated time and on wall-clock time (`WallClock`, what a replay runs on; idle
    gaps skipped): with every step priced longer than the host takes to plan it (a second or more: the wall
    clock jumps over it), the same batches step by step, the same request and step tables, the same token
    times."""
    from sim.clock import SimClock, WallClock

    cfg = config(scheduler=scheduler, kv_cache={"num_blocks": 60}, max_model_len=512,  # (preemptions too)
                 cluster={"replicas": 2, "router": "least_outstanding"},
                 workloads=[{"arrival": {"kind": "poisson", "rate": 2.0}, "num_requests": 40,
                             "lengths": {"kind": "uniform", "prompt": [20, 400], "output": [2, 40]}}])
    (sim, sim_batches), (wall, wall_batches) = (_drive(cfg, env) for env in (SimClock(), WallClock(asap=True)))
    assert sim_batches == wall_batches and sum(map(len, sim_batches)) > 100
    pd.testing.assert_frame_equal(sim.requests, wall.requests, check_exact=True)
    pd.testing.assert_frame_equal(sim.steps, wall.steps, check_exact=True)
    np.testing.assert_array_equal(sim.token_times, wall.token_times)
    assert (sim.requests["preemptions"] > 0).any()


def test_arrivals_inside_a_wall_clock_step_meet_the_next_schedule() -> None:
    """Steps that really take 100 ms on the wall clock, arrivals every 10 ms: the requests that arrive during
    the first prefill are all in the second (at their own arrival times), as on simulated time."""
    from sim.clock import SimClock, WallClock

    cfg = config(workloads=[{"arrival": {"kind": "constant", "rate": 100.0}, "num_requests": 8,
                             "lengths": {"kind": "fixed", "prompt": 10, "output": 2}}])
    for env, sleep in ((SimClock(), False), (WallClock(asap=True), True)):
        res, (batches,) = _drive(cfg, env, base_s=0.1, per_token_s=0.0, sleep=sleep)
        firsts = [len(b["prefill_tokens"]) for b in batches if len(b["prefill_tokens"])]
        assert firsts[:2] == [1, 7]
        np.testing.assert_allclose(res.requests["arrival_s"], np.arange(1, 9) / 100.0)


def test_the_wall_clock_sleeps_to_its_events_and_skips_what_it_is_told() -> None:
    """Without `asap` the wall clock waits for an event's time; a step never ends before the wall clock;
    `skip` takes time out of it; the time before `run` does not count."""
    from sim.clock import WallClock

    env = WallClock()
    time.sleep(0.05)  # (setting up)

    def proc():
        yield env.timeout(0.05)  # sleeps until then
        time.sleep(0.03)
        env.skip(0.03)  # as if those 30 ms never passed
        yield env.step_end(0.0)
        time.sleep(0.02)
        yield env.step_end(0.0)  # ends at the wall clock, not before

    t0 = time.perf_counter()
    env.process(proc())
    env.run()
    assert time.perf_counter() - t0 >= 0.1
    assert 0.07 <= env.now < 0.5
