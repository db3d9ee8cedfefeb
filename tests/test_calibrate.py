"""Calibration: the fit recovers a synthetic device's known efficiencies and overheads, profiles round-trip
and fail clearly, the cost model applies measured surfaces (and another GPU's profile by the what-if
rule), and the whole `servesim calibrate` pipeline runs on CPU with tiny shapes."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from calibrate.fit import fit_profile, layer_kernels, spikes, step_calls
from calibrate.microbench import _decode_shape, gemm_shapes, operators_at, wave_boundaries
from calibrate.records import NAMED_KINDS, PAGED_ENGINE
from hardware.catalog import get_gpu, get_interconnect, get_model
from hardware.cost import CostModel, StepCost, peak_flops
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.operators import StepShape, gemm_operator
from hardware.profile import DEFAULT_PROFILE, AttentionSurface, Profile
from hardware.profiles import load_profile, packaged_profile, resolve_profile
from hardware.routing import RoutingModel, expected_distinct

GPU = get_gpu("h100")
LAUNCH = 1.2e-6  # the synthetic device's GPU time per kernel (not the default's 1.5 us)


def true_gemm(m: float, k: int, n: int) -> float:
    """Fraction of the roofline: compute at 0.75 m / (m + 16) of peak, memory at 0.8 (monotone times)."""
    flops, nbytes = 2.0 * m * k * n, k * n * 2 + (m * k + m * n) * 2
    roof = max(flops / GPU.bf16_flops, nbytes / GPU.hbm_bandwidth)
    return roof / max(flops / (GPU.bf16_flops * 0.75 * m / (m + 16.0)), nbytes / (GPU.hbm_bandwidth * 0.8))


def true_memory(nbytes: float) -> float:
    return 0.8 * nbytes / (nbytes + 2e6)


def true_attention(x: float, y: float) -> float:
    return 0.6 * x / (x + 64.0) * (0.5 + 0.5 * y / (y + 8.0))


def synthetic_raw(noise: float, seed: int = 0) -> dict:
    """Microbenchmark records of a hidden roofline device: roofline / efficiency + kernels x launch,
    times a lognormal noise of `noise`; whole steps from known overheads."""
    rng = np.random.default_rng(seed)
    jitter = lambda: float(np.exp(rng.normal(0.0, noise)))  # noqa: E731
    dep = Deployment.build("tiny-llama", GPU)
    records = []
    for k, n in gemm_shapes([dep]):
        for m in (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536):
            flops, nbytes = 2.0 * m * k * n, k * n * 2 + (m * k + m * n) * 2
            roof = max(flops / GPU.bf16_flops, nbytes / GPU.hbm_bandwidth)
            records.append({"op": "gemm", "kind": "gemm", "k": k, "n": n, "m": m, "flops": flops, "bytes": nbytes,
                            "kernels": 1, "seconds": (roof / true_gemm(m, k, n) + LAUNCH) * jitter()})
    for m in (1, 16, 256, 4096, 65536):
        for name, op in operators_at(dep, _decode_shape(m)).items():
            if op.kind in NAMED_KINDS and op.bytes:
                t = op.bytes / GPU.hbm_bandwidth / true_memory(op.bytes) + op.kernels * LAUNCH
                records.append({"op": name, "kind": op.kind, "flops": op.flops, "bytes": op.bytes,
                                "kernels": op.kernels, "seconds": t * jitter(), "rows": m})
    for b in (1, 4, 16, 64):
        for ctx in (64, 512, 4096):
            op = operators_at(dep, StepShape.build(decode=[ctx - 1] * b))["attention_decode"]
            roof = max(op.flops / peak_flops(dep, op.kind), op.bytes / GPU.hbm_bandwidth)
            records.append({"op": op.name, "kind": op.kind, "flops": op.flops, "bytes": op.bytes, "kernels": op.kernels,
                            "x": b, "y": ctx, "with_gather": False, "kv_access": "paged", "heads": dep.heads_per_gpu,
                            "kv_heads": dep.kv_heads_per_gpu, "head_dim": dep.model.head_size,
                            "seconds": (roof / true_attention(b, ctx) + op.kernels * LAUNCH) * jitter()})
    link = get_interconnect(GPU.intra_node_link)
    for size in (2 ** 12, 2 ** 18, 2 ** 24, 2 ** 28):
        moved = size * 2 * (2 - 1) / 2
        t = 2 * link.latency + moved / link.bandwidth / true_memory(moved)
        records.append({"op": "all-reduce", "kind": "all-reduce", "ranks": 2, "comm_bytes": float(size),
                        "seconds": t * jitter()})
    records.append({"op": "dispatch", "kind": "collective-dispatch", "ranks": 2, "seconds": 30e-6,
                    "kernel_seconds": 9e-6})
    # Whole steps: eager host-bound at 20 us per kernel plus 1 ms + 10 us per request; graphs 0.5 ms + 5 us;
    # both 0.02 us per KV token held, outside the GPU's window (`gpu_seconds`).
    truth = DEFAULT_PROFILE.overheads.model_copy(update={"launch_eager": 20e-6, "launch_graph": LAUNCH,
                                                         "step_eager": 1e-3, "step_eager_per_request": 10e-6,
                                                         "step_graph": 5e-4, "step_graph_per_request": 5e-6,
                                                         "step_per_kv_token": 2e-8, "launch_collective": 45e-6,
                                                         "stream_gap": 1.5e-6, "step_mixed": 3e-4,
                                                         "step_piecewise": 9e-4, "step_piecewise_per_request": 10e-6})
    steps = []
    for layers in (2, 4):
        spec = get_model("tiny-llama").model_copy(update={"num_hidden_layers": layers})
        for b, ctx in ((1, 63), (8, 63), (64, 63), (256, 63), (8, 4095), (64, 2047)):
            shape = StepShape.build(decode=[ctx] * b)
            k_layer, k_other = layer_kernels(spec, shape, GPU)
            kv = truth.step_per_kv_token * shape.kv_tokens
            dispatch = truth.launch_eager * (k_layer * layers + k_other)
            outside = (truth.step_eager + truth.step_eager_per_request * b) * jitter() + kv
            steps.append({"model": "tiny-llama", "layers": layers, "execution": "eager", "requests": b,
                          "kv_tokens": shape.kv_tokens, "shape": shape.to_dict(), "seconds": outside + dispatch,
                          "gpu_seconds": dispatch})
            overhead = truth.step_graph + truth.step_graph_per_request * b
            steps.append({"model": "tiny-llama", "layers": layers, "execution": "graph", "requests": b,
                          "kv_tokens": shape.kv_tokens, "shape": shape.to_dict(), "truth_overhead": overhead,
                          "truth_kv": kv})
        for b in (1, 8):  # a prefill chunk beside decodes: two attention calls, `step_mixed` more host time
            shape = StepShape.build(prefill=[32], decode=[63] * b)
            dispatch = truth.launch_eager * step_calls(spec, shape, GPU)[0]
            outside = truth.step_eager + truth.step_eager_per_request * (b + 1) + truth.step_mixed
            steps.append({"model": "tiny-llama", "layers": layers, "execution": "eager", "requests": b + 1,
                          "kv_tokens": shape.kv_tokens, "shape": shape.to_dict(), "gpu_seconds": dispatch,
                          "seconds": outside * jitter() + truth.step_per_kv_token * shape.kv_tokens + dispatch})
            # the same step replayed as piecewise graphs: the eager pass's inputs, the pieces and their seams
            steps.append({"model": "tiny-llama", "layers": layers, "execution": "graph", "requests": b + 1,
                          "kv_tokens": shape.kv_tokens, "shape": shape.to_dict(),
                          "truth_overhead": jitter() * (truth.step_piecewise
                                                        + truth.step_piecewise_per_request * (b + 1)),
                          "truth_kv": truth.step_per_kv_token * shape.kv_tokens})
    # The same short steps as TP=2 ranks, eager: each collective costs the host `launch_collective` beyond a
    # kernel's dispatch (more than one NCCL call alone: the `collective-dispatch` record's 21 us).
    for layers in (2, 4):
        spec = get_model("tiny-llama").model_copy(update={"num_hidden_layers": layers})
        for b in (1, 8, 64, 256):
            shape = StepShape.build(decode=[63] * b)
            kernels, collectives = step_calls(spec, shape, GPU, tp=2)
            dispatch = (truth.launch_eager * kernels + truth.launch_collective * collectives) * jitter()
            steps.append({"model": "tiny-llama", "layers": layers, "tp": 2, "execution": "eager", "requests": b,
                          "kv_tokens": shape.kv_tokens, "shape": shape.to_dict(), "gpu_seconds": dispatch,
                          "seconds": dispatch + truth.step_eager})
    for s in steps:  # the synthetic device is the backend with its paged and fused kernels
        s.update(PAGED_ENGINE)
    return {"records": records, "fixed": {"graph_kernel_seconds": LAUNCH, "stream_gap_seconds": truth.stream_gap},
            "steps": steps, "truth": truth}


def _finish_graph_steps(raw: dict, profile: Profile) -> None:
    """Graph steps' wall = true overhead + their GPU time on the device (priced with the true surfaces)."""
    for s in raw["steps"]:
        if s["execution"] == "graph":
            spec = get_model("tiny-llama").model_copy(update={"num_hidden_layers": s["layers"]})
            priced = CostModel(Deployment.build(spec, GPU), profile, cuda_graphs=True).price(
                StepShape.from_dict(s["shape"]))
            s["gpu_seconds"] = sum(priced.stage_seconds) + s["truth_overhead"] / 2  # half its overhead inside
            s["seconds"] = s.pop("truth_overhead") + sum(priced.stage_seconds) + s.pop("truth_kv")


