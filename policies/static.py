"""`static`: request-level batching, as a server around plain Hugging Face `generate` does.

The baseline of Yu et al. (Orca, OSDI 2022) and of the vLLM paper: take up to `batch_size` waiting
requests, pad their prompts to the longest, prefill them together, then decode the whole batch until its
longest request ends; finished rows keep being computed (padding) and no request joins mid-way. KV for a
request's full length is reserved when the batch forms, so a batch never runs out of memory.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from policies.base import Scheduler, SchedulerParams
from policies.batch import Batch
from policies.state import ReplicaState, Status


class StaticParams(SchedulerParams):
    name: Literal["static"] = "static"
    batch_size: PositiveInt = Field(16, description="requests per batch")


    def step_limits(self, max_model_len: int) -> tuple[int, int]:
        return self.batch_size * max_model_len, self.batch_size


class StaticScheduler(Scheduler):
    params: StaticParams

    def __init__(self, params: StaticParams) -> None:
        super().__init__(params)
        self.active: np.ndarray = np.zeros(0, dtype=np.int64)

    def schedule(self, state: ReplicaState) -> Batch | None:
        r, kv = state.req, state.kv
        live = self.active[r.status[self.active] == Status.RUNNING]
        if live.size:
            return Batch(decode_ids=live, decode_computed=r.computed[live], pad_rows=self.active.size - live.size)
        ids: list[int] = []
        while state.waiting and len(ids) < self.params.batch_size:
            rid = state.waiting[0]
            total = state.total_tokens(rid)
            need = int(kv.blocks_for(total))
            if need > kv.num_blocks:
                state.reject_head("exceeds_kv_capacity",
                                  f"request of {total} tokens needs {need} KV blocks; the replica has {kv.num_blocks}")
                continue
            if not kv.can_allocate(need, watermark=False):
                break
            ids.append(state.admit_head(total))
        self.active = np.array(ids, dtype=np.int64)
        if not ids:
            return None
        prompts = r.prompt[self.active]
        return Batch.make(ids, prompts, pad_prefill_to=int(prompts.max()))
