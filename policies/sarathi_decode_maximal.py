"""`sarathi_decode_maximal`: the original SARATHI's decode-maximal batching.

Agrawal et al., "SARATHI: Efficient LLM Inference by Piggybacking Decodes with Chunked Prefills", 2023
(arXiv:2308.16369). Each step runs exactly one prefill chunk of `chunk_size` tokens (the ongoing prefill,
else the next waiting request) with every running decode piggybacked on it, up to `max_num_seqs`
requests; without a prompt to prefill, a step is decode-only. KV blocks as in `sarathi`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from policies.base import Scheduler, SchedulerParams
from policies.batch import Batch
from policies.chunked import admit_chunks, assemble, is_decoding, plan_running
from policies.state import ReplicaState


class SarathiDecodeMaximalParams(SchedulerParams):
    name: Literal["sarathi_decode_maximal"] = "sarathi_decode_maximal"
    chunk_size: PositiveInt = Field(256, description="prefill tokens per step")
    max_num_seqs: PositiveInt = Field(256, description="requests running at once")
    watermark: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of KV blocks kept free when admitting")

    def step_limits(self, max_model_len: int) -> tuple[int, int]:
        return self.chunk_size + self.max_num_seqs, self.max_num_seqs

    def kv_watermark(self) -> float:
        return self.watermark


class SarathiDecodeMaximalScheduler(Scheduler):
    params: SarathiDecodeMaximalParams
    decode_stretches = True

    def schedule(self, state: ReplicaState) -> Batch | None:
        p = self.params
        running = np.array(state.running, dtype=np.int64)
        decoding = is_decoding(state, running)
        decodes, prefilling = running[decoding], running[~decoding]
        order = np.concatenate([decodes, prefilling[:1]])  # every decode plus one ongoing prefill
        ids, tokens, preempted = plan_running(state, order, decodes.size + p.chunk_size, p.chunk_size)
        admitted: tuple[list[int], list[int]] = ([], [])
        if not preempted and not prefilling.size:  # no ongoing prefill: the next waiting request gives the chunk
            admitted = admit_chunks(state, p.chunk_size, p.max_num_seqs, p.chunk_size, limit=1)
        return assemble(state, ids, tokens, admitted, preempted, lambda: self.schedule(state))
