"""Llama-3-8B's GEMMs at the row counts around a padded CUDA-graph size, timed in a graph and queued eagerly.

A piecewise graph runs a step's GEMMs at the padded row count (397 tokens: 400 rows), an eager step at the exact
one. This prints each projection's GPU time at M = 384, 385, 397, 400, 416, 448 and 512 both ways, so that a
difference between a graphed and an eager step can be told apart: the rows (cuBLAS picks a kernel per shape)
or the capture (the same M slower in a graph). Usage (a CUDA device): python calibrate/gemm_rows_check.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibrate.timing import Timer

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 28672), "down_proj": (14336, 4096)}
ROWS = (384, 385, 397, 400, 416, 448, 512)


def main() -> None:
    dev = torch.device("cuda")
    timer = Timer(dev)
    print(f"{'projection':>13s} {'M':>5s} {'graph us':>9s} {'eager us':>9s}")
    for name, (k, n) in SHAPES.items():
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5 for _ in range(4)]
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            graph = timer.gpu(lambda i: F.linear(x, weights[i % 4]), 4)
            eager = timer.queued(lambda: F.linear(x, weights[0]), 32)
            print(f"{name:>13s} {m:5d} {graph * 1e6:9.1f} {eager * 1e6:9.1f}")


if __name__ == "__main__":
    main()
