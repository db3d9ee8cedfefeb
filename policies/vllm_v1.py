"""`vllm_v1`: the unified scheduler of vLLM's V1 engine (behaviour of vLLM v0.10's `Scheduler.schedule`).

Kwon et al., "Efficient Memory Management for Large Language Model Serving with PagedAttention", SOSP 2023,
and the V1 engine design (vLLM blog, January 2025). There is no prefill or decode phase: each request has
tokens not yet computed (its prompt, a chunk of it, or its newest token), and one token budget per step
is spent on them. Running requests come first, in order, each capped by `long_prefill_token_threshold`
when set; when KV blocks run out, the most recently started running request is preempted (recompute),
repeatedly. Waiting requests are admitted FCFS, in chunks that fit the remaining budget, only on steps
that preempted nothing. No watermark.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt

from policies.base import Scheduler, SchedulerParams
from policies.batch import Batch
from policies.chunked import admit_chunks, assemble, plan_running
from policies.state import ReplicaState


class VllmV1Params(SchedulerParams):
    name: Literal["vllm_v1"] = "vllm_v1"
    max_num_batched_tokens: PositiveInt = Field(8192, description="tokens per step, prefill and decode alike")
    max_num_seqs: PositiveInt = Field(256, description="requests running at once")
    long_prefill_token_threshold: NonNegativeInt = Field(0, description="cap on one request's tokens per step "
                                                                        "(0: no cap)")

    def step_limits(self, max_model_len: int) -> tuple[int, int]:
        return self.max_num_batched_tokens, self.max_num_seqs


class VllmV1Scheduler(Scheduler):
    params: VllmV1Params
    decode_stretches = True

    def schedule(self, state: ReplicaState) -> Batch | None:
        p = self.params
        cap = p.long_prefill_token_threshold or None
        ids, tokens, preempted = plan_running(state, np.array(state.running, dtype=np.int64),
                                              p.max_num_batched_tokens, cap)
        admitted: tuple[list[int], list[int]] = ([], [])
        if not preempted:  # V1 admits waiting requests only on steps that preempted nothing
            admitted = admit_chunks(state, p.max_num_batched_tokens - int(tokens.sum()), p.max_num_seqs, cap,
                                    watermark=False)
        return assemble(state, ids, tokens, admitted, preempted, lambda: self.schedule(state))
