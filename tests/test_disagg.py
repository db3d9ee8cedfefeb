"""Prefill/decode disaggregation: links shared fairly, KV moved whole before decoding, back-pressure,
conservation and determinism for disaggregated clusters."""

from __future__ import annotations

import numpy as np
import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardware.deployment import Deployment
from hardware.errors import ServesimError
from servesim.cli import main
from sim.config import SimConfig, load_config
from sim.disagg import wire_bytes_per_token
from sim.engine import simulate
from sim.network import Network
from sim.setup import build_pools


def config(rate: float = 4.0, n: int = 60, prompt=(100, 1500), output=(2, 120), **disagg) -> SimConfig:
    return SimConfig.model_validate({
        "model": "llama-3-8b", "max_model_len": 4096, "seed": 3,
        "workloads": [{"name": "w", "arrival": {"kind": "poisson", "rate": rate}, "num_requests": n,
                       "lengths": {"kind": "uniform", "prompt": list(prompt), "output": list(output)}}],
        "disaggregation": {"link": "eth-100g", **disagg},
    })


def check(cfg: SimConfig, res) -> None:
    """Conservation, KV before decode, bytes moved and link bandwidth, for any disaggregated run."""
    req = res.requests
    assert set(req["status"]) <= {"finished", "rejected"}
    assert (req.loc[req["status"] == "rejected", "reject_code"] != "stalled").all()
    finished = req[req["status"] == "finished"]
    for row in finished.itertuples():
        times = res.token_times[row.token_offset:row.token_offset + row.output_tokens]
        assert not np.isnan(times).any() and (np.diff(times) > 0).all()
        if row.decode_replica >= 0:  # the second token is decoded only after the whole KV has arrived
            assert row.first_token_s <= row.kv_ready_s < times[1]
        else:  # one output token, or served whole by a mixed instance
            assert row.output_tokens == 1 or row.replica >= cfg.pools()[0][1].instances + cfg.pools()[1][1].instances
    moved = finished[finished["decode_replica"] >= 0]
    pools = {p.name: p for p in build_pools(cfg)}
    wire = {p.first + i: wire_bytes_per_token(p.deployment) for p in pools.values() for i in range(p.instances)}
    expected = sum(row.prompt_tokens * wire[row.decode_replica] for row in moved.itertuples())
    expected += float(req["kv_bytes_abandoned"].sum())  # layer-wise streams given back, sent again
    assert res.summary["kv_bytes_total"] == pytest.approx(expected, rel=1e-12)
    useful = moved["kv_bytes"] - moved["kv_bytes_abandoned"]
    assert (useful == moved["prompt_tokens"] * moved["decode_replica"].map(wire)).all()
    links = res.links
    assert (links["rate_bytes_s"] <= links["bandwidth_bytes_s"] * (1 + 1e-9)).all()  # never over bandwidth
    carried = 0.0  # bytes into the decode side = integral of the ingress links' rates over time
    for name, rows in links.groupby("link"):
        if name.endswith(".in"):
            t = rows["time_s"].to_numpy()
            carried += float((rows["rate_bytes_s"].to_numpy()[:-1] * np.diff(t)).sum())
    assert carried == pytest.approx(expected, rel=1e-6)
    sizes = [p.num_blocks for p in pools.values() for _ in range(p.instances)]
    assert res.free_blocks_at_end == sizes  # every block returned on both sides
    for name, rows in res.steps.groupby("pool"):
        assert (rows["kv_blocks_used"] <= pools[name].num_blocks).all()


# ---- the network -------------------------------------------------------------------------------------------
def run_flows(specs) -> tuple[dict[str, float], Network]:
    env = simpy.Environment()
    net = Network(env)
    done: dict[str, float] = {}

    def go(name, links, size, start, cap):
        yield env.timeout(start)
        yield net.transfer(tuple(net.links[n] for n in links), size, cap)
        done[name] = env.now

    for n, bw in (("a", 100.0), ("b", 50.0), ("c", 1000.0)):
        net.link(n, bw, 0.0)
    for name, links, size, start, cap in specs:
        env.process(go(name, links, size, start, cap))
    env.run()
    return done, net


