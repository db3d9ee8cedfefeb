"""Replica state shared by policies and executors: the request table and queues (KV blocks: kv_cache.py).

Requests live in one struct-of-arrays table (`Requests`) indexed by request id, so the per-step work of
the engine is a handful of numpy operations instead of a loop over requests. Each replica has a
`ReplicaState`: its waiting queue, its running list and its `BlockManager`. The same state is driven by
the simulator (virtual clock) and by the real GPU backend (wall clock); it knows neither.

Token accounting (vLLM V1's): a request knows `prompt + generated` tokens and has the KV of `computed` of
them; a step runs `prompt + generated - computed` tokens (the whole prompt, a chunk of it, or the newest
token), and when a step leaves no known token uncomputed the request samples its next token. A preempted
request loses its KV (`computed = 0`) and recomputes its prompt and the tokens it had generated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np

from policies.batch import Batch
from policies.kv_cache import NO_HIT, BlockManager, PrefixHit
from policies.priority import PriorityMode, WaitingQueue


class Status(IntEnum):
    PENDING = 0  # not arrived yet
    WAITING = 1
    RUNNING = 2
    FINISHED = 3
    REJECTED = 4
    CANCELLED = 5  # a fan-out sample stopped once its request had enough finished samples


class Requests:
    """All requests of a run, one array per field, indexed by request id (ids follow arrival order)."""

    def __init__(self, arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray, workload: np.ndarray) -> None:
        n = arrival.size
        self.n = n
        self.arrival = np.asarray(arrival, dtype=np.float64)
        self.prompt = np.asarray(prompt, dtype=np.int64)
        self.output = np.asarray(output, dtype=np.int64)
        self.workload = np.asarray(workload, dtype=np.int64)
        self.replica = np.full(n, -1, dtype=np.int64)
        self.status = np.zeros(n, dtype=np.int8)
        self.computed = np.zeros(n, dtype=np.int64)
        self.generated = np.zeros(n, dtype=np.int64)
        self.blocks = np.zeros(n, dtype=np.int64)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.first_scheduled = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.reject_code: dict[int, str] = {}  # short category, e.g. exceeds_max_model_len
        self.reject_reason: dict[int, str] = {}  # the full sentence
        # Every output token's emission time; request i's tokens are token_time[offset[i]:offset[i]+output[i]].
        self.token_offset = np.cumsum(self.output) - self.output
        self.token_time = np.full(int(self.output.sum()), np.nan)
        self.cached_tokens = np.zeros(n, dtype=np.int64)  # prefix-cache hits over all admissions
        # Block keys for prefix caching: request i's are keys[key_offset[i]:key_offset[i] + num_keys[i]].
        self.keys = np.zeros(0, dtype=np.int64)
        self.key_offset = np.zeros(n, dtype=np.int64)
        self.num_keys = np.zeros(n, dtype=np.int64)
        self.on_done: Callable[[int], None] | None = None  # told of each request that finishes or is rejected
        self.priority = np.zeros(n, dtype=np.int64)  # request class: lower numbers are more urgent
        self.session = np.full(n, -1, dtype=np.int64)  # multi-turn sessions: the session (-1: none)
        self.next_turn = np.full(n, -1, dtype=np.int64)  # and the turn sent after this one
        # Fan-out (n samples of one prompt): every sample's group is its first sample's id (-1: no fan-out); the
        # first runs the prompt, then its `fanout` siblings (the next ids) fork from it sharing the prompt's KV.
        # The group ends once `finish_after` of its samples have finished (0: all), cancelling the others.
        self.group = np.full(n, -1, dtype=np.int64)
        self.fanout = np.zeros(n, dtype=np.int64)
        self.finish_after = np.zeros(n, dtype=np.int64)
        self.group_finished = np.zeros(n, dtype=np.int64)

    def siblings(self, first: int) -> range:
        """The samples that fork from fan-out sample `first` once its prompt is computed."""
        return range(first + 1, first + 1 + int(self.fanout[first]))

    def width(self, rid: int) -> int:
        """Sequences `rid` will run once admitted: its fan-out's samples if it has not forked yet, else 1."""
        return 1 + int(self.fanout[rid]) if self.fanout[rid] and not self.generated[rid] else 1

    def set_keys(self, per_request: list[np.ndarray]) -> None:
        """Identities of each request's full KV blocks (prompt first), for prefix caching."""
        self.num_keys = np.array([k.size for k in per_request], dtype=np.int64)
        self.key_offset = np.cumsum(self.num_keys) - self.num_keys
        self.keys = np.concatenate(per_request).astype(np.int64) if per_request else self.keys

    def keys_of(self, rid: int) -> np.ndarray:
        start = self.key_offset[rid]
        return self.keys[start:start + self.num_keys[rid]]

    def reject(self, rid: int, code: str, reason: str) -> None:
        """Refuse `rid` (and the fan-out samples that would fork from it, with the same reason)."""
        ids = [rid] + [s for s in self.siblings(rid) if self.status[s] == Status.PENDING] if self.fanout[rid] else [rid]
        for i in ids:
            self.status[i] = Status.REJECTED
            self.reject_code[i] = code
            self.reject_reason[i] = reason
            if self.on_done is not None:
                self.on_done(i)


