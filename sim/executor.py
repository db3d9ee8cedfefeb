"""The executor contract (`run(batch) -> StepOutcome`) and the cost-model executor of the simulator.

The real GPU executor (backend/) implements the same `run`, so the engine and the policies are unchanged
between simulating and replaying on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from hardware.cost import CostModel, StepCost
from hardware.operators import StepShape
from policies.batch import Batch

if TYPE_CHECKING:
    from policies.acceptance import Acceptance
    from sim.speculation import DraftCost


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """How long a step took, and what the hardware did in it (NaN where the executor cannot tell)."""

    seconds: float
    mfu: float = float("nan")
    mbu: float = float("nan")
    execution: str = "eager"
    gpu_seconds: float = float("nan")  # device time alone (CUDA events), where a real executor measures it
    draft_seconds: float = 0.0  # speculation: the draft's share of `seconds`
    accepted: np.ndarray | None = None  # speculation: drafts accepted per verifying request (None: no verification)


class Executor(Protocol):
    def run(self, batch: Batch) -> StepOutcome: ...


class CostModelExecutor:
    """Prices each batch with the roofline `CostModel` (padding of request-level batching included), plus
    the speculative draft's time when a `DraftCost` is given; verifications accept the drafts that
    `acceptance` draws."""

    def __init__(self, cost_model: CostModel, draft: DraftCost | None = None,
                 acceptance: Acceptance | None = None) -> None:
        self.cost_model = cost_model
        self.draft = draft
        self.acceptance = acceptance

    def price(self, shape: StepShape) -> tuple[StepCost, float]:
        """The target's cost of a step of this shape and the draft's seconds in it."""
        return self.cost_model.price(shape), self.draft.seconds(shape) if self.draft is not None else 0.0

    def run(self, batch: Batch) -> StepOutcome:
        cost, draft = self.price(batch.shape())
        out = self._layered(batch, cost) if batch.prefill_layers < 1.0 else \
            StepOutcome(seconds=cost.seconds + draft, mfu=cost.mfu, mbu=cost.mbu, execution=cost.execution,
                        draft_seconds=draft)
        if batch.swap_in_tokens or batch.swap_out_tokens:  # the copies run before the forward pass
            extra = self.cost_model.swap_seconds(batch.swap_in_tokens + batch.swap_out_tokens)
            out = replace(out, seconds=out.seconds + extra, mfu=out.mfu * out.seconds / (out.seconds + extra),
                          mbu=out.mbu * out.seconds / (out.seconds + extra))
        if batch.verify_ids.size:
            if self.acceptance is None:
                raise ValueError("a batch with verifications needs the executor's acceptance model")
            out = replace(out, accepted=self.acceptance.sample(batch))
        return out

    def _layered(self, batch: Batch, cost: StepCost) -> StepOutcome:
        """A layered-prefill step: its layers' work is the share `prefill_layers` of the whole step (prefill
        chunks and decodes) plus the rest of the decodes alone; the once-per-step costs (embedding, LM head,
        host overhead) are weighted the same way between the two."""
        share = batch.prefill_layers
        full = (share * cost.seconds, share * cost.seconds * cost.mfu, share * cost.seconds * cost.mbu)
        rest = (1 - share) * cost.overhead_seconds, 0.0, 0.0
        if batch.decode_ids.size:
            alone = self.cost_model.price(replace(batch, prefill_ids=batch.prefill_ids[:0],
                                                  prefill_tokens=batch.prefill_tokens[:0],
                                                  prefill_computed=batch.prefill_computed[:0]).shape())
            rest = tuple((1 - share) * alone.seconds * v for v in (1.0, alone.mfu, alone.mbu))
        seconds = full[0] + rest[0]
        return StepOutcome(seconds=seconds, execution=cost.execution, mfu=(full[1] + rest[1]) / seconds,
                           mbu=(full[2] + rest[2]) / seconds)


class FixedCostExecutor:
    """A step costs `base_s + per_token_s * tokens`: for hand-checkable tests and policy studies."""

    def __init__(self, base_s: float, per_token_s: float = 0.0) -> None:
        self.base_s = base_s
        self.per_token_s = per_token_s

    def run(self, batch: Batch) -> StepOutcome:
        return StepOutcome(seconds=self.base_s + self.per_token_s * batch.num_tokens)
