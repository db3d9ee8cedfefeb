"""Timing of PyTorch work: GPU time from CUDA graphs replayed between CUDA events, host time from the wall
clock. On CPU (the `--quick` path CI runs) both are wall-clock medians."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timer:
    """Medians of repeated timings on one device.

    `gpu(fn, variants)` is the GPU time of one call of `fn(i)`: after a warm-up, `n` calls (rotating over
    `variants` input sets, so that the inputs read exceed the L2 cache) are captured in a CUDA graph, which
    is replayed `repeats` times between CUDA events; the median over replays, divided by `n`, is returned.
    The host's dispatch cost is thus excluded; each kernel's own GPU-side start-up is included.
    """

    device: torch.device
    min_seconds: float = 2e-3  # calls per graph: enough to take at least this long
    repeats: int = 5
    max_calls: int = 64

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def gpu(self, fn: Callable[[int], object], variants: int = 1) -> float:
        if not self.cuda:
            return self.wall(lambda: fn(0))
        fn(0)
        torch.cuda.synchronize()
        once = self.events(lambda: fn(0))
        n = max(1, min(self.max_calls, math.ceil(self.min_seconds / max(once, 1e-7))))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream before capture (cuBLAS workspaces)
            for i in range(min(n, variants)):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                fn(i % variants)
        graph.replay()
        times = [self.events(graph.replay) for _ in range(self.repeats)]
        del graph
        return statistics.median(times) / n

    def events(self, fn: Callable[[], object]) -> float:
        """GPU seconds of one call of `fn` between two CUDA events (host work inside it included)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def wall(self, fn: Callable[[], object]) -> float:
        """Median wall seconds of `fn()` run to completion (synchronised on CUDA)."""
        fn()
        times = []
        for _ in range(self.repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def host(self, fn: Callable[[], object], calls: int) -> float:
        """Median host seconds per call of `fn()` issued back to back without waiting for the device."""
        fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls)
            self.sync()
        return statistics.median(times)

    def queued(self, fn: Callable[[], object], calls: int) -> float:
        """Median GPU seconds per call of `fn()` issued eagerly to a busy stream: a sleep kernel lets the host
        get `calls` calls ahead, which then run back to back as the device takes them from the stream (each
        kernel's start on a stream, later than in a graph replay, included). CPU: host seconds per call."""
        if not self.cuda:
            return self.host(fn, calls)
        lead = 3.0 * self.host(fn, calls) * calls  # seconds the host needs to issue the calls, with margin
        cycles = 1 << 20
        per_cycle = self.events(lambda: torch.cuda._sleep(cycles)) / cycles
        times = []
        for _ in range(self.repeats):
            torch.cuda._sleep(int(lead / per_cycle))
            times.append(self.events(lambda: [fn() for _ in range(calls)]) / calls)
        return statistics.median(times)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def capture_graph(fn: Callable[[], object], warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn` captured in a CUDA graph after `warmups` calls on a side stream, and what the captured call returned
    (its tensors are the graph's outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def variants_for(bytes_per_call: float, l2_bytes: float, cap: int = 16) -> int:
    """Input sets to rotate over so that one pass over them reads at least twice the L2 cache."""
    return max(1, min(cap, math.ceil(2.0 * l2_bytes / max(bytes_per_call, 1.0))))
