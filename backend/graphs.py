"""CUDA graphs of decode steps: one per (padded batch rows, K/V capacity bucket), captured on first use.

vLLM pads decode batches to captured sizes the same way. A `GraphCache` belongs to one model and one paged
cache (the target's, or a speculative draft's); the cache has one block more than the engine's, whose
first slot is the scratch slot padding rows write to.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from backend.model import AttentionGroup, AttentionMeta, LlamaModel, PagedKVCache
from hardware.cost import GRAPH_BATCH_SIZES


def capacity_bucket(n: int) -> int:
    """n rounded up on a grid of 8 steps per octave (at most 12.5% more), at least 256: the sizes of the
    K/V gather that decode CUDA graphs are captured for."""
    if n <= 256:
        return 256
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


class DecodeGraph:
    """A decode step of `batch` rows over at most `capacity` tokens of context in all, as a CUDA graph.

    Inputs live in static buffers; rows past the real batch are padding that write to and read one key
    from a scratch slot, so their outputs are ignored (vLLM pads decode batches to captured sizes the same
    way). The K/V gather writes into buffers shared by all graphs, and the logits are copied out to a
    shared buffer, so a graph keeps little memory of its own."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, batch: int, capacity: int, scratch: int,
                 pool: object, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        dev = cache.k.device
        self.batch, self.capacity, self.scratch = batch, capacity, scratch
        k_buf, v_buf, self.logits = shared
        # Every tensor the graph reads must outlive it: keep them on the object.
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.slots = torch.full((batch,), scratch, dtype=torch.long, device=dev)
        self.index = torch.full((capacity,), scratch, dtype=torch.long, device=dev)
        self.cu_k = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(batch, device=dev)
        group = AttentionGroup(0, batch, self.index, torch.arange(batch + 1, dtype=torch.int32, device=dev),
                               self.cu_k, 1, capacity, [], [], k_buf[:capacity], v_buf[:capacity])
        self.meta = AttentionMeta(self.slots, [group])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(self.tokens, self.positions, self.meta, cache, self.rows)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits[:batch].copy_(model(self.tokens, self.positions, self.meta, cache, self.rows))

    def run(self, tokens: list[int], positions: list[int], meta: AttentionMeta) -> torch.Tensor:
        n, (g,) = len(tokens), meta.groups
        total = sum(g.k_lens)
        self.tokens[:n] = torch.tensor(tokens)
        self.positions[:n] = torch.tensor(positions)
        self.slots[:n] = meta.slots
        self.slots[n:] = self.scratch  # padding rows write to the scratch slot, never to a live request's
        self.index[:total] = g.kv_index
        self.index[total:] = self.scratch
        pad = np.arange(total + 1, total + 1 + self.batch - n)  # each padding row reads the scratch slot
        self.cu_k.copy_(torch.from_numpy(np.concatenate([[0], np.cumsum(g.k_lens), pad]).astype(np.int32)))
        self.graph.replay()
        return self.logits[:n]


class GraphCache:
    """The decode graphs of one model over one cache (`num_blocks` blocks for requests plus the scratch one)."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, num_blocks: int, block_size: int) -> None:
        self.model, self.cache = model, cache
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch = num_blocks * block_size
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_seconds = 0.0

    def take_capture_seconds(self) -> float:
        """Seconds spent capturing since the last call (the replay's clock stops while a graph is captured)."""
        seconds, self.capture_seconds = self.capture_seconds, 0.0
        return seconds

    def get(self, n: int, meta: AttentionMeta) -> DecodeGraph | None:
        """The graph for a decode of `n` rows with this attention metadata, or None when n is too large."""
        if n > GRAPH_BATCH_SIZES[-1]:
            return None
        rows = next(b for b in GRAPH_BATCH_SIZES if b >= n)
        key = (rows, capacity_bucket(sum(meta.groups[0].k_lens) + rows - n))
        if key not in self.graphs:
            t0 = time.perf_counter()
            if self.buffers is None:  # sized for the whole cache plus padding rows, shared by all graphs
                most = capacity_bucket(self.num_blocks * self.block_size + GRAPH_BATCH_SIZES[-1])
                kv = torch.empty((most, *self.cache.k.shape[2:]), dtype=self.cache.k.dtype, device=self.cache.k.device)
                logits = torch.empty((GRAPH_BATCH_SIZES[-1], self.model.spec.vocab_size), device=self.cache.k.device)
                self.buffers = (kv, torch.empty_like(kv), logits)
            self.graphs[key] = DecodeGraph(self.model, self.cache, *key, self.scratch, self.pool, self.buffers)
            self.capture_seconds += time.perf_counter() - t0
        return self.graphs[key]
