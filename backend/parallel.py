"""Tensor parallelism for the backend's model (Megatron-LM style: Shoeybi et al., 2019).

Each rank holds a slice of every layer: its query heads and their KV heads (replicated when there are
fewer KV heads than ranks, as vLLM does), its share of the MLP's intermediate size, and its share of the
vocabulary. The attention output projection and the MLP's down projection are row-parallel and end in an
all-reduce; the embedding is vocabulary-parallel (an all-reduce joins the shards); the LM head's logits are
gathered across ranks. Ranks hold the same full model before slicing (the same seed), so a sharded model
computes what the unsharded one does. The collectives are torch.distributed calls: NCCL on GPUs, Gloo on
the CPU (which is how the tests run it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hardware.specs import kv_heads_per_gpu


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group (`group`: a torch.distributed group; None: world)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if x.is_cuda:  # one collective into one buffer (capturable in a CUDA graph)
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
            return out.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


def _keep(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.contiguous().clone(), requires_grad=False))


def shard_model(model: nn.Module, shard: Shard) -> nn.Module:
    """Slice a full `LlamaModel` in place down to rank `shard.rank` of `shard.size`."""
    if shard.size == 1:
        return model
    spec, r, n = model.spec, shard.rank, shard.size
    if spec.is_moe:
        raise ValueError(f"{spec.id}: the backend runs MoE models on one GPU (tensor parallel size 1, got {n})")
    heads, kv_all, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_size
    for field, value in (("num_attention_heads", heads), ("intermediate_size", spec.intermediate_size),
                         ("vocab_size", spec.vocab_size)):
        if value % n:
            raise ValueError(f"tensor parallel size {n} must divide {field} = {value} of {spec.id}")
    hq, kv = heads // n, kv_heads_per_gpu(spec, n)
    kv_first = r * kv if kv_all >= n else r * kv_all // n
    q_rows = slice(r * hq * d, (r + 1) * hq * d)
    k_rows = slice((heads + kv_first) * d, (heads + kv_first + kv) * d)
    v_rows = slice((heads + kv_all + kv_first) * d, (heads + kv_all + kv_first + kv) * d)
    inter = spec.intermediate_size // n
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("weight", "bias"):
            full = getattr(attn.qkv_proj, name)
            if full is not None:
                _keep(attn.qkv_proj, name, torch.cat([full[q_rows], full[k_rows], full[v_rows]]))
        _keep(attn.o_proj, "weight", attn.o_proj.weight[:, q_rows])
        attn.heads, attn.kv_heads, attn.shard = hq, kv, shard
        gate_up = mlp.gate_up_proj.weight
        total = spec.intermediate_size
        _keep(mlp.gate_up_proj, "weight", torch.cat([gate_up[r * inter:(r + 1) * inter],
                                                     gate_up[total + r * inter:total + (r + 1) * inter]]))
        _keep(mlp.down_proj, "weight", mlp.down_proj.weight[:, r * inter:(r + 1) * inter])
        mlp.shard = shard
    vocab = spec.vocab_size // n
    tied = model.lm_head.weight is model.embed_tokens.weight
    _keep(model.embed_tokens, "weight", model.embed_tokens.weight[r * vocab:(r + 1) * vocab])
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        _keep(model.lm_head, "weight", model.lm_head.weight[r * vocab:(r + 1) * vocab])
    model.shard, model.vocab_start, model.vocab_local = shard, r * vocab, vocab
    return model