def test_flows_share_a_link_fairly() -> None:
    inf = float("inf")
    done, _ = run_flows([("x", "a", 100, 0, inf), ("y", "a", 100, 0, inf)])
    assert done == pytest.approx({"x": 2.0, "y": 2.0})  # 200 bytes at 100 B/s, shared equally
    # y joins at t=0.5 when x has 50 left: both at 50 B/s until x ends at 1.5, then y alone: 50 left at 100 B/s.
    done, _ = run_flows([("x", "a", 100, 0, inf), ("y", "a", 100, 0.5, inf)])
    assert done == pytest.approx({"x": 1.5, "y": 2.0})
    # z is held to 25 B/s by link b (shared with w): x takes the rest of a (75 B/s) -- max-min fairness.
    done, _ = run_flows([("x", "a", 150, 0, inf), ("z", "ab", 50, 0, inf), ("w", "b", 50, 0, inf)])
    assert done["z"] == pytest.approx(2.0) and done["x"] == pytest.approx(2.0)
    done, _ = run_flows([("x", "c", 100, 0, 10.0)])  # a rate cap below the link's bandwidth
    assert done["x"] == pytest.approx(10.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "ab", "ac", "bc"]), st.floats(1, 500), st.floats(0, 5),
                          st.sampled_from([float("inf"), 5.0, 40.0])), min_size=1, max_size=12))
def test_links_never_exceed_bandwidth_and_deliver_every_byte(flows) -> None:
    done, net = run_flows([(str(i), links, size, start, cap) for i, (links, size, start, cap) in enumerate(flows)])
    assert len(done) == len(flows)
    rows = net.timeline.rows
    assert all(rate <= bw * (1 + 1e-9) for _, _, rate, bw, _ in rows)
    for name in "abc":
        want = sum(size for links, size, _, _ in flows if name in links)
        assert net.links[name].moved == pytest.approx(want, rel=1e-9, abs=1e-6)


# ---- disaggregated clusters -----------------------------------------------------------------------------
@pytest.mark.parametrize("transfer", ["after_prefill", "layerwise"])
def test_kv_moves_whole_before_decoding(transfer: str) -> None:
    cfg = config(transfer=transfer, prefill={"instances": 2}, decode={"instances": 2, "hardware": {"gpu": "h100",
                                                                                                  "tp": 2}})
    res = simulate(cfg)
    check(cfg, res)
    assert res.summary["requests_finished"] == 60 and res.summary["preemptions"] == 0
    assert res.summary["gpus"] == 6 and res.summary["cost_per_hour"] == pytest.approx(6 * 3.0)
    assert set(res.steps["pool"]) == {"prefill", "decode"}
    # the step log's text columns are categorical, each with its own labels in order (codes in the log)
    assert list(res.steps["pool"].cat.categories) == ["decode", "prefill"]
    assert set(res.steps["execution"].cat.categories) <= {"eager", "graph"}
    assert (res.steps["pool"] == "prefill").sum() == (res.steps["prefill_requests"] > 0).sum() > 0


def test_layerwise_hides_transfer_time() -> None:
    slow = {"link": "eth-25g", "prefill": {"scheduler": {"name": "sarathi", "token_budget": 512}}}
    after = simulate(config(rate=1.0, **slow)).requests
    layer = simulate(config(rate=1.0, transfer="layerwise", **slow)).requests
    long_ = after["prompt_tokens"] > 1024  # several chunks: most of the KV moves during the prefill
    assert layer.loc[long_, "kv_transfer_s"].mean() < 0.5 * after.loc[long_, "kv_transfer_s"].mean()
    assert (layer["tpot_s"].mean()) < after["tpot_s"].mean()


def test_ttft_does_not_depend_on_the_link_at_light_load() -> None:
    fast = simulate(config(rate=0.5, n=30, link="nvlink4")).requests
    slow = simulate(config(rate=0.5, n=30, link="eth-25g")).requests
    assert np.array_equal(fast["first_token_s"], slow["first_token_s"])  # the prefill instance samples it
    assert (slow["kv_transfer_s"] > 10 * fast["kv_transfer_s"]).all()
    assert slow["tpot_s"].mean() > fast["tpot_s"].mean()


def test_back_pressure_when_the_decode_pool_is_full() -> None:
    roomy = config(rate=20.0, n=80, output=(150, 300))
    tight = config(rate=20.0, n=80, output=(150, 300), decode={"num_blocks": 300}, prefill={"num_blocks": 600})
    a, b = simulate(roomy), simulate(tight)
    check(tight, b)
    assert a.summary["decode_wait_p99_s"] == 0.0 and b.summary["decode_wait_p99_s"] > 0.5
    pre = b.steps[b.steps["pool"] == "prefill"]
    # KV waiting to move stays on the prefill instance: it fills up although prompts leave after one step.
    assert pre["kv_blocks_used"].max() > 0.9 * 600 > a.steps.loc[a.steps["pool"] == "prefill", "kv_blocks_used"].max()
    assert b.summary["requests_finished"] == 80


