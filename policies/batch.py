"""`Batch`: what one step runs, per request, as policies hand it to an executor: decisions only (what came of
a step, accepted drafts included, is the executor's `sim.executor.StepOutcome`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hardware.operators import StepShape

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Batch:
    """Requests of one step, in two groups.

    - prefill: `prefill_ids[i]` runs `prefill_tokens[i]` tokens after `prefill_computed[i]` tokens whose KV
      is already cached (an earlier chunk, a prefix-cache hit; zero for a fresh prompt). A preempted
      request's recompute is a prefill of its prompt plus the tokens it had generated.
    - decode: `decode_ids[j]` runs its one newest token after `decode_computed[j]` tokens of KV.

    - verify (speculative decoding, set by a `Speculator` wrapped around any policy): `verify_ids[v]` runs its
      newest token plus `verify_drafts[v]` draft tokens (a chain, or the nodes of a token tree with
      `verify_levels[v]` nodes per depth) after `verify_computed[v]`
      tokens of KV. How many the target accepts is the executor's outcome (drawn from the acceptance model
      in simulation, measured on a device); a tree's `verify_probs[v]` are the draft's probabilities of its
      nodes, each given its parent (what the acceptance model draws from). `verify_padded` pads every
      verification to the largest of the batch. `verify_feed[v]`: the tokens a draft model takes in its first
      step of the verification (those it has not cached yet; None: one each).

    `pad_prefill_to` and `pad_rows` model padded request-level batching (Hugging Face generate): every
    prompt padded to the longest, and finished rows still computed until the whole batch ends.

    `prefill_layers` < 1 (layered prefill): the prefill chunks run through only that share of the decoder
    layers in this step, the decodes through all of them; `prefill_partial` marks a step before the chunks'
    last layers, whose tokens are not computed yet when it ends. `swap_in_tokens` / `swap_out_tokens`: KV
    that the step copies between GPU and host memory (swap preemption), as the engine attaches it.
    """

    prefill_ids: np.ndarray = field(default_factory=lambda: _EMPTY)
    prefill_tokens: np.ndarray = field(default_factory=lambda: _EMPTY)
    prefill_computed: np.ndarray = field(default_factory=lambda: _EMPTY)
    decode_ids: np.ndarray = field(default_factory=lambda: _EMPTY)
    decode_computed: np.ndarray = field(default_factory=lambda: _EMPTY)
    pad_prefill_to: int = 0
    pad_rows: int = 0
    verify_ids: np.ndarray = field(default_factory=lambda: _EMPTY)
    verify_drafts: np.ndarray = field(default_factory=lambda: _EMPTY)
    verify_computed: np.ndarray = field(default_factory=lambda: _EMPTY)
    verify_padded: bool = False
    verify_levels: np.ndarray | None = None  # token trees: nodes per depth, one row per verification
    verify_trees: tuple | None = None  # token trees: each verification's `policies.trees.TokenTree`
    verify_probs: tuple | None = None  # token trees: each tree's node probabilities, given their parents
    verify_feed: np.ndarray | None = None  # tokens the draft model takes in its first step, per verification
    prefill_layers: float = 1.0
    prefill_partial: bool = False
    swap_in_tokens: int = 0  # KV copied back from host memory before the step (swap preemption)
    swap_out_tokens: int = 0  # and copied out to it

    @classmethod
    def make(
        cls,
        prefill_ids: Sequence[int] = (),
        prefill_tokens: Sequence[int] = (),
        prefill_computed: Sequence[int] | None = None,
        decode_ids: np.ndarray | None = None,
        decode_computed: np.ndarray | None = None,
        **padding: int,
    ) -> Batch:
        """A batch from lists (cached prefixes default to zero)."""
        ids = np.asarray(prefill_ids, dtype=np.int64)
        computed = np.zeros(ids.size, np.int64) if prefill_computed is None else np.asarray(prefill_computed, np.int64)
        return cls(ids, np.asarray(prefill_tokens, dtype=np.int64), computed,
                   _EMPTY if decode_ids is None else decode_ids, _EMPTY if decode_computed is None else decode_computed,
                   **padding)

    @property
    def num_requests(self) -> int:
        return self.prefill_ids.size + self.decode_ids.size + self.verify_ids.size

    @property
    def num_prefill_tokens(self) -> int:
        return int(self.prefill_tokens.sum())

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.decode_ids.size + int(self.verify_drafts.sum()) + self.verify_ids.size

    def shape(self) -> StepShape:
        """The batch as the cost model sees it, padding included."""
        chunks = self.prefill_tokens
        if self.pad_prefill_to and chunks.size:
            chunks = np.full(chunks.size, max(self.pad_prefill_to, int(chunks.max())), dtype=np.int64)
        decode = self.decode_computed
        if self.pad_rows:
            longest = int(decode.max()) if decode.size else int((self.prefill_computed + chunks).max())
            decode = np.concatenate([decode, np.full(self.pad_rows, longest, dtype=np.int64)])
        verify, context = self.verify_drafts + 1, self.verify_computed
        if self.verify_padded and verify.size:
            verify = np.full(verify.size, int(verify.max()), dtype=np.int64)
            context = np.full(verify.size, int(context.max()), dtype=np.int64)
        return StepShape(prefill_tokens=chunks, prefill_cached=self.prefill_computed, decode_context=decode,
                         verify_tokens=verify, verify_context=context,
                         verify_levels=self.verify_levels, draft_feed=self.verify_feed)
