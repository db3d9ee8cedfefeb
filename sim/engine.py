"""The SimPy serving engine: arrival processes, a router, and one process per replica.

Each replica loops `batch = policy.schedule(state)` -> `outcome = executor.run(batch)` ->
`yield env.step_end(outcome.seconds)` -> `state.complete_step(batch, now, outcome.accepted)`; with nothing to
run it sleeps on an event that the next arrival routed to it triggers (no polling). With speculation the
policy is wrapped in a `Speculator`, and the executor's outcome says how many drafts were accepted. The same
loop runs on simulated time (`simulate`) and on wall-clock time (`drive` with `sim.clock.WallClock`:
`backend.replay`; `sim.clock`).
"""

from __future__ import annotations

import math
import mmap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import simpy

from hardware.deployment import Deployment
from hardware.errors import ServesimError
from policies import make_scheduler
from policies.base import Scheduler
from policies.batch import Batch
from policies.routers import Router, make_router
from policies.speculation import Speculator
from policies.state import ReplicaState, Requests, Status, StepResult
from sim.clients import Clients
from sim.clock import SimClock
from sim.config import SimConfig
from sim.executor import CostModelExecutor, Executor, StepOutcome
from sim.metrics import Results
from sim.progress import bar, watched
from sim.setup import Setup, prepare
from sim.skip_ahead import ArrivalClock, SkipAhead, Stretch, delays_to, folds

STEP_COLUMNS = ("replica", "pool", "start_s", "duration_s", "prefill_requests", "decode_requests", "prefill_tokens",
                "decode_tokens", "pad_rows", "kv_blocks_used", "kv_blocks_cached", "waiting", "running",
                "preemptions", "mfu", "mbu", "execution", "gpu_s", "verify_requests", "draft_tokens",
                "accepted_tokens", "draft_s")


# The steps table's dtypes: compact integers (a million-request run logs about five million steps); the
# text columns (`LABEL_COLUMNS`) as codes into `StepLog.labels`, categorical columns in the table
STEP_DTYPES = {"replica": np.int32, "pool": np.int16, "start_s": np.float64, "duration_s": np.float64,
               "prefill_requests": np.int32, "decode_requests": np.int32, "prefill_tokens": np.int32,
               "decode_tokens": np.int32, "pad_rows": np.int32, "kv_blocks_used": np.int32,
               "kv_blocks_cached": np.int32, "waiting": np.int32, "running": np.int32, "preemptions": np.int32,
               "mfu": np.float64, "mbu": np.float64, "execution": np.int16, "gpu_s": np.float64,
               "verify_requests": np.int32, "draft_tokens": np.int32, "accepted_tokens": np.int32,
               "draft_s": np.float64}
LABEL_COLUMNS = ("pool", "execution")
WATCHDOG_STEPS = 100_000  # steps in a row of one replica without a token that stop a run as a livelock
LOG_CHUNK = 1 << 16  # rows of the step log's typed arrays, allocated together


