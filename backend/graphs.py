"""CUDA graphs of serving steps, captured on first use: decode steps whole, per (padded batch rows,
block-table width), and steps with prefill chunks or speculative verifications piecewise, per padded token
count, attention between the pieces at its exact size.

vLLM's V1 engine runs the same way by default (FULL_AND_PIECEWISE): decode batches padded to its capture sizes
replay full graphs, and batches of up to 512 tokens with prefills (or verifications) replay piecewise graphs
padded to the same sizes, attention left out of them. A `GraphCache` belongs to one model and one paged cache
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
from backend.model import LlamaModel, PagedKVCache, rope_tables
from hardware.cost import GRAPH_BATCH_SIZES
from hardware.operators import decode_splits


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
        splits = decode_splits(rows, kv_heads, width * cache.block_size, sm_count(dev))
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


class Eager:
    """A piece run as a plain call, with a CUDA graph's `replay` (on CPU, where there are no graphs: tests)."""

    def __init__(self, step: Callable[[], object]) -> None:
        self.replay = step


class PieceBuffers:
    """The fixed-address tensors every piecewise graph of one model reads and writes (`GRAPH_BATCH_SIZES[-1]`
    rows, each graph its first rows): token ids, positions and new-K/V slots in; the rotary tables, the
    residual stream, each layer's queries and attention output between pieces; the last layer's output."""

    def __init__(self, model: LlamaModel, scratch_slot: int, device: torch.device, dtype: torch.dtype) -> None:
        rows, spec = GRAPH_BATCH_SIZES[-1], model.spec
        attn = model.layers[0].self_attn
        self.scratch_slot = scratch_slot
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slots = torch.full((rows,), scratch_slot, dtype=torch.int64, device=device)
        self.cos = torch.zeros((rows, 1, spec.head_size // 2), dtype=dtype, device=device)
        self.sin = torch.zeros_like(self.cos)
        self.residual = torch.zeros((rows, spec.hidden_size), dtype=dtype, device=device)
        self.x = torch.zeros_like(self.residual)
        self.q = torch.zeros((rows, attn.heads, attn.head_dim), dtype=dtype, device=device)
        self.attn = torch.zeros_like(self.q)


class PiecewiseGraph:
    """A step of up to `rows` tokens (prefill chunks, decodes) as the model's pieces between attention calls,
    each a CUDA graph (vLLM V1's piecewise graphs): the embedding and the first layer up to its queries; each
    later layer's output projection, MLP and the next layer up to its queries; the last layer's rest.
    Attention runs between the pieces, eagerly, at the step's exact size over its own metadata (`run`), so the
    graph holds no attention metadata and no limit on chunks. Rows past the step's tokens are padding: their
    K/V go to the scratch slot and their outputs are ignored."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, rows: int, bufs: PieceBuffers, pool: object,
                 capture_fn: Callable[[Callable[[], object], object], object] = capture) -> None:
        self.model, self.cache, self.rows, self.bufs = model, cache, rows, bufs
        spec, layers = model.spec, model.layers
        rot, slots = (bufs.cos[:rows], bufs.sin[:rows]), bufs.slots[:rows]
        q, attn, residual = bufs.q[:rows], bufs.attn[:rows], bufs.residual[:rows]

        def first() -> None:
            x = model.embed(bufs.tokens[:rows])
            cos, sin = rope_tables(bufs.positions[:rows], spec.head_size, spec.rope_theta, x.dtype)
            rot[0].copy_(cos)
            rot[1].copy_(sin)
            residual.copy_(x)
            layers[0].pre(residual, None, rot, slots, cache, q)

        def middle(i: int) -> Callable[[], None]:
            def piece() -> None:
                x, _ = layers[i - 1].post(attn, residual)
                layers[i].pre(x, residual, rot, slots, cache, q)
            return piece

        def last() -> None:
            x, _ = layers[-1].post(attn, residual)
            bufs.x[:rows].copy_(x)

        bufs.slots.fill_(bufs.scratch_slot)  # the warm-up runs before capture write only the scratch block
        steps = [first, *(middle(i) for i in range(1, len(layers))), last]
        self.pieces = [capture_fn(step, pool) for step in steps]

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta, logit_rows: torch.Tensor
            ) -> torch.Tensor:
        """The logits of `logit_rows` of a pass over `tokens` at `positions` (its attention `meta`, as an eager
        pass builds it)."""
        b, n = self.bufs, tokens.numel()
        b.tokens[:n].copy_(tokens)
        b.positions[:n].copy_(positions)
        b.slots[:n].copy_(meta.slots)
        b.slots[n:self.rows].fill_(b.scratch_slot)
        for layer, piece in zip(self.model.layers, self.pieces):
            piece.replay()
            layer.self_attn.attend(b.q[:n], meta, self.cache, b.attn[:n])
        self.pieces[-1].replay()
        return self.model.logits(b.x, b.residual, logit_rows)


class GraphCache:
    """The graphs of one model over one cache (`num_blocks` blocks for requests plus the scratch one)."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, num_blocks: int, block_size: int) -> None:
        self.model, self.cache = model, cache
        self.num_blocks, self.block_size = num_blocks, block_size
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.piecewise: dict[int, PiecewiseGraph] = {}
        self.logits: torch.Tensor | None = None
        self.partials: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buffers: PieceBuffers | None = None  # the piecewise graphs' inputs and outputs
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

    def mixed(self, rows: int, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta,
              logit_rows: torch.Tensor, start: torch.cuda.Event | None = None) -> torch.Tensor:
        """Logits of `logit_rows` of a step with prefill chunks (an eager pass's inputs: `tokens`, `positions`,
        `meta`) through the piecewise graph of `rows` padded rows (`hardware.cost.graph_rows`); `start` is
        recorded before the inputs are copied in."""
        if rows not in self.piecewise:
            t0 = time.perf_counter()
            if self.buffers is None:
                self.buffers = PieceBuffers(self.model, self.num_blocks * self.block_size, self.cache.k.device,
                                            self.cache.k.dtype)
            self.piecewise[rows] = PiecewiseGraph(self.model, self.cache, rows, self.buffers, self.pool)
            self.capture_seconds += time.perf_counter() - t0
        if start is not None:
            start.record()
        return self.piecewise[rows].run(tokens, positions, meta, logit_rows)

    def _shared(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Buffers all graphs share: logits out, flash-decoding's partial results (the most any graph needs)."""
        if self.logits is None or self.partials is None:
            dev = self.cache.k.device
            heads, d = self.model.layers[0].self_attn.heads, self.cache.k.shape[3]
            kv_heads, sms = self.cache.k.shape[2], sm_count(dev)
            most = max(b * decode_splits(b, kv_heads, 1 << 30, sms) for b in GRAPH_BATCH_SIZES)
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
