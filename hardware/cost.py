"""Roofline cost of one forward step: sum over operators of max(compute, memory) time plus launches.

    op time   = max(flops / (peak_flops * eff_c), bytes / (hbm_bw * eff_m)) + kernels * launch
                (launch: launch_graph in a CUDA graph; eager, launch_graph + stream_gap: a stream starts
                queued kernels later than a graph replay)
    collective= steps * link_latency + moved_bytes / (link_bw * eff_link)   (ring all-reduce: 2(n-1) steps,
                moving 2(n-1)/n of the payload; all-gather: n-1 steps, (n-1)/n; send/recv: 1 step, all)
    stage     = sum of its operators (GPU time); eager: the host issues the kernels in order (launch_eager
                each, NCCL calls launch_collective more) and each starts once issued and once the one before
                it is done (`pipelined_seconds`: between the longer and the sum of host and GPU time)
    step time = sum over pipeline stages + CPU overhead of the step (+ per request, + per KV token held,
                + step_mixed for an eager step with both prefill-style attention and decodes; a graph step
                with prefill chunks or other than uniform verifications, piecewise, step_piecewise + per
                request instead of step_graph's)

Efficiencies come from a calibration profile (`hardware.profile`), falling back to documented defaults;
a calibrated profile's measured GEMM, named-operator, attention and collective surfaces take precedence
over its per-kind curves. A profile from another catalog GPU prices each kernel as on that GPU, t_src,
against its roofline there, r_src; on this GPU the roofline part moves to this GPU's datasheet peaks and
the excess stays, scaled by the ratio of SM counts (the what-if rule):

    t = r_this + (t_src - r_src) * sm_src / sm_this     (compute and memory sides alike)

A kernel near its roofline thus speeds up by the datasheet ratio, a latency- or occupancy-bound one (a
decode attention of few sequences, a GEMM of few rows) hardly at all: measured between the H100 and the
H200 (bandwidth 1.43x), GEMMs at 80-100% of the H100's bandwidth ran 1.43x faster, at 20-30% 1.04x.
Host overheads and collectives (links) are taken as they are.
Decode attention is read off its surface at the batch's mean context, and is at least the time of one
wave's worth of sequences at its longest context: FlashAttention's varlen kernel gives each sequence (and
KV head) one block, so a ragged batch waits for its longest (measured on H100 and H200 on ragged batches of
16 lognormal contexts, mean 2,128: the mean alone priced them 68% low, the longest-sequence bound +1%,
medians; `bench/ragged_attention.py`).
CUDA graphs (`graph_rows`, mode `cuda_graphs`): by default ('mixed') every step of at most 512 tokens runs as
a graph padded to the next captured size (vLLM V1: full graphs for decodes and for uniform verifications,
k + 1 tokens for every request, `full_graph_rows`; piecewise for batches with prefill chunks, decodes beside
verifications, differing k or token trees); 'decode' graphs decode-only steps alone (vLLM V0); 'none' runs
every step eagerly.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.operators import (
    MoeLoad,
    Operator,
    StepShape,
    StepTotals,
    decode_reduces,
    first_stage_operators,
    last_stage_operators,
    layer_operators,
    pipeline_operator,
)
from hardware.profile import COLLECTIVE_KINDS, DEFAULT_PROFILE, AttentionSurface, Curve, GemmCurve, Profile
from hardware.specs import GPUSpec, InterconnectSpec
from hardware.time_tables import TimeTables

if TYPE_CHECKING:
    import pandas as pd

# vLLM's default CUDA-graph capture sizes (1, 2, 4, then multiples of 8 up to 512).
GRAPH_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, *range(8, 513, 8))
GRAPH_MODES = ("mixed", "decode", "none")
FIXED_CACHE_SIZE = 4096  # step features whose operator times `CostModel` keeps (the least recently used go)
PREFILL_CACHE_SIZE = 1 << 15  # prefill-only step shapes whose price `CostModel.price` keeps (about 1.6 kB each)
HOST_COPY_EFFICIENCY = 0.8  # pinned-memory copies over PCIe reach about 80% of the link (26 of 31.5 GB/s on Gen 4)


_V = TypeVar("_V")


def _recall(cache: dict[tuple, _V], key: tuple) -> _V | None:
    """A kept value, moved to the end of the cache's order (the most recently used: `_keep`), or None."""
    hit = cache.pop(key, None)
    if hit is not None:
        cache[key] = hit
    return hit


def _keep(cache: dict[tuple, _V], key: tuple, value: _V, size: int) -> _V:
    """Keep `value` under `key`; beyond `size` entries the least recently used goes (a dict keeps its order of
    insertion, and `_recall` moves a hit to its end)."""
    if len(cache) >= size:
        del cache[next(iter(cache))]
    cache[key] = value
    return value


def graph_rows(mode: str, tokens: int, prefills: int, verifies: int = 0) -> int | None:
    """Padded rows of the CUDA graph a step of `tokens` new tokens replays, or None when it runs eagerly.
    `mode` 'decode' and 'mixed': decode-only steps of at most 512 sequences, padded to the next capture size
    (vLLM's rule); 'mixed' also steps of at most 512 tokens with prefill chunks or verifications (k + 1
    tokens, or a token tree, per request), padded the same way, attention outside the graph (vLLM V1's
    default, FULL_AND_PIECEWISE; uniform verifications replay a full graph instead: `full_graph_rows`);
    'none': every step eager (vLLM's enforce_eager)."""
    if mode == "none" or tokens == 0 or tokens > GRAPH_BATCH_SIZES[-1]:
        return None
    if (prefills or verifies) and mode != "mixed":
        return None
    return GRAPH_BATCH_SIZES[bisect.bisect_left(GRAPH_BATCH_SIZES, tokens)]


def full_graph_rows(seqs: int, queries: int = 1) -> int | None:
    """Padded sequences of the full CUDA graph that runs `seqs` requests of `queries` new tokens each (decodes:
    1; a uniform batch of verifications: k + 1), or None when the padded step passes 512 tokens. vLLM V1's
    FULL_AND_PIECEWISE replays uniform batches, speculative ones of k + 1 tokens per request included, as full
    graphs; other steps with several tokens per request take the piecewise ones (`graph_rows`)."""
    at = bisect.bisect_left(GRAPH_BATCH_SIZES, seqs)
    if seqs < 1 or at == len(GRAPH_BATCH_SIZES) or GRAPH_BATCH_SIZES[at] * queries > GRAPH_BATCH_SIZES[-1]:
        return None
    return GRAPH_BATCH_SIZES[at]


def graph_mode(value: bool | str) -> str:
    """A CUDA-graph mode from a config value: true is 'mixed' (the default), false 'none'."""
    if isinstance(value, bool):
        return "mixed" if value else "none"
    if value not in GRAPH_MODES:
        raise ServesimError(f"cuda_graphs = {value!r}: allowed: {', '.join(GRAPH_MODES)}, true, false")
    return value


