"""Attention metadata of one pass and the call that attends over the paged KV cache in place.

A pass's rows are prefill chunks (and speculative verifications), then decodes. Each part attends in one
kernel call (`PagedGroup`): the prefill kernel over query tiles, flash-decoding for the decodes
(`backend.kernels`; vLLM reads its paged cache the same way, with no copy of the K/V before attention).
On CPU the same groups run through `reference_attention`, one `scaled_dot_product_attention` per sequence
over the keys its block table names; the tests check the kernels against it (Triton's interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backend import kernels
from hardware.operators import VERIFY_TILE, decode_splits


@dataclass
class Chunk:
    """A request's new tokens in a pass: rows [start, start + length) of the flat batch, after `cached`
    tokens already in the cache; `table` lists its cache blocks (`row`: its row of the executor's
    `BlockTables`, if any). `mask` (token trees): which of the last mask.shape[1] keys each row may see (every
    earlier key is visible); None: causal."""

    start: int
    length: int
    cached: int
    table: list[int] | np.ndarray
    mask: np.ndarray | None = None
    row: int = -1


@dataclass
class PagedGroup:
    """Consecutive rows [start, end) of the flat batch that attend in one kernel call. Sequence i has the
    query rows q_start[i]:q_start[i+1] (relative to `start`) and the first lens[i] keys of block table row i.
    Decode groups split every sequence's keys `splits` ways: one query each, or (verifications) `tiles` of
    up to `block_m` queries; prefill groups run `tiles` of `block_m` queries. Host copies (`q_lens`,
    `k_lens`, `host_tables`, `host_masks`) serve the CPU reference; `scratch` holds preallocated partial
    results (CUDA graphs)."""

    start: int
    end: int
    decode: bool
    tables: torch.Tensor
    lens: torch.Tensor
    q_start: torch.Tensor
    tiles: torch.Tensor
    block_m: int
    splits: int
    q_lens: list[int]
    k_lens: list[int]
    host_tables: list[list[int] | np.ndarray]
    masks: torch.Tensor | None = None
    mask_off: torch.Tensor | None = None
    mask_w: torch.Tensor | None = None
    host_masks: list[np.ndarray | None] | None = None
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class AttentionMeta:
    """Where one pass writes new K/V (`slots`) and how its rows attend (`groups`: prefill chunks, then
    decodes), built once per step, not per layer."""

    slots: torch.Tensor
    groups: list[PagedGroup]


def cache_slots(table: list[int], positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slots (block x block size + offset) of a request's token `positions` under its block `table`."""
    return np.asarray(table, dtype=np.int64)[positions // block_size] * block_size + positions % block_size


_SMS: dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (8 elsewhere: the interpreter's grids stay small)."""
    if device.type != "cuda":
        return 8
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def table_array(chunks: list[Chunk], width: int, source: np.ndarray | None) -> np.ndarray:
    """The chunks' block tables as one (sequences, width) int32 array: rows of `source` (the executor's
    persistent block table) where the chunks name them, else their lists, padded with zeros."""
    if source is not None and width <= source.shape[1] and all(c.row >= 0 for c in chunks):
        return source[[c.row for c in chunks], :width]
    out = np.zeros((len(chunks), width), dtype=np.int32)
    for i, c in enumerate(chunks):
        out[i, :len(c.table)] = c.table
    return out


def paged_group(chunks: list[Chunk], block_size: int, device: torch.device, decode: bool, kv_heads: int,
                source: np.ndarray | None = None) -> PagedGroup:
    """One kernel call's metadata over consecutive `chunks`; the integers travel in one host-to-device copy."""
    q_lens = [c.length for c in chunks]
    k_lens = [c.cached + c.length for c in chunks]
    tables = [c.table for c in chunks]
    width = max(1, max(len(t) for t in tables))
    longest_q = max(q_lens)
    # verifications: always VERIFY_TILE queries per tile (one compiled variant per split count), as priced
    block_m = (1 if longest_q == 1 else VERIFY_TILE) if decode else kernels.prefill_block_m(longest_q)
    tiles = [] if block_m == 1 else kernels.prefill_tiles(q_lens, block_m)
    host_masks = [c.mask for c in chunks] if any(c.mask is not None for c in chunks) else None
    if host_masks is not None and not decode:
        raise ValueError("paged_group: token trees attend in the decode kernel (verifications), not the prefill one")
    mask_off: list[int] = []
    mask_w: list[int] = []
    if host_masks is not None:  # a mask's columns: the last keys it covers (its chunk's, or more; no mask: causal)
        sizes = [0 if m is None else m.size for m in host_masks]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        mask_off = [-1 if m is None else int(o) for m, o in zip(host_masks, starts)]
        mask_w = [q if m is None else m.shape[1] for m, q in zip(host_masks, q_lens)]
    n = len(chunks)
    parts = [np.asarray(k_lens, np.int32), np.cumsum([0, *q_lens], dtype=np.int32), np.asarray(mask_off, np.int32),
             np.asarray(mask_w, np.int32), np.asarray(tiles, np.int32), table_array(chunks, width, source).ravel()]
    # Each part starts on a 16-byte boundary: Triton compiles a kernel per pointer alignment, so parts at
    # offsets that depend on the chunk count would compile new variants in the middle of serving.
    offsets = np.concatenate([[0], np.cumsum([-(-p.size // 4) * 4 for p in parts])])
    packed = np.zeros(int(offsets[-1]), np.int32)
    for part, at in zip(parts, offsets):
        packed[at:at + part.size] = part
    dev = torch.from_numpy(packed).to(device)
    lens_t, q_start, off_t, w_t, tiles_t, table_flat = (dev[at:at + p.size] for p, at in zip(parts, offsets))
    off, w_t = (off_t, w_t) if host_masks is not None else (None, None)
    table_t = table_flat.view(n, width)
    masks = None
    if host_masks is not None:
        flat = [m.astype(np.uint8).ravel() for m in host_masks if m is not None]
        masks = torch.from_numpy(np.concatenate(flat)).to(device)
    programs = n if block_m == 1 else len(tiles) // 2
    splits = decode_splits(programs, kv_heads, max(k_lens), sm_count(device)) if decode else 1
    return PagedGroup(chunks[0].start, chunks[-1].start + chunks[-1].length, decode, table_t, lens_t, q_start, tiles_t,
                      block_m, splits, q_lens, k_lens, tables, masks, off, w_t, host_masks)


def attention_meta(chunks: list[Chunk], block_size: int, device: torch.device, prefills: int,
                   kv_heads: int, source: np.ndarray | None = None) -> AttentionMeta:
    """Slots and attention groups of a pass over `chunks` (token order: chunk after chunk), the first
    `prefills` of them prefill chunks attending in one call, the rest (verifications, then decodes) in another
    (as the cost model prices them: one prefill-attention and one decode-attention kernel)."""
    new_slots = np.concatenate([cache_slots(c.table, np.arange(c.cached, c.cached + c.length), block_size)
                                for c in chunks])
    groups = [paged_group(part, block_size, device, decode, kv_heads, source)
              for part, decode in ((chunks[:prefills], False), (chunks[prefills:], True)) if part]
    return AttentionMeta(torch.from_numpy(new_slots).to(device), groups)


def attend_groups(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, groups: list[PagedGroup],
                  block_size: int, window: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a pass's query rows, one call per group (each on its rows), into `out` if given (rows at
    least the groups' last; rows past it left as they are)."""
    if out is None:
        if len(groups) == 1:
            return attend(q[groups[0].start:groups[0].end], k_cache, v_cache, groups[0], block_size, window)
        out = torch.empty_like(q)  # each group writes its rows in place: no concatenation kernel per layer
    for g in groups:
        attend(q[g.start:g.end], k_cache, v_cache, g, block_size, window, out[g.start:g.end])
    return out


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: PagedGroup, block_size: int,
           window: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the group's query rows `q` (rows, heads, d) over one layer's paged cache (slots, kv heads,
    d), into `out` if given: the Triton kernels on CUDA, the per-sequence reference on CPU."""
    if not kernels.use_kernels(q):
        ref = reference_attention(q, k_cache, v_cache, g, block_size, window)
        return ref if out is None else out.copy_(ref)
    if g.decode:
        if g.scratch is None and g.splits > 1:  # partial results, shared by the layers of the pass
            size = q.shape[0] * q.shape[1] * g.splits
            g.scratch = (torch.empty(size * q.shape[2], dtype=torch.float32, device=q.device),
                         torch.empty(size, dtype=torch.float32, device=q.device))
        if g.block_m > 1:
            return kernels.paged_verify(q, k_cache, v_cache, g.tables, g.q_start, g.lens, g.tiles, g.block_m,
                                        block_size, g.splits, window, g.masks, g.mask_off, g.mask_w, g.scratch, out)
        return kernels.paged_decode(q, k_cache, v_cache, g.tables, g.lens, block_size, g.splits, window, g.scratch,
                                    out)
    return kernels.paged_prefill(q, k_cache, v_cache, g.tables, g.q_start, g.lens, g.tiles, g.block_m, block_size,
                                 window, out)


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: PagedGroup,
                        block_size: int, window: int | None) -> torch.Tensor:
    """Causal attention per sequence, the mask aligned at the end (a chunk's first query sees the cached keys
    before it), with the sliding window and token-tree masks: each sequence's keys read through its block
    table, then one `scaled_dot_product_attention` (grouped-query heads natively)."""
    out, qs = [], 0
    for i, (lq, lk, table) in enumerate(zip(g.q_lens, g.k_lens, g.host_tables)):
        index = torch.from_numpy(cache_slots(table, np.arange(lk), block_size)).to(q.device)
        q_pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        k_pos = torch.arange(lk, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        mask = g.host_masks[i] if g.host_masks is not None else None
        if mask is not None:  # a token tree: the last keys by the tree's ancestry, everything before visible
            tail = torch.from_numpy(mask).to(q.device)
            allowed = torch.cat([torch.ones(lq, lk - tail.shape[1], dtype=torch.bool, device=q.device), tail], 1)
        if window is not None:  # by row: a tree node's window is counted from its row, as the kernel does
            allowed &= k_pos > q_pos - window
        o = F.scaled_dot_product_attention(q[qs:qs + lq].transpose(0, 1), k_cache[index].transpose(0, 1),
                                           v_cache[index].transpose(0, 1), attn_mask=allowed, enable_gqa=True)
        out.append(o.transpose(0, 1))
        qs += lq
    return torch.cat(out)


def warm_up(heads: int, kv_heads: int, head_dim: int, window: int | None, block_size: int, dtype: torch.dtype,
            device: torch.device) -> None:
    """Launch every attention variant a serving pass can take once (prefill tiles of each height; decodes and
    verifications, with and without a token tree, at every flash-decoding split),
    so that Triton compiles them before the first request instead of in it, as engines warm up at start."""
    if not kernels.use_kernels(torch.empty(0, device=device)):
        return
    longest = 128 + 2 * block_size
    blocks = list(range(-(-longest // block_size)))
    kc = torch.zeros(len(blocks) * block_size, kv_heads, head_dim, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    for n in (16, 64, 128):  # the tile heights of `kernels.prefill_block_m`
        group = paged_group([Chunk(0, n, block_size, blocks)], block_size, device, False, kv_heads)
        attend(torch.zeros(n, heads, head_dim, dtype=dtype, device=device), kc, vc, group, block_size, window)
    for n, mask in ((1, None), (2, None), (2, np.tril(np.ones((2, 2), dtype=bool)))):
        q = torch.zeros(n, heads, head_dim, dtype=dtype, device=device)
        for splits in (1 << i for i in range(7)):  # every power of two `decode_splits` gives
            group = paged_group([Chunk(0, n, longest - n, blocks, mask)], block_size, device, True, kv_heads)
            group.splits = splits
            attend(q, kc, vc, group, block_size, window)
