"""Capacity planning (`servesim plan SPEC.yaml`): the cheapest configuration that meets the SLOs.

A spec names a base scenario (model, workload, SLOs), a search space (GPU types with prices, TP, PP,
replicas, schedulers, colocated or disaggregated, speculation on or off) and an objective. Every
configuration in the space is first pruned when it cannot fit in memory or cannot meet the TPOT target
even at batch 1; the rest are sized by binary search on the arrival rate (`servesim.capacity.find_capacity`):
capacity = the highest Poisson rate at which the run is stable in steady state and at least `attainment` of
its steady window's requests meet every SLO, probes sized by simulated time (`horizon_s`, `min_requests`),
the lowest over `seeds` seeds near the boundary. With `replicas: auto`, one replica is sized and the replica
count for each target rate is ceil(rate / capacity), then checked by simulating that many replicas at the
target rate. The best configurations are then verified over `verify_factor` times their probes' horizon
(`verify`); one that fails is ranked last. Results are cached under the output folder by a hash of each
configuration and the search settings, so a re-run or an interrupted search resumes without recomputing.
Configurations run on a local process pool or on Ray.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from hardware.catalog import get_gpu
from hardware.errors import ServesimError, describe_validation_error
from hardware.operators import StepShape
from policies.speculation import SpeculationConfig
from servesim.capacity import (
    Horizon,
    SearchProgress,
    attainment_predicate,
    find_capacity,
    run_sized,
    stable,
    with_duration,
    with_rate,
)
from sim.config import DisaggregationConfig, SimConfig, apply_overrides, parse_config, read_mapping
from sim.engine import simulate
from sim.setup import build_pools
from traces.workload import RATED_KINDS

MAX_REPLICAS = 128  # replicas: auto never proposes more (nor more GPUs than search.max_gpus)


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class GpuChoice(_Spec):
    id: str = Field(description="catalog GPU id or alias")
    price: float | None = Field(None, ge=0.0, description="USD per GPU-hour (default: the catalog's)")


class SearchSpace(_Spec):
    gpus: list[GpuChoice] = Field(min_length=1)
    tp: list[PositiveInt] = [1]
    pp: list[PositiveInt] = [1]
    placements: list[dict[str, Any]] = Field(
        default_factory=lambda: [{}], min_length=1,
        description="hardware fields each configuration also sets, one entry per alternative (MoE: "
                    "{dp: 8, expert_parallel: true}, {eplb: true}, ...); {} keeps the base's")
    replicas: Literal["auto"] | list[PositiveInt] = "auto"
    schedulers: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "vllm"}], min_length=1)
    disaggregation: list[DisaggregationConfig | None] = Field(default_factory=lambda: [None], min_length=1)
    speculation: list[SpeculationConfig | None] = Field(default_factory=lambda: [None], min_length=1)
    max_gpus: PositiveInt | None = Field(None, description="skip configurations with more GPUs than this")


class PlanSpec(_Spec):
    """A `servesim plan` spec."""

    base: dict[str, Any] = Field(default_factory=dict, description="the scenario: any `servesim run` config")
    rates: list[PositiveFloat] = Field(min_length=1, description="target arrival rates (requests/s)")
    attainment: float = Field(0.9, gt=0.0, le=1.0, description="share of requests that must meet every SLO")
    objective: Literal["cheapest", "goodput_per_dollar"] = "cheapest"
    search: SearchSpace
    tolerance: float = Field(0.05, gt=0.0, lt=1.0, description="relative precision of each capacity")
    start_rate: PositiveFloat = Field(1.0, description="first rate probed by the capacity search")
    horizon_s: PositiveFloat = Field(60.0, description="simulated seconds of arrivals per probe, at least (grown "
                                     "until the steady window lasts 3 times the p90 service time)")
    min_requests: PositiveInt = Field(1000, description="requests per probe, at least")
    seeds: PositiveInt = Field(3, description="seeds near each capacity boundary; the capacity is their lowest")
    verify_factor: float = Field(10.0, ge=1.0, description="the best configurations are re-simulated over this "
                                 "many times their probes' horizon, at every target rate")
    verify_top: NonNegativeInt = Field(3, description="configurations that must pass that check (0: none "
                                       "checked), the first ranked first")

    @model_validator(mode="after")
    def _check(self) -> PlanSpec:
        base = self.base_config()
        if base.slo.ttft_s is None and base.slo.tpot_s is None and base.slo.e2e_s is None:
            raise ValueError("base.slo: give at least one of ttft_s, tpot_s, e2e_s")
        for i, gpu in enumerate(self.search.gpus):  # an unknown id is the user's typo, not a pruned configuration
            try:
                get_gpu(gpu.id)
            except ServesimError as exc:
                raise ValueError(f"search.gpus.{i}.id: {exc}") from None
        if base.workloads[0].arrival.kind not in RATED_KINDS:
            raise ValueError(f"base.workloads.0.arrival.kind = {base.workloads[0].arrival.kind!r}: planning needs a "
                             "rate (poisson, gamma, constant); use lengths of kind 'trace' to keep a trace's lengths")
        return self

    def horizon(self) -> Horizon:
        """How long each capacity probe runs."""
        return Horizon(self.horizon_s, self.min_requests)

    def base_config(self) -> SimConfig:
        try:
            return SimConfig.model_validate(self.base)
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc, "base", SimConfig)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> PlanSpec:
    """The spec at `path`, with `key.path=value` overrides; errors are one line naming the field."""
    p = Path(path)
    data = read_mapping(p, "plan", "a plan spec must be a mapping")
    data = apply_overrides(data, overrides or [])
    base = data.get("base")
    workloads = base.get("workloads") if isinstance(base, dict) else None
    for w in workloads if isinstance(workloads, list) else []:  # trace paths are relative to the spec
        trace = w.get("trace") if isinstance(w, dict) else None
        if isinstance(trace, dict) and isinstance(trace.get("path"), str) and not Path(trace["path"]).is_absolute():
            trace["path"] = str(p.parent / trace["path"])
    try:
        return PlanSpec.model_validate(data)
    except ValidationError as exc:
        raise ServesimError(describe_validation_error(exc, str(p), PlanSpec)) from None


# ---- the search space ---------------------------------------------------------------------------------
def candidates(spec: PlanSpec) -> Iterator[tuple[str, SimConfig]]:
    """(label, config) of every configuration in the space, in a fixed order."""
    base = spec.base_config().model_dump(mode="json")
    s = spec.search
    replicas = [1] if s.replicas == "auto" else s.replicas
    for gpu, tp, pp, place, sched, disagg, spec_cfg in itertools.product(
            s.gpus, s.tp, s.pp, s.placements, s.schedulers, s.disaggregation, s.speculation):
        for n in replicas if disagg is None else [1]:
            hw = {**base["hardware"], "gpu": gpu.id, "tp": tp, "pp": pp, "gpu_price": gpu.price, **place}
            data = {**base, "hardware": hw, "scheduler": sched,
                    "cluster": {**base["cluster"], "replicas": n, "router": "least_outstanding"},
                    "disaggregation": None if disagg is None else disagg.model_dump(mode="json"),
                    "speculation": None if spec_cfg is None else spec_cfg.model_dump(mode="json")}
            if s.max_gpus is not None and tp * pp * int(hw.get("dp", 1)) * n > s.max_gpus:
                continue
            params = ",".join(f"{k}={v}" for k, v in sorted(sched.items()) if k != "name")
            label = f"{gpu.id} tp{tp}" + (f" pp{pp}" if pp > 1 else "")
            label += "".join(f" {k}={v}" for k, v in sorted(place.items())) + f" {sched['name']}"
            label += f"({params})" if params else ""
            if disagg is not None:
                label += " disagg"
            elif s.replicas != "auto":
                label += f" x{n}"
            label += " spec" if spec_cfg is not None else ""
            yield label, parse_config(data, f"search ({label})")


def config_hash(config: SimConfig, spec: PlanSpec) -> str:
    """A stable key of everything a configuration's result depends on."""
    key = {"config": config.model_dump(mode="json"), "attainment": spec.attainment, "tolerance": spec.tolerance,
           "start": spec.start_rate, "rates": spec.rates, "auto": spec.search.replicas == "auto",
           "horizon": [spec.horizon_s, spec.min_requests, spec.seeds], "version": 2}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def prune(config: SimConfig) -> str | None:
    """Why a configuration cannot work (does not fit; TPOT target missed even at batch 1), or None."""
    try:
        pools = build_pools(config)
    except ServesimError as exc:
        return f"does not fit: {str(exc)[:160]}"
    tpot = config.slo.tpot_s
    if tpot is not None:
        pool = pools[-1]  # the decode pool when disaggregated
        step = pool.cost_model().price(StepShape.build(decode=[typical_prompt(config)])).seconds
        if step > tpot:
            return f"TPOT {tpot * 1e3:.1f} ms unreachable: one decode step at batch 1 takes {step * 1e3:.1f} ms"
    return None


