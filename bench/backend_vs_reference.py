"""Is the backend a competent engine? Its steps against a static-cache reference and against the physics.

Run on a GPU: python bench/backend_vs_reference.py [--model llama-3-8b] [--out results.json]
(on CPU, --quick runs every part with tiny shapes: a smoke test, not a measurement).

Prints, and writes as JSON:
- decode steps, CUDA graphs, batch x context grid: the backend's GPU and wall seconds against the
  reference (`calibrate.static_reference`: contiguous K/V, SDPA, the whole step as one graph). Target:
  the backend within 10% of the reference in every cell that fits the memory;
- decode at batch 1 against the weight-read floor (weight bytes / measured copy bandwidth, read plus
  write counted as the copy moves them). Target: within 25%;
- a prefill of 8,192 tokens: FLOPs (as the cost model counts them) over seconds against the measured bf16
  matmul peak. Target: at least 60%;
- an eager mixed step (2,048 prefill tokens and 16 decodes) against the same pass captured as a graph.
  Target: within 15%;
- the attention kernels alone: decode over the paged cache at each flash-decoding split against the K/V
  bytes over the copy bandwidth, and the prefill kernel's FLOP rate against SDPA on a contiguous cache.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend.attention import Chunk, attend, paged_group
from calibrate.microbench import Bench, Settings
from calibrate.static_reference import decode_seconds, graph_seconds, prefill_seconds
from calibrate.steps import StepRunner, release_memory
from hardware.catalog import get_gpu, get_model
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.operators import StepShape

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK = {"batches": (1, 3), "contexts": (40, 100), "prefill": 64, "mixed": (32, 3), "kernel_ctx": (64, 256)}
REPEATS = 10
PARTS = ("decode", "prefill", "mixed", "kernels")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the weights: all but the embedding table (only its rows are read),
    unless the LM head shares it."""
    tied = model.lm_head.weight is model.embed_tokens.weight
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (name.startswith("embed_tokens") and not tied):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def decode_grid(runner: StepRunner, batches: tuple[int, ...], contexts: tuple[int, ...], log) -> list[dict]:
    rows, model = [], runner.executor.model
    cells = [(b, c) for b in batches for c in contexts if b * (c + 17) <= runner.capacity]
    shapes = [StepShape.build(decode=[c] * b) for b, c in cells]
    timings = runner.time(shapes, repeats=REPEATS)
    for (b, c), t in zip(cells, timings):
        ref, sdpa = decode_seconds(model, b, c) if runner.executor.device.type == "cuda" else (float("nan"), "-")
        release_memory(str(runner.executor.device))
        rows.append({"batch": b, "context": c, "backend_gpu_s": t.gpu_seconds, "backend_wall_s": t.seconds,
                     "reference_s": ref, "sdpa": sdpa, "execution": t.execution,
                     "gpu_ratio": t.gpu_seconds / ref, "wall_ratio": t.seconds / ref})
        log(f"decode b={b} ctx={c}: backend {t.gpu_seconds * 1e3:.3f} ms GPU, {t.seconds * 1e3:.3f} ms wall; "
            f"reference {ref * 1e3:.3f} ms ({sdpa})")
    return rows


def mixed_step(runner: StepRunner, chunk: int, decodes: int) -> dict:
    """An eager mixed step's wall and GPU seconds, and the same pass captured as a CUDA graph."""
    shape = StepShape.build(prefill=[chunk], decode=[1000] * decodes)
    (t,) = runner.time([shape], repeats=REPEATS)
    ex = runner.executor
    batch = runner.batch(shape)
    ex.sync_tables(list(range(shape.num_requests)))
    inputs = ex.pass_inputs(batch, [], None)
    graph = graph_seconds(lambda: ex.forward(inputs)) if ex.device.type == "cuda" else float("nan")
    runner.release()
    return {"prefill_tokens": chunk, "decodes": decodes, "eager_wall_s": t.seconds, "eager_gpu_s": t.gpu_seconds,
            "graph_s": graph, "ratio": t.seconds / graph}


