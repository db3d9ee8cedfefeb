"""A Llama-family decoder in plain PyTorch over a paged KV cache (GQA, RoPE, RMSNorm, SwiGLU).

Built from a catalog `ModelSpec` with random weights (timings depend on shapes, not values), or loaded
from a local safetensors checkpoint with Hugging Face parameter names. One forward pass runs the tokens
of many requests flattened together: each request's new tokens attend, causally, to its cached tokens
and to each other (Vaswani et al. 2017; Touvron et al., Llama 2, 2023).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backend.parallel import Shard, shard_model
from hardware.specs import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(positions: torch.Tensor, d: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotary angles, (T, 1, d/2), computed in float32 once per pass and
    cast to the activations' dtype (as Hugging Face Llama does)."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
    ang = positions.float()[:, None] * inv[None, :]
    return ang.cos()[:, None, :].to(dtype), ang.sin()[:, None, :].to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, half-split layout as in Hugging Face Llama. x: (T, heads, d)."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class Chunk:
    """A request's new tokens in a pass: rows [start, start + length) of the flat batch, after `cached`
    tokens already in the cache; `table` lists its cache blocks. `mask` (token trees): which of the last
    mask.shape[1] keys each row may see (every earlier key is visible); None: causal."""

    start: int
    length: int
    cached: int
    table: list[int]
    mask: np.ndarray | None = None


@dataclass
class AttentionGroup:
    """Consecutive rows [start, end) of the flat batch that attend in one variable-length call: sequence i
    has queries cu_q[i]:cu_q[i+1] and keys cu_k[i]:cu_k[i+1] of the K/V gathered at `kv_index` (cache
    slots). `q_lens`/`k_lens` are host copies for the CPU kernel; `k_buf`/`v_buf` optional static gather
    outputs (CUDA graphs)."""

    start: int
    end: int
    kv_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    q_lens: list[int]
    k_lens: list[int]
    k_buf: torch.Tensor | None = None
    v_buf: torch.Tensor | None = None
    masks: list[np.ndarray | None] | None = None  # token trees: per sequence, see `Chunk.mask`


@dataclass
class AttentionMeta:
    """Where one pass writes new K/V (`slots`) and how its rows attend (`groups`: prefill chunks, then
    decodes), built once per step, not per layer."""

    slots: torch.Tensor
    groups: list[AttentionGroup]


def cache_slots(table: list[int], positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slots (block x block size + offset) of a request's token `positions` under its block `table`."""
    return np.asarray(table, dtype=np.int64)[positions // block_size] * block_size + positions % block_size


def _cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)


