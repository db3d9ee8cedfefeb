"""Shared steps of the chunked-prefill schedulers: plan running requests under a token budget, admit
waiting ones in chunks, and split the result into a `Batch` (prefill chunks and decodes)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from policies.batch import Batch
from policies.state import ReplicaState, Status


def is_decoding(state: ReplicaState, ids: np.ndarray) -> np.ndarray:
    """Requests whose next step runs just their newest sampled token."""
    return (state.tokens_to_run(ids) == 1) & (state.req.generated[ids] > 0)


def plan_running(state: ReplicaState, order: np.ndarray, budget: int, cap: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Give running requests, in priority `order`, up to min(remaining, cap) tokens each while `budget`
    lasts, and allocate their KV blocks. When blocks run out, preempt the lowest-priority running request
    not yet planned (the tail of the running list), as vLLM does; when none is left, the request itself is
    preempted and the planning ends. Returns (ids, tokens, whether anything was preempted)."""
    r, kv = state.req, state.kv
    want = state.tokens_to_run(order)
    if cap:
        want = np.minimum(want, cap)
    tokens = np.minimum(np.maximum(budget - (np.cumsum(want) - want), 0), want)  # (np.clip, without its overhead)
    ids, tokens = order[tokens > 0], tokens[tokens > 0]
    if kv.grow_many(ids, r.computed[ids] + tokens):
        return ids, tokens, False
    planned: list[int] = []
    planned_tokens: list[int] = []
    preempted = False
    for rid, n in zip(ids.tolist(), tokens.tolist()):
        if r.status[rid] != Status.RUNNING:  # preempted as a victim already
            continue
        need = int(kv.blocks_for(int(r.computed[rid]) + n)) - int(kv.blocks[rid])
        while not kv.can_allocate(need, watermark=False):
            done = set(planned) | {rid}
            victim = next((v for v in reversed(state.running) if v not in done), rid)
            state.preempt(victim)
            preempted = True
            if victim == rid:
                break
        if r.status[rid] != Status.RUNNING:
            break  # it could not fit even with every later request preempted: it waits (or is rejected)
        kv.grow_to(rid, int(r.computed[rid]) + n)
        planned.append(rid)
        planned_tokens.append(n)
    return np.array(planned, dtype=np.int64), np.array(planned_tokens, dtype=np.int64), preempted


def admit_chunks(state: ReplicaState, budget: int, max_seqs: int, cap: int | None = None, watermark: bool = True,
                 limit: int | None = None) -> tuple[list[int], list[int]]:
    """Admit waiting requests FCFS, each with a first chunk of up to min(remaining, cap, budget left)
    tokens after its cached prefix, while blocks (above the watermark) and `max_seqs` allow; at most
    `limit` requests. Returns (ids, chunk tokens)."""
    kv = state.kv
    ids: list[int] = []
    tokens: list[int] = []
    while state.waiting and budget > 0 and (limit is None or len(ids) < limit):
        rid = state.waiting[0]
        if state.reject_too_wide(max_seqs):
            continue
        if state.seqs + state.req.width(rid) > max_seqs:
            break
        known = state.known_tokens(rid)
        if kv.blocks_for(known) > kv.num_blocks - kv.watermark_blocks:
            state.reject_head("exceeds_kv_capacity", f"prompt of {known} tokens needs {kv.blocks_for(known)} KV "
                                                     f"blocks; the replica has {kv.num_blocks}")
            continue
        hit = state.prefix_hit(rid)
        n = min(known - hit.tokens, cap or known, budget)
        if not kv.can_allocate(kv.admission_blocks(hit, hit.tokens + n), watermark=watermark):
            break
        ids.append(state.admit_head(hit.tokens + n, hit))
        tokens.append(n)
        budget -= n
    return ids, tokens


def assemble(state: ReplicaState, ids: np.ndarray, tokens: np.ndarray, admitted: tuple[list[int], list[int]],
             preempted: bool, again: Callable[[], Batch | None]) -> Batch | None:
    """The batch of the planned running requests and the admitted ones; when preempting left nothing to
    run, the preempted requests are waiting again, so `again()` plans the step anew."""
    ids = np.concatenate([ids, np.array(admitted[0], dtype=np.int64)])
    tokens = np.concatenate([tokens, np.array(admitted[1], dtype=np.int64)])
    batch = make_batch(state, ids, tokens)
    return batch if batch is not None or not preempted else again()


def make_batch(state: ReplicaState, ids: np.ndarray, tokens: np.ndarray) -> Batch | None:
    """The batch running `tokens[i]` tokens of each `ids[i]`, decodes separated from prefill chunks."""
    if not ids.size:
        return None
    r = state.req
    dec = (tokens == 1) & is_decoding(state, ids)
    pre = ~dec
    return Batch(prefill_ids=ids[pre], prefill_tokens=tokens[pre], prefill_computed=r.computed[ids[pre]],
                 decode_ids=ids[dec], decode_computed=r.computed[ids[dec]])
