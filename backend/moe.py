"""A mixture-of-experts MLP for the backend: top-k routing and the experts as grouped GEMMs.

Mixtral (Jiang et al., 2024) and Qwen-MoE layers: a router scores every expert per token, each token runs
its top-k experts (SwiGLU each) and their outputs are summed with the routing weights; Qwen2-MoE adds a
shared expert gated by a sigmoid. The token copies are sorted by expert and every expert's rows run in one
grouped GEMM per projection (`torch.nn.functional.grouped_mm`: CUTLASS grouped GEMM on Hopper), so a step
launches the same few kernels whatever the routing and no host synchronisation happens (CUDA graphs capture
it).

On CUDA (and on CPU in Triton's interpreter, for the tests) the routing and the permutation run as vLLM's
fused MoE does (`vllm/model_executor/layers/fused_moe`): one softmax + top-k kernel that also counts the
copies per expert (`topk_softmax` with `moe_align_block_size`'s counting), one kernel that places every copy
at its row (grouped_mm cannot gather rows inside, as vLLM's Triton GEMM does), and one weighted sum
(`moe_sum`) that also adds the gated shared expert. Otherwise `MoE.forward_torch` runs plain PyTorch (argsort,
scatter_add, index_add): the reference the kernels are checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backend import kernels
from backend.fused import silu_mul
from backend.kernels import triton
from hardware.specs import ModelSpec

if triton is not None:
    import triton.language as tl

    @triton.jit(do_not_specialize=["n_tokens"])
    def _route_kernel(LOGITS, W, IDS, RANKS, COUNTS, n_tokens, stride_l,
                      E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                      BLOCK_T: tl.constexpr, RENORMALIZE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        experts, slots = tl.arange(0, E_PAD), tl.arange(0, K_PAD)
        ok, e_ok = rows < n_tokens, experts < E
        z = tl.load(LOGITS + rows[:, None].to(tl.int64) * stride_l + experts[None, :],
                    mask=ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        z = tl.where(e_ok[None, :], z, float("-inf"))
        p = tl.exp(z - tl.max(z, 1)[:, None])
        p = tl.where(e_ok[None, :], p / tl.sum(p, 1)[:, None], -1.0)  # padding is never chosen
        top_w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
        top_e = tl.zeros([BLOCK_T, K_PAD], tl.int32)
        top_r = tl.zeros([BLOCK_T, K_PAD], tl.int32)
        for j in tl.static_range(K):  # k passes of argmax; equal weights go to the lower expert id
            w, e = tl.max(p, 1, return_indices=True, return_indices_tie_break_left=True)
            rank = tl.atomic_add(COUNTS + e, 1, mask=ok, sem="relaxed")  # copies of e before this one
            here = slots[None, :] == j
            top_w = tl.where(here, w[:, None], top_w)
            top_e = tl.where(here, e[:, None], top_e)
            top_r = tl.where(here, rank[:, None], top_r)
            p = tl.where(experts[None, :] == e[:, None], -1.0, p)
        if RENORMALIZE:
            top_w = top_w / tl.sum(top_w, 1)[:, None]
        at = rows[:, None] * K + slots[None, :]
        keep = ok[:, None] & (slots < K)[None, :]
        tl.store(W + at, top_w, mask=keep)
        tl.store(IDS + at, top_e, mask=keep)
        tl.store(RANKS + at, top_r, mask=keep)

    @triton.jit(do_not_specialize=["n_copies"])
    def _permute_kernel(X, IDS, RANKS, COUNTS, XS, POS, OFFS, n_copies, stride_x,
                        K: tl.constexpr, H: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        block, part = tl.program_id(0), tl.program_id(1)
        copies = block * BLOCK_C + tl.arange(0, BLOCK_C)
        experts = tl.arange(0, E_PAD)
        ok = copies < n_copies
        counts = tl.load(COUNTS + experts, mask=experts < E, other=0)
        e = tl.load(IDS + copies, mask=ok, other=0)
        # row = the copies of the experts before e (the exclusive cumsum, gathered by a masked sum) + rank
        start = tl.sum(tl.where(experts[None, :] < e[:, None], counts[None, :], 0), 1)
        row = start + tl.load(RANKS + copies, mask=ok, other=0)
        cols = part * BLOCK_H + tl.arange(0, BLOCK_H)
        m = ok[:, None] & (cols < H)[None, :]
        v = tl.load(X + (copies // K).to(tl.int64)[:, None] * stride_x + cols[None, :], mask=m)
        tl.store(XS + row.to(tl.int64)[:, None] * H + cols[None, :], v, mask=m)
        if part == 0:
            tl.store(POS + copies, row, mask=ok)
            if block == 0:  # each expert's end row, as grouped_mm's offs
                tl.store(OFFS + experts, tl.cumsum(counts, 0), mask=experts < E)

    @triton.jit
    def _sum_kernel(OUT, POS, W, Y, SHARED, X, GATE, stride_x,
                    K: tl.constexpr, K_PAD: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr,
                    HAS_SHARED: tl.constexpr, GATED: tl.constexpr):
        parts = (H + BLOCK_H - 1) // BLOCK_H
        t, part = tl.program_id(0) // parts, tl.program_id(0) % parts  # a token's parts side by side
        t = t.to(tl.int64)
        slots, cols = tl.arange(0, K_PAD), part * BLOCK_H + tl.arange(0, BLOCK_H)
        s_ok, c_ok = slots < K, cols < H
        rows = tl.load(POS + t * K + slots, mask=s_ok, other=0).to(tl.int64)
        w = tl.load(W + t * K + slots, mask=s_ok, other=0.0)
        out = tl.load(OUT + rows[:, None] * H + cols[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        y = tl.sum(out.to(tl.float32) * w[:, None], 0)
        if HAS_SHARED:
            shared = tl.load(SHARED + t * H + cols, mask=c_ok, other=0.0).to(tl.float32)
            if GATED:  # sigmoid(x . gate): Qwen2-MoE's shared_expert_gate, a GEMV done here
                dot = tl.zeros([BLOCK_H], tl.float32)
                for h in range(0, H, BLOCK_H):
                    c = h + tl.arange(0, BLOCK_H)
                    dot += (tl.load(X + t * stride_x + c, mask=c < H, other=0.0).to(tl.float32)
                            * tl.load(GATE + c, mask=c < H, other=0.0).to(tl.float32))
                shared = shared * tl.sigmoid(tl.sum(dot, 0))
            y += shared
        tl.store(Y + t * H + cols, y.to(Y.dtype.element_ty), mask=c_ok)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool, counts: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights fp32, expert ids int32, ranks int32), (tokens, k) each, of each token's top-k experts under
    the softmax of its router `logits` (vLLM's `topk_softmax`); adds each token copy to `counts` (int32,
    zeroed by the caller), its rank being the count of its expert before it."""
    t, e = logits.shape
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int32, device=logits.device)
    ranks = torch.empty_like(ids)
    block = 16
    _route_kernel[(triton.cdiv(t, block),)](logits, weights, ids, ranks, counts, t, logits.stride(0), E=e,
                                           E_PAD=_pow2(e), K=k, K_PAD=_pow2(k), BLOCK_T=block,
                                           RENORMALIZE=renormalize, num_warps=4)
    return weights, ids, ranks


