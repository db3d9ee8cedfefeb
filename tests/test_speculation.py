"""Speculative decoding in simulation: acceptance models against Monte Carlo, token and KV accounting,
verify budgets, costs, adaptive k, conservation and determinism."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardware.cost import CostModel
from hardware.errors import ServesimError
from hardware.operators import StepShape
from policies import make_scheduler
from policies.acceptance import (
    Acceptance,
    BetaAcceptance,
    IidAcceptance,
    PositionalAcceptance,
    TraceAcceptance,
)
from policies.speculation import Speculator
from sim.config import SimConfig, load_config
from sim.engine import simulate
from sim.setup import prepare
from sim.speculation import DraftCost, draft_deployment


def config(spec: dict | None, rate: float = 2.0, n: int = 40, prompt=(200, 2000), output=(20, 200),
           **extra) -> SimConfig:
    return SimConfig.model_validate({
        "model": "llama-3-8b", "max_model_len": 4096, "seed": 5, "hardware": {"gpu": "h100"},
        "workloads": [{"name": "w", "arrival": {"kind": "poisson", "rate": rate}, "num_requests": n,
                       "lengths": {"kind": "uniform", "prompt": list(prompt), "output": list(output)}}],
        "speculation": spec, **extra,
    })


def tokens_per_step(res) -> list[np.ndarray]:
    """For each finished request, how many tokens it received at each distinct emission time."""
    out = []
    for row in res.requests.itertuples():
        times = res.token_times[row.token_offset:row.token_offset + row.output_tokens]
        out.append(np.unique(times, return_counts=True)[1])
    return out


def check(res, k: int) -> None:
    req = res.requests
    assert (req["status"] == "finished").all()
    for row, counts in zip(req.itertuples(), tokens_per_step(res)):
        times = res.token_times[row.token_offset:row.token_offset + row.output_tokens]
        assert not np.isnan(times).any() and (np.diff(times) >= 0).all()  # exactly its output length
        assert counts.max() <= k + 1  # at most k + 1 tokens per step
    assert res.free_blocks_at_end == [res.summary["kv_blocks_per_replica"]]
    assert (res.steps["kv_blocks_used"] <= res.summary["kv_blocks_per_replica"]).all()
    assert (res.steps["accepted_tokens"] <= res.steps["draft_tokens"]).all()


# ---- acceptance models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [
    IidAcceptance(alpha=0.0), IidAcceptance(alpha=0.6), IidAcceptance(alpha=1.0),
    PositionalAcceptance(alphas=[0.9, 0.7, 0.5]), BetaAcceptance(mean=0.6, concentration=4.0),
])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_closed_form_matches_monte_carlo(model, k: int) -> None:
    n = 40_000
    acc = Acceptance(model, seed=1, num_requests=n)
    ids = np.arange(n)
    draws = acc.draw(ids, np.full(n, k))
    assert draws.min() >= 0 and draws.max() <= k
    assert (draws + 1).mean() == pytest.approx(acc.expected_tokens(k), abs=4 * (draws.std() + 1e-9) / np.sqrt(n))


def test_iid_closed_form_is_the_geometric_sum() -> None:
    acc = Acceptance(IidAcceptance(alpha=0.8), seed=0, num_requests=1)
    assert acc.expected_tokens(4) == pytest.approx((1 - 0.8 ** 5) / 0.2)


def test_trace_replays_counts_capped_at_k(tmp_path) -> None:
    path = tmp_path / "acc.jsonl"
    path.write_text(json.dumps({"accepted": [3, 0, 5]}) + "\n" + json.dumps({"accepted": [1]}) + "\n")
    acc = Acceptance(TraceAcceptance(path=str(path)), seed=0, num_requests=3)
    got = [acc.draw(np.array([0, 1, 2]), np.array([4, 4, 4])).tolist() for _ in range(3)]
    assert got == [[3, 1, 3], [0, 1, 0], [4, 1, 4]]  # request 2 replays line 0; 5 capped at k = 4
    assert acc.expected_tokens(4) == pytest.approx(1 + (3 + 0 + 4 + 1) / 4)
    path.write_text('{"accepted": [1, -2]}\n')
    with pytest.raises(ServesimError, match=r"acc.jsonl:1: expected"):
        load_config(None, ["speculation.acceptance.kind=trace", f"speculation.acceptance.path={path}"])


# ---- serving with speculation ----------------------------------------------------------------------------
def spec(**kw) -> dict:
    return {"draft": {"kind": "draft_model", "model": "llama-3.2-1b"}, "k": 4,
            "acceptance": {"kind": "iid", "alpha": 0.7}, **kw}


@pytest.mark.parametrize("batching", ["padded", "ragged", "budgeted"])
def test_tokens_and_kv_accounting(batching: str) -> None:
    res = simulate(config(spec(batching=batching, verify_budget=24), rate=8.0))
    check(res, 4)
    assert res.summary["spec_draft_tokens"] > 0 and 0 < res.summary["spec_acceptance_rate"] < 1
    if batching == "budgeted":
        steps = res.steps
        assert (steps["verify_requests"] + steps["draft_tokens"] <= 24).all()  # the verify budget holds
        assert (steps["draft_tokens"] < 4 * steps["verify_requests"]).any()  # and binds at some steps


def test_alpha_one_yields_k_plus_one_and_alpha_zero_costs_time() -> None:
    base = simulate(config(None)).summary
    perfect = simulate(config(spec(acceptance={"kind": "iid", "alpha": 1.0})))
    check(perfect, 4)
    steps = perfect.steps
    assert (steps["accepted_tokens"] == steps["draft_tokens"]).all()
    full = steps[steps["draft_tokens"] == 4 * steps["verify_requests"]]
    assert len(full) > 0
    counts = np.concatenate(tokens_per_step(perfect))
    assert (counts == 5).sum() > 0.5 * counts.size  # most steps give k + 1 = 5 tokens
    assert perfect.summary["tpot_mean_s"] < base["tpot_mean_s"]
    none = simulate(config(spec(acceptance={"kind": "iid", "alpha": 0.0}))).summary
    assert none["spec_accepted_tokens"] == 0
    assert none["tpot_mean_s"] > base["tpot_mean_s"]  # drafting and verifying for nothing costs time


def test_padded_costs_more_than_ragged_with_mixed_contexts() -> None:
    ragged = simulate(config(spec(batching="ragged"), rate=8.0, prompt=(100, 3500))).summary
    padded = simulate(config(spec(batching="padded"), rate=8.0, prompt=(100, 3500))).summary
    assert padded["tpot_mean_s"] > ragged["tpot_mean_s"]


def test_adaptive_k_switches_off_in_large_batches_unless_contexts_are_long() -> None:
    adaptive = {"full_batch": 2, "off_batch": 8, "long_context": None}
    heavy = simulate(config(spec(adaptive=adaptive), rate=30.0, n=80)).summary
    light = simulate(config(spec(adaptive=adaptive), rate=0.2, n=10)).summary
    assert light["spec_share_of_decodes"] > 0.9 > 0.5 > heavy["spec_share_of_decodes"]
    long_ctx = simulate(config(spec(adaptive={**adaptive, "long_context": 1000}), rate=30.0, n=80,
                               prompt=(1500, 3000))).summary
    assert long_ctx["spec_share_of_decodes"] > 0.9


def test_speculation_with_chunked_prefill_and_draft_heads() -> None:
    cfg = config(spec(draft={"kind": "draft_heads", "layers": 1, "sequential": False}), rate=6.0,
                 scheduler={"name": "sarathi", "token_budget": 512})
    res = simulate(cfg)
    check(res, 4)
    mixed = res.steps[(res.steps["prefill_tokens"] > 0) & (res.steps["verify_requests"] > 0)]
    assert len(mixed) > 0  # prefill chunks and verifications share steps
    ngram = simulate(config(spec(draft={"kind": "ngram"}))).summary
    assert ngram["spec_draft_time_share"] == 0.0


def test_draft_takes_kv_memory_and_baseline_speedup_is_reported() -> None:
    res = simulate(config(spec(compare_baseline=True, acceptance={"kind": "iid", "alpha": 0.9})))
    base = simulate(config(None))
    assert res.summary["kv_blocks_per_replica"] < base.summary["kv_blocks_per_replica"]
    assert res.summary["spec_speedup_tpot_mean"] == pytest.approx(base.summary["tpot_mean_s"]
                                                                   / res.summary["tpot_mean_s"])
    assert res.summary["spec_speedup_tpot_mean"] > 1.2


def four_requests_queued(cfg: SimConfig) -> tuple:
    """The run's setup, its one replica's state with requests 0-3 queued, the `Speculator` around the
    config's policy, and the cost-model executor (both with the run's acceptance model)."""
    setup = prepare(cfg)
    (state,) = setup.replica_states()
    policy = Speculator(make_scheduler(cfg.scheduler), cfg.speculation, setup.acceptance)
    executor = setup.pools[0].executor(cfg.speculation, setup.acceptance)
    for rid in range(4):
        state.enqueue(rid)
    return setup, state, policy, executor


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_the_wrapped_policy_decides_and_the_executor_draws_the_outcome(alpha: float) -> None:
    """The `Speculator` wraps the policy and only plans (which drafts run); the cost-model executor draws how many
    are accepted, and a verification cannot complete without that outcome."""
    cfg = config(spec(k=3, acceptance={"kind": "iid", "alpha": alpha}), n=4, prompt=(100, 100), output=(50, 50))
    setup, state, policy, executor = four_requests_queued(cfg)
    first = policy.schedule(state)
    assert first is not None and first.prefill_ids.size == 4 and not first.verify_ids.size
    assert executor.run(first).accepted is None  # nothing verified, nothing drawn
    state.complete_step(first, 1.0)
    batch = policy.schedule(state)
    assert batch is not None and batch.verify_ids.tolist() == [0, 1, 2, 3] and (batch.verify_drafts == 3).all()
    assert not hasattr(batch, "verify_accepted")  # a decision holds no outcome
    outcome = executor.run(batch)
    assert outcome.accepted.tolist() == ([3] * 4 if alpha == 1.0 else [0] * 4)
    with pytest.raises(ValueError, match="accepted"):
        state.complete_step(batch, 2.0)
    state.complete_step(batch, 2.0, outcome.accepted)
    assert state.req.generated[:4].tolist() == [1 + int(alpha * 3) + 1] * 4  # the first token, then accepted + 1
    with pytest.raises(ValueError, match="acceptance"):
        setup.pools[0].executor(cfg.speculation).run(batch)


@pytest.mark.parametrize("speculate, feed", [({"acceptance": {"kind": "iid", "alpha": 1.0}}, 2),
                                             ({"acceptance": {"kind": "iid", "alpha": 0.0}}, 1),
                                             ({"tree": {"kind": "static", "widths": [2, 2]},
                                               "acceptance": {"kind": "ranked", "probs": [1.0]}}, 3)])
def test_the_draft_model_first_takes_the_tokens_it_has_not_cached(speculate, feed) -> None:
    """After a chain whose k drafts were all accepted the draft's first step takes 2 tokens (the last draft,
    which it proposed but never ran, and the target's token); after a rejection 1; after a tree its accepted
    path and the target's token (3 for a path of 2). The draft's time prices that step as a chunk (eager where
    only decodes are graphed)."""
    cfg = config(spec(k=3, **speculate), n=4, prompt=(100, 100), output=(50, 50))
    setup, state, policy, executor = four_requests_queued(cfg)
    feeds = []
    for step in range(3):  # the prefills, then two verifications
        batch = policy.schedule(state)
        assert batch is not None
        feeds.append(None if batch.verify_feed is None else batch.verify_feed.tolist())
        outcome = executor.run(batch)
        policy.on_step_end(state, batch, state.complete_step(batch, float(step), outcome.accepted))
    assert feeds == [None, [1] * 4, [feed] * 4]
    shape = batch.shape()
    assert shape.draft_feed.tolist() == [feed] * 4
    target = setup.pools[0].deployment
    graphed_decodes = CostModel(draft_deployment(target, cfg.speculation), cuda_graphs="decode")
    draft = DraftCost(target, cfg.speculation, graphed_decodes)
    ones = replace(shape, draft_feed=None)
    assert draft.seconds(shape) > draft.seconds(ones) if feed > 1 else draft.seconds(shape) == draft.seconds(ones)


def test_a_chains_later_draft_steps_hide_their_host_time() -> None:
    """A chain's draft steps after the first take the step before's proposals on the device: in a CUDA graph
    each costs the longer of its GPU and host time, not their sum; the first step (it takes the tokens the
    draft has not cached from the host) and eager steps pay both."""
    cfg = config(spec(k=3))
    target = prepare(cfg).pools[0].deployment
    shape = StepShape.build(verify=[4, 4], verify_context=[500, 1200])
    for mode in ("mixed", "none"):
        model = CostModel(draft_deployment(target, cfg.speculation), cuda_graphs=mode)
        steps = [model.price(StepShape.build(decode=[500 + j, 1200 + j])) for j in range(3)]
        want = steps[0].seconds + sum(max(c.seconds - c.overhead_seconds, c.overhead_seconds) if mode == "mixed"
                                      else c.seconds for c in steps[1:])
        assert DraftCost(target, cfg.speculation, model).seconds(shape) == pytest.approx(want)
        assert (mode == "mixed") == (want < sum(c.seconds for c in steps))


def test_deterministic() -> None:
    cfg = config(spec(acceptance={"kind": "beta", "mean": 0.7, "concentration": 5}, batching="budgeted",
                      verify_budget=20), rate=6.0)
    a, b = simulate(cfg), simulate(cfg)
    assert a.requests.to_csv() == b.requests.to_csv() and a.steps.to_csv() == b.steps.to_csv()
    assert np.array_equal(a.token_times, b.token_times)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(1, 6), alpha=st.floats(0, 1), batching=st.sampled_from(["padded", "ragged", "budgeted"]),
       sched=st.sampled_from(["vllm", "vllm_v1", "sarathi"]), blocks=st.integers(300, 900),
       rate=st.floats(1, 40), seed=st.integers(0, 50))
def test_conservation_over_random_runs(k, alpha, batching, sched, blocks, rate, seed) -> None:
    cfg = config({**spec(k=k, batching=batching, verify_budget=3 * k + 5),
                  "acceptance": {"kind": "iid", "alpha": alpha}}, rate=rate, n=30, output=(1, 120),
                 scheduler={"name": sched}, kv_cache={"num_blocks": blocks}, seed=seed)
    check(simulate(cfg), k)


def test_config_errors() -> None:
    with pytest.raises(ServesimError, match="verify_budget"):
        load_config(None, ["speculation.batching=budgeted"])
    with pytest.raises(ServesimError, match="speculation with disaggregation"):
        load_config(None, ["speculation.k=2", "disaggregation.link=nvlink4"])
    with pytest.raises(ServesimError, match="alpha"):
        load_config(None, ["speculation.acceptance.alpha=1.5"])


def test_speculation_needs_a_paged_scheduler_and_paths_are_relative_to_the_config(tmp_path) -> None:
    with pytest.raises(ServesimError, match="speculation needs a paged"):
        load_config(None, ["speculation.k=2", "scheduler.name=orca"])
    (tmp_path / "acc.jsonl").write_text('{"accepted": [1, 2]}\n')
    (tmp_path / "spec.yaml").write_text("speculation:\n  acceptance: {kind: trace, path: acc.jsonl}\n")
    cfg = load_config(tmp_path / "spec.yaml")
    assert cfg.speculation.acceptance.path == str(tmp_path / "acc.jsonl")


def test_itl_counts_one_gap_per_emission_as_vllm_streams_chunks() -> None:
    """Accepted drafts arrive with the step's token: one chunk, one ITL (vLLM's benchmark), not zero gaps."""
    res = simulate(load_config("examples/speculative_decoding.yaml", ["workloads.0.num_requests=60"]))
    req, times = res.requests, res.token_times
    emissions = 0
    for row in req.itertuples():
        mine = times[row.token_offset:row.token_offset + row.output_tokens]
        gaps = res.itls(row.request_id)
        assert (gaps > 0).all() and gaps.size == np.unique(mine).size - 1
        emissions += gaps.size
    assert emissions < (req["output_tokens"] - 1).sum()  # several tokens per verification step
    assert res.summary["itl_p50_s"] > 0 and res.summary["itl_p50_s"] > res.summary["tpot_p50_s"]
