"""The SimPy serving engine: arrival processes, a router, and one process per replica.

Each replica loops `batch = policy.schedule(state)` -> `outcome = executor.run(batch)` ->
`yield env.timeout(outcome.seconds)` -> `state.complete_step(batch, now)`; with nothing to run it sleeps on
an event that the next arrival routed to it triggers (no polling).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import simpy

from hardware.catalog import get_gpu, get_model
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.profile import resolve_profile
from policies import make_scheduler
from policies.base import Scheduler
from policies.batch import Batch
from policies.kv_cache import BlockManager
from policies.routers import Router, make_router
from policies.state import ReplicaState, Requests, Status
from sim.config import SimConfig
from sim.executor import CostModelExecutor, Executor, StepOutcome
from sim.metrics import Results, build_results
from traces.workload import generate

STEP_COLUMNS = ("replica", "start_s", "duration_s", "prefill_requests", "decode_requests", "prefill_tokens",
                "decode_tokens", "pad_rows", "kv_blocks_used", "kv_blocks_cached", "waiting", "running",
                "preemptions", "mfu", "mbu", "execution", "gpu_s")


@dataclass
class StepLog:
    """Per-step records, one tuple per step in `STEP_COLUMNS` order (a DataFrame at the end)."""

    rows: list[tuple] = field(default_factory=list)

    def record(self, state: ReplicaState, batch: Batch, start: float, outcome: StepOutcome, preempted: int) -> None:
        """One step of `state`'s replica that began at `start`; `preempted` requests were preempted in it."""
        kv = state.kv
        self.rows.append((
            state.index, start, outcome.seconds, batch.prefill_ids.size, batch.decode_ids.size,
            batch.num_prefill_tokens, batch.decode_ids.size, batch.pad_rows, kv.used, kv.evictable,
            len(state.waiting), len(state.running), preempted, outcome.mfu, outcome.mbu, outcome.execution,
            outcome.gpu_seconds,
        ))

    @property
    def columns(self) -> dict[str, list]:
        return {name: list(values) for name, values in zip(STEP_COLUMNS, zip(*self.rows))} if self.rows else \
            {name: [] for name in STEP_COLUMNS}


class Progress:
    """A one-line progress report on stderr, refreshed at most twice a second; silent when not a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.last = time.monotonic()

    def update(self, sim_time: float, requests: Requests) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.5:
            return
        self.last = now
        done = int(np.count_nonzero(requests.status >= Status.FINISHED))
        sys.stderr.write(f"\rservesim: simulated {sim_time:9.1f} s, {done}/{self.total} requests done")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class Replica:
    """One serving replica: its state, its policy, its executor, driven by the SimPy clock."""

    def __init__(self, env: simpy.Environment, state: ReplicaState, policy: Scheduler, executor: Executor,
                 log: StepLog, progress: Progress) -> None:
        self.env, self.state, self.policy, self.executor = env, state, policy, executor
        self.log, self.progress = log, progress
        self.wake: simpy.Event | None = None
        env.process(self.loop())

    def notify(self) -> None:
        """A request arrived: wake the replica if it sleeps."""
        if self.wake is not None:
            self.wake.succeed()
            self.wake = None

    def loop(self) -> Iterator[simpy.Event]:
        env, state, policy, executor = self.env, self.state, self.policy, self.executor
        steps = 0
        while True:
            state.now = env.now
            preempted_before = state.preemptions
            batch = policy.schedule(state)
            if batch is None:
                self.wake = env.event()
                yield self.wake
                continue
            outcome = executor.run(batch)
            start = env.now
            yield env.timeout(outcome.seconds)
            result = state.complete_step(batch, env.now)
            policy.on_step_end(state, batch, result)
            self.log.record(state, batch, start, outcome, state.preemptions - preempted_before)
            steps += 1
            if steps % 1000 == 0:
                self.progress.update(env.now, state.req)


class Cluster:
    """Replicas behind a router; rejects requests that can never fit the model's context."""

    def __init__(self, replicas: list[Replica], router: Router, requests: Requests, max_model_len: int) -> None:
        self.replicas, self.router, self.req, self.max_model_len = replicas, router, requests, max_model_len
        self.states = [r.state for r in replicas]

    def arrive(self, rid: int) -> None:
        total = int(self.req.prompt[rid] + self.req.output[rid])
        if total > self.max_model_len:
            self.req.reject(rid, "exceeds_max_model_len",
                            f"prompt + output = {total} tokens exceeds max_model_len={self.max_model_len}")
            return
        i = self.router.route(rid, self.states)
        self.states[i].enqueue(rid)
        self.replicas[i].notify()


def _arrivals(env: simpy.Environment, cluster: Cluster, ids: list[int], times: list[float]) -> Iterator[simpy.Event]:
    for rid, t in zip(ids, times):
        if t > env.now:
            yield env.timeout(t - env.now)
        cluster.arrive(rid)


