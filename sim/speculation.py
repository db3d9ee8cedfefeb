"""What speculation costs in simulation: the draft's time per step and its memory.

- A draft model (`DraftModel`) runs on the target's GPUs with the target's TP (TP 1 when its heads do not
  divide): it prefills every prompt chunk the target prefills (it needs its own KV of the context), and
  before each verification runs max k_i autoregressive steps, step j over the requests with k_i > j at
  context + j (padded batches: every request, max k steps); its first step takes the tokens it has not
  cached (`StepShape.draft_feed`: 2 after a chain whose drafts were all accepted), a chunk where any is 2;
  its later steps take the step before's proposals on the device, so in a CUDA graph their host work runs
  while the GPU runs the step before (priced at the longer of the two, not their sum).
  With `kv_window` it attends to the last `kv_window` tokens only (a sliding window: MagicDec's
  StreamingLLM draft), and its KV memory is that window for `max_num_seqs` requests.
- Draft heads (`DraftHeads`) are `layers` decoder layers of the target's shape with its LM head: EAGLE-style
  (`sequential`) they prefill the chunks and run k steps like a draft model; Medusa-style they run once
  per verification over k tokens per request (one pass of the heads, priced as a k-token chunk).
- Prompt lookup costs nothing.
The draft's weights (heads: their layers only, the LM head is shared) and KV per token come out of the
target's KV cache, so speculation leaves fewer KV blocks.
"""

from __future__ import annotations

import numpy as np

from hardware.catalog import get_model
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.operators import StepShape
from hardware.specs import DTYPE_BYTES
from policies.speculation import DraftHeads, DraftModel, SpeculationConfig


def draft_deployment(target: Deployment, config: SpeculationConfig) -> Deployment | None:
    """The deployment the draft is priced on (None for prompt lookup)."""
    d = config.draft
    if isinstance(d, DraftModel):
        spec = get_model(d.model)
        if d.kv_window is not None:
            spec = spec.model_copy(update={"sliding_window": d.kv_window})
        tp = target.tp if spec.num_attention_heads % target.tp == 0 and (
            spec.num_key_value_heads >= target.tp and spec.num_key_value_heads % target.tp == 0
            or target.tp % spec.num_key_value_heads == 0) else 1
    elif isinstance(d, DraftHeads):
        spec = target.model.model_copy(update={"num_hidden_layers": d.layers, "id": f"{target.model.id}-heads"})
        tp = target.tp
    else:
        return None
    return Deployment.build(spec, target.gpu, tp=tp, link=target.tp_link.id, weight_dtype=target.weight_dtype,
                            kv_dtype=target.kv_dtype, kv_access=target.kv_access,
                            elementwise=target.elementwise,
                            max_num_batched_tokens=target.max_num_batched_tokens,
                            max_num_seqs=target.max_num_seqs, max_model_len=min(target.context_limit,
                                                                                spec.max_position_embeddings))


def draft_memory(target: Deployment, config: SpeculationConfig) -> tuple[float, float]:
    """(weight bytes, KV bytes per token) per GPU that the draft takes from the target's KV cache."""
    dep = draft_deployment(target, config)
    if dep is None:
        return 0.0, 0.0
    if isinstance(config.draft, DraftHeads):
        weights = config.draft.layers * dep.layer_params_per_gpu() * DTYPE_BYTES[dep.weight_dtype]
        return weights, config.draft.layers * dep.kv_bytes_per_token_per_layer()
    window = getattr(config.draft, "kv_window", None)
    if window is not None:  # a bounded KV per running request, reserved for the largest batch
        return dep.memory.weights + window * dep.memory.kv_bytes_per_token * target.max_num_seqs, 0.0
    return dep.memory.weights, dep.memory.kv_bytes_per_token


class DraftCost:
    """Seconds the draft spends in one step of a batch."""

    def __init__(self, target: Deployment, config: SpeculationConfig, cost_model: CostModel | None = None) -> None:
        self.config = config
        dep = draft_deployment(target, config)
        self.model = None if dep is None else (cost_model or CostModel(dep))
        self.sequential = not isinstance(config.draft, DraftHeads) or config.draft.sequential

    def seconds(self, shape: StepShape) -> float:
        """The draft's time in a step of this shape (verifications already padded when the batch pads).
        Token trees (`shape.verify_levels`: nodes per depth) take one draft step per level: step j runs the
        nodes of depth j - 1 (the root first) to propose depth j. The first step takes the tokens the draft
        has not cached (`shape.draft_feed`, one each when omitted) after the tokens it has. Steps of more than
        one token per request attend as verifications do, in the decode kernel (`backend.speculative`), and
        are priced as verifications (every row's logits: the LM head's weight read dominates either way)."""
        if self.model is None:
            return 0.0
        total = 0.0
        if shape.prefill_tokens.size and self.sequential:
            total += self.model.price(StepShape(prefill_tokens=shape.prefill_tokens,
                                                prefill_cached=shape.prefill_cached)).seconds
        if not shape.verify_tokens.size:
            return total
        ks, context = shape.verify_tokens - 1, shape.verify_context
        if not self.sequential:
            return total + self.model.price(StepShape(verify_tokens=ks, verify_context=np.zeros_like(ks))).seconds
        levels, chain = shape.verify_levels, shape.verify_levels is None
        if chain:  # a chain of k_i: k_i steps of one token
            levels = (np.arange(int(ks.max()))[None, :] < ks[:, None]).astype(np.int64)
        feed = np.ones_like(ks) if shape.draft_feed is None else shape.draft_feed
        for j in range(levels.shape[1]):
            live = levels[:, j] > 0
            tokens = feed[live] if j == 0 else levels[live, j - 1]
            ctx = context[live] + j + 1 - tokens if j == 0 else context[live] + j
            if (tokens == 1).all():
                cost = self.model.price(StepShape(decode_context=ctx))
                # a chain's later steps take the last one's proposals on the device: the host prepares
                # each while the GPU runs the one before (as vLLM's proposer), its own time hidden
                hidden = chain and j > 0 and cost.execution == "graph"
                total += max(cost.seconds - cost.overhead_seconds, cost.overhead_seconds) if hidden else cost.seconds
            else:  # catching up after a verification, or a tree's level
                total += self.model.price(StepShape(verify_tokens=tokens, verify_context=ctx)).seconds
        return total
