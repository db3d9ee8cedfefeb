"""A Llama-family decoder in plain PyTorch over a paged KV cache (GQA, RoPE, RMSNorm, SwiGLU).

Built from a catalog `ModelSpec` with random weights (timings depend on shapes, not values), or loaded
from a local safetensors checkpoint with Hugging Face parameter names. One forward pass runs the tokens
of many requests flattened together: each request's new tokens attend, causally, to its cached tokens
and to each other (Vaswani et al. 2017; Touvron et al., Llama 2, 2023).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from backend import attention, fused, moe
from backend.attention import AttentionMeta, attend_groups
from backend.fused import add_rmsnorm, rope, rope_and_cache, silu_mul  # noqa: F401 (rope: re-exported)
from backend.moe import MoE
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


class PagedKVCache:
    """K and V of every layer in `num_blocks` blocks of `block_size` slots (slot = block * size + offset)."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size


class Attention(nn.Module):
    """Fused QKV projection, RoPE on queries and keys together, paged K/V write, attention over the paged
    cache in place (`backend.attention`). Its three parts run apart in a piecewise CUDA graph
    (`backend.graphs`): `project` and `output` inside the graph pieces, `attend` between them."""

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        d, h, kvh = spec.head_size, spec.num_attention_heads, spec.num_key_value_heads
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, h, kvh, d
        self.theta, self.window = spec.rope_theta, spec.sliding_window
        self.qkv_proj = nn.Linear(spec.hidden_size, (h + 2 * kvh) * d, bias=spec.attention_bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=False)
        self.shard = Shard()  # tensor parallelism: `backend.parallel.shard_model` slices the heads

    def project(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                cache: PagedKVCache, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rotated queries (tokens, heads, d), into `out` if given; the new keys and values written to
        this layer's cache at `slots`."""
        qkv = self.qkv_proj(x).view(x.shape[0], self.heads + 2 * self.kv_heads, self.head_dim)
        return rope_and_cache(qkv, *rot, slots, cache.k[self.layer], cache.v[self.layer], self.heads, self.kv_heads,
                              out)

    def attend(self, q: torch.Tensor, meta: AttentionMeta, cache: PagedKVCache,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the queries over this layer's paged cache, group by group (into `out` if given)."""
        return attend_groups(q, cache.k[self.layer], cache.v[self.layer], meta.groups, cache.block_size, self.window,
                             out)

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """The output projection of the attention rows (summed over tensor-parallel ranks)."""
        return self.shard.all_reduce(self.o_proj(attn.reshape(attn.shape[0], self.heads * self.head_dim)))

    def forward(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], meta: AttentionMeta,
                cache: PagedKVCache) -> torch.Tensor:
        return self.output(self.attend(self.project(x, rot, meta.slots, cache), meta, cache))


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one GEMM."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.shard = Shard()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.all_reduce(self.down_proj(silu_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size)
        self.mlp: nn.Module = MoE(spec) if spec.is_moe_layer(layer) else MLP(spec)

    def pre(self, x: torch.Tensor, residual: torch.Tensor | None, rot: tuple[torch.Tensor, torch.Tensor],
            slots: torch.Tensor, cache: PagedKVCache, q_out: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to attention: the queries (into `q_out` if given) and the residual stream, which takes
        `x` in place (with no `residual`, `x` becomes it)."""
        norm = self.input_layernorm
        h, residual = add_rmsnorm(x, residual, norm.weight, norm.eps)
        return self.self_attn.project(h, rot, slots, cache, q_out), residual

    def post(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer after attention: its output and the residual stream before it is added."""
        norm = self.post_attention_layernorm
        h, residual = add_rmsnorm(self.self_attn.output(attn), residual, norm.weight, norm.eps)
        return self.mlp(h), residual

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rot: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMeta, cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's output and the residual stream before it is added (each add fused with the norm
        after it)."""
        q, residual = self.pre(x, residual, rot, meta.slots, cache)
        return self.post(self.self_attn.attend(q, meta, cache), residual)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head, with Hugging Face parameter names."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.is_mla:
            raise ValueError(f"{spec.id}: the backend runs GQA attention; multi-head latent attention is simulated "
                             "only")
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
        return self.logits(*self.hidden(tokens, positions, meta, cache), logit_rows)

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta, cache: PagedKVCache
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's output and the residual stream before it, every row."""
        x = self.embed(tokens)
        rot = rope_tables(positions, self.spec.head_size, self.spec.rope_theta, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rot, meta, cache)
        assert residual is not None
        return x, residual

    @torch.no_grad()
    def logits(self, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits (float32, the whole vocabulary) of `rows` from `hidden`'s output."""
        h, _ = add_rmsnorm(x[rows], residual[rows], self.norm.weight, self.norm.eps)
        return self.shard.all_gather_last(self.lm_head(h)).float()


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


def warm_up_kernels(spec: ModelSpec, tp: int, kv_heads: int, block_size: int, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Compile the Triton kernels of this model's passes before serving (no-op where they do not run)."""
    heads = spec.num_attention_heads // tp
    attention.warm_up(heads, kv_heads, spec.head_size, spec.sliding_window, block_size, dtype, device)
    sizes = {spec.intermediate_size // tp} | ({spec.expert_intermediate_size, spec.shared_intermediate_size} - {0}
                                             if spec.is_moe else set())
    for inter in sorted(sizes):
        fused.warm_up(spec.hidden_size, inter, heads, kv_heads, spec.head_size, dtype, device)
    if spec.is_moe:
        moe.warm_up(spec, dtype, device)


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0,
                checkpoint: str | None = None, shard: Shard = Shard(), spread_routing: bool | None = None
                ) -> LlamaModel:
    """The model with random weights (seeded: normal with std 1/sqrt(fan-in), so that outputs depend on
    the context) or a local safetensors checkpoint; with a `shard`, this rank's tensor-parallel slice.

    With `spread_routing` (by default for MoE models), random weights take GPT-2's scaled init instead: embeddings of
    std 1 and the residual branches' output projections scaled by 1/sqrt(2 x layers). At the default init the
    positions of one sequence converge within a few layers (near-uniform attention averages them) and the
    router sends most of a prompt's tokens to a handful of experts, which no trained router does (their
    load-balancing losses spread them); with it, a 397-token prefill of Qwen3-30B-A3B hits all 128 experts in
    every layer with at most 34-49 of its 3,176 expert slots on one (uniform routing: 25 on average)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 30B MoE would not fit in float32 first
    try:
        with torch.device(device):
            model = LlamaModel(spec).to(dtype)
    finally:
        torch.set_default_dtype(default)
    if checkpoint is None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif p.dim() == 2:  # linear weights and the embedding table
                    p.normal_(0.0, p.shape[1] ** -0.5)
                elif p.dim() == 3:  # stacked expert weights (experts, fan-in, fan-out)
                    p.normal_(0.0, p.shape[1] ** -0.5)
                else:  # biases
                    p.normal_(0.0, 0.02)
            if spec.is_moe if spread_routing is None else spread_routing:
                model.embed_tokens.weight.normal_(0.0, 1.0)
                for name, p in model.named_parameters():
                    if name.endswith(("o_proj.weight", "down_proj.weight", "w_down", "shared_down.weight")):
                        p.mul_((2 * spec.num_hidden_layers) ** -0.5)
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
