"""NCCL collectives over all visible GPUs: all-reduce, all-gather and send/recv by payload bytes.

One process per GPU (`calibrate.ranks`), torch.distributed with the NCCL backend and NVLink multicast
off (NCCL_NVLS_ENABLE=0). All-reduce and all-gather run over the first 2, 4, 8 ... ranks (the TP degrees
the GPUs allow), send/recv between ranks 0 and 1 (a pipeline hop). All-reduce and all-gather are timed as
a TP step runs them: back to back inside a CUDA graph replayed between CUDA events (the ranks start
together and stay in step), per call; a single eager call between events also times the ranks' skew and
the launch (35 us for any message up to 1 MiB on two H200s, where the graph gives the NCCL kernel's own
time). Send/recv (a pipeline hop between stages, outside graphs) is timed as single eager calls. The
slowest rank's median is kept. It also times, in each group, the host's
dispatch of one eager all-reduce call and of one plain kernel (back to back, wall clock): the eager steps
of a TP rank pay the first for every collective. Payloads follow the cost model: an
all-reduce's is the reduced tensor, an all-gather's the gathered output, a send/recv's the tensor sent.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from backend.parallel import Shard
from calibrate.ranks import on_ranks, tp_degrees

SIZES = tuple(1 << e for e in range(10, 31, 2))  # 1 KiB .. 1 GiB
KINDS = ("all-reduce", "all-gather", "send-recv")


EAGER_CALLS, GRAPH_REPLAYS = 10, 5  # timed calls of an eager collective; replays of a captured one


def _time_graph(fn: Any, nbytes: int, replays: int = GRAPH_REPLAYS) -> float:
    """GPU seconds per call of `fn` (a collective), captured back to back in a CUDA graph."""
    calls = max(1, min(20, (64 << 20) // max(nbytes, 1)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def _time(fn: Any, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _job(sizes: tuple[int, ...], device: str, shard: Shard, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One rank's part of the timings (`calibrate.ranks.on_ranks`); every rank returns the same rows."""
    rank, dev = shard.rank, torch.device(device)
    out = []
    ranks = tp_degrees(shard.size)
    groups = {n: dist.new_group(list(range(n))) for n in ranks}  # every rank creates every group
    for kind in KINDS:
        for n in ranks if kind != "send-recv" else [2]:
            group, member = groups[n], rank < n
            for size in sizes:
                elems = size // 2  # bf16 elements of the payload
                fn = lambda: None  # noqa: E731  (ranks outside the group still join every barrier)
                if member and kind == "all-reduce":
                    x = torch.randn(elems, device=dev, dtype=torch.bfloat16)
                    fn = lambda: dist.all_reduce(x, group=group)  # noqa: E731
                elif member and kind == "all-gather":
                    part = torch.randn(max(1, elems // n), device=dev, dtype=torch.bfloat16)
                    full = torch.empty(part.numel() * n, device=dev, dtype=torch.bfloat16)
                    fn = lambda: dist.all_gather_into_tensor(full, part, group=group)  # noqa: E731
                elif member:
                    x = torch.randn(elems, device=dev, dtype=torch.bfloat16)
                    fn = (lambda: dist.send(x, 1)) if rank == 0 else (lambda: dist.recv(x, 0))  # noqa: E731
                timing = "eager" if kind == "send-recv" else "graph"
                seconds = 0.0
                if member:
                    seconds = _time(fn, EAGER_CALLS) if timing == "eager" else _time_graph(fn, size)
                else:  # ranks outside the group join the barriers of the group's timing
                    for _ in range(EAGER_CALLS if timing == "eager" else GRAPH_REPLAYS):
                        dist.barrier()
                worst = torch.tensor([seconds], device=dev)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                out.append({"op": kind, "kind": kind, "ranks": n, "comm_bytes": float(size),
                            "seconds": float(worst.item()), "timing": timing})
    for n in ranks:  # host dispatch per eager call, in a TP rank: an all-reduce of 16 KiB and a plain kernel
        group, member = groups[n], rank < n
        x = torch.randn(8192, device=dev, dtype=torch.bfloat16)
        calls = {"all-reduce": lambda: dist.all_reduce(x, group=group), "kernel": lambda: x.add_(0.0)}
        host = {}
        for name, fn in calls.items():
            dist.barrier()
            if member:
                host[name] = _dispatch(fn, 200)
        worst = torch.tensor([host.get("all-reduce", 0.0), host.get("kernel", 0.0)], device=dev)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        out.append({"op": "dispatch", "kind": "collective-dispatch", "ranks": n, "seconds": float(worst[0].item()),
                    "kernel_seconds": float(worst[1].item())})
    return out


def _dispatch(fn: Any, calls: int) -> float:
    """Host seconds per eager call of `fn`, back to back (the GPU queue absorbs them), median of 5 runs."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls)
        torch.cuda.synchronize()
    return statistics.median(runs)


def run_collectives(sizes: tuple[int, ...] = SIZES) -> list[dict[str, Any]]:
    """Timings over every visible GPU; empty when fewer than two are visible."""
    world = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world < 2:
        return []
    return on_ranks(partial(_job, sizes), world, "cuda")
