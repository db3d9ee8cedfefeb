"""Triton kernels of attention over the paged KV cache, read in place through block tables (no gather).

- `paged_prefill`: FlashAttention-2's forward (Dao, 2023) over query tiles of variable-length chunks, each
  after its cached prefix: the causal mask aligned at the end and an optional sliding window. Keys are
  fetched page by page as vLLM's PagedAttention lays them out (Kwon et al., SOSP 2023).
- `paged_decode`: flash-decoding (Dao et al., 2023): one query per sequence, the query heads of a KV head
  packed as the rows of one tile (grouped-query attention reads each K/V once), the KV length split across
  programs so that a few long sequences still fill the GPU, then a reduction of the partial softmaxes.
- `paged_verify`: the same for speculative verifications, a few queries per sequence (k + 1 tokens of a
  chain, or a token tree's nodes, up to `VERIFY_TILE` per tile): the tile's queries times the query heads of
  a KV head are its rows, with the causal, window and tree masks on the new keys. This is how vLLM V1 runs
  them (FlashAttention 3 with packed GQA and KV splits, or the decode path of FlashInfer for requests of up
  to k + 1 tokens); the prefill kernel would give each query head its own program and no KV split, a few
  dozen programs on a GPU of 132 SMs for one long verification.

Both run on CUDA, and on CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use to
check them against the reference in `backend.attention`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the simulator and the CPU backend need no Triton
    triton = None

LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None


_ON_CPU = False


@contextlib.contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """Run the Triton kernels on CPU tensors too (under TRITON_INTERPRET=1, set before Triton is imported)."""
    global _ON_CPU
    previous, _ON_CPU = _ON_CPU, True
    try:
        yield
    finally:
        _ON_CPU = previous


def use_kernels(x: torch.Tensor) -> bool:
    """Whether work on `x` runs the Triton kernels (CUDA, or CPU inside `kernels_on_cpu`) or plain PyTorch."""
    return x.is_cuda or _ON_CPU


_CAPTURING = False


@contextlib.contextmanager
def capturing() -> Iterator[None]:
    """Work whose time the replay's clock leaves out (CUDA-graph capture): `CompileWatch` does not count its
    compilations as serving's."""
    global _CAPTURING
    previous, _CAPTURING = _CAPTURING, True
    try:
        yield
    finally:
        _CAPTURING = previous


class CompileWatch:
    """Triton compilations while entered (Triton's `jit_cache_hook` before each, `jit_post_compile_hook` after),
    outside `capturing()`: an engine compiles its kernels before serving, so the replay reports any that
    happen in its steps' time (`kernels`: their names; `seconds`: their time)."""

    def __init__(self) -> None:
        self.kernels: list[str] = []
        self.seconds = 0.0
        self._began = 0.0
        self._saved: tuple[object, object] | None = None

    def _before(self, **_: object) -> None:
        self._began = time.perf_counter()

    def _after(self, *, repr: str, **_: object) -> None:  # noqa: A002 (Triton's keyword)
        if not _CAPTURING:
            self.seconds += time.perf_counter() - self._began
            self.kernels.append(repr.split("[", 1)[0])

    def __enter__(self) -> CompileWatch:
        knobs = getattr(triton, "knobs", None) if triton is not None else None
        if knobs is not None:
            rt = knobs.runtime
            self._saved = (rt.jit_cache_hook, rt.jit_post_compile_hook)
            rt.jit_cache_hook, rt.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *_: object) -> None:
        if self._saved is not None:
            triton.knobs.runtime.jit_cache_hook, triton.knobs.runtime.jit_post_compile_hook = self._saved
            self._saved = None


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


