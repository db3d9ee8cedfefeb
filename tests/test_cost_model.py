"""Roofline behaviour of the step cost: bounds, monotonicity, profiles, CUDA graphs, memory fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware.cost import GRAPH_BATCH_SIZES, CostModel, full_graph_rows, graph_rows
from hardware.deployment import Deployment
from hardware.errors import DoesNotFitError, ServesimError
from hardware.operators import StepShape, decode_reduces, decode_splits
from hardware.profile import DEFAULT_PROFILE, Curve, KindEfficiency, Profile
from hardware.profiles import load_profile
from hardware.time_tables import TimeTables


@pytest.mark.parametrize("gpu", ["h100", "h200", "a100", "mi300x"])
def test_decode_batch_one_is_weight_bandwidth_bound(gpu: str, ideal_profile: Profile) -> None:
    dep = Deployment.build("llama-3-8b", gpu)
    weights = dep.memory.weights - dep.model.vocab_size * dep.model.hidden_size * 2  # embedding is gathered
    floor = weights / dep.gpu.hbm_bandwidth
    ideal = CostModel(dep, profile=ideal_profile).price(StepShape.build(decode=[100]))
    assert ideal.bound == "memory"
    assert ideal.seconds == pytest.approx(floor, rel=0.03)
    real = CostModel(dep).price(StepShape.build(decode=[100]))  # documented defaults
    expected = floor / DEFAULT_PROFILE.efficiency["gemm"].memory + real.launch_seconds + real.overhead_seconds
    assert real.seconds == pytest.approx(expected, rel=0.05)
    assert real.mbu > 0.55 and real.mfu < 0.01  # the rest: 25 kernel launches per layer, step overhead


@pytest.mark.parametrize("model,tp", [("llama-3-8b", 1), ("llama-3-70b", 4), ("mixtral-8x7b", 2)])
def test_large_prefill_is_compute_bound(model: str, tp: int, ideal_profile: Profile) -> None:
    dep = Deployment.build(model, "h100", tp=tp)
    cost = CostModel(dep, profile=ideal_profile).price(StepShape.build(prefill=[8192]))
    assert cost.bound == "compute"
    # Ideal profile: only the memory-bound norms, activations and the (not overlapped) TP collectives keep MFU
    # below 1.
    assert cost.mfu > 0.8 * (1 - cost.comm_seconds / cost.seconds)
    assert CostModel(dep).price(StepShape.build(prefill=[8192])).bound == "compute"


def test_attention_grows_memory_bound_at_long_context() -> None:
    """MagicDec's observation: at long context even a batch of decodes is dominated by KV reads (with a
    paged kernel, as vLLM's, reading the cache in place)."""
    model = CostModel(Deployment.build("llama-3-8b", "h100", max_model_len=8192, kv_access="paged"))
    short = model.price(StepShape.build(decode=[512] * 64))
    long = model.price(StepShape.build(decode=[8000] * 64))
    share = {n: sum(r.seconds for r in c.breakdown if r.kind == "attention-decode") / c.seconds
             for n, c in (("short", short), ("long", long))}
    assert share["long"] > 0.5 > share["short"]


PROFILES = {
    "default": DEFAULT_PROFILE,
    "curved": Profile(  # a calibrated-looking profile where small kernels are much less efficient
        gpu="curved",
        efficiency={
            "gemm": KindEfficiency(compute=Curve(sizes=(1e6, 1e9, 1e12), efficiency=(0.05, 0.4, 0.8)),
                                   memory=Curve(sizes=(1e4, 1e7, 1e9), efficiency=(0.1, 0.6, 0.9))),
            "attention-decode": KindEfficiency(memory=Curve(sizes=(1e5, 1e8), efficiency=(0.2, 0.8))),
        },
        overheads=DEFAULT_PROFILE.overheads,
    ),
}

requests = st.lists(st.integers(0, 20_000), max_size=6)
chunks = st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 20_000)), max_size=3)


