"""Batched speculative decoding on top of any policy: which running requests speculate, with how many
draft tokens, this step.

The `Speculator` wraps the policy: the policy schedules as usual, and the wrapper turns its decodes into
verifications of the newest token plus k_i draft tokens (Leviathan et al., ICML 2023; Chen et al., 2023) and
gives them the KV blocks the drafts need (a request that cannot get them decodes plainly). How many drafts the
target accepts is the step's outcome: the executor draws it (`policies/acceptance.py`) or measures it. Variants
(`batching`):

- `padded`: every verification runs the batch's largest k + 1 tokens over the batch's longest context (a
  padded batch, as in plain batched implementations);
- `ragged` (BASS, Qian et al., 2024): each request verifies its own k_i + 1 tokens over its own context;
- `budgeted` (TETRIS, Wu et al., 2025): at most `verify_budget` tokens are verified per step; after each
  speculating request's own token, the budget goes to the draft tokens most likely to be accepted across
  the batch (the j-th draft of request i is accepted with probability prod_{l<=j} alpha_il), ragged.

A draft model caches the tokens it runs, so each verification's first draft step takes the tokens it has not
seen (`Batch.verify_feed`): after a chain of k whose drafts were all accepted, the last draft and the target's
token (2); after a rejection, the target's token alone (the draft's cache already holds the accepted drafts);
after a tree, its accepted path and the target's token (the tree's nodes sat past the context); after plain
decodes, each of their tokens too. The wrapper follows what each request's draft has cached, as the backend's
`DraftRunner` does.

Adaptive k (`adaptive`): with B requests in the step, k_eff = k while B <= `full_batch`, falling linearly to 0
at `off_batch` (rounded down), unless the speculating requests' mean context is at least `long_context`
tokens, where decoding is memory-bound on the KV cache and speculation keeps paying (MagicDec, Chen et al.,
2024). A request never drafts past its output: k_i <= output - generated - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from policies.acceptance import Acceptance, AcceptanceConfig, ConfidenceAcceptance, IidAcceptance, RankedAcceptance
from policies.base import Scheduler
from policies.batch import Batch
from policies.state import ReplicaState, StepResult
from policies.trees import (
    TokenTree,
    allocate,
    chain,
    dirichlet_confidence,
    greedy_forest,
    sequoia_table,
    sequoia_tree,
    static_tree,
)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DraftModel(_Section):
    """A separate small model (a catalog id or a config.json) run autoregressively for k steps before each
    verification on the same GPUs and TP as the target, with its own KV cache."""

    kind: Literal["draft_model"] = "draft_model"
    model: str = Field("llama-3.2-1b", description="catalog model id or a Hugging Face config.json")
    kv_window: PositiveInt | None = Field(None, description="the draft attends to (and keeps KV of) only the "
                                          "last this many tokens, as MagicDec's StreamingLLM draft (none: all)")


class DraftHeads(_Section):
    """Medusa/EAGLE-style heads on the target's last hidden state: `layers` decoder layers of the target's
    width plus the target's LM head. `sequential` (EAGLE) runs them k times, one draft token each;
    otherwise (Medusa) one pass proposes all k."""

    kind: Literal["draft_heads"] = "draft_heads"
    layers: PositiveInt = 1
    sequential: bool = True


class PromptLookup(_Section):
    """Prompt lookup / n-gram drafting: drafts are copied from the context, at no model cost."""

    kind: Literal["ngram"] = "ngram"


DraftConfig = Annotated[Union[DraftModel, DraftHeads, PromptLookup], Field(discriminator="kind")]


class AdaptiveK(_Section):
    full_batch: PositiveInt = Field(16, description="full k while the step has at most this many requests")
    off_batch: PositiveInt = Field(64, description="no speculation from this many requests on")
    long_context: PositiveInt | None = Field(4096, description="keep full k when the mean context of the "
                                             "speculating requests is at least this (none: never)")

    @model_validator(mode="after")
    def _check(self) -> AdaptiveK:
        if self.off_batch <= self.full_batch:
            raise ValueError(f"off_batch ({self.off_batch}) must exceed full_batch ({self.full_batch})")
        return self


class TreeConfig(_Section):
    """Token-tree speculation (`policies/trees.py`): the draft proposes a tree, verified in one pass."""

    kind: Literal["static", "sequoia", "opt_tree", "dyspec"] = "sequoia"
    nodes: PositiveInt = Field(16, le=4096, description="draft tokens per tree (sequoia, opt_tree; dyspec: at most)")
    depth: PositiveInt = Field(6, description="deepest level")
    widths: list[Annotated[int, Field(ge=1, le=64)]] | None = Field(
        None, max_length=32, description="static: children of every node per level (a tree of at most 4096 nodes)")
    threshold: float = Field(0.05, gt=0.0, lt=1.0, description="dyspec: expand while path probability >= this")

    @model_validator(mode="after")
    def _check(self) -> TreeConfig:
        if self.kind == "static" and not self.widths:
            raise ValueError("tree kind 'static' needs widths (children per node at each level)")
        if self.widths and int(np.cumprod(self.widths, dtype=float).sum()) > 4096:
            raise ValueError(f"widths = {self.widths}: a static tree of "
                             f"{int(np.cumprod(self.widths, dtype=float).sum())} nodes; at most 4096")
        return self


class SpeculationConfig(_Section):
    """The `speculation:` section: any policy can enable it."""

    draft: DraftConfig = DraftModel()
    k: PositiveInt = Field(4, description="draft tokens per request per step")
    acceptance: AcceptanceConfig = IidAcceptance()
    batching: Literal["padded", "ragged", "budgeted"] = "ragged"
    verify_budget: PositiveInt | None = Field(None, description="budgeted: tokens verified per step, each "
                                              "speculating request's own token included")
    adaptive: AdaptiveK | None = Field(None, description="shorten or switch off speculation as the batch grows")
    tree: TreeConfig | None = Field(None, description="speculate token trees instead of chains of k")
    compare_baseline: bool = Field(False, description="also simulate the run without speculation and report "
                                   "the speedups (spec_speedup_*)")

    @model_validator(mode="after")
    def _check(self) -> SpeculationConfig:
        if self.batching == "budgeted" and self.verify_budget is None:
            raise ValueError("batching 'budgeted' needs verify_budget (tokens verified per step)")
        kind, tree = self.acceptance.kind, self.tree
        dynamic = tree is not None and tree.kind in ("opt_tree", "dyspec")
        if dynamic and kind != "confidence":
            raise ValueError(f"tree kind {tree.kind!r} grows trees from draft confidences: acceptance.kind must be "
                             f"'confidence', not {kind!r}")
        if kind == "confidence" and not dynamic:
            raise ValueError("acceptance kind 'confidence' needs tree.kind 'opt_tree' or 'dyspec'")
        if tree is not None and not dynamic and kind not in ("ranked", "iid"):
            raise ValueError(f"tree kind {tree.kind!r} needs acceptance.kind 'ranked' (or 'iid'), not {kind!r}")
        return self


class Speculator(Scheduler):
    """A policy whose decodes speculate (see the module docstring): `inner` schedules, this plans the drafts.
    `acceptance` gives the expected rates that budgets rank drafts by, and the draft confidences that dynamic
    trees grow from."""

    def __init__(self, inner: Scheduler, config: SpeculationConfig, acceptance: Acceptance) -> None:
        super().__init__(inner.params)
        self.inner = inner
        self.config = config
        self.acceptance = acceptance
        self.draft_cached: dict[int, int] = {}  # tokens of each request that its draft model has cached

    def schedule(self, state: ReplicaState) -> Batch | None:
        batch = self.inner.schedule(state)
        return None if batch is None else self.plan(state, batch)

    def on_step_end(self, state: ReplicaState, batch: Batch, result: StepResult) -> None:
        self.inner.on_step_end(state, batch, result)
        cached = self.draft_cached
        ends = batch.prefill_computed + batch.prefill_tokens  # the draft ran the prompt chunks too
        cached.update(zip(batch.prefill_ids.tolist(), ends.tolist()))
        if batch.verify_ids.size:  # computed now = before + the newest token + the accepted drafts
            accepted = state.req.computed[batch.verify_ids] - batch.verify_computed - 1
            ran = (np.minimum(accepted, batch.verify_drafts - 1) if batch.verify_trees is None
                   else np.zeros_like(accepted))  # a chain ran drafts 1..k-1; a tree's nodes are dropped
            cached.update(zip(batch.verify_ids.tolist(), (batch.verify_computed + 1 + ran).tolist()))
        for rid in result.finished.tolist():
            cached.pop(rid, None)

    def _feed(self, state: ReplicaState, ids: np.ndarray) -> np.ndarray:
        """Tokens each request's draft takes in its first step: from those it has cached to the newest."""
        newest = state.req.computed[ids] + 1
        cached = np.array([self.draft_cached.get(rid, n - 1) for rid, n in zip(ids.tolist(), newest.tolist())],
                          dtype=np.int64)
        return np.maximum(newest - cached, 1)

    def k_now(self, state: ReplicaState, batch: Batch, ids: np.ndarray) -> int:
        """The step's k under the adaptive rule."""
        c, a = self.config, self.config.adaptive
        if a is None:
            return c.k
        size = batch.num_requests
        if a.long_context is not None and ids.size and float(state.req.computed[ids].mean()) >= a.long_context:
            return c.k
        if size <= a.full_batch:
            return c.k
        if size >= a.off_batch:
            return 0
        return int(c.k * (a.off_batch - size) / (a.off_batch - a.full_batch))

    def plan(self, state: ReplicaState, batch: Batch) -> Batch:
        """The batch with its decodes speculating; KV blocks for the drafts are allocated here."""
        ids = batch.decode_ids
        if not ids.size:
            return batch
        if self.config.tree is not None:
            return self._plan_trees(state, batch)
        r = state.req
        k = self.k_now(state, batch, ids)
        ks = np.clip(r.output[ids] - r.generated[ids] - 1, 0, k)
        if self.config.batching == "budgeted":
            ks = self._budget(ids, ks)
        _grant_kv(state, ids, ks)
        spec = ks > 0
        if not spec.any():
            return batch
        v = ids[spec]
        return Batch(batch.prefill_ids, batch.prefill_tokens, batch.prefill_computed, ids[~spec],
                     batch.decode_computed[~spec], batch.pad_prefill_to, batch.pad_rows, v, ks[spec],
                     r.computed[v], self.config.batching == "padded", verify_feed=self._feed(state, v))

    def _budget(self, ids: np.ndarray, ks: np.ndarray) -> np.ndarray:
        """TETRIS: the verify budget left after each request's own token goes to the most probable drafts."""
        budget = int(self.config.verify_budget or 0) - ids.size
        kmax = int(ks.max(initial=0))
        if budget <= 0 or kmax == 0:
            return np.zeros_like(ks)
        probs = np.stack([np.cumprod(self.acceptance.position_probs(rid, kmax)) for rid in ids.tolist()])
        probs[np.arange(kmax)[None, :] >= ks[:, None]] = -1.0  # beyond a request's own limit
        order = np.argsort(-probs, axis=None, kind="stable")[:budget]
        chosen = np.zeros(probs.size, dtype=bool)
        chosen[order] = True
        chosen &= probs.reshape(-1) >= 0
        return chosen.reshape(probs.shape).sum(axis=1).astype(np.int64)

    # ---- token trees ----------------------------------------------------------------------------------
    def _ranked(self) -> list[float]:
        a = self.config.acceptance
        return list(a.probs) if isinstance(a, RankedAcceptance) else [getattr(a, "alpha", 0.0)]

    def _trees(self, state: ReplicaState, ids: np.ndarray, depth_cap: np.ndarray
               ) -> list[tuple[TokenTree, np.ndarray]]:
        """Each request's tree (depth within its remaining output) and its nodes' conditional probabilities."""
        t, c = self.config.tree, self.config
        assert t is not None
        budget = c.verify_budget if c.batching == "budgeted" else None
        if t.kind in ("opt_tree", "dyspec"):
            a = c.acceptance
            assert isinstance(a, ConfidenceAcceptance)
            drafts = [_capped(dirichlet_confidence(self.acceptance.rng, a.concentration, a.top), int(d))
                      for d in depth_cap]
            nodes = t.nodes * ids.size if budget is None else max(budget - ids.size, 0)
            if t.kind == "opt_tree" and budget is None:  # each request its own budget of t.nodes
                return [greedy_forest([f], t.nodes, t.depth)[0] for f in drafts]
            threshold = t.threshold if t.kind == "dyspec" else 0.0
            if t.kind == "dyspec" and budget is None:
                return [greedy_forest([f], t.nodes, t.depth, threshold)[0] for f in drafts]
            return greedy_forest(drafts, nodes, t.depth, threshold)
        p = self._ranked()
        if t.kind == "static":
            widths = t.widths or []
            trees = [static_tree(widths[: int(d)]) for d in depth_cap]
        elif budget is not None:  # the tree form of TETRIS: the verify budget split to maximise accepted drafts
            gains = [sequoia_table(p, t.nodes, int(min(t.depth, d)))[int(min(t.depth, d))] for d in depth_cap]
            sizes = allocate(gains, budget)
            trees = [sequoia_tree(p, int(n), int(min(t.depth, d))) if n else chain(0)
                     for n, d in zip(sizes, depth_cap)]
        else:
            trees = [sequoia_tree(p, t.nodes, int(min(t.depth, d))) for d in depth_cap]
        return [(tree, tree.positional_probs(p)) for tree in trees]

    def _plan_trees(self, state: ReplicaState, batch: Batch) -> Batch:
        r, ids = state.req, batch.decode_ids
        t = self.config.tree
        assert t is not None
        deepest = len(t.widths or []) if t.kind == "static" else t.depth
        depth_cap = np.clip(r.output[ids] - r.generated[ids] - 1, 0, deepest)
        live = depth_cap > 0  # a request at its last token does not speculate (nor take budget)
        trees: list[tuple[TokenTree, np.ndarray]] = [(chain(0), np.zeros(0))] * ids.size
        for i, tree in zip(np.flatnonzero(live).tolist(), self._trees(state, ids[live], depth_cap[live])):
            trees[i] = tree
        sizes = np.array([t.size for t, _ in trees], dtype=np.int64)
        _grant_kv(state, ids, sizes)
        spec = sizes > 0
        if not spec.any():
            return batch
        chosen = [trees[i] for i in np.flatnonzero(spec)]
        depth = max(t.max_depth for t, _ in chosen)
        levels = np.zeros((len(chosen), depth), dtype=np.int64)
        for row, (t, _) in enumerate(chosen):
            w = t.level_widths()
            levels[row, : w.size] = w
        v = ids[spec]
        return Batch(batch.prefill_ids, batch.prefill_tokens, batch.prefill_computed, ids[~spec],
                     batch.decode_computed[~spec], batch.pad_prefill_to, batch.pad_rows, v, sizes[spec],
                     r.computed[v], self.config.batching == "padded",
                     levels,
                     tuple(t for t, _ in chosen), tuple(p for _, p in chosen), self._feed(state, v))


def _grant_kv(state: ReplicaState, ids: np.ndarray, drafts: np.ndarray) -> None:
    """KV blocks for each request's newest token and its `drafts[i]` draft tokens (a chain or a tree's
    nodes); a request that cannot get them decodes plainly (its `drafts[i]` is set to 0)."""
    r, kv = state.req, state.kv
    if kv.grow_many(ids, r.computed[ids] + 1 + drafts):
        return
    for i in range(ids.size):
        if drafts[i] and not kv.grow_many(ids[i:i + 1], r.computed[ids[i:i + 1]] + 1 + drafts[i]):
            drafts[i] = 0


def _capped(probs: Callable[[int, int], np.ndarray], depth: int) -> Callable[[int, int], np.ndarray]:
    """A draft that proposes nothing below `depth` (a request near the end of its output)."""
    return lambda node, d: probs(node, d) if d < depth else np.zeros(0)