@pytest.fixture(scope="module")
def fitted() -> tuple[dict, Profile]:
    exact = synthetic_raw(noise=0.0)
    _finish_graph_steps(exact, fit_profile({**exact, "steps": []}, GPU, {}))
    noisy = synthetic_raw(noise=0.02, seed=1)
    rng = np.random.default_rng(2)
    for s, e in zip(noisy["steps"], exact["steps"]):
        if s["execution"] == "graph":
            s.pop("truth_overhead"), s.pop("truth_kv")
            s["seconds"] = e["seconds"] * float(np.exp(rng.normal(0.0, 0.02)))
            s["gpu_seconds"] = e["gpu_seconds"]
    return noisy, fit_profile(noisy, GPU, {"source": "synthetic"})


def test_fit_recovers_gemm_efficiencies(fitted) -> None:
    """Efficiencies come back where the kernel's busy time is not buried under its fixed cost; the time
    (roofline / efficiency + launch) comes back everywhere, within the noise."""
    _, profile = fitted
    checked = 0
    for g in profile.gemm:
        m = np.array(g.m)
        roof = np.maximum(2.0 * m * g.k * g.n / GPU.bf16_flops,
                          (g.k * g.n * 2 + m * (g.k + g.n) * 2) / GPU.hbm_bandwidth)
        want = np.array([true_gemm(x, g.k, g.n) for x in m])
        assert np.allclose(roof / np.array(g.efficiency) + LAUNCH, roof / want + LAUNCH, rtol=0.08), (g.k, g.n)
        busy = roof / want > 2 * LAUNCH
        checked += int(busy.sum())
        assert np.allclose(np.array(g.efficiency)[busy], want[busy], rtol=0.1), (g.k, g.n)
    assert checked >= 5


def test_fit_recovers_operator_and_collective_curves(fitted) -> None:
    _, profile = fitted
    for name, curve in profile.operators.items():
        sizes = np.array(curve.sizes)
        busy = sizes / GPU.hbm_bandwidth / np.array([true_memory(b) for b in sizes]) > 4 * LAUNCH
        want = np.array([true_memory(b) for b in sizes[busy]])
        assert busy.any() and np.allclose(np.array(curve.efficiency)[busy], want, rtol=0.1), name
    (coll,) = profile.collectives
    assert coll.kind == "all-reduce" and coll.ranks == 2
    big = np.array(coll.curve.sizes) > 1e5  # where bandwidth, not latency, sets the time
    assert np.allclose(np.array(coll.curve.efficiency)[big], [true_memory(s) for s in np.array(coll.curve.sizes)[big]],
                       rtol=0.1)


def test_fit_recovers_attention_surface(fitted) -> None:
    _, profile = fitted
    (surface,) = profile.attention
    dep = Deployment.build("tiny-llama", GPU)
    checked = 0
    for i, x in enumerate(surface.x):
        for j, y in enumerate(surface.y):
            op = operators_at(dep, StepShape.build(decode=[int(y) - 1] * int(x)))["attention_decode"]
            if op.bytes / GPU.hbm_bandwidth / true_attention(x, y) > 4 * op.kernels * LAUNCH:  # not launch-bound
                checked += 1
                assert surface.efficiency[i][j] == pytest.approx(true_attention(x, y), rel=0.1)
    assert checked >= 3


