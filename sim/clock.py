"""The engine's two clocks: `SimClock`, SimPy's simulated time, and `WallClock`, SimPy time that is wall-clock
time, for replaying the same replicas, policies and arrivals on a real device.

A replica that has run a step waits `step_end(seconds)`: on simulated time, the step's priced seconds. On the
wall clock (on the model of `simpy.rt.RealtimeEnvironment`), an event is processed no earlier than its time on
the wall clock (the clock sleeps until then, or with `asap` jumps there: idle gaps skipped), and a step's end is
never before the wall clock, so the replica wakes where the step really ended, scheduling and bookkeeping
included; the arrivals that fell inside the step are released before it ends, at their own times. A time the
clock must not count (a CUDA graph's capture, which a server does at start) is taken out with `skip`. Where
every step is priced longer than the host takes to schedule it (a cost-model or fixed-cost executor), the two
clocks give the same times and the same batches (`tests/test_engine.py`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import simpy
from simpy.core import EmptySchedule
from simpy.events import Timeout


class SimClock(simpy.Environment):
    """SimPy's simulated time: a step ends its seconds after it began."""

    def step_end(self, seconds: float) -> Timeout:
        """The end of a step that took `seconds`, from now."""
        return self.timeout(seconds)


class WallClock(SimClock):
    """SimPy time that is wall-clock seconds since the run began, less the time `skip`ped (module docstring);
    with `asap`, waiting for a later event jumps the clock to it instead of sleeping."""

    def __init__(self, asap: bool = False) -> None:
        super().__init__(0.0)
        self.asap = asap
        self._origin = time.perf_counter()

    def wall(self) -> float:
        """Wall-clock seconds of this clock now."""
        return time.perf_counter() - self._origin

    def skip(self, seconds: float) -> None:
        """Leave out `seconds` that just went by (the clock stands still over them)."""
        self._origin += seconds

    def step_end(self, seconds: float) -> Timeout:
        """The end of a step that took `seconds`: no earlier than the wall clock."""
        return self.timeout(max(seconds, self.wall() - self.now))

    def run(self, until: Any = None) -> Any:
        """Run from the wall clock's present (the time spent setting up before does not count)."""
        self._origin = time.perf_counter() - self.now
        return super().run(until)

    def step(self) -> None:
        """Process the next event once the wall clock reaches its time."""
        at = self.peek()
        if at == math.inf:
            raise EmptySchedule()
        while (ahead := at - self.wall()) > 0:
            if self.asap:
                self._origin -= ahead
                break
            time.sleep(ahead)
        super().step()
