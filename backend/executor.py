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

from backend.model import (
    AttentionGroup,
    AttentionMeta,
    Chunk,
    LlamaModel,
    PagedKVCache,
    attention_meta,
    build_model,
)
from backend.parallel import Shard
from backend.speculative import DraftRunner, accept, seeded
from hardware.cost import GRAPH_BATCH_SIZES
from hardware.specs import ModelSpec, kv_heads_per_gpu
from policies.batch import Batch
from policies.state import Requests
from sim.executor import StepOutcome


def prompt_tokens(seed: int, rid: int, length: int, vocab: int) -> list[int]:
    """The prompt of request `rid`: random token ids, the same in every run with this seed."""
    return np.random.default_rng([seed, rid]).integers(0, vocab, length).tolist()


def capacity_bucket(n: int) -> int:
    """n rounded up on a grid of 8 steps per octave (at most 12.5% more), at least 256: the sizes of the
    K/V gather that decode CUDA graphs are captured for."""
    if n <= 256:
        return 256
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


class DecodeGraph:
    """A decode step of `batch` rows over at most `capacity` tokens of context in all, as a CUDA graph.

    Inputs live in static buffers; rows past the real batch are padding that write to and read one key
    from a scratch slot, so their outputs are ignored (vLLM pads decode batches to captured sizes the same
    way). The K/V gather writes into buffers shared by all graphs, and the logits are copied out to a
    shared buffer, so a graph keeps little memory of its own."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, batch: int, capacity: int, scratch: int,
                 pool: object, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        dev = cache.k.device
        self.batch, self.capacity, self.scratch = batch, capacity, scratch
        k_buf, v_buf, self.logits = shared
        # Every tensor the graph reads must outlive it: keep them on the object.
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.slots = torch.full((batch,), scratch, dtype=torch.long, device=dev)
        self.index = torch.full((capacity,), scratch, dtype=torch.long, device=dev)
        self.cu_k = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(batch, device=dev)
        group = AttentionGroup(0, batch, self.index, torch.arange(batch + 1, dtype=torch.int32, device=dev),
                               self.cu_k, 1, capacity, [], [], k_buf[:capacity], v_buf[:capacity])
        self.meta = AttentionMeta(self.slots, [group])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(self.tokens, self.positions, self.meta, cache, self.rows)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits[:batch].copy_(model(self.tokens, self.positions, self.meta, cache, self.rows))

    def run(self, tokens: list[int], positions: list[int], meta: AttentionMeta) -> torch.Tensor:
        n, (g,) = len(tokens), meta.groups
        total = sum(g.k_lens)
        self.tokens[:n] = torch.tensor(tokens)
        self.positions[:n] = torch.tensor(positions)
        self.slots[:n] = meta.slots
        self.slots[n:] = self.scratch  # padding rows write to the scratch slot, never to a live request's
        self.index[:total] = g.kv_index
        self.index[total:] = self.scratch
        pad = np.arange(total + 1, total + 1 + self.batch - n)  # each padding row reads the scratch slot
        self.cu_k.copy_(torch.from_numpy(np.concatenate([[0], np.cumsum(g.k_lens), pad]).astype(np.int32)))
        self.graph.replay()
        return self.logits[:n]


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
        self.scratch = num_blocks * block_size
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.num_blocks = num_blocks
        self._graph_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.capture_seconds = 0.0  # time the last step spent capturing a CUDA graph (a server does it at start)
        # Speculation: a draft model with its own cache (room for every request's KV plus its drafts), and
        # whether verification forces the simulator's drawn acceptance (oracle) or applies the real rule.
        self.draft = None if draft is None else DraftRunner(draft, num_blocks + 256, block_size, self.device,
                                                            self.dtype, seed)
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
        self.capture_seconds = 0.0
        pre, ver, dec = batch.prefill_ids.tolist(), batch.verify_ids.tolist(), batch.decode_ids.tolist()
        self.sync_tables(pre + ver + dec)
        drafts, dists, draft_s = self._draft(batch)
        flat_tokens: list[int] = []
        positions: list[int] = []
        chunks: list[Chunk] = []
        sample_rows: list[int] = []
        sample_ids: list[int] = []
        verify_rows: list[int] = []
        parts = list(zip(pre, batch.prefill_tokens.tolist(), batch.prefill_computed.tolist(), [None] * len(pre)))
        parts += [(rid, len(d) + 1, c, d) for rid, c, d in zip(ver, batch.verify_computed.tolist(), drafts)]
        parts += [(rid, 1, c, None) for rid, c in zip(dec, batch.decode_computed.tolist())]
        for rid, n, done, draft in parts:
            toks = self.tokens_of(rid)
            chunks.append(Chunk(len(flat_tokens), n, done, self.tables[rid]))
            flat_tokens += toks[done:done + n] if draft is None else [toks[done], *draft]
            positions += range(done, done + n)
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
        accepted = self._verify(batch, verified, drafts, dists) if ver else None
        gpu = float("nan")
        if dev.type == "cuda":
            end.record()
            end.synchronize()
            gpu = start.elapsed_time(end) / 1e3
        new_ids = new.tolist()
        for rid, tok in zip(sample_ids, new_ids):
            self.tokens[rid].append(tok)
        return StepOutcome(seconds=time.perf_counter() - t0 - self.capture_seconds,
                           execution="graph" if graph else "eager", gpu_seconds=gpu, draft_seconds=draft_s,
                           accepted=accepted)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _draft(self, batch: Batch) -> tuple[list[list[int]], list[list[torch.Tensor]], float]:
        """The draft model's part of a step: catch up on prefill chunks, then propose each verification's
        drafts; returns the drafts, their distributions (when sampling) and the seconds it took."""
        if self.draft is None:
            if batch.verify_ids.size:
                raise RuntimeError("a batch with verifications needs a draft model (speculation.draft)")
            return [], [], 0.0
        self._sync()
        t0 = time.perf_counter()
        if batch.prefill_ids.size:
            self.draft.catch_up(batch.prefill_ids.tolist(), (batch.prefill_computed + batch.prefill_tokens).tolist(),
                                self.tokens_of)
        drafts, dists = self.draft.propose(batch.verify_ids.tolist(), batch.verify_drafts.tolist(), self.tokens_of,
                                           self.temperature, lambda rid, j: self._generator(rid, 1 + j))
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

    def _graph(self, batch: Batch, meta: AttentionMeta) -> DecodeGraph | None:
        """The captured graph for a decode-only batch (captured on first use), or None to run eagerly."""
        n = batch.decode_ids.size
        if not self.use_graphs or batch.prefill_ids.size or batch.verify_ids.size or not n or \
                n > GRAPH_BATCH_SIZES[-1]:
            return None
        rows = next(b for b in GRAPH_BATCH_SIZES if b >= n)
        key = (rows, capacity_bucket(sum(meta.groups[0].k_lens) + rows - n))
        if key not in self.graphs:
            t0 = time.perf_counter()
            if self._graph_buffers is None:  # sized for the whole cache plus padding rows, shared by all graphs
                most = capacity_bucket(self.num_blocks * self.block_size + GRAPH_BATCH_SIZES[-1])
                kv = torch.empty((most, *self.cache.k.shape[2:]), dtype=self.dtype, device=self.device)
                logits = torch.empty((GRAPH_BATCH_SIZES[-1], self.spec.vocab_size), device=self.device)
                self._graph_buffers = (kv, torch.empty_like(kv), logits)
            self.graphs[key] = DecodeGraph(self.model, self.cache, *key, self.scratch, self.graph_pool,
                                           self._graph_buffers)
            self.capture_seconds = time.perf_counter() - t0
        return self.graphs[key]