def test_fit_recovers_overheads(fitted) -> None:
    raw, profile = fitted
    truth, got = raw["truth"], profile.overheads
    assert got.launch_graph == LAUNCH
    assert got.launch_eager == pytest.approx(truth.launch_eager, rel=0.1)
    assert got.step_eager == pytest.approx(truth.step_eager, rel=0.25)
    assert got.step_eager_per_request == pytest.approx(truth.step_eager_per_request, rel=0.25)
    assert got.step_graph == pytest.approx(truth.step_graph, rel=0.25)
    assert got.step_graph_per_request == pytest.approx(truth.step_graph_per_request, rel=0.25)
    assert got.step_per_kv_token == pytest.approx(truth.step_per_kv_token, rel=0.25)
    assert got.launch_collective == pytest.approx(truth.launch_collective, rel=0.1)  # from the TP steps
    assert got.stream_gap == truth.stream_gap
    assert got.step_mixed == pytest.approx(truth.step_mixed, rel=0.25)
    assert got.step_piecewise == pytest.approx(truth.step_piecewise, rel=0.1)  # from the graph steps with chunks
    assert got.step_piecewise_per_request == got.step_eager_per_request  # they build the eager pass's inputs


def test_eager_steps_pay_the_stream_gap_and_mixed_steps_their_second_attention_call(fitted) -> None:
    """Eager: each kernel's GPU time grows by `stream_gap` (graph replays do not), and a step with a prefill
    chunk beside decodes costs the host `step_mixed` more; another host's overheads keep this GPU's own."""
    _, profile = fitted
    ovh = profile.overheads
    bare = profile.model_copy(update={"overheads": ovh.model_copy(update={"stream_gap": 0.0, "step_mixed": 0.0})})
    dep = Deployment.build("tiny-llama", GPU)
    decode, mixed = StepShape.build(decode=[4000] * 64), StepShape.build(prefill=[32], decode=[63] * 8)

    def gpu_time(p: Profile, shape: StepShape, graphs: bool) -> tuple[float, StepCost]:
        cost = CostModel(dep, p, cuda_graphs=graphs).price(shape)
        return sum(r.seconds for r in cost.breakdown), cost

    (with_gap, cost), (without, _) = gpu_time(profile, decode, False), gpu_time(bare, decode, False)
    assert with_gap - without == pytest.approx(cost.kernels * ovh.stream_gap)
    assert gpu_time(profile, decode, True)[0] == pytest.approx(gpu_time(bare, decode, True)[0])
    extra = gpu_time(profile, mixed, False)[1].overhead_seconds - gpu_time(bare, mixed, False)[1].overhead_seconds
    assert extra == pytest.approx(ovh.step_mixed)
    alone = StepShape.build(prefill=[32])
    assert gpu_time(profile, alone, False)[1].overhead_seconds == gpu_time(bare, alone, False)[1].overhead_seconds
    other_host = DEFAULT_PROFILE.overheads
    moved = ovh.with_host_of(other_host)
    assert moved.launch_eager == other_host.launch_eager and moved.step_eager == other_host.step_eager
    assert (moved.launch_graph, moved.stream_gap) == (ovh.launch_graph, ovh.stream_gap)


def test_collective_dispatch_without_tp_steps() -> None:
    """Without whole TP steps, an eager collective's host cost is one NCCL call's dispatch beyond a plain
    kernel's (the collectives suite's `collective-dispatch` record: 30 - 9 us)."""
    raw = synthetic_raw(noise=0.0)
    raw["steps"] = [s for s in raw["steps"] if s.get("tp", 1) == 1 and s["execution"] == "eager"]
    assert fit_profile(raw, GPU, {}).overheads.launch_collective == pytest.approx(21e-6)


def test_wave_boundaries_and_attention_grid() -> None:
    """Grid points on both sides of each wave boundary: 8 KV heads on 132 SMs spill at 17, 34, 50 ...
    sequences; the attention suite measures them beside its powers of two."""
    assert wave_boundaries(8, 132) == [16, 33, 49, 66, 82, 99, 115, 132]
    assert wave_boundaries(32, 132, waves=2) == [4, 8] and wave_boundaries(200, 132, waves=1) == []
    torch = pytest.importorskip("torch")
    from calibrate.microbench import Bench, Settings

    small = GPU.model_copy(update={"sm_count": 8})  # tiny-llama: 2 KV heads, 8 heads: boundaries every 4 / 1
    settings = Settings(gemm_m=(1,), rows=(1,), prefill_q=(4, 300), prefill_ratio=(1,), decode_b=(1, 12),
                        decode_ctx=(16, 32), max_kv=4096, pool_bytes=1e6, waves=True)
    bench = Bench(torch.device("cpu"), small, settings, lambda m: None)
    records = bench.attention(Deployment.build("tiny-llama", small))
    grid = [r for r in records if not r.get("ragged")]
    assert {r["x"] for r in grid if r["kind"] == "attention-decode"} == {1, 4, 5, 8, 9, 12}
    assert {r["x"] for r in grid if r["kind"] == "attention-prefill"} == {4, 128, 129, 256, 257, 300}


def test_host_overheads_in_priced_steps(fitted) -> None:
    """The KV tokens held add host time to any step; eager TP steps pay each NCCL call's dispatch."""
    _, profile = fitted
    ovh = profile.overheads
    dep = Deployment.build("tiny-llama", GPU)
    short, long = StepShape.build(decode=[15] * 4), StepShape.build(decode=[3999] * 4)
    graph = CostModel(dep, profile, cuda_graphs=True)
    gap = graph.price(long).overhead_seconds - graph.price(short).overhead_seconds
    assert gap == pytest.approx(ovh.step_per_kv_token * (long.kv_tokens - short.kv_tokens))
    tp2 = Deployment.build("tiny-llama", GPU, tp=2)
    tiny = StepShape.build(prefill=[8])  # host-bound: the stage time is the host's dispatch
    base = CostModel(tp2, profile.model_copy(update={"overheads": ovh.model_copy(update={"launch_collective": 0.0})}),
                     cuda_graphs=False).price(tiny)
    with_nccl = CostModel(tp2, profile, cuda_graphs=False).price(tiny)
    calls = sum(r.count for r in with_nccl.breakdown if r.kind in ("all-reduce", "all-gather"))
    assert calls >= 2 * tp2.model.num_hidden_layers
    assert with_nccl.seconds - base.seconds == pytest.approx(calls * ovh.launch_collective)


