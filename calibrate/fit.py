"""Turn microbenchmark records into an efficiency profile (`hardware.profile.Profile`, version 3).

Every measured operator gets efficiency = roofline / (seconds - kernels x launch_graph), where the roofline
is max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) of the GPU's datasheet and the FLOPs and bytes are the
cost model's own counts (so the cost model reproduces a measured point exactly). Then:

- GEMMs: one curve over M per weight shape (K, N), isolated spikes (`spikes`, listed in the metadata)
  kept at their own M only, plus a pooled per-kind curve for unmeasured GEMMs;
- named operators (`rope`, `add_rmsnorm`, ...): memory efficiency over bytes, pooled over the models and
  TP degrees measured, binned at four points per decade (median), and pooled per kind;
- attention: per head configuration, a surface over its grid (cells the grid could not hold in memory
  take the nearest measured cell; kernels counted as the cost model counts them now, not as recorded);
  ragged batches are kept out of the fit and reported as a check; the K/V gathers before the kernels are
  named operators of kind `kv-gather` (records timed with the gather, before version 3, are refused), with a
  curve per head configuration (`kv_gather`: the rows' size sets their efficiency);
- collectives: link efficiency over the bytes each rank moves, per kind and number of ranks;
- fixed costs: GPU seconds per kernel in a graph and what a kernel queued on a stream (eager) takes more;
  host dispatch per kernel and per-step, per-request, per-KV-token and mixed-step overheads from whole
  steps of a model with half and all of its layers, or of the reference's rounds (see `_overheads`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import theilslopes

from calibrate.records import (
    PAGED_ENGINE,
    Attention,
    Collective,
    Engine,
    Gemm,
    GroupedGemm,
    Measurements,
    MemoryOp,
    Step,
)
from hardware.catalog import get_interconnect, get_model
from hardware.cost import CostModel, collective_shape, peak_flops
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.operators import ATTENTION_KERNELS, Operator, StepShape
from hardware.profile import (
    COLLECTIVE_KINDS,
    DEFAULT_PROFILE,
    AttentionSurface,
    CollectiveCurve,
    Curve,
    GatherCurve,
    GemmCurve,
    GroupedGemmCurve,
    KindEfficiency,
    Overheads,
    Profile,
)
from hardware.specs import GPUSpec, ModelSpec

MIN_EFFICIENCY = 1e-6


def efficiency(roofline: float, seconds: float, fixed: float) -> float:
    """Roofline seconds over measured seconds less the fixed per-kernel part, within (0, 1]."""
    busy = seconds - fixed
    return 1.0 if busy <= roofline else max(MIN_EFFICIENCY, roofline / busy)


def binned_curve(sizes: np.ndarray, eff: np.ndarray, per_decade: int = 4) -> Curve:
    """Median efficiency (and median size) in bins of 1/per_decade decade of size."""
    order = np.argsort(sizes)
    sizes, eff = np.asarray(sizes, float)[order], np.asarray(eff, float)[order]
    bins = np.floor(np.log10(sizes) * per_decade)
    xs, ys = [], []
    for b in np.unique(bins):
        sel = bins == b
        xs.append(float(np.exp(np.median(np.log(sizes[sel])))))
        ys.append(float(np.clip(np.median(eff[sel]), MIN_EFFICIENCY, 1.0)))
    return Curve(sizes=tuple(xs), efficiency=tuple(ys))


class _Roofline:
    """Datasheet roofline seconds of an operator kind's FLOPs and bytes on one GPU (bf16 weights)."""

    def __init__(self, gpu: GPUSpec) -> None:
        self.gpu = gpu
        self.dep = Deployment.build(get_model("tiny-llama"), gpu)

    def __call__(self, kind: str, flops: float, nbytes: float) -> float:
        return max(flops / peak_flops(self.dep, kind), nbytes / self.gpu.hbm_bandwidth)


SPIKE = 1.25  # a GEMM this much slower than both its neighbours on the M grid: cuBLAS's pick for that M alone