@dataclass(frozen=True, slots=True)
class OpCost:
    """One operator's row in a breakdown: totals over its `count` instances on one GPU."""

    name: str
    kind: str
    stage: int
    count: int
    flops: float
    bytes: float
    comm_bytes: float
    seconds: float
    bound: str  # compute, memory or link


class StepCost:
    """A priced step. FLOPs and bytes are totals over all GPUs of the replica; times are wall seconds.

    `seconds`, `stage_seconds`, `execution`, `mfu` and `mbu` are what the engine reads every step; the
    other figures and the per-operator `breakdown` are derived from the per-operator arrays on access.
    """

    __slots__ = ("seconds", "stage_seconds", "execution", "tokens", "launch", "overhead_seconds", "flops", "bytes",
                 "comm_bytes", "_m", "_flops", "_bytes", "_payload", "_tc", "_tm", "_total", "_launched")

    def __init__(self, model: CostModel, seconds: float, stage_seconds: tuple[float, ...], execution: str,
                 tokens: int, launch: float, overhead: float, totals: np.ndarray,
                 arrays: tuple[np.ndarray, ...]) -> None:
        self.seconds = seconds  # latency of the step through every pipeline stage, CPU overhead included
        self.stage_seconds = stage_seconds  # GPU time of each pipeline stage
        self.execution = execution  # "graph" or "eager"
        self.tokens = tokens
        self.launch = launch
        self.overhead_seconds = overhead  # CPU time of the step outside the kernels
        self._m = model
        self._flops, self._bytes, self._payload, self._tc, self._tm, self._total, self._launched = arrays
        ranks = model.dep.tp * model.dep.dp  # GPUs per stage, each running the operators as priced
        self.flops = float(totals[0]) * ranks  # all GPUs
        self.bytes = float(totals[1]) * ranks  # HBM bytes read and written, all GPUs
        self.comm_bytes = float(totals[2])  # collective payload bytes, per GPU

    @property
    def compute_seconds(self) -> float:
        """Sum over operators of their compute-side time (one GPU per stage)."""
        dense = ~self._m.compiled.comm
        return float(self._tc[dense] @ self._m.compiled.count[dense])

    @property
    def memory_seconds(self) -> float:
        """Sum over operators of their memory-side time."""
        dense = ~self._m.compiled.comm
        return float(self._tm[dense] @ self._m.compiled.count[dense])

    @property
    def comm_seconds(self) -> float:
        comm = self._m.compiled.comm
        return float((self._tm + self._m.compiled.latency)[comm] @ self._m.compiled.count[comm])

    @property
    def kernel_seconds(self) -> float:
        """GPU seconds of the step's kernels summed over its pipeline stages, before an eager step's host bound
        (launch and stream gap included)."""
        return float(self._total.sum())

    @property
    def kernels(self) -> int:
        return int(round(float(self._launched.sum())))

    def launches(self) -> list[tuple[Operator, int, float]]:
        """(operator, its instances, the kernels they launch) of each operator that launches work."""
        ops = self._m.compiled
        return [(op, int(c), float(k)) for op, c, k in zip(ops.operators, ops.count, self._launched) if k]

    @property
    def launch_seconds(self) -> float:
        return self.kernels * self.launch

    @property
    def mfu(self) -> float:
        return self.flops / (self.seconds * self._m._gemm_peak * self._m.dep.num_gpus)

    @property
    def mbu(self) -> float:
        return self.bytes / (self.seconds * self._m.dep.gpu.hbm_bandwidth * self._m.dep.num_gpus)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

    @property
    def bottleneck_seconds(self) -> float:
        """Slowest stage: the step interval of a full pipeline (PP with one batch per stage in flight)."""
        return max(self.stage_seconds)

    @property
    def breakdown(self) -> tuple[OpCost, ...]:
        """One row per operator that did work, per GPU, summed over its instances."""
        m = self._m
        return tuple(
            OpCost(op.name, op.kind, op.stage, int(c), float(f * c), float(b * c), float(p * c), float(t),
                   "link" if comm else ("compute" if tc >= tm else "memory"))
            for op, c, f, b, p, t, comm, tc, tm in zip(m.compiled.operators, m.compiled.count, self._flops, self._bytes,
                                                       self._payload, self._total, m.compiled.comm, self._tc, self._tm)
            if f or b or p
        )


FEATURES = ("rows", "active_experts", "tokens", "logit_tokens", "prefill_pairs", "prefill_queries",
            "prefill_kv_tokens", "decode_seqs", "decode_pairs", "moe_rows", "group_tokens", "dispatched",
            "prefill_on", "decode_on")
_DECODE_SEQS, _DECODE_PAIRS = FEATURES.index("decode_seqs"), FEATURES.index("decode_pairs")
# the features only attention reads: the K/V tokens of prefill chunks (pairs, reads) and of decodes
_ATTENTION = [FEATURES.index("prefill_pairs"), FEATURES.index("prefill_kv_tokens"), _DECODE_PAIRS]


def _totals(x: np.ndarray) -> StepTotals:
    f = dict(zip(FEATURES, x.tolist()))
    return StepTotals(tokens=f["tokens"], logit_tokens=f["logit_tokens"], prefill_seqs=0,
                      prefill_queries=f["prefill_queries"], prefill_pairs=f["prefill_pairs"],
                      prefill_kv_tokens=f["prefill_kv_tokens"], decode_seqs=f["decode_seqs"],
                      decode_pairs=f["decode_pairs"], prefill_on=f["prefill_on"], decode_on=f["decode_on"])


def _work(ops: list[tuple[Operator, int]]) -> np.ndarray:
    return np.array([(op.flops, op.bytes, op.comm_bytes) for op, _ in ops])


def collective_shape(op: Operator) -> tuple[int, float]:
    """(latency steps, share of the payload each rank moves): ring all-reduce 2(n-1) and 2(n-1)/n,
    all-gather and reduce-scatter n-1 and (n-1)/n; send/recv, all-to-all (its payload is already the bytes
    sent over the link, to all peers at once) and any non-collective 1 and all of it."""
    n = op.ranks
    if op.kind == "all-reduce":
        return 2 * (n - 1), 2.0 * (n - 1) / n
    if op.kind in ("all-gather", "reduce-scatter"):
        return n - 1, (n - 1) / n
    return 1, 1.0


def peak_flops(dep: Deployment, kind: str, gpu: GPUSpec | None = None) -> float:
    """The datasheet FLOP/s an operator kind is measured against (on `gpu`, by default the deployment's):
    tensor cores for GEMMs (at the weights' dtype) and attention (at the activations' dtype), fp32 CUDA
    cores for everything else."""
    gpu = gpu or dep.gpu
    if kind == "gemm":
        return gpu.matmul_flops(dep.weight_dtype)
    if kind.startswith("attention"):
        return gpu.fp32_flops if dep.weight_dtype == "fp32" else gpu.bf16_flops
    return gpu.fp32_flops


