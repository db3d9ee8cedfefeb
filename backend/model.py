"""A Llama-family decoder in plain PyTorch over a paged KV cache (GQA, RoPE, RMSNorm, SwiGLU).

Built from a catalog `ModelSpec` with random weights (timings depend on shapes, not values), or loaded
from a local safetensors checkpoint with Hugging Face parameter names. One forward pass runs the tokens
of many requests flattened together: each request's new tokens attend, causally, to its cached tokens
and to each other (Vaswani et al. 2017; Touvron et al., Llama 2, 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(positions: torch.Tensor, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotary angles, (T, 1, d/2), computed once per pass."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
    ang = positions.float()[:, None] * inv[None, :]
    return ang.cos()[:, None, :], ang.sin()[:, None, :]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, half-split layout as in Hugging Face Llama. x: (T, heads, d)."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class Chunk:
    """A request's new tokens in a pass: rows [start, start + length) of the flat batch, after `cached`
    tokens already in the cache; `table` lists its cache blocks."""

    start: int
    length: int
    cached: int
    table: list[int]


@dataclass
class AttentionMeta:
    """Where one pass writes and reads the cache, built once per step (not per layer).

    Multi-token chunks attend one by one (`prefills`: rows, key slots, mask); single-token rows (decodes)
    attend together in one padded call (`decode_rows`, `decode_index`, `decode_valid`)."""

    slots: torch.Tensor
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]]
    decode_rows: torch.Tensor | None = None
    decode_index: torch.Tensor | None = None
    decode_valid: torch.Tensor | None = None


def _slots(table: list[int], positions: np.ndarray, block_size: int) -> np.ndarray:
    return np.asarray(table, dtype=np.int64)[positions // block_size] * block_size + positions % block_size


def attention_meta(chunks: list[Chunk], block_size: int, device: torch.device, window: int | None) -> AttentionMeta:
    """Slots and masks of a pass over `chunks` (token order: chunk after chunk)."""
    new_slots = np.concatenate([_slots(c.table, np.arange(c.cached, c.cached + c.length), block_size)
                                for c in chunks])
    prefills = []
    for c in (c for c in chunks if c.length > 1):
        total = c.cached + c.length
        k_pos, q_pos = np.arange(total), np.arange(c.cached, total)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - window
        prefills.append((c.start, c.length, torch.from_numpy(_slots(c.table, k_pos, block_size)).to(device),
                         torch.from_numpy(allowed).to(device)))
    meta = AttentionMeta(torch.from_numpy(new_slots).to(device), prefills)
    decodes = [c for c in chunks if c.length == 1]
    if decodes:
        lengths = np.array([c.cached + 1 for c in decodes])
        longest = int(lengths.max())
        width = -(-longest // block_size)
        tables = np.zeros((len(decodes), width), dtype=np.int64)
        for i, c in enumerate(decodes):
            tables[i, : min(len(c.table), width)] = c.table[:width]
        pos = np.arange(longest)
        valid = pos[None, :] < lengths[:, None]
        if window is not None:
            valid &= pos[None, :] > lengths[:, None] - 1 - window
        meta.decode_rows = torch.from_numpy(np.array([c.start for c in decodes])).to(device)
        meta.decode_index = torch.from_numpy(tables[:, pos // block_size] * block_size + pos % block_size).to(device)
        meta.decode_valid = torch.from_numpy(valid).to(device)
    return meta


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

    def forward(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], meta: AttentionMeta,
                cache: PagedKVCache) -> torch.Tensor:
        t = x.shape[0]
        q = rope(self.q_proj(x).view(t, self.heads, self.head_dim), *rot)
        k = rope(self.k_proj(x).view(t, self.kv_heads, self.head_dim), *rot)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        kc.index_copy_(0, meta.slots, k)
        vc.index_copy_(0, meta.slots, v)
        out = torch.empty_like(q)
        for start, length, kv_slots, mask in meta.prefills:
            qs = q[start:start + length].transpose(0, 1)  # (heads, length, d)
            ks, vs = kc[kv_slots].transpose(0, 1), vc[kv_slots].transpose(0, 1)  # (kv_heads, total, d)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            out[start:start + length] = o.transpose(0, 1)
        if meta.decode_rows is not None:  # every single-token row in one padded call
            qd = q[meta.decode_rows][:, :, None, :]  # (B, heads, 1, d)
            kd = kc[meta.decode_index].transpose(1, 2)  # (B, kv_heads, longest, d)
            vd = vc[meta.decode_index].transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_valid[:, None, None, :],
                                               enable_gqa=True)
            out[meta.decode_rows] = o[:, :, 0, :]
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

    def forward(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], meta: AttentionMeta,
                cache: PagedKVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rot, meta, cache)
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
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta, cache: PagedKVCache,
                logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of the flat rows `logit_rows` after running all tokens."""
        x = self.embed_tokens(tokens)
        rot = rope_tables(positions, self.spec.head_size, self.spec.rope_theta)
        for layer in self.layers:
            x = layer(x, rot, meta, cache)
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