def _price(model: CostModel, pf: list[tuple[int, int]], dec: list[int]) -> float:
    shape = StepShape.build(prefill=[c for c, _ in pf], prefill_cached=[p for _, p in pf], decode=dec)
    return model.price(shape).seconds if shape.num_requests else 0.0


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("graphs", [True, False])
@settings(max_examples=60, deadline=None)
@given(pf=chunks, dec=requests, which=st.integers(0, 3), grow=st.integers(1, 5000))
def test_more_work_never_costs_less(profile: str, graphs: bool, pf, dec, which: int, grow: int) -> None:
    model = CostModel(Deployment.build("llama-3-8b", "h100", tp=2), profile=PROFILES[profile], cuda_graphs=graphs)
    base = _price(model, pf, dec)
    if which == 0:  # one more decoding request
        bigger = _price(model, pf, dec + [grow])
    elif which == 1:  # one more prefill chunk
        bigger = _price(model, pf + [(grow, 0)], dec)
    elif which == 2 and dec:  # more context for a decode
        bigger = _price(model, pf, [dec[0] + grow] + dec[1:])
    elif which == 3 and pf:  # a longer chunk, or more cached context before it
        c, p = pf[0]
        bigger = min(_price(model, [(c + grow, p)] + pf[1:], dec), _price(model, [(c, p + grow)] + pf[1:], dec))
    else:
        return
    assert bigger >= base * (1 - 1e-12)


def test_cuda_graphs_pad_decode_and_only_apply_to_decode_only_steps() -> None:
    dep = Deployment.build("llama-3-8b", "h100")
    graphs, eager = CostModel(dep, cuda_graphs="decode"), CostModel(dep, cuda_graphs=False)
    assert graph_rows("decode", 9, 0) == 16 and graph_rows("decode", 1, 0) == 1
    assert graph_rows("decode", 513, 0) is None and graph_rows("none", 8, 0) is None
    assert graph_rows("mixed", 40, 33) == 40 and graph_rows("decode", 40, 1) is None  # piecewise: no chunk cap
    assert graph_rows("mixed", 513, 1) is None and graph_rows("mixed", 513, 0, verifies=1) is None
    assert graph_rows("mixed", 9, 0, verifies=1) == 16 and graph_rows("decode", 9, 0, verifies=1) is None
    assert GRAPH_BATCH_SIZES[-1] == 512
    dec = StepShape.build(decode=[1000] * 9)
    g, e = graphs.price(dec), eager.price(dec)
    assert (g.execution, e.execution) == ("graph", "eager")
    assert g.seconds < e.seconds and g.overhead_seconds < e.overhead_seconds
    qkv = {c.execution: next(r for r in c.breakdown if r.name == "qkv_proj").flops for c in (g, e)}
    assert qkv["graph"] == pytest.approx(qkv["eager"] * 16 / 9)  # padded to the captured batch of 16
    mixed = graphs.price(StepShape.build(prefill=[10], decode=[1000] * 9))
    assert mixed.execution == "eager"


def test_mixed_cuda_graphs_take_steps_of_up_to_512_tokens_by_default() -> None:
    """vLLM V1's default: steps with prefill chunks or verifications run as graphs too, padded by token count;
    steps over 512 tokens run eagerly; the chunks are not limited (attention runs outside the pieces)."""
    dep = Deployment.build("llama-3-8b", "h100")
    default, decode_only = CostModel(dep), CostModel(dep, cuda_graphs="decode")
    assert default.cuda_graphs == "mixed" and CostModel(dep, cuda_graphs=True).cuda_graphs == "mixed"
    step = StepShape.build(prefill=[200], prefill_cached=[1000], decode=[700] * 9)  # 209 tokens
    g, e = default.price(step), decode_only.price(step)
    assert (g.execution, e.execution) == ("graph", "eager") and g.seconds < e.seconds
    qkv = {c.execution: next(r for r in c.breakdown if r.name == "qkv_proj").flops for c in (g, e)}
    assert qkv["graph"] == pytest.approx(qkv["eager"] * 216 / 209)  # padded to the captured size of 216
    assert default.price(StepShape.build(prefill=[500], decode=[700] * 13)).execution == "eager"  # 513 tokens
    assert default.price(StepShape.build(prefill=[4] * 33)).execution == "graph"
    assert default.price(StepShape.build(prefill=[4] * 32)).execution == "graph"
    verify = StepShape.build(verify=[5, 5], verify_context=[100, 900], decode=[300])
    assert (default.price(verify).execution, decode_only.price(verify).execution) == ("graph", "eager")
    assert default.price(StepShape.build(verify=[300, 213], verify_context=[100, 900])).execution == "eager"
    with pytest.raises(ServesimError, match="cuda_graphs = 'piecewise'"):
        CostModel(dep, cuda_graphs="piecewise")


