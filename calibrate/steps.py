"""Synthetic steps through the backend's `TorchExecutor`: the same code path a replay times, driven by
hand-made batches (prefill chunks after a cached prefix, decodes at a context) instead of a scheduler."""

from __future__ import annotations

import gc
import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from backend.executor import TorchExecutor, prompt_tokens
from backend.parallel import Shard
from hardware.operators import StepShape
from hardware.specs import ModelSpec, kv_heads_per_gpu
from policies.batch import Batch
from policies.state import Requests


class StepRunner:
    """Runs `StepShape`s (prefill chunks and decodes) on a model with a paged cache of `num_blocks`."""

    def __init__(self, spec: ModelSpec, device: str, num_blocks: int, block_size: int = 16,
                 cuda_graphs: bool = True, max_requests: int = 1024, seed: int = 0, shard: Shard = Shard()) -> None:
        n = max_requests
        self.requests = Requests(np.zeros(n), np.ones(n, np.int64), np.ones(n, np.int64), np.zeros(n, np.int64))
        self.executor = TorchExecutor(spec, self.requests, num_blocks, block_size, device, seed,
                                      cuda_graphs=cuda_graphs, shard=shard)
        self.block_size = block_size
        self.capacity = num_blocks * block_size
        self.prompts: dict[int, list[int]] = {}

    def batch(self, shape: StepShape) -> Batch:
        """Give each request of `shape` its prompt and blocks; prefills first, then decodes."""
        chunks, cached, contexts = (shape.prefill_tokens.tolist(), shape.prefill_cached.tolist(),
                                    shape.decode_context.tolist())
        lengths = [c + p for c, p in zip(chunks, cached)] + [ctx + 1 for ctx in contexts]
        if sum(math.ceil(n / self.block_size) for n in lengths) * self.block_size > self.capacity:
            raise ValueError(f"step of {sum(lengths)} tokens exceeds the cache of {self.capacity}")
        if len(lengths) > self.requests.n:
            raise ValueError(f"step of {len(lengths)} requests exceeds {self.requests.n}")
        req, ex = self.requests, self.executor
        ids = list(range(len(lengths)))
        for rid, n in zip(ids, lengths):
            req.prompt[rid] = n
            req.blocks[rid] = math.ceil(n / self.block_size)
            if len(self.prompts.get(rid, ())) < n:  # made here, untimed: a replay makes each prompt once
                self.prompts[rid] = prompt_tokens(0, rid, n, self.executor.spec.vocab_size)
            ex.tokens[rid] = self.prompts[rid][:n]
        p = len(chunks)
        return Batch.make(ids[:p], chunks, cached, decode_ids=np.array(ids[p:], dtype=np.int64),
                          decode_computed=np.array(contexts, dtype=np.int64))

    def release(self) -> None:
        self.requests.blocks[:] = 0
        self.executor.sync_tables()

    def time(self, shapes: list[StepShape], repeats: int = 5) -> list[StepTiming]:
        """Wall and GPU seconds of each step over `repeats` runs: medians and fast-phase (10th percentile).

        The shapes are run round-robin `repeats` times after a warm-up round (which also captures the CUDA
        graphs), so that slow phases of a shared host spread over all shapes instead of spoiling some."""
        runs: list[list] = [[] for _ in shapes]
        for round_ in range(repeats + 1):
            for i, shape in enumerate(shapes):
                batch = self.batch(shape)  # prompts reset: every run computes (and samples) the same tokens
                outcome = self.executor.run(batch)
                self.release()
                if round_:
                    runs[i].append(outcome)
        return [StepTiming.of(r) for r in runs]


@dataclass(frozen=True)
class StepTiming:
    """Timings of one step shape over repeated runs. The lent hosts' CPUs run in fast and slow phases of
    seconds (a CPU-only loop slows by 1.7x and more), which host-bound eager steps follow; the 10th
    percentile over rounds spread in time is the host at its nominal speed, the median the typical run."""

    seconds: float
    gpu_seconds: float
    seconds_fast: float
    gpu_seconds_fast: float
    execution: str

    @classmethod
    def of(cls, outcomes: list) -> StepTiming:
        wall = [o.seconds for o in outcomes]
        gpu = [o.gpu_seconds for o in outcomes]
        return cls(statistics.median(wall), statistics.median(gpu), fast(wall), fast(gpu), outcomes[-1].execution)

    def columns(self) -> dict[str, float]:
        """The four timings as the columns of a measurement row (reference CSVs, raw step records)."""
        return {"seconds": self.seconds, "gpu_seconds": self.gpu_seconds, "seconds_fast": self.seconds_fast,
                "gpu_seconds_fast": self.gpu_seconds_fast}


def fast(values: list[float]) -> float:
    """The fast-phase statistic of repeated timings: their 10th percentile."""
    return float(np.percentile(values, 10))


SERVING_CACHE_FRACTION = 0.85  # of the free memory, for whole-step timings: the host's work per step grows with it


def cache_blocks(spec: ModelSpec, device: str, fraction: float, tp: int = 1, block_size: int = 16) -> int:
    """Blocks of KV cache that fit `fraction` of the device memory left free once this rank's weights
    (bf16) and 4 GB of activations are taken; on CPU, 64 MB."""
    kv_share = kv_heads_per_gpu(spec, tp) / spec.num_key_value_heads
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0] - 2.0 * spec.num_params / tp - 4e9
        per_token = spec.kv_bytes_per_token("bf16") * kv_share
    else:
        free, per_token = 64e6, spec.kv_bytes_per_token("fp32") * kv_share
    return max(16, int(fraction * free / (per_token * block_size)))


def agreed_blocks(spec: ModelSpec, device: str, shard: Shard = Shard()) -> int:
    """Cache blocks of a serving-sized cache (`SERVING_CACHE_FRACTION`); under TP the smallest over the
    ranks, so that every rank runs the same steps."""
    blocks = cache_blocks(spec, device, SERVING_CACHE_FRACTION, shard.size)
    if shard.size > 1:
        agreed = torch.tensor([blocks], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=shard.group)
        blocks = int(agreed.item())
    return blocks


def release_memory(device: str) -> None:
    """Give the memory of dropped runners (cache, graphs) back before the next one is built."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
