"""MoE and MLA models: architectures, expert placement, routing skew, all-to-all, latent KV (issue 25)."""

from __future__ import annotations

import numpy as np
import pytest

from hardware.catalog import get_model
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.operators import StepShape
from hardware.routing import ExpertPlacement, RoutingModel, expected_distinct
from hardware.specs import ModelSpec


@pytest.mark.parametrize("model_id, total, active", [
    ("deepseek-v3", 671.0, 37.0),  # DeepSeek-V3 technical report: 671B total, 37B activated
    ("qwen3-235b-a22b", 235.0, 22.0),  # Qwen3 model card
    ("qwen3-30b-a3b", 30.5, 3.3),
    ("mixtral-8x22b", 141.0, 39.0),  # Mistral: 141B, 39B active
    ("qwen1.5-moe-a2.7b", 14.3, 2.7),  # shared experts (Qwen2-MoE architecture)
    ("deepseek-v2-lite", 15.7, None),
])
def test_parameter_counts_match_the_published_sizes(model_id: str, total: float, active: float | None) -> None:
    m = get_model(model_id)
    assert m.num_params / 1e9 == pytest.approx(total, rel=0.01)
    if active is not None:
        assert m.active_params / 1e9 == pytest.approx(active, rel=0.03)


def test_mla_kv_bytes_per_token_is_the_latent_and_rope_key() -> None:
    m = get_model("deepseek-v3")
    assert m.is_mla and m.kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2  # 70,272 B: no K/V heads cached
    dep = Deployment.build("deepseek-v3", "h200", tp=8, weight_dtype="fp8", kv_dtype="fp8")
    assert dep.kv_bytes_per_token_per_layer() == 576  # every TP rank holds the whole latent
    assert dep.kv_bytes_per_token() == 61 * 576  # a disaggregated transfer sends it once, not once per rank


def test_dense_first_layers_and_layer_rules_from_hf_configs() -> None:
    v3 = get_model("deepseek-v3")
    assert [v3.is_moe_layer(i) for i in range(4)] == [False, False, False, True] and v3.moe_layers() == 58
    qwen = ModelSpec.from_hf_config({**get_model("qwen3-30b-a3b").model_dump(exclude={"id", "hf_id", "aliases",
                                                                                      "num_local_experts"}),
                                     "num_experts": 128, "mlp_only_layers": [0, 5], "decoder_sparse_step": 2}, "q")
    assert qwen.num_experts == 128  # Qwen's `num_experts` read as the routed experts
    assert [i for i in range(8) if qwen.is_moe_layer(i)] == [1, 3, 7]


def test_distinct_experts_expectation_matches_monte_carlo() -> None:
    """Expected distinct experts hit by T tokens (sum of 1 - (1 - p_e)^T) against sampled routing: top-k
    without replacement drawn by systematic sampling, which gives every expert exactly its p_e."""
    rng = np.random.default_rng(1)
    for routing in (RoutingModel(), RoutingModel(distribution="zipf", zipf_s=1.2, seed=3)):
        p = routing.probabilities(64, 6)
        assert p.sum() == pytest.approx(6.0) and p.max() <= 1.0
        cum = np.concatenate([[0.0], np.cumsum(p)])
        for tokens in (1, 7, 40, 300):
            hits = []
            for _ in range(400):
                u = rng.uniform(size=(tokens, 1)) + np.arange(6)  # k points spaced 1 apart over [0, k)
                chosen = np.searchsorted(cum, u, side="right") - 1
                assert all(len(set(row)) == 6 for row in chosen.tolist())  # k distinct experts per token
                hits.append(np.unique(chosen).size)
            expected = expected_distinct(p, tokens).sum()
            assert np.mean(hits) == pytest.approx(expected, rel=0.02, abs=0.1)


def _moe_seconds(dep: Deployment, shape: StepShape) -> float:
    cost = CostModel(dep).price(shape)
    return sum(r.seconds for r in cost.breakdown if r.name in ("moe_gate_up", "moe_down"))


