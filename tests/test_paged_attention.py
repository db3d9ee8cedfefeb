"""The Triton kernels that read the paged KV cache in place (`backend.kernels`), run on CPU in Triton's
interpreter, against the per-sequence reference: prefill chunks after cached prefixes (mid-block too),
sliding windows, decodes and verifications (token trees too) at every flash-decoding split; and whole passes
of the tiny model through the executor (chunked prefill, preemption, speculative trees) giving the
reference's tokens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
torch.set_num_threads(1)

from backend.attention import Chunk, attend, paged_group, reference_attention  # noqa: E402
from backend.kernels import kernels_on_cpu  # noqa: E402
from hardware.operators import decode_splits  # noqa: E402

BLOCK = 16


def tree_mask(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random token tree over n rows (row 0 the root, parents before children): row i sees its ancestors."""
    mask = np.eye(n, dtype=bool)
    mask[:, 0] = True
    for i in range(2, n):
        mask[i] |= mask[int(rng.integers(1, i))]
    return mask


def twin_caches(spec, num_blocks: int, seed: int) -> list:
    """Two float32 CPU paged caches of `num_blocks` blocks plus the scratch block padding rows write to, both
    holding the same random K/V (the cached prefixes): one for the eager pass, one for the graph under test."""
    from backend.model import PagedKVCache

    caches = [PagedKVCache(spec.num_hidden_layers, num_blocks + 1, BLOCK, spec.num_key_value_heads, spec.head_size,
                           torch.float32, torch.device("cpu")) for _ in range(2)]
    gen = torch.Generator().manual_seed(seed)
    for name in ("k", "v"):
        prior = torch.randn(getattr(caches[0], name).shape, generator=gen)
        for cache in caches:
            getattr(cache, name).copy_(prior)
    return caches


def run_both(parts: list[tuple[int, int, np.ndarray | None]], decode: bool, window: int | None, seed: int,
             heads: int = 8, kv_heads: int = 2, dim: int = 32, splits: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' output and the reference's over `parts` ((new tokens, cached tokens, tree mask) each),
    every sequence's blocks scattered over a cache."""
    rng = np.random.default_rng(seed)
    blocks = [-(-(n + c) // BLOCK) for n, c, _ in parts]
    perm = rng.permutation(sum(blocks) + 8).tolist()
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn((sum(blocks) + 8) * BLOCK, kv_heads, dim, generator=gen)
    vc = torch.randn((sum(blocks) + 8) * BLOCK, kv_heads, dim, generator=gen)
    chunks, row, at = [], 0, 0
    for (n, cached, mask), nb in zip(parts, blocks):
        chunks.append(Chunk(row, n, cached, perm[at:at + nb], mask))
        row, at = row + n, at + nb
    group = paged_group(chunks, BLOCK, torch.device("cpu"), decode, kv_heads)
    if splits is not None:
        group.splits = splits
    # the queries as the model passes them: a slice of the RoPE output, rows strided past the K heads
    q = torch.randn(row, heads + kv_heads, dim, generator=gen)[:, :heads]
    ref = reference_attention(q, kc, vc, group, BLOCK, window)
    with kernels_on_cpu():
        out = attend(q, kc, vc, group, BLOCK, window)
    return out, ref


@pytest.mark.parametrize("window", [None, 24])
def test_prefill_kernel_matches_reference(window: int | None) -> None:
    # a fresh prompt, a chunk after a cached prefix ending mid-block, one token after a long prefix, and a
    # chunk longer than a query tile
    parts = [(30, 0, None), (17, 45, None), (1, 70, None), (150, 3, None)]
    out, ref = run_both(parts, False, window, seed=1)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("window", [None, 40])
def test_decode_kernel_matches_reference_at_every_split(splits: int, window: int | None) -> None:
    # contexts of one token, a block exactly, one past, and several spanning splits unevenly
    parts = [(1, c, None) for c in (0, 15, 16, 99, 300, 33)]
    out, ref = run_both(parts, True, window, seed=3, splits=splits)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window", [None, 30])
def test_verify_kernel_matches_reference(splits: int, window: int | None) -> None:
    """Verifications in the decode group (`paged_verify`): chains of k + 1 tokens after cached prefixes
    (mid-block too), token trees, a tree of more nodes than a tile (two tiles), one-token decodes among them,
    a draft's tree level (its mask covering earlier levels' keys too), a prefix shorter than the window and one
    far longer (the window counted from each node's row, in the kernel and the reference); at one split and
    several. Prefill groups take no trees."""
    rng = np.random.default_rng(6)
    parts = [(5, 97, None), (3, 16, None), (1, 40, None), (6, 250, tree_mask(6, rng)), (11, 60, tree_mask(11, rng)),
             (2, 0, None), (8, 129, None), (3, 50, tree_mask(7, rng)[4:])]
    out, ref = run_both(parts, True, window, seed=6, splits=splits)
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="decode kernel"):
        run_both(parts, False, window, seed=6)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (6, 2, 24), (8, 1, 64)])