def test_cost_model_reproduces_a_measured_gemm(fitted) -> None:
    """A GEMM measured at (M, K, N) is priced at its measured time (noise-free device)."""
    raw = synthetic_raw(noise=0.0)
    profile = fit_profile({**raw, "steps": []}, GPU, {})
    dep = Deployment.build("tiny-llama", GPU)
    model = CostModel(dep, profile, cuda_graphs=False)
    m = 256
    cost = model.price(StepShape.build(prefill=[m]))
    row = next(r for r in cost.breakdown if r.name == "down_proj")
    op = operators_at(dep, StepShape.build(prefill=[m]))["down_proj"]
    measured = next(r["seconds"] for r in raw["records"]
                    if r["kind"] == "gemm" and (r["k"], r["n"]) == op.dims and r["m"] == m)
    # measured in a graph; an eager step starts the kernel `stream_gap` later
    assert row.seconds / row.count == pytest.approx(measured + profile.overheads.stream_gap, rel=0.02)


def test_cost_model_reproduces_a_measured_grouped_gemm() -> None:
    """Grouped expert GEMMs measured at several token counts (true efficiency rising with the rows per expert)
    are fitted per expert shape and priced back at their measured times."""
    dep = Deployment.build("tiny-moe", GPU)
    model_k = dep.model.experts_per_token

    def true_eff(m: float) -> float:
        return 0.2 + 0.6 * m / (m + 512.0)

    raw = synthetic_raw(noise=0.0)
    measured = {}
    for tokens in (1, 8, 64, 512, 4096):
        active = expected_distinct(RoutingModel().probabilities(8, model_k), tokens).sum()
        for name, k, n in (("moe_gate_up", 256, 256), ("moe_down", 128, 256)):
            op = gemm_operator(name, tokens * model_k, k, n, 2, 2, weight_reads=active, expert=True)
            roof = max(op.flops / GPU.bf16_flops, op.bytes / GPU.hbm_bandwidth)
            seconds = roof / true_eff(tokens * model_k) + LAUNCH
            measured[name, tokens] = seconds
            raw["records"].append({"op": name, "kind": "grouped-gemm", "flops": op.flops, "bytes": op.bytes,
                                   "kernels": 1, "seconds": seconds, "k": op.dims[0], "n": op.dims[1],
                                   "m": tokens * model_k, "experts": 8, "tokens": tokens})
    profile = fit_profile({**raw, "steps": []}, GPU, {})
    assert len(profile.grouped_gemm) == 2
    model = CostModel(dep, profile, cuda_graphs=False)
    for tokens in (8, 512):
        cost = model.price(StepShape.build(prefill=[tokens]))
        for name in ("moe_gate_up", "moe_down"):
            row = next(r for r in cost.breakdown if r.name == name)
            assert row.seconds / row.count == pytest.approx(measured[name, tokens] + profile.overheads.stream_gap,
                                                            rel=0.02)


def test_profile_round_trips_through_json(fitted, tmp_path) -> None:
    _, profile = fitted
    path = tmp_path / "p.json"
    path.write_text(profile.model_dump_json())
    again = load_profile(path)
    assert again == profile.merged_over(DEFAULT_PROFILE)
    shape = StepShape.build(prefill=[300], decode=[100] * 7)
    dep = Deployment.build("tiny-llama", GPU)
    assert CostModel(dep, again).price(shape).seconds == CostModel(dep, profile).price(shape).seconds


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    (json.dumps({"gpu": "x", "efficiency": {"gemm": {"compute": 2.0}},
                 "overheads": DEFAULT_PROFILE.overheads.model_dump()}), "efficiency.gemm.compute"),
    (json.dumps({"version": 9, "gpu": "x", "efficiency": {}, "overheads": {}}), "version"),
    (json.dumps({"version": 2, "gpu": "x", "efficiency": {}, "overheads": DEFAULT_PROFILE.overheads.model_dump(),
                 "attention": [{"kind": "attention-decode", "heads": 8, "kv_heads": 2, "head_dim": 32, "x": [1.0],
                                "y": [64.0], "efficiency": [[0.5]]}]}), "include the K/V gather"),
])
def test_bad_profile_file_gives_one_line_error(tmp_path, content, needle) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ServesimError) as exc:
        load_profile(path)
    lines = str(exc.value).splitlines()  # one line per wrong field, each naming the file
    assert all("bad.json" in line for line in lines) and needle in lines[0]


def test_resolve_profile_names() -> None:
    assert resolve_profile("datasheet", "h100-sxm-80gb") is None and resolve_profile(None, "h100-sxm-80gb") is None
    assert resolve_profile("calibrated", "h100-sxm-80gb") == packaged_profile("h100-sxm-80gb")
    assert resolve_profile("h100", "h200-sxm-141gb").gpu == "h100-sxm-80gb"
    with pytest.raises(ServesimError, match="neither a profile JSON file nor a catalog GPU id"):
        resolve_profile("no-such-thing", "h100-sxm-80gb")
    with pytest.raises(ServesimError, match="no committed profile for GPU 'l40s-48gb'"):
        resolve_profile("l40s", "h100-sxm-80gb")


def test_profile_files_keep_the_gpu_and_the_engine_in_their_own_sections(tmp_path) -> None:
    """Version 4 files split the fixed costs: `kernel_gaps` (the GPU's) and `engine` (the host's, named); they
    read back to the same profile, and version 3 files with one `overheads` section still load."""
    h100 = packaged_profile("h100-sxm-80gb")
    data = json.loads(h100.model_dump_json())
    assert "overheads" not in data and set(data["kernel_gaps"]) == {"launch_graph", "stream_gap"}
    assert data["engine"]["name"] == h100.engine_name and "step_graph" in data["engine"]
    assert "launch_graph" not in data["engine"] and Profile.model_validate(data) == h100
    old = {k: v for k, v in data.items() if k not in ("kernel_gaps", "engine", "engine_name")}
    old |= {"version": 3, "overheads": h100.overheads.model_dump()}
    path = tmp_path / "v3.json"
    path.write_text(json.dumps(old))
    assert load_profile(path).overheads == h100.overheads