@dataclass
class StepLog:
    """Per-step records in `STEP_COLUMNS` order, written into typed arrays (`STEP_DTYPES`) of `LOG_CHUNK`
    rows, so that the log of a long run stays compact."""

    chunks: list[dict[str, np.ndarray]] = field(default_factory=list)
    buffer: dict[str, np.ndarray] = field(default_factory=dict)
    filled: int = 0  # rows of `buffer` written
    labels: dict[str, int] = field(default_factory=dict)  # the text of `LABEL_COLUMNS`, by code

    def code(self, label: str) -> int:
        """The code of a pool's name or an execution mode in the log."""
        got = self.labels.get(label)
        if got is None:
            got = self.labels[label] = len(self.labels)
        return got

    def record(self, state: ReplicaState, batch: Batch, start: float, outcome: StepOutcome, preempted: int,
               pool: str = "colocated") -> None:
        """One step of `state`'s replica (of `pool`) that began at `start`; `preempted` requests were
        preempted in it."""
        kv = state.kv
        accepted = 0
        if batch.verify_ids.size:
            accepted = int(np.minimum(outcome.accepted, batch.verify_drafts).sum())
        row = (state.index, self.code(pool), start, outcome.seconds, batch.prefill_ids.size, batch.decode_ids.size,
               batch.num_prefill_tokens, batch.decode_ids.size, batch.pad_rows, kv.used, kv.evictable,
               len(state.waiting), len(state.running), preempted, outcome.mfu, outcome.mbu,
               self.code(outcome.execution), outcome.gpu_seconds, batch.verify_ids.size,
               int(batch.verify_drafts.sum()), accepted, outcome.draft_seconds)
        at = self._room()
        for column, value in zip(self.buffer.values(), row):
            if value:  # (a fresh buffer holds zeros)
                column[at] = value
        self.filled += 1

    def record_stretch(self, state: ReplicaState, stretch: Stretch, start: float, pool: str = "colocated") -> None:
        """The steps of a skip-ahead stretch that began at `start` (`sim.skip_ahead`): the rows `record` would
        have written step by step."""
        starts = np.concatenate([[start], stretch.ends[:-1]])
        waiting: int | np.ndarray = 0  # requests that arrived in the last step (`SkipAhead.blind`)
        if state.waiting:
            waiting = np.zeros(stretch.steps, dtype=np.int32)
            waiting[-1] = len(state.waiting)
        execution = np.where(stretch.graph, self.code("graph"), self.code("eager"))
        row = (state.index, self.code(pool), starts, stretch.seconds, 0, stretch.decodes, 0, stretch.decodes, 0,
               stretch.used, state.kv.evictable, waiting, stretch.running, 0, stretch.mfu, stretch.mbu, execution,
               math.nan, 0, 0, 0, 0.0)
        done = 0
        while done < stretch.steps:
            at = self._room()
            n = min(stretch.steps - done, LOG_CHUNK - at)
            for column, value in zip(self.buffer.values(), row):
                if isinstance(value, np.ndarray):
                    column[at:at + n] = value[done:done + n]
                elif value:  # (a fresh buffer holds zeros)
                    column[at:at + n] = value
            self.filled += n
            done += n

    def _room(self) -> int:
        """The next free row of the buffer (a fresh buffer when it is full)."""
        if not self.buffer or self.filled == LOG_CHUNK:
            self._pack()
            self.buffer = {name: _mapped(STEP_DTYPES[name], LOG_CHUNK) for name in STEP_COLUMNS}
        return self.filled

    def _pack(self) -> None:
        if self.filled:
            n = self.filled
            self.chunks.append({name: values if n == LOG_CHUNK else values[:n].copy()
                                for name, values in self.buffer.items()})
        self.buffer, self.filled = {}, 0

    def drain(self) -> dict[str, np.ndarray | pd.Categorical]:
        """Every step, one typed array per column (the text columns categorical, categories sorted), in the
        order the steps ended (replicas by index where steps end at the same time); the log is left empty (each
        chunk's arrays are freed as they are joined, so the caller owns the only copy)."""
        self._pack()
        out = {name: np.concatenate([c.pop(name) for c in self.chunks]) if self.chunks
               else np.zeros(0, dtype=STEP_DTYPES[name]) for name in STEP_COLUMNS}
        self.chunks = []
        replica = out["replica"]
        if replica.size and replica.min() != replica.max():  # (one replica's rows are in order already)
            order = np.lexsort((replica, out["start_s"] + out["duration_s"]))
            out = {name: values[order] for name, values in out.items()}
        text = {code: label for label, code in self.labels.items()}
        for name in LABEL_COLUMNS:  # each column's categories: its own labels, sorted
            used = np.unique(out[name])
            names = sorted(text[c] for c in used.tolist())
            recode = np.zeros(len(self.labels), dtype=np.int16)
            recode[used] = [names.index(text[c]) for c in used.tolist()]
            out[name] = pd.Categorical.from_codes(recode[out[name]], categories=names)
        return out


def _mapped(dtype: type, rows: int) -> np.ndarray:
    """An array of `rows` zeros in its own anonymous memory map, given back to the system as soon as it is freed
    (chunks from the heap would stay in the process when `StepLog.drain` joins them: twice the log at the end)."""
    dtype = np.dtype(dtype)
    return np.frombuffer(mmap.mmap(-1, rows * dtype.itemsize), dtype=dtype)


