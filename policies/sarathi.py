"""`sarathi`: Sarathi-Serve's stall-free batching with chunked prefills.

Agrawal et al., "Taming Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve", OSDI 2024.
Each step has a token budget. Ongoing decodes are scheduled first (one token each), then the next chunks
of partially prefilled requests, then new requests, every prefill cut to fit what is left of the budget:
decodes never wait behind a long prompt, and a step's duration stays bounded by the budget. Decodes that
need KV blocks when none are free preempt the most recently started request (recompute); new requests
are admitted above a watermark of free blocks and only on steps that preempted nothing.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from policies.base import Scheduler, SchedulerParams
from policies.batch import Batch
from policies.chunked import admit_chunks, assemble, is_decoding, plan_running
from policies.state import ReplicaState


class SarathiParams(SchedulerParams):
    name: Literal["sarathi"] = "sarathi"
    token_budget: PositiveInt = Field(512, description="tokens per step (decodes plus prefill chunks)")
    max_num_seqs: PositiveInt = Field(256, description="requests running at once")
    watermark: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of KV blocks kept free when admitting")

    def step_limits(self, max_model_len: int) -> tuple[int, int]:
        return self.token_budget, self.max_num_seqs

    def kv_watermark(self) -> float:
        return self.watermark


class SarathiScheduler(Scheduler):
    params: SarathiParams
    decode_stretches = True

    def schedule(self, state: ReplicaState) -> Batch | None:
        p = self.params
        running = np.array(state.running, dtype=np.int64)
        decoding = is_decoding(state, running)
        order = np.concatenate([running[decoding], running[~decoding]])  # decodes, then ongoing prefills
        ids, tokens, preempted = plan_running(state, order, p.token_budget)
        admitted = ([], []) if preempted else admit_chunks(state, p.token_budget - int(tokens.sum()), p.max_num_seqs)
        return assemble(state, ids, tokens, admitted, preempted, lambda: self.schedule(state))
