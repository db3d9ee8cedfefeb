"""`vllm`: continuous batching over a paged KV cache, prefill-prioritised (vLLM V0's default scheduler).

Kwon et al., "Efficient Memory Management for Large Language Model Serving with PagedAttention", SOSP 2023.
Behaviour follows vLLM v0.6's V0 scheduler with chunked prefill off: each step is either a prefill of as
many waiting requests (FCFS) as fit the token budget, `max_num_seqs` and the free KV blocks minus a
watermark, or, when none can start, a decode step of every running request. A decode that needs a new
block when none is free preempts the most recently started request (recompute: its KV is dropped and it
returns to the head of the waiting queue), repeatedly, until the rest fit.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from policies.base import Scheduler, SchedulerParams
from policies.batch import Batch
from policies.state import ReplicaState


class VllmParams(SchedulerParams):
    name: Literal["vllm"] = "vllm"
    max_num_seqs: PositiveInt = Field(256, description="requests running at once")
    max_num_batched_tokens: PositiveInt | None = Field(
        None, description="prefill tokens per step; default max(max_model_len, 2048) as in vLLM without chunking")
    watermark: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of KV blocks kept free when admitting")


    def step_limits(self, max_model_len: int) -> tuple[int, int]:
        return self.max_num_batched_tokens or max(max_model_len, 2048), self.max_num_seqs

    def kv_watermark(self) -> float:
        return self.watermark


class VllmScheduler(Scheduler):
    params: VllmParams
    decode_stretches = True

    def token_budget(self, state: ReplicaState) -> int:
        return self.params.step_limits(state.max_model_len)[0]

    def schedule(self, state: ReplicaState) -> Batch | None:
        # When the decodes preempt every running request, those go back to the waiting queue: try them again.
        return self._schedule_prefills(state) or self._schedule_decodes(state) or self._schedule_prefills(state)

    def _schedule_prefills(self, state: ReplicaState) -> Batch | None:
        kv, limit = state.kv, self.token_budget(state)
        budget, seqs = limit, state.seqs
        ids: list[int] = []
        tokens: list[int] = []
        computed: list[int] = []
        while state.waiting:
            rid = state.waiting[0]
            if state.reject_too_wide(self.params.max_num_seqs):
                continue
            width = state.req.width(rid)
            if seqs + width > self.params.max_num_seqs:
                break
            hit = state.prefix_hit(rid)
            known = state.known_tokens(rid)
            n = known - hit.tokens
            if known > limit:
                state.reject_head("exceeds_token_budget", f"prompt of {known} tokens exceeds "
                                                          f"max_num_batched_tokens={limit} (no chunked prefill)")
                continue
            if kv.blocks_for(known) > kv.num_blocks - kv.watermark_blocks:
                state.reject_head("exceeds_kv_capacity", f"prompt of {known} tokens needs {kv.blocks_for(known)} "
                                                         f"KV blocks; the replica has {kv.num_blocks}")
                continue
            if n > budget or not kv.can_allocate(kv.admission_blocks(hit, known)):
                break
            ids.append(state.admit_head(known, hit))
            tokens.append(n)
            computed.append(hit.tokens)
            budget -= n
            seqs += width
        return Batch.make(ids, tokens, computed) if ids else None

    def _schedule_decodes(self, state: ReplicaState) -> Batch | None:
        r, kv = state.req, state.kv
        while state.running:
            run = np.array(state.running, dtype=np.int64)
            if kv.grow_many(run, r.computed[run] + 1):
                return Batch(decode_ids=run, decode_computed=r.computed[run])
            state.preempt(state.running[-1])
        return None
