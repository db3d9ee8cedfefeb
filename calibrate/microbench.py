"""Microbenchmarks of every operator the cost model prices, run with the backend's own PyTorch code.

Each record holds the operator's name and kind, its shape, the FLOPs and bytes the cost model counts for
it (`hardware.operators`, so the fit compares like with like), its kernel count and its measured GPU
seconds (`calibrate.timing.Timer.gpu`: CUDA graphs between CUDA events, rotating inputs larger than L2,
random data). Suites: GEMMs over M for the weight shapes of the chosen catalog models under TP 1/2/4/8;
attention (prefill over chunk x cached prefix, decode over batch x context, and ragged batches of both)
per head configuration, the kernel and the K/V gather before it timed apart; elementwise, norm, RoPE,
embedding, KV-write and sampling kernels by size; the fixed costs (host dispatch per kernel, GPU time per
kernel in a graph and its excess queued on a stream, the executor's whole steps); and the two ceilings (a
large bf16 GEMM, a large device-to-device copy). `--quick` runs every suite with tiny shapes (on CPU in CI).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backend.attention import Chunk, attend, cache_slots, paged_group
from backend.fused import add_rmsnorm, rope_and_cache, silu_mul
from backend.model import rope, rope_tables
from backend.parallel import Shard
from calibrate.ranks import on_ranks
from calibrate.records import PAGED_ENGINE
from calibrate.steps import StepRunner, StepTiming, agreed_blocks, release_memory
from calibrate.timing import Timer, variants_for
from hardware.catalog import get_model
from hardware.cost import GRAPH_BATCH_SIZES, step_operators
from hardware.deployment import Deployment
from hardware.operators import Operator, StepShape, StepTotals, gemm_operator
from hardware.specs import GPUSpec, ModelSpec

ALIGNED_M = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
             4096, 6144, 8192, 12288, 16384)
# cuBLAS picks a kernel per shape: one row more than an aligned M can cost a tile, and values between two
# of them do not follow the line through them (on an H200, Llama-3-8B's 4,096 x 28,672 projection: 125 us at
# M = 384, 151 us at 385, 287 us at 448, 162 us at 512; interpolating the aligned points alone missed 19
# values of M by 7.2% on average). So the grid also holds M + 1 beside each aligned M from 64 and the points
# between (1.25x and 1.75x of each power of two), and every CUDA-graph capture size, the rows a graphed step
# runs at (on an H100, that projection took 151 us at M = 397 and 202 us at its padded 400): 106 values.
GEMM_M = tuple(sorted({*ALIGNED_M, *(m + 1 for m in ALIGNED_M if 64 <= m < ALIGNED_M[-1]),
                       *(f * 2 ** e // 4 for e in range(6, 14) for f in (5, 7)), *GRAPH_BATCH_SIZES}))
ROWS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
MOE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192, 16384)
PREFILL_Q = (16, 64, 256, 1024, 4096, 16384)
PREFILL_RATIO = (1, 2, 4, 16, 64)  # key tokens per query token
DECODE_B = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DECODE_CTX = (64, 256, 1024, 4096, 16384, 65536)
VERIFY_B = (1, 2, 4, 8, 16, 32, 64)  # speculative verifications: chunks of k + 1 tokens over long contexts
VERIFY_CTX = (512, 2048, 8192)
VERIFY_TOKENS = 5  # k = 4
MAX_KV_TOKENS = 2 ** 21  # per attention measurement (one layer's K and V, plus their gathered copy)
POOL_BYTES = 16e9  # the K/V cache pool attention gathers from: large, as a server's (address translation)
BLOCK = 16  # tokens per cache block, as the engine's default
WAVES = 8  # wave boundaries measured (beyond 8 waves a partial wave adds at most 1/8)
TILE_Q = 128  # query rows per FlashAttention-2 forward block
QUICK = {"gemm_m": (1, 5, 32), "rows": (1, 8, 64), "prefill_q": (4, 32), "prefill_ratio": (1, 4),
         "decode_b": (1, 4), "decode_ctx": (16, 64), "verify_b": (1, 4), "verify_ctx": (16, 64), "max_kv": 4096,
         "pool_bytes": 1e6, "waves": False, "moe_tokens": (1, 8, 64)}


@dataclass
class Settings:
    gemm_m: tuple[int, ...] = GEMM_M
    rows: tuple[int, ...] = ROWS
    prefill_q: tuple[int, ...] = PREFILL_Q
    prefill_ratio: tuple[int, ...] = PREFILL_RATIO
    decode_b: tuple[int, ...] = DECODE_B
    decode_ctx: tuple[int, ...] = DECODE_CTX
    verify_b: tuple[int, ...] = VERIFY_B
    verify_ctx: tuple[int, ...] = VERIFY_CTX
    max_kv: int = MAX_KV_TOKENS
    pool_bytes: float = POOL_BYTES
    waves: bool = True  # add grid points at the attention kernels' wave boundaries (`wave_boundaries`)
    moe_tokens: tuple[int, ...] = MOE_TOKENS

    @classmethod
    def quick(cls) -> Settings:
        return cls(**QUICK)


def wave_boundaries(ctas_per_item: int, sms: int, waves: int = WAVES) -> list[int]:
    """The largest item counts whose blocks fill exactly 1..`waves` waves of a kernel launching
    `ctas_per_item` blocks per item on `sms` SMs (one item more spills into the next wave).

    FlashAttention's varlen kernel launches one block per (sequence, KV head) for a decode (the query heads
    of a KV head packed as rows) and one per (128-query tile, head) for a prefill, and its time steps up
    where the blocks spill into another wave (measured on an H200, 8 KV heads: decode attention per
    sequence 11.4 us at 33 sequences, 13.3 us at 36). Measuring both sides of each step lets the surface
    hold it, where interpolation between powers of two cannot (14-20% low at 36-37 sequences)."""
    return sorted({k * sms // ctas_per_item for k in range(1, waves + 1)} - {0})


def _decode_shape(rows: int) -> StepShape:
    return StepShape.build(decode=[1] * rows)


def operators_at(dep: Deployment, shape: StepShape) -> dict[str, Operator]:
    """The cost model's operators of one step, by name (first pipeline stage and last)."""
    t = StepTotals.of(shape, dep.model.sliding_window)
    return {op.name: op for op, _ in step_operators(dep, t, float(t.tokens))}


