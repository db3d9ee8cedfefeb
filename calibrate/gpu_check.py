"""GPU-only checks of the backend (CI has no GPU; `run_device.sh` runs this first on every device call):
the paged attention kernels (prefill chunks after cached prefixes; decodes, and verifications with token
trees and a draft's tree level, at several flash-decoding splits, with and without a sliding window) against the
float32 per-sequence reference, eager vs CUDA-graph steps (decode, and mixed prefill + decode) giving
the same greedy tokens, and a batch of uniform verifications through its full graph giving the eager pass's
logits.

Run: python calibrate/gpu_check.py (exit status 1 when a check fails)
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from backend.attention import Chunk, attend, paged_group, reference_attention
from calibrate.steps import StepRunner
from hardware.catalog import get_model
from hardware.operators import StepShape

BLOCK = 16


def _tree_mask(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random token tree's mask over its n rows (row 0 the root; parents before children)."""
    mask = np.eye(n, dtype=bool)
    mask[:, 0] = True
    for i in range(2, n):
        mask[i] |= mask[int(rng.integers(1, i))]
    return mask


def attention_errors(window: int | None) -> dict[str, float]:
    """Largest absolute difference between the CUDA kernels (bf16) and the CPU reference (fp32), per case."""
    dev, gen, rng = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0), np.random.default_rng(0)
    heads, kv_heads, dim, slots = 32, 8, 128, 1 << 19  # room for every case's blocks (37 decodes up to 9k)
    kc = torch.randn(slots, kv_heads, dim, device=dev, dtype=torch.bfloat16, generator=gen)
    vc = torch.randn(slots, kv_heads, dim, device=dev, dtype=torch.bfloat16, generator=gen)
    perm = rng.permutation(slots // BLOCK).tolist()
    k_host, v_host = kc.float().cpu(), vc.float().cpu()
    cases = {"prefill": ([(37, 100, None), (1, 500, None), (200, 0, None), (129, 3000, None)], False, (1,)),
             "decode": ([(1, int(c), None) for c in rng.integers(1, 9000, 37)], True, (1, 4, 16)),
             "verify": ([(5, int(c), None) for c in rng.integers(1, 9000, 20)]
                        + [(12, 2000, _tree_mask(12, rng)), (3, 700, _tree_mask(7, rng)[4:]), (1, 40, None)],
                        True, (1, 4, 16))}
    errors = {}
    for name, (parts, decode, splits) in cases.items():
        chunks, row, at = [], 0, 0
        for n, cached, mask in parts:
            blocks = -(-(n + cached) // BLOCK)
            chunks.append(Chunk(row, n, cached, perm[at:at + blocks], mask))
            row, at = row + n, at + blocks
        group = paged_group(chunks, BLOCK, dev, decode, kv_heads)
        q = torch.randn(row, heads, dim, device=dev, dtype=torch.bfloat16, generator=gen)
        ref = reference_attention(q.float().cpu(), k_host, v_host, group, BLOCK, window)
        for s in splits:
            group.splits, group.scratch = s, None
            out = attend(q, kc, vc, group, BLOCK, window)
            errors[f"{name} (splits {s})" if len(splits) > 1 else name] = float((out.float().cpu() - ref).abs().max())
    return errors


def fused_errors() -> dict[str, float]:
    """Largest absolute difference between the fused elementwise kernels (bf16) and PyTorch's ops (fp32),
    relative to the largest reference value."""
    from backend import fused
    from backend.model import rope_tables

    dev, gen = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(1)
    t, h, kvh, d, hidden = 300, 32, 8, 128, 4096
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=gen)  # noqa: E731
    x, r, w, qkv, gu = rnd(t, hidden), rnd(t, hidden), rnd(hidden), rnd(t, h + 2 * kvh, d), rnd(t, 2 * 14336)
    rot = rope_tables(torch.randint(0, 8000, (t,), device=dev, generator=gen), d, 500000.0, torch.bfloat16)
    slots = torch.randperm(4096, device=dev, generator=gen)[:t]
    caches = [torch.zeros(4096, kvh, d, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    # the references: PyTorch's ops in fp32 on the CPU (the fused functions' own fallback)
    norm_ref = fused.add_rmsnorm(x.float().cpu(), r.float().cpu(), w.float().cpu(), 1e-5)[0]
    norm = fused.add_rmsnorm(x, r.clone(), w, 1e-5)[0]
    q = fused.rope_and_cache(qkv, *rot, slots, *caches, h, kvh)
    cpu = [c.float().cpu() for c in (qkv, *rot)]
    qk_ref = fused.rope(cpu[0][:, :h + kvh], cpu[1], cpu[2])
    silu = fused.silu_mul(gu)
    g, u = gu.float().chunk(2, dim=-1)
    rel = lambda a, b: float((a.float().cpu() - b.float().cpu()).abs().max() / b.abs().max())  # noqa: E731
    return {"add_rmsnorm": rel(norm, norm_ref), "rope queries": rel(q, qk_ref[:, :h]),
            "rope keys in cache": rel(caches[0][slots], qk_ref[:, h:]),
            "values in cache": rel(caches[1][slots], qkv[:, h + kvh:]),
            "silu_mul": rel(silu, torch.nn.functional.silu(g) * u)}


def graph_tokens_match() -> bool:
    """The same steps run eagerly and as CUDA graphs sample the same greedy tokens: a decode step, and mixed
    steps (prefill chunks after cached prefixes with decodes; chunks alone) under the mixed graphs."""
    shapes = [StepShape.build(decode=[30, 200, 7, 1000, 64]),
              StepShape.build(prefill=[37, 100], prefill_cached=[0, 300], decode=[30, 200, 7, 1000, 64]),
              StepShape.build(prefill=[5, 1, 300], prefill_cached=[17, 600, 0])]
    ok = True
    for shape in shapes:
        tokens, runs = {}, []
        for graphs in (False, True):
            runner = StepRunner(get_model("tiny-llama"), "cuda", 4096, cuda_graphs=graphs, max_requests=64)
            outcome = runner.executor.run(runner.batch(shape))
            tokens[graphs] = [runner.executor.tokens[i][-1] for i in range(shape.num_requests)]
            runs.append(outcome.execution)
            runner.release()
        print(f"{shape.to_dict()}: {runs[0]} {tokens[False]}, {runs[1]} {tokens[True]}")
        ok &= tokens[False] == tokens[True] and runs == ["eager", "graph"]
    return ok


def verify_graph_error() -> float:
    """A batch of uniform verifications (3 sequences of k + 1 = 5 tokens after 17-41 cached ones) through its
    full CUDA graph (`GraphCache.decode`, padded to 4 sequences) against the eager pass: the largest logit
    difference relative to the largest logit (bf16), the graph's K/V written to a second cache."""
    from backend.attention import attention_meta
    from backend.block_table import BlockTables
    from backend.graphs import GraphCache
    from backend.model import PagedKVCache, build_model

    spec, dev, q = get_model("tiny-llama"), torch.device("cuda"), 5
    model = build_model(spec, dev, torch.bfloat16, seed=3)
    cached = np.array([30, 17, 41])
    num_blocks = 16
    caches = [PagedKVCache(spec.num_hidden_layers, num_blocks + 1, BLOCK, spec.num_key_value_heads, spec.head_size,
                           torch.bfloat16, dev) for _ in range(2)]
    gen = torch.Generator(device=dev).manual_seed(3)
    for name in ("k", "v"):
        prior = torch.randn(getattr(caches[0], name).shape, generator=gen, device=dev, dtype=torch.bfloat16)
        for cache in caches:
            getattr(cache, name).copy_(prior)
    tables = BlockTables(num_blocks)
    for rid, c in enumerate(cached.tolist()):
        tables.resize(rid, -(-(c + q) // BLOCK))
    tokens = np.random.default_rng(3).integers(0, spec.vocab_size, q * cached.size)
    positions = np.concatenate([np.arange(c, c + q) for c in cached])
    chunks = [Chunk(i * q, q, int(c), tables.table(i)) for i, c in enumerate(cached)]
    meta = attention_meta(chunks, BLOCK, dev, 0, spec.num_key_value_heads)
    with torch.no_grad():
        want = model(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), meta, caches[0],
                     torch.arange(tokens.size, device=dev)).float()
        got = GraphCache(model, caches[1], num_blocks, BLOCK).decode(tables, [0, 1, 2], tokens, cached, queries=q)
    assert got is not None
    torch.cuda.synchronize()
    return float((got.float() - want).abs().max() / want.abs().max())


def main() -> int:
    ok = True
    for window in (None, 64):
        for case, err in attention_errors(window).items():
            print(f"paged attention, {case}, window {window}: max abs error vs fp32 reference {err:.4f}")
            ok &= err < 0.05
    for case, err in fused_errors().items():
        print(f"fused {case}: max abs error vs fp32 reference, relative to its largest value: {err:.4f}")
        ok &= err < 0.02
    ok &= graph_tokens_match()
    err = verify_graph_error()
    print(f"uniform verifications, full CUDA graph vs eager: max logit error relative to the largest {err:.4f}")
    ok &= err < 0.02
    print("GPU CHECKS OK" if ok else "GPU CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
