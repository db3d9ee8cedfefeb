"""Launch configurations of the paged attention kernels (`backend.kernels`) on this GPU: GPU seconds of
each (tile sizes, warps, pipeline stages) on Llama-3-8B's heads, for a long prefill and for decodes at
small and large batch, with the K/V bytes over the measured copy bandwidth (decode) or the FLOP rate.

Run on a GPU: python bench/attention_configs.py [--heads 32 --kv-heads 8 --dim 128]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from backend import kernels
from backend.attention import Chunk, paged_group
from calibrate.timing import Timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    dev, dt, block = torch.device("cuda"), torch.bfloat16, 16
    timer = Timer(dev)
    tokens = 1 << 22
    kc = torch.randn(tokens, args.kv_heads, args.dim, device=dev, dtype=dt)
    vc = torch.randn(tokens, args.kv_heads, args.dim, device=dev, dtype=dt)
    src, dst = torch.randn(1 << 29, device=dev, dtype=dt), torch.empty(1 << 29, device=dev, dtype=dt)
    copy_bw = 2 * src.numel() * 2 / timer.gpu(lambda i: dst.copy_(src))
    perm = np.random.default_rng(0).permutation(tokens // block).tolist()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    n = 8192
    g = paged_group([Chunk(0, n, 0, perm[:n // block])], block, dev, False, args.kv_heads)
    q = torch.randn(n, args.heads, args.dim, device=dev, dtype=dt)
    flops = 2 * 2 * args.heads * args.dim * n * (n + 1) / 2
    for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        tiles = torch.tensor(kernels.prefill_tiles([n], bm), dtype=torch.int32, device=dev)
        try:
            sec = timer.gpu(lambda i: kernels.paged_prefill(q, kc, vc, g.tables, g.q_start, g.lens, tiles, bm, block,
                                                            None, config={"BLOCK_N": bn, "num_warps": w,
                                                                          "num_stages": st}))
            print(f"prefill {n}: BLOCK_M {bm} BLOCK_N {bn} warps {w} stages {st}: {flops / sec / 1e12:.0f} TFLOP/s")
        except Exception as e:  # noqa: BLE001 (an infeasible configuration: shared memory)
            print(f"prefill BLOCK_M {bm} BLOCK_N {bn} warps {w} stages {st}: {type(e).__name__}")
    for b, ctx in ((1, 8192), (8, 4096), (64, 2048), (256, 1024)):
        nb = -(-(ctx + 1) // block)
        g = paged_group([Chunk(i, 1, ctx, perm[i * nb:(i + 1) * nb]) for i in range(b)], block, dev, True,
                        args.kv_heads)
        q = torch.randn(b, args.heads, args.dim, device=dev, dtype=dt)
        kv = 2 * b * (ctx + 1) * args.kv_heads * args.dim * 2
        s0 = g.splits
        cases = [(s, 64, 4, 2) for s in sorted({max(1, s0 // 4), s0, min(64, s0 * 4)})]
        cases += [(s0, bn, w, st) for bn, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3))]
        for splits, bn, w, st in cases:
            sec = timer.gpu(lambda i: kernels.paged_decode(q, kc, vc, g.tables, g.lens, block, splits, None,
                                                           config={"BLOCK_N": bn, "num_warps": w, "num_stages": st}))
            mark = " (auto)" if splits == g.splits else ""
            print(f"decode b={b} ctx={ctx} splits {splits}{mark} BLOCK_N {bn} warps {w} stages {st}: "
                  f"{sec * 1e6:.1f} us, {kv / sec / copy_bw:.0%} of copy bandwidth")


if __name__ == "__main__":
    main()