def spikes(points: list[tuple[float, float]]) -> set[float]:
    """The M values, of (M, seconds) points of one GEMM shape, that took more than `SPIKE` times as long as
    both the next smaller and the next larger M: isolated kernel choices (an H200 ran Llama-3-8B's 4,096 x
    28,672 projection in 287 us at M = 448, 151 us at 385 and 162 us at 512, and 156 us at 500 and 507).
    Interpolating through such a point would price its neighbours as slow (by 19% at M = 397, 15% at 500), and
    dropping it would price that M fast (a CUDA graph padded to 400 rows ran that projection in 198 us on an
    H100, where 392 and 408 took 157 and 149 us): `_gemm_curves` keeps it at its own M only."""
    ordered = sorted(points)
    return {m for (_, before), (m, seconds), (_, after) in zip(ordered, ordered[1:], ordered[2:])
            if seconds > SPIKE * max(before, after)}


def _gemm_curves(records: list[Gemm], roof: _Roofline,
                 launch: float) -> tuple[tuple[GemmCurve, ...], list[dict[str, float]]]:
    """One curve over M per weight shape and its spikes (`spikes`). The curve runs through the other points,
    and a spike holds only its own M: half a row either side of it the curve through the others takes over,
    so a GEMM of the rows beside it (397 for a graph padded to 400, 401) is priced as its neighbours, and
    `CostModel` prices the spike's own M exactly (its time table would blur so narrow a peak)."""
    by_shape: dict[tuple[int, int], list[Gemm]] = defaultdict(list)
    for r in records:
        by_shape[(r.k, r.n)].append(r)
    curves, listed = [], []
    for (k, n), rs in sorted(by_shape.items()):
        peaks = spikes([(r.m, r.seconds) for r in rs])
        listed += [{"k": k, "n": n, "m": r.m, "seconds": r.seconds} for r in rs if r.m in peaks]
        measured = {float(r.m): efficiency(roof("gemm", r.flops, r.bytes), r.seconds, launch * r.kernels) for r in rs}
        points = {m: e for m, e in measured.items() if m not in peaks}
        smooth = GemmCurve(k=k, n=n, m=tuple(sorted(points)), efficiency=tuple(points[m] for m in sorted(points)))
        for m in map(float, peaks):
            points[m] = measured[m]
            for side in (m - 0.5, m + 0.5):
                if side >= 1.0:
                    points[side] = float(smooth.at(np.array([side]))[0])
        ms = sorted(points)
        curves.append(GemmCurve(k=k, n=n, m=tuple(ms), efficiency=tuple(points[m] for m in ms),
                                spikes=tuple(sorted(map(float, peaks)))))
    return tuple(curves), listed


def _grouped_curves(records: list[GroupedGemm], roof: _Roofline, launch: float) -> tuple[GroupedGemmCurve, ...]:
    """One curve over M (token slots) per expert shape and count: the roofline of the experts actually hit."""
    by_shape: dict[tuple[int, int, int], list[GroupedGemm]] = defaultdict(list)
    for r in records:
        by_shape[(r.k, r.n, r.experts)].append(r)
    curves = []
    for (k, n, experts), rs in sorted(by_shape.items()):
        points = sorted({r.m: efficiency(roof("gemm", r.flops, r.bytes), r.seconds, launch * r.kernels)
                         for r in rs}.items())
        curves.append(GroupedGemmCurve(k=k, n=n, experts=experts, m=tuple(float(m) for m, _ in points),
                                       efficiency=tuple(e for _, e in points)))
    return tuple(curves)


def _memory_efficiency(r: MemoryOp, gpu: GPUSpec, launch: float) -> float:
    return efficiency(r.bytes / gpu.hbm_bandwidth, r.seconds, launch * r.kernels)


def _memory_curve(records: Sequence[MemoryOp], gpu: GPUSpec, launch: float) -> Curve:
    """Memory efficiency over bytes of memory-bound records, binned (`binned_curve`)."""
    return binned_curve(np.array([r.bytes for r in records]),
                        np.array([_memory_efficiency(r, gpu, launch) for r in records]))


