"""What a run needs before its clock starts, without SimPy: each pool's deployment (checked to fit), KV
blocks, policy parameters and executor, and the requests of every workload; and, after the run, its results
(`Setup.results`). Either clock (`sim.engine.drive`) runs a `Setup`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hardware.catalog import get_gpu, get_model
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.profiles import resolve_profile
from policies.acceptance import Acceptance
from policies.base import SchedulerParams
from policies.kv_cache import BlockManager
from policies.speculation import SpeculationConfig
from policies.state import ReplicaState, Requests, Status
from sim.config import HardwareConfig, SimConfig
from sim.executor import CostModelExecutor
from sim.metrics import PoolInfo, Results, build_results
from sim.speculation import DraftCost, draft_deployment, draft_memory
from traces.workload import GeneratedRequests, generate

MAX_RECORDED_TOKENS = 500_000_000  # output tokens of a run (8 bytes of emission time each)

def build_deployment(config: SimConfig, hardware: HardwareConfig | None = None,
                     scheduler: SchedulerParams | None = None) -> Deployment:
    """A replica's deployment (default: the top-level hardware and scheduler); the scheduler's step limits
    size its activation memory."""
    hw = hardware or config.hardware
    model = get_model(config.model)
    gpu = get_gpu(hw.gpu)
    if hw.gpu_price is not None:
        gpu = gpu.with_price(hw.gpu_price)
    tokens, seqs = (scheduler or config.scheduler).step_limits(config.max_model_len or model.max_position_embeddings)
    return Deployment.build(model, gpu, tp=hw.tp, pp=hw.pp, link=hw.link, pp_link=hw.pp_link,
                            weight_dtype=hw.weight_dtype, kv_dtype=hw.kv_dtype, kv_token_budget=hw.kv_token_budget,
                            kv_access=hw.kv_access,
                            elementwise=hw.elementwise, dp=hw.dp, expert_parallel=hw.expert_parallel,
                            ep_link=hw.ep_link, eplb=hw.eplb, redundant_experts=hw.redundant_experts,
                            routing=hw.routing, mla_attention=hw.mla_attention,
                            gpu_memory_utilization=hw.gpu_memory_utilization, max_model_len=config.max_model_len,
                            max_num_batched_tokens=tokens, max_num_seqs=seqs)


def cost_model(config: SimConfig, profile: str | None = None) -> CostModel:
    """The cost model of a config's deployment, with `profile` (default: the config's) applied."""
    dep = build_deployment(config)
    return CostModel(dep, profile=resolve_profile(profile or config.hardware.profile, dep.gpu.id,
                                                  config.hardware.engine),
                     cuda_graphs=config.hardware.cuda_graphs)


@dataclass
class Pool(PoolInfo):
    """A pool's replicas share a deployment, a policy and a KV size; `first` is its first replica's index."""

    hardware: HardwareConfig
    scheduler: SchedulerParams
    first: int

    def cost_model(self, deployment: Deployment | None = None) -> CostModel:
        """The cost model of this pool's deployment (or of a draft on its GPUs), with the pool's profile."""
        return CostModel(deployment or self.deployment,
                         profile=resolve_profile(self.hardware.profile, self.deployment.gpu.id,
                                                 self.hardware.engine),
                         cuda_graphs=self.hardware.cuda_graphs)

    def executor(self, speculation: SpeculationConfig | None, acceptance: Acceptance | None = None
                 ) -> CostModelExecutor:
        """The cost-model executor of this pool's replicas, pricing the draft when speculating and drawing
        its verifications' outcomes from `acceptance`."""
        draft = None
        if speculation is not None:
            dep = draft_deployment(self.deployment, speculation)
            draft = DraftCost(self.deployment, speculation, self.cost_model(dep) if dep is not None else None)
        return CostModelExecutor(self.cost_model(), draft, acceptance)


