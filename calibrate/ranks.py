"""One process per GPU (torch.multiprocessing) for tensor-parallel timings: NCCL on GPUs, Gloo on the CPU
(which is how the tests run it). Rank 0's result comes back; every rank must run the same work."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backend.parallel import Shard

# A job: (device of this rank, its shard, a log that prints on rank 0 only) -> JSON-able rows.
Job = Callable[[str, Shard, Callable[[str], None]], list[dict[str, Any]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_degrees(world: int) -> list[int]:
    """The TP degrees `world` GPUs allow beyond one: 2, 4, 8, ..."""
    return [2 ** e for e in range(1, world.bit_length()) if 2 ** e <= world]


def on_ranks(job: Job, size: int, device: str) -> list[dict[str, Any]]:
    """Rank 0's rows of `job` run by `size` processes (a picklable function: module level or a partial)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(size, free_port(), job, device, tmp), nprocs=size, join=True)
        return json.loads((Path(tmp) / "rows.json").read_text())


def _rank(rank: int, size: int, port: int, job: Job, device: str, tmp: str) -> None:
    cuda = device.startswith("cuda")
    # Each rank's CPU threads: one on GPUs (kernels run on the device; a pool per rank of all cores
    # oversubscribes the host and more than doubled eager dispatch in the TP=2 run), a share on the CPU.
    torch.set_num_threads(1 if cuda else max(1, (os.cpu_count() or 1) // size))
    if cuda:
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    try:
        def log(message: str) -> None:
            if rank == 0:
                print(f"servesim calibrate: {message}", file=sys.stderr, flush=True)

        rows = job(f"cuda:{rank}" if cuda else "cpu", Shard(rank, size), log)
        if rank == 0:
            (Path(tmp) / "rows.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()
