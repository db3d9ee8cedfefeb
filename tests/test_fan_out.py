"""Fan-out requests (n samples of one prompt sharing its KV; first-finish cancellation), issue 26."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policies
from hardware.errors import ServesimError
from policies.kv_cache import BlockManager
from policies.state import Requests
from sim.config import load_config
from sim.engine import simulate
from tests.test_chunked_prefill import CheckedBlocks
from tests.test_engine import config


def _fan_config(n: int = 8, finish_after: int | None = None, prompt: int = 100, output: int | list = 20,
                requests: int = 1, scheduler: dict | None = None, kv: dict | None = None, rate: float | None = None,
                seed: int = 0):
    lengths = ({"kind": "fixed", "prompt": prompt, "output": output} if isinstance(output, int)
               else {"kind": "uniform", "prompt": [prompt, prompt], "output": output})
    arrival = {"kind": "burst"} if rate is None else {"kind": "poisson", "rate": rate}
    work = [{"arrival": arrival, "num_requests": requests, "lengths": lengths,
             "fan_out": {"n": n, "finish_after": finish_after}}]
    return config(workloads=work, scheduler=scheduler or {"name": "vllm"}, kv_cache=kv or {}, max_model_len=4096,
                  seed=seed)


def _checked(monkeypatch) -> None:
    original = policies.make_scheduler
    monkeypatch.setattr("sim.engine.make_scheduler", lambda params: CheckedBlocks(original(params)))


def _check_fan_out_run(res, n: int, finish_after: int | None) -> None:
    """Every sample ends (finished, or cancelled by its group's quota); tokens in time order; every block
    freed at the end; a group with a quota has exactly as many finished samples as its last step gave it."""
    req = res.requests
    assert set(req["status"]) <= {"finished", "cancelled", "rejected"}
    assert res.free_blocks_at_end == [res.summary["kv_blocks_per_replica"]] * len(res.free_blocks_at_end)
    for group, rows in req[req["status"] != "rejected"].groupby("group"):
        assert len(rows) == n and rows["arrival_s"].nunique() == 1 and rows["first_token_s"].nunique() == 1
        finished = rows[rows["status"] == "finished"]
        for row in rows.itertuples():
            times = res.token_times[row.token_offset:row.token_offset + row.generated_tokens]
            assert not np.isnan(times).any() and (np.diff(times) > 0).all()
            assert np.isnan(res.token_times[row.token_offset + row.generated_tokens:
                                            row.token_offset + row.output_tokens]).all()
        if finish_after is None:
            assert len(finished) == n
            continue
        assert len(finished) >= finish_after  # samples that finish in the same step all count
        first_done = np.sort(finished["finish_s"].to_numpy())[finish_after - 1]
        cancelled = rows[rows["status"] == "cancelled"]
        assert (cancelled["finish_s"] == first_done).all() and (finished["finish_s"] <= first_done).all()
        assert (cancelled["generated_tokens"] < cancelled["output_tokens"]).all()
        assert cancelled["e2e_s"].isna().all() and cancelled["tpot_s"].isna().all()


def test_samples_share_the_prompts_full_blocks() -> None:
    """A 100-token prompt (16-token blocks: 6 full, 4 tokens in a partial one) and 8 samples of 20 tokens:
    each ends holding the KV of 119 tokens, 8 blocks, of which the 6 full prompt blocks are shared: 6 + 8 x 2
    = 22 blocks at the peak, against 8 x 8 = 64 for 8 separate requests."""
    fan = simulate(_fan_config())
    separate = simulate(config(workloads=[{"arrival": {"kind": "burst"}, "num_requests": 8,
                                           "lengths": {"kind": "fixed", "prompt": 100, "output": 20}}],
                               max_model_len=4096))
    assert fan.steps["kv_blocks_used"].max() == 22
    assert separate.steps["kv_blocks_used"].max() == 64
    assert fan.steps["prefill_tokens"].sum() == 100 and separate.steps["prefill_tokens"].sum() == 800
    # the prompt counts once in the input-token rate, each sample in the request rate
    assert fan.summary["throughput_input_tok_s"] * fan.summary["duration_s"] == pytest.approx(100)
    assert fan.summary["throughput_req_s"] * fan.summary["duration_s"] == pytest.approx(8)
    _check_fan_out_run(fan, 8, None)
    # the samples sample their first tokens from the prompt's logits: one step, then decodes of all 8
    assert fan.steps["decode_requests"].iloc[1] == 8 and (fan.requests["first_token_s"] ==
                                                          fan.steps["duration_s"].iloc[0]).all()


def test_a_groups_shared_blocks_are_freed_once_by_its_last_holder() -> None:
    req = Requests(np.zeros(4), np.full(4, 100), np.full(4, 20), np.zeros(4, dtype=np.int64))
    kv = BlockManager(req, num_blocks=100, block_size=16)
    kv.grow_to(0, 100)  # the prompt: 6 full blocks and a partial one
    kv.fork(0, [1, 2, 3], 100)
    assert kv.free == 93 and list(req.blocks) == [7, 6, 6, 6]
    for rid in (1, 2, 3):  # each sample copies the partial block on its first write
        kv.grow_to(rid, 101)
    assert kv.free == 90
    members = np.arange(4)
    kv.check(members)
    kv.release(np.array([0, 2]))  # the first sample and one other: only their private blocks
    assert kv.free == 92
    kv.check(members)
    kv.release(1)
    assert kv.free == 93
    kv.release(3)  # the last holder: its private block and the 6 shared ones
    assert kv.free == 100 and not kv.groups and not kv.group_of
    kv.check(members)


def test_a_sample_sharing_its_prompts_blocks_recomputes_instead_of_swapping() -> None:
    req = Requests(np.zeros(2), np.full(2, 100), np.full(2, 20), np.zeros(2, dtype=np.int64))
    kv = BlockManager(req, num_blocks=100, block_size=16, host_blocks=50)
    kv.grow_to(0, 100)
    kv.fork(0, [1], 100)
    kv.grow_to(1, 101)
    assert kv.swap_out(1) == 0 and kv.host_free == 50  # its 6 shared blocks would come back unshared
    kv.release(0)
    assert kv.swap_out(1) == 7 and kv.free == 100  # alone in its group: every block is its own again


def test_first_finish_cancels_the_other_samples() -> None:
    full = simulate(_fan_config(output=[5, 200], requests=20, rate=2.0))
    first = simulate(_fan_config(output=[5, 200], requests=20, rate=2.0, finish_after=1))
    _check_fan_out_run(full, 8, None)
    _check_fan_out_run(first, 8, 1)
    s = first.summary
    assert s["fanout_requests"] == 20 and s["fanout_samples"] == 160
    assert s["requests_cancelled"] == (first.requests["status"] == "cancelled").sum() > 100
    assert s["requests_finished"] + s["requests_cancelled"] == 160
    assert s["fanout_cancelled_tokens"] == int((first.requests["output_tokens"]
                                                - first.requests["generated_tokens"]).sum())
    # the group's latency is its first sample's end; without cancellation, its last one's
    assert s["fanout_e2e_p50_s"] < 0.5 * full.summary["fanout_e2e_p50_s"]
    assert first.summary["throughput_output_tok_s"] < full.summary["throughput_output_tok_s"]
    assert s["slo_attainment"] == pytest.approx(
        first.requests.loc[first.requests["status"] != "cancelled", "meets_slo"].mean())


schedulers = st.sampled_from([{"name": "vllm"}, {"name": "vllm_v1", "max_num_batched_tokens": 256},
                              {"name": "sarathi", "token_budget": 128},
                              {"name": "sarathi_decode_maximal", "chunk_size": 64},
                              {"name": "layered_prefill", "max_prefill_tokens": 256}])


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scheduler=schedulers, n=st.integers(2, 6), finish_after=st.one_of(st.none(), st.integers(1, 2)),
       blocks=st.integers(300, 700), caching=st.booleans(), swap=st.booleans(), seed=st.integers(0, 50))
def test_blocks_are_conserved_under_preemption_and_cancellation(monkeypatch, scheduler, n, finish_after, blocks,
                                                                caching, swap, seed) -> None:
    """Tight caches preempt samples (recompute, or swap without prefix caching); the invariants hold after
    every step and every block comes back."""
    _checked(monkeypatch)
    kv = {"num_blocks": blocks, "prefix_caching": caching}
    if swap and not caching:
        kv |= {"preemption": "swap", "swap_space_gb": 0.02}
    cfg = _fan_config(n=n, finish_after=finish_after, prompt=150, output=[1, 300], requests=12, rate=20.0,
                      scheduler=scheduler, kv=kv, seed=seed)
    res = simulate(cfg)
    _check_fan_out_run(res, n, finish_after)
    assert (res.requests["status"] != "rejected").all()


def test_preempted_samples_recompute_and_still_finish(monkeypatch) -> None:
    _checked(monkeypatch)
    res = simulate(_fan_config(n=8, prompt=300, output=[100, 400], requests=6, rate=50.0, kv={"num_blocks": 260}))
    assert res.summary["preemptions"] > 0
    _check_fan_out_run(res, 8, None)


def test_max_num_seqs_counts_every_sample_from_admission() -> None:
    res = simulate(_fan_config(n=8, requests=3, scheduler={"name": "vllm", "max_num_seqs": 12}))
    assert res.steps["running"].max() <= 12
    assert res.steps["prefill_requests"].max() == 1  # two prompts of 8 samples never run side by side
    wide = simulate(_fan_config(n=8, requests=2, scheduler={"name": "vllm_v1", "max_num_seqs": 4}))
    assert (wide.requests["reject_code"] == "exceeds_max_num_seqs").all()


def test_fan_out_is_deterministic() -> None:
    a = simulate(_fan_config(output=[5, 100], requests=10, rate=5.0, finish_after=2))
    b = simulate(_fan_config(output=[5, 100], requests=10, rate=5.0, finish_after=2))
    assert a.requests.to_csv() == b.requests.to_csv() and a.steps.to_csv() == b.steps.to_csv()


@pytest.mark.parametrize("override, message", [
    ("scheduler.name=static", "workloads.0.fan_out is simulated for colocated replicas of a paged scheduler"),
    ("workloads.0.fan_out.finish_after=9", "finish_after = 9 exceeds n = 8"),
    ("workloads.0.fan_out.n=1", "workloads.0.fan_out.n"),
    ("hardware.kv_token_budget=64", "KV eviction is simulated for colocated replicas without prefix caching, "
                                    "speculation or fan-out"),
])
def test_bad_fan_out_settings_are_one_line_errors(tmp_path, override, message) -> None:
    path = tmp_path / "fan.yaml"
    path.write_text("workloads:\n  - arrival: {kind: poisson, rate: 1}\n    num_requests: 5\n"
                    "    lengths: {kind: fixed, prompt: 10, output: 5}\n    fan_out: {n: 8}\n")
    with pytest.raises(ServesimError, match=message) as err:
        load_config(path, [override])
    assert "\n" not in str(err.value)


def test_cancelled_samples_in_the_summary_table_and_the_trace() -> None:
    from sim.chrome_trace import _request_events
    from sim.report import format_summary

    res = simulate(_fan_config(output=[5, 100], requests=10, rate=5.0, finish_after=1))
    table = format_summary(res.summary)
    assert f"fan-out prompts / cancelled    10 / {res.summary['requests_cancelled']} samples" in table
    # a cancelled sample's life is a slice that ends at its cancellation, not a rejection
    ends = {e["id"]: e for e in _request_events(res) if e.get("ph") == "e" and e.get("name", "").startswith("request")}
    cancelled = res.requests[res.requests["status"] == "cancelled"]
    assert len(cancelled) and all(ends[r.request_id]["ts"] == pytest.approx(r.finish_s * 1e6)
                                  for r in cancelled.itertuples())


def test_layered_prefill_drops_a_planned_decode_that_its_cohort_preempts(monkeypatch) -> None:
    """Found by the fan-out property test: forming a cohort preempted a request already planned as a decode,
    which then ran as a decode while waiting (its KV count went wrong and it stalled)."""
    _checked(monkeypatch)
    res = simulate(_fan_config(n=4, prompt=150, output=[1, 300], requests=12, rate=20.0, seed=2,
                               scheduler={"name": "layered_prefill", "max_prefill_tokens": 256},
                               kv={"num_blocks": 300}))
    assert res.summary["preemptions"] > 0 and (res.requests["status"] == "finished").all()
    _check_fan_out_run(res, 4, None)
