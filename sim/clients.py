"""Closed-loop clients: a fixed number of users, each with one request in flight at most.

vLLM's `bench serve --max-concurrency N` and GuideLLM's `concurrent` profile drive a server so: a client
sends its next request once the previous one has been answered (finished, or refused) and a think time
has passed. The load then follows the server's speed instead of a clock, so such a run measures the
throughput and latency at that concurrency. A workload's `closed_loop` arrival is driven here: its
requests (drawn up front, lengths included) go out in id order, each stamped with the time it is sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import simpy

from policies.state import Requests
from traces.workload import ClosedLoopArrival


class ClosedLoop:
    """Every closed-loop workload's clients of one run; hears each request's end from `Requests.on_done`."""

    def __init__(self, env: simpy.Environment, requests: Requests, arrive: Callable[[int], None]) -> None:
        self.env, self.req, self.arrive = env, requests, arrive
        self.answered: dict[int, simpy.Event] = {}
        requests.on_done = self._done

    def start(self, ids: list[int], spec: ClosedLoopArrival, start_s: float, rng: np.random.Generator) -> None:
        """Clients of one workload sending `ids` (in order) from `start_s`."""
        queue = deque(ids)
        for _ in range(min(spec.concurrency, len(ids))):
            self.env.process(self._client(queue, spec, start_s, rng))

    def _client(self, queue: deque[int], spec: ClosedLoopArrival, start_s: float, rng: np.random.Generator
                ) -> Iterator[simpy.Event]:
        if start_s > self.env.now:
            yield self.env.timeout(start_s - self.env.now)
        while queue:
            rid = queue.popleft()
            self.req.arrival[rid] = self.env.now
            answered = self.answered[rid] = self.env.event()
            self.arrive(rid)
            yield answered
            pause = spec.think_time_s if spec.think == "fixed" else float(rng.exponential(spec.think_time_s))
            if pause > 0 and queue:
                yield self.env.timeout(pause)

    def _done(self, rid: int) -> None:
        event = self.answered.pop(rid, None)
        if event is not None:
            event.succeed()