def step_operators(dep: Deployment, t: StepTotals, rows: float, moe: MoeLoad | None = None
                   ) -> list[tuple[Operator, int]]:
    """Every operator of a step on one GPU per stage, with how many times it runs: (operator, count); the
    operators of dense MLPs and of MoE layers run in the stage's layers of their kind."""
    layer = layer_operators(dep, t, rows, moe)
    out: list[tuple[Operator, int]] = []
    for s, n_layers in enumerate(dep.layers_per_stage):
        n_moe = dep.model.moe_layers(dep.stage_layers(s))
        counts = {"all": n_layers, "moe": n_moe, "dense": n_layers - n_moe}
        out += [(replace(op, stage=s), counts[op.layers] * op.count) for op in layer]
        extras = first_stage_operators(dep, rows) if s == 0 else [pipeline_operator(dep, rows, s)]
        if s == dep.pp - 1:
            extras += last_stage_operators(dep, t)
        out += [(replace(op, stage=s), op.count) for op in extras]
    return out


def dispatch_segments(dep: Deployment) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per pipeline stage, the indices into `step_operators`' list of the operators an eager step issues
    before its decoder layers (embedding, or the receive from the previous stage), in each layer (in the
    order the backend issues them), and after them (final norm, LM head, sampling), and the stage's layers.
    Mirrors the order in which `step_operators` lists them."""
    zero = StepTotals(0, 0, 0, 0, 0.0, 0.0, 0, 0.0)
    n_layer = len(layer_operators(dep, zero, 0.0))
    out, start = [], 0
    for s, n_layers in enumerate(dep.layers_per_stage):
        n_first = len(first_stage_operators(dep, 0.0)) if s == 0 else 1
        n_last = len(last_stage_operators(dep, zero)) if s == dep.pp - 1 else 0
        layer = np.arange(start, start + n_layer)
        first = np.arange(layer[-1] + 1, layer[-1] + 1 + n_first)
        last = np.arange(first[-1] + 1, first[-1] + 1 + n_last)
        out.append((first, layer, last, n_layers))
        start += n_layer + n_first + n_last
    return out


def pipelined_seconds(h: np.ndarray, g: np.ndarray, k: np.ndarray, a: int, b: int, layers: int) -> float:
    """GPU window of an eager stage: the host issues each kernel in turn and the GPU runs it once issued and
    once the kernel before it is done, E_j = max(E_(j-1), H_j) + d_j, so E = sum(d) + max_j (H_j - D_(j-1)).

    h, g and k hold the host seconds, GPU seconds and kernels of the operators issued before the decoder
    layers ([:a]), in one layer ([a:b]) and after them ([b:]); an operator's kernels share its host and GPU
    time evenly (its lead is largest at its first or its last kernel). The layers repeat, so the maximum is
    found from one layer: the host's lead over the GPU grows, or shrinks, by a layer's host less GPU
    seconds per layer."""
    ch, cg = np.cumsum(h), np.cumsum(g)
    kk = np.maximum(k, 1.0)
    lead = ch - cg + np.maximum(g - h * (kk - 1.0) / kk, g / kk)  # host through j less GPU before j, at j's ends
    hp, gp = ch[a - 1], cg[a - 1]
    hl, gl = ch[b - 1] - hp, cg[b - 1] - gp
    best = max(lead[:a].max(), lead[a:b].max() + max(0.0, (layers - 1) * (hl - gl)))
    if b < len(h):
        best = max(best, lead[b:].max() + (layers - 1) * (hl - gl))
    return float(gp + layers * gl + cg[-1] - cg[b - 1] + best)


@dataclass(frozen=True, eq=False)
class CompiledOperators:
    """A deployment's step as matrices, before any efficiency: its operators (on one GPU per stage, in issue
    order, stage by stage), each run `count` times a step, whose FLOPs, bytes and collective payload are
    affine in a few step features x (`FEATURES`): work(x) = base + slopes @ x. Read off `step_operators` at the
    origin and at unit vectors and checked at a random point (`of`); with the constants that pricing needs and
    that no profile changes (kernels, stages, collectives' links, latency steps and moved share).
    `CostModel(dep).compiled` is this; `frame()` shows it as a table."""

    deployment: Deployment
    operators: tuple[Operator, ...]
    count: np.ndarray  # (ops,) instances per step
    base: np.ndarray  # (ops, 3) FLOPs, bytes and payload at x = 0
    slopes: np.ndarray  # (ops, 3, features) what one unit of each feature adds
    kernels: np.ndarray  # (ops,) kernels one instance launches
    stage_spans: tuple[tuple[int, int], ...]  # each pipeline stage's operators, [start, end)
    comm: np.ndarray  # (ops,) collectives
    reduce: np.ndarray  # (ops,) paged decode attention: its reduction kernel runs only where the call splits keys
    segments: tuple[tuple[np.ndarray, int, int, int, np.ndarray], ...]  # per stage, `pipelined_seconds`' order
    links: tuple[InterconnectSpec, ...]  # the link each operator's payload crosses (collectives)
    moved: np.ndarray  # (ops,) share of the payload each rank moves
    latency: np.ndarray  # (ops,) link latency of a collective's steps (0 for kernels)

    @classmethod
    def of(cls, dep: Deployment) -> CompiledOperators:
        def at(x: np.ndarray) -> list[tuple[Operator, int]]:
            moe = MoeLoad(rows=float(x[9]), active_experts=float(x[1]), group_tokens=float(x[10]),
                          dispatched=float(x[11]))
            return step_operators(dep, _totals(x), float(x[0]), moe)

        listed = at(np.zeros(len(FEATURES)))
        base = _work(listed)
        slopes = np.stack([_work(at(e)) - base for e in np.eye(len(FEATURES))], axis=2)  # (ops, 3, F)
        probe = np.random.default_rng(0).uniform(1.0, 1e4, len(FEATURES))
        if not np.allclose(_work(at(probe)), base + slopes @ probe, rtol=1e-9):
            raise AssertionError("operator counts are not affine in the step features")
        ops = tuple(op for op, _ in listed)
        stage = np.array([op.stage for op in ops])
        assert np.all(np.diff(stage) >= 0), "operators are listed stage by stage"
        ends = np.searchsorted(stage, np.arange(dep.pp), side="right")
        comm = np.array([op.kind in COLLECTIVE_KINDS for op in ops])
        # per stage: its operators in issue order (before the layers, one layer, after), per-layer scaling
        segments = tuple((np.concatenate([first, layer, last]), len(first), len(first) + len(layer), n,
                          np.concatenate([np.ones(len(first)), np.full(len(layer), 1.0 / max(n, 1)),
                                          np.ones(len(last))]))
                         for first, layer, last, n in dispatch_segments(dep))
        links = tuple(dep.pp_link if op.kind == "send-recv" else dep.moe_link if op.name.startswith("moe_")
                      else dep.tp_link for op in ops)
        steps, moved = (np.array(v, dtype=float) for v in zip(*map(collective_shape, ops)))
        return cls(dep, ops, np.array([c for _, c in listed], dtype=float), base, slopes,
                   np.array([op.kernels for op in ops], dtype=float),
                   tuple(zip([0, *ends[:-1].tolist()], ends.tolist())), comm,
                   np.array([op.kind == "attention-decode" and dep.kv_access == "paged" for op in ops]),
                   segments, links, moved, np.where(comm, steps * np.array([link.latency for link in links]), 0.0))

    def work(self, x: np.ndarray) -> np.ndarray:
        """(ops, 3): each operator's FLOPs, bytes and collective payload (one instance) at features x."""
        return self.base + self.slopes @ x

    def frame(self) -> pd.DataFrame:
        """One row per operator: name, kind, stage, instances, kernels, and its FLOPs, bytes and payload at the
        origin (`flops`, ...) and per unit of each feature that moves that quantity for some operator
        (`flops_per_rows`, `bytes_per_decode_pairs`, ...)."""
        import pandas as pd

        out = pd.DataFrame({"name": [op.name for op in self.operators], "kind": [op.kind for op in self.operators],
                            "stage": [op.stage for op in self.operators], "count": self.count.astype(int),
                            "kernels": self.kernels})
        for q, quantity in enumerate(("flops", "bytes", "payload")):
            out[quantity] = self.base[:, q]
            for f, feature in enumerate(FEATURES):
                if np.any(self.slopes[:, q, f]):
                    out[f"{quantity}_per_{feature}"] = self.slopes[:, q, f]
        return out


class CostModel:
    """Prices `StepShape`s for one `Deployment` under an efficiency profile.

    At construction the deployment's operators are compiled (`CompiledOperators`: their work is affine in a
    few step features) and the profile's efficiencies bound to them. Pricing a step is then a handful of numpy
    operations whatever the model, the batch size or the number of pipeline stages, in named steps (`_columns`):
    the profile's tables, measured GEMM spikes, measured GEMMs' memory side, attention surfaces, the what-if
    rule, split-KV reduction kernels, then latency, launches and the stream gap.
    """

    def __init__(self, deployment: Deployment, profile: Profile | None = None, cuda_graphs: bool | str = True) -> None:
        self.dep = deployment
        self.profile = (profile or DEFAULT_PROFILE).merged_over(DEFAULT_PROFILE)
        self.cuda_graphs = graph_mode(cuda_graphs)
        self._moe_cache: dict[float, tuple[float, float]] = {}
        self.compiled = CompiledOperators.of(deployment)
        self._bind_profile()

    def _bind_profile(self) -> None:
        """The profile's efficiency tables and surfaces for the compiled operators, and the caches."""
        dep, gpu, ops = self.dep, self.dep.gpu, self.compiled
        attention = ops.slopes[:, :, _ATTENTION]  # (ops, 3, 3): what one more attention pair or K/V token adds
        self._fixed_cache: dict[tuple, _Fixed] = {}
        n = len(ops.operators)
        # The profile's efficiencies are fractions of its own GPU's roofline: evaluate them there, and move
        # the times to this GPU by the what-if rule in `price` when the profile is another GPU's.
        self._source = _profile_gpu(self.profile, gpu)
        src = self._source or gpu
        self._peak_c = np.array([peak_flops(dep, op.kind, src) for op in ops.operators])
        self._bandwidth = src.hbm_bandwidth
        if self._source is not None:
            self._target_c = np.array([peak_flops(dep, op.kind) for op in ops.operators])
            self._excess = self._source.sm_count / gpu.sm_count
        self._gemm_peak = gpu.matmul_flops(dep.weight_dtype)
        curves = [self._curves(op) for op in ops.operators]
        self._is_derived = np.array([g is not None for *_, g in curves], dtype=bool)
        self._tables = TimeTables([c for c, _, _ in curves] + [m for _, m, _ in curves],
                                  [g is not None for *_, g in curves] + [False] * n)
        # measured GEMMs' spikes: (rows per FLOP, their M, their efficiencies) per operator that has them
        self._spikes = {i: (1.0 / (2.0 * g.k * g.n), *g.spike_efficiencies())
                        for i, (*_, g) in enumerate(curves) if g is not None and g.spikes}
        self._table_ids = np.arange(2 * n)
        self._peaks = np.concatenate([self._peak_c, [link.bandwidth if comm else self._bandwidth
                                                     for link, comm in zip(ops.links, ops.comm)]])
        # Attention kernels measured over their shape: (operator index, surface), evaluated per step.
        # (MLA's kernels have shapes of their own: priced by their kind's curves.)
        heads = (dep.heads_per_gpu, dep.kv_heads_per_gpu, dep.model.head_size)
        self._surfaces = [(i, s) for i, op in enumerate(ops.operators) if op.kind.startswith("attention") and
                          not dep.model.is_mla and (s := self.profile.attention_surface(op.kind, *heads)) is not None]
        # `_longest_decode`: the sequences one wave of the surface's GPU holds, and each decode attention
        # operator's FLOPs and bytes at no features, per decode and per decode K/V token
        self._wave_seqs = max(1, (self._source or gpu).sm_count // dep.kv_heads_per_gpu)
        self._wave_work = {i: (tuple(ops.base[i, :2].tolist()), tuple(ops.slopes[i, :2, _DECODE_SEQS].tolist()),
                               tuple(ops.slopes[i, :2, _DECODE_PAIRS].tolist()))
                           for i, s in self._surfaces if s.kind == "attention-decode"}
        self._n = n
        reads = np.any(attention != 0, axis=(1, 2))  # the operators reading the steps' K/V, and the others
        self._varying, self._steady = (self._column_set(np.flatnonzero(reads), attention),
                                       self._column_set(np.flatnonzero(~reads), attention))
        # (`_fixed` keeps the others per step features: none is placed by a step's attention)
        assert not self._steady.surfaces and not self._steady.reduce.size, "an attention operator reads no K/V"
        self._decode_groups: dict[int, _DecodeGroup] = {}  # decode-only steps by size
        self._prefill_cache: dict[tuple, StepCost] = {}

    def _curves(self, op: Operator) -> tuple[Curve | float, Curve | float, GemmCurve | None]:
        """Compute and memory efficiency curves of one operator: a measured surface of the profile where it
        has one (GEMM weight shape, dense or grouped over experts, collective, K/V gather of this head
        configuration, named operator), else
        its kind's curves. The third item is a measured GEMM's curve over M, whose memory side `price` derives
        from its compute side: the efficiency is a function of M, and bytes barely change with M at small M,
        so a table over bytes could not hold it."""
        prof = self.profile
        kind = prof.efficiency[op.kind]
        if op.kind in COLLECTIVE_KINDS:
            return kind.compute, prof.collective_curve(op.kind, op.ranks) or kind.memory, None
        if op.kind == "kv-gather" and (g := prof.gather_curve(self.dep.kv_heads_per_gpu, self.dep.model.head_size)):
            return kind.compute, g, None
        if op.name in prof.operators:
            return kind.compute, prof.operators[op.name], None
        if op.grouped:
            g = prof.grouped_gemm_curve(*op.dims, self.dep.experts_per_gpu) if op.dims is not None else None
        else:
            g = prof.gemm_curve(*op.dims) if op.dims is not None and prof.gemm else None
        if g is None:
            return kind.compute, kind.memory, None
        (k, n), m = op.dims, np.asarray(g.m)
        return Curve(sizes=tuple(2.0 * m * k * n), efficiency=g.efficiency), 1.0, g

    def _busiest(self, tokens: float) -> tuple[float, float]:
        """(routed token slots, distinct experts) of the busiest GPU of the MoE group for a step of `tokens`
        tokens over the group, cached: steps repeat their token counts."""
        hit = self._moe_cache.get(tokens)
        if hit is None:
            hit = self._moe_cache[tokens] = self.dep.placement.busiest(tokens)
        return hit

    def _longest_decode(self, i: int, surface: AttentionSurface, seqs: float, longest: int) -> float:
        """A ragged decode batch takes at least as long as its longest sequence's blocks: the time of a batch
        of the sequences one wave holds (one block per sequence and KV head), all at the longest context
        (a uniform batch at the mean context packs the blocks perfectly, which a ragged one cannot)."""
        b = min(seqs, self._wave_seqs)
        (base_f, base_b), (seq_f, seq_b), (pair_f, pair_b) = self._wave_work[i]
        x_seqs, x_pairs = float(b), float(b * longest)  # (`compiled.work` at these two features, in plain floats)
        flops, nbytes = base_f + (seq_f * x_seqs + pair_f * x_pairs), base_b + (seq_b * x_seqs + pair_b * x_pairs)
        return max(self._on_surface(i, flops, nbytes, surface.at(float(b), float(longest))))

    def _decode_surface(self, i: int, surface: AttentionSurface, flops: np.ndarray, nbytes: np.ndarray,
                        tc: np.ndarray, tm: np.ndarray, seqs: np.ndarray, pairs: np.ndarray, longest: np.ndarray
                        ) -> tuple[list[float], list[float]]:
        """Compute and memory seconds of decode attention (operator i) at each step's mean context on its
        surface, at least the time of its longest sequence's wave (`_longest_decode`); as `tc` and `tm` (the
        tables') where a step has no decodes. Plain floats, one step at a time."""
        out_c, out_m = tc.tolist(), tm.tolist()
        for r, (f, b, n, p, top) in enumerate(zip(flops.tolist(), nbytes.tolist(), np.asarray(seqs).tolist(),
                                                  np.asarray(pairs).tolist(), np.asarray(longest).tolist())):
            if n:
                mean = p / n
                f, b = self._on_surface(i, f, b, surface.at(float(n), mean))
                if top > mean:
                    stretch = self._longest_decode(i, surface, n, int(top)) / max(f, b)
                    if stretch > 1.0:
                        f, b = f * stretch, b * stretch
                out_c[r], out_m[r] = f, b
        return out_c, out_m

    def _on_surface(self, i: int, flops: float, nbytes: float, e: float) -> tuple[float, float]:
        """Compute and memory seconds of operator i at efficiency e of the profile's GPU's roofline."""
        return flops / (self._peak_c[i] * e), nbytes / (self._bandwidth * e)


    def _pipelined(self, total: np.ndarray, kernels: np.ndarray, launch: float) -> np.ndarray:
        """GPU window of each pipeline stage of an eager step whose operators take `total` GPU seconds and
        launch `kernels` kernels (all instances), issued by a host that spends `launch` per kernel (and
        `launch_collective` more per collective call: one kernel each)."""
        host = kernels * launch + kernels * self.compiled.comm * self.profile.overheads.launch_collective
        return np.array([pipelined_seconds(host[i] * scale, total[i] * scale, kernels[i] * scale, a, b, n)
                         for i, a, b, n, scale in self.compiled.segments])

    def swap_seconds(self, tokens: int) -> float:
        """Copying `tokens` tokens of KV between GPU and host memory (swap preemption): each GPU moves its
        shard over its own host link at `HOST_COPY_EFFICIENCY` of the link's bandwidth."""
        link = self.dep.host_link
        return link.latency + tokens * self.dep.memory.kv_bytes_per_token / (link.bandwidth * HOST_COPY_EFFICIENCY)

    def eager_window(self, cost: StepCost, launch: float) -> float:
        """GPU window of an eager step priced by this model (`cost`), its host issuing a kernel every `launch`
        seconds (the fit of `launch_eager` inverts this)."""
        if cost.execution != "eager":
            raise ValueError("eager_window: the step runs as a CUDA graph")
        return float(self._pipelined(cost._total, cost._launched, launch).sum())

    def price(self, shape: StepShape) -> StepCost:
        """Cost of one step running `shape`: the operators that read attention's K/V priced at its K/V tokens,
        the others as kept per step features (`_fixed`: steps repeat them); the engine prices most of its steps
        here, and `price_decodes` prices runs of decode steps with the same arithmetic. Prefill-only steps are
        kept per shape (prompt lengths repeat: 2,123 lengths among the 100k prompts of
        `bench/identical_workload.yaml`)."""
        if shape.decode_context.size or shape.verify_tokens.size:
            return self._price(shape)
        key = (tuple(shape.prefill_tokens.tolist()), tuple(shape.prefill_cached.tolist()))
        hit = _recall(self._prefill_cache, key)
        if hit is None:
            hit = _keep(self._prefill_cache, key, self._price(shape), PREFILL_CACHE_SIZE)
        return hit

    def _price(self, shape: StepShape) -> StepCost:
        dep, ovh, v = self.dep, self.profile.overheads, self._varying
        t = StepTotals.of(shape, dep.attention_window)
        if dep.dp > 1:  # DP attention: each rank runs an even share of the step
            t = t.share(dep.dp)
        key, overhead = self._features(t, shape.prefill_tokens.size, shape.verify_tokens.size, shape.num_requests,
                                       shape.uniform_queries)
        graph = key[0]
        fixed = self._fixed(key, t)  # the operators that do not read attention's K/V, as kept
        work_v = self._with_attention(v, fixed.work_v[None], t.prefill_pairs, t.prefill_kv_tokens, t.decode_pairs)
        parts = self._columns(v, work_v, graph, t, [t.decode_seqs], [t.decode_pairs], [t.decode_longest])
        work, tc, tm, total, launched = (whole.copy() for whole in (fixed.work, fixed.tc, fixed.tm, fixed.total,
                                                                    fixed.launched))
        work[v.ids] = work_v[0]
        tc[v.ids], tm[v.ids], total[v.ids], launched[v.ids] = (part[0] for part in parts)
        if graph:
            stages = np.cumsum(total)[-1:] if dep.pp == 1 else \
                np.array([np.cumsum(total[a:b])[-1] for a, b in self.compiled.stage_spans])
        else:  # the host issues the kernels while the GPU runs them (`pipelined_seconds`)
            stages = self._pipelined(total, launched, ovh.launch_eager)
        if ovh.step_per_kv_token:
            overhead = overhead + ovh.step_per_kv_token * shape.kv_tokens
        seconds = float((stages[0] if dep.pp == 1 else np.cumsum(stages)[-1]) + overhead)
        totals = np.cumsum(work * self.compiled.count[:, None], axis=0)[-1]
        return StepCost(self, seconds, tuple(stages.tolist()), "graph" if graph else "eager", t.tokens,
                        ovh.launch_graph if graph else ovh.launch_eager, float(overhead), totals,
                        (work[:, 0], work[:, 1], work[:, 2], tc, tm, total, launched))

    def _features(self, t: StepTotals, prefills: int, verifies: int, requests: int, queries: int = 0
                  ) -> tuple[tuple, float]:
        """A step's key (whether it runs as a graph, then the features x with attention's pairs and K/V tokens
        left out: `_fixed`) and its host overhead but for the per-KV-token part. Verifications of `queries`
        tokens each (a uniform batch, `StepShape.uniform_queries`) replay a full graph in mode 'mixed'."""
        dep, ovh = self.dep, self.profile.overheads
        full = full_graph_rows(math.ceil(t.tokens / queries), queries) \
            if queries > 1 and self.cuda_graphs == "mixed" else None
        graph = full * queries if full else \
            graph_rows(self.cuda_graphs, math.ceil(t.tokens), math.ceil(prefills / dep.dp), verifies)
        tokens = graph or t.tokens
        moe_rows = experts = group = 0.0
        if dep.model.is_moe:
            group = tokens * dep.dp
            moe_rows, experts = self._busiest(group)
        key = (graph is not None, tokens, experts, t.tokens, t.logit_tokens, 0.0, t.prefill_queries, 0.0,
               t.decode_seqs, 0.0, moe_rows, group, group / dep.moe_group, t.prefill_on, t.decode_on)
        if graph:
            return key, ovh.graph_step(requests, piecewise=bool(prefills or verifies) and not full)
        overhead = ovh.step_eager + ovh.step_eager_per_request * requests
        return key, overhead + ovh.step_mixed if t.prefill_seqs and t.decode_seqs else overhead

    @staticmethod
    def _with_attention(columns: _Columns, base: np.ndarray, prefill_pairs: float, prefill_reads: float,
                        decode_pairs: float) -> np.ndarray:
        """The work (1, columns, 3) of `columns` from their work without attention's K/V (`base`), at a step's
        prefill pairs and K/V reads and decode K/V tokens."""
        work = base  # (a term whose count is zero adds nothing: skipped, exactly)
        for slopes, count in zip(columns.attention, (prefill_pairs, prefill_reads, decode_pairs)):
            if count:
                work = work + slopes * count
        return work

    def price_decodes(self, context: np.ndarray, steps: int, active: np.ndarray | None = None) -> DecodeRun:
        """`steps` consecutive decode-only steps, step i (from 0) decoding every request j with `active[j] > i`
        (default: all) at context `context[j] + i` (requests leave as they finish; the first step decodes them
        all): each priced exactly as `price` prices it alone, in one vectorised pass (the engine's skip-ahead)."""
        n, w = context.size, self.dep.attention_window
        step = np.arange(steps, dtype=np.int64)
        if active is None:
            seqs, c = np.full(steps, n), context
        else:  # requests by how long they stay: step i's requests are the first seqs[i]
            order = np.argsort(-active, kind="stable")
            seqs = np.searchsorted(-active[order], -step, side="left")
            c = context[order]
        last = seqs - 1  # (every step decodes someone)
        longest = np.maximum.accumulate(c)[last] + 1 + step
        kv_tokens = np.cumsum(c)[last] + seqs * (step + 1)
        if w is None:
            pairs = kv_tokens.astype(float)
        else:
            on = np.arange(n)[None, :] < seqs[:, None]
            pairs = (np.minimum(c[None, :] + 1 + step[:, None], w) * on).sum(axis=1).astype(float)
            longest = np.minimum(longest, w)
        if self.dep.dp > 1:
            pairs = pairs / self.dep.dp
        # runs of steps with as many requests (fewer and fewer: `seqs` never grows)
        cuts = np.flatnonzero(seqs[1:] != seqs[:-1]) + 1
        bounds = [0, *cuts.tolist(), steps]
        groups = [(self._decode_group(size), end - start)
                  for size, start, end in zip(seqs[bounds[:-1]].tolist(), bounds, bounds[1:])]
        seconds, graph, totals = self._decode_rows(groups, pairs, longest, kv_tokens)
        ranks, peak = self.dep.tp * self.dep.dp, self.dep.num_gpus
        mfu = totals[:, 0] * ranks / (seconds * self._gemm_peak * peak)
        mbu = totals[:, 1] * ranks / (seconds * self.dep.gpu.hbm_bandwidth * peak)
        return DecodeRun(seconds, mfu, mbu, graph, seqs)

    def _decode_rows(self, groups: list[tuple[_DecodeGroup, int]], pairs: np.ndarray, longest: np.ndarray,
                     kv_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Price k decode-only steps given as groups of rows (a `_DecodeGroup`, then its rows) whose rows
        differ only in their decodes' K/V tokens (`pairs`, `longest` and `kv_tokens`, one value per step), with
        `price`'s arithmetic: row r of every result depends on row r's inputs alone, through the same operations
        whatever the other rows (elementwise numpy, sequential sums, per-row scalar code), so a step priced
        among others and the same step priced alone agree to the last bit. The operators that do not read
        attention's K/V are priced once per group and kept (`_fixed`). Returns each step's seconds, whether it
        runs as a CUDA graph, and FLOPs and bytes summed over operators."""
        dep, k, ovh, v = self.dep, pairs.size, self.profile.overheads, self._varying
        if len(groups) == 1:
            g = groups[0][0]
            graph, seqs, overhead = np.full(k, g.graph), np.full(k, g.seqs), g.overhead

            def per_row(name: str) -> np.ndarray:
                return np.repeat(getattr(g.fixed, name)[None], k, axis=0)
        else:
            counts = [count for _, count in groups]
            graph = np.repeat([g.graph for g, _ in groups], counts)
            seqs = np.repeat([g.seqs for g, _ in groups], counts)
            overhead = np.repeat([g.overhead for g, _ in groups], counts)

            def per_row(name: str) -> np.ndarray:
                return np.repeat(np.stack([getattr(g.fixed, name) for g, _ in groups]), counts, axis=0)
        # the operators reading the steps' K/V at each step's K/V tokens, the others as kept
        base = groups[0][0].fixed.work_v if len(groups) == 1 else per_row("work_v")  # (broadcast over the rows)
        work_v = base + v.attention[2] * pairs[:, None, None]  # (`_with_attention`'s decode term, per row)
        _, _, total_v, launched_v = self._columns(v, work_v, graph, None, seqs, pairs, longest)
        total = per_row("total")
        total[:, v.ids] = total_v
        all_graph = bool(graph.all())
        if all_graph and dep.pp == 1:
            seconds = np.cumsum(total, axis=1)[:, -1]
        else:
            stage_seconds = np.empty((k, dep.pp))
            if graph.any():
                t = total[graph]
                stage_seconds[graph] = np.cumsum(t, axis=1)[:, -1:] if dep.pp == 1 else \
                    np.stack([np.cumsum(t[:, a:b], axis=1)[:, -1] for a, b in self.compiled.stage_spans], axis=1)
            if not all_graph:  # the host issues the kernels while the GPU runs them (`pipelined_seconds`)
                launched = per_row("launched")
                launched[:, v.ids] = launched_v
                for r in np.flatnonzero(~graph).tolist():
                    stage_seconds[r] = self._pipelined(total[r], launched[r], ovh.launch_eager)
            seconds = stage_seconds[:, 0] if dep.pp == 1 else np.cumsum(stage_seconds, axis=1)[:, -1]
        if ovh.step_per_kv_token:
            overhead = overhead + ovh.step_per_kv_token * kv_tokens
        seconds = seconds + overhead
        weighted = per_row("weighted")  # FLOPs and bytes (k, operators, 2) times instances
        weighted[:, v.ids] = work_v[..., :2] * v.count[:, None]
        return seconds, graph, np.cumsum(weighted, axis=1)[:, -1]

    def _decode_group(self, size: int) -> _DecodeGroup:
        """A decode-only step of `size` requests but for its decodes' K/V tokens (`_DecodeGroup`), kept per
        size."""
        hit = self._decode_groups.get(size)
        if hit is None:
            t = StepTotals(tokens=size, logit_tokens=size, prefill_seqs=0, prefill_queries=0, prefill_pairs=0.0,
                           prefill_kv_tokens=0.0, decode_seqs=size, decode_pairs=0.0, decode_on=1.0)
            t = t.share(self.dep.dp) if self.dep.dp > 1 else t
            key, overhead = self._features(t, 0, 0, size)
            hit = self._decode_groups[size] = _DecodeGroup(bool(key[0]), t.decode_seqs, overhead, self._fixed(key, t))
        return hit

    def _fixed(self, key: tuple, t: StepTotals) -> _Fixed:
        """The operators at a step's features `key` (whether it runs as a graph, then the features x with
        attention's pairs and K/V tokens left out), as `_Fixed` holds them; kept per key (steps repeat these
        features: the same decodes one token further, a chunk of the same size beside as many decodes)."""
        hit = _recall(self._fixed_cache, key)
        if hit is None:
            work = self.compiled.work(np.array(key[1:], dtype=float))
            f = self._steady.ids
            tc, tm, total, launched = (np.zeros(self._n) for _ in range(4))
            none = np.zeros(0)
            tc[f], tm[f], total[f], launched[f] = (a[0] for a in self._columns(self._steady, work[f][None], key[0],
                                                                                t, none, none, none))
            hit = _keep(self._fixed_cache, key, _Fixed(total, launched, work[self._varying.ids],
                                                       work[:, :2] * self.compiled.count[:, None], work, tc, tm),
                        FIXED_CACHE_SIZE)
        return hit

    def _column_set(self, cols: np.ndarray, attention: np.ndarray) -> _Columns:
        ops, both = self.compiled, np.concatenate([cols, self._n + cols])
        return _Columns(cols, ops.comm[cols], ops.moved[cols], self._table_ids[both], self._peaks[both],
                        np.flatnonzero(self._is_derived[cols]),
                        [(j, *self._spikes[i]) for j, i in enumerate(cols.tolist()) if i in self._spikes],
                        self._peak_c[cols],
                        self._target_c[cols] if self._source is not None else None, ops.count[cols],
                        ops.latency[cols], np.flatnonzero(ops.reduce[cols]),
                        [(i, int(np.flatnonzero(cols == i)[0]), s) for i, s in self._surfaces if i in cols],
                        tuple(attention[cols][None, ..., f].copy() for f in range(3)),
                        ops.kernels[cols] * ops.count[cols], bool(ops.comm[cols].any()),
                        bool(np.any(ops.latency[cols] != 0)))

    def _columns(self, c: _Columns, work: np.ndarray, graph: bool | np.ndarray, t: StepTotals | None,
                 seqs: np.ndarray, pairs: np.ndarray, longest: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Compute and memory seconds, total seconds (all instances, launches included) and kernels launched
        (all instances) of the operators of column set `c`, from their work (k, columns, 3), each step run as
        a graph or not (`graph`, one for all or per step); `t` gives a prefill attention surface its place,
        `seqs`, `pairs` and `longest` each step's decodes and their K/V tokens (the decode attention surface's
        place; the decode calls' splits)."""
        flops, nbytes, payload = work[..., 0], work[..., 1], work[..., 2]
        present = (work > 0).any(axis=2)
        tc, tm = self._table_seconds(c, flops, nbytes, payload)
        self._exact_spikes(c, flops, tc)
        self._measured_gemm_memory(c, flops, nbytes, tc, tm)
        self._attention_surfaces(c, flops, nbytes, tc, tm, t, seqs, pairs, longest)
        if c.target_c is not None:
            tc, tm = self._what_if(c, flops, nbytes, tc, tm)
        graphs = isinstance(graph, np.ndarray)
        all_graph = bool(graph.all()) if graphs else bool(graph)
        launched = self._launched(c, present, graph, all_graph, t, seqs, longest)
        return tc, tm, self._kernel_seconds(c, tc, tm, present, launched, graph, all_graph), launched

    def _table_seconds(self, c: _Columns, flops: np.ndarray, nbytes: np.ndarray, payload: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Compute and memory (a collective: link) seconds from the profile's efficiency tables."""
        m = c.ids.size
        sides = self._tables.seconds(np.concatenate([flops, np.where(c.comm, payload * c.moved, nbytes)
                                                     if c.any_comm else nbytes], axis=1), c.tables, c.peaks)
        return sides[:, :m], sides[:, m:]

    @staticmethod
    def _exact_spikes(c: _Columns, flops: np.ndarray, tc: np.ndarray) -> None:
        """A measured GEMM's spike holds its own M exactly (the table would blur it): in place."""
        for j, per_flop, rows, efficiency in c.spikes:
            m_rows = flops[:, j] * per_flop
            at = np.minimum(np.searchsorted(rows, m_rows - 1e-6), rows.size - 1)
            hit = np.abs(rows[at] - m_rows) < 1e-6
            if hit.any():
                tc[hit, j] = flops[hit, j] / (c.peak_c[j] * efficiency[at[hit]])

    def _measured_gemm_memory(self, c: _Columns, flops: np.ndarray, nbytes: np.ndarray, tc: np.ndarray,
                              tm: np.ndarray) -> None:
        """Measured GEMMs: the compute side's efficiency e(M) applies to the bytes too (in place)."""
        d = c.derived
        if d.size:
            tm[:, d] = tc[:, d] * (nbytes[:, d] / self._bandwidth) / np.maximum(flops[:, d] / c.peak_c[d], 1e-300)

    def _attention_surfaces(self, c: _Columns, flops: np.ndarray, nbytes: np.ndarray, tc: np.ndarray,
                            tm: np.ndarray, t: StepTotals | None, seqs: np.ndarray, pairs: np.ndarray,
                            longest: np.ndarray) -> None:
        """Attention kernels read off their measured surfaces (in place): prefill at the step's queries and mean
        K/V per query, decode at each step's mean context and its longest (`_decode_surface`)."""
        for i, j, surface in c.surfaces:
            if surface.kind == "attention-prefill":
                if t is not None and t.prefill_seqs:
                    e = surface.at(float(t.prefill_queries), t.prefill_kv_tokens / t.prefill_queries)
                    for r in range(flops.shape[0]):
                        tc[r, j], tm[r, j] = self._on_surface(i, flops[r, j], nbytes[r, j], e)
                continue
            tc[:, j], tm[:, j] = self._decode_surface(i, surface, flops[:, j], nbytes[:, j], tc[:, j], tm[:, j],
                                                      seqs, pairs, longest)

    def _what_if(self, c: _Columns, flops: np.ndarray, nbytes: np.ndarray, tc: np.ndarray, tm: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Another GPU's profile: the roofline part moves to this GPU's peaks, the excess stays, scaled by the
        ratio of SM counts (the module docstring's what-if rule); collectives as they are."""
        assert c.target_c is not None
        dense = ~c.comm
        return (np.where(dense, flops / c.target_c + self._excess * (tc - flops / c.peak_c), tc),
                np.where(dense, nbytes / self.dep.gpu.hbm_bandwidth + self._excess * (tm - nbytes / self._bandwidth),
                         tm))

    def _launched(self, c: _Columns, present: np.ndarray, graph: bool | np.ndarray, all_graph: bool,
                  t: StepTotals | None, seqs: np.ndarray, longest: np.ndarray) -> np.ndarray:
        """Kernels launched by every instance of an operator that does work, but for paged decode attention's
        reduction kernel where an eager decode call keeps its keys whole (eager steps, and piecewise graphs'
        attention between the pieces; a decode graph's split is fixed at capture by its block-table width:
        counted as splitting)."""
        launched = present * c.launches
        if c.reduce.size and len(seqs):
            if t is not None and t.prefill_seqs:
                eager: np.ndarray | None = np.ones(present.shape[0], dtype=bool)
            else:  # (decode graphs, most decode steps, skip the rule)
                eager = None if all_graph else ~graph if isinstance(graph, np.ndarray) else \
                    np.ones(present.shape[0], dtype=bool)
            if eager is not None:
                whole = eager & ~decode_reduces(np.asarray(seqs), self.dep.kv_heads_per_gpu, np.asarray(longest),
                                                self.dep.gpu.sm_count)
                if whole.any():
                    launched[:, c.reduce] -= (present[:, c.reduce] & whole[:, None]) * c.count[c.reduce]
        return launched

    def _kernel_seconds(self, c: _Columns, tc: np.ndarray, tm: np.ndarray, present: np.ndarray,
                        launched: np.ndarray, graph: bool | np.ndarray, all_graph: bool) -> np.ndarray:
        """Each operator's seconds over its instances: the longer side, a collective's link latency, its kernels'
        launches, and for kernels queued on a stream (eager) the stream gap (they start later than in a graph
        replay)."""
        ovh = self.profile.overheads
        busy = np.maximum(tc, tm)
        if c.any_latency:
            busy = busy + present * c.latency
        total = busy * c.count + launched * ovh.launch_graph
        if not all_graph:
            total = np.where(graph[:, None], total, total + launched * ovh.stream_gap) \
                if isinstance(graph, np.ndarray) else total + launched * ovh.stream_gap
        return total


@dataclass(frozen=True, slots=True)
class _Columns:
    """A set of operators (`ids`) with their constants, as `CostModel._columns` prices them: the operators
    that read attention's K/V, or the others."""

    ids: np.ndarray
    comm: np.ndarray
    moved: np.ndarray
    tables: np.ndarray
    peaks: np.ndarray
    derived: np.ndarray  # positions of measured GEMMs
    spikes: list[tuple[int, float, np.ndarray, np.ndarray]]  # (position, M per FLOP, spikes' M and efficiencies)
    peak_c: np.ndarray
    target_c: np.ndarray | None
    count: np.ndarray
    latency: np.ndarray
    reduce: np.ndarray  # positions of paged decode attention (`CostModel._reduce`)
    surfaces: list[tuple[int, int, AttentionSurface]]  # (operator index, position, surface)
    attention: tuple[np.ndarray, ...]  # (1, columns, 3) each: the work one more prefill pair, prefill K/V read
    # and decode K/V token adds
    launches: np.ndarray  # kernels launched by all instances of an operator that does work
    any_comm: bool  # whether a collective is among the columns
    any_latency: bool  # whether a column has a link latency


@dataclass(frozen=True, slots=True)
class _Fixed:
    """`CostModel._fixed`'s operators at one step's features: where an operator does not read attention's
    K/V, its total seconds and kernels launched (ops,); the work (FLOPs, bytes, payload) of those that do; every
    operator's FLOPs and bytes times its instances (ops, 2); every operator's work (ops, 3) and, where it does not
    read attention's K/V, its compute and memory seconds (ops,)."""

    total: np.ndarray
    launched: np.ndarray
    work_v: np.ndarray
    weighted: np.ndarray
    work: np.ndarray
    tc: np.ndarray
    tm: np.ndarray


@dataclass(frozen=True, slots=True)
class _DecodeGroup:
    """A decode-only step of some number of requests, all but its decodes' K/V tokens: whether it runs as a
    CUDA graph, its decodes (one DP rank's share), host overhead (but for the per-KV-token part) and operators
    at its features (`CostModel._fixed`)."""

    graph: bool
    seqs: float
    overhead: float
    fixed: _Fixed


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """Consecutive decode steps priced at once (`CostModel.price_decodes`): per step, seconds, MFU, MBU,
    whether it runs as a CUDA graph, and requests decoded."""

    seconds: np.ndarray
    mfu: np.ndarray
    mbu: np.ndarray
    graph: np.ndarray
    decodes: np.ndarray


def _profile_gpu(profile: Profile, gpu: GPUSpec) -> GPUSpec | None:
    """The catalog GPU a calibrated profile was measured on, when it is not `gpu` (None otherwise, and for
    profiles of GPUs outside the catalog, whose efficiencies then apply to this GPU's peaks as they are)."""
    if profile.gpu in ("default", gpu.id):
        return None
    from hardware.catalog import get_gpu

    try:
        return get_gpu(profile.gpu)
    except ServesimError:
        return None