def test_kernels_handle_head_layouts(heads: int, kv_heads: int, dim: int) -> None:
    # multi-head (no grouping), a group of 3 and a head size that is not a power of two, multi-query
    for decode, parts in ((False, [(20, 9, None), (3, 0, None)]), (True, [(1, 50, None), (1, 5, None)]),
                          (True, [(5, 50, None), (1, 5, None)])):
        out, ref = run_both(parts, decode, None, seed=4, heads=heads, kv_heads=kv_heads, dim=dim, splits=2)
        assert torch.allclose(out, ref, atol=1e-5)


def test_mixed_pass_writes_both_groups_in_place() -> None:
    """A pass with prefill chunks and decodes (two attention calls) writes each group's rows into one output,
    as the graphs do: the same rows as the groups' own calls, in a buffer of the queries' shape (the eager
    pass used to concatenate the two outputs: one more kernel per layer)."""
    from backend.attention import attend_groups

    rng = np.random.default_rng(5)
    gen = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(40 * BLOCK, 2, 32, generator=gen) for _ in range(2))
    perm = rng.permutation(40).tolist()
    chunks = [Chunk(0, 20, 9, perm[0:2]), Chunk(20, 1, 50, perm[2:6]), Chunk(21, 1, 130, perm[6:15])]
    groups = [paged_group(chunks[:1], BLOCK, torch.device("cpu"), False, 2),
              paged_group(chunks[1:], BLOCK, torch.device("cpu"), True, 2)]
    q = torch.randn(22, 8, 32, generator=gen)
    with kernels_on_cpu():
        out = attend_groups(q, kc, vc, groups, BLOCK, None)
        parts = [attend(q[g.start:g.end], kc, vc, g, BLOCK, None) for g in groups]
    assert out.shape == q.shape and torch.equal(out, torch.cat(parts))


