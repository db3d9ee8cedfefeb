"""MoE routing and expert placement: which experts a step's tokens hit, and how loaded the busiest GPU is.

A routing model gives each expert e the probability p_e that a token selects it (sum over experts = top-k,
each at most 1): uniform, Zipf-skewed (popularity 1/rank^s over a seeded random order of the experts), or
measured counts of tokens per expert from a trace. Over T tokens, expert e receives T p_e token slots on
average and is hit at all with probability 1 - (1 - p_e)^T (tokens route independently), so the expected
number of distinct experts a step reads is the sum of those terms (for uniform routing,
E (1 - (1 - k/E)^T)).

Under expert parallelism the experts are spread over the group's GPUs and the busiest GPU sets the step
time: it computes the most token slots and reads the most distinct experts (both taken as expectations).
Placement is contiguous by expert id (vLLM's default), or balanced as EPLB does (DeepSeek-V3, arXiv
2412.19437; vLLM's `enable_eplb`): `redundant` extra replicas go one by one to the expert with the most load
per replica, a replica receives an equal share of its expert's tokens, and the replicas are packed onto the
GPUs heaviest first, each to the least loaded GPU with a free slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import Field, NonNegativeInt, model_validator

from hardware.specs import Spec


class RoutingModel(Spec):
    """How tokens choose experts: `uniform`, `zipf` (exponent `zipf_s`, a seeded random order of the experts),
    or `counts` (tokens routed to each expert, e.g. counted from a trace; one value per routed expert)."""

    distribution: Literal["uniform", "zipf", "counts"] = "uniform"
    zipf_s: float = Field(1.0, ge=0.0, le=10.0, description="Zipf exponent: 0 is uniform, 1 the classic law")
    counts: tuple[float, ...] | None = Field(None, description="tokens per expert (distribution 'counts')")
    seed: NonNegativeInt = Field(0, description="order in which Zipf popularity is dealt to the experts")

    @model_validator(mode="after")
    def _check(self) -> RoutingModel:
        if (self.distribution == "counts") != (self.counts is not None):
            raise ValueError("counts must be given exactly when distribution is 'counts'")
        if self.counts is not None and (min(self.counts) < 0 or sum(self.counts) <= 0):
            raise ValueError("counts must be non-negative with a positive sum")
        return self

    def probabilities(self, num_experts: int, top_k: int) -> np.ndarray:
        """p_e for every expert: the chance a token selects it, summing to top_k, each at most 1."""
        if self.distribution == "uniform":
            w = np.ones(num_experts)
        elif self.distribution == "zipf":
            ranks = np.random.default_rng(self.seed).permutation(num_experts) + 1.0
            w = ranks ** -self.zipf_s
        else:
            assert self.counts is not None
            if len(self.counts) != num_experts:
                raise ValueError(f"routing.counts has {len(self.counts)} values; the model has {num_experts} "
                                 "routed experts")
            w = np.asarray(self.counts, dtype=float)
        return _capped(w, top_k)


def _capped(w: np.ndarray, k: int) -> np.ndarray:
    """Weights scaled to sum to k with no value above 1: experts that would exceed 1 are set to 1 and the
    rest rescaled (top-k picks k distinct experts, so none is picked more than once per token)."""
    p = np.zeros_like(w)
    free = np.ones(w.size, dtype=bool)
    for _ in range(w.size):
        rest = k - (~free).sum()
        p[free] = w[free] * rest / w[free].sum()
        over = free & (p > 1.0)
        if not over.any():
            break
        p[over], free[over] = 1.0, False
    return p


def expected_distinct(p: np.ndarray, tokens: float) -> np.ndarray:
    """Per expert (or replica) with per-token hit probability p: the chance at least one of `tokens` hits it."""
    return -np.expm1(tokens * np.log1p(-np.minimum(p, 1.0 - 1e-15)))


@dataclass(frozen=True)
class ExpertPlacement:
    """Routed experts on the `ranks` GPUs of an expert-parallel group (one rank holds all of them, each
    sharded, when experts are tensor-parallel instead)."""

    probabilities: np.ndarray  # p_e per expert
    ranks: int
    balanced: bool = False  # EPLB: replicas and balanced packing
    redundant: int = 0

    def __post_init__(self) -> None:
        slots = self.probabilities.size + self.redundant
        if slots % self.ranks:
            raise ValueError(f"{self.probabilities.size} experts + {self.redundant} redundant = {slots} do not "
                             f"divide over {self.ranks} expert-parallel ranks")

    @cached_property
    def _slots(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-token hit probability of each replica, its rank)."""
        p, n = self.probabilities, self.ranks
        copies = np.ones(p.size)
        for _ in range(self.redundant):
            copies[np.argmax(p / copies)] += 1
        load = np.repeat(p / copies, copies.astype(int))
        per_rank = load.size // n
        if not self.balanced:
            return load, np.arange(load.size) // per_rank
        rank = np.empty(load.size, dtype=int)
        totals, room = np.zeros(n), np.full(n, per_rank)
        for i in np.argsort(-load, kind="stable"):
            r = int(np.argmin(np.where(room > 0, totals, np.inf)))
            rank[i], totals[r], room[r] = r, totals[r] + load[i], room[r] - 1
        return load, rank

    @cached_property
    def rank_share(self) -> np.ndarray:
        """Token slots each rank receives per token (sums to top-k)."""
        load, rank = self._slots
        return np.bincount(rank, weights=load, minlength=self.ranks)

    @property
    def experts_per_rank(self) -> int:
        return (self.probabilities.size + self.redundant) // self.ranks

    def busiest(self, tokens: float) -> tuple[float, float]:
        """(token slots, distinct experts hit) of the busiest rank for a step of `tokens` tokens: the most of
        each over the ranks."""
        load, rank = self._slots
        active = np.bincount(rank, weights=expected_distinct(load, tokens), minlength=self.ranks)
        return tokens * float(self.rank_share.max()), float(active.max())