def _surfaces(records: list[Attention], roof: _Roofline, launch: float) -> tuple[AttentionSurface, ...]:
    groups: dict[tuple[str, int, int, int], dict[tuple[float, float], float]] = defaultdict(dict)
    for r in records:
        key = (r.kind, r.heads, r.kv_heads, r.head_dim)
        groups[key][(r.x, r.y)] = efficiency(roof(r.kind, r.flops, r.bytes), r.seconds,
                                             launch * _attention_kernels(r))
    out = []
    for (kind, heads, kv_heads, head_dim), cells in sorted(groups.items()):
        xs, ys = sorted({x for x, _ in cells}), sorted({y for _, y in cells})
        known = np.array(list(cells))
        grid = []
        for x in xs:
            row = []
            for y in ys:
                if (x, y) not in cells:  # not measured (memory): the nearest measured cell in log space
                    d = np.hypot(np.log(known[:, 0] / x), np.log(known[:, 1] / y))
                    nearest = known[int(np.argmin(d))]
                    row.append(cells[(float(nearest[0]), float(nearest[1]))])
                else:
                    row.append(cells[(x, y)])
            grid.append(tuple(row))
        out.append(AttentionSurface(kind=kind, heads=heads, kv_heads=kv_heads, head_dim=head_dim, x=tuple(xs),
                                    y=tuple(ys), efficiency=tuple(grid)))
    return tuple(out)


def _gather_curves(records: list[MemoryOp], gpu: GPUSpec, launch: float) -> tuple[GatherCurve, ...]:
    """The K/V gathers' memory efficiency over bytes per head configuration (prefill and decode gathers
    pooled: the same copy of cache rows)."""
    groups: dict[tuple[int, int], list[MemoryOp]] = defaultdict(list)
    for r in records:
        assert r.kv_heads is not None and r.head_dim is not None
        groups[(r.kv_heads, r.head_dim)].append(r)
    return tuple(GatherCurve(kv_heads=kv_heads, head_dim=head_dim, curve=_memory_curve(rs, gpu, launch))
                 for (kv_heads, head_dim), rs in sorted(groups.items()))


def _collective_curves(records: list[Collective], gpu: GPUSpec) -> tuple[CollectiveCurve, ...]:
    link = get_interconnect(gpu.intra_node_link)
    groups: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        steps, share = collective_shape(Operator(r.kind, r.kind, 0.0, 0.0, ranks=r.ranks))
        moved = r.comm_bytes * share
        groups[(r.kind, r.ranks)].append((moved, efficiency(moved / link.bandwidth, r.seconds, steps * link.latency)))
    return tuple(CollectiveCurve(kind=kind, ranks=ranks, curve=binned_curve(*map(np.array, zip(*pts)), per_decade=2))
                 for (kind, ranks), pts in sorted(groups.items()))


def _attention_kernels(r: Attention) -> int:
    return ATTENTION_KERNELS[r.engine["kv_access"]][r.kind]


def _launched(spec: ModelSpec, shape: StepShape, gpu: GPUSpec, tp: int = 1,
              kernels: Engine = PAGED_ENGINE) -> list[tuple[Operator, int, float]]:
    """The operators that launch work in an eager step of `spec` on one GPU of a TP group: (operator, its
    instances, the kernels they launch), as the cost model counts them (`StepCost.launches`)."""
    model = CostModel(Deployment.build(spec, gpu, tp=tp, **kernels), cuda_graphs=False)
    return model.price(shape).launches()


def layer_kernels(spec: ModelSpec, shape: StepShape, gpu: GPUSpec,
                  kernels: Engine = PAGED_ENGINE) -> tuple[float, float]:
    """Kernels the cost model counts for a step of `spec`: (per decoder layer, outside the layers)."""
    done = _launched(spec, shape, gpu, kernels=kernels)
    layer = sum(k for _, c, k in done if c >= spec.num_hidden_layers) / spec.num_hidden_layers
    return layer, sum(k for _, c, k in done if c < spec.num_hidden_layers)


def step_calls(spec: ModelSpec, shape: StepShape, gpu: GPUSpec, tp: int = 1,
               kernels: Engine = PAGED_ENGINE) -> tuple[float, float]:
    """Host calls of an eager step of `spec` on one rank of TP `tp`: (kernels, of which collectives)."""
    done = _launched(spec, shape, gpu, tp, kernels)
    return sum(k for _, _, k in done), sum(k for op, _, k in done if op.kind in COLLECTIVE_KINDS)


