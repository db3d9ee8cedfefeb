"""GPU-only checks of the backend (CI has no GPU; `run_device.sh` runs this first on every device call):
the FlashAttention varlen path against the float32 per-sequence SDPA reference, with and without a sliding
window, and eager vs CUDA-graph decode giving the same greedy tokens.

Run: python calibrate/gpu_check.py (exit status 1 when a check fails)
"""

from __future__ import annotations

import sys

import torch

from backend.model import Chunk, attention_group, varlen_attention
from calibrate.steps import StepRunner
from hardware.catalog import get_model
from hardware.operators import StepShape


def attention_error(window: int | None) -> float:
    """Largest absolute difference between the CUDA varlen kernel (bf16) and the CPU reference (fp32) on
    prefill chunks with cached prefixes and decodes of several lengths, keys scattered over a cache."""
    dev, gen = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads, dim = 32, 8, 128
    chunks = [Chunk(0, 37, 100, []), Chunk(37, 1, 500, []), Chunk(38, 1, 17, []), Chunk(39, 200, 0, [])]
    perm = torch.randperm(4096).tolist()
    start = 0
    for c in chunks:  # block size 1: a table lists slots
        c.table = perm[start:start + c.cached + c.length]
        start += c.cached + c.length
    group = attention_group(chunks, 1, dev)
    q = torch.randn(sum(c.length for c in chunks), heads, dim, device=dev, dtype=torch.bfloat16, generator=gen)
    kc = torch.randn(4096, kv_heads, dim, device=dev, dtype=torch.bfloat16, generator=gen)
    vc = torch.randn(4096, kv_heads, dim, device=dev, dtype=torch.bfloat16, generator=gen)
    k, v = kc[group.kv_index], vc[group.kv_index]
    out = varlen_attention(q, k, v, group, window)
    ref = varlen_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), group, window)
    return float((out.float().cpu() - ref).abs().max())


def graph_tokens_match() -> bool:
    """The same decode batch run eagerly and as a CUDA graph samples the same greedy tokens."""
    tokens = {}
    for graphs in (False, True):
        runner = StepRunner(get_model("tiny-llama"), "cuda", 4096, cuda_graphs=graphs, max_requests=64)
        outcome = runner.executor.run(runner.batch(StepShape.build(decode=[30, 200, 7, 1000, 64])))
        tokens[graphs] = [runner.executor.tokens[i][-1] for i in range(5)]
        print(f"{outcome.execution}: tokens {tokens[graphs]}")
        runner.release()
    return tokens[False] == tokens[True]


def main() -> int:
    ok = True
    for window in (None, 64):
        err = attention_error(window)
        print(f"varlen attention, window {window}: max abs error vs fp32 reference {err:.4f}")
        ok &= err < 0.05
    ok &= graph_tokens_match()
    print("GPU CHECKS OK" if ok else "GPU CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
