"""Speculative decoding in the real backend: a draft model with its own paged KV cache, and the standard
lossless acceptance rule (Leviathan et al., ICML 2023; Chen et al., 2023).

The draft keeps, per request, how many of the request's tokens its cache holds (`done`) and catches up
on the rest whenever it runs (the prompt's chunks during prefill steps; after a verification, the target's
token, and the last draft where all k were accepted, which it proposed but never ran; after a tree, the
accepted path too). `propose` runs it autoregressively for k_i steps per
request, greedy or sampled. `accept` applies the rule to the target's logits over the k + 1 verified
positions: greedy, a draft is accepted while it equals the target's argmax, and the target's own token
follows, so the output is exactly plain greedy decoding; sampled, draft token d is accepted with
probability min(1, p(d) / q(d)), a rejection draws from normalise(max(p - q, 0)), and a fully accepted
draft gets a bonus token from p, so the output distribution is the target's. An oracle mode forces the
acceptance counts the simulator drew (random weights never agree) while running the same kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from backend.attention import Chunk, attention_meta
from backend.block_table import BlockTables
from backend.graphs import GraphCache
from backend.model import PagedKVCache, build_model, warm_up_kernels
from hardware.cost import graph_rows
from hardware.specs import ModelSpec
from policies.trees import TokenTree


class DraftRunner:
    """A draft model on the target's device with its own paged cache of `num_blocks` blocks."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int, graph_mode: str = "none") -> None:
        self.spec, self.device, self.block_size = spec, device, block_size
        self.model = build_model(spec, device, dtype, seed)
        # One block more than it hands out: the scratch slot of padded CUDA-graph rows.
        self.cache = PagedKVCache(spec.num_hidden_layers, num_blocks + 1, block_size, spec.num_key_value_heads,
                                  spec.head_size, dtype, device)
        warm_up_kernels(spec, 1, spec.num_key_value_heads, block_size, dtype, device)
        self.graph_mode = graph_mode  # its passes run as the target's do (`hardware.cost.graph_rows`)
        self.graphs = GraphCache(self.model, self.cache, num_blocks, block_size) if graph_mode != "none" else None
        self.blocks = BlockTables(num_blocks)
        self.done: dict[int, int] = {}

    def release(self, rid: int) -> None:
        """Forget a request (finished or preempted): its blocks return to the free list."""
        self.blocks.resize(rid, 0)
        self.done.pop(rid, None)

    def rollback(self, rid: int, valid: int) -> None:
        """Only the first `valid` tokens of the request's draft cache are still right (rejected drafts)."""
        if rid in self.done:
            self.done[rid] = min(self.done[rid], valid)

    def _table(self, rid: int, tokens: int) -> np.ndarray:
        need = -(-tokens // self.block_size)
        if need > self.blocks.held(rid):
            if need - self.blocks.held(rid) > len(self.blocks.free):
                raise RuntimeError(f"draft KV cache full: request {rid} needs {need - self.blocks.held(rid)} more "
                                   f"blocks, {len(self.blocks.free)} free")
            self.blocks.resize(rid, need)
        return self.blocks.table(rid)

    def _forward(self, feeds: list[tuple[int, list[int]]], prefill: bool = False,
                 device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run each (request, tokens after its cached ones) through the draft; last-row logits of each.
        `device_tokens`: the tokens themselves, on the device (the feeds' lists only count them)."""
        parts = []
        for rid, toks in feeds:
            done = self.done.get(rid, 0)
            parts.append((rid, toks, done, list(range(done, done + len(toks))), None))
            self.done[rid] = done + len(toks)
        return self._run(parts, last_only=True, prefill=prefill, device_tokens=device_tokens)

    def _run(self, parts: list[tuple[int, list[int], int, list[int], np.ndarray | None]],
             last_only: bool, prefill: bool = False, device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One pass over (request, tokens, cached tokens before them, positions, tree mask) parts; the
        logits of each part's last row, or of every row. Prompt chunks (`prefill`) attend in the prefill
        kernel; the few tokens of a catch-up after a verification, or of a tree's level, in the decode kernel,
        as the target's verifications do. As many tokens for every part, no tree and no prompt chunk: a full
        graph (decodes, or uniform catch-ups), as the target's uniform steps. `device_tokens`: the flat
        tokens on the device instead of the parts' lists."""
        flat: list[int] = []
        positions: list[int] = []
        chunks: list[Chunk] = []
        rows: list[int] = []
        for rid, toks, cached, pos, mask in parts:
            table = self._table(rid, cached + len(toks))
            chunks.append(Chunk(len(flat), len(toks), cached, table, mask, self.blocks.row[rid]))
            rows += [len(flat) + len(toks) - 1] if last_only else list(range(len(flat), len(flat) + len(toks)))
            flat += toks
            positions += pos
        multi = sum(c.length > 1 or c.mask is not None for c in chunks)
        prefills = len(chunks) if prefill and multi else 0
        graph = None if self.graphs is None else graph_rows(self.graph_mode, len(flat), prefills, multi)
        q = chunks[0].length
        if self.graphs is not None and graph is not None and not prefills and \
                all(c.length == q and c.mask is None for c in chunks):
            ids = [rid for rid, *_ in parts]
            done = np.asarray([c.cached for c in chunks], np.int64)
            logits = self.graphs.decode(self.blocks, ids, np.asarray(flat, np.int64), done, queries=q,
                                        device_tokens=device_tokens)
            if logits is not None:
                return logits if not last_only or q == 1 else logits[q - 1::q]
        dev = self.device
        meta = attention_meta(chunks, self.block_size, dev, prefills, self.cache.k.shape[2], self.blocks.array)
        tokens = torch.tensor(flat, device=dev) if device_tokens is None else device_tokens
        args = (tokens, torch.tensor(positions, device=dev), meta)
        logit_rows = torch.tensor(rows, dtype=torch.long, device=dev)
        if self.graphs is not None and graph is not None:  # chunks (catch-up, tree levels): piecewise graphs
            return self.graphs.mixed(graph, *args, logit_rows)
        return self.model(*args, self.cache, logit_rows)

    def catch_up(self, ids: Sequence[int], upto: Sequence[int], tokens_of: Callable[[int], list[int]]) -> None:
        """Bring each request's draft cache to its first `upto` tokens (prompt chunks during prefill)."""
        feeds = [(rid, tokens_of(rid)[self.done.get(rid, 0):n]) for rid, n in zip(ids, upto)]
        feeds = [(rid, toks) for rid, toks in feeds if toks]
        if feeds:
            self._forward(feeds, prefill=True)

    def propose(self, ids: Sequence[int], ks: Sequence[int], tokens_of: Callable[[int], list[int]],
                temperature: float, generator: Callable[[int, int], torch.Generator]
                ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """k_i draft tokens per request (and, when sampling, the draft distribution of each)."""
        drafts: list[list[int]] = [[] for _ in ids]
        dists: list[list[torch.Tensor]] = [[] for _ in ids]
        if temperature <= 0:
            return self._propose_greedy(ids, ks, tokens_of), dists
        for step in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if k > step]
            feeds = [(ids[i], tokens_of(ids[i])[self.done.get(ids[i], 0):] if step == 0 else [drafts[i][-1]])
                     for i in live]
            logits = self._forward(feeds)
            for row, i in enumerate(live):
                q = torch.softmax(logits[row] / temperature, dim=-1)
                drafts[i].append(int(torch.multinomial(q, 1, generator=generator(ids[i], step))[0]))
                dists[i].append(q)
        return drafts, dists

    def _propose_greedy(self, ids: Sequence[int], ks: Sequence[int], tokens_of: Callable[[int], list[int]]
                        ) -> list[list[int]]:
        """Greedy chains: each step's argmax stays on the device and is the next step's input (vLLM's
        proposer loop), so the host prepares a step while the GPU still runs the one before; the drafts
        come to the host in one copy at the end."""
        picks: list[torch.Tensor] = []
        lives: list[list[int]] = []
        for step in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if k > step]
            if step == 0:
                logits = self._forward([(ids[i], tokens_of(ids[i])[self.done.get(ids[i], 0):]) for i in live])
            else:
                last = picks[-1]
                if live != lives[-1]:  # requests whose k_i ran out leave: their rows of the last step go
                    last = last[self._index([lives[-1].index(i) for i in live])]
                logits = self._forward([(ids[i], [0]) for i in live], device_tokens=last)
            picks.append(logits.argmax(dim=-1))
            lives.append(live)
        drafts: list[list[int]] = [[] for _ in ids]
        best = iter(torch.cat(picks).tolist() if picks else [])
        for live in lives:
            for i in live:
                drafts[i].append(next(best))
        return drafts

    def _index(self, rows: list[int]) -> torch.Tensor:
        """`rows` as an index tensor on the device, copied from pinned memory without waiting for the GPU."""
        host = torch.tensor(rows, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)


    def propose_tree(self, ids: Sequence[int], trees: Sequence[TokenTree], tokens_of: Callable[[int], list[int]]
                     ) -> list[list[int]]:
        """Greedy token trees (nodes in breadth-first order): a node of rank r is the draft's (r+1)-th most
        likely token after its parent. Level by level, each level's nodes attend to the context and their
        ancestors (a tree mask over the draft's cache); afterwards only the context stays valid."""
        tokens: list[list[int]] = [[0] * t.size for t in trees]
        roots = [len(tokens_of(rid)) - 1 for rid in ids]  # the newest token's position
        depth = [t.depth for t in trees]
        logits = self._forward([(rid, tokens_of(rid)[self.done.get(rid, 0):]) for rid in ids])
        for i, t in enumerate(trees):
            self._children(tokens[i], t, -1, logits[i])
        for level in range(1, max((t.max_depth for t in trees), default=0)):
            parts, owners = [], []
            for i, (rid, t) in enumerate(zip(ids, trees)):
                nodes = np.flatnonzero(depth[i] == level)
                if not nodes.size or not np.isin(nodes, t.parent).any():
                    continue
                first, last = int(nodes[0]), int(nodes[-1]) + 1
                mask = ancestry(t)[first:last, :last]
                parts.append((rid, [tokens[i][n] for n in range(first, last)], roots[i] + 1 + first,
                              [roots[i] + level] * (last - first), mask))
                owners.append((i, first, last))
            if not parts:
                break
            out = self._run(parts, last_only=False)
            row = 0
            for i, first, last in owners:
                for node in range(first, last):
                    self._children(tokens[i], trees[i], node, out[row])
                    row += 1
        for rid, root in zip(ids, roots):
            self.rollback(rid, root + 1)  # the tree's KV sat past the context: only the context is kept
        return tokens

    @staticmethod
    def _children(tokens: list[int], tree: TokenTree, node: int, logits: torch.Tensor) -> None:
        kids = np.flatnonzero(tree.parent == node)
        if kids.size:
            ranked = torch.topk(logits, int(tree.rank[kids].max()) + 1).indices.tolist()
            for k in kids.tolist():
                tokens[k] = ranked[int(tree.rank[k])]


def breadth_first(tree: TokenTree) -> TokenTree:
    """The same tree with its nodes ordered by depth (stable), as the backend lays them out."""
    order = np.lexsort((np.arange(tree.size), tree.depth))
    where = np.empty(tree.size, dtype=np.int64)
    where[order] = np.arange(tree.size)
    parent = np.array([-1 if q < 0 else where[q] for q in tree.parent[order].tolist()], dtype=np.int64)
    return TokenTree(parent, tree.rank[order].copy())


def ancestry(tree: TokenTree) -> np.ndarray:
    """mask[i, j]: node j is node i or one of its ancestors (nodes in an order with parents first)."""
    mask = np.eye(tree.size, dtype=bool)
    for i, q in enumerate(tree.parent.tolist()):
        if q >= 0:
            mask[i] |= mask[q]
    return mask


def tree_accept(best: list[int], tree: TokenTree, tokens: list[int], forced: int | None = None
                ) -> tuple[list[int], list[int]]:
    """Greedy verification of a tree (`best`: the target's argmax at each row, the root's, then the nodes'):
    from the root, move to the child whose token is the target's argmax, while one is. Returns the accepted
    nodes and the tokens to append (theirs and the target's next). `forced` (oracle): follow rank-0 children
    that many levels instead."""
    path: list[int] = []
    node = -1
    while True:
        kids = np.flatnonzero(tree.parent == node).tolist()
        if forced is not None:
            nxt = next((k for k in kids if tree.rank[k] == 0), None) if len(path) < forced else None
        else:
            nxt = next((k for k in kids if tokens[k] == best[node + 1]), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path, [tokens[k] for k in path] + [best[node + 1]]


def accept(target_logits: torch.Tensor, drafts: list[int], dists: list[torch.Tensor], temperature: float,
           generator: torch.Generator | None, forced: int | None = None, best: list[int] | None = None
           ) -> tuple[int, list[int]]:
    """(accepted drafts, tokens to append) for one request from the target's logits over its k + 1 rows.
    `forced`: the oracle's accepted count (the drafts up to it are kept whatever the target says); `best`
    (greedy only): the target's argmax at those rows, which the caller takes for the whole batch at once."""
    k = len(drafts)
    if temperature <= 0:
        assert best is not None, "accept: greedy acceptance takes the rows' argmax (best)"
        if forced is not None:
            a = min(forced, k)
        else:
            a = next((j for j in range(k) if drafts[j] != best[j]), k)
        return a, drafts[:a] + [best[a]]
    p = torch.softmax(target_logits / temperature, dim=-1)
    a = 0
    while a < k:
        if forced is not None:
            if a >= forced:
                break
        else:
            d, q = drafts[a], dists[a]
            u = float(torch.rand(1, generator=generator)[0])
            if u * float(q[d]) > float(p[a, d]):
                break
        a += 1
    if a == k:
        tail = p[k]
    elif forced is not None:
        tail = p[a]
    else:
        tail = torch.clamp(p[a] - dists[a], min=0.0)
        tail = tail / tail.sum() if float(tail.sum()) > 0 else p[a]
    bonus = int(torch.multinomial(tail, 1, generator=generator)[0])
    return a, drafts[:a] + [bonus]


def seeded(seed: int, *key: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, key...): draws do not depend on batching or step order."""
    state = int(np.random.SeedSequence([seed, *key]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)