def build_deployment(config: SimConfig) -> Deployment:
    """The replica's deployment; the scheduler's step limits size its activation memory."""
    hw = config.hardware
    model = get_model(config.model)
    gpu = get_gpu(hw.gpu)
    if hw.gpu_price is not None:
        gpu = gpu.with_price(hw.gpu_price)
    tokens, seqs = config.scheduler.step_limits(config.max_model_len or model.max_position_embeddings)
    return Deployment.build(model, gpu, tp=hw.tp, pp=hw.pp, link=hw.link, pp_link=hw.pp_link,
                            weight_dtype=hw.weight_dtype, kv_dtype=hw.kv_dtype,
                            gpu_memory_utilization=hw.gpu_memory_utilization, max_model_len=config.max_model_len,
                            max_num_batched_tokens=tokens, max_num_seqs=seqs)


def cost_model(config: SimConfig, profile: str | None = None) -> CostModel:
    """The cost model of a config's deployment, with `profile` (default: the config's) applied."""
    dep = build_deployment(config)
    return CostModel(dep, profile=resolve_profile(profile or config.hardware.profile, dep.gpu.id),
                     cuda_graphs=config.hardware.cuda_graphs)


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
    requests = Requests(arrival[order], prompt, output, workload[order])
    if config.kv_cache.prefix_caching:
        keys = [k for i, p in enumerate(parts) for k in p.block_keys(config.kv_cache.block_size, i)]
        requests.set_keys([keys[i] for i in order.tolist()])
    return requests, [w.name for w in config.workloads], sum(p.skipped_rows for p in parts)


@dataclass
class Setup:
    """What a run needs before its clock starts: the deployment, its requests and the KV capacity."""

    config: SimConfig
    deployment: Deployment
    requests: Requests
    workload_names: list[str]
    skipped_rows: int
    num_blocks: int

    def replica_states(self) -> list[ReplicaState]:
        cfg = self.config
        watermark = getattr(cfg.scheduler, "watermark", 0.0)
        return [ReplicaState(i, self.requests, BlockManager(self.requests, self.num_blocks, cfg.kv_cache.block_size,
                                                            watermark, cfg.kv_cache.prefix_caching),
                             self.deployment.context_limit) for i in range(cfg.cluster.replicas)]

    def results(self, states: list[ReplicaState], log: StepLog, wall_seconds: float) -> Results:
        """Reject what is left (nothing may disappear) and build the results."""
        r = self.requests
        for rid in np.flatnonzero(r.status < Status.FINISHED).tolist():
            r.reject(int(rid), "stalled", "still queued when the run ran out of events")
        cache_stats = {name: sum(getattr(s, name) for s in states)
                       for name in ("lookup_tokens", "lookup_blocks", "hit_tokens", "hit_blocks")}
        results = build_results(self.config, self.deployment, self.num_blocks, r, self.workload_names, log.columns,
                                self.skipped_rows, wall_seconds=wall_seconds, cache_stats=cache_stats)
        results.free_blocks_at_end = [s.kv.available for s in states]
        return results


def prepare(config: SimConfig) -> Setup:
    """Deployment (checked to fit), requests and KV blocks per replica for a run of `config`."""
    dep = build_deployment(config)
    plan = dep.check_fits()
    requests, names, skipped = make_requests(config)
    block_size = config.kv_cache.block_size
    num_blocks = config.kv_cache.num_blocks or plan.kv_capacity_tokens // block_size
    if num_blocks * block_size < dep.context_limit:  # as vLLM: one request of max_model_len must fit
        raise ServesimError(f"kv_cache.num_blocks = {num_blocks}: {num_blocks * block_size} tokens of KV cannot hold "
                            f"one request of max_model_len = {dep.context_limit} tokens; raise num_blocks or lower "
                            "max_model_len")
    return Setup(config, dep, requests, names, skipped, num_blocks)


def simulate(
    config: SimConfig,
    executor_factory: Callable[[Deployment], Executor] | None = None,
    progress: bool = False,
) -> Results:
    """Run one simulation: a pure function of the config (and the executor), returning its `Results`."""
    wall0 = time.perf_counter()
    setup = prepare(config)
    dep, requests = setup.deployment, setup.requests
    if executor_factory is None:
        model = cost_model(config)
        executor_factory = lambda _dep: CostModelExecutor(model)  # noqa: E731
    env = simpy.Environment()
    log = StepLog()
    bar = Progress(requests.n, progress and sys.stderr.isatty())
    states = setup.replica_states()
    replicas = [Replica(env, s, make_scheduler(config.scheduler), executor_factory(dep), log, bar) for s in states]
    router = make_router(config.cluster.router, config.seed, config.cluster.affinity_slack)
    cluster = Cluster(replicas, router, requests, dep.context_limit)
    for w in range(len(config.workloads)):
        ids = np.flatnonzero(requests.workload == w)
        env.process(_arrivals(env, cluster, ids.tolist(), requests.arrival[ids].tolist()))
    env.run()
    bar.close()
    return setup.results(states, log, time.perf_counter() - wall0)
