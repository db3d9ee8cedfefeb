"""The scheduler contract every policy implements, and the base of their parameter models."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from policies.batch import Batch
from policies.state import ReplicaState, StepResult


class SchedulerParams(BaseModel):
    """Parameters of one policy; each policy subclasses this with a `name` literal and documented fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def step_limits(self, max_model_len: int) -> tuple[int, int]:
        """(tokens, requests) one step can hold at most: sizes the activation memory of the deployment; the
        requests are also those the policy runs at once (a disaggregated decode pool hands off no more)."""
        return max(max_model_len, 2048), 256

    def kv_watermark(self) -> float:
        """Fraction of a replica's KV blocks the policy keeps free when it admits requests (0: none)."""
        return 0.0


class Scheduler(ABC):
    """A policy: looks at a replica's state and returns the next batch, and hears how the step went.

    `schedule` may move requests between the state's queues (admit, preempt, reject) and must give every
    request it puts in the batch the KV blocks its tokens need. It returns None when nothing can run;
    the engine then sleeps until a request arrives. Policies never see the clock's kind.
    """

    # The promise the engine's skip-ahead relies on (`sim.skip_ahead`): with an empty waiting queue and every
    # running request decoding (its newest token, no fan-out left to fork), `schedule` decodes every running
    # request in running order, growing their KV blocks, and changes nothing else (preempting only when the
    # blocks run out); with the same state again, it does the same again.
    decode_stretches: ClassVar[bool] = False

    def __init__(self, params: SchedulerParams) -> None:
        self.params = params

    @abstractmethod
    def schedule(self, state: ReplicaState) -> Batch | None: ...

    def on_step_end(self, state: ReplicaState, batch: Batch, result: StepResult) -> None:
        """Called after the step's outcome is applied to the state; most policies need nothing here."""