def attention_group(chunks: list[Chunk], block_size: int, device: torch.device) -> AttentionGroup:
    """One varlen call over `chunks` (consecutive rows): each chunk's queries see its whole cache so far.

    The slots of every key are computed on the device from the block tables (a few vector operations),
    so the host's work grows with the blocks of the step, not with its tokens."""
    q_lens = [c.length for c in chunks]
    k_lens = [c.cached + c.length for c in chunks]
    tables = torch.tensor(list(itertools.chain.from_iterable(c.table for c in chunks)), dtype=torch.long,
                          device=device)
    first_block = torch.tensor(np.cumsum([0] + [len(c.table) for c in chunks[:-1]]), device=device)
    lengths, total = torch.tensor(k_lens, device=device), sum(k_lens)
    seq = torch.repeat_interleave(torch.arange(len(chunks), device=device), lengths, output_size=total)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(total, device=device) - starts[seq]
    index = tables[first_block[seq] + pos // block_size] * block_size + pos % block_size
    masks = [c.mask for c in chunks] if any(c.mask is not None for c in chunks) else None
    return AttentionGroup(chunks[0].start, chunks[-1].start + chunks[-1].length, index, _cumulative(q_lens, device),
                          _cumulative(k_lens, device), max(q_lens), max(k_lens), q_lens, k_lens, masks=masks)


def attention_meta(chunks: list[Chunk], block_size: int, device: torch.device, prefills: int) -> AttentionMeta:
    """Slots and attention groups of a pass over `chunks` (token order: chunk after chunk), the first
    `prefills` of them prefill chunks attending in one call, the rest decodes in another (as the cost
    model prices them: one prefill-attention and one decode-attention kernel)."""
    new_slots = np.concatenate([cache_slots(c.table, np.arange(c.cached, c.cached + c.length), block_size)
                                for c in chunks])
    groups = [attention_group(part, block_size, device) for part in (chunks[:prefills], chunks[prefills:]) if part]
    return AttentionMeta(torch.from_numpy(new_slots).to(device), groups)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: AttentionGroup,
                     window: int | None) -> torch.Tensor:
    """Causal attention per sequence, the mask aligned at the end (a chunk's first query sees the cached
    keys before it). CUDA: PyTorch's FlashAttention-2 varlen kernel (grouped-query heads natively);
    CPU, and token-tree masks anywhere: one `scaled_dot_product_attention` per sequence (the reference)."""
    if q.is_cuda and g.masks is None:
        heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
        if g.max_q == 1 and heads > kv_heads and window is None:
            # Decode: the query heads sharing a KV head become that head's query rows (each sequence then
            # has `group` queries that all see every key), so one kernel tile serves the whole group.
            group, rows = heads // kv_heads, q.shape[0]
            qg = q.view(rows, kv_heads, group, d).transpose(1, 2).reshape(rows * group, kv_heads, d)
            out = torch.ops.aten._flash_attention_forward(qg, k, v, g.cu_q * group, g.cu_k, group, g.max_k, 0.0,
                                                          False, False)[0]
            return out.view(rows, group, kv_heads, d).transpose(1, 2).reshape(rows, heads, d)
        left, right = (None, None) if window is None else (window - 1, 0)
        return torch.ops.aten._flash_attention_forward(q, k, v, g.cu_q, g.cu_k, g.max_q, g.max_k, 0.0, True, False,
                                                       window_size_left=left, window_size_right=right)[0]
    out, qs, ks = [], 0, 0
    for i, (lq, lk) in enumerate(zip(g.q_lens, g.k_lens)):
        q_pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        k_pos = torch.arange(lk, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        mask = g.masks[i] if g.masks is not None else None
        if mask is not None:  # a token tree: the last keys by the tree's ancestry, everything before visible
            tail = torch.from_numpy(mask).to(q.device)
            allowed = torch.cat([torch.ones(lq, lk - tail.shape[1], dtype=torch.bool, device=q.device), tail], 1)
        o = F.scaled_dot_product_attention(q[qs:qs + lq].transpose(0, 1), k[ks:ks + lk].transpose(0, 1),
                                           v[ks:ks + lk].transpose(0, 1), attn_mask=allowed, enable_gqa=True)
        out.append(o.transpose(0, 1))
        qs, ks = qs + lq, ks + lk
    return torch.cat(out)


class PagedKVCache:
    """K and V of every layer in `num_blocks` blocks of `block_size` slots (slot = block * size + offset)."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size


class Attention(nn.Module):
    """Fused QKV projection, RoPE on queries and keys together, paged K/V write, varlen attention."""

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        d, h, kvh = spec.head_size, spec.num_attention_heads, spec.num_key_value_heads
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, h, kvh, d
        self.theta, self.window = spec.rope_theta, spec.sliding_window
        self.qkv_proj = nn.Linear(spec.hidden_size, (h + 2 * kvh) * d, bias=spec.attention_bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=False)
        self.shard = Shard()  # tensor parallelism: `backend.parallel.shard_model` slices the heads

    def forward(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], meta: AttentionMeta,
                cache: PagedKVCache) -> torch.Tensor:
        t, h, kvh = x.shape[0], self.heads, self.kv_heads
        qkv = self.qkv_proj(x).view(t, h + 2 * kvh, self.head_dim)
        qk = rope(qkv[:, : h + kvh], *rot)
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kvh:]
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        kc.index_copy_(0, meta.slots, k)
        vc.index_copy_(0, meta.slots, v)
        parts = []
        for g in meta.groups:
            kg = torch.index_select(kc, 0, g.kv_index, out=g.k_buf) if g.k_buf is not None else kc[g.kv_index]
            vg = torch.index_select(vc, 0, g.kv_index, out=g.v_buf) if g.v_buf is not None else vc[g.kv_index]
            parts.append(varlen_attention(q[g.start:g.end], kg, vg, g, self.window))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.shard.all_reduce(self.o_proj(out.reshape(t, h * self.head_dim)))


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one GEMM."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.shard = Shard()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.shard.all_reduce(self.down_proj(F.silu(gate) * up))


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
        self.shard, self.vocab_start, self.vocab_local = Shard(), 0, spec.vocab_size

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings; under tensor parallelism each rank looks up its vocabulary slice."""
        if self.shard.size == 1:
            return self.embed_tokens(tokens)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        x = F.embedding(local.clamp(0, self.vocab_local - 1), self.embed_tokens.weight)
        return self.shard.all_reduce(x.masked_fill(outside[:, None], 0.0))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta, cache: PagedKVCache,
                logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits (float32, the whole vocabulary) of the flat rows `logit_rows` after running all tokens."""
        x = self.embed(tokens)
        rot = rope_tables(positions, self.spec.head_size, self.spec.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, rot, meta, cache)
        return self.shard.all_gather_last(self.lm_head(self.norm(x[logit_rows]))).float()


def fuse_hf_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face's separate q/k/v and gate/up projections concatenated into the fused ones."""
    fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    out, parts = {}, {}
    for name, tensor in state.items():
        prefix, _, rest = name.rpartition(".")  # rest: weight or bias
        owner, _, proj = prefix.rpartition(".")
        if proj in fused:
            target, pos = fused[proj]
            parts.setdefault(f"{owner}.{target}.{rest}", {})[pos] = tensor
        else:
            out[name] = tensor
    for name, pieces in parts.items():
        out[name] = torch.cat([pieces[i] for i in sorted(pieces)])
    return out


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0,
                checkpoint: str | None = None, shard: Shard = Shard()) -> LlamaModel:
    """The model with random weights (seeded: normal with std 1/sqrt(fan-in), so that outputs depend on
    the context) or a local safetensors checkpoint; with a `shard`, this rank's tensor-parallel slice."""
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
        missing, unexpected = model.load_state_dict(fuse_hf_projections(state), strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {checkpoint}: missing {missing[:3]}..., unexpected {unexpected[:3]}...")
    return shard_model(model, shard).eval()
