"""Replica state shared by policies and executors: the request table, queues and paged-KV bookkeeping.

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
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from policies.batch import Batch


class Status(IntEnum):
    PENDING = 0  # not arrived yet
    WAITING = 1
    RUNNING = 2
    FINISHED = 3
    REJECTED = 4


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
        self.token_offset = np.concatenate([[0], np.cumsum(self.output)[:-1]]).astype(np.int64) if n else \
            np.zeros(0, dtype=np.int64)
        self.token_time = np.full(int(self.output.sum()), np.nan)

    def reject(self, rid: int, code: str, reason: str) -> None:
        self.status[rid] = Status.REJECTED
        self.reject_code[rid] = code
        self.reject_reason[rid] = reason


class BlockManager:
    """Paged KV cache of one replica, counted in blocks of `block_size` tokens (vLLM's PagedAttention)."""

    def __init__(self, requests: Requests, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
        self.req = requests
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free = num_blocks
        self.watermark_blocks = int(watermark * num_blocks)

    @property
    def used(self) -> int:
        return self.num_blocks - self.free

    def blocks_for(self, tokens: int | np.ndarray) -> int | np.ndarray:
        return -(-tokens // self.block_size)

    def can_allocate(self, blocks: int, watermark: bool = True) -> bool:
        """Whether `blocks` more fit, keeping the watermark free when asked (vLLM admits new requests so)."""
        return self.free - blocks >= (self.watermark_blocks if watermark else 0)

    def grow_to(self, rid: int, tokens: int) -> int:
        """Give `rid` blocks for `tokens` tokens of KV; returns the blocks added. Caller checks room first."""
        need = int(self.blocks_for(tokens)) - int(self.req.blocks[rid])
        if need > 0:
            if need > self.free:
                raise RuntimeError(f"KV overflow: request {rid} needs {need} blocks, {self.free} free")
            self.req.blocks[rid] += need
            self.free -= need
            return need
        return 0

    def release(self, rid: int | np.ndarray) -> None:
        """Free every block of one request, or of an array of requests."""
        self.free += int(self.req.blocks[rid].sum()) if isinstance(rid, np.ndarray) else int(self.req.blocks[rid])
        self.req.blocks[rid] = 0


@dataclass
class StepResult:
    """What a completed step changed: ids that emitted a token and ids that finished."""

    emitted: np.ndarray
    finished: np.ndarray


class ReplicaState:
    """One replica's queues and KV cache over the shared request table."""

    def __init__(self, index: int, requests: Requests, kv: BlockManager, max_model_len: int) -> None:
        self.index = index
        self.req = requests
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.now = 0.0
        self.preemptions = 0  # preemptions so far on this replica

    # ---- queries policies use ----------------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    def known_tokens(self, rid: int) -> int:
        return int(self.req.prompt[rid] + self.req.generated[rid])

    def tokens_to_run(self, rid: int) -> int:
        return int(self.req.prompt[rid] + self.req.generated[rid] - self.req.computed[rid])

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
        self.running.append(rid)

    def admit_head(self, kv_tokens: int) -> int:
        """Start the head of the waiting queue with KV blocks for `kv_tokens` tokens; returns its id."""
        rid = self.waiting[0]
        self.kv.grow_to(rid, kv_tokens)
        self.start(rid)
        return rid

    def preempt(self, rid: int) -> None:
        """Recompute preemption: drop the KV, put the request back at the head of the waiting queue."""
        self.running.remove(rid)
        self.kv.release(rid)
        self.req.computed[rid] = 0
        self.req.preemptions[rid] += 1
        self.preemptions += 1
        self.req.status[rid] = Status.WAITING
        self.waiting.appendleft(rid)

    def reject_head(self, code: str, reason: str) -> None:
        """Reject the request at the head of the waiting queue (it can never run under this policy)."""
        rid = self.waiting.popleft()
        self.req.reject(rid, code, reason)

    # ---- the outcome of a step (applied by whichever engine drives the clock) ---------------------------
    def complete_step(self, batch: Batch, end_time: float) -> StepResult:
        """Advance every request of `batch` by the tokens it ran; emit, finish and free as due."""
        r = self.req
        if batch.prefill_ids.size:
            r.computed[batch.prefill_ids] += batch.prefill_tokens
        if batch.decode_ids.size:
            r.computed[batch.decode_ids] += 1
        ids = batch.decode_ids if not batch.prefill_ids.size else np.concatenate([batch.prefill_ids, batch.decode_ids])
        emitted = ids[r.computed[ids] == r.prompt[ids] + r.generated[ids]]
        gen = r.generated[emitted]
        r.token_time[r.token_offset[emitted] + gen] = end_time
        first = emitted[gen == 0]
        r.first_token[first] = end_time
        gen += 1
        r.generated[emitted] = gen
        finished = emitted[gen == r.output[emitted]]
        if finished.size:
            r.status[finished] = Status.FINISHED
            r.finish[finished] = end_time
            self.kv.release(finished)
            done = set(finished.tolist())
            self.running = [rid for rid in self.running if rid not in done]
        return StepResult(emitted=emitted, finished=finished)
