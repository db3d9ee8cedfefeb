"""Request classes: which waiting request a replica admits next, and which running one it preempts.

- `fcfs`: arrival order (the default; priorities are ignored).
- `strict`: the lowest priority number first (vLLM's `--scheduling-policy priority`), arrival order within a
  class; running requests are kept in class order, so the token budget goes to the more urgent classes first
  and a preemption (when running requests need blocks) takes the least urgent, most recently started request.
  A less urgent class is never admitted while a more urgent one waits; as in vLLM, a waiting request does not
  preempt running ones to get in.
- `weighted_fair`: each class is served in proportion to its weight, in tokens admitted (weighted fair
  queuing, Demers, Keshav and Shenker, SIGCOMM 1989): the next admission goes to the waiting class that has
  received the least tokens per unit of weight; a class that has been idle starts level with the others.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np

PriorityMode = Literal["fcfs", "strict", "weighted_fair"]


class WaitingQueue:
    """Waiting requests by class, with the deque operations schedulers use (`[0]` is the next to admit)."""

    def __init__(self, priority: np.ndarray, mode: PriorityMode, weights: dict[int, float],
                 tokens: Callable[[int], int]) -> None:
        self.priority, self.mode, self.weights, self.tokens = priority, mode, weights, tokens
        self.classes: dict[int, deque[int]] = {}
        self.served: dict[int, float] = {}  # weighted_fair: tokens admitted per unit of weight, per class

    def _next_class(self) -> int:
        busy = [c for c, q in self.classes.items() if q]
        if not busy:
            raise IndexError("no request is waiting")
        if self.mode == "strict":
            return min(busy)
        return min(busy, key=lambda c: (self.served.get(c, 0.0), c))

    def _queue(self, rid: int) -> deque[int]:
        c = int(self.priority[rid])
        q = self.classes.setdefault(c, deque())
        if not q and self.mode == "weighted_fair":  # an idle class starts level with the busy ones
            busy = [self.served.get(b, 0.0) for b, other in self.classes.items() if other]
            self.served[c] = max(self.served.get(c, 0.0), min(busy, default=0.0))
        return q

    def __bool__(self) -> bool:
        return any(self.classes.values())

    def __len__(self) -> int:
        return sum(map(len, self.classes.values()))

    def __iter__(self) -> Iterator[int]:
        for c in sorted(self.classes):
            yield from self.classes[c]

    def __getitem__(self, index: int) -> int:
        if index != 0:
            raise IndexError("only the head of the waiting queue is addressable")
        return self.classes[self._next_class()][0]

    def append(self, rid: int) -> None:
        self._queue(rid).append(rid)

    def appendleft(self, rid: int) -> None:
        self._queue(rid).appendleft(rid)

    def remove(self, rid: int) -> None:
        self.classes[int(self.priority[rid])].remove(rid)

    def popleft(self) -> int:
        c = self._next_class()
        rid = self.classes[c].popleft()
        if self.mode == "weighted_fair":
            self.served[c] = self.served.get(c, 0.0) + self.tokens(rid) / self.weights.get(c, 1.0)
        return rid