def test_piecewise_graph_steps_pay_their_own_host_cost() -> None:
    """A graph step with prefill chunks or verifications (piecewise) costs `step_piecewise` + per request, a
    decode graph `step_graph` + per request; a profile without the piecewise fields prices both as decode
    graphs."""
    dep = Deployment.build("llama-3-8b", "h100")
    base = DEFAULT_PROFILE.overheads.model_copy(update={"step_graph_per_request": 2e-6})
    own = base.model_copy(update={"step_piecewise": 9e-4, "step_piecewise_per_request": 8e-6})
    chunked, decodes = StepShape.build(prefill=[100], decode=[700] * 9), StepShape.build(decode=[700] * 9)

    def overhead(ovh, shape: StepShape) -> float:
        cost = CostModel(dep, DEFAULT_PROFILE.model_copy(update={"overheads": ovh})).price(shape)
        assert cost.execution == "graph"
        return cost.overhead_seconds

    assert overhead(own, chunked) == pytest.approx(9e-4 + 8e-6 * 10)
    verifies = StepShape.build(verify=[5] * 3, verify_context=[700] * 3, decode=[700] * 2)
    assert overhead(own, verifies) == pytest.approx(9e-4 + 8e-6 * 5)
    assert overhead(own, decodes) == overhead(base, decodes) == pytest.approx(base.step_graph + 2e-6 * 9)
    assert overhead(base, chunked) == pytest.approx(base.step_graph + 2e-6 * 10)


def test_uniform_verifications_replay_a_full_graph() -> None:
    """vLLM V1's FULL_AND_PIECEWISE: a batch where every request verifies k + 1 tokens (no prefill chunk, no
    decode beside it, no token tree) replays a full graph, its sequences padded to the next capture size and
    at most 512 tokens in all, with a decode graph's host cost; other speculative steps run piecewise."""
    assert full_graph_rows(3, 5) == 4 and full_graph_rows(3) == 4 and full_graph_rows(1, 16) == 1
    assert full_graph_rows(100, 5) is None and full_graph_rows(96, 5) == 96 and full_graph_rows(513) is None
    dep = Deployment.build("llama-3-8b", "h100")
    ovh = DEFAULT_PROFILE.overheads.model_copy(update={"step_graph_per_request": 2e-6, "step_piecewise": 9e-4,
                                                       "step_piecewise_per_request": 8e-6})
    model = CostModel(dep, DEFAULT_PROFILE.model_copy(update={"overheads": ovh}))
    uniform = StepShape.build(verify=[5] * 3, verify_context=[700, 90, 3000])
    assert uniform.uniform_queries == 5 and StepShape.build(decode=[4, 5]).uniform_queries == 1
    cost = model.price(uniform)
    assert cost.execution == "graph" and cost.overhead_seconds == pytest.approx(ovh.step_graph + 2e-6 * 3)
    qkv = next(r for r in cost.breakdown if r.name == "qkv_proj").flops
    one = next(r for r in model.price(StepShape.build(verify=[5], verify_context=[700])).breakdown
               if r.name == "qkv_proj").flops
    assert qkv == pytest.approx(one * 4)  # 3 sequences padded to the captured 4, 5 tokens each
    for other in (StepShape.build(verify=[5, 4], verify_context=[700, 90]),  # differing k
                  StepShape.build(verify=[5] * 3, verify_context=[700] * 3, decode=[50]),  # a decode beside
                  StepShape.build(verify=[4], verify_context=[700], verify_levels=[[1, 2]]),  # a token tree
                  StepShape.build(verify=[5] * 100, verify_context=[70] * 100)):  # 104 x 5 > 512: piecewise
        assert other.uniform_queries == 0 or other.verify_tokens.size == 100
        assert model.price(other).overhead_seconds == pytest.approx(9e-4 + 8e-6 * other.num_requests)
    assert CostModel(dep, cuda_graphs="decode").price(uniform).execution == "eager"


