"""CUDA graphs of serving steps, captured on first use: decode steps and uniform verifications (k + 1 tokens
for every request) whole, per (padded batch rows, block-table width, tokens per request), and other steps
with prefill chunks or speculative verifications piecewise, per padded token count, attention between the
pieces at its exact size.

vLLM's V1 engine runs the same way by default (FULL_AND_PIECEWISE): uniform decode batches (speculative ones
of k + 1 tokens per request included) padded to its capture sizes replay full graphs, and other batches of up
to 512 tokens with prefills (or verifications) replay piecewise graphs padded to the same sizes, attention
left out of them. A `GraphCache` belongs to one model and one paged cache
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
from hardware.cost import GRAPH_BATCH_SIZES, full_graph_rows
from hardware.operators import VERIFY_TILE, decode_splits


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
    """A step of `rows` sequences of `queries` new tokens each and at most `width` blocks, as a CUDA graph:
    decodes (one token each), or a uniform batch of verifications (k + 1 tokens each, causal over the new
    keys, in the verify kernel: vLLM V1's full graphs of uniform speculative batches).

    Its integer inputs (tokens, positions, new-K/V slots as int64; context lengths and block tables as
    int32) live in one device buffer, filled from a host buffer (pinned on CUDA, fresh per step, so that a
    step never waits for the copy of the one before) by one copy per step. Rows past the real batch are
    padding: they write to and read the scratch block, and their outputs are ignored. The flash-decoding
    split is fixed per graph (from `width`); each sequence's keys are split as its own length allows."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, rows: int, width: int, scratch_block: int,
                 pool: object, logits: torch.Tensor, partials: tuple[torch.Tensor, torch.Tensor] | None,
                 queries: int = 1, capture_fn: Callable[[Callable[[], object], object], object] = capture) -> None:
        dev = cache.k.device
        if queries > cache.block_size:
            raise ValueError(f"DecodeGraph: {queries} queries per sequence; padding rows fit one block "
                             f"({cache.block_size})")
        self.rows, self.width, self.queries, self.scratch_block = rows, width, queries, scratch_block
        self.scratch_slot = scratch_block * cache.block_size
        self.pinned = dev.type == "cuda"
        self.size = 3 * rows * queries + (rows + rows * width + 1) // 2
        self.ints = torch.zeros(self.size, dtype=torch.int64, device=dev)
        self.ints.copy_(self._host())  # until the first run: padding everywhere
        tokens, positions, slots, lens, tables = self._views(self.ints)
        kv_heads, sms = cache.k.shape[2], sm_count(dev)
        if queries == 1:
            splits = decode_splits(rows, kv_heads, width * cache.block_size, sms)
            group = PagedGroup(0, rows, True, tables, lens, lens, lens, 1, splits, [], [], [], scratch=partials)
        else:  # fixed per graph: each sequence's first query row and its tiles of up to VERIFY_TILE queries
            tiles = kernels.prefill_tiles([queries] * rows, VERIFY_TILE)
            fixed = torch.tensor([*range(0, rows * queries + 1, queries), *tiles], dtype=torch.int32, device=dev)
            self.fixed = fixed  # kept: the graph reads it at every replay
            splits = decode_splits(len(tiles) // 2, kv_heads, width * cache.block_size, sms)
            group = PagedGroup(0, rows * queries, True, tables, lens, fixed[:rows + 1], fixed[rows + 1:],
                               VERIFY_TILE, splits, [], [], [], scratch=partials)
        self.meta = AttentionMeta(slots, [group])
        self.logits = logits
        n = rows * queries
        self.row_ids = torch.arange(n, device=dev)  # kept: the graph reads it at every replay
        self.graph = capture_fn(lambda: self.logits[:n].copy_(model(tokens, positions, self.meta, cache,
                                                                     self.row_ids)), pool)

    def _views(self, buf: np.ndarray | torch.Tensor) -> tuple:
        r, t = self.rows, self.rows * self.queries
        small = buf[3 * t:].view(np.int32 if isinstance(buf, np.ndarray) else torch.int32)
        return buf[:t], buf[t:2 * t], buf[2 * t:3 * t], small[:r], small[r:r + r * self.width].reshape(r, self.width)

    def _host(self) -> torch.Tensor:
        """A host buffer of inputs where every row is padding (its K/V in the scratch block)."""
        host = torch.zeros(self.size, dtype=torch.int64, pin_memory=self.pinned)
        _, _, slots, lens, tables = self._views(host.numpy())
        slots[:], lens[:], tables[:, 0] = self.scratch_slot, self.queries, self.scratch_block
        return host

    def run(self, tokens: np.ndarray | None, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray,
            device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of `len(tables)` sequences' new tokens (`queries` each, sequence after sequence): `tokens`
        at `positions`, writing their K/V at `slots`, each sequence's blocks a row of `tables`. `device_tokens`
        (on the device) replaces `tokens`: a draft's proposals go from one step to the next without a copy to
        the host, so the host prepares a step while the GPU still runs the one before."""
        n, t, w = len(tables), len(positions), tables.shape[1]
        host = self._host()
        tok, pos, slot, lens, table = self._views(host.numpy())
        if device_tokens is None:
            tok[:t] = tokens
        pos[:t], slot[:t] = positions, slots
        lens[:n] = positions[self.queries - 1::self.queries] + 1
        table[:n, :w] = tables
        self.ints.copy_(host, non_blocking=self.pinned)
        if device_tokens is not None:
            self.ints[:t].copy_(device_tokens)
        self.graph.replay()
        return self.logits[:t]


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
    """The graphs of one model over one cache (`num_blocks` blocks for requests plus the scratch one); off CUDA
    (tests) their pieces run as plain calls (`Eager`)."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, num_blocks: int, block_size: int) -> None:
        self.model, self.cache = model, cache
        self.num_blocks, self.block_size = num_blocks, block_size
        self.graphs: dict[tuple[int, int, int], DecodeGraph] = {}
        self.piecewise: dict[int, PiecewiseGraph] = {}
        self.logits: torch.Tensor | None = None
        self.partials: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buffers: PieceBuffers | None = None  # the piecewise graphs' inputs and outputs
        cuda = cache.k.device.type == "cuda"  # elsewhere (tests) the graphs' pieces run as plain calls
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        self.capture_fn: Callable[[Callable[[], object], object], object] = \
            capture if cuda else (lambda step, pool: Eager(step))
        self.capture_seconds = 0.0

    def take_capture_seconds(self) -> float:
        """Seconds spent capturing since the last call (the replay's clock stops while a graph is captured)."""
        seconds, self.capture_seconds = self.capture_seconds, 0.0
        return seconds

    def decode(self, blocks: BlockTables, ids: list[int], tokens: np.ndarray | None, done: np.ndarray,
               start: torch.cuda.Event | None = None, queries: int = 1,
               device_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits of a step of requests `ids`, each with `done` tokens cached and `queries` new ones (decodes:
        1; uniform verifications: k + 1), `tokens` sequence after sequence (or `device_tokens`, on the device),
        through its full graph, or None when the batch is too large; `start` is recorded just before the
        replay."""
        bs = self.block_size
        graph = self.get(len(ids), int(done.max() + queries - 1) // bs + 1, queries)
        if graph is None:
            return None
        rows = blocks.array[blocks.rows(ids)]
        positions = (done[:, None] + np.arange(queries)).ravel()
        seq = np.repeat(np.arange(len(ids)), queries)
        slots = rows[seq, positions // bs].astype(np.int64) * bs + positions % bs
        if start is not None:
            start.record()
        return graph.run(tokens, positions, slots, rows[:, :graph.width], device_tokens)

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
            self.piecewise[rows] = PiecewiseGraph(self.model, self.cache, rows, self.buffers, self.pool,
                                                  self.capture_fn)
            self.capture_seconds += time.perf_counter() - t0
        if start is not None:
            start.record()
        return self.piecewise[rows].run(tokens, positions, meta, logit_rows)

    def _shared(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Buffers all graphs share: logits out, flash-decoding's partial results (the most any graph needs:
        rows times splits, over every padded batch and every number of queries per sequence)."""
        if self.logits is None or self.partials is None:
            dev = self.cache.k.device
            heads, d = self.model.layers[0].self_attn.heads, self.cache.k.shape[3]
            kv_heads, sms = self.cache.k.shape[2], sm_count(dev)
            most = max(b * q * decode_splits(b * -(-q // VERIFY_TILE), kv_heads, 1 << 30, sms)
                       for q in range(1, self.block_size + 1) for b in GRAPH_BATCH_SIZES
                       if b * q <= GRAPH_BATCH_SIZES[-1])
            self.logits = torch.empty((GRAPH_BATCH_SIZES[-1], self.model.spec.vocab_size), device=dev)
            self.partials = (torch.empty(most * heads * d, dtype=torch.float32, device=dev),
                             torch.empty(most * heads, dtype=torch.float32, device=dev))
        return self.logits, self.partials

    def get(self, n: int, longest_table: int, queries: int = 1) -> DecodeGraph | None:
        """The full graph for `n` sequences of `queries` new tokens each whose longest block table has
        `longest_table` blocks, or None when the padded step is too large (`full_graph_rows`)."""
        rows = full_graph_rows(n, queries)
        if rows is None:
            return None
        key = (rows, table_bucket(longest_table), queries)
        if key not in self.graphs:
            t0 = time.perf_counter()
            logits, partials = self._shared()
            self.graphs[key] = DecodeGraph(self.model, self.cache, rows, key[1], self.num_blocks, self.pool, logits,
                                           partials, queries, self.capture_fn)
            self.capture_seconds += time.perf_counter() - t0
        return self.graphs[key]
