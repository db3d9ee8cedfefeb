"""Fused elementwise work of a decoder layer, one kernel each, as competent engines run it (vLLM's
fused_add_rms_norm, rotary_embedding + reshape_and_cache, silu_and_mul): the residual add with the
RMSNorm after it; RoPE on queries and keys with the new K and V written into the paged cache; SiLU(gate)
times up. Triton on CUDA (and on CPU in Triton's interpreter, for the tests); plain PyTorch otherwise,
which is also the reference the kernels are checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend import kernels
from backend.kernels import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_rmsnorm_kernel(X, R, W, OUT, stride, eps, N: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(X + row * stride + cols, mask=ok, other=0.0).to(tl.float32)
        if ADD:  # the residual stream: R += X, then normalise R
            x += tl.load(R + row * stride + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(R + row * stride + cols, x.to(R.dtype.element_ty), mask=ok)
            x = x.to(R.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        rms = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
        tl.store(OUT + row * stride + cols, (x * rms * w).to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, SLOTS, Q, KC, VC, stride_t, stride_q, stride_c, stride_ch,
                           HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        t, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        i = tl.arange(0, HALF_PAD)
        ok = i < HALF
        src = QKV + t * stride_t + head * 2 * HALF
        x1 = tl.load(src + i, mask=ok, other=0.0)
        x2 = tl.load(src + HALF + i, mask=ok, other=0.0)
        if head < HEADS + KV_HEADS:  # queries and keys rotate; values are copied
            cos = tl.load(COS + t * HALF + i, mask=ok, other=0.0)
            sin = tl.load(SIN + t * HALF + i, mask=ok, other=0.0)
            y1 = (x1 * cos - x2 * sin).to(x1.dtype)
            y2 = (x2 * cos + x1 * sin).to(x1.dtype)
        else:
            y1, y2 = x1, x2
        if head < HEADS:
            dst = Q + t * stride_q + head * 2 * HALF
            tl.store(dst + i, y1, mask=ok)
            tl.store(dst + HALF + i, y2, mask=ok)
        elif head < HEADS + KV_HEADS:
            dst = KC + tl.load(SLOTS + t) * stride_c + (head - HEADS) * stride_ch
            tl.store(dst + i, y1, mask=ok)
            tl.store(dst + HALF + i, y2, mask=ok)
        else:
            dst = VC + tl.load(SLOTS + t) * stride_c + (head - HEADS - KV_HEADS) * stride_ch
            tl.store(dst + i, y1, mask=ok)
            tl.store(dst + HALF + i, y2, mask=ok)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, stride_in, stride_out, N: tl.constexpr, BLOCK: tl.constexpr):
        row, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = part * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        g = tl.load(GU + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_in + N + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_out + cols, (g / (1.0 + tl.exp(-g)) * u).to(OUT.dtype.element_ty), mask=ok)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x); with no `residual`, (RMSNorm(x), x). The sum is written over
    `residual` in place (the residual stream)."""
    if not kernels.use_kernels(x):
        if residual is not None:
            residual.add_(x)
            x = residual
        return F.rms_norm(x, (x.shape[-1],), weight, eps), x
    n = x.shape[-1]
    out = torch.empty_like(x)
    target = residual if residual is not None else x
    _add_rmsnorm_kernel[(x.shape[0],)](x, target, weight, out, x.stride(0), eps, N=n, BLOCK=_pow2(n),
                                       ADD=residual is not None, num_warps=4 if n <= 4096 else 8)
    return out, target


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding (half-split, as Hugging Face Llama) of the queries and keys of `qkv` (tokens, heads +
    2 kv heads, d); the rotated keys and the values written to the cache at `slots`. Returns the queries (in
    `out` if given)."""
    if not kernels.use_kernels(qkv):
        h = heads
        qk = rope(qkv[:, : h + kv_heads], cos, sin)
        k_cache.index_copy_(0, slots, qk[:, h:])
        v_cache.index_copy_(0, slots, qkv[:, h + kv_heads:])
        return qk[:, :h] if out is None else out.copy_(qk[:, :h])
    t, _, d = qkv.shape
    q = torch.empty((t, heads, d), dtype=qkv.dtype, device=qkv.device) if out is None else out
    _rope_cache_kernel[(t, heads + 2 * kv_heads)](
        qkv, cos, sin, slots, q, k_cache, v_cache, qkv.stride(0), q.stride(0), k_cache.stride(0), k_cache.stride(1),
        HEADS=heads, KV_HEADS=kv_heads, HALF=d // 2, HALF_PAD=_pow2(d // 2), num_warps=1)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a fused gate/up projection output (tokens, 2 x intermediate)."""
    if not kernels.use_kernels(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(n))
    _silu_mul_kernel[(t, -(-n // block))](gate_up, out, gate_up.stride(0), out.stride(0), N=n, BLOCK=block,
                                         num_warps=4)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, half-split layout as in Hugging Face Llama. x: (T, heads, d)."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def warm_up(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
            device: torch.device) -> None:
    """Launch each fused kernel once at the model's sizes (Triton compiles on the first launch)."""
    if not kernels.use_kernels(torch.empty(0, device=device)):
        return
    x, w = torch.zeros(2, hidden, dtype=dtype, device=device), torch.ones(hidden, dtype=dtype, device=device)
    add_rmsnorm(x, None, w, 1e-5)
    add_rmsnorm(x, x.clone(), w, 1e-5)
    silu_mul(torch.zeros(2, 2 * intermediate, dtype=dtype, device=device))
    cos = torch.ones(2, 1, head_dim // 2, dtype=dtype, device=device)
    cache = torch.zeros(2, kv_heads, head_dim, dtype=dtype, device=device)
    rope_and_cache(torch.zeros(2, heads + 2 * kv_heads, head_dim, dtype=dtype, device=device), cos, cos * 0,
                   torch.arange(2, device=device), cache, cache.clone(), heads, kv_heads)
