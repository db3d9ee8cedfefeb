"""`orca`: iteration-level batching with whole-prompt prefills and KV reserved up front.

Yu et al., "Orca: A Distributed Serving System for Transformer-Based Generative Models", OSDI 2022.
Every step runs one token of every running request together with the whole prompts of newly admitted
ones (selective batching). Orca has no paging: a request is admitted only when a contiguous KV
reservation fits, sized as in the vLLM paper's Orca baselines: `max` (max_model_len tokens), `pow2` (the
next power of two of its true length) or `oracle` (exactly its prompt plus output). Nothing is preempted.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from policies.base import Scheduler, SchedulerParams
from policies.batch import Batch
from policies.state import ReplicaState


class OrcaParams(SchedulerParams):
    name: Literal["orca"] = "orca"
    max_batch_size: PositiveInt = Field(256, description="requests running at once")
    max_num_batched_tokens: PositiveInt | None = Field(None, description="cap on tokens per step (None: no cap)")
    reserve: Literal["max", "pow2", "oracle"] = Field("max", description="KV reserved per request on admission")


    def step_limits(self, max_model_len: int) -> tuple[int, int]:
        return self.max_num_batched_tokens or max(max_model_len, 2048), self.max_batch_size


class OrcaScheduler(Scheduler):
    params: OrcaParams
    decode_stretches = True

    def reservation(self, state: ReplicaState, rid: int) -> int:
        total = state.total_tokens(rid)
        if self.params.reserve == "max":
            return state.max_model_len
        if self.params.reserve == "pow2":
            return min(1 << (total - 1).bit_length(), state.max_model_len)
        return total

    def schedule(self, state: ReplicaState) -> Batch | None:
        r, kv = state.req, state.kv
        decode = np.array(state.running, dtype=np.int64)
        budget = (self.params.max_num_batched_tokens or 1 << 62) - decode.size
        ids: list[int] = []
        tokens: list[int] = []
        while state.waiting and len(state.running) < self.params.max_batch_size:
            rid = state.waiting[0]
            n, reserve = state.tokens_to_run(rid), self.reservation(state, rid)
            need = int(kv.blocks_for(reserve))
            if self.params.max_num_batched_tokens and n > self.params.max_num_batched_tokens:
                state.reject_head("exceeds_token_budget", f"prompt of {n} tokens exceeds max_num_batched_tokens="
                                                          f"{self.params.max_num_batched_tokens} (no chunked prefill)")
                continue
            if need > kv.num_blocks:
                state.reject_head("exceeds_kv_capacity",
                                  f"reservation of {reserve} tokens needs {need} KV blocks; the replica has "
                                  f"{kv.num_blocks}")
                continue
            if n > budget or not kv.can_allocate(need, watermark=False):
                break
            ids.append(state.admit_head(reserve))
            tokens.append(n)
            budget -= n
        if not ids and not decode.size:
            return None
        return Batch.make(ids, tokens, decode_ids=decode, decode_computed=r.computed[decode])
