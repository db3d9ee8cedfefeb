"""`TorchExecutor`: runs the policies' `Batch`es through the PyTorch model on a real device.

It keeps each request's token ids (its prompt, drawn from a seeded generator, then what it sampled) and
its block table: physical blocks are taken from a free list as the engine's `BlockManager` grows a
request's block count, and returned when the engine frees them (finish or preemption), so the paged cache
holds exactly what the simulator's bookkeeping says. Steps are timed with a device synchronisation on
each side (CUDA events measure the GPU part separately).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from backend.model import PagedKVCache, Sequence, build_model
from hardware.specs import ModelSpec
from policies.batch import Batch
from policies.state import Requests
from sim.executor import StepOutcome


def prompt_tokens(seed: int, rid: int, length: int, vocab: int) -> list[int]:
    """The prompt of request `rid`: random token ids, the same in every run with this seed."""
    return np.random.default_rng([seed, rid]).integers(0, vocab, length).tolist()


class TorchExecutor:
    """The engine's `Executor` contract on a PyTorch model (greedy, or temperature sampling)."""

    def __init__(self, spec: ModelSpec, requests: Requests, num_blocks: int, block_size: int,
                 device: str = "cpu", seed: int = 0, temperature: float = 0.0, checkpoint: str | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.spec, self.req, self.seed, self.temperature = spec, requests, seed, temperature
        self.model = build_model(spec, self.device, self.dtype, seed, checkpoint)
        self.cache = PagedKVCache(spec.num_hidden_layers, num_blocks, block_size, spec.num_key_value_heads,
                                  spec.head_size, self.dtype, self.device)
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}

    # ---- block tables mirror the engine's block counts --------------------------------------------------
    def sync_tables(self, ids: list[int] = ()) -> None:  # type: ignore[assignment]
        """Return the blocks the engine freed to the free list, then give `ids` the blocks it added."""
        for rid in [r for r, table in self.tables.items() if self.req.blocks[r] < len(table)]:
            keep = int(self.req.blocks[rid])  # freed by the engine (finish, preemption)
            self.free_blocks.extend(reversed(self.tables[rid][keep:]))
            del self.tables[rid][keep:]
        for rid in ids:
            table = self.tables.setdefault(rid, [])
            while len(table) < self.req.blocks[rid]:
                table.append(self.free_blocks.pop())

    def _slots(self, rid: int, start: int, stop: int) -> torch.Tensor:
        table = torch.tensor(self.tables[rid], dtype=torch.long)
        pos = torch.arange(start, stop)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def _generator(self, rid: int) -> torch.Generator:
        """The random stream of request `rid`'s next token: seeded by (seed, request, position)."""
        seed = int(np.random.SeedSequence([self.seed, rid, len(self.tokens[rid])]).generate_state(1)[0])
        return torch.Generator(device=self.device).manual_seed(seed)

    def tokens_of(self, rid: int) -> list[int]:
        """Prompt and generated token ids of a request so far."""
        if rid not in self.tokens:
            self.tokens[rid] = prompt_tokens(self.seed, rid, int(self.req.prompt[rid]), self.spec.vocab_size)
        return self.tokens[rid]

    # ---- one step ---------------------------------------------------------------------------------------
    def run(self, batch: Batch) -> StepOutcome:
        t0 = time.perf_counter()
        ids = batch.prefill_ids.tolist() + batch.decode_ids.tolist()
        counts = batch.prefill_tokens.tolist() + [1] * batch.decode_ids.size
        cached = batch.prefill_computed.tolist() + batch.decode_computed.tolist()
        self.sync_tables(ids)
        flat_tokens: list[int] = []
        positions: list[int] = []
        seqs: list[Sequence] = []
        sample_rows: list[int] = []
        sample_ids: list[int] = []
        for rid, n, done in zip(ids, counts, cached):
            toks = self.tokens_of(rid)
            seqs.append(Sequence(len(flat_tokens), n, done, self._slots(rid, 0, done + n)))
            flat_tokens += toks[done:done + n]
            positions += range(done, done + n)
            if done + n == len(toks):  # no known token left uncomputed: this row samples the next one
                sample_rows.append(len(flat_tokens) - 1)
                sample_ids.append(rid)
        dev = self.device
        slots = torch.cat([s.slots[s.cached:] for s in seqs])
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        logits = self.model(torch.tensor(flat_tokens, device=dev), torch.tensor(positions, device=dev), slots, seqs,
                            self.cache, torch.tensor(sample_rows, dtype=torch.long, device=dev))
        if self.temperature > 0:  # each token from its own seeded draw: outputs do not depend on batching
            probs = torch.softmax(logits / self.temperature, dim=-1)
            new = torch.stack([torch.multinomial(p, 1, generator=self._generator(rid))[0]
                               for p, rid in zip(probs, sample_ids)]) if sample_ids else logits.argmax(dim=-1)
        else:
            new = logits.argmax(dim=-1)
        if dev.type == "cuda":
            end.record()
        new_ids = new.tolist()  # synchronises the device
        gpu = start.elapsed_time(end) / 1e3 if dev.type == "cuda" else float("nan")
        for rid, tok in zip(sample_ids, new_ids):
            self.tokens[rid].append(tok)
        return StepOutcome(seconds=time.perf_counter() - t0, execution="eager", gpu_seconds=gpu)