class OneTable:
    """Scalar view of a single-curve `TimeTables`."""

    def __init__(self, curve: Curve) -> None:
        self.tables = TimeTables([curve])

    def seconds(self, work: float, peak: float) -> float:
        return float(self.tables.seconds(np.array([work]), np.array([0]), np.array([peak]))[0])


def test_time_table_interpolates_in_log_space_and_is_monotone() -> None:
    curve = Curve(sizes=(1e3, 1e5), efficiency=(0.1, 0.5))
    table = OneTable(curve)
    assert table.seconds(1e3, 1.0) == pytest.approx(1e3 / 0.1)
    assert table.seconds(1e5, 1.0) == pytest.approx(1e5 / 0.5, rel=1e-9)
    assert table.seconds(1e2, 1.0) == pytest.approx(1e2 / 0.1)  # flat beyond the ends
    assert table.seconds(1e7, 1.0) == pytest.approx(1e7 / 0.5, rel=1e-9)
    mid = table.seconds(1e4, 1.0)  # log-time is linear in log-size: geometric mean of the end times
    assert mid == pytest.approx((1e3 / 0.1 * 1e5 / 0.5) ** 0.5, rel=1e-6)
    # A curve whose efficiency jumps faster than the size grows is clamped: time never goes down.
    steep = OneTable(Curve(sizes=(1e3, 1.2e3, 1e6), efficiency=(0.01, 0.9, 0.9)))
    times = [steep.seconds(x, 1.0) for x in (1e3, 1.05e3, 1.1e3, 1.2e3, 2e3)]
    assert times == sorted(times)


def test_profile_file_round_trip_and_errors(tmp_path) -> None:
    path = tmp_path / "p.json"
    data = PROFILES["curved"].model_dump(mode="json")
    path.write_text(json.dumps(data))
    loaded = load_profile(path)
    assert loaded.efficiency["gemm"] == PROFILES["curved"].efficiency["gemm"]
    assert loaded.efficiency["sampling"] == DEFAULT_PROFILE.efficiency["sampling"]  # missing kinds: defaults
    dep = Deployment.build("llama-3-8b", "h100")
    assert CostModel(dep, profile=loaded).price(StepShape.build(decode=[10])).seconds != \
        CostModel(dep).price(StepShape.build(decode=[10])).seconds
    data["efficiency"]["matmul"] = data["efficiency"].pop("gemm")
    path.write_text(json.dumps(data))
    with pytest.raises(ServesimError, match=r"unknown operator kind\(s\) \['matmul'\]; allowed: gemm"):
        load_profile(path)
    data["efficiency"] = {"gemm": {"compute": {"sizes": [1, 2], "efficiency": [0.5, 1.5]}}}
    path.write_text(json.dumps(data))
    with pytest.raises(ServesimError, match="efficiency values must be in"):
        load_profile(path)
    with pytest.raises(ServesimError, match="no such file"):
        load_profile(tmp_path / "missing.json")