def test_a_gpu_priced_under_another_engine() -> None:
    """`engine` swaps the host's costs and keeps the GPU's kernels and kernel gaps: the H100's calibrated
    kernels under the documented defaults' engine price every operator the same, and the step's overhead as
    the defaults do."""
    mixed = resolve_profile("calibrated", "h100-sxm-80gb", engine="datasheet")
    h100 = packaged_profile("h100-sxm-80gb")
    assert mixed.engine_name == DEFAULT_PROFILE.engine_name and mixed.gemm == h100.gemm
    assert mixed.overheads.launch_graph == h100.overheads.launch_graph
    assert mixed.overheads.step_graph == DEFAULT_PROFILE.overheads.step_graph != h100.overheads.step_graph
    dep = Deployment.build("llama-3-8b", "h100")
    shape = StepShape.build(decode=[2048] * 64)
    a, b = (CostModel(dep, p).price(shape) for p in (h100, mixed))
    assert [o.seconds for o in a.breakdown] == [o.seconds for o in b.breakdown]
    assert b.overhead_seconds == pytest.approx(DEFAULT_PROFILE.overheads.step_graph
                                               + DEFAULT_PROFILE.overheads.step_graph_per_request * 64)
    assert resolve_profile(None, "h100-sxm-80gb", engine="h100").overheads.step_graph == h100.overheads.step_graph
    with pytest.raises(ServesimError, match="^engine: 'no-such-thing' is neither"):
        resolve_profile("calibrated", "h100-sxm-80gb", engine="no-such-thing")


@pytest.mark.parametrize("target", ["h200", "a100"])
def test_borrowed_profile_moves_the_roofline_part_and_keeps_the_excess(target) -> None:
    """What-if rule: each kernel's time on the profiled GPU less its roofline there is kept (scaled by the SM
    counts' ratio); the roofline part moves to this GPU's datasheet peaks."""
    h100 = packaged_profile("h100-sxm-80gb")
    assert h100 is not None and h100.gemm and h100.attention
    src, dst = get_gpu("h100"), get_gpu(target)
    a = CostModel(Deployment.build("llama-3-8b", src), h100)
    b = CostModel(Deployment.build("llama-3-8b", dst), h100)
    checked = 0
    for shape in (StepShape.build(decode=[1000] * 4), StepShape.build(prefill=[4000])):
        ra = {r.name: r for r in a.price(shape).breakdown}
        priced = b.price(shape)  # per kernel a graph's start-up, and an eager step's stream gap
        launch = h100.overheads.launch_graph + (h100.overheads.stream_gap if priced.execution == "eager" else 0.0)
        for r in priced.breakdown:
            if r.kind in ("gemm", "attention-prefill", "attention-decode", "elementwise"):
                dep = b.dep
                roof = lambda g, x: max(x.flops / peak_flops(dep, x.kind, g), x.bytes / g.hbm_bandwidth)  # noqa: E731
                kernels = r.count * next(op.kernels for op in b.compiled.operators if op.name == r.name)
                t_src, t_dst = ra[r.name].seconds - kernels * launch, r.seconds - kernels * launch
                want = roof(dst, r) + (t_src - roof(src, ra[r.name])) * src.sm_count / dst.sm_count
                assert t_dst == pytest.approx(want, rel=1e-6), r.name
                checked += 1
    assert checked >= 10
    # a kernel at its roofline speeds up by the datasheet ratio, a latency-bound one by less
    decode = {r.name: r for r in b.price(StepShape.build(decode=[1000])).breakdown}
    src_decode = {r.name: r for r in a.price(StepShape.build(decode=[1000])).breakdown}
    speedup = {n: src_decode[n].seconds / decode[n].seconds for n in ("gate_up_proj", "attention_decode")}
    if target == "h200":
        assert 1.0 < speedup["attention_decode"] < speedup["gate_up_proj"] < dst.hbm_bandwidth / src.hbm_bandwidth


def test_attention_surface_interpolates_in_log_space() -> None:
    s = AttentionSurface(kind="attention-decode", heads=4, kv_heads=1, head_dim=64, x=(1, 100), y=(10, 1000),
                         efficiency=((0.1, 0.2), (0.3, 0.4)))
    assert s.at(1, 10) == pytest.approx(0.1) and s.at(100, 1000) == pytest.approx(0.4)
    # the geometric middle is the geometric mean of the corners
    assert s.at(10, 100) == pytest.approx((0.1 * 0.2 * 0.3 * 0.4) ** 0.25)
    assert s.at(1e6, 1e-3) == pytest.approx(0.3)  # clamped to the grid
    # Within one wave of blocks the kernel's time is flat while its work grows: efficiency in proportion to
    # the sequences. Interpolating log efficiency prices every point between two such grid points exactly
    # (linear interpolation of the efficiency priced 300 queries between 256 and 512 5% fast).
    wave = AttentionSurface(kind="attention-prefill", heads=32, kv_heads=8, head_dim=128, x=(256, 512), y=(1, 64),
                            efficiency=((0.2, 0.3), (0.4, 0.6)))
    for x in (300, 384, 450):
        assert wave.at(x, 1) == pytest.approx(0.2 * x / 256) and wave.at(x, 64) == pytest.approx(0.3 * x / 256)
    with pytest.raises(ValueError, match="efficiency must be 2 rows of 2 values"):
        AttentionSurface(kind="attention-decode", heads=4, kv_heads=1, head_dim=64, x=(1, 100), y=(10, 1000),
                         efficiency=((0.1, 0.2),))


def test_committed_profiles_beat_the_datasheet_on_their_reference_steps() -> None:
    """The committed profiles against the committed whole-model measurements of the backend each was fitted
    to: the H100's and H200's (paged, fused, piecewise graphs) and the kept ones (the backend before)."""
    from calibrate.validate import compare, read_measurements

    m = "calibrate/measurements"
    for gpu, steps_csv, profile in (
            ("h100-sxm-80gb", f"{m}/h100-sxm-80gb_paged_piecewise_llama-3-8b_steps.csv",
             packaged_profile("h100-sxm-80gb")),
            ("h100-sxm-80gb", f"{m}/h100-sxm-80gb_llama-3-8b_steps.csv",
             load_profile(f"{m}/h100-sxm-80gb_gather_profile.json")),
            ("h200-sxm-141gb", f"{m}/h200-sxm-141gb_paged_llama-3-8b_steps.csv", packaged_profile("h200-sxm-141gb")),
            ("h200-sxm-141gb", f"{m}/h200-sxm-141gb_llama-3-8b_steps.csv",
             load_profile(f"{m}/h200-sxm-141gb_gather_profile.json"))):
        steps, table = compare(read_measurements(steps_csv), gpu, profile)
        assert steps["error"].abs().mean() < 0.5 * steps["error_datasheet"].abs().mean()
        prefill = table[table.category == "prefill"]
        assert float(prefill["mape"].iloc[0]) < 10.0
        assert not math.isnan(float(table["mape"].max()))


