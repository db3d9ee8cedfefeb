"""The chunked-prefill scheduler family (vllm_v1, sarathi, sarathi_decode_maximal), prefix caching and the
cache-aware routers."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policies
from hardware.errors import ServesimError
from policies.batch import Batch
from policies.chunked import is_decoding
from policies.sarathi import SarathiParams, SarathiScheduler
from policies.state import ReplicaState
from sim.config import SimConfig
from sim.engine import simulate
from sim.executor import FixedCostExecutor, StepOutcome
from tests.test_engine import check_conservation, config
from traces.workload import GeneratedRequests

CHUNKED = ("vllm_v1", "sarathi", "sarathi_decode_maximal", "layered_prefill")


class Recorder:
    """An executor that remembers every batch it ran (fixed step cost)."""

    def __init__(self) -> None:
        self.inner = FixedCostExecutor(0.005, 1e-5)
        self.batches: list[Batch] = []

    def run(self, batch: Batch) -> StepOutcome:
        self.batches.append(batch)
        return self.inner.run(batch)


def run_recorded(cfg: SimConfig):
    recorders: list[Recorder] = []

    def factory(dep):
        recorders.append(Recorder())
        return recorders[-1]

    return simulate(cfg, executor_factory=factory), recorders


def sched(name: str, **params) -> dict:
    return {"name": name, **params}


WORK = [{"arrival": {"kind": "poisson", "rate": 40.0}, "num_requests": 80,
         "lengths": {"kind": "uniform", "prompt": [20, 1500], "output": [1, 60]}}]


@pytest.mark.parametrize("scheduler,per_step", [
    (sched("vllm_v1", max_num_batched_tokens=512, max_num_seqs=12), 512),
    (sched("vllm_v1", max_num_batched_tokens=300, long_prefill_token_threshold=100), 300),
    (sched("sarathi", token_budget=256, max_num_seqs=10), 256),
    (sched("sarathi_decode_maximal", chunk_size=128, max_num_seqs=10), None),
])
def test_prefill_chunks_add_up_exactly_once(scheduler: dict, per_step: int | None) -> None:
    cfg = config(scheduler=scheduler, workloads=WORK)
    res, (rec,) = run_recorded(cfg)
    check_conservation(cfg, res)
    assert res.summary["preemptions"] == 0  # plenty of KV: every prompt runs once
    req = res.requests.set_index("request_id")
    done: dict[int, int] = defaultdict(int)
    last_chunk_step: dict[int, int] = {}
    seqs_cap = scheduler.get("max_num_seqs", 256)
    for step, b in enumerate(rec.batches):
        assert b.num_requests <= seqs_cap
        if per_step is not None:
            assert b.num_tokens <= per_step
        else:  # decode-maximal: one chunk of at most chunk_size tokens per step
            assert b.prefill_ids.size <= 1 and b.num_prefill_tokens <= scheduler["chunk_size"]
        if "long_prefill_token_threshold" in scheduler:
            assert (b.prefill_tokens <= scheduler["long_prefill_token_threshold"]).all()
        for rid, n, before in zip(b.prefill_ids.tolist(), b.prefill_tokens.tolist(), b.prefill_computed.tolist()):
            assert before == done[rid]  # chunks are contiguous
            done[rid] += n
            last_chunk_step[rid] = step
    steps = res.steps
    end = (steps["start_s"] + steps["duration_s"]).to_numpy()
    for rid, n in done.items():
        assert n == req.loc[rid, "prompt_tokens"]  # each prompt token prefilled exactly once
        assert req.loc[rid, "first_token_s"] == end[last_chunk_step[rid]]  # first token after the last chunk
    assert any(n > 1 for n in map(len, [[1 for b in rec.batches if rid in b.prefill_ids] for rid in done]))


class CheckedSarathi(SarathiScheduler):
    """Sarathi that asserts, every step, that no running decode was left out because of a prefill."""

    def schedule(self, state: ReplicaState) -> Batch | None:
        running = np.array(state.running, dtype=np.int64)
        decoding = set(running[is_decoding(state, running)].tolist())
        before = state.preemptions
        batch = super().schedule(state)
        if batch is not None and state.preemptions == before and len(decoding) <= self.params.token_budget:
            assert decoding <= set(batch.decode_ids.tolist()), "a decode was skipped"
        return batch


def test_sarathi_never_skips_a_decode_for_a_prefill(monkeypatch) -> None:
    monkeypatch.setitem(policies.SCHEDULERS, "sarathi", (SarathiParams, CheckedSarathi))
    cfg = config(scheduler=sched("sarathi", token_budget=256),
                 workloads=[{"arrival": {"kind": "poisson", "rate": 30.0}, "num_requests": 150,
                             "lengths": {"kind": "uniform", "prompt": [500, 3000], "output": [20, 200]}}])
    res = simulate(cfg)
    check_conservation(cfg, res)
    assert (res.steps["prefill_requests"] > 0).sum() > 20 and (res.steps["decode_requests"] > 0).sum() > 20


def test_stall_free_batching_bounds_inter_token_latency() -> None:
    """Sarathi-Serve's point: decodes no longer wait behind whole prompts, so the ITL tail shrinks."""
    work = [{"arrival": {"kind": "poisson", "rate": 12.0}, "num_requests": 600,
             "lengths": {"kind": "lognormal", "prompt_mean": 1500, "prompt_cv": 1.0, "output_mean": 200,
                         "output_cv": 0.8, "max_prompt": 7000}}]
    itl = {name: simulate(config(scheduler=sched(name), workloads=work)).summary["itl_p99_s"]
           for name in ("vllm", "sarathi")}
    assert itl["sarathi"] < itl["vllm"] / 3