def test_mixed_pool_serves_prompts_when_prefill_queues() -> None:
    cfg = config(rate=30.0, n=80, mixed={"instances": 1})
    res = simulate(cfg)
    check(cfg, res)
    mixed_index = 2  # prefill 0, decode 1, mixed 2
    whole = res.requests[res.requests["replica"] == mixed_index]
    assert len(whole) > 0 and (whole["kv_bytes"] == 0).all()  # served whole on the mixed instance
    assert res.summary["mixed_gpus"] == 1 and res.summary["gpus"] == 3


def test_heterogeneous_pools_and_per_phase_tp() -> None:
    cfg = config(prefill={"hardware": {"gpu": "h100"}},
                 decode={"instances": 1, "hardware": {"gpu": "a100-sxm-80gb", "tp": 2}})
    res = simulate(cfg)
    check(cfg, res)
    assert res.summary["cost_per_hour"] == pytest.approx(3.0 + 2 * 1.8)
    assert res.summary["energy_j"] > 0 and res.summary["output_tokens_per_joule"] > 0


def test_wire_bytes_count_replicated_kv_heads() -> None:
    one = Deployment.build("llama-3-8b", "h100", tp=1)
    many = Deployment.build("llama-3-8b", "h100", tp=16)  # 8 KV heads on 16 ranks: each head sent twice
    assert wire_bytes_per_token(one) == one.model.kv_bytes_per_token("bf16")
    assert wire_bytes_per_token(many) == 2 * wire_bytes_per_token(one)


def test_deterministic() -> None:
    cfg = config(rate=10.0, transfer="layerwise", prefill={"instances": 2}, mixed={"instances": 1})
    a, b = simulate(cfg), simulate(cfg)
    assert a.requests.to_csv() == b.requests.to_csv() and a.steps.to_csv() == b.steps.to_csv()
    assert a.summary == b.summary and a.links.to_csv() == b.links.to_csv()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=st.integers(1, 3), d=st.integers(1, 3), m=st.integers(0, 1), pblocks=st.integers(260, 600),
       dblocks=st.integers(260, 600), rate=st.floats(1, 60), transfer=st.sampled_from(["after_prefill", "layerwise"]),
       sched=st.sampled_from(["vllm", "vllm_v1", "sarathi"]), seed=st.integers(0, 100))
def test_conservation_over_random_clusters(p, d, m, pblocks, dblocks, rate, transfer, sched, seed) -> None:
    cfg = SimConfig.model_validate({
        **config(rate=rate, n=40).model_dump(), "seed": seed, "scheduler": {"name": sched},
        "disaggregation": {"link": "eth-100g", "transfer": transfer, "prefill": {"instances": p, "num_blocks": pblocks},
                           "decode": {"instances": d, "num_blocks": dblocks},
                           "mixed": {"instances": 1, "num_blocks": dblocks} if m else None}})
    check(cfg, simulate(cfg))


def test_layerwise_streams_give_way_to_finished_prefills_instead_of_livelocking() -> None:
    """Tiny KV on both sides: a long prompt's stream reserves most of the decode instance, while finished
    prefills fill the prefill instance waiting for decode room, and the long prompt's prefill waits for that
    room (this ran 200,000+ steps without a token before streams gave their destinations back)."""
    cfg = load_config("examples/disaggregated.yaml", [
        "disaggregation.transfer=layerwise", "max_model_len=1600", "workloads.0.num_requests=60",
        "disaggregation.prefill.scheduler={name: vllm_v1, long_prefill_token_threshold: 16}",
        "disaggregation.prefill.num_blocks=100", "disaggregation.decode.num_blocks=100", "workloads.0.arrival.rate=5",
        "workloads.0.lengths={kind: lognormal, prompt_mean: 600, prompt_cv: 0.9, output_mean: 50, output_cv: 0.7, "
        "max_prompt: 1500, max_output: 200}"])
    res = simulate(cfg)
    check(cfg, res)
    assert res.summary["kv_streams_given_back"] > 0 and res.summary["requests_finished"] == 58