def typical_prompt(config: SimConfig) -> int:
    """A representative prompt length of the first workload (its mean where the distribution gives one)."""
    w = config.workloads[0].lengths
    if hasattr(w, "prompt_mean"):
        return max(1, int(w.prompt_mean))
    prompt = getattr(w, "prompt", None)
    if isinstance(prompt, int):
        return prompt
    if isinstance(prompt, (list, tuple)):
        return max(1, int(sum(prompt) / len(prompt)))
    return 1000  # trace lengths: the order of the public traces' means


# ---- sizing one configuration ---------------------------------------------------------------------------
def size(label: str, config: SimConfig, spec: PlanSpec) -> dict[str, Any]:
    """Capacity and cost of one configuration (a pure function: same inputs, same row)."""
    why = prune(config)
    row: dict[str, Any] = {"label": label, "gpu": config.hardware.gpu, "tp": config.hardware.tp,
                           "pp": config.hardware.pp, "dp": config.hardware.dp,
                           "expert_parallel": config.hardware.expert_parallel, "scheduler": config.scheduler.name,
                           "disaggregated": config.disaggregation is not None,
                           "speculation": config.speculation is not None, "replicas": config.cluster.replicas,
                           "pruned": why or ""}
    if why:
        return row
    meets = attainment_predicate(spec.attainment)
    horizon = spec.horizon()
    cap = find_capacity(config, meets, start=spec.start_rate, rel_tol=spec.tolerance, horizon=horizon,
                        seeds=spec.seeds)
    s = cap.summary or simulate(with_rate(config, spec.start_rate)).summary
    low, median, high = cap.range
    row.update({"capacity_req_s": cap.rate, "capacity_median_req_s": median, "capacity_max_req_s": high,
                "gpus": s["gpus"], "cost_per_hour": s["cost_per_hour"],
                "cost_per_million_output_tokens": s["cost_per_million_output_tokens"] if cap.rate else None,
                "goodput_per_dollar": cap.rate / s["cost_per_hour"] if s["cost_per_hour"] else None,
                "ttft_p90_s": s.get("steady_ttft_p90_s"), "tpot_p90_s": s.get("steady_tpot_p90_s"),
                "probes": len(cap.probes), "probe_horizon_s": cap.duration_s})
    if spec.search.replicas == "auto" and config.disaggregation is None:
        for rate in spec.rates:  # the replicas each target needs, checked by simulating them at that rate
            n = max(1, math.ceil(rate / cap.rate)) if cap.rate > 0 else None
            limit = MAX_REPLICAS if spec.search.max_gpus is None else spec.search.max_gpus // row["gpus"]
            if n is not None and n > limit:  # cannot carry this rate within the limits
                n = None
            ok = False
            if n is not None:
                check = lambda k: run_sized(with_rate(replicas(config, k), rate), cap.duration_s,  # noqa: E731
                                            horizon, _summary)[0]
                summary = check(n)
                if not (stable(summary) and meets(summary)) and n * cap.rate < 1.25 * rate:  # one more
                    n += 1
                    summary = check(n)
                ok = stable(summary) and meets(summary)
            row[f"replicas_at_{rate:g}"] = n
            row[f"cost_per_hour_at_{rate:g}"] = n * row["cost_per_hour"] if n is not None and ok else None
    return row