def test_v1_admits_nothing_on_a_step_that_preempted() -> None:
    cfg = config(scheduler=sched("vllm_v1", max_num_batched_tokens=1024), kv_cache={"num_blocks": 120},
                 max_model_len=1920,
                 workloads=[{"arrival": {"kind": "poisson", "rate": 80.0}, "num_requests": 80,
                             "lengths": {"kind": "uniform", "prompt": [100, 600], "output": [50, 300]}}])
    res = simulate(cfg)
    check_conservation(cfg, res)
    steps = res.steps
    preempting = steps[steps["preemptions"] > 0]
    assert len(preempting) > 0
    first = res.requests.groupby("first_scheduled_s").size()
    assert not preempting["start_s"].isin(first.index).any()


schedulers = st.one_of(
    st.fixed_dictionaries({"name": st.just("vllm_v1"), "max_num_batched_tokens": st.integers(16, 2048),
                           "max_num_seqs": st.integers(1, 16), "long_prefill_token_threshold": st.integers(0, 600)}),
    st.fixed_dictionaries({"name": st.just("sarathi"), "token_budget": st.integers(16, 2048),
                           "max_num_seqs": st.integers(1, 16)}),
    st.fixed_dictionaries({"name": st.just("sarathi_decode_maximal"), "chunk_size": st.integers(8, 1024),
                           "max_num_seqs": st.integers(1, 16)}),
    st.fixed_dictionaries({"name": st.just("layered_prefill"), "layer_groups": st.integers(1, 6),
                           "max_prefill_tokens": st.integers(16, 2048), "max_num_seqs": st.integers(1, 16)}),
    st.fixed_dictionaries({"name": st.just("vllm"), "max_num_seqs": st.integers(1, 16)}),
)


