"""Host cost of one launch of the backend's fused Triton kernels (`backend/fused.py`) against the PyTorch ops
that do the same work, on a GPU: whether eager steps pay more on the host for our kernels than for PyTorch's.

Eager steps (`cuda_graphs: none`, a draft's prompt catch-ups) issue every kernel from Python, so the host's
time per launch sets their speed when the GPU work is small (a 1B model, a few tokens). Each line is the mean
host time of 3,000 back-to-back calls (the GPU keeps up unless `wall` exceeds `host`), three repeats, at
hidden sizes 2,048 (Llama-3.2-1B) and 4,096 (Llama-3-8B) and 1 or 512 tokens; an empty Triton kernel and
`torch.empty_like` give the floor of a launch and of a PyTorch call on that host.

Usage (on a CUDA machine, repository root): python bench/launch_costs.py
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from backend import fused

CALLS = 3000


@triton.jit
def _empty(x):
    pass


def bench(name: str, fn: Callable[[], object]) -> None:
    """Print the host and wall microseconds per call of `fn`, three repeats after a warm-up."""
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    for rep in range(3):
        t = time.perf_counter()
        for _ in range(CALLS):
            fn()
        host = (time.perf_counter() - t) / CALLS
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / CALLS
        print(f"{name:44s} rep {rep} host {host * 1e6:7.2f} us/launch  wall {wall * 1e6:7.2f}", flush=True)


def main() -> None:
    dev, bf = "cuda", torch.bfloat16
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
    for hidden, heads, kv_heads, inter in ((2048, 32, 8, 8192), (4096, 32, 8, 14336)):
        print(f"--- hidden {hidden}")
        d = 128 if hidden == 4096 else 64
        for t in (1, 512):
            x = torch.randn(t, hidden, device=dev, dtype=bf)
            r = torch.randn(t, hidden, device=dev, dtype=bf)
            w = torch.ones(hidden, device=dev, dtype=bf)
            gu = torch.randn(t, 2 * inter, device=dev, dtype=bf)
            qkv = torch.randn(t, heads + 2 * kv_heads, d, device=dev, dtype=bf)
            cos = torch.ones(t, 1, d // 2, device=dev, dtype=bf)
            k_cache = torch.zeros(4096, kv_heads, d, device=dev, dtype=bf)
            v_cache = torch.zeros_like(k_cache)
            slots = torch.arange(t, device=dev)
            wt = torch.randn(hidden, hidden, device=dev, dtype=bf)
            bench(f"t={t} triton add_rmsnorm", lambda: fused.add_rmsnorm(x, r, w, 1e-5))
            bench(f"t={t} torch add_ + rms_norm", lambda: (r.add_(x), F.rms_norm(r, (hidden,), w, 1e-5)))
            bench(f"t={t} triton silu_mul", lambda: fused.silu_mul(gu))
            bench(f"t={t} torch silu*up", lambda: F.silu(gu[:, :inter]) * gu[:, inter:])
            bench(f"t={t} triton rope_and_cache",
                  lambda: fused.rope_and_cache(qkv, cos, cos, slots, k_cache, v_cache, heads, kv_heads))
            bench(f"t={t} torch mm", lambda: torch.mm(x, wt))
        bench("triton empty kernel", lambda: _empty[(1,)](x))
        bench("torch empty_like", lambda: torch.empty_like(x))


if __name__ == "__main__":
    main()