def test_quick_calibration_pipeline_on_cpu(tmp_path, capsys) -> None:
    """`servesim calibrate --quick`, `reference --quick` and `validate` end to end on the CPU."""
    pytest.importorskip("torch")
    from servesim.cli import main

    prof, raw, steps = tmp_path / "p.json", tmp_path / "raw.json", tmp_path / "steps.csv"
    assert main(["calibrate", "--quick", "--out", str(prof), "--raw", str(raw)]) == 0
    profile = load_profile(prof)
    assert profile.version == 4 and profile.gemm and profile.attention and "rope_kv_write" in profile.operators
    assert {(g.k, g.n, g.experts) for g in profile.grouped_gemm} == {(256, 256, 8), (128, 256, 8)}  # tiny-moe
    assert "kv_gather_decode" in profile.operators and "kv_gather_prefill" in profile.operators
    assert profile.metadata["device"] == "cpu" and profile.metadata["torch"]
    verify = [c for c in profile.metadata["ragged_attention_checks"] if c["queries"] == 5]
    assert {c["seqs"] for c in verify} == {1, 4}  # verifications of 5 tokens in the decode kernel, as checks
    assert {c["kind"] for c in verify} == {"attention-decode"}
    assert all(c["measured"] > 0 and c["predicted"] > 0 for c in verify)
    assert main(["calibrate", "--refit", "--raw", str(raw), "--out", str(tmp_path / "again.json")]) == 0
    assert load_profile(tmp_path / "again.json").gemm == profile.gemm
    ref_raw = tmp_path / "ref_raw.json"
    assert main(["calibrate", "reference", "--quick", "--out", str(steps), "--raw", str(ref_raw)]) == 0
    capsys.readouterr()
    overheads = json.loads(ref_raw.read_text())  # the overhead fit's steps, timed in the reference's rounds
    assert {"graph_kernel_seconds", "stream_gap_seconds"} <= overheads["fixed"].keys()
    assert len(overheads["steps"]) == 7 and {s["layers"] for s in overheads["steps"]} == {4}
    assert main(["calibrate", "--refit", "--raw", str(raw), "--later", str(ref_raw), "--out", str(prof)]) == 0
    capsys.readouterr()
    assert main(["calibrate", "validate", str(steps), "--gpu", "h100", "--profile", str(prof),
                 "--out", str(tmp_path / "val")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 7 and {c["category"] for c in report["categories"]} == {"prefill", "decode", "mixed"}
    assert (tmp_path / "val" / "predicted_vs_measured.png").stat().st_size > 0


@pytest.mark.parametrize("argv,needle", [
    (["calibrate", "--quick", "--out", "x.json", "--suites", "gemm,magic"], "--suites: unknown ['magic']"),
    (["calibrate", "--quick", "--out", "x.json", "--tp", "one"], "--tp = 'one'"),
    (["calibrate", "--quick", "--out", "x.json", "--tp", "0"], "--tp = '0'"),
    (["calibrate", "--quick", "--out", "x.json", "--models", "mixtral-8x7b"], "name at least one dense model"),
    (["calibrate", "--refit", "--out", "x.json"], "--raw = None"),
    (["calibrate", "validate", "missing.csv", "--gpu", "h100"], "measurements: no such file 'missing.csv'"),
    (["calibrate", "validate", "x.csv"], "--gpu: required"),
    (["calibrate", "reference", "--quick", "--out", "x.csv", "--tp", "1,2"], "--tp = '1,2': reference runs one"),
])
def test_calibrate_cli_errors(argv, needle, capsys) -> None:
    pytest.importorskip("torch")
    from servesim.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_bad_raw_and_measurement_files_give_one_line_errors(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    from servesim.cli import main

    raw, steps = tmp_path / "raw.json", tmp_path / "steps.csv"
    raw.write_text("{oops")
    steps.write_text('model,category,execution,tp,shape,seconds\nllama-3-8b,decode,graph,1,"{bad",0.01\n')
    assert main(["calibrate", "--refit", "--raw", str(raw), "--out", str(tmp_path / "p.json")]) == 2
    assert main(["calibrate", "validate", str(steps), "--gpu", "h100"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "raw.json:1:2: not valid JSON" in err[0] and "row 1: shape = '{bad'" in err[1]


@pytest.mark.parametrize("break_it, needle", [
    (lambda raw: raw["records"][3].pop("m"), r"records\[3\]\.m: Field required"),
    (lambda raw: raw["records"][3].update(seconds="fast"), r"records\[3\]\.seconds: Input should be a valid number"),
    (lambda raw: raw["records"][5].update(kind="gemv"), r"records\[5\]\.kind = 'gemv'; allowed: gemm, "),
    (lambda raw: raw["steps"][0].pop("layers"), r"steps\[0\]\.layers: Field required"),
    (lambda raw: raw["steps"][1].update(execution="cuda"), r"steps\[1\]\.execution: Input should be 'graph' or"),
    (lambda raw: raw["fixed"].pop("graph_kernel_seconds"), r"fixed\.graph_kernel_seconds: Field required"),
])
def test_a_bad_raw_record_is_a_one_line_error_naming_it(break_it, needle) -> None:
    """The fit reads typed records (`calibrate.records`): a record it cannot read is named, not a KeyError."""
    raw = synthetic_raw(noise=0.0)
    raw.pop("truth")
    raw["steps"] = [s for s in raw["steps"] if s["execution"] == "eager"]  # (graph steps' times come later)
    fit_profile(raw, GPU, {})  # as built, it fits
    assert raw["records"][3]["kind"] == "gemm" and len(raw["steps"]) > 1
    break_it(raw)
    with pytest.raises(ServesimError, match=needle) as info:
        fit_profile(raw, GPU, {})
    assert "\n" not in str(info.value)


def test_attention_timed_with_its_gather_is_refused_by_the_fit(tmp_path, capsys) -> None:
    """Raw files from before profile version 3 timed the K/V gather inside attention: the fit says so."""
    pytest.importorskip("torch")
    from servesim.cli import main

    legacy = synthetic_raw(noise=0.0)
    for r in legacy["records"]:
        r.pop("with_gather", None)
    legacy.pop("truth")
    legacy["steps"] = [s for s in legacy["steps"] if "seconds" in s]  # (graph steps' times come later)
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({**legacy, "gpu": GPU.id, "metadata": {}}))
    assert main(["calibrate", "--refit", "--raw", str(raw), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "timed with their K/V gather" in err[0] and "--later" in err[0]


def test_tensor_parallel_reference_steps_on_cpu(tmp_path, capsys) -> None:
    """`calibrate reference --tp 2`: one Gloo process per rank, rank 0's timings, TP recorded for pricing."""
    pytest.importorskip("torch")
    import pandas as pd

    from servesim.cli import main

    out = tmp_path / "tp2.csv"
    assert main(["calibrate", "reference", "--quick", "--tp", "2", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(df) == 7 and set(df["tp"]) == {2} and (df["seconds"] > 0).all()
    capsys.readouterr()
    assert main(["calibrate", "validate", str(out), "--gpu", "h100", "--profile", "datasheet"]) == 0
    assert json.loads(capsys.readouterr().out)["categories"][0]["tp"] == 2


def test_fast_phase_statistic_and_validation_options(tmp_path, capsys) -> None:
    """Steps are read by their fast phase (10th percentile) where recorded; --overheads swaps the host's
    overheads; --refit --later (--steps) overlays a later run's whole steps and record groups; bad options fail
    in one line."""
    pytest.importorskip("torch")
    from calibrate.steps import StepTiming
    from calibrate.validate import compare
    from servesim.cli import main
    from sim.executor import StepOutcome

    runs = [StepOutcome(seconds=s, execution="eager", gpu_seconds=s - 1e-3) for s in (0.02, 0.03, 0.01, 0.04, 0.05)]
    t = StepTiming.of(runs)
    assert t.seconds == 0.03 and t.seconds_fast == pytest.approx(0.014) and t.gpu_seconds_fast == pytest.approx(0.013)
    shape = json.dumps(StepShape.build(decode=[300] * 4).to_dict())
    df = pd.DataFrame([{"model": "llama-3-8b", "category": "decode", "execution": "graph", "tp": 1, "shape": shape,
                        "seconds": 0.012, "gpu_seconds": 0.011, "seconds_fast": 0.010, "gpu_seconds_fast": 0.009}])
    profile = packaged_profile("h100-sxm-80gb")
    steps, _ = compare(df, "h100-sxm-80gb", profile)
    assert steps["measured"].iloc[0] == 0.010
    steps, _ = compare(df, "h100-sxm-80gb", profile, "median")
    assert steps["measured"].iloc[0] == 0.012
    path = tmp_path / "steps.csv"
    df.to_csv(path, index=False)
    slow = profile.overheads.model_copy(update={"step_graph": 1.0})
    host = tmp_path / "host.json"
    host.write_text(profile.model_copy(update={"overheads": slow}).model_dump_json())
    capsys.readouterr()
    assert main(["calibrate", "validate", str(path), "--gpu", "h100"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["calibrate", "validate", str(path), "--gpu", "h100", "--overheads", str(host)]) == 0
    swapped = json.loads(capsys.readouterr().out)
    assert swapped["categories"][0]["mape"] > base["categories"][0]["mape"] + 1000  # 1 s more per step
    df.drop(columns=["seconds_fast"]).to_csv(path, index=False)
    assert main(["calibrate", "validate", str(path), "--gpu", "h100", "--statistic", "fast"]) == 2
    assert "no seconds_fast column" in capsys.readouterr().err
    raw = synthetic_raw(noise=0.0)
    later = {"records": [{"op": "dispatch", "kind": "collective-dispatch", "ranks": 2, "seconds": 40e-6,
                          "kernel_seconds": 10e-6}],
             "steps": raw.pop("steps")[:4], "metadata": {"command": "later"}}
    for s in later["steps"]:
        s.setdefault("seconds", 0.01)
    first, second = tmp_path / "raw.json", tmp_path / "later.json"
    first.write_text(json.dumps({**raw, "gpu": "h100-sxm-80gb", "metadata": {}, "truth": None}))
    second.write_text(json.dumps(later))
    out = tmp_path / "p.json"
    assert main(["calibrate", "--refit", "--raw", str(first), "--steps", str(second), "--out", str(out)]) == 0
    fitted = load_profile(out)
    assert fitted.overheads.launch_collective == pytest.approx(30e-6)  # the later dispatch record replaced 21 us
    assert fitted.metadata["overlays"] == ["later"]
    (tmp_path / "bad.json").write_text(json.dumps({"steps": []}))
    assert main(["calibrate", "--refit", "--raw", str(first), "--later", str(tmp_path / "bad.json"), "--out",
                 str(out)]) == 2
    assert "--later = " in capsys.readouterr().err


def test_overlay_replaces_only_the_groups_a_later_file_measured(tmp_path) -> None:
    """A later session re-timing one head configuration's attention replaces that surface's records and
    keeps the others; its steps replace the earlier steps only when it has some."""
    from calibrate.cli import _overlay

    def att(heads: int, seconds: float) -> dict:
        return {"op": "attention_decode", "kind": "attention-decode", "heads": heads, "kv_heads": 8, "head_dim": 128,
                "x": 1, "y": 64, "seconds": seconds}

    raw = {"records": [att(32, 1.0), att(32, 1.5), att(16, 2.0)], "steps": [{"layers": 1}], "metadata": {}}
    later = tmp_path / "later.json"
    later.write_text(json.dumps({"records": [att(32, 3.0)], "metadata": {"command": "servesim calibrate x"}}))
    merged = _overlay(raw, str(later))
    assert sorted(r["seconds"] for r in merged["records"]) == [2.0, 3.0]
    assert merged["steps"] == [{"layers": 1}] and merged["metadata"]["overlays"] == ["servesim calibrate x"]


def test_overlay_replaces_steps_of_the_tp_degrees_and_fixed_costs_a_later_file_measured(tmp_path) -> None:
    """A reference session's overhead steps (`reference --raw`) replace the earlier steps of their TP degree
    only, and its fixed costs the earlier ones of the same name."""
    from calibrate.cli import _overlay

    raw = {"records": [], "fixed": {"graph_kernel_seconds": 1e-6, "dispatch_seconds": 5e-6},
           "steps": [{"layers": 16, "tp": 1}, {"layers": 32, "tp": 1}, {"layers": 32, "tp": 2}], "metadata": {}}
    later = tmp_path / "later.json"
    later.write_text(json.dumps({"records": [], "fixed": {"graph_kernel_seconds": 2e-6, "stream_gap_seconds": 1e-6},
                                 "steps": [{"layers": 32, "tp": 1, "new": True}], "metadata": {}}))
    merged = _overlay(raw, str(later))
    assert merged["steps"] == [{"layers": 32, "tp": 2}, {"layers": 32, "tp": 1, "new": True}]
    assert merged["fixed"] == {"graph_kernel_seconds": 2e-6, "dispatch_seconds": 5e-6, "stream_gap_seconds": 1e-6}


def test_tensor_parallel_overhead_steps_on_cpu() -> None:
    """The overhead steps run as TP=2 ranks (Gloo on the CPU): rank 0's records, marked with their TP."""
    pytest.importorskip("torch")
    from calibrate.microbench import tp_overhead_steps

    steps = tp_overhead_steps("tiny-llama", True, "cpu", [1, 2, 3])
    assert steps and {s["tp"] for s in steps} == {2} and {s["execution"] for s in steps} == {"eager"}
    assert {s["layers"] for s in steps} == {2, 4} and all(s["seconds"] > 0 for s in steps)


def _gemm_records(k: int, n: int, times: dict[int, float]) -> list[dict]:
    return [{"op": "gemm", "kind": "gemm", "k": k, "n": n, "m": m, "kernels": 1, "seconds": t,
             "flops": 2.0 * m * k * n, "bytes": k * n * 2 + (m * k + m * n) * 2} for m, t in times.items()]


def test_gemm_spikes_hold_their_own_m_only_and_the_rest_is_priced_as_measured() -> None:
    """cuBLAS picks a kernel per shape: a GEMM of more rows can run faster (M = 320 here, as Llama-3-8B's
    QKV projection on an H200), which the curve keeps; an isolated spike (M = 448, 1.8x both neighbours, as
    its gate/up projection there) prices that M alone (a CUDA graph padded to it runs it), not the M around."""
    times = {1: 17e-6, 64: 17e-6, 256: 21e-6, 320: 33e-6, 384: 27e-6, 385: 29e-6, 448: 287e-6, 512: 36e-6,
             513: 38e-6, 1024: 69e-6, 4096: 270e-6}
    assert spikes(list(times.items())) == {448}
    assert spikes([(1, 1.0), (2, 5.0)]) == set()  # the ends have one neighbour: never a spike
    raw = {"records": _gemm_records(4096, 6144, times), "fixed": {"graph_kernel_seconds": LAUNCH}}
    profile = fit_profile(raw, GPU, {})
    (curve,) = profile.gemm
    assert {447.5, 448, 448.5} <= set(curve.m) and len(curve.m) == len(times) + 2  # the spike, its shoulders
    assert curve.spikes == (448,)
    assert profile.metadata["gemm_spikes"] == [{"k": 4096, "n": 6144, "m": 448, "seconds": 287e-6}]
    model = CostModel(Deployment.build("llama-3-8b", GPU), profile, cuda_graphs=False)  # QKV: 4,096 x 6,144

    def qkv(m: int) -> float:
        row = next(r for r in model.price(StepShape.build(prefill=[m])).breakdown if r.name == "qkv_proj")
        return row.seconds / row.count

    for m in (320, 384, 385, 448, 512, 513):  # as measured, M and M + 1 apart, the spike too
        assert qkv(m) == pytest.approx(times[m], rel=0.01), m
    for m in (400, 447, 449, 500):  # beside it, the line through its neighbours
        assert qkv(m) == pytest.approx(np.exp(np.interp(np.log(m), np.log([385, 512]), np.log([29e-6, 36e-6]))),
                                       rel=0.01), m


def test_kv_gather_curves_per_head_configuration() -> None:
    """Gathering cache rows of one KV head (256 bytes per token and tensor) runs at a fraction of the
    bandwidth that rows of eight reach: each head configuration gets its own curve, and one without a
    measurement takes the curve of the nearest row size."""
    records = []
    for kv_heads, eff in ((8, 0.7), (1, 0.2)):
        dep = Deployment.build("llama-3-70b" if kv_heads == 1 else "llama-3-8b", GPU, tp=8 if kv_heads == 1 else 1,
                               kv_access="gather")
        assert dep.kv_heads_per_gpu == kv_heads
        for ctx in (256, 1024, 4096, 16384):
            for b in (1, 8, 64):
                op = operators_at(dep, StepShape.build(decode=[ctx - 1] * b))["kv_gather_decode"]
                records.append({"op": op.name, "kind": op.kind, "flops": 0.0, "bytes": op.bytes, "kernels": 2,
                                "seconds": op.bytes / GPU.hbm_bandwidth / eff + 2 * LAUNCH, "x": b, "y": ctx,
                                "heads": dep.heads_per_gpu, "kv_heads": kv_heads, "head_dim": 128})
    profile = fit_profile({"records": records, "fixed": {"graph_kernel_seconds": LAUNCH}}, GPU, {})
    assert {(g.kv_heads, g.head_dim) for g in profile.kv_gather} == {(1, 128), (8, 128)}
    for g in profile.kv_gather:
        assert np.allclose(g.curve.efficiency, 0.2 if g.kv_heads == 1 else 0.7, rtol=1e-6)
    shape = StepShape.build(decode=[4095] * 64)
    # Llama-3-8B at TP=4 has 2 KV heads per GPU: unmeasured, nearest to 1
    for model, tp, eff in (("llama-3-8b", 1, 0.7), ("llama-3-70b", 8, 0.2), ("llama-3-8b", 4, 0.2)):
        dep = Deployment.build(model, GPU, tp=tp, kv_access="gather")
        row = next(r for r in CostModel(dep, profile).price(shape).breakdown if r.name == "kv_gather_decode")
        assert row.seconds == pytest.approx(row.bytes / GPU.hbm_bandwidth / eff + 2 * row.count * LAUNCH, rel=1e-3)


def test_step_kernels_cpu_smoke(tmp_path) -> None:
    """`calibrate/step_kernels.py --cpu-smoke`: the step trace's code path, tiny-llama's operators as kernels."""
    pytest.importorskip("torch")
    from calibrate.step_kernels import SHAPES, family, main, union

    assert union([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0
    assert (family("nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT"), family("_decode_kernel"),
            family("_add_rmsnorm_kernel"), family("Memcpy HtoD")) == ("gemm", "attention", "elementwise", "other")
    main(["--cpu-smoke", "--runs", "2", "--out", str(tmp_path / "steps.json")])
    results = json.loads((tmp_path / "steps.json").read_text())
    assert sorted(results) == sorted(f"{name} eager" for name in SHAPES)
    for r in results.values():
        assert r["kernels"] > 0 and 0.0 < r["busy_ms"] <= r["kernel_window_ms"] + 1e-9
        assert sum(r["families_ms"].values()) == pytest.approx(sum(r["names_us"].values()) / 1e3)
