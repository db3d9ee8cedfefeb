"""Clients that wait for answers: closed loops of a fixed number of users, and multi-turn sessions.

vLLM's `bench serve --max-concurrency N` and GuideLLM's `concurrent` profile drive a server with N users,
each sending its next request once the previous one has been answered (finished, or refused) and a think
time has passed: the load follows the server's speed instead of a clock. A workload's `closed_loop`
arrival is driven so: its requests (drawn up front, lengths included) go out in id order, each stamped
with the time it is sent.

A multi-turn session (`sessions:`) sends its next turn a think time after the previous turn's answer; when a
turn is refused the session ends and its later turns are rejected as `session_ended`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import simpy

from policies.state import Requests, Status
from traces.workload import ClosedLoopArrival, Workload


def _pause(mean: float, kind: str, rng: np.random.Generator) -> float:
    return mean if kind == "fixed" or mean == 0 else float(rng.exponential(mean))


class Clients:
    """Every waiting client of one run; hears each request's end from `Requests.on_done`."""

    def __init__(self, env: simpy.Environment, requests: Requests, arrive: Callable[[int], None],
                 workloads: list[Workload], seed: int) -> None:
        self.env, self.req, self.arrive, self.workloads = env, requests, arrive, workloads
        self.rngs = [np.random.default_rng([seed, w]) for w in range(len(workloads))]
        self.answered: dict[int, simpy.Event] = {}
        requests.on_done = self._done

    def closed_loop(self, ids: list[int], spec: ClosedLoopArrival, start_s: float, workload: int) -> None:
        """Clients of one workload sending `ids` (in order) from `start_s`."""
        queue = deque(ids)
        for _ in range(min(spec.concurrency, len(ids))):
            self.env.process(self._client(queue, spec, start_s, self.rngs[workload]))

    def _client(self, queue: deque[int], spec: ClosedLoopArrival, start_s: float, rng: np.random.Generator
                ) -> Iterator[simpy.Event]:
        if start_s > self.env.now:
            yield self.env.timeout(start_s - self.env.now)
        while queue:
            rid = queue.popleft()
            answered = self.answered[rid] = self.env.event()
            self._send(rid)
            yield answered
            pause = _pause(spec.think_time_s, spec.think, rng)
            if pause > 0 and queue:
                yield self.env.timeout(pause)

    def _next_turn(self, rid: int, pause: float) -> Iterator[simpy.Event]:
        if pause > 0:
            yield self.env.timeout(pause)
        self._send(rid)

    def _send(self, rid: int) -> None:
        """Request `rid` arrives now."""
        self.req.arrival[rid] = self.env.now
        self.arrive(rid)

    def _done(self, rid: int) -> None:
        event = self.answered.pop(rid, None)
        if event is not None:
            event.succeed()
        nxt = int(self.req.next_turn[rid])
        if nxt < 0:
            return
        if self.req.status[rid] == Status.REJECTED:  # the user gives up: the session's later turns never go
            self.req.arrival[nxt] = self.env.now
            self.req.reject(nxt, "session_ended", f"turn {rid} of its session was rejected")
            return
        w = int(self.req.workload[rid])
        spec = self.workloads[w].sessions
        assert spec is not None
        self.env.process(self._next_turn(nxt, _pause(spec.think_time_s, spec.think, self.rngs[w])))
