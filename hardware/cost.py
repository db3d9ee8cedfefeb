"""Roofline cost of one forward step: sum over operators of max(compute, memory) time plus launches.

    op time   = max(flops / (peak_flops * eff_c), bytes / (hbm_bw * eff_m)) + kernels * launch
    collective= steps * link_latency + moved_bytes / (link_bw * eff_link)   (ring all-reduce: 2(n-1) steps,
                moving 2(n-1)/n of the payload; all-gather: n-1 steps, (n-1)/n; send/recv: 1 step, all)
    step time = sum over pipeline stages of their operators + CPU overhead of the step

Efficiencies come from a calibration profile (`hardware.profile`), falling back to documented defaults.
Decode-only steps run as CUDA graphs when enabled (vLLM's rule: the batch is padded to the next captured
size, at most 512); any step with a prefill or verification runs eagerly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from hardware.deployment import Deployment
from hardware.operators import (
    Operator,
    StepShape,
    StepTotals,
    first_stage_operators,
    last_stage_operators,
    layer_operators,
    pipeline_operator,
)
from hardware.profile import COLLECTIVE_KINDS, DEFAULT_PROFILE, OP_KINDS, Profile, TimeTable, packaged_profile

# vLLM's default CUDA-graph capture sizes (1, 2, 4, then multiples of 8 up to 512).
GRAPH_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, *range(8, 513, 8))


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


@dataclass(frozen=True, slots=True)
class StepCost:
    """Priced step. FLOPs and bytes are totals over all GPUs of the replica; times are wall seconds."""

    seconds: float  # latency of the step through every pipeline stage, CPU overhead included
    stage_seconds: tuple[float, ...]  # GPU time of each pipeline stage
    flops: float
    bytes: float  # HBM bytes read + written
    comm_bytes: float  # collective payload bytes (per GPU)
    compute_seconds: float  # sum over operators of their compute-side time (one GPU per stage)
    memory_seconds: float  # sum over operators of their memory-side time
    comm_seconds: float
    launch_seconds: float
    overhead_seconds: float  # CPU time of the step outside the kernels
    kernels: int
    execution: str  # "graph" or "eager"
    tokens: int
    mfu: float
    mbu: float
    breakdown: tuple[OpCost, ...] = ()

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

    @property
    def bottleneck_seconds(self) -> float:
        """Slowest stage: the step interval of a full pipeline (PP with one batch per stage in flight)."""
        return max(self.stage_seconds)


class CostModel:
    """Prices `StepShape`s for one `Deployment` under an efficiency profile."""

    def __init__(
        self,
        deployment: Deployment,
        profile: Profile | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.dep = deployment
        base = profile or packaged_profile(deployment.gpu.id) or DEFAULT_PROFILE
        self.profile = base.merged_over(DEFAULT_PROFILE)
        self.cuda_graphs = cuda_graphs
        gpu = deployment.gpu
        elementwise_peak = gpu.fp32_flops
        attention_peak = gpu.fp32_flops if deployment.weight_dtype == "fp32" else gpu.bf16_flops
        self._peak = {kind: elementwise_peak for kind in OP_KINDS}
        self._peak["gemm"] = gpu.matmul_flops(deployment.weight_dtype)
        self._peak["attention-prefill"] = self._peak["attention-decode"] = attention_peak
        self._tables = {
            kind: (TimeTable(eff.compute), TimeTable(eff.memory)) for kind, eff in self.profile.efficiency.items()
        }

    def graph_rows(self, decode_seqs: int) -> int | None:
        """Padded batch size a decode-only step replays as a CUDA graph, or None when it runs eagerly."""
        if not self.cuda_graphs or decode_seqs == 0 or decode_seqs > GRAPH_BATCH_SIZES[-1]:
            return None
        return GRAPH_BATCH_SIZES[bisect.bisect_left(GRAPH_BATCH_SIZES, decode_seqs)]

    def _time(self, op: Operator, launch: float) -> tuple[float, float, float, str]:
        """(seconds, compute-side, memory-side, bound) of one instance of `op`."""
        ctab, mtab = self._tables[op.kind]
        if op.kind in COLLECTIVE_KINDS:
            link = self.dep.pp_link if op.kind == "send-recv" else self.dep.tp_link
            n = op.ranks
            if op.kind == "all-reduce":
                steps, moved = 2 * (n - 1), 2.0 * (n - 1) / n * op.comm_bytes
            elif op.kind == "all-gather":
                steps, moved = n - 1, (n - 1) / n * op.comm_bytes
            else:
                steps, moved = 1, op.comm_bytes
            t = steps * link.latency + mtab.seconds(moved, link.bandwidth)
            return t + op.kernels * launch, 0.0, 0.0, "link"
        c = ctab.seconds(op.flops, self._peak[op.kind])
        m = mtab.seconds(op.bytes, self.dep.gpu.hbm_bandwidth)
        return max(c, m) + op.kernels * launch, c, m, "compute" if c >= m else "memory"

    def price(self, shape: StepShape, breakdown: bool = False) -> StepCost:
        """Cost of one step running `shape`."""
        dep = self.dep
        totals = StepTotals.of(shape, dep.model.sliding_window)
        graph = self.graph_rows(totals.decode_seqs) if shape.is_decode_only else None
        rows = graph or totals.tokens
        ovh = self.profile.overheads
        launch = ovh.launch_graph if graph else ovh.launch_eager

        layer_ops = [(op, self._time(op, launch)) for op in layer_operators(dep, totals, rows)]
        last = dep.pp - 1
        stage_seconds = []
        flops = nbytes = comm = comp_s = mem_s = comm_s = 0.0
        kernels = 0
        rows_out: list[OpCost] = []
        for s, n_layers in enumerate(dep.layers_per_stage):
            extras = first_stage_operators(dep, rows) if s == 0 else [pipeline_operator(dep, rows, s)]
            if s == last:
                extras += last_stage_operators(dep, totals)
            items = [(op, timing, n_layers * op.count) for op, timing in layer_ops]
            items += [(op, self._time(op, launch), op.count) for op in extras]
            stage_t = 0.0
            for op, (t, c, m, bound), count in items:
                stage_t += t * count
                flops += op.flops * count * dep.tp
                nbytes += op.bytes * count * dep.tp
                kernels += op.kernels * count
                if bound == "link":
                    comm += op.comm_bytes * count
                    comm_s += (t - op.kernels * launch) * count
                else:
                    comp_s += c * count
                    mem_s += m * count
                if breakdown:
                    rows_out.append(OpCost(op.name, op.kind, s, count, op.flops * count, op.bytes * count,
                                           op.comm_bytes * count, t * count, bound))
            stage_seconds.append(stage_t)

        overhead = ovh.step_graph if graph else ovh.step_eager
        seconds = sum(stage_seconds) + overhead
        gpus = dep.num_gpus
        return StepCost(
            seconds=seconds,
            stage_seconds=tuple(stage_seconds),
            flops=flops,
            bytes=nbytes,
            comm_bytes=comm,
            compute_seconds=comp_s,
            memory_seconds=mem_s,
            comm_seconds=comm_s,
            launch_seconds=kernels * launch,
            overhead_seconds=overhead,
            kernels=kernels,
            execution="graph" if graph else "eager",
            tokens=totals.tokens,
            mfu=flops / (seconds * self._peak["gemm"] * gpus),
            mbu=nbytes / (seconds * dep.gpu.hbm_bandwidth * gpus),
            breakdown=tuple(rows_out),
        )
