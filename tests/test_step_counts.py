"""FLOP and byte counts of Llama-3-8B steps against hand-derived formulas, for TP 1, 2 and 8."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware.cost import CostModel, StepCost
from hardware.deployment import Deployment
from hardware.operators import StepShape, StepTotals
from hardware.routing import RoutingModel, expected_distinct

H, I, L, NH, NKV, D, V = 4096, 14336, 32, 32, 8, 128, 128256
LINEAR_PARAMS_PER_LAYER = H * (NH * D + 2 * NKV * D) + NH * D * H + 3 * H * I
KV_PER_TOKEN_LAYER = 2 * NKV * D * 2  # K and V, bf16


def price(shape: StepShape, tp: int = 1, graphs: bool = False) -> tuple[StepCost, Deployment]:
    dep = Deployment.build("llama-3-8b", "h100", tp=tp)
    return CostModel(dep, cuda_graphs=graphs).price(shape), dep


def by_kind(cost: StepCost, tp: int, field: str = "flops") -> dict[str, float]:
    """Totals over all GPUs of the replica, per operator kind (breakdown rows are per GPU)."""
    out: dict[str, float] = {}
    for row in cost.breakdown:
        out[row.kind] = out.get(row.kind, 0.0) + getattr(row, field) * tp
    return out


def hand_gemm_flops(tokens: int, logit_tokens: int) -> float:
    return 2.0 * L * LINEAR_PARAMS_PER_LAYER * tokens + 2.0 * H * V * logit_tokens


def hand_attention_flops(pairs: float) -> float:
    return L * 4.0 * D * NH * pairs  # QK^T and PV, 2 FLOPs per multiply-add, per head dim, per head


CASES = {
    # name: (shape, tokens through GEMMs, logit tokens, prefill-style pairs, decode pairs)
    "prefill": (StepShape.build(prefill=[2048]), 2048, 1, 2048 * 2049 / 2, 0),
    "prefill-with-cache": (StepShape.build(prefill=[512], prefill_cached=[3000]), 512, 1,
                           512 * 3000 + 512 * 513 / 2, 0),
    "decode": (StepShape.build(decode=[2048] * 64), 64, 64, 0, 64 * 2049),
    "mixed": (StepShape.build(prefill=[256, 100], prefill_cached=[0, 50], decode=[10, 1000, 5000]),
              356 + 3, 2 + 3, 256 * 257 / 2 + 100 * 50 + 100 * 101 / 2, 11 + 1001 + 5001),
}


@pytest.mark.parametrize("tp", [1, 2, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flops_match_hand_formulas(case: str, tp: int) -> None:
    shape, tokens, logits, pf_pairs, dec_pairs = CASES[case]
    cost, _ = price(shape, tp)
    kinds = by_kind(cost, tp)
    assert kinds["gemm"] == pytest.approx(hand_gemm_flops(tokens, logits), rel=1e-12)
    attention = kinds.get("attention-prefill", 0.0) + kinds.get("attention-decode", 0.0)
    assert attention == pytest.approx(hand_attention_flops(pf_pairs + dec_pairs), rel=1e-12)
    # Everything else (norms, RoPE, SwiGLU, sampling) is a small remainder of the total.
    assert 0 < cost.flops - kinds["gemm"] - attention < 0.02 * cost.flops
    assert cost.tokens == tokens


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_decode_bytes_are_weights_plus_kv(tp: int) -> None:
    batch, context = 32, 4000
    cost, dep = price(StepShape.build(decode=[context] * batch), tp)
    kinds = by_kind(cost, tp, "bytes")
    weight_bytes = (L * LINEAR_PARAMS_PER_LAYER + H * V) * 2  # layers + LM head (embedding is gathered, not read)
    # Each GEMM also reads its input rows and writes its output rows (bf16); under TP the hidden-size side
    # (input of qkv/gate_up/lm_head, partial output of o/down) is on every rank, the other side is sharded.
    per_layer_io = 4 * tp * H + (NH + 2 * NKV) * D + NH * D + 2 * I + I
    activation_bytes = L * batch * per_layer_io * 2 + batch * (tp * H + V) * 2
    assert kinds["gemm"] == pytest.approx(weight_bytes + activation_bytes, rel=1e-12)
    kv_read = L * batch * (context + 1) * KV_PER_TOKEN_LAYER
    q_and_o = L * 2 * batch * NH * D * 2
    assert kinds["attention-decode"] == pytest.approx(kv_read + q_and_o, rel=1e-12)
    # RoPE with the K/V cache write, one kernel: q, k, v read, q written, K and V written to the cache (bf16)
    rope_kv = sum(r.bytes * tp for r in cost.breakdown if r.name == "rope_kv_write")
    assert rope_kv == pytest.approx(L * batch * ((2 * NH + NKV) * D * 2 + NKV * D * (2 + 2 * 2)), rel=1e-12)
    unfused = CostModel(Deployment.build("llama-3-8b", "h100", tp=tp, elementwise="unfused"), cuda_graphs=False)
    kinds = by_kind(unfused.price(StepShape.build(decode=[context] * batch)), tp, "bytes")
    assert kinds["kv-write"] == pytest.approx(L * batch * 2 * NKV * D * (2 + 2), rel=1e-12)


@pytest.mark.parametrize("tp", [2, 8])
def test_tp_adds_two_all_reduces_per_layer(tp: int) -> None:
    cost, _ = price(StepShape.build(prefill=[1000]), tp)
    reduces = [r for r in cost.breakdown if r.kind == "all-reduce"]
    assert sum(r.count for r in reduces) == 2 * L + 1  # + the vocab-parallel embedding
    per_layer = [r for r in reduces if r.name.startswith("all_reduce_") and r.count == L]
    assert all(r.comm_bytes == L * 1000 * H * 2 for r in per_layer) and len(per_layer) == 2
    assert cost.comm_seconds > 0
    single, _ = price(StepShape.build(prefill=[1000]), 1)
    assert not any(r.kind == "all-reduce" for r in single.breakdown) and single.comm_seconds == 0


def test_pipeline_stages_split_layers_and_send_activations() -> None:
    dep = Deployment.build("llama-3-8b", "h100", pp=3)
    assert dep.layers_per_stage == (11, 11, 10)
    cost = CostModel(dep, cuda_graphs=False).price(StepShape.build(prefill=[500]))
    assert len(cost.stage_seconds) == 3
    sends = [r for r in cost.breakdown if r.kind == "send-recv"]
    assert [r.stage for r in sends] == [1, 2] and all(r.comm_bytes == 2 * 500 * H * 2 for r in sends)
    assert cost.seconds == pytest.approx(sum(cost.stage_seconds) + cost.overhead_seconds)
    assert cost.bottleneck_seconds == max(cost.stage_seconds)
    flat, _ = price(StepShape.build(prefill=[500]))
    assert cost.flops == pytest.approx(flat.flops, rel=1e-12)  # same work, split across stages


def brute_pairs(first: int, count: int, window: int | None) -> int:
    return sum(min(j, window) if window else j for j in range(first, first + count))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 300)), min_size=1, max_size=5),
       st.one_of(st.none(), st.integers(1, 400)))
def test_sliding_window_pairs_match_brute_force(chunks: list[tuple[int, int]], window: int | None) -> None:
    shape = StepShape.build(prefill=[c for c, _ in chunks], prefill_cached=[p for _, p in chunks])
    totals = StepTotals.of(shape, window)
    assert totals.prefill_pairs == sum(brute_pairs(p + 1, c, window) for c, p in chunks)


def test_a_verification_attends_as_decodes_do_one_per_tile_of_queries() -> None:
    """A chain of k + 1 <= 8 tokens is one sequence of the decode kernel, reading its context and itself; a
    tree of 19 nodes takes three tiles (8, 8 and 3 queries), each reading the keys up to its last query; its
    tokens go through the GEMMs and every one's logits are computed, unlike a prefill chunk's."""
    chain = StepTotals.of(StepShape.build(verify=[5], verify_context=[1000], decode=[99]))
    chunk = StepTotals.of(StepShape.build(prefill=[5], prefill_cached=[1000], decode=[99]))
    assert chain.tokens == chunk.tokens == 6
    assert chain.logit_tokens == 6 and chunk.logit_tokens == 2  # every verified token is sampled
    assert (chain.decode_seqs, chain.decode_pairs, chain.decode_longest) == (2, 1005 + 100, 1005)
    assert (chain.prefill_seqs, chain.prefill_queries, chain.prefill_on) == (0, 0, 0.0)
    tree = StepTotals.of(StepShape.build(verify=[19, 3], verify_context=[1000, 50]))
    assert (tree.decode_seqs, tree.decode_pairs) == (4, 1008 + 1016 + 1019 + 53)
    windowed = StepTotals.of(StepShape.build(verify=[19], verify_context=[1000]), sliding_window=1010)
    assert windowed.decode_pairs == 1008 + 1010 + 1010


def test_moe_reads_only_the_experts_hit() -> None:
    uniform = RoutingModel().probabilities(8, 2)
    assert expected_distinct(uniform, 1).sum() == pytest.approx(2.0)
    assert expected_distinct(uniform, 10_000).sum() == pytest.approx(8.0)
    dep = Deployment.build("mixtral-8x7b", "h100", tp=2)
    model = CostModel(dep, cuda_graphs=False)
    one = model.price(StepShape.build(decode=[100]))
    many = model.price(StepShape.build(decode=[100] * 256))
    expert_bytes = {c: sum(r.bytes for r in cost.breakdown if r.name in ("moe_gate_up", "moe_down"))
                    for c, cost in (("one", one), ("many", many))}
    per_expert = 3 * 4096 * 14336 * 2 / 2 * 32  # one expert's weights on one of 2 GPUs, 32 layers
    inter = 14336 // 2
    io = {n: 32 * n * 2 * ((4096 + 2 * inter) + (inter + 4096)) * 2 for n in (1, 256)}  # top-2 rows in and out
    assert expert_bytes["one"] - io[1] == pytest.approx(2 * per_expert, rel=1e-9)
    assert expert_bytes["many"] - io[256] == pytest.approx(8 * per_expert, rel=1e-6)


def test_bad_shapes_are_rejected_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="prefill_tokens: value 0 is below the minimum 1"):
        StepShape.build(prefill=[0])
    with pytest.raises(ValueError, match="prefill_cached: has 1 values but must have one per request"):
        StepShape.build(prefill=[5, 6], prefill_cached=[1])
    with pytest.raises(ValueError, match="decode_context: value -1"):
        StepShape.build(decode=np.array([-1]))
    with pytest.raises(ValueError, match=r"verify_levels: shape \(2,\); allowed: one row per verification"):
        StepShape.build(verify=[4], verify_levels=[2, 1])
    with pytest.raises(ValueError, match=r"verify_levels: rows of \[4\] nodes; allowed: at most"):
        StepShape.build(verify=[4], verify_levels=[[2, 2]])
    with pytest.raises(ValueError, match="verify_levels: value -1 is below the minimum 0"):
        StepShape.build(verify=[4], verify_levels=[[4, -1]])
    tree = StepShape.build(verify=[6, 3], verify_context=[9, 4], verify_levels=[[3, 2], [2, 0]])
    again = StepShape.from_dict(tree.to_dict())
    assert again.verify_levels is not None and again.verify_levels.tolist() == [[3, 2], [2, 0]]