class CheckedBlocks:
    """Wraps a scheduler: after every step, the KV bookkeeping invariants must hold."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def schedule(self, state):
        return self.inner.schedule(state)

    def on_step_end(self, state, batch, result) -> None:
        state.kv.check(np.flatnonzero(state.req.replica == state.index))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scheduler=schedulers, caching=st.booleans(), blocks=st.integers(70, 400), replicas=st.integers(1, 2),
       prefix=st.integers(16, 700), fraction=st.floats(0, 1), prompts=st.integers(1, 3), seed=st.integers(0, 99))
def test_conservation_with_chunking_and_prefix_caching(monkeypatch, scheduler, caching, blocks, replicas, prefix,
                                                        fraction, prompts, seed) -> None:
    original = policies.make_scheduler
    monkeypatch.setattr("sim.engine.make_scheduler", lambda params: CheckedBlocks(original(params)))
    wl = {"arrival": {"kind": "poisson", "rate": 60.0}, "num_requests": 40,
          "lengths": {"kind": "uniform", "prompt": [1, 400], "output": [1, 80]},
          "shared_prefix": {"tokens": prefix, "fraction": fraction, "prompts": prompts}}
    cfg = config(scheduler=scheduler, workloads=[wl], kv_cache={"num_blocks": blocks, "prefix_caching": caching},
                 cluster={"replicas": replicas, "router": "prefix_affinity"}, max_model_len=min(2048, blocks * 16),
                 seed=seed)
    res = simulate(cfg)
    check_conservation(cfg, res)
    req = res.requests
    shared_blocks_tokens = (prefix // 16) * 16
    if not caching:
        assert (req["cached_tokens"] == 0).all()
    else:  # a hit never goes past the shared system prompt (per admission)
        assert (req["cached_tokens"] <= shared_blocks_tokens * (1 + req["preemptions"])).all()


def test_prefix_cache_reuses_system_prompts_and_saves_prefill() -> None:
    wl = [{"arrival": {"kind": "poisson", "rate": 5.0}, "num_requests": 200,
           "lengths": {"kind": "uniform", "prompt": [50, 300], "output": [10, 50]},
           "shared_prefix": {"tokens": 2010, "fraction": 0.8, "prompts": 2}}]
    on = simulate(config(scheduler=sched("vllm_v1"), workloads=wl, kv_cache={"prefix_caching": True}))
    off = simulate(config(scheduler=sched("vllm_v1"), workloads=wl))
    s = on.summary
    hits = on.requests["cached_tokens"]
    assert hits.max() == 2000  # 2010 shared tokens: 125 full blocks of 16; the partial one is not shared
    assert (hits > 0).sum() >= 0.8 * 200 - 20  # all but the first of each system prompt, roughly
    assert s["prefill_tokens_saved"] == hits.sum() and 0.5 < s["prefix_cache_hit_rate"] < 1
    assert s["ttft_p50_s"] < off.summary["ttft_p50_s"] / 2


def test_caching_with_nothing_to_share_changes_nothing() -> None:
    wl = [{"arrival": {"kind": "poisson", "rate": 20.0}, "num_requests": 200,
           "lengths": {"kind": "uniform", "prompt": [50, 900], "output": [10, 200]}}]
    for name in ("vllm", "vllm_v1", "sarathi"):
        on = simulate(config(scheduler=sched(name), workloads=wl, max_model_len=4800,
                             kv_cache={"prefix_caching": True, "num_blocks": 300}))
        off = simulate(config(scheduler=sched(name), workloads=wl, kv_cache={"num_blocks": 300}, max_model_len=4800))
        assert on.summary["preemptions"] > 0  # memory pressure exercised
        assert on.requests.equals(off.requests) and on.steps.equals(off.steps), name


def test_eviction_prefers_blocks_nobody_holds_least_recently_freed() -> None:
    from policies.kv_cache import PrefixCache

    cache = PrefixCache()
    for k in (1, 2, 3):
        assert cache.register(k)
    assert not cache.register(2)  # a duplicate stays private
    cache.release([3, 2])  # freed tail first
    cache.acquire([2])  # reused: in use again
    assert cache.match([1, 2, 3, 4]) == (3, 1, 0)  # (on the GPU, of which evictable, on the host tier)
    assert cache.evict(5) == 1 and 3 not in cache.refs  # only the unreferenced block goes
    assert cache.refs == {1: 1, 2: 1}


def test_mooncake_hash_ids_map_to_engine_blocks() -> None:
    g = GeneratedRequests(arrival=np.zeros(2), prompt=np.array([1100, 1090]), output=np.ones(2, np.int64),
                          skipped_rows=0, hash_ids=[(7, 8, 9), (7, 8, 10)])
    a, b = g.block_keys(16, 0)
    assert a.size == 1100 // 16 and b.size == 1090 // 16
    assert (a[:64] == b[:64]).all() and (a[64:68] != b[64:68]).all()  # they share the blocks of ids 7 and 8
    g2 = GeneratedRequests(arrival=np.zeros(1), prompt=np.array([600]), output=np.ones(1, np.int64),
                           skipped_rows=0, hash_ids=[(7, 11)])
    (c,) = g2.block_keys(16, 0)
    assert (c[:32] == a[:32]).all() and (c[32:] != a[32:c.size]).all()


def test_power_of_two_and_prefix_affinity_routers() -> None:
    busy = [{"arrival": {"kind": "poisson", "rate": 200.0}, "num_requests": 120,
             "lengths": {"kind": "fixed", "prompt": 500, "output": 50},
             "shared_prefix": {"tokens": 480, "fraction": 1.0, "prompts": 4}}]
    p2 = simulate(config(cluster={"replicas": 4, "router": "power_of_two"}, workloads=busy))
    assert p2.requests["replica"].value_counts().min() >= 15
    again = simulate(config(cluster={"replicas": 4, "router": "power_of_two"}, workloads=busy))
    assert p2.requests["replica"].equals(again.requests["replica"])  # seeded
    sticky = simulate(config(cluster={"replicas": 4, "router": "prefix_affinity", "affinity_slack": 1000},
                             workloads=busy, scheduler=sched("vllm_v1"), kv_cache={"prefix_caching": True}))
    rr = simulate(config(cluster={"replicas": 4, "router": "round_robin"}, workloads=busy,
                         scheduler=sched("vllm_v1"), kv_cache={"prefix_caching": True}))
    assert sticky.summary["prefix_cache_hit_rate"] > rr.summary["prefix_cache_hit_rate"]
    capped = simulate(config(cluster={"replicas": 4, "router": "prefix_affinity", "affinity_slack": 0},
                             workloads=busy, scheduler=sched("vllm_v1"), kv_cache={"prefix_caching": True}))
    assert capped.requests["replica"].value_counts().min() >= 15  # the load cap spreads requests


def test_prefix_caching_needs_a_paged_scheduler() -> None:
    with pytest.raises(ValueError, match="prefix_caching needs a paged scheduler"):
        config(scheduler=sched("orca"), kv_cache={"prefix_caching": True})


@pytest.mark.parametrize("name", CHUNKED)
def test_new_policies_are_deterministic(name: str) -> None:
    cfg = config(scheduler=sched(name), workloads=WORK, kv_cache={"prefix_caching": True, "num_blocks": 200},
                 max_model_len=3200,
                 cluster={"replicas": 2, "router": "power_of_two"})
    a, b = simulate(cfg), simulate(cfg)
    assert a.summary == b.summary and a.requests.equals(b.requests) and a.steps.equals(b.steps)


@pytest.mark.parametrize("name", ("vllm", *CHUNKED))
def test_a_cache_smaller_than_one_request_is_refused_and_long_requests_rejected(name: str) -> None:
    work = [{"arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": 3,
             "lengths": {"kind": "fixed", "prompt": 500, "output": 600}}]
    with pytest.raises(ServesimError, match="kv_cache.num_blocks = 50: 800 tokens of KV cannot hold one request of "
                                            "max_model_len = 8192 tokens"):
        simulate(config(scheduler=sched(name), kv_cache={"num_blocks": 50}, workloads=work))
    cfg = config(scheduler=sched(name), kv_cache={"num_blocks": 50}, max_model_len=800, workloads=work)
    res = simulate(cfg)  # as vLLM: requests longer than max_model_len never start
    check_conservation(cfg, res)
    assert (res.requests["reject_code"] == "exceeds_max_model_len").all()


def test_evicted_blocks_spill_to_the_host_tier_and_load_back() -> None:
    from policies.kv_cache import PrefixCache

    cache = PrefixCache(host_capacity=2)
    for k in (1, 2, 3):
        cache.register(k)
    cache.release([3, 2, 1])
    assert cache.evict(3) == 3 and list(cache.host) == [2, 1]  # 3 spilled first, then dropped for room
    assert cache.match([1, 2, 3]) == (0, 0, 2)  # two host blocks, then one dropped: the match stops there
    assert cache.match([3, 1]) == (0, 0, 0)
    cache.load([2, 1])
    assert cache.refs == {2: 1, 1: 1} and not cache.host