def _summary(config: SimConfig) -> dict[str, Any]:
    """A run's summary (through this module's `simulate`, which tests replace)."""
    return simulate(config).summary


def replicas(config: SimConfig, n: int) -> SimConfig:
    return config.model_copy(update={"cluster": config.cluster.model_copy(update={"replicas": n})})


def _size_job(job: tuple[str, str, str, PlanSpec]) -> tuple[str, dict[str, Any]]:
    key, label, config_json, spec = job
    return key, size(label, SimConfig.model_validate_json(config_json), spec)


# ---- the whole search -----------------------------------------------------------------------------------
def _runner(workers: int, ray: bool, ray_address: str | None
            ) -> Callable[[list[Any]], Iterator[tuple[str, dict[str, Any]]]]:
    """A map over jobs in completion order: Ray tasks, a local process pool, or in-process when workers = 1."""
    if ray or ray_address:
        try:
            import ray as ray_lib
        except ImportError:
            raise ServesimError("plan --ray needs Ray (pip install 'servesim[ray]')") from None

        def run_ray(jobs: list[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
            if not ray_lib.is_initialized():
                if ray_address:
                    ray_lib.init(address=ray_address, include_dashboard=False, log_to_driver=False)
                else:
                    ray_lib.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            remote = ray_lib.remote(_size_job)
            pending = [remote.remote(j) for j in jobs]
            while pending:
                ready, pending = ray_lib.wait(pending, num_returns=1)
                yield ray_lib.get(ready[0])
        return run_ray

    def run_pool(jobs: list[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        if workers <= 1:
            yield from map(_size_job, jobs)
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(_size_job, jobs)
    return run_pool


def plan(spec: PlanSpec, out: str | Path, workers: int | None = None, ray: bool = False,
         ray_address: str | None = None, progress: bool = False) -> pd.DataFrame:
    """Size every configuration (cached under out/cache), write the table, the best config and plots."""
    out_dir = Path(out)
    cache = out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    todo, rows = [], {}
    cands = list(candidates(spec))
    keys = [config_hash(cfg, spec) for _, cfg in cands]
    for (label, cfg), key in zip(cands, keys):
        hit = cache / f"{key}.json"
        if hit.is_file():
            rows[key] = json.loads(hit.read_text())
        else:
            todo.append((key, label, cfg))
    bar = SearchProgress("plan", len(todo), progress)
    run = _runner(workers or os.cpu_count() or 1, ray, ray_address)
    best, best_rate = "", 0.0
    for key, row in run([(key, label, cfg.model_dump_json(), spec) for key, label, cfg in todo]):
        (cache / f"{key}.json").write_text(json.dumps(row))  # keys in their order: the same table either way
        rows[key] = row
        if (row.get("capacity_req_s") or 0.0) > best_rate:
            best, best_rate = f"{row['label']} {row['capacity_req_s']:.2f} req/s", row["capacity_req_s"]
        bar.update(best)
    table = pd.DataFrame([rows[key] for key in keys])
    computed = {key for key, _, _ in todo}
    table["cached"] = [key not in computed for key in keys]
    table = rank(verify(rank(table, spec), spec, dict(cands), cache), spec)
    write_outputs(table, spec, dict(cands), out_dir)
    return table


def verify(table: pd.DataFrame, spec: PlanSpec, configs: dict[str, SimConfig], cache: Path) -> pd.DataFrame:
    """Re-simulate configurations in rank order, at every target rate with the replicas found for it (the
    capacity itself for goodput per dollar) over `verify_factor` times their probes' horizon, until
    `verify_top` of them pass: `verified` is 'yes' (stable and meeting the SLOs at every rate), 'no', or ''
    (not checked). Results are cached like the sizing."""
    t = table.copy()
    t["verified"], t["verified_horizon_s"], t["verified_attainment"] = "", float("nan"), float("nan")
    if "capacity_req_s" not in t:
        return t
    meets, horizon = attainment_predicate(spec.attainment), spec.horizon()
    passed = checked = 0
    for i in t.index:
        if passed >= spec.verify_top or checked >= 3 * spec.verify_top:  # bounded when most fail
            break
        targets = deployments(t.loc[i], spec, configs[t.loc[i, "label"]])
        if not targets:
            continue
        duration = spec.verify_factor * float(t.loc[i, "probe_horizon_s"])
        ok, worst = True, 1.0
        ran = duration
        for cfg, rate in targets:
            key = hashlib.sha256(json.dumps({"verify": cfg.model_dump(mode="json"), "duration": duration,
                                             "horizon": [spec.horizon_s, spec.min_requests],
                                             "attainment": spec.attainment}, sort_keys=True).encode()).hexdigest()[:20]
            hit = cache / f"verify-{key}.json"
            if hit.is_file():
                s = json.loads(hit.read_text())
            else:
                try:
                    full, used = run_sized(cfg, duration, horizon, _summary)
                except ServesimError as exc:  # e.g. more tokens than a run records: this check cannot pass
                    full, used = {"stability": f"not run: {exc}"}, duration
                s = {k: full.get(k) for k in ("stability", "steady_slo_attainment", "slo_attainment",
                                              "requests_total")} | {"duration_s": used}
                hit.write_text(json.dumps(s))
            ok &= stable(s) and meets(s)
            worst = min(worst, s.get("steady_slo_attainment") or 0.0)
            ran = max(ran, s["duration_s"])
        t.loc[i, ["verified", "verified_horizon_s", "verified_attainment"]] = ["yes" if ok else "no", ran, worst]
        passed, checked = passed + ok, checked + 1
    return t


def rank(table: pd.DataFrame, spec: PlanSpec) -> pd.DataFrame:
    """Best first: the cheapest that carries the first target rate, or the most goodput per dollar."""
    t = table.copy()
    if "cost_per_hour" not in t:  # everything was pruned
        return t
    if spec.objective == "goodput_per_dollar":
        key = t.get("goodput_per_dollar", pd.Series(dtype=float)).fillna(-1.0)
        t["_key"] = -key
    else:
        rate = spec.rates[0]
        col = f"cost_per_hour_at_{rate:g}"
        if col in t:
            cost = t[col]
        else:
            cost = t["cost_per_hour"].where(t.get("capacity_req_s", 0) >= rate)
        t["_key"] = cost.fillna(float("inf"))
    t["_failed"] = t["verified"].eq("no") if "verified" in t else False  # failed the long re-simulation: last
    t = t.sort_values(["_failed", "_key", "label"], kind="stable").drop(columns=["_key", "_failed"])
    return t.reset_index(drop=True)


def deployments(row: pd.Series, spec: PlanSpec, config: SimConfig) -> list[tuple[SimConfig, float]]:
    """The configuration of a table row ready to run at each target rate it carries (with the replicas
    found for that rate), or at its capacity for the goodput-per-dollar objective; [] when it carries none."""
    capacity = row.get("capacity_req_s")
    if capacity is None or pd.isna(capacity) or capacity <= 0:
        return []
    if spec.objective == "goodput_per_dollar":
        return [(with_rate(config, float(capacity)), float(capacity))]
    out = []
    for rate in spec.rates:
        n = row.get(f"replicas_at_{rate:g}")
        if config.disaggregation is None and spec.search.replicas == "auto":
            if n is None or pd.isna(n) or pd.isna(row.get(f"cost_per_hour_at_{rate:g}")):
                continue
            out.append((with_rate(replicas(config, int(n)), rate), rate))
        elif capacity >= rate:
            out.append((with_rate(config, rate), rate))
    return out


def best_config(table: pd.DataFrame, spec: PlanSpec, configs: dict[str, SimConfig]
                ) -> tuple[SimConfig, float] | None:
    """The winning configuration, with its replicas for the first target rate, ready to run at that rate."""
    targets = deployments(table.iloc[0], spec, configs[table.iloc[0]["label"]])
    return targets[0] if targets else None


def write_outputs(table: pd.DataFrame, spec: PlanSpec, configs: dict[str, SimConfig], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table.to_csv(out / "plan.csv", index=False)
    table.to_parquet(out / "plan.parquet", index=False)
    best = best_config(table, spec, configs)
    if best is not None:
        cfg, rate = best
        top = table.iloc[0]
        if top.get("verified") == "yes":  # the run the check made: `servesim run best.yaml` repeats it
            cfg = with_duration(cfg, float(top["verified_horizon_s"]), spec.horizon())
            check = (f"# verified: stable and at least {spec.attainment:.0%} of requests within the SLOs at every "
                     f"target rate over {top['verified_horizon_s']:g} s of arrivals (lowest attainment "
                     f"{top['verified_attainment']:.1%}); probes ran {top['probe_horizon_s']:g} s\n")
        else:
            check = f"# NOT verified over a longer horizon (verified: {top.get('verified') or 'not checked'})\n"
        text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        (out / "best.yaml").write_text(f"# servesim plan: best configuration ({top['label']}) at {rate:g} req/s; "
                                       "run it with `servesim run best.yaml`\n" + check + text)
    sized = table[table["pruned"] == ""] if "capacity_req_s" in table else table.iloc[0:0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(sized):
        ax.scatter(sized["cost_per_hour"], sized["capacity_req_s"], s=14, alpha=0.6, label="configurations")
        if "capacity_max_req_s" in sized:  # the range over seeds: the capacity is its lowest
            spread = (sized["capacity_max_req_s"] - sized["capacity_req_s"]).clip(lower=0)
            ax.errorbar(sized["cost_per_hour"], sized["capacity_req_s"], yerr=[spread * 0, spread], fmt="none",
                        ecolor="C0", alpha=0.4, label="range over seeds")
        front = sized.sort_values(["cost_per_hour", "capacity_req_s"], ascending=[True, False])
        front = front[front["capacity_req_s"] >= front["capacity_req_s"].cummax()]
        ax.step(front["cost_per_hour"], front["capacity_req_s"], where="post", color="C3", label="Pareto front")
        for row in front.drop_duplicates("capacity_req_s").itertuples():  # name the front's configurations
            ax.annotate(row.label, (row.cost_per_hour, row.capacity_req_s), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
    ax.set_xlabel("cost (USD per hour)")
    ax.set_ylabel("capacity (req/s meeting the SLOs)")
    ax.grid(alpha=0.3)
    if len(sized):
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in sized["label"].head(3) if len(sized) else []:
        cap = float(sized.set_index("label").loc[label, "capacity_req_s"])
        rates = [cap * f for f in (0.25, 0.5, 0.75, 1.0)] if cap else []
        sums = [simulate(with_rate(configs[label], r)).summary for r in rates]
        axes[0].plot(rates, [s["ttft_p90_s"] for s in sums], marker="o", label=label)
        axes[1].plot(rates, [s["tpot_p90_s"] for s in sums], marker="o", label=label)
    for ax, name in zip(axes, ("TTFT p90 (s)", "TPOT p90 (s)")):
        ax.set_xlabel("arrival rate per configuration (req/s)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if len(sized):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