def test_decode_splits_fill_the_gpu_without_tiny_splits() -> None:
    assert decode_splits(1, 8, 8192, 132) == 32  # 1 x 8 KV heads x 32 splits: four programs per SM
    assert decode_splits(256, 8, 8192, 132) == 1  # enough sequences already
    assert decode_splits(1, 8, 300, 132) == 1  # too short to split
    for b in (1, 3, 17, 64):
        for ctx in (100, 1000, 10_000, 100_000):
            s = decode_splits(b, 8, ctx, 132)
            assert s & (s - 1) == 0 and (s == 1 or ctx // s >= 256)


def _replay_tokens(config, **kw) -> tuple[dict[int, list[int]], object]:
    from backend.replay import replay

    res, executor, _ = replay(config, asap=True, **kw)
    assert (res.requests["status"] == "finished").all()
    return executor.tokens, res


@pytest.mark.parametrize("scheduler,blocks", [({"name": "sarathi", "token_budget": 24}, 9),  # chunks, preemption
                                              ({"name": "vllm"}, 128)])
def test_replay_through_the_kernels_gives_the_reference_tokens(scheduler: dict, blocks: int) -> None:
    from tests.test_backend import tiny_config

    cfg = tiny_config(scheduler, blocks, n=5)
    with kernels_on_cpu():
        got, res = _replay_tokens(cfg)
    want, _ = _replay_tokens(cfg)
    assert got == want
    if blocks == 9:
        assert res.summary["preemptions"] > 0


def test_token_tree_replay_through_the_kernels_gives_the_reference_tokens() -> None:
    from sim.config import SimConfig
    from tests.test_backend import tiny_config

    cfg = tiny_config({"name": "vllm"}, 128, n=3)
    spec = {"draft": {"kind": "draft_model", "model": "tiny-llama"}, "tree": {"kind": "static", "widths": [3, 2]},
            "acceptance": {"kind": "ranked", "probs": [0.6, 0.2, 0.1]}}
    cfg = cfg.model_copy(update={"speculation": SimConfig.model_validate({"speculation": spec}).speculation})
    with kernels_on_cpu():
        got, res = _replay_tokens(cfg, acceptance="model")
    want, _ = _replay_tokens(cfg, acceptance="model")
    assert got == want and res.summary["spec_tokens_per_verify"] > 2.0


def test_fused_elementwise_kernels_match_pytorch() -> None:
    from backend import fused
    from backend.model import rope_tables

    gen = torch.Generator().manual_seed(7)
    t, h, kvh, d, hidden = 13, 6, 2, 24, 80
    x, res, w = (torch.randn(t, hidden, generator=gen), torch.randn(t, hidden, generator=gen),
                 torch.randn(hidden, generator=gen))
    want = fused.add_rmsnorm(x, res.clone(), w, 1e-5)
    with kernels_on_cpu():
        got = fused.add_rmsnorm(x, res.clone(), w, 1e-5)
        alone = fused.add_rmsnorm(x, None, w, 1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
    assert torch.allclose(alone[0], torch.nn.functional.rms_norm(x, (hidden,), w, 1e-5), atol=1e-5)

    qkv = torch.randn(t, h + 2 * kvh, d, generator=gen)
    rot = rope_tables(torch.randint(0, 500, (t,), generator=gen), d, 10000.0, torch.float32)
    slots = torch.randperm(64, generator=gen)[:t]
    caches = [torch.zeros(64, kvh, d) for _ in range(4)]
    q_want = fused.rope_and_cache(qkv, *rot, slots, caches[0], caches[1], h, kvh)
    with kernels_on_cpu():
        q_got = fused.rope_and_cache(qkv, *rot, slots, caches[2], caches[3], h, kvh)
    assert torch.allclose(q_got, q_want, atol=1e-5)
    assert torch.allclose(caches[2], caches[0], atol=1e-5) and torch.equal(caches[3], caches[1])
    assert caches[0][slots].abs().sum() > 0  # the keys were written

    gate_up = torch.randn(t, 2 * 700, generator=gen)  # not a multiple of the kernel's block
    with kernels_on_cpu():
        got = fused.silu_mul(gate_up)
    assert torch.allclose(got, fused.silu_mul(gate_up), atol=1e-5)


def test_warm_up_launches_every_variant_a_pass_can_take(monkeypatch) -> None:
    """Before serving, every prefill tile height, every flash-decoding split of decodes and of verifications
    (with and without a token tree) runs once, and each fused kernel, so that Triton
    compiles them before the first request."""
    from backend import fused, kernels
    from backend.model import warm_up_kernels
    from hardware.catalog import get_model

    seen: set = set()
    monkeypatch.setattr(kernels, "paged_prefill", lambda *a, **k: seen.add(("prefill", a[7])) or a[0])
    monkeypatch.setattr(kernels, "paged_decode", lambda *a, **k: seen.add(("decode", a[6])) or a[0])
    monkeypatch.setattr(kernels, "paged_verify", lambda *a, **k: seen.add(("verify", a[9], a[11] is not None))
                        or a[0])
    for name in ("add_rmsnorm", "rope_and_cache", "silu_mul"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _n=name, _f=real, **k: seen.add(_n) or _f(*a, **k))
    spec = get_model("tiny-llama")
    warm_up_kernels(spec, 1, spec.num_key_value_heads, 16, torch.float32, torch.device("cpu"))
    assert not seen  # on CPU, outside the interpreter, the kernels do not run: nothing to compile
    with kernels_on_cpu():
        warm_up_kernels(spec, 1, spec.num_key_value_heads, 16, torch.float32, torch.device("cpu"))
    assert {m for kind, *rest in seen if kind == "prefill" for m in rest} == {16, 64, 128}
    splits = {1, 2, 4, 8, 16, 32, 64}
    assert {s for kind, *rest in seen if kind == "decode" for s in rest} == splits
    assert {tuple(rest) for kind, *rest in seen if kind == "verify"} == {(s, t) for s in splits for t in (0, 1)}
    assert {"add_rmsnorm", "rope_and_cache", "silu_mul"} <= seen


def test_full_graph_of_uniform_verifications_gives_the_eager_pass_logits_and_cache() -> None:
    """A batch where every request verifies k + 1 tokens through `DecodeGraph` (a full graph, run as a plain
    call: fixed buffers, padded rows, the verify kernel over the fixed tiles) gives the eager pass's logits at
    every row and its K/V; a smaller batch after it with its tokens on the device (a draft's proposals) too,
    and a decode batch through a graph of one query per sequence; padding writes only the scratch block."""
    from backend.attention import attention_meta
    from backend.graphs import DecodeGraph, Eager, table_bucket
    from backend.model import build_model
    from hardware.catalog import get_model
    from hardware.cost import full_graph_rows

    spec = get_model("tiny-llama")
    cpu = torch.device("cpu")
    model = build_model(spec, cpu, torch.float32, seed=6)
    kvh = spec.num_key_value_heads
    rng = np.random.default_rng(6)
    steps = [(5, [30, 17, 41]), (5, [52, 3]), (1, [20, 44, 9])]  # (tokens per sequence, cached per sequence)
    need = [-(-(q + c) // BLOCK) for q, cached in steps for c in cached]
    num_blocks = sum(need) + 2
    perm, at = rng.permutation(num_blocks).tolist(), 0
    tables = []
    for nb in need:
        tables.append(np.asarray(perm[at:at + nb], dtype=np.int32))
        at += nb
    caches = twin_caches(spec, num_blocks, seed=6)
    logits = torch.zeros((512, spec.vocab_size))
    partials = (torch.zeros(1 << 16), torch.zeros(1 << 12))
    t = iter(tables)
    graphs = {}
    with kernels_on_cpu():
        for i, (q, cached) in enumerate(steps):
            mine = [next(t) for _ in cached]
            rows = full_graph_rows(len(cached), q)
            assert rows == (4 if len(cached) == 3 else 2)
            width = table_bucket(max(len(x) for x in mine))
            if (rows, q) not in graphs:
                graphs[rows, q] = DecodeGraph(model, caches[1], rows, width, num_blocks, None, logits, partials, q,
                                              lambda step, pool: Eager(step))
            graph = graphs[rows, q]
            flat = rng.integers(0, spec.vocab_size, q * len(cached))
            positions = np.concatenate([np.arange(c, c + q) for c in cached])
            chunks = [Chunk(j * q, q, c, tab) for j, (c, tab) in enumerate(zip(cached, mine))]
            meta = attention_meta(chunks, BLOCK, cpu, 0, kvh)
            want = model(torch.tensor(flat), torch.tensor(positions), meta, caches[0], torch.arange(flat.size))
            slots = np.concatenate([tab[np.arange(c, c + q) // BLOCK].astype(np.int64) * BLOCK + np.arange(c, c + q)
                                    % BLOCK for c, tab in zip(cached, mine)])
            table = np.zeros((len(cached), width), np.int32)
            for j, tab in enumerate(mine):
                table[j, :tab.size] = tab
            on_device = i == 1
            got = graph.run(None if on_device else flat, positions, slots, table,
                            torch.tensor(flat) if on_device else None)
            assert got.shape[0] == flat.size and torch.allclose(got, want, atol=1e-4)
            real = slice(0, num_blocks * BLOCK)
            assert torch.allclose(caches[1].k[:, real], caches[0].k[:, real], atol=1e-5)
            assert torch.allclose(caches[1].v[:, real], caches[0].v[:, real], atol=1e-5)


def test_graph_cache_runs_uniform_verifications_and_decodes_over_block_tables() -> None:
    """`GraphCache.decode` (as the executor and the draft call it: requests' block tables, cached counts,
    queries per request) gives the eager pass's logits and K/V for uniform verifications of 5 tokens, then
    decodes, each through its full graph (plain calls on CPU), padded to the capture size."""
    from backend.attention import attention_meta
    from backend.block_table import BlockTables
    from backend.graphs import GraphCache
    from backend.model import build_model
    from hardware.catalog import get_model

    spec = get_model("tiny-llama")
    cpu = torch.device("cpu")
    model = build_model(spec, cpu, torch.float32, seed=8)
    kvh, num_blocks = spec.num_key_value_heads, 24
    caches = twin_caches(spec, num_blocks, seed=8)
    graphs, tables = GraphCache(model, caches[1], num_blocks, BLOCK), BlockTables(num_blocks)
    rng = np.random.default_rng(8)
    with kernels_on_cpu():
        for q, cached in ((5, [30, 17, 41]), (1, [35, 22, 46])):  # the same requests, verified then decoding
            for rid, c in enumerate(cached):
                tables.resize(rid, -(-(c + q) // BLOCK))
            flat = rng.integers(0, spec.vocab_size, q * len(cached))
            positions = np.concatenate([np.arange(c, c + q) for c in cached])
            chunks = [Chunk(i * q, q, c, tables.table(i)) for i, c in enumerate(cached)]
            want = model(torch.tensor(flat), torch.tensor(positions), attention_meta(chunks, BLOCK, cpu, 0, kvh),
                         caches[0], torch.arange(flat.size))
            got = graphs.decode(tables, [0, 1, 2], flat, np.asarray(cached), queries=q)
            assert got is not None and torch.allclose(got, want, atol=1e-4)
            real = slice(0, num_blocks * BLOCK)
            assert torch.allclose(caches[1].k[:, real], caches[0].k[:, real], atol=1e-5)
    assert sorted(graphs.graphs) == [(4, 16, 1), (4, 16, 5)]  # 3 sequences padded to 4, a graph per q


@pytest.mark.parametrize("triton_kernels", [False, True])
def test_piecewise_graph_gives_the_eager_pass_logits_and_cache(triton_kernels: bool) -> None:
    """A step with prefill chunks through a piecewise graph (`PiecewiseGraph`, its pieces run as plain calls:
    padded rows, the fixed buffers between pieces, attention between them at the step's exact size) gives
    the plain pass's logits and K/V; a smaller step after it through the same graph too (the rows the first
    step left behind are padding), then a verification step (a token tree's masked chunk and a chain of k + 1,
    logits at every row), and padding writes only the scratch block."""
    from contextlib import nullcontext

    from backend.attention import attention_meta
    from backend.graphs import Eager, PieceBuffers, PiecewiseGraph
    from backend.model import build_model
    from hardware.catalog import get_model
    from hardware.cost import graph_rows

    spec = get_model("tiny-llama")
    assert spec.num_hidden_layers >= 2  # a middle piece runs
    cpu = torch.device("cpu")
    model = build_model(spec, cpu, torch.float32, seed=4)
    kvh = spec.num_key_value_heads
    rng = np.random.default_rng(4)
    tree = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]], bool)
    steps = [([(9, 0), (13, 21), (1, 40)], [20, 37]), ([(5, 9), (2, 0)], [41]),  # (chunks (new, cached), decodes)
             ([(5, 30, tree), (4, 17)], [12])]
    parts_of = [[(n, c, *mask) for n, c, *mask in chunks] + [(1, c) for c in decs] for chunks, decs in steps]
    need = [-(-(n + c) // BLOCK) for parts in parts_of for n, c, *_ in parts]
    num_blocks = sum(need) + 4
    perm = rng.permutation(num_blocks).tolist()
    tables, at = [], 0
    for nb in need:
        tables.append(np.asarray(perm[at:at + nb], dtype=np.int32))
        at += nb
    caches = twin_caches(spec, num_blocks, seed=4)
    bufs = PieceBuffers(model, num_blocks * BLOCK, cpu, torch.float32)
    rows = graph_rows("mixed", 25, 3)
    assert rows == 32  # the first step's 25 tokens padded to 32 rows
    graph = PiecewiseGraph(model, caches[1], rows, bufs, None, lambda step, pool: Eager(step))
    t = iter(tables)
    with kernels_on_cpu() if triton_kernels else nullcontext():
        for i, ((chunk_parts, _), parts) in enumerate(zip(steps, parts_of)):  # chunks, then decodes
            flat, pos, chunks, row = [], [], [], 0
            for n, c, *mask in parts:
                chunks.append(Chunk(row, n, c, next(t), *mask))
                flat += rng.integers(0, spec.vocab_size, n).tolist()
                pos += range(c, c + n)
                row += n
            ends = np.cumsum([n for n, *_ in parts]) - 1
            sample = torch.arange(row) if i == 2 else torch.tensor(ends)  # a verification: logits of every row
            prefills = 0 if i == 2 else len(chunk_parts)  # verifications attend with the decodes
            meta = attention_meta(chunks, BLOCK, cpu, prefills, kvh)
            want = model(torch.tensor(flat), torch.tensor(pos), meta, caches[0], sample)
            got = graph.run(torch.tensor(flat), torch.tensor(pos), meta, sample)
            assert torch.allclose(got, want, atol=1e-4)
            real = slice(0, num_blocks * BLOCK)  # every request's K/V equal; padding wrote only the scratch block
            assert torch.allclose(caches[1].k[:, real], caches[0].k[:, real], atol=1e-5)
            assert torch.allclose(caches[1].v[:, real], caches[0].v[:, real], atol=1e-5)
    assert (bufs.slots[row:rows] == num_blocks * BLOCK).all()  # the last step's padding rows