def test_skew_slows_the_step_as_the_busiest_rank_predicts() -> None:
    """With 8 expert-parallel ranks and a compute-bound step, the routed experts' time grows with the busiest
    rank's share of the token slots (its GEMM rows) and nothing else changes."""
    shape = StepShape.build(prefill=[8192])
    uniform = Deployment.build("qwen3-30b-a3b", "h100", tp=8, expert_parallel=True, max_num_batched_tokens=8192)
    skewed = uniform.model_copy(update={"routing": RoutingModel(distribution="zipf", zipf_s=1.0)})
    share_u, share_s = uniform.placement.rank_share.max(), skewed.placement.rank_share.max()
    assert share_u == pytest.approx(8 / 8) and share_s > 1.5 * share_u
    ratio = _moe_seconds(skewed, shape) / _moe_seconds(uniform, shape)
    assert ratio == pytest.approx(share_s / share_u, rel=0.05)
    rows_u = [r for r in CostModel(uniform).price(shape).breakdown if r.name == "moe_gate_up"][0]
    assert rows_u.flops == pytest.approx(2 * 8192 * 8 / 8 * 2048 * 2 * 768 * 48)  # T k / ranks slots, 48 layers


def test_eplb_balances_the_busiest_rank_at_the_cost_of_memory() -> None:
    routing = RoutingModel(distribution="zipf", zipf_s=1.0)
    base = dict(tp=1, dp=8, expert_parallel=True, routing=routing, weight_dtype="fp8")
    plain = Deployment.build("deepseek-v3", "h200", **base)
    eplb = Deployment.build("deepseek-v3", "h200", eplb=True, **base)
    spare = Deployment.build("deepseek-v3", "h200", eplb=True, redundant_experts=32, **base)
    shares = [d.placement.rank_share.max() for d in (plain, eplb, spare)]
    assert shares[0] > shares[1] > shares[2] >= 8 / 8  # top-8 slots over 8 ranks: 1 per rank when even
    assert all(d.placement.rank_share.sum() == pytest.approx(8.0) for d in (plain, eplb, spare))
    expert = 3 * 7168 * 2048  # one routed expert, fp8: 1 byte per weight
    assert spare.memory.weights - eplb.memory.weights == pytest.approx(58 * 4 * expert)  # 4 more per GPU
    assert spare.experts_per_gpu == 36 and eplb.experts_per_gpu == 32


def test_all_to_all_bytes_by_hand() -> None:
    """DeepSeek-V3 on 16 H200 (dp 16, EP 16), fp8 weights: 1,024 decodes are 64 tokens per GPU, each sent to
    its 8 experts; the ib-ndr link carries the copies bound for the other node: 8 of 16 GPUs."""
    dep = Deployment.build("deepseek-v3", "h200", tp=1, dp=16, expert_parallel=True, weight_dtype="fp8")
    assert dep.moe_link.id == "ib-ndr" and dep.num_gpus == 16
    cost = CostModel(dep, cuda_graphs=False).price(StepShape.build(decode=[1000] * 1024))
    rows = {r.name: r for r in cost.breakdown}
    sent = 64 * 8 * 7168 * 8 / 16  # values per GPU per layer
    assert rows["moe_dispatch"].comm_bytes == pytest.approx(58 * sent * 1)  # fp8 dispatch, 58 MoE layers
    assert rows["moe_combine"].comm_bytes == pytest.approx(58 * sent * 2)  # bf16 combine
    link, ovh = dep.moe_link, CostModel(dep).profile.overheads  # one kernel per layer, launched eagerly
    per_layer = link.latency + sent * 2 / (link.bandwidth * 0.6) + ovh.launch_graph + ovh.stream_gap
    assert rows["moe_combine"].seconds == pytest.approx(58 * per_layer)
    intra = Deployment.build("deepseek-v3", "h200", tp=1, dp=8, expert_parallel=True, weight_dtype="fp8")
    rows8 = {r.name: r for r in CostModel(intra, cuda_graphs=False).price(StepShape.build(decode=[1000] * 512))
             .breakdown}
    assert rows8["moe_dispatch"].comm_bytes == pytest.approx(58 * 64 * 8 * 7168 * 7 / 8)  # NVLink: 7 of 8 peers


