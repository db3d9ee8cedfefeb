"""`layered_prefill`: stall-free batching that splits prefills by layers instead of by tokens.

"From Tokens to Layers: Redefining Stall-Free Scheduling for LLM Serving with Layered Prefill" (arXiv
2510.08055, 2025). The decoder layers are split into `layer_groups` groups; a cohort of prompts (whole, up to
`max_prefill_tokens` tokens together) runs through one group per step, beside every running decode through all
layers, so its first token comes after `layer_groups` steps. A step's extra prefill work stays bounded as
with chunked prefill, but each layer's weights (an MoE layer's experts above all) are read once per prompt
instead of once per chunk. A prompt longer than `max_prefill_tokens` is cut into chunks of that size, each
of which passes through the groups in turn. Decodes that need KV blocks when none are free preempt the most
recently started request (recompute); a cohort member that is preempted leaves its cohort.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt

from policies.base import Scheduler, SchedulerParams
from policies.batch import Batch
from policies.chunked import admit_chunks, is_decoding, plan_running
from policies.state import ReplicaState, Status


class LayeredPrefillParams(SchedulerParams):
    name: Literal["layered_prefill"] = "layered_prefill"
    layer_groups: PositiveInt = Field(4, description="groups of decoder layers a prefill passes through, one per "
                                      "step")
    max_prefill_tokens: PositiveInt = Field(8192, description="prompt tokens of one cohort (longer prompts are "
                                            "cut into chunks of this size)")
    max_num_seqs: PositiveInt = Field(256, description="requests running at once")
    watermark: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of KV blocks kept free when admitting")

    def step_limits(self, max_model_len: int) -> tuple[int, int]:
        return self.max_prefill_tokens + self.max_num_seqs, self.max_num_seqs

    def kv_watermark(self) -> float:
        return self.watermark


class LayeredPrefillScheduler(Scheduler):
    params: LayeredPrefillParams
    decode_stretches = True

    def __init__(self, params: SchedulerParams) -> None:
        super().__init__(params)
        self.cohort = np.zeros(0, dtype=np.int64)  # requests whose chunk is passing through the layer groups
        self.chunk = np.zeros(0, dtype=np.int64)  # their chunk's tokens
        self.group = 0  # the group the cohort runs through next

    def schedule(self, state: ReplicaState) -> Batch | None:
        p, r = self.params, state.req
        running = np.array(state.running, dtype=np.int64)
        in_cohort = np.isin(running, self.cohort)
        decoding = running[~in_cohort & is_decoding(state, running)]
        ids, _, preempted = plan_running(state, decoding, decoding.size)
        keep = r.status[self.cohort] == Status.RUNNING  # a preempted member leaves (its KV is gone)
        self.cohort, self.chunk = self.cohort[keep], self.chunk[keep]
        if not self.cohort.size:
            self._form_cohort(state, preempted)
            ids = ids[r.status[ids] == Status.RUNNING]  # (planning the cohort may preempt a planned decode)
        if not self.cohort.size and not ids.size:
            return self.schedule(state) if preempted and state.running else None
        last = self.group == p.layer_groups - 1
        batch = Batch(prefill_ids=self.cohort, prefill_tokens=self.chunk, prefill_computed=r.computed[self.cohort],
                      decode_ids=ids, decode_computed=r.computed[ids],
                      prefill_layers=1.0 / p.layer_groups if self.cohort.size else 1.0,
                      prefill_partial=bool(self.cohort.size) and not last)
        if self.cohort.size:
            self.group += 1
            if last:
                self.cohort, self.chunk, self.group = self.cohort[:0], self.chunk[:0], 0
        return batch

    def _form_cohort(self, state: ReplicaState, preempted: bool) -> None:
        """The next cohort: the next chunks of running requests still prefilling, else waiting requests
        admitted FCFS (none on a step that preempted) within `max_prefill_tokens`; their KV blocks are taken
        now, for the whole chunk."""
        p = self.params
        running = np.array(state.running, dtype=np.int64)
        prefilling = running[~is_decoding(state, running)]
        ids, tokens, _ = plan_running(state, prefilling, p.max_prefill_tokens)
        if not ids.size and not preempted:
            admitted = admit_chunks(state, p.max_prefill_tokens, p.max_num_seqs)
            ids, tokens = np.array(admitted[0], dtype=np.int64), np.array(admitted[1], dtype=np.int64)
        self.cohort, self.chunk, self.group = ids, tokens, 0
