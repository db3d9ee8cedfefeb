"""Prefill/decode disaggregation: a prefill pool, a decode pool (and Splitwise's optional mixed pool), with
each request's KV cache moved between them over modelled links.

DistServe (Zhong et al., OSDI 2024) and Splitwise (Patel et al., ISCA 2024). A request goes to the least
loaded prefill instance, which runs its prompt under that pool's policy and samples the first token (TTFT
ends there). The request then leaves the prefill instance's running list but keeps its KV blocks there until
the transfer ends (back-pressure: a prefill instance full of KV waiting to move cannot admit more prompts).
It waits, FIFO, for a decode instance with room (free KV blocks for its prompt plus one token, and a free
`max_num_seqs` slot); the least loaded such instance reserves the blocks and the KV moves over the sender's
egress port and the receiver's ingress port, each `link` bandwidth x the instance's GPUs (one port per GPU,
as on DGX/HGX nodes), shared max-min fairly by the transfers in flight (`sim/network.py`). Only when the
last byte has arrived does the request join the decode instance's running list.

Bytes moved per request = prompt tokens x the KV bytes per token the decode instance holds: all layers,
K and V, its TP ranks' heads (KV heads replicated across ranks when tp exceeds them are sent to each rank).

`transfer: layerwise` streams each prefill chunk's KV while its step runs (a flow capped at the chunk's
bytes / step time, so it cannot outrun the layers that produce it); the destination is reserved when the
prompt's first chunk starts, if one has room and no hand-off waits (else the request falls back to a transfer
after its prefill). A finished prefill waiting for decode room takes the destination of streams still
prefilling (newest first) where that makes room; they fall back too, their streamed bytes sent again.

The mixed pool (Splitwise) takes a new prompt when the least loaded prefill instance has a queue and a mixed
instance is less loaded, and serves it whole; it takes a transferred request when no decode instance has room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import simpy

from hardware.catalog import get_interconnect
from hardware.deployment import Deployment
from policies import make_scheduler
from policies.batch import Batch
from policies.state import Status, StepResult
from sim.clock import SimClock
from sim.engine import Progress, Replica, StepLog
from sim.executor import Executor
from sim.metrics import pct_key
from sim.network import Link, Network
from sim.setup import Pool, Setup


def wire_bytes_per_token(dep: Deployment) -> float:
    """KV bytes of one token that a decode instance of `dep` receives: every layer, every TP rank's heads
    (MLA's latent, which every rank holds, once)."""
    return dep.kv_bytes_per_token()


class DisaggregatedCluster:
    """The pools' replicas, the KV links between them and the hand-off of every request."""

    def __init__(self, env: SimClock, setup: Setup, log: StepLog, progress: Progress,
                 executor_factory: Callable[[Deployment], Executor]) -> None:
        cfg = setup.config
        assert cfg.disaggregation is not None
        self.env, self.req, self.config = env, setup.requests, cfg
        self.layerwise = cfg.disaggregation.transfer == "layerwise"
        self.network = Network(env)
        link = get_interconnect(cfg.disaggregation.link)
        n = self.req.n
        decode_blocks = np.zeros(n, dtype=np.int64)  # a request holds KV on both sides while it moves
        self.pools: dict[str, list[Replica]] = {}
        self.ports: dict[int, tuple[Link, Link]] = {}  # replica index -> (egress, ingress)
        self.wire: dict[int, float] = {}
        self.max_seqs: dict[int, int] = {}
        for pool in setup.pools:
            decode_side = pool.name != "prefill"
            states = setup.replica_states(pool, decode_blocks if decode_side else None,
                                          prefix_caching=cfg.kv_cache.prefix_caching and pool.name != "decode")
            replicas = [Replica(env, s, make_scheduler(pool.scheduler), executor_factory(pool.deployment), log,
                                progress, pool.name, self) for s in states]
            self.pools[pool.name] = replicas
            for r in replicas:
                i, bw = r.state.index, link.bandwidth * pool.deployment.num_gpus
                self.ports[i] = (self.network.link(f"{pool.name}{i - pool.first}.out", bw, link.latency),
                                 self.network.link(f"{pool.name}{i - pool.first}.in", bw, link.latency))
                self.wire[i] = wire_bytes_per_token(pool.deployment)
                self.max_seqs[i] = pool.scheduler.step_limits(pool.deployment.context_limit)[1]
        self.by_index = {r.state.index: r for rs in self.pools.values() for r in rs}
        self.states = [r.state for rs in self.pools.values() for r in rs]
        self.context_limit = min(p.deployment.context_limit for p in setup.pools)
        self.decode_capacity = max(self._room(p) for p in setup.pools if p.name != "prefill")
        # Per request: where its KV goes, when, and how much of it has been sent.
        self.source = np.full(n, -1, dtype=np.int64)
        self.dest = np.full(n, -1, dtype=np.int64)
        self.streamed = np.zeros(n, dtype=np.int64)  # prompt tokens whose KV is sent or in flight
        self.flows = np.zeros(n, dtype=np.int64)  # flows in flight
        self.kv_bytes = np.zeros(n)
        self.prefill_end = np.full(n, np.nan)
        self.reserved = np.full(n, np.nan)
        self.kv_ready = np.full(n, np.nan)
        self.incoming: dict[int, int] = {i: 0 for i in self.by_index}
        self.pending: deque[int] = deque()  # handed off, waiting for a decode instance with room
        self.streaming: list[int] = []  # layer-wise: destination reserved, prefill not done (oldest first)
        self.fell_back = np.zeros(n, dtype=bool)  # layer-wise: gave its destination back to a hand-off
        self.abandoned = np.zeros(n)  # bytes it had streamed then (sent again after its prefill)

    @staticmethod
    def _room(pool: Pool) -> int:
        """Blocks an instance of `pool` can ever give one request (its watermark kept free)."""
        return pool.num_blocks - int(pool.scheduler.kv_watermark() * pool.num_blocks)

    # ---- arrivals ---------------------------------------------------------------------------------------
    def arrive(self, rid: int) -> None:
        r = self.req
        total = int(r.prompt[rid] + r.output[rid])
        if total > self.context_limit:
            r.reject(rid, "exceeds_max_model_len",
                     f"prompt + output = {total} tokens exceeds max_model_len={self.context_limit}")
            return
        bs = self.config.kv_cache.block_size
        need = -(-(int(r.prompt[rid]) + 1) // bs)
        if r.output[rid] > 1 and need > self.decode_capacity:
            r.reject(rid, "exceeds_decode_kv_capacity", f"prompt of {int(r.prompt[rid])} tokens needs {need} KV "
                                                        f"blocks on a decode instance; the largest has "
                                                        f"{self.decode_capacity}")
            return
        target = self._least_loaded(self.pools["prefill"])
        mixed = self.pools.get("mixed")
        if mixed and target.state.waiting:
            m = self._least_loaded(mixed)
            if m.state.outstanding < target.state.outstanding:
                target = m
        target.state.enqueue(rid)
        target.notify()

    def _least_loaded(self, replicas: list[Replica]) -> Replica:
        return min(replicas, key=lambda rep: (rep.state.outstanding + self.incoming[rep.state.index], rep.state.index))

    # ---- around each step (the engine calls these) --------------------------------------------------------
    def step_started(self, replica: Replica, batch: Batch, seconds: float) -> None:
        """Layer-wise transfer: each prefill chunk's KV streams to its reserved destination during the step."""
        if not self.layerwise or replica.pool != "prefill" or not batch.prefill_ids.size:
            return
        r = self.req
        for rid, tokens, before in zip(batch.prefill_ids.tolist(), batch.prefill_tokens.tolist(),
                                       batch.prefill_computed.tolist()):
            if (self.dest[rid] < 0 and self.streamed[rid] == 0 and r.output[rid] > 1 and not self.pending
                    and not self.fell_back[rid]):
                target = self._choose_decode(rid)
                if target is not None:
                    self._reserve(rid, target)
                    self.streaming.append(rid)
            if self.dest[rid] >= 0:
                self.source[rid] = replica.state.index
                upto = min(before + tokens, int(r.prompt[rid]))
                if upto > self.streamed[rid]:
                    nbytes = (upto - self.streamed[rid]) * self.wire[int(self.dest[rid])]
                    self.streamed[rid] = upto
                    self._send(rid, nbytes, cap=nbytes / seconds if seconds > 0 else float("inf"))

    def step_ended(self, replica: Replica, batch: Batch, result: StepResult) -> None:
        r, now = self.req, self.env.now
        if replica.pool == "prefill":
            handed = result.emitted[(r.generated[result.emitted] == 1) & (r.status[result.emitted] == Status.RUNNING)]
            if handed.size:
                replica.state.hand_off(handed.tolist())
                for rid in handed.tolist():
                    self.prefill_end[rid] = now
                    if rid in self.streaming:
                        self.streaming.remove(rid)
                    self.source[rid] = replica.state.index
                    if self.dest[rid] < 0:
                        self.pending.append(rid)
                    elif self.flows[rid] == 0:
                        self._deliver(rid)
                self._dispatch()
        elif result.finished.size or replica.state.waiting:
            self._dispatch()

    # ---- hand-off ---------------------------------------------------------------------------------------
    def _choose_decode(self, rid: int) -> Replica | None:
        """The least loaded decode instance with room for `rid` (a mixed one when no decode instance has)."""
        need = -(-(int(self.req.prompt[rid]) + 1) // self.config.kv_cache.block_size)
        for name in ("decode", "mixed"):
            fits = [rep for rep in self.pools.get(name, [])
                    if rep.state.kv.can_allocate(need)
                    and len(rep.state.running) + self.incoming[rep.state.index] < self.max_seqs[rep.state.index]]
            if fits:
                return self._least_loaded(fits)
        return None

    def _reserve(self, rid: int, target: Replica) -> None:
        i = target.state.index
        self.dest[rid] = i
        self.reserved[rid] = self.env.now
        self.incoming[i] += 1
        target.state.kv.grow_to(rid, int(self.req.prompt[rid]))

    def _yield_streams(self, rid: int) -> Replica | None:
        """Make room for hand-off `rid` on a decode instance by giving back the destinations of layer-wise
        streams whose prefill is not done (newest first), where that makes enough room; each falls back to a
        transfer after its prefill. A finished prefill comes first: it frees the prefill instance's KV once
        moved, while a stream's prefill may wait for exactly that KV (holding both would livelock). Returns the
        decode instance `rid` now fits on, or None."""
        need = -(-(int(self.req.prompt[rid]) + 1) // self.config.kv_cache.block_size)
        for rep in self.pools["decode"]:
            i, kv = rep.state.index, rep.state.kv
            mine = [s for s in reversed(self.streaming) if self.dest[s] == i]
            if not mine or not kv.can_allocate(need - sum(int(kv.blocks[s]) for s in mine)):
                continue
            for s in mine:
                kv.release(s)
                self.incoming[i] -= 1
                self.dest[s], self.streamed[s], self.reserved[s], self.fell_back[s] = -1, 0, np.nan, True
                self.abandoned[s] = self.kv_bytes[s]
                self.streaming.remove(s)
                target = self._choose_decode(rid)
                if target is not None:
                    return target
        return None

    def _dispatch(self) -> None:
        """Move waiting hand-offs, first come first served, while a decode instance has room."""
        while self.pending:
            rid = self.pending[0]
            target = self._choose_decode(rid)
            if target is None and self.layerwise:
                target = self._yield_streams(rid)
            if target is None:
                return
            self.pending.popleft()
            self._reserve(rid, target)
            left = int(self.req.prompt[rid]) - int(self.streamed[rid])
            self.streamed[rid] = self.req.prompt[rid]
            if left > 0:
                self._send(rid, left * self.wire[target.state.index])
            elif self.flows[rid] == 0:
                self._deliver(rid)

    def _send(self, rid: int, nbytes: float, cap: float = float("inf")) -> None:
        links = (self.ports[int(self.source[rid])][0], self.ports[int(self.dest[rid])][1])
        self.flows[rid] += 1
        self.kv_bytes[rid] += nbytes
        self.env.process(self._carry(rid, links, nbytes, cap))

    def _carry(self, rid: int, links: tuple[Link, Link], nbytes: float, cap: float) -> Iterator[simpy.Event]:
        yield self.network.transfer(links, nbytes, cap)
        self.flows[rid] -= 1
        if self.flows[rid] == 0 and not np.isnan(self.prefill_end[rid]) and self.dest[rid] >= 0:
            self._deliver(rid)

    def _deliver(self, rid: int) -> None:
        """The KV has arrived: free it on the prefill side and start decoding."""
        self.kv_ready[rid] = self.env.now
        src, dst = self.by_index[int(self.source[rid])], self.by_index[int(self.dest[rid])]
        src.state.release_handed(rid)
        src.notify()
        self.incoming[dst.state.index] -= 1
        dst.state.receive(rid)
        dst.notify()

    # ---- results ----------------------------------------------------------------------------------------
    def extra(self) -> dict[str, Any]:
        """Request columns, summary entries and the link timeline for `build_results`."""
        r = self.req
        moved = ~np.isnan(self.kv_ready)
        wait = np.where(moved, np.maximum(self.reserved - self.prefill_end, 0.0), np.nan)
        transfer = np.where(moved, self.kv_ready - np.fmax(self.prefill_end, self.reserved), np.nan)
        columns = {"decode_replica": self.dest, "kv_bytes": self.kv_bytes, "kv_ready_s": self.kv_ready,
                   "decode_wait_s": wait, "kv_transfer_s": transfer, "kv_bytes_abandoned": self.abandoned}
        finished = r.status == Status.FINISHED
        end = float(np.nanmax(r.finish)) if finished.any() else float(r.arrival.max(initial=0.0))
        duration = end - float(r.arrival.min(initial=0.0))
        summary: dict[str, Any] = {"kv_link": self.config.disaggregation.link,  # type: ignore[union-attr]
                                   "kv_transfer_mode": self.config.disaggregation.transfer,  # type: ignore[union-attr]
                                   "kv_transfers": int(moved.sum()), "kv_bytes_total": float(self.kv_bytes.sum()),
                                   "kv_streams_given_back": int(self.fell_back.sum())}
        for name, values in (("kv_transfer", transfer[moved]), ("decode_wait", wait[moved])):
            summary[f"{name}_mean_s"] = float(values.mean()) if values.size else None
            for p in self.config.metrics.reported():
                summary[pct_key(name, p)] = float(np.percentile(values, p)) if values.size else None
        used = [link.moved / (link.bandwidth * duration) for link in self.network.links.values()
                if duration > 0 and link.moved > 0]
        summary["link_utilisation_mean"] = float(np.mean(used)) if used else 0.0
        summary["link_utilisation_max"] = float(np.max(used)) if used else 0.0
        links = pd.DataFrame(self.network.timeline.rows,
                             columns=["time_s", "link", "rate_bytes_s", "bandwidth_bytes_s", "flows"])
        links["utilisation"] = links["rate_bytes_s"] / links["bandwidth_bytes_s"]
        return {"request_columns": columns, "summary": summary, "links": links}
