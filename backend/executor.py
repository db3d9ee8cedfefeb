"""`TorchExecutor`: runs the policies' `Batch`es through the PyTorch model on a real device.

It keeps each request's token ids (its prompt, drawn from a seeded generator, then what it sampled) and
its block table (`backend.block_table`): physical blocks are taken from a free list as the engine's
`BlockManager` grows a request's block count, and returned when the engine frees them (finish or
preemption), so the paged cache holds exactly what the simulator's bookkeeping says. A request preempted by
swap (`kv_cache.preemption: swap`: it keeps its computed tokens while holding no block) has its K/V copied to
host memory (pinned on CUDA) before its blocks go, and back into its new blocks when it is admitted again,
inside the steps' timed span, as vLLM's swap does. With prefix caching the engine's `BlockManager` keeps a
journal of releases, hits, newly cached blocks and evictions, which the executor follows so that requests
with equal block keys share physical blocks (prompt tokens are drawn per key, so shared blocks hold the
same tokens). Decode-only steps and uniform verifications (k + 1 tokens for every request) replay whole CUDA
graphs, and other steps of up to 512 tokens with prefill chunks or verifications piecewise graphs, attention
between the pieces (`backend.graphs`); other steps run eagerly. Steps are timed with a device synchronisation on
each side (CUDA events measure the GPU part separately).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from backend.attention import AttentionMeta, Chunk, attention_meta, cache_slots
from backend.block_table import BlockTables
from backend.graphs import GraphCache
from backend.model import PagedKVCache, build_model, warm_up_kernels
from backend.parallel import Shard
from backend.speculative import DraftRunner, accept, ancestry, breadth_first, seeded, tree_accept
from hardware.cost import graph_mode, graph_rows
from hardware.specs import ModelSpec, kv_heads_per_gpu
from policies.acceptance import Acceptance
from policies.batch import Batch
from policies.kv_cache import CACHED, DROP, HIT
from policies.state import Requests, Status
from policies.trees import TokenTree
from sim.executor import StepOutcome


def prompt_tokens(seed: int, rid: int, length: int, vocab: int, keys: np.ndarray | None = None,
                  block_size: int = 16) -> list[int]:
    """The prompt of request `rid`: random token ids, the same in every run with this seed. Its blocks with a
    prefix-cache key (`keys[j]`: block j's) take the tokens of that key, so that requests whose keys are equal
    share those tokens, as the prefix cache assumes."""
    tokens = np.random.default_rng([seed, rid]).integers(0, vocab, length)
    for j, key in enumerate(([] if keys is None else keys.tolist())[:length // block_size]):
        block = np.random.default_rng([seed, 7, key]).integers(0, vocab, block_size)
        tokens[j * block_size:(j + 1) * block_size] = block
    return tokens.tolist()


class TorchExecutor:
    """The engine's `Executor` contract on a PyTorch model (greedy, or temperature sampling)."""

    def __init__(self, spec: ModelSpec, requests: Requests, num_blocks: int, block_size: int,
                 device: str = "cpu", seed: int = 0, temperature: float = 0.0, checkpoint: str | None = None,
                 cuda_graphs: bool | str = True, shard: Shard = Shard(), draft: ModelSpec | None = None,
                 oracle: Acceptance | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.spec, self.req, self.seed, self.temperature = spec, requests, seed, temperature
        self.model = build_model(spec, self.device, self.dtype, seed, checkpoint, shard)
        # One block more than the engine's: the scratch slot that padded CUDA-graph rows write to.
        self.cache = PagedKVCache(spec.num_hidden_layers, num_blocks + 1, block_size,
                                  kv_heads_per_gpu(spec, shard.size), spec.head_size, self.dtype, self.device)
        warm_up_kernels(spec, shard.size, self.cache.k.shape[2], block_size, self.dtype, self.device)
        self.graph_mode = graph_mode(cuda_graphs) if self.device.type == "cuda" else "none"
        self.use_graphs = self.graph_mode != "none"
        self.graphs = GraphCache(self.model, self.cache, num_blocks, block_size) if self.use_graphs else None
        self.block_size = block_size
        self.blocks = BlockTables(num_blocks)
        self.tokens: dict[int, list[int]] = {}
        self.host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # swapped-out requests' K and V
        # Prefix caching: the engine's `BlockManager.journal` and the physical block of each cached key
        self.journal: list[tuple[int, ...]] | None = None
        self.key_block: dict[int, int] = {}
        self.capture_seconds = 0.0  # time the last step spent capturing CUDA graphs (a server does it at start)
        # Speculation: a draft model with its own cache (room for every request's KV plus its drafts), and
        # the acceptance model whose draws verification forces (oracle), or None for the real rule.
        self.draft = None if draft is None else DraftRunner(draft, num_blocks + 256, block_size, self.device,
                                                            self.dtype, seed, self.graph_mode)
        self.oracle = oracle

    # ---- block tables mirror the engine's block counts --------------------------------------------------
    def sync_tables(self, ids: Sequence[int] = ()) -> None:
        """Return the blocks the engine freed to the free list, then give `ids` the blocks it added."""
        r = self.req
        if self.journal:
            self._follow_journal()
        for rid in [i for i in self.blocks.ids() if r.blocks[i] < self.blocks.held(i)]:
            if r.blocks[rid] == 0 and r.computed[rid] and r.status[rid] == Status.WAITING:
                self._swap_out(rid)  # preempted by swap: its computed tokens' K/V must survive
            self.blocks.resize(rid, int(r.blocks[rid]))  # freed by the engine (finish, preemption)
        if self.draft is not None:  # a finished or preempted request's draft cache goes too
            for rid in [i for i in self.draft.blocks.ids() if r.blocks[i] == 0]:
                self.draft.release(rid)
        for rid in ids:
            if r.blocks[rid] > self.blocks.held(rid):
                self.blocks.resize(rid, int(r.blocks[rid]))
                if rid in self.host:
                    self._swap_in(rid)
        for rid in [i for i in self.host if r.status[i] == Status.REJECTED]:  # swapped, then never resumed
            del self.host[rid]

    def _follow_journal(self) -> None:
        """Apply the prefix cache's changes since the last step, in order: a released request's table goes
        (its cached blocks stay, pinned), a hit starts a table with the cached blocks of its keys, a newly
        cached block is pinned under its key, an evicted one unpinned (freed unless a table still holds it)."""
        assert self.journal is not None
        for entry in self.journal:
            if entry[0] == DROP:
                self.blocks.resize(entry[1], 0)
            elif entry[0] == HIT:
                assert entry[1] not in self.blocks, "a prefix hit for a request that holds blocks"
                self.blocks.extend(entry[1], [self.key_block[k] for k in entry[2:]])
            elif entry[0] == CACHED:
                _, rid, j, key = entry
                self.key_block[key] = int(self.blocks.table(rid)[j])
                self.blocks.pin(self.key_block[key])
            else:
                self.blocks.unpin(self.key_block.pop(entry[1]))
        self.journal.clear()

    def _slots(self, rid: int, tokens: int) -> torch.Tensor:
        return torch.from_numpy(cache_slots(self.blocks.table(rid), np.arange(tokens), self.block_size)).to(self.device)

    def _swap_out(self, rid: int) -> None:
        """Copy the K/V of `rid`'s computed tokens to host memory (before its blocks are freed)."""
        slots = self._slots(rid, int(self.req.computed[rid]))
        pin = self.device.type == "cuda"
        copies = []
        for src in (self.cache.k, self.cache.v):
            host = torch.empty((src.shape[0], slots.numel(), *src.shape[2:]), dtype=src.dtype, pin_memory=pin)
            host.copy_(src[:, slots], non_blocking=pin)
            copies.append(host)
        self.host[rid] = (copies[0], copies[1])

    def _swap_in(self, rid: int) -> None:
        """Copy `rid`'s swapped K/V back into its (new) blocks."""
        k, v = self.host.pop(rid)
        slots = self._slots(rid, k.shape[1])
        self.cache.k[:, slots] = k.to(self.device, non_blocking=True)
        self.cache.v[:, slots] = v.to(self.device, non_blocking=True)

    def _generator(self, rid: int, salt: int = 0) -> torch.Generator:
        """The random stream of request `rid`'s next token: seeded by (seed, request, position[, salt] for a
        speculative step's draws)."""
        key = (rid, len(self.tokens[rid])) + ((salt,) if salt else ())
        return seeded(self.seed, *key, device=self.device)

    def tokens_of(self, rid: int) -> list[int]:
        """Prompt and generated token ids of a request so far."""
        if rid not in self.tokens:
            self.tokens[rid] = prompt_tokens(self.seed, rid, int(self.req.prompt[rid]), self.spec.vocab_size,
                                             self.req.keys_of(rid), self.block_size)
        return self.tokens[rid]

    def warm_up(self, max_tokens: int) -> None:
        """Eager passes of the shapes serving meets (one prefill of each size class up to `max_tokens`, and a
        mixed pass of several chunks and decodes) over the scratch block, before serving, as engines do at
        start: the GEMM libraries' kernel choices and lazy module loads, Triton's specialisations and the
        allocator's growth then happen here instead of in the first requests' steps. Off CUDA nothing compiles
        or is timed: passes of up to 65 tokens only, so that the CPU tests cover this code (Triton's
        interpreter took 9 of the tree replay test's 11 minutes in the larger ones)."""
        bs = self.block_size
        scratch = self.cache.k.shape[1] // bs - 1
        sizes = sorted({n for n in (1, 16, 17, 64, 65, 129, 385, 2048, max_tokens) if n <= max_tokens})
        cuda = self.device.type == "cuda"
        if not cuda:
            sizes = [n for n in sizes if n <= 65]
        # (new tokens, cached): 2 chunks, 5 decodes
        mixed = [(min(100 if cuda else 16, max_tokens), 0), (7, 40)] + [(1, 300)] * 5
        for chunks, prefills in [([(n, 0)], 1) for n in sizes] + [(mixed, 2)]:
            starts = np.cumsum([0] + [n for n, _ in chunks])
            flat = [Chunk(int(at), n, done, [scratch] * -(-(done + n) // bs)) for (n, done), at in zip(chunks, starts)]
            meta = attention_meta(flat, bs, self.device, prefills, self.cache.k.shape[2])
            positions = np.concatenate([np.arange(done, done + n) for n, done in chunks])
            rows = torch.tensor(starts[1:] - 1, dtype=torch.long, device=self.device)
            self.model(torch.zeros(int(starts[-1]), dtype=torch.long, device=self.device),
                       torch.from_numpy(positions).to(self.device), meta, self.cache, rows)
        self._sync()

    # ---- one step ---------------------------------------------------------------------------------------
    def run(self, batch: Batch) -> StepOutcome:
        t0 = time.perf_counter()
        pre, ver, dec = batch.prefill_ids.tolist(), batch.verify_ids.tolist(), batch.decode_ids.tolist()
        self.sync_tables(pre + ver + dec)
        trees = [breadth_first(t) for t in batch.verify_trees] if batch.verify_trees is not None else None
        drafts, dists, draft_s = self._draft(batch, trees)
        rows = None if self.graphs is None else graph_rows(self.graph_mode, batch.num_tokens, len(pre), len(ver))
        graph, mixed = rows is not None and not (pre or ver), rows is not None and bool(pre or ver)
        dev = self.device
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        full = self._verify_graph(batch, drafts, start) if mixed and trees is None else None
        if graph:
            sample_ids, logits = dec, self._decode_graph(dec, batch.decode_computed, start)
        elif full is not None:
            sample_ids, logits = [], full
        else:
            inputs = self.pass_inputs(batch, drafts, trees)
            sample_ids = inputs.sample_ids
            if mixed:
                assert self.graphs is not None and rows is not None
                logits = self.graphs.mixed(rows, inputs.tokens, inputs.positions, inputs.meta, inputs.logit_rows,
                                           start)
            else:
                if dev.type == "cuda":
                    start.record()
                logits = self.forward(inputs)
        sampled, verified = logits[:len(sample_ids)], logits[len(sample_ids):]
        if self.temperature > 0:  # each token from its own seeded draw: outputs do not depend on batching
            probs = torch.softmax(sampled / self.temperature, dim=-1)
            new = torch.stack([torch.multinomial(p, 1, generator=self._generator(rid))[0]
                               for p, rid in zip(probs, sample_ids)]) if sample_ids else sampled.argmax(dim=-1)
        else:
            new = sampled.argmax(dim=-1)
        accepted = None
        if ver:
            forced = None if self.oracle is None else self.oracle.sample(batch)
            accepted = (self._verify(batch, verified, drafts, dists, forced) if trees is None
                        else self._verify_trees(batch, trees, verified, drafts, forced))
        gpu = float("nan")
        if dev.type == "cuda":
            end.record()
            end.synchronize()
            gpu = start.elapsed_time(end) / 1e3
        new_ids = new.tolist()
        for rid, tok in zip(sample_ids, new_ids):
            self.tokens[rid].append(tok)
        draft_capture = self.draft.graphs.take_capture_seconds() if self.draft and self.draft.graphs else 0.0
        self.capture_seconds = draft_capture + (self.graphs.take_capture_seconds() if self.graphs else 0.0)
        draft_s -= draft_capture  # (captures belong to the server's start, not to the step)
        return StepOutcome(seconds=time.perf_counter() - t0 - self.capture_seconds,
                           execution="graph" if graph or mixed else "eager", gpu_seconds=gpu, draft_seconds=draft_s,
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
                dists: list[list[torch.Tensor]], forced: np.ndarray | None) -> np.ndarray:
        """Apply the acceptance rule (or the oracle's `forced` counts) to every verification; append its tokens."""
        accepted = np.zeros(batch.verify_ids.size, dtype=np.int64)
        row = 0
        best = logits.argmax(dim=-1).tolist() if self.temperature <= 0 else None  # one copy for the batch
        for i, (rid, c) in enumerate(zip(batch.verify_ids.tolist(), batch.verify_computed.tolist())):
            k = len(drafts[i])
            gen = self._generator(rid, 0) if self.temperature > 0 else None
            a, new = accept(logits[row:row + k + 1], drafts[i], dists[i], self.temperature, gen,
                            None if forced is None else int(forced[i]), None if best is None else best[row:row + k + 1])
            row += k + 1
            accepted[i] = a
            room = int(self.req.output[rid] - self.req.generated[rid])
            self.tokens[rid].extend(new[:room])  # never past the output length
            assert self.draft is not None
            self.draft.rollback(rid, c + 1 + min(a, k - 1))  # its cache holds the newest token and drafts 1..k-1
        return accepted

    def _verify_trees(self, batch: Batch, trees: list[TokenTree], logits: torch.Tensor,
                      drafts: list[list[int]], forced: np.ndarray | None) -> np.ndarray:
        """Greedy tree verification (or the oracle's `forced` depth along rank-0 children); the accepted nodes' K/V
        move from the tree's slots to the positions after the root, where the next steps read them."""
        accepted = np.zeros(batch.verify_ids.size, dtype=np.int64)
        row = 0
        best = logits.argmax(dim=-1).tolist()  # one copy for the batch
        for i, (rid, c) in enumerate(zip(batch.verify_ids.tolist(), batch.verify_computed.tolist())):
            tree = trees[i]
            path, new = tree_accept(best[row:row + tree.size + 1], tree, drafts[i],
                                    None if forced is None else int(forced[i]))
            row += tree.size + 1
            accepted[i] = len(path)
            src = np.array([c + 1 + node for node in path], dtype=np.int64)
            dst = c + 1 + np.arange(len(path))
            if len(path) and (src != dst).any():
                s_idx = torch.from_numpy(cache_slots(self.blocks.table(rid), src, self.block_size)).to(self.device)
                d_idx = torch.from_numpy(cache_slots(self.blocks.table(rid), dst, self.block_size)).to(self.device)
                self.cache.k[:, d_idx] = self.cache.k[:, s_idx]
                self.cache.v[:, d_idx] = self.cache.v[:, s_idx]
            room = int(self.req.output[rid] - self.req.generated[rid])
            self.tokens[rid].extend(new[:room])
        return accepted

    def _decode_graph(self, dec: list[int], done: np.ndarray, start: torch.cuda.Event) -> torch.Tensor:
        """Logits of a decode-only step through its CUDA graph (captured on first use)."""
        assert self.graphs is not None
        tokens = np.fromiter((self.tokens_of(rid)[c] for rid, c in zip(dec, done.tolist())), np.int64, len(dec))
        logits = self.graphs.decode(self.blocks, dec, tokens, done, start)
        assert logits is not None
        return logits

    def _verify_graph(self, batch: Batch, drafts: list[list[int]], start: torch.cuda.Event) -> torch.Tensor | None:
        """Logits of a step of uniform verifications (every request k + 1 tokens: no prefill chunk, decode or
        token tree) through a full graph, or None: the step runs piecewise (`hardware.cost.full_graph_rows`)."""
        ks = batch.verify_drafts
        if self.graph_mode != "mixed" or batch.prefill_ids.size or batch.decode_ids.size or not ks.size \
                or ks[0] < 1 or (ks != ks[0]).any():
            return None
        assert self.graphs is not None
        ids, done = batch.verify_ids.tolist(), batch.verify_computed
        tokens = np.array([[self.tokens_of(rid)[c], *d] for rid, c, d in zip(ids, done.tolist(), drafts)], np.int64)
        return self.graphs.decode(self.blocks, ids, tokens.ravel(), done, start, queries=int(ks[0]) + 1)

    def pass_inputs(self, batch: Batch, drafts: list[list[int]], trees: list[TokenTree] | None) -> PassInputs:
        """The device inputs of one eager pass: prefill chunks, verifications (their k + 1 rows, or token trees),
        then decodes; which requests sample a token, and the flat rows whose logits come back."""
        pre, ver, dec = batch.prefill_ids.tolist(), batch.verify_ids.tolist(), batch.decode_ids.tolist()
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
            chunks.append(Chunk(len(flat_tokens), n, done, self.blocks.table(rid), mask, self.blocks.row[rid]))
            flat_tokens += toks[done:done + n] if draft is None else [toks[done], *draft]
            if draft is not None:  # a verification: the logits of all its k + 1 rows
                verify_rows += range(len(flat_tokens) - n, len(flat_tokens))
            elif done + n == len(toks):  # no known token left uncomputed: this row samples the next one
                sample_rows.append(len(flat_tokens) - 1)
                sample_ids.append(rid)
        dev = self.device
        meta = attention_meta(chunks, self.block_size, dev, len(pre), self.cache.k.shape[2], self.blocks.array)
        return PassInputs(torch.tensor(flat_tokens, device=dev), torch.tensor(positions, device=dev), meta,
                          torch.tensor(sample_rows + verify_rows, dtype=torch.long, device=dev), sample_ids)

    def forward(self, inputs: PassInputs) -> torch.Tensor:
        """The model's logits over one eager pass's logit rows."""
        return self.model(inputs.tokens, inputs.positions, inputs.meta, self.cache, inputs.logit_rows)


@dataclass
class PassInputs:
    """One eager pass on the device: token ids and positions (flat), attention metadata, the rows whose logits
    come back (sampling rows first, then verification rows) and the requests that sample."""

    tokens: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMeta
    logit_rows: torch.Tensor
    sample_ids: list[int]