def test_memory_plan_and_fit_error() -> None:
    dep = Deployment.build("llama-3-8b", "h100")
    plan = dep.check_fits()
    assert plan.weights == pytest.approx(dep.model.num_params * 2)
    assert plan.kv_capacity_tokens == int(plan.kv_cache // dep.model.kv_bytes_per_token())
    assert 300_000 < plan.kv_capacity_tokens < 500_000  # vLLM reports ~4e5 tokens for this setup
    with pytest.raises(DoesNotFitError) as exc:
        Deployment.build("llama-3-70b", "h100").check_fits()
    msg = str(exc.value)
    assert "needs 147.3 GB per GPU" in msg and "72.0 GB is usable" in msg and "\n" not in msg
    with pytest.raises(DoesNotFitError):
        Deployment.build("llama-3-70b", "h100", tp=2).check_fits()  # 70.6 GB of weights per GPU
    Deployment.build("llama-3-70b", "h100", tp=4).check_fits()
    fp8 = Deployment.build("llama-3-70b", "h100", tp=2, weight_dtype="fp8")
    assert fp8.memory.weights == pytest.approx(fp8.model.num_params / 2, rel=0.01)
    fp8.check_fits()


def test_tp_shards_weights_and_kv() -> None:
    one = Deployment.build("llama-3-70b", "h200")
    four = Deployment.build("llama-3-70b", "h200", tp=4)
    assert four.memory.kv_bytes_per_token * 4 == one.memory.kv_bytes_per_token
    assert four.memory.weights < one.memory.weights / 3.9
    replicated = Deployment.build("llama-3-70b", "h100", tp=16)  # 8 KV heads on 16 ranks: one copy each
    assert replicated.kv_heads_per_gpu == 1
    assert replicated.memory.kv_bytes_per_token == one.memory.kv_bytes_per_token / 8


@pytest.mark.parametrize("kwargs,match", [
    ({"tp": 3}, "tp=3 must divide num_attention_heads=32"),
    ({"pp": 40}, "pp=40 exceeds num_hidden_layers=32"),
    ({"max_model_len": 100_000}, "max_model_len = 100000 exceeds max_position_embeddings = 8192"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization = 1.5"),
    ({"weight_dtype": "int4"}, "weight_dtype = 'int4': Input should be 'fp32', 'bf16', 'fp16' or 'fp8'"),
])
def test_bad_deployments_fail_cleanly(kwargs: dict, match: str) -> None:
    with pytest.raises(ServesimError, match=match):
        Deployment.build("llama-3-8b", "h100", **kwargs)


def test_every_catalog_model_prices_on_every_gpu() -> None:
    from hardware.catalog import gpu_ids, model_ids

    shape = StepShape.build(prefill=[300], decode=[50, 4000])
    for model_id in model_ids():
        for gpu_id in gpu_ids():
            cost = CostModel(Deployment.build(model_id, gpu_id, tp=2 if model_id != "tiny-llama" else 1)).price(shape)
            assert cost.seconds > 0 and 0 < cost.mfu < 1 and 0 < cost.mbu < 1


def test_kv_gather_is_its_own_operator_unless_the_kernel_is_paged() -> None:
    """`kv_access="gather"` (an engine copying the K/V before a contiguous kernel, as servesim's backend did)
    adds a K/V read and write per token the kernels read, two kernels per attention call, and its decode runs
    four kernels where the paged one runs two; "paged" (vLLM, the backend now) prices the step without them."""
    shape = StepShape.build(prefill=[300], prefill_cached=[2000], decode=[1000] * 16)
    gather, paged = (CostModel(Deployment.build("llama-3-8b", "h100", kv_access=a), cuda_graphs=False).price(shape)
                     for a in ("gather", "paged"))
    ops = {o.name: o for o in gather.breakdown}
    layers, token = 32, 2 * 8 * 128 * 2
    assert ops["kv_gather_prefill"].bytes == pytest.approx(layers * 2 * 2300 * token)
    assert ops["kv_gather_decode"].bytes == pytest.approx(layers * 2 * 16 * 1001 * token)
    assert gather.kernels - paged.kernels == layers * (2 * 2 + (4 - 2))
    assert not any(o.kind == "kv-gather" for o in paged.breakdown)
    gpu_only = lambda c: sum(o.seconds for o in c.breakdown)  # noqa: E731
    paged_ops = {o.name: o for o in paged.breakdown}
    decode_kernels = ops["attention_decode"].seconds - paged_ops["attention_decode"].seconds
    assert decode_kernels > 0
    assert gpu_only(gather) - gpu_only(paged) == pytest.approx(ops["kv_gather_prefill"].seconds
                                                               + ops["kv_gather_decode"].seconds + decode_kernels)
    with pytest.raises(ServesimError, match="kv_access"):
        Deployment.build("llama-3-8b", "h100", kv_access="contiguous")


def test_ragged_decode_attention_waits_for_its_longest_sequence() -> None:
    """A ragged decode batch is priced at least as one wave of sequences at its longest context (one
    FlashAttention block per sequence and KV head: 16 sequences of Llama-3-8B's 8 KV heads fill an H100)."""
    from hardware.profiles import packaged_profile

    model = CostModel(Deployment.build("llama-3-8b", "h100"), packaged_profile("h100-sxm-80gb"))

    def attention(contexts: list[int]) -> float:
        op = next(o for o in model.price(StepShape.build(decode=contexts)).breakdown if o.name == "attention_decode")
        return op.seconds

    ragged, mean, longest = [7999] + [799] * 15, [1249] * 16, [7999] * 16
    assert attention(ragged) == pytest.approx(max(attention(mean), attention(longest)), rel=1e-9)
    assert attention(ragged) > 1.5 * attention(mean)
    many = [999] * 255 + [1255]  # many waves: the mean holds (the longest adds one block's worth at most)
    assert attention(many) == pytest.approx(attention([1000] * 256), rel=0.01)


def test_fused_elementwise_launches_one_kernel_per_fused_op() -> None:
    """`elementwise="fused"` (the default: vLLM's custom ops, the backend's Triton kernels) runs residual add +
    RMSNorm, RoPE with the K/V cache write, and SiLU-mul as one kernel each; "unfused" counts PyTorch's ops
    (add and norm: 2 per call; RoPE: 7; the K and V cache copies: 2; SiLU then mul: 2)."""
    shape = StepShape.build(prefill=[300], decode=[1000] * 16)
    fused, unfused = (CostModel(Deployment.build("llama-3-8b", "h100", elementwise=e), cuda_graphs=False).price(shape)
                      for e in ("fused", "unfused"))
    assert unfused.kernels - fused.kernels == 32 * (2 * (2 - 1) + (7 + 2 - 1) + (2 - 1))
    names = {o.name for o in fused.breakdown}
    assert "rope_kv_write" in names and not {"rope", "kv_write"} & names
    ops = {o.name: o for o in fused.breakdown}
    rows, a, d = 316, 2, 128
    # read q, k, v; write q; write k and v to the cache (bf16)
    assert ops["rope_kv_write"].bytes == pytest.approx(32 * (rows * (2 * 32 + 8) * d * a + rows * 8 * d * 3 * a))
    assert fused.seconds < unfused.seconds
    with pytest.raises(ServesimError, match="elementwise"):
        Deployment.build("llama-3-8b", "h100", elementwise="compiled")


def test_prefill_only_prices_are_kept_per_shape() -> None:
    """`price` keeps prefill-only steps by shape: a kept price is the price a fresh model finds, a shape that
    differs in any chunk or cached prefix is priced anew, and steps with decodes are never kept."""
    dep = Deployment.build("llama-3-8b", "h100")
    kept, rng = CostModel(dep), np.random.default_rng(5)
    for _ in range(40):
        chunks = rng.integers(1, 3000, int(rng.integers(1, 4)))
        cached = rng.integers(0, 2, chunks.size) * rng.integers(0, 2000, chunks.size)
        shape = StepShape.build(prefill=chunks, prefill_cached=cached)
        first, again = kept.price(shape), kept.price(StepShape.build(prefill=chunks, prefill_cached=cached))
        fresh = CostModel(dep).price(shape)
        assert again is first and (first.seconds, first.mfu, first.execution) == (fresh.seconds, fresh.mfu,
                                                                                   fresh.execution)
        other = kept.price(StepShape.build(prefill=chunks + 1, prefill_cached=cached))
        assert other is not first and other.seconds > first.seconds
    mixed = StepShape.build(prefill=[100], decode=[50])
    assert kept.price(mixed) is not kept.price(mixed)


def test_cost_model_counts_the_reduction_kernel_where_the_backend_splits() -> None:
    """`decode_reduces` (the cost model's count of the reduction kernel, vectorised) says a decode call
    splits exactly where `decode_splits` (the backend's rule) gives more than one split."""
    seqs, longest = np.meshgrid(np.arange(1, 300), np.array([1, 255, 256, 511, 512, 513, 1100, 70_000]))
    for kv_heads, sms in ((1, 132), (8, 132), (4, 108), (2, 304)):
        rule = np.vectorize(lambda b, n: decode_splits(int(b), kv_heads, int(n), sms) > 1)(seqs, longest)
        assert rule.any() and not rule.all()
        assert np.array_equal(decode_reduces(seqs, kv_heads, longest, sms), rule)


@pytest.mark.parametrize("profile,graphs", [(None, True), ("calibrated", True), ("calibrated", "none")])
def test_kept_operators_price_a_step_as_afresh(profile: str | None, graphs: bool | str) -> None:
    """`price` keeps the operators that do not read attention's K/V per step features (`_fixed`), priced at the
    first step that had them: steps of the same features but other prefill chunks, cached prefixes and decode
    contexts get every figure and per-operator row that a cost model pricing them first gives, and keep them
    while later steps are priced."""
    from hardware.catalog import get_gpu, get_model
    from hardware.profiles import resolve_profile

    dep = Deployment.build(get_model("llama-3-8b"), get_gpu("h100"))
    rng = np.random.default_rng(5)
    warm = CostModel(dep, profile=resolve_profile(profile, dep.gpu.id), cuda_graphs=graphs)
    shapes = []
    for _ in range(60):  # one chunk of 200 tokens and 8 decodes: the features repeat, the attention does not
        shapes.append(StepShape(prefill_tokens=np.array([200]), prefill_cached=rng.integers(0, 4000, 1),
                                decode_context=rng.integers(1, 6000, 8)))
    costs = [warm.price(shape) for shape in shapes]  # (each kept cost read after the later steps were priced)
    for shape, kept in zip(shapes, costs):
        fresh = CostModel(dep, profile=resolve_profile(profile, dep.gpu.id), cuda_graphs=graphs).price(shape)
        assert (kept.seconds, kept.stage_seconds, kept.mfu, kept.mbu, kept.kernels, kept.comm_bytes) == \
               (fresh.seconds, fresh.stage_seconds, fresh.mfu, fresh.mbu, fresh.kernels, fresh.comm_bytes)
        assert kept.breakdown == fresh.breakdown
    assert len(warm._fixed_cache) < len(shapes)  # (kept features were met again)


def test_prefill_prices_kept_drop_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """`price` keeps prefill-only steps' prices per shape up to `PREFILL_CACHE_SIZE`; a full cache drops the
    shape used least recently (a shape met again moves to the end), and a kept price is the one priced afresh."""
    import hardware.cost as cost
    from hardware.catalog import get_gpu, get_model

    monkeypatch.setattr(cost, "PREFILL_CACHE_SIZE", 3)
    dep = Deployment.build(get_model("llama-3-8b"), get_gpu("h100"))
    model = CostModel(dep)

    def shape(tokens: int) -> StepShape:
        return StepShape(prefill_tokens=np.array([tokens]), prefill_cached=np.array([0]))

    first = {n: model.price(shape(n)) for n in (100, 200, 300)}
    assert model.price(shape(100)) is first[100]  # (kept; now the most recently used)
    model.price(shape(400))  # the cache is full: 200, used least recently, goes
    assert [key[0][0] for key in model._prefill_cache] == [300, 100, 400]
    again = model.price(shape(200))
    assert again is not first[200] and again.seconds == first[200].seconds == CostModel(dep).price(shape(200)).seconds
    assert [key[0][0] for key in model._prefill_cache] == [100, 400, 200]


def test_compiled_operators_hold_a_steps_work_as_an_affine_table() -> None:
    """`CostModel.compiled`: the deployment's operators and their work per unit of each step feature, before any
    efficiency; a GEMM's row is its weight (bytes, whatever the rows) and 2 x its weight's elements per row (token)."""
    dep = Deployment.build("llama-3-8b", "h100", tp=2)
    compiled = CostModel(dep).compiled
    frame = compiled.frame()
    assert list(frame["name"]) == [op.name for op in compiled.operators] and len(frame) == len(compiled.operators)
    qkv = frame.set_index("name").loc["qkv_proj"]
    hidden, heads, kv_heads = 4096, 32, 8
    weight = hidden * (heads + 2 * kv_heads) * (hidden // heads) // 2  # one TP rank's columns
    assert qkv["count"] == 32 and qkv["bytes"] == 2 * weight and qkv["flops_per_rows"] == 2 * weight
    reduce = frame[frame["kind"] == "all-reduce"]  # each row's hidden state, bf16
    assert len(reduce) == 3 and (reduce["payload_per_rows"] == 2 * hidden).all() and "payload_per_tokens" not in frame
    shape = StepShape.build(prefill=[300], decode=[1000] * 4)
    cost = CostModel(dep).price(shape)  # the priced step's FLOPs are the table's, at its features, over the GPUs
    rows = {o.name: o for o in cost.breakdown}
    assert rows["qkv_proj"].flops == pytest.approx(32 * 2 * weight * 304)
    assert cost.flops == pytest.approx(2 * sum(o.flops for o in cost.breakdown))
