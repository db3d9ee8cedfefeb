"""A plain static-cache decoder: the yardstick the backend is held to (gpt-fast style: plain PyTorch, one
contiguous K/V buffer per layer, `scaled_dot_product_attention`, the whole step in a CUDA graph).

It runs the backend model's own weights and modules (so the GEMMs, norms and RoPE are the same calls) with
attention over a contiguous cache of `batch` sequences of equal length instead of the paged one, on the
shapes of `calibrate reference`: a decode step of `batch` sequences after `context` tokens each, and a
prefill of one prompt. What the backend takes beyond it is the price of paging and of its host work.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from backend.model import LlamaModel, rope, rope_tables
from calibrate.timing import capture_graph

BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


class StaticDecoder:
    """Decode and prefill of `batch` sequences over a contiguous cache of `length` positions per sequence
    (layers, batch, kv heads, length, head dim)."""

    def __init__(self, model: LlamaModel, batch: int, length: int) -> None:
        self.model, self.batch, self.length = model, batch, length
        attn = model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        p = next(model.parameters())
        shape = (len(model.layers), batch, self.kv_heads, length, self.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.backend = self._pick_backend()

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              backend: SDPBackend | None = None) -> torch.Tensor:
        with sdpa_kernel([backend or self.backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def _pick_backend(self) -> SDPBackend:
        """The first SDPA kernel, fastest first, that takes a grouped-query decode over this cache."""
        q = torch.zeros(self.batch, self.heads, 1, self.head_dim, dtype=self.k.dtype, device=self.k.device)
        for backend in BACKENDS if self.k.is_cuda else (SDPBackend.MATH,):
            try:
                self._sdpa(q, self.k[0], self.v[0], False, backend)
                return backend
            except RuntimeError:
                continue
        raise RuntimeError("no SDPA backend takes this decode")

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Next-token ids of each sequence after its `tokens` (batch, new) at positions start.. (all sequences
        alike): K/V written to the cache, attention over positions 0..start + new. A prefill (new > 1)
        starts at position 0."""
        b, n = tokens.shape
        if n > 1 and start:
            raise ValueError("the reference prefills from position 0 only")
        m = self.model
        x = m.embed_tokens(tokens.reshape(-1))
        positions = torch.arange(start, start + n, device=tokens.device).repeat(b)
        rot = rope_tables(positions, self.head_dim, m.spec.rope_theta, x.dtype)
        end = start + n
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h, kvh = self.heads, self.kv_heads
            qkv = a.qkv_proj(layer.input_layernorm(x)).view(b * n, h + 2 * kvh, self.head_dim)
            qk = rope(qkv[:, :h + kvh], *rot)
            q = qk[:, :h].view(b, n, h, self.head_dim).transpose(1, 2)
            self.k[i, :, :, start:end] = qk[:, h:].view(b, n, kvh, self.head_dim).transpose(1, 2)
            self.v[i, :, :, start:end] = qkv[:, h + kvh:].view(b, n, kvh, self.head_dim).transpose(1, 2)
            o = self._sdpa(q, self.k[i, :, :, :end], self.v[i, :, :, :end], causal=n > 1)
            x = x + a.o_proj(o.transpose(1, 2).reshape(b * n, h * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = x.view(b, n, -1)[:, -1]
        return m.lm_head(m.norm(last)).float().argmax(dim=-1)


def graph_seconds(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median GPU seconds of `fn` captured as a CUDA graph and replayed between CUDA events."""
    graph, _ = capture_graph(fn)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times[2:])


def decode_seconds(model: LlamaModel, batch: int, context: int, repeats: int = 20) -> tuple[float, str]:
    """GPU seconds of one reference decode step of `batch` sequences after `context` tokens each, and the
    SDPA kernel it ran."""
    ref = StaticDecoder(model, batch, context + 1)
    tokens = torch.randint(0, model.spec.vocab_size, (batch, 1), device=ref.k.device)
    return graph_seconds(lambda: ref.forward(tokens, context), repeats), ref.backend.name


def prefill_seconds(model: LlamaModel, prompt: int, repeats: int = 5) -> float:
    """GPU seconds of the reference's prefill of one `prompt`-token sequence."""
    ref = StaticDecoder(model, 1, prompt)
    tokens = torch.randint(0, model.spec.vocab_size, (1, prompt), device=ref.k.device)
    return graph_seconds(lambda: ref.forward(tokens, 0), repeats)