if triton is not None:

    @triton.jit(do_not_specialize=["stride_tb"])  # block-table width varies per pass: one compile for all
    def _prefill_kernel(Q, K, V, O, tables, q_start, lens, tiles,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_tb,
                        scale, window,
                        GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
        tile, head = tl.program_id(0), tl.program_id(1)
        kvh = head // GROUP
        seq = tl.load(tiles + 2 * tile)
        i0 = tl.load(tiles + 2 * tile + 1)
        first = tl.load(q_start + seq)
        q_len = tl.load(q_start + seq + 1) - first
        length = tl.load(lens + seq)
        cached = length - q_len
        offs_m = i0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        rows_ok = offs_m < q_len
        d_ok = offs_d < D
        q = tl.load(Q + (first + offs_m)[:, None].to(tl.int64) * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        pos_q = cached + offs_m
        table = tables + seq.to(tl.int64) * stride_tb
        hi = tl.minimum(length, cached + i0 + BLOCK_M)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(0, cached + i0 - window + 1)
        # keys every row of the tile sees: before the first row's position
        if HAS_WINDOW:
            visible = lo
        else:
            visible = cached + i0 + 1
        unmasked_end = lo + tl.maximum(visible - lo, 0) // BLOCK_N * BLOCK_N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for start in range(lo, unmasked_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            slot = tl.load(table + offs_n // PAGE).to(tl.int64) * PAGE + offs_n % PAGE
            kv = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            k = tl.load(K + kv, mask=d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv, mask=d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        for start in range(unmasked_end, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            slot = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64) * PAGE + offs_n % PAGE
            kv = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            k = tl.load(K + kv, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            ok = n_ok[None, :] & (offs_n[None, :] <= pos_q[:, None])
            if HAS_WINDOW:
                ok = ok & (offs_n[None, :] > pos_q[:, None] - window)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + (first + offs_m)[:, None].to(tl.int64) * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _store_split(O, LSE, rows, heads, offs_d, ok, d_ok, acc, m_i, l_i, split, stride_ot, stride_oh, stride_os,
                     n_heads, SPLITS: tl.constexpr):
        """A split program's normalised output at (row, head) of each of its rows (`ok`), and with several
        splits the log2 of each row's softmax mass for the reduction (-inf: an empty split)."""
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptr = O + rows[:, None] * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
        if SPLITS > 1:
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(LSE + (rows * n_heads + heads) * SPLITS + split, lse, mask=ok)

    @triton.jit(do_not_specialize=["stride_os", "stride_tb"])
    def _decode_kernel(Q, K, V, O, LSE, tables, lens,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_os, stride_tb,
                       scale, window,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                       PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr):
        seq, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(lens + seq)
        per = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per
        hi = tl.minimum(length, lo + per)
        if HAS_WINDOW:
            lo = tl.maximum(lo, length - window)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, D_PAD)
        heads = kvh * GROUP + offs_g
        g_ok = offs_g < GROUP
        d_ok = offs_d < D
        q = tl.load(Q + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        table = tables + seq.to(tl.int64) * stride_tb
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            slot = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64) * PAGE + offs_n % PAGE
            kv = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            k = tl.load(K + kv, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        _store_split(O, LSE, seq.to(tl.int64) + offs_g * 0, heads, offs_d, g_ok, d_ok, acc, m_i, l_i, split,
                     stride_ot, stride_oh, stride_os, tl.num_programs(1) * GROUP, SPLITS)

    @triton.jit(do_not_specialize=["stride_os", "stride_tb"])
    def _verify_kernel(Q, K, V, O, LSE, tables, q_start, lens, tiles, masks, mask_off, mask_w,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_os, stride_tb,
                       scale, window,
                       GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, HEADS: tl.constexpr,
                       D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                       SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TREE: tl.constexpr):
        tile, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq = tl.load(tiles + 2 * tile)
        i0 = tl.load(tiles + 2 * tile + 1)
        first = tl.load(q_start + seq)
        q_len = tl.load(q_start + seq + 1) - first
        length = tl.load(lens + seq)
        cached = length - q_len
        last = tl.minimum(length, cached + i0 + BLOCK_Q)  # keys the tile's last query may see
        per = tl.cdiv(tl.cdiv(last, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per
        hi = tl.minimum(last, lo + per)
        if HAS_WINDOW:
            lo = tl.maximum(lo, cached + i0 - window + 1)
        offs_r = tl.arange(0, ROWS)  # row r: query i0 + r // GROUP of the tile, query head r % GROUP of kvh
        qi = i0 + offs_r // GROUP
        heads = kvh * GROUP + offs_r % GROUP
        offs_d = tl.arange(0, D_PAD)
        r_ok = (offs_r < BLOCK_Q * GROUP) & (qi < q_len)
        d_ok = offs_d < D
        rows = (first + qi).to(tl.int64)
        q = tl.load(Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        pos_q = cached + qi
        table = tables + seq.to(tl.int64) * stride_tb
        if HAS_TREE:  # the tree's mask covers the last `width` keys
            moff = tl.load(mask_off + seq)
            width = tl.load(mask_w + seq)
            tail = length - width
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            slot = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64) * PAGE + offs_n % PAGE
            kv = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            k = tl.load(K + kv, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            ok = n_ok[None, :] & (offs_n[None, :] <= pos_q[:, None])
            if HAS_WINDOW:
                ok = ok & (offs_n[None, :] > pos_q[:, None] - window)
            if HAS_TREE:
                new = offs_n - tail
                in_tree = r_ok[:, None] & ((new >= 0) & n_ok & (new * 0 + moff >= 0))[None, :]
                seen = tl.load(masks + moff + qi[:, None] * width + new[None, :], mask=in_tree, other=1)
                ok = ok & (seen != 0)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        _store_split(O, LSE, rows, heads, offs_d, r_ok, d_ok, acc, m_i, l_i, split, stride_ot, stride_oh, stride_os,
                     HEADS, SPLITS)

    @triton.jit
    def _reduce_kernel(P, LSE, O, stride_pt, stride_ph, stride_ps, stride_ot, stride_oh,
                       SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        seq, head = tl.program_id(0), tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, D_PAD)
        s_ok = offs_s < SPLITS
        lse = tl.load(LSE + (seq * tl.num_programs(1) + head) * SPLITS + offs_s, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # all splits empty (no keys): zeros
        part = tl.load(P + seq.to(tl.int64) * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps
                       + offs_d[None, :], mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        total = tl.sum(w, 0)
        out = tl.sum(part.to(tl.float32) * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(O + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
                 mask=offs_d < D)


def prefill_block_m(max_q: int) -> int:
    """Query rows per tile: 16 for verifications of a few tokens, 64 for short chunks, else 128."""
    return 16 if max_q <= 16 else 64 if max_q <= 64 else 128


def prefill_tiles(q_lens: list[int], block_m: int) -> list[int]:
    """(sequence, first query row) of every query tile, flattened: the prefill kernel's first grid axis."""
    out: list[int] = []
    for s, n in enumerate(q_lens):
        for i in range(0, n, block_m):
            out += (s, i)
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                  q_start: torch.Tensor, lens: torch.Tensor, tiles: torch.Tensor, block_m: int, page: int,
                  window: int | None, out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Attention of queries `q` (rows, heads, d) over the paged cache (slots, kv heads, d): sequence i has
    rows q_start[i]:q_start[i+1], the last of its lens[i] keys; `tiles` from `prefill_tiles`."""
    rows, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty((rows, heads, d), dtype=q.dtype, device=q.device) if out is None else out
    n_tiles = tiles.numel() // 2
    # bench/attention_configs.py on an H100 (bench/results/h100_attention_configs.txt), an 8k-token prefill:
    # BLOCK_M 128, BLOCK_N 64, 4 warps, 3 stages 366 TFLOP/s (best 374; 8 warps, 2 stages 330)
    cfg = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3 if block_m == 128 else 2, **(config or {})}
    _prefill_kernel[(n_tiles, heads)](
        q, k_cache, v_cache, out, tables, q_start, lens, tiles,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        tables.stride(0), d ** -0.5 * LOG2E, window or 0,
        GROUP=heads // kv_heads, D=d, D_PAD=_pow2(d), PAGE=page, BLOCK_M=block_m, HAS_WINDOW=window is not None, **cfg)
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, page: int, splits: int, window: int | None,
                 scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
                 out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """One query per sequence (rows, heads, d) over its lens[i] cached keys; `splits` programs per (sequence,
    KV head) along the keys; `scratch` (partial outputs, log-sums) may be preallocated (CUDA graphs)."""
    rows, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out, target, lse, stride_os = _split_targets(q, splits, scratch, out)
    cfg = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, **(config or {})}
    _decode_kernel[(rows, kv_heads, splits)](
        q, k_cache, v_cache, target, lse, tables, lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), target.stride(0), target.stride(1),
        stride_os, tables.stride(0), d ** -0.5 * LOG2E, window or 0,
        GROUP=group, GROUP_PAD=_pow2(group), D=d, D_PAD=_pow2(d), PAGE=page, SPLITS=splits,
        HAS_WINDOW=window is not None, **cfg)
    return _reduce(target, lse, out, splits)


def paged_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 q_start: torch.Tensor, lens: torch.Tensor, tiles: torch.Tensor, block_q: int, page: int, splits: int,
                 window: int | None, masks: torch.Tensor | None = None, mask_off: torch.Tensor | None = None,
                 mask_w: torch.Tensor | None = None, scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
                 out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """A few queries per sequence (rows q_start[i]:q_start[i+1], the last of its lens[i] keys; `tiles` of
    `block_q` queries from `prefill_tiles`), `splits` programs per (tile, KV head) along the keys, causal
    within the new keys or by a token tree's `masks`: uint8, flat, from `mask_off[i]` (-1: none), mask_w[i]
    columns, row j of sequence i seeing the last mask_w[i] keys where its mask row says (a draft's tree level
    covers the earlier levels' keys too) and every key before them."""
    rows, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out, target, lse, stride_os = _split_targets(q, splits, scratch, out)
    tree = masks is not None
    if not tree:
        masks = mask_off = mask_w = lens  # unused
    cfg = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, **(config or {})}
    _verify_kernel[(tiles.numel() // 2, kv_heads, splits)](
        q, k_cache, v_cache, target, lse, tables, q_start, lens, tiles, masks, mask_off, mask_w,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), target.stride(0), target.stride(1),
        stride_os, tables.stride(0), d ** -0.5 * LOG2E, window or 0,
        GROUP=group, ROWS=_pow2(block_q * group), BLOCK_Q=block_q, HEADS=heads, D=d, D_PAD=_pow2(d), PAGE=page,
        SPLITS=splits, HAS_WINDOW=window is not None, HAS_TREE=tree, **cfg)
    return _reduce(target, lse, out, splits)


def _split_targets(q: torch.Tensor, splits: int, scratch: tuple[torch.Tensor, torch.Tensor] | None,
                   out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(output, what the split kernel writes, its log-sums, its split stride): with one split the output
    itself; else fp32 partial results (rows, heads, splits, d) and log-sums, in `scratch` if given."""
    rows, heads, d = q.shape
    out = torch.empty((rows, heads, d), dtype=q.dtype, device=q.device) if out is None else out
    if splits == 1:
        return out, out, out, 0
    if scratch is None:
        part = torch.empty((rows, heads, splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((rows, heads, splits), dtype=torch.float32, device=q.device)
    else:
        part = scratch[0][: rows * heads * splits * d].view(rows, heads, splits, d)
        lse = scratch[1][: rows * heads * splits].view(rows, heads, splits)
    return out, part, lse, part.stride(2)


def _reduce(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, splits: int) -> torch.Tensor:
    """The output from the splits' partial results (nothing to do with one split: `part` is `out`)."""
    if splits > 1:
        rows, heads, _, d = part.shape
        _reduce_kernel[(rows, heads)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), out.stride(0),
                                      out.stride(1), SPLITS=splits, SPLITS_PAD=_pow2(splits, 2), D=d,
                                      D_PAD=_pow2(d))
    return out