def _robust_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Non-negative (intercept, slope) of y over x, robust to outliers (Theil-Sen, scipy)."""
    if len(set(x)) < 2:
        return max(0.0, float(np.median(y))), 0.0
    slope, intercept, *_ = theilslopes(y, x)
    slope = max(0.0, float(slope))
    return max(0.0, float(np.median(np.array(y) - slope * np.array(x)))), slope


def _per_kv_token(steps: list[Step]) -> float:
    """Host seconds per KV token the step's requests hold: the median, over pairs of decode steps with the
    same layers, execution and requests but different contexts, of the growth of their host time (wall less
    GPU seconds) per token."""
    groups: dict[tuple[int, str, int], list[tuple[float, float]]] = defaultdict(list)
    for s in steps:
        if s.kv_tokens is not None and math.isfinite(s.gpu) and not s.prefills:
            groups[(s.layers, s.execution, s.requests)].append((s.kv_tokens, s.wall - s.gpu))
    slopes = [(h2 - h1) / (k2 - k1) for points in groups.values()
              for (k1, h1), (k2, h2) in itertools.combinations(sorted(points), 2) if k2 > k1]
    return max(0.0, float(np.median(slopes))) if slopes else 0.0


def _overheads(raw: Measurements, partial: Profile, gpu: GPUSpec, launch_graph: float) -> Overheads:
    """Fixed costs from whole steps of a model run with half and all of its layers (robust fits, on the
    fast-phase statistic where recorded: a shared host has slow phases).

    Host time per KV token: from steps that differ only in context (`_per_kv_token`); the rest from steps
    at short contexts (little GPU work). Eager steps are host-bound: inside their CUDA events the host
    dispatches the forward pass, so a kernel's dispatch is the median over a model's steps of the host's
    seconds per kernel under which the cost model's pipelined eager window (`dispatch_per_kernel`) equals
    their GPU window (of the two models, the run in the host's faster phase); outside, the wall less the
    GPU window and the KV
    tokens' part, over the requests, gives the step overhead (intercept) and its per-request part (slope),
    and what steps with both prefill chunks and decodes spend beyond that line, `step_mixed`.
    Where GPU windows were not measured (CPU), the wall's growth per layer between the two models gives the
    dispatch per layer instead, and the wall less the layers' dispatch the step overheads. Decode graph
    steps: wall less their priced GPU time and the KV tokens' part, over the requests. Steps with prefill
    chunks replayed as piecewise graphs: the same residual, less the eager steps' per-request part (they
    build the eager pass's inputs), median; it holds the GPU's waits at the pieces' boundaries (torch.profiler
    on an H200: the kernels' sum within 3% of their priced time, 0.2-0.3 ms more idle per mixed step than a
    decode graph's). Eager collectives: from the
    host-bound eager steps run as TP ranks (records with `tp` > 1; `_collective_excess`, fastest run), else
    from the collectives suite's single-call dispatch record.
    """
    base = DEFAULT_PROFILE.overheads
    steps = [s for s in raw.steps if s.tp == 1]
    per_kv = _per_kv_token(steps)
    # an eager step's kernels start later, queued on a stream
    fitted: dict[str, float] = {"launch_graph": launch_graph, "step_per_kv_token": per_kv,
                                "stream_gap": raw.fixed.stream_gap_seconds}
    short = [s for s in steps if s.short]
    eager = [s for s in short if s.execution == "eager"]
    graph = [s for s in short if s.execution == "graph"]

    models: dict[tuple[Any, ...], CostModel] = {}

    def per_kernel(s: Step) -> float:  # the host's seconds per kernel that explain the GPU window
        key = (s.layers, *s.engine.values())
        if key not in models:
            models[key] = CostModel(Deployment.build(_step_spec(s), gpu, **s.engine), partial, cuda_graphs=False)
        return dispatch_per_kernel(models[key], s.step_shape(), s.gpu)

    runs = _fastest_run(eager, per_kernel)
    if runs:
        launch, timed = runs

        def outside(s: Step) -> float:  # host seconds outside the GPU window, less the KV tokens' part
            return s.wall - s.gpu - per_kv * s.kv

        single = [s for s in timed if not s.mixed]
        step, per_request = _robust_line([s.requests for s in single], [outside(s) for s in single])
        fitted.update(launch_eager=launch, step_eager=step, step_eager_per_request=per_request)
        if mixed := [outside(s) - step - per_request * s.requests for s in timed if s.mixed]:
            fitted["step_mixed"] = max(0.0, float(np.median(mixed)))
    elif len(layers := sorted({s.layers for s in eager})) >= 2:
        key = lambda s: json.dumps(s.shape, sort_keys=True)  # noqa: E731
        by_layers = {(s.layers, key(s)): s.wall for s in eager}
        lo, hi = layers[0], layers[-1]
        per_layer = float(np.median([(by_layers[(hi, k)] - w) / (hi - lo) for (n, k), w in by_layers.items()
                                     if n == lo and (hi, k) in by_layers]))
        k_layer, k_other = layer_kernels(get_model(eager[0].model), StepShape.build(decode=[63]), gpu,
                                         eager[0].engine)
        launch = max(0.0, per_layer) / k_layer
        step, per_request = _robust_line([s.requests for s in eager],
                                         [s.wall - s.layers * per_layer - per_kv * s.kv for s in eager])
        fitted.update(launch_eager=launch, step_eager=max(0.0, step - k_other * launch),
                      step_eager_per_request=per_request)
    def residual(s: Step) -> float:  # wall less the priced GPU time and the KV tokens' part
        priced = CostModel(Deployment.build(_step_spec(s), gpu, **s.engine), partial, cuda_graphs=True).price(
            s.step_shape())
        return s.wall - sum(priced.stage_seconds) - per_kv * s.kv

    if decodes := [s for s in graph if not s.prefills]:
        step, per_request = _robust_line([s.requests for s in decodes], [residual(s) for s in decodes])
        fitted.update(step_graph=step, step_graph_per_request=per_request)
    if pieces := [s for s in graph if s.prefills]:
        per_request = fitted.get("step_eager_per_request", base.step_eager_per_request)
        fitted.update(step_piecewise=max(0.0, float(np.median([residual(s) - per_request * s.requests
                                                                 for s in pieces]))),
                      step_piecewise_per_request=per_request)
    launch_eager = fitted.get("launch_eager", base.launch_eager)
    tp_eager = [s for s in raw.steps if s.tp > 1 and s.execution == "eager" and s.short]
    dispatch = [r.seconds - r.kernel_seconds for r in raw.dispatch]
    if tp_run := _fastest_run(tp_eager, lambda s: _collective_excess(s, gpu, launch_eager)):
        fitted["launch_collective"] = max(0.0, tp_run[0])
    elif dispatch:  # an eager NCCL call's host cost beyond a plain kernel's, in a TP rank
        fitted["launch_collective"] = max(0.0, float(np.median(dispatch)))
    return base.model_copy(update={k: float(v) for k, v in fitted.items()})


def _step_spec(s: Step) -> ModelSpec:
    """The model an overhead step ran: its catalog model with the step's number of layers."""
    return get_model(s.model).model_copy(update={"num_hidden_layers": s.layers})


def dispatch_per_kernel(model: CostModel, shape: StepShape, window: float) -> float:
    """The host's seconds per kernel (`launch_eager`) under which `model` prices an eager step's GPU window
    at `window` (`CostModel.eager_window` grows with it: inverted by bisection, scipy); 0 where the GPU alone
    takes longer."""
    cost = model.price(shape)  # once: only the host's dispatch varies below
    if model.eager_window(cost, 0.0) >= window:
        return 0.0
    top = window / cost.kernels  # the dispatch alone then takes the window
    return float(brentq(lambda launch: model.eager_window(cost, launch) - window, 0.0, top, xtol=1e-10))


def _collective_excess(s: Step, gpu: GPUSpec, launch_eager: float) -> float:
    """Host seconds per collective of a host-bound eager TP step beyond its calls' plain dispatch: its GPU
    window less kernels x `launch_eager`, over its collectives (NCCL's own dispatch and the wait for the
    slower rank at each all-reduce)."""
    kernels, collectives = step_calls(_step_spec(s), s.step_shape(), gpu, s.tp, s.engine)
    return (s.gpu - kernels * launch_eager) / collectives


def _fastest_run(steps: list[Step], per_step: Callable[[Step], float]) -> tuple[float, list[Step]] | None:
    """(median of `per_step`, the steps) of the run (steps of one model: same layers) whose median is the
    smallest, among steps with a GPU window: the run in the host's fastest phase (a slow phase, seconds
    long, can cover a whole run); None without such steps."""
    runs: dict[int, list[Step]] = defaultdict(list)
    for s in steps:
        if math.isfinite(s.gpu):
            runs[s.layers].append(s)
    if not runs:
        return None
    medians = {n: float(np.median([per_step(s) for s in run])) for n, run in runs.items()}
    fastest = min(medians, key=medians.__getitem__)
    return medians[fastest], runs[fastest]


def fit_profile(raw: dict[str, Any], gpu: GPUSpec, metadata: dict[str, Any]) -> Profile:
    """A version-3 profile for `gpu` from `calibrate.microbench.run_all`'s output (plus collectives): the raw
    JSON's dict, read into typed records (`calibrate.records.Measurements`)."""
    m = Measurements.parse(raw)
    roof = _Roofline(gpu)
    launch = float(m.fixed.graph_kernel_seconds)
    gemm, named, attention = m.gemm, m.named, m.attention
    if any(r.with_gather for r in attention):
        raise ServesimError("attention records timed with their K/V gather (before profile version 3) cannot be "
                            "fit: measure again with --suites attention and overlay them with --later")

    operators, kinds = {}, dict(DEFAULT_PROFILE.efficiency)
    by_name: dict[str, list[MemoryOp]] = defaultdict(list)
    for r in named:
        by_name[r.op].append(r)
    for name, rs in sorted(by_name.items()):
        operators[name] = _memory_curve(rs, gpu, launch)
    for kind in {r.kind for r in named}:
        rs = [r for r in named if r.kind == kind]
        kinds[kind] = KindEfficiency(compute=kinds[kind].compute, memory=_memory_curve(rs, gpu, launch))
    if gemm:
        eff = np.array([efficiency(roof("gemm", r.flops, r.bytes), r.seconds, launch) for r in gemm])
        kinds["gemm"] = KindEfficiency(compute=binned_curve(np.array([r.flops for r in gemm]), eff),
                                       memory=binned_curve(np.array([r.bytes for r in gemm]), eff))
    surfaces = _surfaces([r for r in attention if not r.ragged], roof, launch)
    gemm_curves, gemm_spikes = _gemm_curves(gemm, roof, launch)
    profile = Profile(gpu=gpu.id, metadata=metadata, efficiency=kinds, overheads=DEFAULT_PROFILE.overheads,
                      gemm=gemm_curves, operators=operators, attention=surfaces,
                      grouped_gemm=_grouped_curves(m.grouped_gemm, roof, launch),
                      collectives=_collective_curves(m.collectives, gpu),
                      kv_gather=_gather_curves([r for r in named if r.kind == "kv-gather" and r.kv_heads is not None
                                                and not r.ragged], gpu, launch))
    # whole steps are priced with the measured per-kernel costs (graph steps' residuals, the eager dispatch)
    measured = profile.overheads.model_copy(update={"launch_graph": launch, "stream_gap": m.fixed.stream_gap_seconds})
    profile = profile.model_copy(update={"overheads": measured})
    profile = profile.model_copy(update={"overheads": _overheads(m, profile, gpu, launch)})
    checks = [_ragged_check(r, profile, roof, launch) for r in attention if r.ragged]
    meta = {**metadata, "ceilings": raw.get("ceilings", {}), "fixed": raw["fixed"],
            "ragged_attention_checks": checks, "gemm_spikes": gemm_spikes}
    engines = sorted({tuple(s.engine.values()) for s in m.steps})
    name = ("servesim backend (" + "; ".join(f"kv_access {a}, elementwise {e}" for a, e in engines) + ")"
            if engines else DEFAULT_PROFILE.engine_name)
    return profile.model_copy(update={"metadata": meta, "engine_name": name})


def _ragged_check(r: Attention, profile: Profile, roof: _Roofline, launch: float) -> dict[str, float]:
    """Predicted vs measured seconds of a ragged attention batch from the surface at its mean shape."""
    surface = profile.attention_surface(r.kind, r.heads, r.kv_heads, r.head_dim)
    e = surface.at(r.x, r.y) if surface is not None else 1.0
    predicted = roof(r.kind, r.flops, r.bytes) / e + launch * _attention_kernels(r)
    return {"kind": r.kind, "seqs": r.seqs, "queries": r.queries, "x": r.x, "y": r.y, "measured": r.seconds,
            "predicted": predicted, "error": predicted / r.seconds - 1.0 if r.seconds else math.nan}