def kernel_rates(device: torch.device, heads: int, kv_heads: int, dim: int, contexts: tuple[int, ...],
                 copy_bw: float, prefill: int, log) -> dict:
    """Decode attention per layer at each split (K/V bytes over seconds against the copy bandwidth), and the
    prefill kernel's FLOP rate against SDPA over a contiguous K/V."""
    from calibrate.timing import Timer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device) if device.type == "cuda" else Timer(device, repeats=2)
    block = 16
    tokens = 1 << 22 if device.type == "cuda" else 1 << 12
    kc = torch.randn(tokens, kv_heads, dim, device=device, dtype=dtype)
    vc = torch.randn(tokens, kv_heads, dim, device=device, dtype=dtype)
    perm = np.random.default_rng(0).permutation(tokens // block).tolist()
    decode = []
    for b in (1, 8, 32, 128):
        for ctx in contexts:
            if b * (ctx + block) > tokens:
                continue
            nb = -(-(ctx + 1) // block)
            chunks = [Chunk(i, 1, ctx, perm[i * nb:(i + 1) * nb]) for i in range(b)]
            group = paged_group(chunks, block, device, True, kv_heads)
            q = torch.randn(b, heads, dim, device=device, dtype=dtype)
            kv_bytes = 2 * b * (ctx + 1) * kv_heads * dim * kc.element_size()
            auto, row = group.splits, {"batch": b, "context": ctx, "auto_splits": group.splits}
            for s in sorted({1, 2, 4, 8, 16, 32, 64, auto}):
                group.splits, group.scratch = s, None
                sec = timer.gpu(lambda i: attend(q, kc, vc, group, block, None))
                row[f"splits_{s}_s"] = sec
                row[f"splits_{s}_bw_share"] = kv_bytes / sec / copy_bw
            decode.append(row)
            log(f"decode kernel b={b} ctx={ctx}: auto {auto} splits {row[f'splits_{auto}_s'] * 1e6:.1f} us, "
                f"{row[f'splits_{auto}_bw_share']:.0%} of copy bandwidth")
    nb = -(-prefill // block)
    group = paged_group([Chunk(0, prefill, 0, perm[:nb])], block, device, False, kv_heads)
    q = torch.randn(prefill, heads, dim, device=device, dtype=dtype)
    flops = 2 * 2 * heads * dim * prefill * (prefill + 1) / 2  # causal: QK^T and PV over the lower triangle
    paged = timer.gpu(lambda i: attend(q, kc, vc, group, block, None))
    qs, ks, vs = (torch.randn(1, n, prefill, dim, device=device, dtype=dtype) for n in (heads, kv_heads, kv_heads))
    sdpa = timer.gpu(lambda i: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
    log(f"prefill kernel {prefill} tokens: paged {flops / paged / 1e12:.0f} TFLOP/s, SDPA {flops / sdpa / 1e12:.0f}")
    return {"decode": decode, "prefill": {"tokens": prefill, "paged_s": paged, "sdpa_s": sdpa,
                                          "paged_tflops": flops / paged / 1e12, "sdpa_tflops": flops / sdpa / 1e12}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="catalog model (default llama-3-8b; tiny-llama with --quick)")
    ap.add_argument("--gpu", default=None, help="catalog GPU id (default: from the device name)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--out", help="write every figure as JSON here")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run (default all: {','.join(PARTS)})")
    ap.add_argument("--batches", help="decode grid batches, comma-separated (default: the full grid)")
    ap.add_argument("--contexts", help="decode grid contexts, comma-separated (default: the full grid)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"--parts: unknown {sorted(parts - set(PARTS))}; allowed: {', '.join(PARTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    log = lambda m: print(m, flush=True)  # noqa: E731
    spec = get_model(args.model or ("tiny-llama" if args.quick else "llama-3-8b"))
    if args.gpu:
        gpu = get_gpu(args.gpu)
    elif device.type == "cuda":
        from calibrate.cli import GPU_NAMES

        name = torch.cuda.get_device_name(device).upper()
        gpu = get_gpu(next(v for k, v in GPU_NAMES.items() if k in name))
    else:
        gpu = get_gpu("h100")
    q = QUICK if args.quick else {"batches": BATCHES, "contexts": CONTEXTS, "prefill": 8192, "mixed": (2048, 16),
                                  "kernel_ctx": (1024, 4096, 16384)}
    for key in ("batches", "contexts"):
        if getattr(args, key):
            q = {**q, key: tuple(int(v) for v in getattr(args, key).split(","))}
    t0 = time.perf_counter()
    bench = Bench(device, gpu, Settings.quick() if args.quick else Settings(), log)
    ceilings = bench.ceilings(args.quick)
    log(f"ceilings: {ceilings['gemm_flops'] / 1e12:.0f} TFLOP/s bf16 matmul, "
        f"{ceilings['copy_bandwidth'] / 1e12:.2f} TB/s copy")
    kv_token = spec.kv_bytes_per_token("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] - 2.0 * spec.num_params - 6e9
        blocks = int(0.45 * free / kv_token / 16)
    else:
        blocks = 256
    runner = StepRunner(spec, str(device), blocks, cuda_graphs=True, max_requests=max(q["batches"]) + 32)
    model = runner.executor.model
    out: dict = {"model": spec.id, "gpu": gpu.id, "device": torch.cuda.get_device_name(device)
                 if device.type == "cuda" else "cpu", "torch": torch.__version__, "ceilings": ceilings,
                 "cache_tokens": runner.capacity}
    if "decode" in parts:
        out["decode"] = decode_grid(runner, q["batches"], q["contexts"], log)
        one = min((r for r in out["decode"] if r["batch"] == min(q["batches"])), key=lambda r: r["context"])
        floor = (weight_bytes(model) + one["batch"] * one["context"] * kv_token) / ceilings["copy_bandwidth"]
        out["batch1"] = {"batch": one["batch"], "context": one["context"], "backend_wall_s": one["backend_wall_s"],
                         "backend_gpu_s": one["backend_gpu_s"], "floor_s": floor,
                         "wall_over_floor": one["backend_wall_s"] / floor}
    if "prefill" in parts:
        (pre,) = runner.time([StepShape.build(prefill=[q["prefill"]])], repeats=3)
        runner.release()
        dep = Deployment.build(spec, gpu)
        flops = CostModel(dep).price(StepShape.build(prefill=[q["prefill"]])).flops
        ref_pre = prefill_seconds(model, q["prefill"]) if device.type == "cuda" else float("nan")
        out["prefill"] = {"tokens": q["prefill"], "backend_wall_s": pre.seconds, "backend_gpu_s": pre.gpu_seconds,
                          "reference_s": ref_pre, "flops": flops, "mfu": flops / pre.seconds / ceilings["gemm_flops"],
                          "reference_mfu": flops / ref_pre / ceilings["gemm_flops"]}
        log(f"prefill {q['prefill']}: {pre.seconds * 1e3:.2f} ms wall, reference {ref_pre * 1e3:.2f} ms")
    if "mixed" in parts:
        out["mixed"] = mixed_step(runner, *q["mixed"])
        log(f"mixed: {out['mixed']}")
    del runner, model
    release_memory(str(device))
    if "kernels" in parts:
        a = Deployment.build(spec, gpu)
        out["kernels"] = kernel_rates(device, a.heads_per_gpu, a.kv_heads_per_gpu, spec.head_size, q["kernel_ctx"],
                                      ceilings["copy_bandwidth"], q["prefill"], log)
    out["seconds"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    report(out)


def report(out: dict) -> None:
    """The summary table: every target and whether it is met."""
    print(f"\n{out['model']} on {out['device']} (torch {out['torch']})")
    print(f"{'batch':>6} {'context':>8} {'backend GPU ms':>15} {'wall ms':>9} {'reference ms':>13} {'GPU/ref':>8} "
          f"{'wall/ref':>9}")
    for r in out.get("decode", []):
        print(f"{r['batch']:>6} {r['context']:>8} {r['backend_gpu_s'] * 1e3:>15.3f} {r['backend_wall_s'] * 1e3:>9.3f} "
              f"{r['reference_s'] * 1e3:>13.3f} {r['gpu_ratio']:>8.3f} {r['wall_ratio']:>9.3f}")
    ratios = [r["wall_ratio"] for r in out.get("decode", []) if math.isfinite(r["wall_ratio"])]
    if ratios:
        print(f"decode graph steps, wall over reference: median {statistics.median(ratios):.3f}, worst "
              f"{max(ratios):.3f}; cells within 10%: {sum(x <= 1.10 for x in ratios)}/{len(ratios)} (target: all)")
    b1 = out.get("batch1")
    if b1:
        print(f"batch {b1['batch']}, context {b1['context']}: {b1['backend_wall_s'] * 1e3:.3f} ms wall, floor "
              f"{b1['floor_s'] * 1e3:.3f} ms: {b1['wall_over_floor']:.3f}x (target <= 1.25)")
    p = out.get("prefill")
    if p:
        print(f"prefill {p['tokens']}: {p['backend_wall_s'] * 1e3:.2f} ms, {p['mfu']:.1%} of the measured matmul peak "
              f"(target >= 60%); reference {p['reference_s'] * 1e3:.2f} ms ({p['reference_mfu']:.1%})")
    m = out.get("mixed")
    if m:
        print(f"mixed {m['prefill_tokens']} + {m['decodes']} decodes: eager {m['eager_wall_s'] * 1e3:.2f} ms wall, "
              f"graph {m['graph_s'] * 1e3:.2f} ms: {m['ratio']:.3f}x (target <= 1.15)")
    if "kernels" in out:
        k = out["kernels"]["prefill"]
        print(f"prefill attention kernel: paged {k['paged_tflops']:.0f} TFLOP/s, SDPA contiguous "
              f"{k['sdpa_tflops']:.0f}")
    for r in out.get("kernels", {}).get("decode", []):
        s = r["auto_splits"]
        print(f"decode attention b={r['batch']} ctx={r['context']}: {s} splits, "
              f"{r[f'splits_{s}_bw_share']:.0%} of copy bandwidth (best split: "
              f"{max((v, key) for key, v in r.items() if key.endswith('bw_share'))[1].split('_')[1]})")
    print(f"({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