class Progress:
    """The run's progress bar (`sim.progress`): requests answered, with the simulated time."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = bar(total, "servesim run", "req", enabled)

    def update(self, sim_time: float, requests: Requests) -> None:
        if self.bar.disable:
            return
        done = int(np.count_nonzero(requests.status >= Status.FINISHED))
        self.bar.set_postfix_str(f"simulated {sim_time:.1f} s", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class StepHooks(Protocol):
    """What a cluster may do around each step of a replica (disaggregation moves KV here)."""

    def step_started(self, replica: Replica, batch: Batch, seconds: float) -> None: ...

    def step_ended(self, replica: Replica, batch: Batch, result: StepResult) -> None: ...


class Replica:
    """One serving replica: its state, its policy, its executor, driven by the SimPy clock."""

    def __init__(self, env: SimClock, state: ReplicaState, policy: Scheduler, executor: Executor,
                 log: StepLog, progress: Progress, pool: str = "colocated", hooks: StepHooks | None = None,
                 skip: SkipAhead | None = None) -> None:
        self.env, self.state, self.policy, self.executor = env, state, policy, executor
        self.log, self.progress, self.pool, self.hooks = log, progress, pool, hooks
        self.skip = skip
        self.wake: simpy.Event | None = None
        env.process(self.loop())

    def notify(self) -> None:
        """A request arrived: wake the replica if it sleeps."""
        if self.wake is not None:
            self.wake.succeed()
            self.wake = None

    def loop(self) -> Iterator[simpy.Event]:
        env, state, policy, executor = self.env, self.state, self.policy, self.executor
        steps = stalled = 0
        report = 1000
        while True:
            state.now = env.now
            preempted_before = state.preemptions
            batch = policy.schedule(state)
            if batch is None:
                self.wake = env.event()
                yield self.wake
                continue
            batch = state.with_swaps(batch)
            ahead = self.skip.advance(state, batch, env.now) if self.skip is not None else None
            if isinstance(ahead, Stretch):  # run already (`sim.skip_ahead`): sleep to its end
                for extreme in (ahead.seconds.min(), ahead.seconds.max()):  # (either is NaN if any step is)
                    self._check_seconds(batch, float(extreme))
                start = env.now
                for delay in delays_to(start, float(ahead.ends[-1])):
                    yield env.timeout(delay)
                self.log.record_stretch(state, ahead, start, self.pool)
                steps, stalled = steps + ahead.steps, 0
                if steps >= report:
                    report = steps + 1000
                    self.progress.update(env.now, state.req)
                continue
            outcome = ahead if ahead is not None else executor.run(batch)  # (priced by the skip-ahead)
            self._check_seconds(batch, outcome.seconds)
            start = env.now
            if self.hooks is not None:
                self.hooks.step_started(self, batch, outcome.seconds)
            yield env.step_end(outcome.seconds)
            result = state.complete_step(batch, env.now, outcome.accepted)
            stalled = 0 if result.emitted.size or result.finished.size else stalled + 1
            if stalled >= WATCHDOG_STEPS:
                self._stuck(stalled)
            policy.on_step_end(state, batch, result)
            self.log.record(state, batch, start, outcome, state.preemptions - preempted_before, self.pool)
            if self.hooks is not None:
                self.hooks.step_ended(self, batch, result)
            steps += 1
            if steps >= report:
                report = steps + 1000
                self.progress.update(env.now, state.req)

    def _check_seconds(self, batch: Batch, seconds: float) -> None:
        if not 0.0 <= seconds < math.inf:  # NaN included
            raise ServesimError(f"replica {self.state.index}: a step of {batch.num_tokens} tokens was priced at "
                                f"{seconds!r} s, not a finite time; check the profile's values")

    def _stuck(self, stalled: int) -> None:
        """Stop a run that goes nowhere (`WATCHDOG_STEPS` steps in a row without a token), naming the stuck
        requests and where their KV stands."""
        state, req = self.state, self.state.req
        running = [f"{r} ({int(req.computed[r])} of {int(req.prompt[r] + req.generated[r])} tokens computed, "
                   f"{int(req.blocks[r])} blocks)" for r in list(state.running)[:3]]
        raise ServesimError(
            f"{self.pool} replica {state.index}: {stalled} steps in a row without a token at t = {self.env.now:.6g} s "
            f"(a livelock): running {len(state.running)} ({', '.join(running) or 'none'}), waiting "
            f"{len(state.waiting)}, KV blocks used {state.kv.used} of {state.kv.num_blocks}; the scheduler keeps "
            "choosing steps that never complete a token (a cache too small for its limits?)")


class Cluster:
    """Replicas behind a router; rejects requests that can never fit the model's context."""

    def __init__(self, replicas: list[Replica], router: Router, requests: Requests, max_model_len: int) -> None:
        self.replicas, self.router, self.req, self.max_model_len = replicas, router, requests, max_model_len
        self.states = [r.state for r in replicas]

    def arrive(self, rid: int) -> None:
        # (a fan-out's longest sample counts: vLLM checks the max_tokens its samples share)
        total = int(self.req.prompt[rid] + self.req.output[rid:rid + 1 + self.req.fanout[rid]].max())
        if total > self.max_model_len:
            self.req.reject(rid, "exceeds_max_model_len",
                            f"prompt + output = {total} tokens exceeds max_model_len={self.max_model_len}")
            return
        i = self.router.route(rid, self.states)
        self.states[i].enqueue(rid)
        self.replicas[i].notify()


def _arrivals(env: simpy.Environment, arrive: Callable[[int], None], ids: list[int], times: list[float],
              clock: ArrivalClock) -> Iterator[simpy.Event]:
    for rid, t in zip(ids, times):
        if t > env.now:
            yield env.timeout(t - env.now)
        arrive(rid)
        clock.count += 1


