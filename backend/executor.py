"""`TorchExecutor`: runs the policies' `Batch`es through the PyTorch model on a real device.

It keeps each request's token ids (its prompt, drawn from a seeded generator, then what it sampled) and
its block table: physical blocks are taken from a free list as the engine's `BlockManager` grows a
request's block count, and returned when the engine frees them (finish or preemption), so the paged cache
holds exactly what the simulator's bookkeeping says. Steps are timed with a device synchronisation on
each side (CUDA events measure the GPU part separately).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from backend.graphs import DecodeGraph, GraphCache
from backend.model import (
    AttentionMeta,
    Chunk,
    PagedKVCache,
    attention_meta,
    build_model,
    cache_slots,
)
from backend.parallel import Shard
from backend.speculative import DraftRunner, accept, ancestry, breadth_first, seeded, tree_accept
from hardware.specs import ModelSpec, kv_heads_per_gpu
from policies.batch import Batch
from policies.state import Requests
from policies.trees import TokenTree
from sim.executor import StepOutcome


def prompt_tokens(seed: int, rid: int, length: int, vocab: int) -> list[int]:
    """The prompt of request `rid`: random token ids, the same in every run with this seed."""
    return np.random.default_rng([seed, rid]).integers(0, vocab, length).tolist()


class TorchExecutor:
    """The engine's `Executor` contract on a PyTorch model (greedy, or temperature sampling)."""

    def __init__(self, spec: ModelSpec, requests: Requests, num_blocks: int, block_size: int,
                 device: str = "cpu", seed: int = 0, temperature: float = 0.0, checkpoint: str | None = None,
                 cuda_graphs: bool = True, shard: Shard = Shard(), draft: ModelSpec | None = None,
                 oracle: bool = False) -> None:
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.spec, self.req, self.seed, self.temperature = spec, requests, seed, temperature
        self.model = build_model(spec, self.device, self.dtype, seed, checkpoint, shard)
        # One block more than the engine's: the scratch slot that padded CUDA-graph rows write to.
        self.cache = PagedKVCache(spec.num_hidden_layers, num_blocks + 1, block_size,
                                  kv_heads_per_gpu(spec, shard.size), spec.head_size, self.dtype, self.device)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = GraphCache(self.model, self.cache, num_blocks, block_size) if self.use_graphs else None
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.capture_seconds = 0.0  # time the last step spent capturing CUDA graphs (a server does it at start)
        # Speculation: a draft model with its own cache (room for every request's KV plus its drafts), and
        # whether verification forces the simulator's drawn acceptance (oracle) or applies the real rule.
        self.draft = None if draft is None else DraftRunner(draft, num_blocks + 256, block_size, self.device,
                                                            self.dtype, seed, self.use_graphs)
        self.oracle = oracle

    # ---- block tables mirror the engine's block counts --------------------------------------------------
    def sync_tables(self, ids: Sequence[int] = ()) -> None:
        """Return the blocks the engine freed to the free list, then give `ids` the blocks it added."""
        for rid in [r for r, table in self.tables.items() if self.req.blocks[r] < len(table)]:
            keep = int(self.req.blocks[rid])  # freed by the engine (finish, preemption)
            self.free_blocks.extend(reversed(self.tables[rid][keep:]))
            del self.tables[rid][keep:]
        if self.draft is not None:  # a finished or preempted request's draft cache goes too
            for rid in [r for r in self.draft.tables if self.req.blocks[r] == 0]:
                self.draft.release(rid)
        for rid in ids:
            table = self.tables.setdefault(rid, [])
            need = int(self.req.blocks[rid]) - len(table)
            if need > len(self.free_blocks):
                raise RuntimeError(f"request {rid} needs {need} more KV blocks; {len(self.free_blocks)} are free")
            if need > 0:  # the free list's last `need` blocks, in the order pop() would give them
                table.extend(self.free_blocks[: -need - 1: -1])
                del self.free_blocks[-need:]

    def _generator(self, rid: int, salt: int = 0) -> torch.Generator:
        """The random stream of request `rid`'s next token: seeded by (seed, request, position[, salt] for a
        speculative step's draws)."""
        key = (rid, len(self.tokens[rid])) + ((salt,) if salt else ())
        return seeded(self.seed, *key, device=self.device)

    def tokens_of(self, rid: int) -> list[int]:
        """Prompt and generated token ids of a request so far."""
        if rid not in self.tokens:
            self.tokens[rid] = prompt_tokens(self.seed, rid, int(self.req.prompt[rid]), self.spec.vocab_size)
        return self.tokens[rid]

    # ---- one step ---------------------------------------------------------------------------------------
    def run(self, batch: Batch) -> StepOutcome:
        t0 = time.perf_counter()
        pre, ver, dec = batch.prefill_ids.tolist(), batch.verify_ids.tolist(), batch.decode_ids.tolist()
        self.sync_tables(pre + ver + dec)
        trees = [breadth_first(t) for t in batch.verify_trees] if batch.verify_trees is not None else None
        drafts, dists, draft_s = self._draft(batch, trees)
        flat_tokens: list[int] = []
        positions: list[int] = []
        chunks: list[Chunk] = []
        sample_rows: list[int] = []
        sample_ids: list[int] = []
        verify_rows: list[int] = []
        parts = list(zip(pre, batch.prefill_tokens.tolist(), batch.prefill_computed.tolist(), [None] * len(pre),
                         [None] * len(pre)))
        parts += [(rid, len(d) + 1, c, d, None if trees is None else trees[i])
                  for i, (rid, c, d) in enumerate(zip(ver, batch.verify_computed.tolist(), drafts))]
        parts += [(rid, 1, c, None, None) for rid, c in zip(dec, batch.decode_computed.tolist())]
        for rid, n, done, draft, tree in parts:
            toks = self.tokens_of(rid)
            mask = None
            if tree is not None:  # the root sees itself, each node the root, its ancestors and itself
                mask = np.zeros((n, n), dtype=bool)
                mask[:, 0] = True
                mask[1:, 1:] = ancestry(tree)
                positions += [done, *(done + tree.depth).tolist()]
            else:
                positions += range(done, done + n)
            chunks.append(Chunk(len(flat_tokens), n, done, self.tables[rid], mask))
            flat_tokens += toks[done:done + n] if draft is None else [toks[done], *draft]
            if draft is not None:  # a verification: the logits of all its k + 1 rows
                verify_rows += range(len(flat_tokens) - n, len(flat_tokens))
            elif done + n == len(toks):  # no known token left uncomputed: this row samples the next one
                sample_rows.append(len(flat_tokens) - 1)
                sample_ids.append(rid)
        dev = self.device
        meta = attention_meta(chunks, self.block_size, dev, len(pre) + len(ver))
        graph = self._graph(batch, meta)
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        if graph is not None:
            logits = graph.run(flat_tokens, positions, meta)
        else:
            logits = self.model(torch.tensor(flat_tokens, device=dev), torch.tensor(positions, device=dev), meta,
                                self.cache, torch.tensor(sample_rows + verify_rows, dtype=torch.long, device=dev))
        sampled, verified = logits[:len(sample_rows)], logits[len(sample_rows):]
        if self.temperature > 0:  # each token from its own seeded draw: outputs do not depend on batching
            probs = torch.softmax(sampled / self.temperature, dim=-1)
            new = torch.stack([torch.multinomial(p, 1, generator=self._generator(rid))[0]
                               for p, rid in zip(probs, sample_ids)]) if sample_ids else sampled.argmax(dim=-1)
        else:
            new = sampled.argmax(dim=-1)
        accepted = None
        if ver:
            accepted = (self._verify(batch, verified, drafts, dists) if trees is None
                        else self._verify_trees(batch, trees, verified, drafts))
        gpu = float("nan")
        if dev.type == "cuda":
            end.record()
            end.synchronize()
            gpu = start.elapsed_time(end) / 1e3
        new_ids = new.tolist()
        for rid, tok in zip(sample_ids, new_ids):
            self.tokens[rid].append(tok)
        self.capture_seconds = sum(g.take_capture_seconds() for g in (self.graphs, self.draft and self.draft.graphs)
                                   if g is not None)
        return StepOutcome(seconds=time.perf_counter() - t0 - self.capture_seconds,
                           execution="graph" if graph else "eager", gpu_seconds=gpu, draft_seconds=draft_s,
                           accepted=accepted)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _draft(self, batch: Batch, trees: list[TokenTree] | None) -> tuple[list[list[int]], list[list[torch.Tensor]],
                                                                          float]:
        """The draft model's part of a step: catch up on prefill chunks, then propose each verification's
        drafts (`trees`: the batch's token trees in breadth-first order); returns the drafts, their
        distributions (when sampling) and the seconds it took."""
        if self.draft is None:
            if batch.verify_ids.size:
                raise RuntimeError("a batch with verifications needs a draft model (speculation.draft)")
            return [], [], 0.0
        self._sync()
        t0 = time.perf_counter()
        if batch.prefill_ids.size:
            self.draft.catch_up(batch.prefill_ids.tolist(), (batch.prefill_computed + batch.prefill_tokens).tolist(),
                                self.tokens_of)
        if trees is not None:
            if self.temperature > 0:
                raise RuntimeError("token-tree speculation in the backend is greedy only (temperature 0)")
            drafts = self.draft.propose_tree(batch.verify_ids.tolist(), trees, self.tokens_of)
            dists: list[list[torch.Tensor]] = [[] for _ in drafts]
        else:
            drafts, dists = self.draft.propose(batch.verify_ids.tolist(), batch.verify_drafts.tolist(),
                                               self.tokens_of, self.temperature,
                                               lambda rid, j: self._generator(rid, 1 + j))
        self._sync()
        return drafts, dists, time.perf_counter() - t0

    def _verify(self, batch: Batch, logits: torch.Tensor, drafts: list[list[int]],
                dists: list[list[torch.Tensor]]) -> np.ndarray:
        """Apply the acceptance rule (or the oracle's counts) to every verification; append its tokens."""
        accepted = np.zeros(batch.verify_ids.size, dtype=np.int64)
        row = 0
        for i, (rid, c) in enumerate(zip(batch.verify_ids.tolist(), batch.verify_computed.tolist())):
            k = len(drafts[i])
            forced = int(batch.verify_accepted[i]) if self.oracle else None
            gen = self._generator(rid, 0) if self.temperature > 0 else None
            a, new = accept(logits[row:row + k + 1], drafts[i], dists[i], self.temperature, gen, forced)
            row += k + 1
            accepted[i] = a
            room = int(self.req.output[rid] - self.req.generated[rid])
            self.tokens[rid].extend(new[:room])  # never past the output length
            assert self.draft is not None
            self.draft.rollback(rid, c + 1 + min(a, k - 1))  # its cache holds the newest token and drafts 1..k-1
        return accepted

    def _verify_trees(self, batch: Batch, trees: list[TokenTree], logits: torch.Tensor,
                      drafts: list[list[int]]) -> np.ndarray:
        """Greedy tree verification (or the oracle's depth along rank-0 children); the accepted nodes' K/V
        move from the tree's slots to the positions after the root, where the next steps read them."""
        accepted = np.zeros(batch.verify_ids.size, dtype=np.int64)
        row = 0
        for i, (rid, c) in enumerate(zip(batch.verify_ids.tolist(), batch.verify_computed.tolist())):
            tree = trees[i]
            forced = int(batch.verify_accepted[i]) if self.oracle else None
            path, new = tree_accept(logits[row:row + tree.size + 1], tree, drafts[i], forced)
            row += tree.size + 1
            accepted[i] = len(path)
            src = np.array([c + 1 + node for node in path], dtype=np.int64)
            dst = c + 1 + np.arange(len(path))
            if len(path) and (src != dst).any():
                s_idx = torch.from_numpy(cache_slots(self.tables[rid], src, self.block_size)).to(self.device)
                d_idx = torch.from_numpy(cache_slots(self.tables[rid], dst, self.block_size)).to(self.device)
                self.cache.k[:, d_idx] = self.cache.k[:, s_idx]
                self.cache.v[:, d_idx] = self.cache.v[:, s_idx]
            room = int(self.req.output[rid] - self.req.generated[rid])
            self.tokens[rid].extend(new[:room])
        return accepted

    def _graph(self, batch: Batch, meta: AttentionMeta) -> DecodeGraph | None:
        """The captured graph for a decode-only batch (captured on first use), or None to run eagerly."""
        n = batch.decode_ids.size
        if self.graphs is None or batch.prefill_ids.size or batch.verify_ids.size or not n:
            return None
        return self.graphs.get(n, meta)