def test_config_errors_are_one_line(capsys) -> None:
    with pytest.raises(ServesimError, match="disaggregation.decode.scheduler.name = 'static'"):
        load_config(None, ["disaggregation.decode.scheduler.name=static"])
    assert main(["run", "--set", "disaggregation.link=carrier-pigeon", "--quiet"]) == 2
    assert "carrier-pigeon" in capsys.readouterr().err
    assert main(["run", "--set", "disaggregation.decode.hardware.gpu=t4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disaggregation.decode" in err


def test_pool_scheduler_defaults_to_the_top_level_name() -> None:
    cfg = load_config(None, ["scheduler.name=sarathi", "disaggregation.decode.scheduler.max_num_seqs=64"])
    assert cfg.pools()[1][1].scheduler.name == "sarathi" and cfg.pools()[1][1].scheduler.max_num_seqs == 64


def test_disagg_search_ranks_placements_and_the_best_meets_its_slos(tmp_path, capsys) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(config(n=80).model_copy(update={"disaggregation": None}).model_dump_json())
    out = tmp_path / "search.csv"
    assert main(["disagg-search", str(path), "--gpus", "3", "--tp", "1", "--colocated", "vllm", "--ttft", "0.5",
                 "--tpot", "0.03", "--tolerance", "0.2", "--start", "4", "--out", str(out), "--json",
                 "--horizon", "20", "--min-requests", "300", "--seeds", "1", "--workers", "1"]) == 0
    import json

    import pandas as pd

    report = json.loads(capsys.readouterr().out)
    table = pd.read_csv(out)
    placements = set(table.loc[table["kind"] == "disaggregated", "placement"])
    assert placements == {"1P(tp1) + 1D(tp1)", "1P(tp1) + 2D(tp1)", "2P(tp1) + 1D(tp1)"}
    assert set(table.loc[table["kind"] == "colocated", "gpus"]) == {1, 2, 3}
    assert (table["goodput_per_gpu"].diff().dropna() <= 0).all()  # best first
    best = table.iloc[0]
    assert report["configurations"][0]["placement"] == best["placement"]
    assert best["goodput_req_s"] > 0 and best["slo_attainment"] >= 0.9
    assert main(["disagg-search", str(path), "--gpus", "2", "--tp", "x"]) == 2
    assert "--tp = 'x'" in capsys.readouterr().err


def test_flows_finish_late_in_a_long_run() -> None:
    """Late in a run the clock cannot resolve a flow's last fraction of a nanosecond: it must still end
    (this once spun forever at the same simulated time)."""
    env = simpy.Environment(initial_time=3.0e5)
    net = Network(env)
    link = net.link("a", 3.125e9, 0.0)
    rng = np.random.default_rng(1)
    sizes, starts = rng.uniform(1e6, 3e8, 200), rng.uniform(0, 20, 200)
    done: list[float] = []

    def go(size: float, start: float):
        yield env.timeout(start)
        yield net.transfer((link,), size)
        done.append(env.now)

    for size, start in zip(sizes.tolist(), starts.tolist()):
        env.process(go(size, start))
    env.run(until=env.now + 1e4)
    assert len(done) == 200
    assert link.moved == pytest.approx(float(sizes.sum()), rel=1e-9)


def test_pools_take_the_top_level_kv_blocks_and_search_errors_are_one_line(capsys) -> None:
    cfg = load_config(None, ["kv_cache.num_blocks=600", "disaggregation.link=nvlink4"])
    assert [p.num_blocks for p in build_pools(cfg)] == [600, 600]
    assert main(["disagg-search", "--gpus", "2", "--tp", "1", "--set", "scheduler.name=orca"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "orca" in err
    assert main(["disagg-search", "--gpus", "2", "--start", "0"]) == 2
    assert "--start = 0" in capsys.readouterr().err


def test_scheduler_params_state_their_watermark_and_running_cap() -> None:
    """The engine and the disaggregated cluster read a policy's KV watermark and its cap on running requests
    through `SchedulerParams` (no attribute probing): its fields where it has them, none otherwise."""
    from policies import SCHEDULERS

    for name, (params, _) in SCHEDULERS.items():
        p = params()
        fields = p.model_dump()
        assert p.kv_watermark() == fields.get("watermark", 0.0), name
        cap = fields.get("max_num_seqs", fields.get("max_batch_size", fields.get("batch_size")))
        assert p.step_limits(4096)[1] == cap, name
    custom = SCHEDULERS["sarathi"][0](watermark=0.2, max_num_seqs=7)
    assert (custom.kv_watermark(), custom.step_limits(4096)[1]) == (0.2, 7)


def test_replica_state_hand_off_and_receive() -> None:
    """Disaggregation moves requests between instances through `ReplicaState`: a prefill instance hands
    requests off (they stop running there, their KV stays until released), a decode instance receives them."""
    from policies.kv_cache import BlockManager
    from policies.state import ReplicaState, Requests

    n = 4
    req = Requests(np.zeros(n), np.full(n, 32), np.full(n, 8), np.zeros(n, dtype=np.int64))
    prefill, decode = (ReplicaState(i, req, BlockManager(req, 64, 16), 4096) for i in (0, 1))
    for rid in range(3):
        prefill.enqueue(rid)
        prefill.start(rid)
        prefill.kv.grow_to(rid, 32)  # two blocks of 16
    prefill.hand_off([0, 2])
    assert prefill.running == [1] and prefill.kv.available == 64 - 6
    prefill.release_handed(0)
    decode.receive(0)
    assert prefill.kv.available == 64 - 4 and decode.running == [0]
