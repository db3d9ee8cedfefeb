"""A mixture-of-experts MLP for the backend: top-k routing and the experts as grouped GEMMs.

Mixtral (Jiang et al., 2024) and Qwen-MoE layers: a router scores every expert per token, each token runs
its top-k experts (SwiGLU each) and their outputs are summed with the routing weights; Qwen2-MoE adds a
shared expert gated by a sigmoid. The token copies are sorted by expert and every expert's rows run in one
grouped GEMM per projection (`torch.nn.functional.grouped_mm`: CUTLASS grouped GEMM on Hopper, as the fused
MoE kernels of vLLM and SGLang run them), so a step launches the same few kernels whatever the routing and
no host synchronisation happens (CUDA graphs capture it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backend.fused import silu_mul
from hardware.specs import ModelSpec


class MoE(nn.Module):
    """Router, routed experts (stacked weights, Hugging Face's gate/up fused per expert) and shared experts."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, e, inter = spec.hidden_size, spec.num_experts, spec.expert_intermediate_size
        self.top_k, self.num_experts = spec.experts_per_token, e
        self.renormalize = spec.model_type != "qwen2_moe"  # Qwen2-MoE keeps the softmax weights of the top-k
        self.gate = nn.Linear(h, e, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(e, h, 2 * inter))  # (experts, K, N) as grouped_mm takes them
        self.w_down = nn.Parameter(torch.empty(e, inter, h))
        shared = spec.shared_intermediate_size
        self.shared_gate_up = nn.Linear(h, 2 * shared, bias=False) if shared else None
        self.shared_down = nn.Linear(shared, h, bias=False) if shared else None
        self.shared_expert_gate = nn.Linear(h, 1, bias=False) if spec.shared_expert_intermediate_size else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids) of each token's top-k experts, (tokens, k) each."""
        probs = self.gate(x).softmax(dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