def _sent_ids(requests: Requests, workload: int) -> np.ndarray:
    """The requests of an open-loop workload that arrive at their own times (a session's later turns have no
    time yet: the clients send them; fan-out samples fork from their first)."""
    ids = np.flatnonzero(requests.workload == workload)
    return ids[~np.isnan(requests.arrival[ids]) & ((requests.group[ids] < 0) | (requests.group[ids] == ids))]


def simulate(
    config: SimConfig,
    executor_factory: Callable[[Deployment], Executor] | None = None,
    progress: bool = False,
    skip_ahead: bool = True,
) -> Results:
    """Run one simulation: a pure function of the config (and the executor), returning its `Results`.
    `skip_ahead` False steps every decode one by one (the results are the same: `sim.skip_ahead`)."""
    wall0 = time.perf_counter()
    results = drive(prepare(config), SimClock(), executor_factory, progress, skip_ahead, wall0=wall0)
    if config.speculation is not None and config.speculation.compare_baseline:
        add_speedups(results.summary, simulate(config.model_copy(update={"speculation": None})).summary)
    return results


def drive(setup: Setup, env: SimClock, executor_factory: Callable[[Deployment], Executor] | None = None,
          progress: bool = False, skip_ahead: bool = True, states: list[ReplicaState] | None = None,
          wall0: float | None = None) -> Results:
    """Run `setup`'s requests through its replicas on `env`'s clock: simulated time (`sim.clock.SimClock`) or
    wall-clock time (`sim.clock.WallClock`, a replay on a device), the same loop either way. `states` are the
    colocated replicas' states when the caller made them (default: fresh ones)."""
    wall0 = time.perf_counter() if wall0 is None else wall0
    config, requests = setup.config, setup.requests
    if executor_factory is None:
        executors = {id(p.deployment): p.executor(config.speculation, setup.acceptance) for p in setup.pools}
        executor_factory = lambda dep: executors[id(dep)]  # noqa: E731
    log = StepLog()
    progress_bar = Progress(requests.n, progress and watched())
    waits = any(w.arrival.kind == "closed_loop" or w.sessions is not None for w in config.workloads)
    sent = [_sent_ids(requests, w) for w, wl in enumerate(config.workloads) if wl.arrival.kind != "closed_loop"]
    clock = ArrivalClock(requests.arrival[np.concatenate(sent)] if sent else np.zeros(0))
    if config.disaggregation is not None:
        from sim.disagg import DisaggregatedCluster

        cluster = DisaggregatedCluster(env, setup, log, progress_bar, executor_factory)
        arrive, states, extra = cluster.arrive, cluster.states, cluster.extra
    else:
        (pool,) = setup.pools
        states = states or setup.replica_states()
        spec = config.speculation
        foldable = (skip_ahead and not waits and spec is None and not config.kv_cache.prefix_caching
                    and config.hardware.kv_token_budget is None)  # runs `sim.skip_ahead` proves stretches for
        router = make_router(config.cluster.router, config.seed, config.cluster.affinity_slack)
        replicas = []
        for s in states:
            policy, executor = make_scheduler(pool.scheduler), executor_factory(pool.deployment)
            if spec is not None:
                assert setup.acceptance is not None
                policy = Speculator(policy, spec, setup.acceptance)
            skip = None
            if foldable and folds(policy) and isinstance(executor, CostModelExecutor) and executor.draft is None:
                skip = SkipAhead(executor.cost_model, clock, len(states) == 1 or not router.reads_state)
            replicas.append(Replica(env, s, policy, executor, log, progress_bar, skip=skip))
        arrive, extra = Cluster(replicas, router, requests, pool.deployment.context_limit).arrive, None
    clients = Clients(env, requests, arrive, config.workloads, config.seed) if waits else None
    for w, workload in enumerate(config.workloads):
        if workload.arrival.kind == "closed_loop":
            assert clients is not None
            clients.closed_loop(np.flatnonzero(requests.workload == w).tolist(), workload.arrival, workload.start_s, w)
        else:
            ids = _sent_ids(requests, w)
            env.process(_arrivals(env, arrive, ids.tolist(), requests.arrival[ids].tolist(), clock))
    env.run()
    unsent = np.isnan(requests.arrival)  # closed-loop requests never sent (their clients' requests stalled)
    requests.arrival[unsent] = env.now
    progress_bar.update(env.now, requests)
    progress_bar.close()
    return setup.results(states, log.drain(), time.perf_counter() - wall0, extra() if extra else None)


def add_speedups(summary: dict, baseline: dict) -> None:
    """Speculation's speedups over the same run without it, at equal load (ratios baseline / speculative)."""
    for key in ("tpot_p50_s", "tpot_mean_s", "e2e_p50_s", "duration_s"):
        ours, theirs = summary.get(key), baseline.get(key)
        summary[f"spec_speedup_{key.removesuffix('_s')}"] = theirs / ours if ours and theirs else None
