"""The engine's two clocks: SimPy's simulated time (`simpy.Environment`), and `WallClock`, SimPy time that is
wall-clock time, for replaying the same replicas, policies and arrivals on a real device.

`WallClock` follows `simpy.rt.RealtimeEnvironment`: an event is processed no earlier than its time on the wall
clock (the clock sleeps until then, or with `asap` jumps there: idle gaps skipped). A timeout never ends before
the wall clock, so a replica that yields a step's measured seconds after running it wakes where the step really
ended, scheduling and bookkeeping included; a time the clock must not count (a CUDA graph's capture, which a
server does at start) is taken out with `skip`. Where every step is priced longer than the host takes to
schedule it (a cost-model or fixed-cost executor), the two clocks give the same times and the same batches
(`tests/test_engine.py`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import simpy
from simpy.core import EmptySchedule
from simpy.events import Timeout


class WallClock(simpy.Environment):
    """SimPy time that is wall-clock seconds since the clock was made, less the time `skip`ped (module
    docstring); with `asap`, waiting for a later event jumps the clock to it instead of sleeping."""

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

    def timeout(self, delay: float = 0, value: Any = None) -> Timeout:  # type: ignore[override]
        """A timeout of `delay`, ending no earlier than the wall clock."""
        return Timeout(self, max(delay, self.wall() - self.now), value)

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