def _record(op: Operator, seconds: float, **params: Any) -> dict[str, Any]:
    return {"op": op.name, "kind": op.kind, "flops": op.flops, "bytes": op.bytes, "comm_bytes": op.comm_bytes,
            "kernels": op.kernels, "seconds": seconds, **params}


class Bench:
    """Runs the suites on one device for one GPU spec (whose L2 size sets the rotating inputs)."""

    def __init__(self, device: torch.device, gpu: GPUSpec, settings: Settings, log: Callable[[str], None]) -> None:
        self.device, self.gpu, self.s, self.log = device, gpu, settings, log
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.timer = Timer(device) if device.type == "cuda" else Timer(device, repeats=3)
        self.gen = torch.Generator(device=device).manual_seed(0)

    def randn(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, device=self.device, dtype=self.dtype, generator=self.gen)
        return x.mul_(std) if std != 1.0 else x

    def rand_ints(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), device=self.device, generator=self.gen)

    def variants(self, nbytes: float) -> int:
        return variants_for(nbytes, self.gpu.l2_bytes) if self.device.type == "cuda" else 1

    # ---- GEMMs -------------------------------------------------------------------------------------------
    def gemms(self, shapes: Iterable[tuple[int, int]]) -> list[dict[str, Any]]:
        out = []
        for k, n in sorted(set(shapes)):
            nw = self.variants(k * n * 2)
            # drawn as the backend's weights, N(0, 1/K): a large GEMM is power-bound and its power depends on
            # the data (on an H200, against unit variance: -8.5% to +8.5%, with no consistent direction)
            weights = [self.randn(n, k, std=k ** -0.5) for _ in range(nw)]
            for m in self.s.gemm_m:
                nx = max(1, min(nw, self.variants(m * k * 2)))
                xs = [self.randn(m, k) for _ in range(nx)]
                sec = self.timer.gpu(lambda i: F.linear(xs[i % nx], weights[i % nw]), max(nw, nx))
                out.append(_record(gemm_operator("gemm", m, k, n, 2, 2), sec, k=k, n=n, m=m))
            self.log(f"gemm k={k} n={n}")
        return out

    # ---- MoE experts: grouped GEMMs, as the backend's MoE layer runs them --------------------------------
    def grouped_gemms(self, dep: Deployment) -> list[dict[str, Any]]:
        """The routed experts' two grouped GEMMs (gate/up, down) of `dep`'s MoE layer over the tokens of a step,
        routed uniformly to top-k of the GPU's experts (`backend.moe`'s layout: rows sorted by expert)."""
        m, e = dep.model, dep.experts_per_gpu
        k, inter = m.experts_per_token, dep.expert_intermediate_per_gpu
        out = []
        for name, kk, n in (("moe_gate_up", m.hidden_size, 2 * inter), ("moe_down", inter, m.hidden_size)):
            weights = self.randn(e, kk, n, std=kk ** -0.5)
            for tokens in self.s.moe_tokens:
                gen = torch.Generator().manual_seed(tokens)
                ids = torch.rand(tokens, e, generator=gen).topk(min(k, e), dim=-1).indices.flatten()
                counts = torch.bincount(ids, minlength=e)
                offs = counts.cumsum(0).to(torch.int32).to(self.device)
                x = self.randn(ids.numel(), kk)
                sec = self.timer.gpu(lambda i: F.grouped_mm(x, weights, offs=offs), 1)
                op = gemm_operator(name, ids.numel(), kk, n, 2, 2, weight_reads=int((counts > 0).sum()), expert=True)
                out.append({**_record(op, sec, k=kk, n=n, m=ids.numel(), experts=e, tokens=tokens),
                            "kind": "grouped-gemm", "model": m.id})
            self.log(f"grouped gemm {name} experts={e} k={kk} n={n}")
        return out

    # ---- elementwise-type operators, as the backend runs them -------------------------------------------
    def elementwise(self, dep: Deployment) -> list[dict[str, Any]]:
        m_spec = dep.model
        h, hq, hkv, d = m_spec.hidden_size, dep.heads_per_gpu, dep.kv_heads_per_gpu, m_spec.head_size
        inter, vocab = dep.intermediate_per_gpu, m_spec.vocab_size
        out, table = [], self.randn(vocab, h)  # the embedding table, shared by every size
        for m in self.s.rows:
            ops = operators_at(dep, _decode_shape(m))
            v = self.variants(m * h * 2 * 2)
            xs, rs, w = [self.randn(m, h) for _ in range(v)], [self.randn(m, h) for _ in range(v)], self.randn(h)
            qkv = [self.randn(m, hq + 2 * hkv, d) for _ in range(self.variants(m * (hq + 2 * hkv) * d * 2))]
            cos, sin = rope_tables(self.rand_ints(4096, m), d, m_spec.rope_theta, self.dtype)
            gu = [self.randn(m, 2 * inter) for _ in range(self.variants(m * 2 * inter * 2))]
            slots = torch.randperm(max(4 * m, 65536), device=self.device, generator=self.gen)[:m]
            kc, vc = self.randn(max(4 * m, 65536), hkv, d), self.randn(max(4 * m, 65536), hkv, d)
            kn, vn = self.randn(m, hkv, d), self.randn(m, hkv, d)
            tokens = self.rand_ints(vocab, m)
            logits = [self.randn(m, vocab) for _ in range(self.variants(m * vocab * 2))]
            cases: dict[str, tuple[Callable[[int], object], int]] = {
                "final_norm": (lambda i: F.rms_norm(xs[i], (h,), w, 1e-5), v),
                "embedding": (lambda i: F.embedding(tokens, table), 1),
                "sampling": (lambda i: logits[i].float().argmax(dim=-1), len(logits)),
            }
            if dep.elementwise == "fused":  # the backend's kernels (`backend.fused`)
                cases |= {"add_rmsnorm": (lambda i: add_rmsnorm(xs[i], rs[i], w, 1e-5), v),
                          "rope_kv_write": (lambda i: rope_and_cache(qkv[i], cos, sin, slots, kc, vc, hq, hkv),
                                            len(qkv)),
                          "silu_mul": (lambda i: silu_mul(gu[i]), len(gu))}
            else:  # PyTorch's separate ops
                cases |= {"add_rmsnorm": (lambda i: F.rms_norm(xs[i] + rs[i], (h,), w, 1e-5), v),
                          "rope": (lambda i: rope(qkv[i][:, : hq + hkv], cos, sin), len(qkv)),
                          "silu_mul": (lambda i: (lambda g, u: F.silu(g) * u)(*gu[i].chunk(2, dim=-1)), len(gu)),
                          "kv_write": (lambda i: (kc.index_copy_(0, slots, kn), vc.index_copy_(0, slots, vn)), 1)}
            for name, (fn, nv) in cases.items():
                out.append(_record(ops[name], self.timer.gpu(fn, nv), model=m_spec.id, tp=dep.tp, rows=m,
                                   elementwise=dep.elementwise))
        self.log(f"elementwise {m_spec.id} tp={dep.tp}")
        return out

    # ---- attention ---------------------------------------------------------------------------------------
    def _attention(self, dep: Deployment, chunks: list[tuple[int, int]], pool: tuple[torch.Tensor, torch.Tensor],
                   decode: bool) -> tuple[float, float]:
        """GPU seconds of the backend's attention over sequences given as (new tokens, cached tokens), whose
        16-token blocks lie at random in a large cache `pool`, rotating over disjoint placements (as a serving
        cache scatters them): the paged kernel reading the blocks in place, and a K/V gather of the same keys
        alone (the copy an engine with a contiguous-KV kernel makes first; `kv_access: gather`)."""
        hq, d = dep.heads_per_gpu, dep.model.head_size
        kc, vc = pool
        blocks = [math.ceil((c + p) / BLOCK) for c, p in chunks]
        v = min(self.variants(sum(c + p for c, p in chunks) * kc.shape[1] * d * 2 * 2),
                kc.shape[0] // BLOCK // sum(blocks))
        perm = torch.randperm(kc.shape[0] // BLOCK, generator=torch.Generator().manual_seed(1)).tolist()
        groups, indexes, queries, start = [], [], sum(c for c, _ in chunks), 0
        for _ in range(v):
            parts, row = [], 0
            for (c, p), nb in zip(chunks, blocks):
                parts.append(Chunk(row, c, p, perm[start:start + nb]))
                start, row = start + nb, row + c
            groups.append(paged_group(parts, BLOCK, self.device, decode, kc.shape[1]))
            slots = [cache_slots(c.table, np.arange(c.cached + c.length), BLOCK) for c in parts]
            indexes.append(torch.from_numpy(np.concatenate(slots)).to(self.device))
        # the queries as the backend passes them: the heads of its RoPE output, rows strided by the K heads
        # after them (on an H200, within 1% of contiguous queries)
        qs = [self.randn(queries, hq + kc.shape[1], d)[:, :hq] for _ in range(v)]
        kernel = self.timer.gpu(lambda i: attend(qs[i], kc, vc, groups[i], BLOCK, None), v)
        k_buf, v_buf = kc[indexes[0]], vc[indexes[0]]

        def gather(i: int) -> None:
            torch.index_select(kc, 0, indexes[i], out=k_buf)
            torch.index_select(vc, 0, indexes[i], out=v_buf)

        return kernel, self.timer.gpu(gather, v)

    def _attention_records(self, dep: Deployment, shape: StepShape, chunks: list[tuple[int, int]],
                           pool: tuple[torch.Tensor, torch.Tensor], **params: Any) -> list[dict[str, Any]]:
        """The attention kernel's record and its K/V gather's, for one step shape."""
        kind = "prefill" if shape.prefill_tokens.size else "decode"
        paged = operators_at(dep.model_copy(update={"kv_access": "paged"}), shape)
        gathered = operators_at(dep.model_copy(update={"kv_access": "gather"}), shape)
        kernel, gather = self._attention(dep, chunks, pool, kind == "decode")
        return [_record(paged[f"attention_{kind}"], kernel, with_gather=False, kv_access="paged", **params),
                _record(gathered[f"kv_gather_{kind}"], gather, **params)]

    def attention(self, dep: Deployment) -> list[dict[str, Any]]:
        out, s = [], self.s
        head = {"heads": dep.heads_per_gpu, "kv_heads": dep.kv_heads_per_gpu, "head_dim": dep.model.head_size}
        token_bytes = 2 * dep.kv_heads_per_gpu * dep.model.head_size * 2
        max_kv = min(s.max_kv, int(s.max_kv * 4096 / token_bytes))  # at most 8 GiB of K and V per measurement
        tokens = max(max_kv + BLOCK * max(s.decode_b), int(s.pool_bytes / token_bytes))
        pool = (self.randn(tokens, dep.kv_heads_per_gpu, dep.model.head_size),
                self.randn(tokens, dep.kv_heads_per_gpu, dep.model.head_size))
        prefill_q, decode_b = list(s.prefill_q), list(s.decode_b)
        if s.waves:  # both sides of each wave boundary (see `wave_boundaries`)
            sms = self.gpu.sm_count
            prefill_q = sorted(set(prefill_q) | {q for n in wave_boundaries(dep.heads_per_gpu, sms)
                                                 for q in (TILE_Q * n, TILE_Q * n + 1) if q <= max(s.prefill_q)})
            decode_b = sorted(set(decode_b) | {b for n in wave_boundaries(dep.kv_heads_per_gpu, sms)
                                               for b in (n, n + 1) if b <= max(s.decode_b)})
        for q in prefill_q:
            for r in s.prefill_ratio:
                if q * r > max_kv:
                    continue
                shape = StepShape.build(prefill=[q], prefill_cached=[q * (r - 1)])
                out += self._attention_records(dep, shape, [(q, q * (r - 1))], pool, x=q, y=r, seqs=1, **head)
        for b in decode_b:
            for ctx in s.decode_ctx:
                if b * ctx > max_kv:
                    continue
                shape = StepShape.build(decode=[ctx - 1] * b)
                out += self._attention_records(dep, shape, [(1, ctx - 1)] * b, pool, x=b, y=ctx, seqs=b, **head)
        rng = np.random.default_rng(0)  # ragged batches: checks of the surfaces, not grid points
        for b in s.decode_b[1::3]:
            ctx = np.minimum(np.maximum(rng.lognormal(math.log(s.decode_ctx[-2] / 8), 1.0, b), 2).astype(int),
                             max_kv // b)
            shape = StepShape.build(decode=(ctx - 1).tolist())
            out += self._attention_records(dep, shape, [(1, int(c) - 1) for c in ctx], pool, x=b,
                                           y=float(ctx.mean()), seqs=b, ragged=True, longest=int(ctx.max()), **head)
        for n in (2, 4):
            q = np.maximum(rng.integers(s.prefill_q[0], s.prefill_q[-1] // 2, n), 1)
            p = rng.integers(0, 4 * s.prefill_q[0], n)
            if int((q + p).sum()) > max_kv:
                continue
            shape = StepShape.build(prefill=q.tolist(), prefill_cached=p.tolist())
            out += self._attention_records(dep, shape, list(zip(q.tolist(), p.tolist())), pool, x=float(q.sum()),
                                           y=float((q + p).sum() / q.sum()), seqs=n, ragged=True,
                                           longest=int(q.max()), **head)
        v = VERIFY_TOKENS  # verifications (n of k + 1 tokens over a context) in the decode kernel, as checks of
        for n in s.verify_b:  # the decode surface at n sequences of the context and the verified tokens
            for ctx in s.verify_ctx:
                if n * (ctx + v) > max_kv:
                    continue
                shape = StepShape.build(verify=[v] * n, verify_context=[ctx] * n)
                out += self._attention_records(dep, shape, [(v, ctx)] * n, pool, x=n, y=ctx + v, seqs=n, queries=v,
                                               ragged=True, longest=ctx + v, **head)
        self.log(f"attention {head}")
        return out

    # ---- fixed costs and ceilings ------------------------------------------------------------------------
    def fixed_costs(self) -> dict[str, float]:
        """GPU seconds of a tiny kernel in a graph; the GPU seconds a 16-us kernel takes more when queued
        eagerly on a stream than in a graph (measured on an H100: 1.2-1.6 us, against the 1.0-1.9 us per
        kernel that whole eager decode steps took more than the same steps replayed as graphs); the host's
        dispatch of a tiny kernel."""
        cuda = self.device.type == "cuda"
        x, big = self.randn(16), self.randn(1 << 24 if cuda else 1 << 12)  # big: 32 MiB of bf16, ~16 us
        tiny = self.timer.gpu(lambda i: x.add_(1.0), 1)
        dispatch = self.timer.host(lambda: x.add_(1.0), 2000 if cuda else 50)
        gap = self.timer.queued(lambda: big.add_(1.0), 200 if cuda else 20) - self.timer.gpu(lambda i: big.add_(1.0))
        return {"graph_kernel_seconds": tiny, "stream_gap_seconds": max(0.0, gap), "dispatch_seconds": dispatch}

    def ceilings(self, quick: bool) -> dict[str, float]:
        n = 256 if quick else 8192
        a, b = self.randn(n, n), self.randn(n, n)
        gemm = self.timer.gpu(lambda i: a @ b, 1)
        size = (1 << 20) if quick else (1 << 29)  # elements (bf16: 1 GiB)
        src, dst = self.randn(size), self.randn(size)
        copy = self.timer.gpu(lambda i: dst.copy_(src), 1)
        return {"gemm_flops": 2.0 * n ** 3 / gemm, "copy_bandwidth": 2.0 * size * src.element_size() / copy}

    def step_overheads(self, model: str, quick: bool) -> list[dict[str, Any]]:
        out = overhead_steps(model, quick, str(self.device), Shard(), self.log)
        self.log(f"step overheads ({model})")
        return out


def overhead_shapes(quick: bool, graphs: bool) -> list[StepShape]:
    """The whole steps the overhead fit reads: small decode, prefill and mixed steps at short contexts
    (host-bound when eager), and decodes of a few batches at longer contexts. `graphs` is kept for the
    callers that time both executions of the same shapes."""
    batches = (1, 8) if quick else (1, 8, 64, 256)
    long = ((8, 127),) if quick else ((8, 1023), (8, 4095), (64, 1023))  # (batch, context)
    shapes = [StepShape.build(decode=[63] * b) for b in batches] + [StepShape.build(decode=[c] * b) for b, c in long]
    shapes += [StepShape.build(prefill=[32] * b) for b in batches[:2]]
    shapes += [StepShape.build(prefill=[32], decode=[63] * b) for b in batches[:2]]
    return shapes


def overhead_record(model: str, layers: int, tp: int, shape: StepShape, timing: StepTiming) -> dict[str, Any]:
    """One whole step as the overhead fit reads it (`calibrate.fit._overheads`)."""
    return {"model": model, "layers": layers, "tp": tp, "execution": timing.execution, **PAGED_ENGINE,
            "requests": shape.num_requests, "kv_tokens": shape.kv_tokens, "shape": shape.to_dict(),
            **timing.columns()}


def overhead_steps(model: str, quick: bool, device: str, shard: Shard,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Whole executor steps (`overhead_shapes`) of `model` with half and all of its layers (one TP rank's,
    under `shard`), that the fit turns into per-kernel dispatch, per-step, per-request and per-KV-token
    overheads (and, under TP, the host's cost per eager collective)."""
    out = []
    base = get_model(model)
    needed = max(s.kv_tokens // BLOCK + 2 * s.num_requests for s in overhead_shapes(quick, False)) + 64
    for layers in sorted({max(1, base.num_hidden_layers // 2), base.num_hidden_layers}):
        spec = base.model_copy(update={"num_hidden_layers": layers})
        # a KV cache that fills the memory as a server's does (the host's per-step work depends on it)
        blocks = max(needed, agreed_blocks(spec, device, shard))
        for graphs in ((False,) if not device.startswith("cuda") else (False, True)):
            runner = StepRunner(spec, device, num_blocks=blocks, cuda_graphs=graphs, max_requests=256, shard=shard)
            shapes = overhead_shapes(quick, graphs)
            for shape, t in zip(shapes, runner.time(shapes, repeats=3 if quick else 15)):
                out.append(overhead_record(model, layers, shard.size, shape, t))
            del runner
            release_memory(device)
            log(f"overhead steps: {layers} layers, {'graphs' if graphs else 'eager'}, TP={shard.size}")
    return out


def tp_overhead_steps(model: str, quick: bool, device: str, tps: Iterable[int]) -> list[dict[str, Any]]:
    """`overhead_steps` under each TP degree in `tps` that the model's heads allow, one process per rank."""
    spec, out = get_model(model), []
    for tp in tps:
        if tp > 1 and not spec.num_attention_heads % tp and not spec.num_key_value_heads % tp:
            out += on_ranks(partial(overhead_steps, model, quick), tp, device)
    return out


def deployments(models: Iterable[str], tps: Iterable[int], gpu: GPUSpec) -> list[Deployment]:
    """Every valid (model, TP) pair: TP must divide the heads; MoE models contribute their dense parts."""
    out = []
    for mid in models:
        spec: ModelSpec = get_model(mid)
        for tp in tps:
            if spec.num_attention_heads % tp or (spec.num_key_value_heads < tp and tp % spec.num_key_value_heads):
                continue
            out.append(Deployment.build(spec, gpu, tp=tp))
    return out


def gemm_shapes(deps: Iterable[Deployment]) -> list[tuple[int, int]]:
    """(K, N) of every dense GEMM of these deployments' steps."""
    return sorted({op.dims for dep in deps for op in operators_at(dep, _decode_shape(1)).values()
                   if op.dims is not None and not op.grouped})


SUITES = ("gemm", "elementwise", "attention", "fixed", "collectives", "moe")


def run_all(device: torch.device, gpu: GPUSpec, models: list[str], tps: list[int], quick: bool,
            elementwise_models: list[str], log: Callable[[str], None] = print,
            suites: tuple[str, ...] = SUITES, moe_models: tuple[str, ...] = ()) -> dict[str, Any]:
    """The chosen suites; the raw measurements that `calibrate.fit.fit_profile` turns into a profile. The
    `moe` suite times the grouped GEMMs of `moe_models` (one GPU holding every expert)."""
    bench = Bench(device, gpu, Settings.quick() if quick else Settings(), log)
    deps = deployments(models, tps, gpu)
    heads: dict[tuple[int, int, int], Deployment] = {}
    for dep in deps:
        heads.setdefault((dep.heads_per_gpu, dep.kv_heads_per_gpu, dep.model.head_size), dep)
    records: list[dict[str, Any]] = []
    if "gemm" in suites:
        records += bench.gemms(gemm_shapes(deps))
    if "elementwise" in suites:
        for dep in deps:
            if dep.model.id in elementwise_models:
                records += bench.elementwise(dep)
    if "attention" in suites:
        for dep in heads.values():
            records += bench.attention(dep)
    if "moe" in suites:
        for model in moe_models:
            records += bench.grouped_gemms(Deployment.build(model, gpu))
    raw: dict[str, Any] = {"records": records, "fixed": bench.fixed_costs()}
    if "fixed" in suites:
        raw.update(ceilings=bench.ceilings(quick), steps=bench.step_overheads(elementwise_models[0], quick))
    return raw
