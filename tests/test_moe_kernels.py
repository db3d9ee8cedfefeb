"""The MoE layer's Triton kernels (`backend.moe`: softmax + top-k with per-expert counts, the permutation by
expert, the weighted sum with the gated shared expert), run on CPU in Triton's interpreter: the layer against
the token-by-token reference and the plain-PyTorch path, Qwen2-MoE style (gated shared expert, top-k weights
kept), Mixtral style (renormalised, no shared expert) and a shared expert without a gate, from 1 token to
more than a block, with skewed routing; counts, offsets and every copy's row checked one by one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
torch.set_num_threads(1)

from backend import moe as moe_module  # noqa: E402
from backend.kernels import kernels_on_cpu  # noqa: E402
from backend.moe import MoE, permute, reference_moe, topk_softmax  # noqa: E402
from hardware.catalog import get_model  # noqa: E402

BASE = get_model("tiny-moe").model_copy(update={"hidden_size": 32, "moe_intermediate_size": 16})
STYLES = {  # 12 experts: padded to 16 in the kernels
    "qwen2_moe": BASE.model_copy(update={"num_local_experts": 12, "num_experts_per_tok": 4,
                                         "shared_expert_intermediate_size": 24}),
    "mixtral": BASE.model_copy(update={"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                                       "shared_expert_intermediate_size": 0}),
    "ungated_shared": BASE.model_copy(update={"model_type": "qwen3_moe", "num_local_experts": 12,
                                              "num_experts_per_tok": 3, "shared_expert_intermediate_size": 0,
                                              "n_shared_experts": 1}),
}
TOKENS = [(1, False), (5, False), (37, False), (37, True)]  # 37: not a multiple of the 16-row blocks
HOT = 3  # the expert every token picks under skewed routing


def layer(style: str, tokens: int, skew: bool, seed: int = 0) -> tuple[MoE, torch.Tensor]:
    """An MoE layer with random weights and `tokens` inputs; with `skew`, a direction in the inputs that
    expert HOT's router row favours, so that it is every token's first choice."""
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(STYLES[style])
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
        x = torch.randn(tokens, moe.gate.in_features, generator=gen)
        if skew:
            u = torch.randn(moe.gate.in_features, generator=gen)
            u /= u.norm()
            moe.gate.weight[HOT] += 4.0 * u
            x += 3.0 * u
    return moe, x


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("tokens, skew", TOKENS)
def test_fused_layer_matches_the_reference_and_the_torch_path(style: str, tokens: int, skew: bool) -> None:
    moe, x = layer(style, tokens, skew)
    with torch.no_grad():
        want, plain = reference_moe(moe, x), moe(x)
        with kernels_on_cpu():
            got = moe(x)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert want.abs().max() > 0.1  # routed and shared outputs are not vanishing


@pytest.mark.parametrize("style", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("tokens, skew", [(1, False), (37, False), (37, True)])
def test_routing_counts_and_every_copys_row(style: str, tokens: int, skew: bool) -> None:
    """Top-k weights and ids as `MoE.route`; counts and offs a bincount and its cumsum; every copy on one row
    of its expert's rows (pos a permutation of the T k rows), and that row holds its token."""
    moe, x = layer(style, tokens, skew)
    e, k = moe.num_experts, moe.top_k
    with torch.no_grad():
        logits = moe.gate(x)
        want_w, want_ids = moe.route(x)
        counts = torch.zeros(e, dtype=torch.int32)
        with kernels_on_cpu():
            weights, ids, ranks = topk_softmax(logits, k, moe.renormalize, counts)
            xs, pos, offs = permute(x, ids, ranks, counts)
    assert ids.dtype == pos.dtype == offs.dtype == counts.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), want_ids)  # both by decreasing weight
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)
    bins = torch.bincount(want_ids.flatten(), minlength=e).int()
    assert torch.equal(counts, bins) and torch.equal(offs, bins.cumsum(0).int())
    if skew:
        assert counts[HOT] == tokens and (ids[:, 0] == HOT).all()
    assert sorted(pos.flatten().tolist()) == list(range(tokens * k))
    p, expert = pos.long(), ids.long()
    start = offs.long() - counts.long()
    assert ((p >= start[expert]) & (p < offs.long()[expert])).all()
    assert all(sorted(ranks[ids == i].tolist()) == list(range(int(bins[i]))) for i in range(e))
    assert torch.equal(xs[p.flatten()], x.repeat_interleave(k, 0))


def test_warm_up_launches_the_moe_kernels(monkeypatch) -> None:
    """`warm_up_kernels` of an MoE model runs the routing, permutation and sum kernels once (Triton compiles
    them before serving), and nothing outside the interpreter on CPU."""
    from backend import attention, fused
    from backend.model import warm_up_kernels

    monkeypatch.setattr(attention, "warm_up", lambda *a, **k: None)  # tested in test_paged_attention
    monkeypatch.setattr(fused, "warm_up", lambda *a, **k: None)
    seen: list[str] = []
    for name in ("topk_softmax", "permute", "moe_sum"):
        real = getattr(moe_module, name)
        monkeypatch.setattr(moe_module, name, lambda *a, _n=name, _f=real, **k: seen.append(_n) or _f(*a, **k))
    spec = get_model("tiny-moe")
    warm_up_kernels(spec, 1, spec.num_key_value_heads, 16, torch.float32, torch.device("cpu"))
    assert not seen
    with kernels_on_cpu():
        warm_up_kernels(spec, 1, spec.num_key_value_heads, 16, torch.float32, torch.device("cpu"))
    assert seen == ["topk_softmax", "permute", "moe_sum"]


def test_moe_check_cpu_smoke(capsys) -> None:
    """`calibrate/moe_check.py --cpu-smoke`: the GPU check's code path at tiny shapes."""
    from calibrate.moe_check import main

    assert main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    assert "all ok" in out and out.count(" ok") >= 6 + 1
