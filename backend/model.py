"""A Llama-family decoder in plain PyTorch over a paged KV cache (GQA, RoPE, RMSNorm, SwiGLU).

Built from a catalog `ModelSpec` with random weights (timings depend on shapes, not values), or loaded
from a local safetensors checkpoint with Hugging Face parameter names. One forward pass runs the tokens
of many requests flattened together: each request's new tokens attend, causally, to its cached tokens
and to each other (Vaswani et al. 2017; Touvron et al., Llama 2, 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hardware.specs import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding, half-split layout as in Hugging Face Llama. x: (T, heads, d)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class Sequence:
    """One request's part of a forward pass: `length` new tokens starting at flat index `start`, after
    `cached` tokens already in the cache; `slots` are the cache slots of all its cached + new tokens."""

    start: int
    length: int
    cached: int
    slots: torch.Tensor


class PagedKVCache:
    """K and V of every layer in `num_blocks` blocks of `block_size` slots (slot = block * size + offset)."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        d, h, kvh = spec.head_size, spec.num_attention_heads, spec.num_key_value_heads
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, h, kvh, d
        self.theta, self.window = spec.rope_theta, spec.sliding_window
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=spec.attention_bias)
        self.k_proj = nn.Linear(spec.hidden_size, kvh * d, bias=spec.attention_bias)
        self.v_proj = nn.Linear(spec.hidden_size, kvh * d, bias=spec.attention_bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=False)

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - self.window
        return allowed

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seqs: list[Sequence],
                cache: PagedKVCache) -> torch.Tensor:
        t = x.shape[0]
        q = rope(self.q_proj(x).view(t, self.heads, self.head_dim), positions, self.theta)
        k = rope(self.k_proj(x).view(t, self.kv_heads, self.head_dim), positions, self.theta)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        kc.index_copy_(0, slots, k)
        vc.index_copy_(0, slots, v)
        out = torch.empty_like(q)
        decodes = [s for s in seqs if s.length == 1]
        for s in seqs:
            if s.length == 1 and len(decodes) > 1:
                continue
            total = s.cached + s.length
            qs = q[s.start:s.start + s.length].transpose(0, 1)  # (heads, len, d)
            ks, vs = kc[s.slots].transpose(0, 1), vc[s.slots].transpose(0, 1)  # (kv_heads, total, d)
            mask = self._mask(torch.arange(s.cached, total, device=x.device), torch.arange(total, device=x.device))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            out[s.start:s.start + s.length] = o.transpose(0, 1)
        if len(decodes) > 1:  # one padded batched call for all single-token rows
            lengths = torch.tensor([s.cached + 1 for s in decodes], device=x.device)
            longest = int(lengths.max())
            index = torch.zeros(len(decodes), longest, dtype=torch.long, device=x.device)
            for i, s in enumerate(decodes):
                index[i, : s.cached + 1] = s.slots
            k_pos = torch.arange(longest, device=x.device)
            valid = k_pos[None, :] < lengths[:, None]
            if self.window is not None:
                valid &= k_pos[None, :] > lengths[:, None] - 1 - self.window
            rows = torch.tensor([s.start for s in decodes], device=x.device)
            qd = q[rows][:, :, None, :]  # (B, heads, 1, d)
            kd, vd = kc[index].transpose(1, 2), vc[index].transpose(1, 2)  # (B, kv_heads, longest, d)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=valid[:, None, None, :], enable_gqa=True)
            out[rows] = o[:, :, 0, :]
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size)
        self.mlp = MLP(spec)

    def forward(self, x, positions, slots, seqs, cache):  # type: ignore[no-untyped-def]
        x = x + self.self_attn(self.input_layernorm(x), positions, slots, seqs, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head, with Hugging Face parameter names."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.is_moe:
            raise ValueError(f"{spec.id}: the backend runs dense models; MoE is not implemented yet")
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seqs: list[Sequence],
                cache: PagedKVCache, logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of the flat rows `logit_rows` after running all tokens."""
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, positions, slots, seqs, cache)
        return self.lm_head(self.norm(x[logit_rows])).float()


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0,
                checkpoint: str | None = None) -> LlamaModel:
    """The model with random weights (seeded: normal with std 1/sqrt(fan-in), so that outputs depend on
    the context) or a local safetensors checkpoint."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaModel(spec).to(dtype)
    if checkpoint is None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif p.dim() == 2:  # linear weights and the embedding table
                    p.normal_(0.0, p.shape[1] ** -0.5)
                else:  # biases
                    p.normal_(0.0, 0.02)
    else:
        from safetensors.torch import load_file  # optional: only for users with a checkpoint

        files = sorted(Path(checkpoint).glob("*.safetensors")) if Path(checkpoint).is_dir() else [Path(checkpoint)]
        state = {}
        for f in files:
            state.update({k.removeprefix("model."): v for k, v in load_file(str(f)).items()})
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {checkpoint}: missing {missing[:3]}..., unexpected {unexpected[:3]}...")
    return model.eval()