def test_routing_and_combine_kernels_by_hand() -> None:
    """Qwen3-30B-A3B (48 MoE layers, 128 experts, top 8, hidden 2048) on one H100, 64 decodes: the fused
    softmax + top-k reads the bf16 logits and writes 8 fp32 weights and int32 ids per token; the weighted sum
    reads the 512 expert outputs and writes the 64 tokens."""
    dep = Deployment.build("qwen3-30b-a3b", "h100")
    rows = {r.name: r for r in CostModel(dep).price(StepShape.build(decode=[1000] * 64)).breakdown}
    assert rows["moe_topk"].bytes == pytest.approx(48 * (64 * 128 * 2 + 64 * 8 * 8))
    assert rows["moe_sum"].bytes == pytest.approx(48 * (64 * 8 + 64) * 2048 * 2)
    assert rows["moe_sum"].flops == pytest.approx(48 * 2 * 64 * 8 * 2048)


def test_dp_attention_splits_the_batch_and_multiplies_kv_capacity() -> None:
    one = Deployment.build("qwen3-30b-a3b", "h100", tp=1)
    four = Deployment.build("qwen3-30b-a3b", "h100", tp=1, dp=4, expert_parallel=True)
    assert four.num_gpus == 4 and four.memory.kv_capacity_tokens > 3.9 * one.memory.kv_capacity_tokens
    shape = StepShape.build(decode=[4000] * 256)
    att = {c: [r for r in CostModel(d).price(shape).breakdown if r.name == "attention_decode"][0]
           for c, d in (("one", one), ("four", four))}
    assert att["four"].bytes == pytest.approx(att["one"].bytes / 4)  # each rank reads its quarter of the KV


def test_mla_absorbed_decode_reads_the_latent_and_naive_rebuilds_heads() -> None:
    shape = StepShape.build(decode=[8000] * 32)
    costs = {mode: CostModel(Deployment.build("deepseek-v3", "h200", tp=8, weight_dtype="fp8",
                                              mla_attention=mode)).price(shape) for mode in ("absorbed", "naive")}
    att = {mode: {r.name: r for r in c.breakdown} for mode, c in costs.items()}
    # per key token: the latent and RoPE key (576 bf16) against 16 heads' K (192) and V (128) per TP rank
    ratio = att["absorbed"]["attention_decode"].bytes / att["naive"]["attention_decode"].bytes
    assert ratio == pytest.approx(576 / (16 * 320), rel=0.02)
    assert "mla_kv_up_decode" in att["naive"] and "mla_kv_up_decode" not in att["absorbed"]
    assert costs["absorbed"].seconds < costs["naive"].seconds
    prefill_only = CostModel(Deployment.build("deepseek-v3", "h200", tp=8, weight_dtype="fp8")).price(
        StepShape.build(prefill=[512]))
    assert not any(r.name.endswith("_decode") for r in prefill_only.breakdown)  # no decode weights read


@pytest.mark.parametrize("settings, message", [
    (dict(model="llama-3-8b", dp=2), "dense"),
    (dict(model="qwen3-30b-a3b", tp=1, dp=3, expert_parallel=True), "divide"),
    (dict(model="qwen3-30b-a3b", redundant_experts=8), "redundant_experts"),
    (dict(model="qwen3-30b-a3b", routing=RoutingModel(distribution="counts", counts=(1.0, 2.0))), "counts"),
])
def test_bad_moe_settings_name_the_field(settings: dict, message: str) -> None:
    model = settings.pop("model")
    with pytest.raises(ServesimError, match=message):
        Deployment.build(model, "h100", **settings)


def test_placement_is_contiguous_by_default_and_rejects_uneven_splits() -> None:
    p = RoutingModel().probabilities(16, 2)
    assert ExpertPlacement(p, 4).rank_share.tolist() == pytest.approx([0.5] * 4)
    with pytest.raises(ValueError, match="divide"):
        ExpertPlacement(p, 3)
