"""The one config of a simulation run: pydantic, loadable from YAML, with `--set key.path=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

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

from hardware.errors import ServesimError, describe_validation_error
from hardware.files import read_yaml
from hardware.routing import RoutingModel
from hardware.specs import DType, Elementwise, KvAccess, KvDType
from policies import PAGED_SCHEDULERS, SchedulerConfig
from policies.priority import PriorityMode
from policies.speculation import SpeculationConfig
from policies.vllm import VllmParams
from traces.workload import LognormalLengths, PoissonArrival, SloTargets, Workload

DEFAULT_SCHEDULER = VllmParams().name


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class HardwareConfig(_Section):
    gpu: str = Field("h100", description="catalog GPU id or alias, or a GPU YAML file")
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    link: str | None = Field(None, description="interconnect for TP (default: the GPU's intra-node link)")
    pp_link: str | None = None
    weight_dtype: DType = "bf16"
    kv_dtype: KvDType = Field("bf16", description="KV cache dtype: fp32, bf16, fp16, fp8, or int8 / int4 / int2 "
                              "quantized in groups of 64 values with an fp16 scale and zero point each (KIVI-style)")
    kv_token_budget: PositiveInt | None = Field(
        None, description="keep at most this many tokens of KV per request (StreamingLLM / H2O-style eviction): "
        "memory and attention reads are capped, model quality is not modelled")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    gpu_price: float | None = Field(None, ge=0.0, description="override the catalog's USD per GPU-hour")
    profile: str | None = Field(None, description="efficiency profile: a JSON file, the GPU id of a committed "
                                "profile, or 'calibrated' for the GPU's committed one (default: datasheet defaults)")
    engine: str | None = Field(None, description="the serving engine's host costs, named as `profile` is: take "
                               "that profile's engine section (e.g. 'datasheet': the documented defaults) over "
                               "this profile's GPU kernels (default: the profile's own)")
    cuda_graphs: bool | Literal["mixed", "decode", "none"] = Field(
        "mixed", description="CUDA graphs: 'mixed' (true) every step of at most 512 tokens (piecewise where it has "
        "prefill chunks or verifications), padded to vLLM's capture sizes (vLLM V1's default); 'decode' "
        "decode-only steps alone (vLLM V0); 'none' (false) every step eagerly")
    kv_access: KvAccess = Field("paged", description="how attention reads the paged KV cache: 'paged' (the kernel "
                                "reads the blocks in place, as vLLM's FlashAttention and servesim's backend do) or "
                                "'gather' (an engine that copies a step's K/V into contiguous buffers first)")
    elementwise: Elementwise = Field("fused", description="'fused': one kernel each for residual add + RMSNorm, "
                                     "RoPE with the K/V cache write, and SiLU-mul (vLLM's custom ops, servesim's "
                                     "backend); 'unfused': PyTorch's separate ops")
    dp: PositiveInt = Field(1, description="MoE models: data-parallel attention ranks of tp GPUs each (a replica "
                            "is tp x pp x dp GPUs; MoE layers span tp x dp)")
    expert_parallel: bool = Field(False, description="MoE: whole experts spread over the tp x dp GPUs (EP), "
                                  "instead of every expert sharded over them")
    ep_link: str | None = Field(None, description="link of the MoE all-to-all (default: the TP link within a node "
                                "of 8 GPUs, ib-ndr beyond)")
    eplb: bool = Field(False, description="expert-parallel load balancing: experts placed to even the GPUs' loads")
    redundant_experts: NonNegativeInt = Field(0, description="EPLB: extra replicas of the most loaded experts")
    routing: RoutingModel = Field(RoutingModel(), description="how tokens choose experts: uniform, zipf "
                                  "(zipf_s) or counts per expert")
    mla_attention: Literal["auto", "absorbed", "naive"] = Field(
        "auto", description="MLA models: 'auto' runs prefill naive and decode absorbed (vLLM, SGLang); "
        "'absorbed' or 'naive' everywhere")


class ClusterConfig(_Section):
    replicas: PositiveInt = Field(1, le=4096)
    router: Literal["round_robin", "least_outstanding", "least_kv", "power_of_two", "prefix_affinity"] = \
        "round_robin"
    affinity_slack: NonNegativeInt = Field(
        8, description="prefix_affinity: a replica is eligible while its outstanding requests exceed the least "
                       "loaded replica's by at most this many")


class KvCacheConfig(_Section):
    block_size: PositiveInt = Field(16, description="tokens per KV block")
    prefix_caching: bool = Field(False, description="reuse cached KV blocks of shared prompt prefixes")
    num_blocks: PositiveInt | None = Field(
        None, description="override the KV blocks per replica (default: from the memory plan), like vLLM's "
                          "num_gpu_blocks_override")
    preemption: Literal["recompute", "swap"] = Field(
        "recompute", description="a preempted request's KV is dropped and recomputed, or swapped out to host "
                                 "memory and back over the GPU's host link (vLLM V0's preemption_mode)")
    swap_space_gb: float = Field(4.0, ge=0.0, le=1e5, description="host memory for swapped KV per GPU (vLLM's "
                                 "swap_space, GB); a preemption that does not fit recomputes")
    host_cache_gb: float = Field(0.0, ge=0.0, le=1e5, description="prefix caching: host memory per GPU that keeps "
                                 "blocks evicted from the GPU (LMCache-style CPU offload, GB; 0: none); a hit "
                                 "there loads the blocks back over the host link")


class SloConfig(SloTargets):
    """Per-request latency targets; a request meets the SLOs when it finishes within every one given (a
    workload's own `slo` replaces them for its requests)."""


class PriorityConfig(_Section):
    """Request classes (`policies.priority`): each workload's `priority` (lower is more urgent) orders admission
    and preemption under `strict`, shares admission by weight under `weighted_fair`; `fcfs` ignores it."""

    mode: PriorityMode = "fcfs"
    weights: dict[int, PositiveFloat] = Field(default_factory=dict, description="weighted_fair: weight per "
                                              "priority value (default 1 each)")


class MetricsConfig(_Section):
    """Which percentiles the summary reports (`<metric>_p<P>_s`, e.g. `ttft_p99.9_s`): 50, 90 and 99 always
    (capacity searches and SLO checks read them), and any others listed."""

    percentiles: list[float] = Field([50.0, 90.0, 99.0], max_length=12, description="each strictly between 0 "
                                     "and 100; 50, 90 and 99 are reported in any case")

    @model_validator(mode="after")
    def _check(self) -> MetricsConfig:
        bad = [p for p in self.percentiles if not 0 < p < 100]
        if bad:
            raise ValueError(f"metrics.percentiles = {self.percentiles}: {bad[0]} is not strictly between 0 and 100")
        return self

    def reported(self) -> list[float]:
        return sorted({50.0, 90.0, 99.0} | {float(p) for p in self.percentiles})


class PoolConfig(_Section):
    """One pool of a disaggregated cluster: identical instances (replicas), each `hardware.tp x pp` GPUs."""

    instances: PositiveInt = Field(1, le=4096)
    hardware: HardwareConfig | None = Field(None, description="GPU, TP/PP, price, profile of each instance "
                                            "(default: the top-level hardware section)")
    scheduler: SchedulerConfig | None = Field(None, description="policy of each instance (default: the top-level "
                                              "scheduler)")
    num_blocks: PositiveInt | None = Field(None, description="override the KV blocks per instance (default: from "
                                           "the memory plan)")


class DisaggregationConfig(_Section):
    """Prefill/decode disaggregation (DistServe, OSDI 2024; Splitwise, ISCA 2024): prompts run on the prefill
    pool, then each request's KV cache moves over `link` to a decode instance that generates the rest."""

    prefill: PoolConfig = PoolConfig()
    decode: PoolConfig = PoolConfig()
    mixed: PoolConfig | None = Field(None, description="Splitwise's mixed pool: instances that take new prompts "
                                     "(served whole) when the least loaded prefill instance has a queue, and "
                                     "decodes when no decode instance has room")
    link: str = Field("ib-ndr", description="interconnect of each GPU's KV-transfer port (catalog link id): "
                      "nvlink4 inside a node, ib-ndr / eth-100g / eth-25g across nodes")
    transfer: Literal["after_prefill", "layerwise"] = Field(
        "after_prefill", description="after_prefill: the KV moves once the prompt is done; layerwise: each "
                                     "chunk's KV streams while its step runs (at most as fast as it is produced)")


def _default_workloads() -> list[Workload]:
    # Azure LLM conversation trace 2023 statistics: prompt mean 1155 (cv 0.96), output mean 211 (cv 0.77).
    return [Workload(
        name="azure-conv-like",
        arrival=PoissonArrival(rate=15.0),
        lengths=LognormalLengths(prompt_mean=1155, prompt_cv=0.96, output_mean=211, output_cv=0.77,
                                 max_prompt=7000, max_output=1000),
        num_requests=3000,
    )]


class SimConfig(_Section):
    """Everything a run depends on; the default is the embedded scenario of `servesim run`."""

    seed: NonNegativeInt = 0
    model: str = Field("llama-3-8b", description="catalog model id or a Hugging Face config.json")
    max_model_len: PositiveInt | None = Field(None, description="longest request (default: the model's maximum)")
    hardware: HardwareConfig = HardwareConfig()
    cluster: ClusterConfig = ClusterConfig()
    scheduler: SchedulerConfig = VllmParams()
    kv_cache: KvCacheConfig = KvCacheConfig()
    workloads: list[Workload] = Field(default_factory=_default_workloads, min_length=1)
    slo: SloConfig = SloConfig(ttft_s=2.0, tpot_s=0.1)
    priority: PriorityConfig = PriorityConfig()
    disaggregation: DisaggregationConfig | None = Field(
        None, description="split prefill and decode over two pools (default: colocated replicas)")
    speculation: SpeculationConfig | None = Field(None, description="speculative decoding on top of the policy")
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _check(self) -> SimConfig:
        if self.kv_cache.prefix_caching and self.scheduler.name not in PAGED_SCHEDULERS:
            raise ValueError(f"kv_cache.prefix_caching needs a paged scheduler ({', '.join(PAGED_SCHEDULERS)}), "
                             f"not {self.scheduler.name!r}")
        if self.kv_cache.host_cache_gb and not self.kv_cache.prefix_caching:
            raise ValueError(f"kv_cache.host_cache_gb = {self.kv_cache.host_cache_gb}: the host tier holds "
                             "prefix-cache blocks; set kv_cache.prefix_caching: true")
        if self.kv_cache.preemption == "swap" and (self.kv_cache.prefix_caching or self.disaggregation
                                                   or self.scheduler.name not in PAGED_SCHEDULERS):
            raise ValueError("kv_cache.preemption = 'swap' is simulated for colocated replicas of a paged scheduler "
                             f"({', '.join(PAGED_SCHEDULERS)}) without prefix caching")
        if self.hardware.kv_token_budget is not None and (self.kv_cache.prefix_caching or self.disaggregation
                                                          or self.speculation
                                                          or any(w.fan_out for w in self.workloads)):
            raise ValueError(f"hardware.kv_token_budget = {self.hardware.kv_token_budget}: KV eviction is simulated "
                             "for colocated replicas without prefix caching, speculation or fan-out; remove one of "
                             "them")
        if self.speculation is not None and self.scheduler.name not in PAGED_SCHEDULERS:
            raise ValueError(f"speculation needs a paged continuous-batching scheduler "
                             f"({', '.join(PAGED_SCHEDULERS)}), not {self.scheduler.name!r}")
        if self.speculation is not None and self.disaggregation is not None:
            raise ValueError("speculation with disaggregation is not modelled (the draft's KV would have to move "
                             "too); remove one of the two sections")
        fanned = [i for i, w in enumerate(self.workloads) if w.fan_out is not None]
        if fanned and (self.disaggregation is not None or self.scheduler.name not in PAGED_SCHEDULERS):
            raise ValueError(f"workloads.{fanned[0]}.fan_out is simulated for colocated replicas of a paged "
                             f"scheduler ({', '.join(PAGED_SCHEDULERS)}), not {self.scheduler.name!r}"
                             + (" with disaggregation" if self.disaggregation is not None else ""))
        for name, pool in self.pools():
            if name != "colocated" and pool.scheduler.name not in PAGED_SCHEDULERS:
                raise ValueError(f"disaggregation.{name}.scheduler.name = {pool.scheduler.name!r}: a disaggregated "
                                 f"pool needs a continuous-batching policy ({', '.join(PAGED_SCHEDULERS)})")
        return self

    def pools(self) -> list[tuple[str, ResolvedPool]]:
        """(name, pool) of every pool, defaults filled in: one "colocated" pool, or prefill, decode (and mixed)."""
        top = ResolvedPool(self.cluster.replicas, self.hardware, self.scheduler, self.kv_cache.num_blocks)
        d = self.disaggregation
        if d is None:
            return [("colocated", top)]
        named = [("prefill", d.prefill), ("decode", d.decode)] + ([("mixed", d.mixed)] if d.mixed else [])
        return [(name, ResolvedPool(p.instances, p.hardware or self.hardware, p.scheduler or self.scheduler,
                                    p.num_blocks or self.kv_cache.num_blocks)) for name, p in named]


class ResolvedPool(NamedTuple):
    """A pool with the top-level defaults applied."""

    instances: int
    hardware: HardwareConfig
    scheduler: SchedulerConfig
    num_blocks: int | None


def _set(tree: Any, path: list[str], value: Any, full: str) -> None:
    key, rest = path[0], path[1:]
    if isinstance(tree, list):
        if not key.isdigit() or int(key) >= len(tree):
            raise ServesimError(f"--set {full}: {key!r} is not an index of a list of {len(tree)}")
        idx: Any = int(key)
    elif isinstance(tree, dict):
        idx = key
    else:
        raise ServesimError(f"--set {full}: cannot descend into {key!r} of a {type(tree).__name__}")
    if rest:
        if isinstance(tree, dict) and tree.get(idx) is None:
            tree[idx] = {}
        _set(tree[idx], rest, value, full)
    else:
        tree[idx] = value


def _node(tree: Any, path: list[str]) -> Any:
    """The part of a config dict at `path` (list items by index), or None where it does not exist."""
    for key in path:
        if isinstance(tree, list) and key.isdigit() and int(key) < len(tree):
            tree = tree[int(key)]
        elif isinstance(tree, dict):
            tree = tree.get(key)
        else:
            return None
    return tree


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML, list items by index) to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ServesimError(f"--set {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        path = key.split(".")
        if not all(path):
            raise ServesimError(f"--set {item!r}: {key!r} has an empty part; expected key.path=value "
                                "(e.g. workloads.0.arrival.rate=10)")
        if path[-2:] == ["scheduler", "name"] or path[-1] == "kind":  # a discriminator: another policy or kind
            section = _node(data, path[:-1])
            default = DEFAULT_SCHEDULER if path[-1] == "name" else None
            if isinstance(section, dict) and section.get(path[-1], default) != value:
                section.clear()  # the old one's fields do not apply
        _set(data, path, value, item)
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative file paths in a config file (traces, profile) are relative to the file's folder."""
    def fix(holder: Any, key: str) -> None:
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and not Path(holder[key]).is_absolute():
            holder[key] = str(base / holder[key])

    hardware = [data.get("hardware")]
    disagg = data.get("disaggregation")
    if isinstance(disagg, dict):
        hardware += [pool.get("hardware") for pool in disagg.values() if isinstance(pool, dict)]
    for hw in hardware:
        if isinstance(hw, dict) and str(hw.get("profile", "")).endswith(".json"):  # not a GPU id or "datasheet"
            fix(hw, "profile")
    workloads = data.get("workloads")
    for w in workloads if isinstance(workloads, list) else []:  # other shapes: the schema refuses them
        if isinstance(w, dict):
            fix(w.get("trace"), "path")
    spec = data.get("speculation")
    if isinstance(spec, dict):
        fix(spec.get("acceptance"), "path")


def read_mapping(path: str | Path, what: str, shape: str) -> dict[str, Any]:
    """The YAML mapping in a user's file (`what`: its kind, `shape`: the sentence a non-mapping gets); a
    missing file, bad YAML or a non-mapping is one line."""
    p = Path(path)
    data = read_yaml(p, what) or {}
    if not isinstance(data, dict):
        raise ServesimError(f"{p}: {shape}, got {type(data).__name__}")
    return data


def parse_config(data: dict[str, Any], source: str) -> SimConfig:
    """`data` as a validated config; an invalid field is one line naming it, prefixed by `source`."""
    try:
        return SimConfig.model_validate(data)
    except ValidationError as exc:
        raise ServesimError(describe_validation_error(exc, source, SimConfig)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SimConfig:
    """The config at `path` (default: the embedded scenario) with overrides, validated; errors are one line."""
    if path is None:
        data: dict[str, Any] = SimConfig().model_dump(mode="json", exclude_unset=False)
        source = "default scenario"
    else:
        data = read_mapping(path, "config", "the config must be a mapping of sections")
        source = str(path)
    data = apply_overrides(data, overrides or [])
    if path is not None:
        _resolve_paths(data, Path(path).parent)
    if isinstance(data.get("scheduler"), dict):
        data["scheduler"].setdefault("name", DEFAULT_SCHEDULER)  # when a section omits its name
    top_name = data["scheduler"].get("name") if isinstance(data.get("scheduler"), dict) else DEFAULT_SCHEDULER
    for pool in (data.get("disaggregation") or {}).values() if isinstance(data.get("disaggregation"), dict) else ():
        if isinstance(pool, dict) and isinstance(pool.get("scheduler"), dict):
            pool["scheduler"].setdefault("name", top_name)  # a pool's policy defaults to the top-level one
    return parse_config(data, source)