def build_pools(config: SimConfig) -> list[Pool]:
    """Every pool's deployment (checked to fit) and KV blocks per replica; replicas are numbered across pools."""
    pools: list[Pool] = []
    first = 0
    for name, p in config.pools():
        where = "" if name == "colocated" else f"disaggregation.{name}: "
        try:
            dep = build_deployment(config, p.hardware, p.scheduler)
            plan = dep.check_fits()
        except ServesimError as exc:
            if not where:
                raise
            raise ServesimError(f"{where}{exc}") from None
        block_size = config.kv_cache.block_size
        capacity = plan.kv_capacity_tokens
        if config.speculation is not None:  # the draft's weights and KV share the cache
            weights, per_token = draft_memory(dep, config.speculation)
            capacity = max(0, int((plan.kv_cache - weights) // (plan.kv_bytes_per_token + per_token)))
        num_blocks = p.num_blocks or capacity // block_size
        if num_blocks * block_size < dep.kv_tokens_limit:  # as vLLM: one request of max_model_len must fit
            field_name = "kv_cache.num_blocks" if name == "colocated" else f"disaggregation.{name}.num_blocks"
            raise ServesimError(f"{where}{field_name} = {num_blocks}: {num_blocks * block_size} tokens of KV cannot "
                                f"hold one request of max_model_len = {dep.context_limit} tokens; raise num_blocks "
                                "or lower max_model_len")
        pools.append(Pool(name, p.instances, dep, num_blocks, p.hardware, p.scheduler, first))
        first += p.instances
    return pools


def make_requests(config: SimConfig) -> tuple[Requests, list[str], int]:
    """All workloads' requests merged in arrival order; returns the table, workload names, skipped rows.
    With prefix caching on, each request also gets the keys of its shareable KV blocks."""
    seeds = np.random.SeedSequence(config.seed).spawn(len(config.workloads))
    parts = [generate(w, np.random.default_rng(s)) for w, s in zip(config.workloads, seeds)]
    arrival = np.concatenate([p.arrival for p in parts])
    workload = np.concatenate([np.full(p.arrival.size, i, dtype=np.int64) for i, p in enumerate(parts)])
    order = np.lexsort((workload, arrival))  # by time, then workload index: deterministic ties
    prompt = np.concatenate([p.prompt for p in parts])[order]
    output = np.concatenate([p.output for p in parts])[order]
    if (total := int(output.sum())) > MAX_RECORDED_TOKENS:
        raise ServesimError(f"workloads: {output.size} requests ask for {total:.3g} output tokens in all; a run "
                            f"records every token's time, at most {MAX_RECORDED_TOKENS:.0e} (4 GB): fewer requests "
                            "or shorter outputs")
    requests = Requests(arrival[order], prompt, output, workload[order])
    requests.priority = np.array([w.priority for w in config.workloads], dtype=np.int64)[requests.workload]
    if any(p.next_turn is not None for p in parts):  # sessions: each turn's next turn, in the new ids
        requests.next_turn = _merged_ids(parts, order, "next_turn")
        sessions = np.concatenate([np.full(p.arrival.size, -1) if p.session is None else p.session + (w << 32)
                                   for w, p in enumerate(parts)])
        requests.session = sessions[order]
    if any(p.group is not None for p in parts):
        _fan_out(requests, _merged_ids(parts, order, "group"), config)
    if config.kv_cache.prefix_caching:
        keys = [k for i, p in enumerate(parts) for k in p.block_keys(config.kv_cache.block_size, i)]
        requests.set_keys([keys[i] for i in order.tolist()])
    return requests, [w.name for w in config.workloads], sum(p.skipped_rows for p in parts)


def _merged_ids(parts: list[GeneratedRequests], order: np.ndarray, name: str) -> np.ndarray:
    """A per-workload field that points at other requests of its workload (`next_turn`, `group`: an index in
    that workload's list, -1 for none), as ids of the merged table (`order` merges the workloads)."""
    offsets = np.cumsum([0] + [p.arrival.size for p in parts])
    ref = np.concatenate([np.full(p.arrival.size, -1) if getattr(p, name) is None
                          else np.where(getattr(p, name) >= 0, getattr(p, name) + o, -1)
                          for p, o in zip(parts, offsets)])[order]
    new_id = np.empty_like(order)
    new_id[order] = np.arange(order.size)
    return np.where(ref >= 0, new_id[np.maximum(ref, 0)], -1)


def _fan_out(requests: Requests, group: np.ndarray, config: SimConfig) -> None:
    """Fan-out groups (`group`: each sample's first sample) and each first sample's sibling count and quota
    (the samples of one prompt share its arrival time and stay consecutive in the stable merge)."""
    requests.group = group
    firsts, sizes = np.unique(requests.group[requests.group >= 0], return_counts=True)
    assert all(np.all(requests.group[f:f + n] == f) for f, n in zip(firsts.tolist(), sizes.tolist())), \
        "a fan-out's samples are not consecutive"
    requests.fanout[firsts] = sizes - 1
    quota = [(w.fan_out.finish_after or 0) if w.fan_out else 0 for w in config.workloads]
    requests.finish_after[firsts] = np.array(quota, dtype=np.int64)[requests.workload[firsts]]


@dataclass
class Setup:
    """What a run needs before its clock starts: the pools (one when colocated), the requests, and with
    speculation the run's acceptance model (the speculator plans with it, the executor draws from it)."""

    config: SimConfig
    pools: list[Pool]
    requests: Requests
    workload_names: list[str]
    skipped_rows: int
    acceptance: Acceptance | None = None

    @property
    def deployment(self) -> Deployment:
        return self.pools[0].deployment

    @property
    def num_blocks(self) -> int:
        return self.pools[0].num_blocks

    def replica_states(self, pool: Pool | None = None, blocks: np.ndarray | None = None,
                       prefix_caching: bool | None = None) -> list[ReplicaState]:
        """Fresh states of a pool's replicas (default: the first pool); `blocks` is the per-request block
        count array their KV managers share (default: the request table's)."""
        cfg, pool = self.config, pool or self.pools[0]
        watermark = pool.scheduler.kv_watermark()
        caching = cfg.kv_cache.prefix_caching if prefix_caching is None else prefix_caching
        kv = cfg.kv_cache
        swap = self.host_blocks(pool, kv.swap_space_gb) if kv.preemption == "swap" else 0  # swap space, if swapping
        host_cache = self.host_blocks(pool, kv.host_cache_gb)
        return [ReplicaState(pool.first + i, self.requests,
                             BlockManager(self.requests, pool.num_blocks, kv.block_size, watermark, caching, blocks,
                                          pool.deployment.kv_token_budget, swap, host_cache),
                             pool.deployment.context_limit, cfg.priority.mode, cfg.priority.weights, kv.preemption)
                for i in range(pool.instances)]

    def host_blocks(self, pool: Pool, gb: float) -> int:
        """KV blocks that `gb` GB of host memory per GPU holds for one replica of `pool`."""
        return int(gb * 1e9 // (pool.deployment.memory.kv_bytes_per_token * self.config.kv_cache.block_size))

    def results(self, states: list[ReplicaState], steps: dict[str, np.ndarray], wall_seconds: float,
                extra: dict | None = None) -> Results:
        """Reject what is left (nothing may disappear) and build the results."""
        r = self.requests
        for rid in np.flatnonzero(r.status < Status.FINISHED).tolist():
            r.reject(int(rid), "stalled", "still queued when the run ran out of events")
        cache_stats = {name: sum(getattr(s, name) for s in states)
                       for name in ("lookup_tokens", "lookup_blocks", "hit_tokens", "hit_blocks", "host_hit_blocks")}
        results = build_results(self.config, list(self.pools), r, self.workload_names, steps,
                                self.skipped_rows, wall_seconds=wall_seconds, cache_stats=cache_stats, extra=extra)
        results.free_blocks_at_end = [s.kv.available for s in states]
        if self.config.kv_cache.preemption == "swap":
            results.summary["preemptions_swapped"] = sum(s.swaps for s in states)
        return results


def prepare(config: SimConfig) -> Setup:
    """Pools (checked to fit, with their KV blocks per replica) and requests for a run of `config`."""
    pools = build_pools(config)
    requests, names, skipped = make_requests(config)
    spec = config.speculation
    acceptance = None if spec is None else Acceptance(spec.acceptance, config.seed, requests.n)
    return Setup(config, pools, requests, names, skipped, acceptance)