def permute(x: torch.Tensor, ids: torch.Tensor, ranks: torch.Tensor, counts: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x's token copies sorted by expert (T k, H), each copy's row there (T, k) int32, each expert's end row
    (E,) int32 for grouped_mm): copy (t, j) of expert e goes to row (copies of experts < e) + its rank."""
    t, h = x.shape
    n, e = ids.numel(), counts.numel()
    xs = torch.empty((n, h), dtype=x.dtype, device=x.device)
    pos = torch.empty_like(ids)
    offs = torch.empty(e, dtype=torch.int32, device=x.device)
    block_c, block_h = 16, min(512, _pow2(h))
    _permute_kernel[(triton.cdiv(n, block_c), triton.cdiv(h, block_h))](
        x, ids, ranks, counts, xs, pos, offs, n, x.stride(0), K=ids.shape[1], H=h, E=e, E_PAD=_pow2(e),
        BLOCK_C=block_c, BLOCK_H=block_h, num_warps=4)
    return xs, pos, offs


def moe_sum(out: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, x: torch.Tensor,
            shared: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] out[pos[t, j]] in fp32 (vLLM's `moe_sum`, with the routing weights applied
    here), plus `shared`[t], times sigmoid(x[t] . `gate`) when gated; y has x's shape and dtype."""
    t, h = x.shape
    k = pos.shape[1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    block = min(512, _pow2(h))
    _sum_kernel[(t * triton.cdiv(h, block),)](
        out, pos, weights, y, shared if shared is not None else y, x, gate if gate is not None else x,
        x.stride(0), K=k, K_PAD=_pow2(k), H=h, BLOCK_H=block, HAS_SHARED=shared is not None,
        GATED=gate is not None, num_warps=4)
    return y


def renormalizes(spec: ModelSpec) -> bool:
    """Whether a model's router renormalises its top-k weights (Qwen2-MoE keeps their softmax values)."""
    return spec.model_type != "qwen2_moe"


class MoE(nn.Module):
    """Router, routed experts (stacked weights, Hugging Face's gate/up fused per expert) and shared experts."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, e, inter = spec.hidden_size, spec.num_experts, spec.expert_intermediate_size
        self.top_k, self.num_experts = spec.experts_per_token, e
        self.renormalize = renormalizes(spec)
        self.gate = nn.Linear(h, e, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(e, h, 2 * inter))  # (experts, K, N) as grouped_mm takes them
        self.w_down = nn.Parameter(torch.empty(e, inter, h))
        shared = spec.shared_intermediate_size
        self.shared_gate_up = nn.Linear(h, 2 * shared, bias=False) if shared else None
        self.shared_down = nn.Linear(shared, h, bias=False) if shared else None
        self.shared_expert_gate = nn.Linear(h, 1, bias=False) if spec.shared_expert_intermediate_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward_fused` where the Triton kernels run (CUDA, or CPU inside `kernels_on_cpu`), else
        `forward_torch`."""
        if kernels.available() and kernels.use_kernels(x):
            return self.forward_fused(x)
        return self.forward_torch(x)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids) of each token's top-k experts, (tokens, k) each."""
        probs = self.gate(x).softmax(dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The layer in 8 kernels (router GEMM, zeroing the counts, `topk_softmax`, `permute`, the two grouped GEMMs
        with `silu_mul` between, `moe_sum`), plus the shared expert's GEMMs and `silu_mul`."""
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        weights, ids, ranks = topk_softmax(self.gate(x), self.top_k, self.renormalize, counts)
        xs, pos, offs = permute(x, ids, ranks, counts)
        out = F.grouped_mm(silu_mul(F.grouped_mm(xs, self.w_gate_up, offs=offs)), self.w_down, offs=offs)
        shared = gate = None
        if self.shared_gate_up is not None and self.shared_down is not None:
            shared = self.shared_down(silu_mul(self.shared_gate_up(x)))
            gate = self.shared_expert_gate.weight[0] if self.shared_expert_gate is not None else None
        return moe_sum(out, pos, weights, x, shared, gate)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The layer in plain PyTorch: copies sorted by a stable argsort, summed back by index_add_."""
        weights, ids = self.route(x)
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)  # token copies grouped by expert
        token = order // self.top_k
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)  # each expert's last row (exclusive)
        rows = F.grouped_mm(x[token], self.w_gate_up, offs=offs)
        out = F.grouped_mm(silu_mul(rows), self.w_down, offs=offs)
        y = torch.zeros_like(x).index_add_(0, token, out * weights.flatten()[order, None].to(out.dtype))
        if self.shared_gate_up is not None and self.shared_down is not None:
            shared = self.shared_down(silu_mul(self.shared_gate_up(x)))
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y


def warm_up(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
    """Launch the routing, permutation and sum kernels once at the model's sizes (Triton compiles on the first
    launch; token counts are not specialised on)."""
    if not (kernels.available() and kernels.use_kernels(torch.empty(0, device=device))):
        return
    h, e, k = spec.hidden_size, spec.num_experts, spec.experts_per_token
    x = torch.zeros(2, h, dtype=dtype, device=device)
    counts = torch.zeros(e, dtype=torch.int32, device=device)
    weights, ids, ranks = topk_softmax(torch.zeros(2, e, dtype=dtype, device=device), k,
                                       renormalizes(spec), counts)
    xs, pos, _ = permute(x, ids, ranks, counts)
    shared = x if spec.shared_intermediate_size else None
    gate = x[0] if spec.shared_expert_intermediate_size else None
    moe_sum(xs, pos, weights, x, shared, gate)


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer token by token and expert by expert (plain matmuls): the test oracle."""
    weights, ids = moe.route(x)
    inter = moe.w_down.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate_up = x[t] @ moe.w_gate_up[e]
            out[t] += w * ((F.silu(gate_up[:inter]) * gate_up[inter:]) @ moe.w_down[e])
    if moe.shared_gate_up is not None and moe.shared_down is not None:
        gate, up = moe.shared_gate_up(x).chunk(2, dim=-1)
        shared = moe.shared_down(F.silu(gate) * up)
        if moe.shared_expert_gate is not None:
            shared = torch.sigmoid(moe.shared_expert_gate(x)) * shared
        out = out + shared
    return out
