"""CUDA graphs of decode steps: one per (padded batch rows, block-table width), captured on first use.

vLLM pads decode batches to captured sizes the same way. A `GraphCache` belongs to one model and one paged
cache (the target's, or a speculative draft's); the cache has one block more than the engine's, the
scratch block that padding rows write to and read from.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from backend import kernels
from backend.attention import AttentionMeta, PagedGroup, sm_count
from backend.block_table import BlockTables
from backend.model import LlamaModel, PagedKVCache
from hardware.cost import GRAPH_BATCH_SIZES


def table_bucket(blocks: int) -> int:
    """Block-table width of the decode graphs: the longest table rounded up to a power of two, at least 16."""
    return max(16, 1 << max(0, blocks - 1).bit_length())


class DecodeGraph:
    """A decode step of `rows` sequences of at most `width` blocks each, as a CUDA graph.

    Its integer inputs (tokens, positions, new-K/V slots as int64; context lengths and block tables as
    int32) live in one device buffer, filled from one pinned host buffer by one copy per step. Rows past
    the real batch are padding: they write to and read one key of the scratch block, and their outputs are
    ignored. The flash-decoding split is fixed per graph (from `width`); each sequence's keys are split as
    its own length allows."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, rows: int, width: int, scratch_block: int,
                 pool: object, logits: torch.Tensor, partials: tuple[torch.Tensor, torch.Tensor]) -> None:
        dev = cache.k.device
        self.rows, self.width, self.scratch_block = rows, width, scratch_block
        self.scratch_slot = scratch_block * cache.block_size
        n64 = 3 * rows + (rows + rows * width + 1) // 2
        self.ints = torch.zeros(n64, dtype=torch.int64, device=dev)
        self.host = torch.zeros(n64, dtype=torch.int64).pin_memory()
        self.views = self._views(self.host.numpy())
        tokens, positions, slots, lens, tables = self._views(self.ints)
        self.views[2][:] = self.scratch_slot  # until the first run: padding everywhere
        self.views[3][:] = 1
        self.views[4][:, 0] = scratch_block
        self.ints.copy_(self.host)
        kv_heads = cache.k.shape[2]
        splits = kernels.decode_splits(rows, kv_heads, width * cache.block_size, sm_count(dev))
        group = PagedGroup(0, rows, True, tables, lens, lens, lens, 1, splits, [], [], [], scratch=partials)
        self.meta = AttentionMeta(slots, [group])
        self.logits = logits
        self.row_ids = torch.arange(rows, device=dev)  # kept: the graph reads it at every replay
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(tokens, positions, self.meta, cache, self.row_ids)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits[:rows].copy_(model(tokens, positions, self.meta, cache, self.row_ids))

    def _views(self, buf: np.ndarray | torch.Tensor) -> tuple:
        r = self.rows
        small = buf[3 * r:].view(np.int32 if isinstance(buf, np.ndarray) else torch.int32)
        return buf[:r], buf[r:2 * r], buf[2 * r:3 * r], small[:r], small[r:r + r * self.width].reshape(r, self.width)

    def run(self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray
            ) -> torch.Tensor:
        """Logits of `len(tokens)` decodes: each at `positions` (its cached tokens), writing its new K/V at
        `slots`, its blocks the rows of `tables`."""
        n, w = len(tokens), tables.shape[1]
        tok, pos, slot, lens, table = self.views
        tok[:n], pos[:n], slot[:n], lens[:n] = tokens, positions, slots, positions + 1
        slot[n:], lens[n:] = self.scratch_slot, 1  # padding rows: the scratch block only
        table[:n, :w] = tables
        table[n:, 0] = self.scratch_block
        self.ints.copy_(self.host, non_blocking=True)
        self.graph.replay()
        return self.logits[:n]


class GraphCache:
    """The decode graphs of one model over one cache (`num_blocks` blocks for requests plus the scratch one)."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, num_blocks: int, block_size: int) -> None:
        self.model, self.cache = model, cache
        self.num_blocks, self.block_size = num_blocks, block_size
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.logits: torch.Tensor | None = None
        self.partials: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_seconds = 0.0

    def take_capture_seconds(self) -> float:
        """Seconds spent capturing since the last call (the replay's clock stops while a graph is captured)."""
        seconds, self.capture_seconds = self.capture_seconds, 0.0
        return seconds

    def decode(self, blocks: BlockTables, ids: list[int], tokens: np.ndarray, done: np.ndarray,
               start: torch.cuda.Event | None = None) -> torch.Tensor | None:
        """Logits of a decode step of requests `ids` (each with `done` tokens cached and its next token in
        `tokens`) through its graph, or None when the batch is too large; `start` is recorded just before
        the replay."""
        bs = self.block_size
        graph = self.get(len(ids), int(done.max()) // bs + 1)
        if graph is None:
            return None
        rows = blocks.array[blocks.rows(ids)]
        slots = rows[np.arange(len(ids)), done // bs].astype(np.int64) * bs + done % bs
        if start is not None:
            start.record()
        return graph.run(tokens, done, slots, rows[:, :graph.width])

    def get(self, n: int, longest_table: int) -> DecodeGraph | None:
        """The graph for a decode of `n` sequences whose longest block table has `longest_table` blocks, or
        None when n is too large."""
        if n > GRAPH_BATCH_SIZES[-1]:
            return None
        key = (next(b for b in GRAPH_BATCH_SIZES if b >= n), table_bucket(longest_table))
        if key not in self.graphs:
            t0 = time.perf_counter()
            dev = self.cache.k.device
            if self.logits is None:  # shared by all graphs: logits out, flash-decoding's partial results
                heads, d = self.model.layers[0].self_attn.heads, self.cache.k.shape[3]
                kv_heads, sms = self.cache.k.shape[2], sm_count(dev)
                most = max(b * kernels.decode_splits(b, kv_heads, 1 << 30, sms) for b in GRAPH_BATCH_SIZES)
                self.logits = torch.empty((GRAPH_BATCH_SIZES[-1], self.model.spec.vocab_size), device=dev)
                self.partials = (torch.empty(most * heads * d, dtype=torch.float32, device=dev),
                                 torch.empty(most * heads, dtype=torch.float32, device=dev))
            assert self.partials is not None
            self.graphs[key] = DecodeGraph(self.model, self.cache, *key, self.num_blocks, self.pool, self.logits,
                                           self.partials)
            self.capture_seconds += time.perf_counter() - t0
        return self.graphs[key]