@dataclass
class StepResult:
    """What a completed step changed: ids that emitted a token and ids that finished."""

    emitted: np.ndarray
    finished: np.ndarray


class ReplicaState:
    """One replica's queues and KV cache over the shared request table."""

    def __init__(self, index: int, requests: Requests, kv: BlockManager, max_model_len: int,
                 priority: PriorityMode = "fcfs", weights: dict[int, float] | None = None,
                 preemption: str = "recompute") -> None:
        self.index = index
        self.req = requests
        self.kv = kv
        self.max_model_len = max_model_len
        self.priority_mode = priority
        self.preemption = preemption  # recompute, or swap (to host memory when there is room)
        self.swap_out_blocks = self.swap_in_blocks = 0  # moved since the engine last collected them
        self.swaps = 0  # preemptions that swapped
        self.waiting: deque[int] | WaitingQueue = deque() if priority == "fcfs" else \
            WaitingQueue(requests.priority, priority, weights or {}, self.known_tokens)
        self.running: list[int] = []
        self.now = 0.0
        self.preemptions = 0  # preemptions so far on this replica
        self.lookup_tokens = 0  # prefix-cache statistics over admissions: tokens and full blocks asked for,
        self.lookup_blocks = 0  # and hit
        self.hit_tokens = 0
        self.hit_blocks = 0
        self.host_hit_blocks = 0  # of those, loaded from the prefix cache's host tier
        self.unforked = 0  # fan-out samples of running prompts that have not forked yet

    @property
    def seqs(self) -> int:
        """Sequences running, counting the fan-out samples that will fork from running prompts (vLLM counts a
        sequence group's samples against `max_num_seqs` from its admission)."""
        return len(self.running) + self.unforked

    # ---- queries policies use ----------------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Requests waiting or running, with the fan-out samples still to fork from running prompts."""
        return len(self.waiting) + len(self.running) + self.unforked

    def known_tokens(self, rid: int) -> int:
        return int(self.req.prompt[rid] + self.req.generated[rid])

    def tokens_to_run(self, rid: int | np.ndarray) -> int | np.ndarray:
        """Known tokens not yet computed (prompt + generated - computed), for one request or an array."""
        r = self.req
        left = r.prompt[rid] + r.generated[rid] - r.computed[rid]
        return left if isinstance(rid, np.ndarray) else int(left)

    def total_tokens(self, rid: int) -> int:
        """Prompt plus full output: what a request holds at its end (KV of all but the last token)."""
        return int(self.req.prompt[rid] + self.req.output[rid])

    # ---- transitions policies make ---------------------------------------------------------------------
    def enqueue(self, rid: int) -> None:
        self.req.status[rid] = Status.WAITING
        self.req.replica[rid] = self.index
        self.waiting.append(rid)

    def start(self, rid: int) -> None:
        """Move `rid` from the head of the waiting queue to the tail of the running list."""
        popped = self.waiting.popleft()
        assert popped == rid, "start() takes the head of the waiting queue"
        self.req.status[rid] = Status.RUNNING
        if np.isnan(self.req.first_scheduled[rid]):
            self.req.first_scheduled[rid] = self.now
        self.unforked += self.req.width(rid) - 1
        if self.priority_mode == "strict":  # running in class order: after every request of its class or above
            p = self.req.priority
            at = len(self.running)
            while at and p[self.running[at - 1]] > p[rid]:
                at -= 1
            self.running.insert(at, rid)
        else:
            self.running.append(rid)

    def prefix_hit(self, rid: int) -> PrefixHit:
        """What the prefix cache holds of `rid`'s known tokens (nothing when caching is off); a swapped-out
        request's computed tokens come back from host memory instead."""
        if rid in self.kv.swapped:
            return PrefixHit(0, int(self.req.computed[rid]), 0)
        return self.kv.lookup(rid, self.known_tokens(rid))

    def admit_head(self, kv_tokens: int, hit: PrefixHit = NO_HIT) -> int:
        """Start the head of the waiting queue: reuse its cached prefix `hit` (from `prefix_hit`), give it
        KV blocks for `kv_tokens` tokens in all, and move it to the running list; returns its id."""
        rid = self.waiting[0]
        self.swap_in_blocks += self.kv.swap_in(rid)  # a swapped request's KV is copied back in this step
        if self.kv.cache is not None:
            known = self.known_tokens(rid)
            self.lookup_tokens += known
            self.lookup_blocks += min(int(self.req.num_keys[rid]), known // self.kv.block_size)
            self.hit_tokens += hit.tokens
            self.hit_blocks += hit.blocks
            self.host_hit_blocks += hit.host
            self.swap_in_blocks += hit.host  # loaded back from the host tier in this step
            self.kv.apply_hit(rid, hit)
            self.req.computed[rid] = hit.tokens
            self.req.cached_tokens[rid] += hit.tokens
        self.kv.grow_to(rid, kv_tokens)
        self.start(rid)
        return rid

    # ---- transitions of disaggregation (`sim.disagg`) ------------------------------------------------------
    def hand_off(self, rids: list[int]) -> None:
        """Requests whose prefill ended on this (prefill) instance leave it for a decode instance: they stop
        running here; their KV stays until it has arrived there (`release_handed`)."""
        gone = set(rids)
        self.running = [rid for rid in self.running if rid not in gone]

    def release_handed(self, rid: int) -> None:
        """A handed-off request's KV has arrived at its decode instance: free its blocks here."""
        self.kv.release(rid)

    def receive(self, rid: int) -> None:
        """A request handed off by a prefill instance, its KV arrived, decodes on this instance from now on."""
        self.running.append(rid)

    def preempt(self, rid: int) -> None:
        """Put a running request back at the head of the waiting queue: its KV swapped out to host memory
        (`preemption` swap, when the swap space has room) or dropped, to be recomputed."""
        self.running.remove(rid)
        self.unforked -= self.req.width(rid) - 1
        moved = self.kv.swap_out(rid) if self.preemption == "swap" else 0
        if moved:
            self.swap_out_blocks += moved
            self.swaps += 1
        else:
            self.kv.release(rid)
            self.req.computed[rid] = 0
        self.req.preemptions[rid] += 1
        self.preemptions += 1
        self.req.status[rid] = Status.WAITING
        self.waiting.appendleft(rid)

    def with_swaps(self, batch: Batch) -> Batch:
        """`batch` carrying the KV copied to or from host memory since the last step (its time is priced with
        the step's)."""
        if not (self.swap_in_blocks or self.swap_out_blocks):
            return batch
        bs = self.kv.block_size
        batch = replace(batch, swap_in_tokens=self.swap_in_blocks * bs, swap_out_tokens=self.swap_out_blocks * bs)
        self.swap_in_blocks = self.swap_out_blocks = 0
        return batch

    def reject_too_wide(self, max_seqs: int) -> bool:
        """Reject the waiting head when it is a fan-out of more samples than `max_seqs` (it could never run)."""
        width = self.req.width(self.waiting[0])
        if width <= max_seqs:
            return False
        self.reject_head("exceeds_max_num_seqs", f"{width} fan-out samples exceed max_num_seqs={max_seqs}")
        return True

    def reject_head(self, code: str, reason: str) -> None:
        """Reject the request at the head of the waiting queue (it can never run under this policy)."""
        rid = self.waiting.popleft()
        self.kv.swap_in(rid)  # (its host copy is dropped)
        self.req.reject(rid, code, reason)

    # ---- the outcome of a step (applied by whichever engine drives the clock) ---------------------------
    def complete_step(self, batch: Batch, end_time: float, accepted: np.ndarray | None = None) -> StepResult:
        """Advance every request of `batch` by the tokens it ran; emit, finish and free as due. A verifying
        request keeps the KV of its newest token and its accepted drafts (`accepted`: the executor's outcome,
        one count per verification), emits them plus the target's next token at `end_time`, capped at its output length,
        and gives back the blocks of its rejected drafts."""
        if batch.verify_ids.size and accepted is None:
            raise ValueError("a step with verifications completes with the drafts its executor accepted")
        r = self.req
        pre = batch.prefill_ids if not batch.prefill_partial else batch.prefill_ids[:0]  # layered: not done yet
        if pre.size:
            r.computed[pre] += batch.prefill_tokens
        if batch.decode_ids.size:
            r.computed[batch.decode_ids] += 1
        ids = np.concatenate([pre, batch.decode_ids]) if pre.size else batch.decode_ids
        if self.kv.cache is not None:
            before = batch.prefill_computed[:pre.size]
            self.kv.register_computed(ids, np.concatenate([before, batch.decode_computed]))
        emitted = ids[r.computed[ids] == r.prompt[ids] + r.generated[ids]]
        gen = r.generated[emitted]
        r.token_time[r.token_offset[emitted] + gen] = end_time
        first = emitted[gen == 0]
        r.first_token[first] = end_time
        gen += 1
        r.generated[emitted] = gen
        forks = first[r.fanout[first] > 0]
        if forks.size:
            emitted = np.concatenate([emitted, self._fork(forks, end_time)])
        if batch.verify_ids.size:
            emitted = np.concatenate([emitted, self._complete_verify(batch, end_time, accepted)])
        finished = emitted[r.generated[emitted] == r.output[emitted]]
        if finished.size:
            r.status[finished] = Status.FINISHED
            r.finish[finished] = end_time
            self.kv.release(finished)
            if r.on_done is not None:
                for rid in finished.tolist():
                    r.on_done(rid)
            done = set(finished.tolist())
            groups = r.group[finished]
            if (groups >= 0).any():
                done |= self._count_finished(groups[groups >= 0], end_time)
            self.running = [rid for rid in self.running if rid not in done]
        return StepResult(emitted=emitted, finished=finished)

    def _fork(self, firsts: np.ndarray, end_time: float) -> np.ndarray:
        """Fan-out prompts just computed: their other samples join the running list after them, holding the
        prompt's KV (shared) and the first token, sampled from the same logits; returns the samples."""
        r, out = self.req, []
        for first in firsts.tolist():
            samples = list(r.siblings(first))
            ids = np.array(samples, dtype=np.int64)
            self.unforked -= len(samples)
            r.status[ids] = Status.RUNNING
            r.replica[ids] = self.index
            r.first_scheduled[ids] = r.first_scheduled[first]
            r.computed[ids] = r.computed[first]
            r.generated[ids] = 1
            r.token_time[r.token_offset[ids]] = end_time
            r.first_token[ids] = end_time
            self.kv.fork(first, samples, int(r.computed[first]))
            at = self.running.index(first) + 1
            self.running[at:at] = samples
            out.append(ids)
        return np.concatenate(out)

    def _count_finished(self, groups: np.ndarray, end_time: float) -> set[int]:
        """Count finished fan-out samples per group; a group that reaches its `finish_after` cancels its other
        samples (running ones free their KV, preempted ones leave the waiting queue). Returns those
        cancelled that were running."""
        r, cancelled = self.req, set()
        firsts, counts = np.unique(groups, return_counts=True)
        before = r.group_finished[firsts]
        r.group_finished[firsts] = before + counts
        for first, was, now in zip(firsts.tolist(), before.tolist(), (before + counts).tolist()):
            if not was < r.finish_after[first] <= now:  # (samples finishing in one step all count)
                continue
            for rid in (first, *r.siblings(first)):
                if r.status[rid] == Status.RUNNING:
                    cancelled.add(rid)
                    self.kv.release(rid)
                elif r.status[rid] == Status.WAITING:
                    self.waiting.remove(rid)
                    self.kv.swap_in(rid)  # (its host copy, if swapped, is dropped)
                else:
                    continue
                r.status[rid] = Status.CANCELLED
                r.finish[rid] = end_time
                if r.on_done is not None:
                    r.on_done(rid)
        return cancelled

    def _complete_verify(self, batch: Batch, end_time: float, accepted: np.ndarray) -> np.ndarray:
        r, v = self.req, batch.verify_ids
        acc = np.minimum(accepted, batch.verify_drafts)
        n = np.minimum(acc + 1, r.output[v] - r.generated[v])  # never more tokens than the output length
        start = np.repeat(r.token_offset[v] + r.generated[v] - np.cumsum(n) + n, n)
        r.token_time[start + np.arange(int(n.sum()))] = end_time
        r.computed[v] += n
        r.generated[v] += n
        self.kv.shrink_to(v, r.computed[v])
        return v
