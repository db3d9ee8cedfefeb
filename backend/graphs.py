"""CUDA graphs of serving steps, captured on first use: decode steps per (padded batch rows, block-table
width), and mixed steps (prefill chunks with or without decodes) per (padded token count, width).

vLLM pads decode batches to captured sizes the same way, and its V1 engine runs batches of up to 512 tokens
with prefills under CUDA graphs too, padded to the same sizes (its piecewise graphs leave attention out; these
capture it, over fixed-size attention metadata). A `GraphCache` belongs to one model and one paged cache
(the target's, or a speculative draft's); the cache has one block more than the engine's, the scratch block
that padding rows write to and read from.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from backend import kernels
from backend.attention import AttentionMeta, PagedGroup, sm_count
from backend.block_table import BlockTables
from backend.model import LlamaModel, PagedKVCache
from hardware.cost import GRAPH_BATCH_SIZES, MIXED_GRAPH_PREFILLS, graph_rows


def capture(step: Callable[[], object], pool: object) -> torch.cuda.CUDAGraph:
    """`step` as a CUDA graph in memory `pool`, after two runs on a side stream (PyTorch's warm-up rule:
    lazy initialisation and kernel selection happen outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with kernels.capturing():
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
    return graph


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
        self.graph = capture(lambda: self.logits[:rows].copy_(model(tokens, positions, self.meta, cache,
                                                                    self.row_ids)), pool)

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


class MixedLayout:
    """The inputs of a step of prefill chunks and decodes padded to `rows` tokens and tables `width` blocks
    wide: decodes on rows 0..D-1, then the chunks, then padding rows (their K/V to the scratch slot, seeing no
    keys). The integers live in one int64 device buffer, filled from one host buffer per step (up to the last
    decode's table row). Attention overlays two groups on all rows (`AttentionMeta.overlay`): flash-decoding,
    where rows other than decodes have no keys, then prefill tiles (at most `cap` chunks; spare tiles fall on
    an empty chunk)."""

    def __init__(self, rows: int, width: int, cap: int, block_size: int, scratch_slot: int, kv_heads: int,
                 device: torch.device, partials: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.rows, self.width, self.cap, self.scratch_slot = rows, width, cap, scratch_slot
        self.block_m = kernels.prefill_block_m(rows)
        self.n_tiles = -(-rows // self.block_m) + cap
        self.sizes32 = (rows, cap + 1, cap + 2, 2 * self.n_tiles, (cap + 1) * width, rows * width)
        n64 = 3 * rows + (sum(self.sizes32) + 1) // 2
        self.host = torch.zeros(n64, dtype=torch.int64)
        if device.type == "cuda":
            self.host = self.host.pin_memory()
        self.ints = torch.zeros(n64, dtype=torch.int64, device=device)
        self.views = self._views(self.host.numpy())
        tokens, positions, slots, dec_lens, pre_lens, q_start, tiles, pre_tables, dec_tables = self._views(self.ints)
        self.tokens, self.positions = tokens, positions
        splits = kernels.decode_splits(rows, kv_heads, width * block_size, sm_count(device))
        decode = PagedGroup(0, rows, True, dec_tables, dec_lens, dec_lens, dec_lens, 1, splits, [], [], [],
                            scratch=partials)
        prefill = PagedGroup(0, rows, False, pre_tables, pre_lens, q_start, tiles, self.block_m, 1, [], [], [])
        self.meta = AttentionMeta(slots, [decode, prefill], overlay=True)
        # until the first step: padding everywhere (the warm-up before capture writes only the scratch block)
        self.fill(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width), np.int32), [], block_size)

    def _views(self, buf: np.ndarray | torch.Tensor) -> tuple:
        r, w = self.rows, self.width
        small = buf[3 * r:].view(np.int32 if isinstance(buf, np.ndarray) else torch.int32)
        ends = np.cumsum(self.sizes32)
        dec_lens, pre_lens, q_start, tiles, pre_tables, dec_tables = (
            small[a:b] for a, b in zip([0, *ends[:-1]], ends))
        return (buf[:r], buf[r:2 * r], buf[2 * r:3 * r], dec_lens, pre_lens, q_start, tiles,
                pre_tables.reshape(self.cap + 1, w), dec_tables.reshape(r, w))

    def fill(self, dec_tokens: np.ndarray, dec_done: np.ndarray, dec_tables: np.ndarray,
             chunks: list[tuple[list[int], int, np.ndarray]], block_size: int) -> None:
        """Write a step into the host buffer and copy it to the device: decodes (next token, tokens cached,
        block-table row), then prefill chunks (token ids, tokens cached before them, block table)."""
        tok, pos, slot, dec_lens, pre_lens, q_start, tiles, pre_tab, dec_tab = self.views
        d, w = len(dec_tokens), dec_tables.shape[1]
        tok[:d], pos[:d], dec_lens[:d] = dec_tokens, dec_done, dec_done + 1
        dec_lens[d:] = 0
        slot[:d] = dec_tables[np.arange(d), dec_done // block_size].astype(np.int64) * block_size \
            + dec_done % block_size
        dec_tab[:d, :w] = dec_tables
        row, tile = d, 0
        for i, (ids, done, table) in enumerate(chunks):
            n = len(ids)
            at = np.arange(done, done + n)
            tok[row:row + n], pos[row:row + n] = ids, at
            slot[row:row + n] = table[at // block_size].astype(np.int64) * block_size + at % block_size
            q_start[i], pre_lens[i] = row, done + n
            pre_tab[i, :len(table)] = table
            for j in range(0, n, self.block_m):
                tiles[2 * tile:2 * tile + 2] = i, j
                tile += 1
            row += n
        tok[row:], pos[row:], slot[row:] = 0, 0, self.scratch_slot
        q_start[len(chunks):], pre_lens[len(chunks):] = row, 0
        tiles[2 * tile::2], tiles[2 * tile + 1::2] = self.cap, 0
        used = 3 * self.rows + (sum(self.sizes32[:-1]) + d * self.width + 1) // 2
        self.ints[:used].copy_(self.host[:used], non_blocking=True)


class MixedGraph:
    """A step of prefill chunks and decodes (`MixedLayout`) as a CUDA graph of the model's layers, writing the
    last layer's output and residual into `hidden` (buffers of 512 rows that every mixed graph shares, so
    that a graph keeps none of its activations); the logits of the rows that sample run after it, eagerly
    (as vLLM computes them outside its graphs)."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, layout: MixedLayout, pool: object,
                 hidden: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.layout = layout
        rows = layout.rows
        self.x, self.residual = hidden[0][:rows], hidden[1][:rows]
        def step() -> None:
            x, residual = model.hidden(layout.tokens, layout.positions, layout.meta, cache)
            self.x.copy_(x)
            self.residual.copy_(residual)

        self.graph = capture(step, pool)


class GraphCache:
    """The graphs of one model over one cache (`num_blocks` blocks for requests plus the scratch one)."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, num_blocks: int, block_size: int) -> None:
        self.model, self.cache = model, cache
        self.num_blocks, self.block_size = num_blocks, block_size
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.mixed_graphs: dict[tuple[int, int], MixedGraph] = {}
        self.logits: torch.Tensor | None = None
        self.partials: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = None  # mixed graphs' outputs
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

    def mixed(self, blocks: BlockTables, dec_ids: list[int], dec_tokens: np.ndarray, dec_done: np.ndarray,
              chunks: list[tuple[int, list[int], int]], sample_rows: list[int],
              start: torch.cuda.Event | None = None) -> torch.Tensor | None:
        """Logits of `sample_rows` (`MixedLayout`'s row order: decodes, then chunks) of a step of decodes (as
        `decode` takes them) and prefill `chunks` (request, token ids, tokens cached before them) through its
        graph, or None when the step runs eagerly (`hardware.cost.graph_rows`)."""
        tokens = len(dec_ids) + sum(len(ids) for _, ids, _ in chunks)
        rows = graph_rows("mixed", tokens, len(chunks))
        if rows is None:
            return None
        bs = self.block_size
        longest = max([blocks.held(rid) for rid, _, _ in chunks] + [int(d) // bs + 1 for d in dec_done])
        key = (rows, table_bucket(longest))
        if key not in self.mixed_graphs:
            t0 = time.perf_counter()
            layout = MixedLayout(*key, MIXED_GRAPH_PREFILLS, bs, self.num_blocks * bs, self.cache.k.shape[2],
                                 self.cache.k.device, self._shared()[1])
            if self.hidden is None:
                size = (GRAPH_BATCH_SIZES[-1], self.model.spec.hidden_size)
                self.hidden = (self.cache.k.new_empty(size), self.cache.k.new_empty(size))
            self.mixed_graphs[key] = MixedGraph(self.model, self.cache, layout, self.pool, self.hidden)
            self.capture_seconds += time.perf_counter() - t0
        graph = self.mixed_graphs[key]
        table = blocks.array[blocks.rows(dec_ids)][:, :graph.layout.width]
        if start is not None:  # as for decode graphs: the step's copy to the device included
            start.record()
        graph.layout.fill(dec_tokens, dec_done, table, [(ids, done, blocks.table(rid)) for rid, ids, done in chunks],
                          bs)
        picked = torch.tensor(sample_rows, dtype=torch.long).to(self.cache.k.device, non_blocking=True)
        graph.graph.replay()
        return self.model.logits(graph.x, graph.residual, picked)

    def _shared(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Buffers all graphs share: logits out, flash-decoding's partial results (the most any graph needs)."""
        if self.logits is None or self.partials is None:
            dev = self.cache.k.device
            heads, d = self.model.layers[0].self_attn.heads, self.cache.k.shape[3]
            kv_heads, sms = self.cache.k.shape[2], sm_count(dev)
            most = max(b * kernels.decode_splits(b, kv_heads, 1 << 30, sms) for b in GRAPH_BATCH_SIZES)
            self.logits = torch.empty((GRAPH_BATCH_SIZES[-1], self.model.spec.vocab_size), device=dev)
            self.partials = (torch.empty(most * heads * d, dtype=torch.float32, device=dev),
                             torch.empty(most * heads, dtype=torch.float32, device=dev))
        return self.logits, self.partials

    def get(self, n: int, longest_table: int) -> DecodeGraph | None:
        """The graph for a decode of `n` sequences whose longest block table has `longest_table` blocks, or
        None when n is too large."""
        if n > GRAPH_BATCH_SIZES[-1]:
            return None
        key = (next(b for b in GRAPH_BATCH_SIZES if b >= n), table_bucket(longest_table))
        if key not in self.graphs:
            t0 = time.perf_counter()
            self.graphs[key] = DecodeGraph(self.model, self.cache, *key, self.num_blocks, self.pool, *self._shared())
            self.capture_seconds += time.perf_counter() - t0
        return self.graphs[key]
