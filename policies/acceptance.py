"""Acceptance models of speculative decoding: how many of k draft tokens the target accepts per step.

Verification accepts draft tokens left to right until the first rejection (Leviathan et al., ICML 2023;
Chen et al., 2023), so a step with k drafts yields `a + 1` tokens, a in [0, k] accepted drafts plus the
target's own next token. Models (the `acceptance:` section of `speculation:`):

- `iid` (`alpha`): every draft token is accepted with probability alpha, independently:
  E[tokens per step] = (1 - alpha^(k+1)) / (1 - alpha).
- `positional` (`alphas`: alpha_1..alpha_m): the j-th draft token is accepted with probability alpha_j
  given the earlier ones were (positions past m reuse alpha_m): E = 1 + sum_j prod_{i<=j} alpha_i.
- `beta` (`mean`, `concentration`): each request draws its own alpha ~ Beta(mean * c, (1 - mean) * c) once,
  then is iid: E = sum_{j=0}^{k} E[alpha^j], with the Beta moments E[alpha^j] = prod_{m<j} (a+m)/(a+b+m).
- `ranked` (`probs`: p_1..p_m, sum <= 1): Sequoia's positional model for token trees: at any node the
  target's token is the draft's i-th ranked child with probability p_i. A chain uses p_1 at every
  position (iid with alpha = p_1).
- `confidence` (`concentration`, `top`): the draft-confidence model of dynamic trees (OPT-Tree, DySpec): at
  each node the draft's top-`top` child probabilities are a sorted draw of a symmetric Dirichlet over
  `top` + 1 outcomes, and a calibrated target agrees with a child with its probability. Trees only.
- `trace` (`path`): replay of measured acceptance, a JSONL file, one line per request:
  `{"accepted": [2, 0, 4, ...]}` (accepted drafts at each of that request's speculative steps). Request i
  replays line i mod (number of lines), its steps in order, wrapping around; a count above the step's k is
  capped at k. E = 1 + mean over the file's counts of min(count, k).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hardware.errors import ServesimError
from hardware.files import read_text
from policies.batch import Batch


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class IidAcceptance(_Model):
    kind: Literal["iid"] = "iid"
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="probability that each draft token is accepted")


class PositionalAcceptance(_Model):
    kind: Literal["positional"] = "positional"
    alphas: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        min_length=1, description="acceptance probability of the 1st, 2nd, ... draft token given the earlier ones")


class BetaAcceptance(_Model):
    kind: Literal["beta"] = "beta"
    mean: float = Field(0.7, gt=0.0, lt=1.0, description="mean of the per-request acceptance rate")
    concentration: float = Field(10.0, gt=0.0, description="a + b of the Beta distribution (larger: less spread)")


class TraceAcceptance(_Model):
    kind: Literal["trace"] = "trace"
    path: str = Field(description="JSONL file, one line per request: {\"accepted\": [counts per step]}")

    @model_validator(mode="after")
    def _check(self) -> TraceAcceptance:
        read_acceptance_trace(self.path)  # a bad file fails at config time, naming the file and line
        return self


class RankedAcceptance(_Model):
    kind: Literal["ranked"] = "ranked"
    probs: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        min_length=1, description="probability that the target's token is the draft's 1st, 2nd, ... choice")

    @model_validator(mode="after")
    def _check(self) -> RankedAcceptance:
        if sum(self.probs) > 1.0 + 1e-9:
            raise ValueError(f"probs sum to {sum(self.probs):.3f}; the choices are exclusive, so at most 1")
        return self


class ConfidenceAcceptance(_Model):
    kind: Literal["confidence"] = "confidence"
    concentration: float = Field(0.5, gt=0.0, description="Dirichlet concentration (small: confident drafts)")
    top: int = Field(4, ge=1, le=64, description="children the draft proposes per node")


AcceptanceConfig = Annotated[Union[IidAcceptance, PositionalAcceptance, BetaAcceptance, TraceAcceptance,
                                   RankedAcceptance, ConfidenceAcceptance], Field(discriminator="kind")]


def read_acceptance_trace(path: str | Path) -> list[np.ndarray]:
    """Per-request accepted counts of an acceptance trace; errors name the file and the line."""
    p = Path(path)
    rows: list[np.ndarray] = []
    for number, line in enumerate(read_text(p, "speculation.acceptance.path").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            counts = json.loads(line)["accepted"]
            arr = np.asarray(counts, dtype=np.int64)
            if arr.ndim != 1 or arr.size == 0 or arr.min() < 0 or not all(isinstance(c, int) for c in counts):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ServesimError(f"{p}:{number}: expected {{\"accepted\": [non-negative integers, at least one]}}, "
                                f"got {line.strip()[:80]!r}") from None
        rows.append(arr)
    if not rows:
        raise ServesimError(f"{p}: the acceptance trace has no lines")
    return rows


def _beta_moments(mean: float, concentration: float, k: int) -> np.ndarray:
    """E[alpha^j] for j = 0..k under Beta(mean * c, (1 - mean) * c)."""
    a, c = mean * concentration, concentration
    m = np.arange(k)
    return np.concatenate([[1.0], np.cumprod((a + m) / (c + m))])


class Acceptance:
    """Draws accepted counts per (request, step) and gives the closed-form expectations. One per run: the
    `Speculator` plans with it (expected rates; a dynamic tree's draft confidences) and the cost-model executor
    draws each step's outcome from it, one stream in the order the steps run."""

    def __init__(self, config: AcceptanceConfig, seed: int, num_requests: int) -> None:
        self.config = config
        self.rng = np.random.default_rng([seed, 8])
        self.alpha: np.ndarray | None = None
        self.trace: list[np.ndarray] | None = None
        self.cursor = np.zeros(num_requests, dtype=np.int64)
        if isinstance(config, BetaAcceptance):
            c = config.concentration
            self.alpha = self.rng.beta(config.mean * c, (1 - config.mean) * c, size=num_requests)
        elif isinstance(config, TraceAcceptance):
            self.trace = read_acceptance_trace(config.path)

    def position_probs(self, rid: int, k: int) -> np.ndarray:
        """P(draft j accepted | drafts before it accepted), j = 1..k, for request `rid`."""
        c = self.config
        if isinstance(c, IidAcceptance):
            return np.full(k, c.alpha)
        if isinstance(c, PositionalAcceptance):
            a = np.asarray(c.alphas)
            return a[np.minimum(np.arange(k), a.size - 1)]
        if isinstance(c, RankedAcceptance):
            return np.full(k, c.probs[0])
        if self.alpha is not None:
            return np.full(k, self.alpha[rid])
        return np.full(k, self._trace_rate(k))  # trace: an equivalent iid rate, used to rank drafts

    def _trace_rate(self, k: int) -> float:
        """The iid rate whose expected accepted drafts match the trace's at this k (for budget ranking)."""
        mean = self.expected_tokens(k) - 1
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (mid - mid ** (k + 1)) / (1 - mid) < mean else (lo, mid)
        return (lo + hi) / 2

    def sample(self, batch: Batch) -> np.ndarray:
        """Accepted drafts of each verification of `batch`: along a chain of `verify_drafts[v]`, or down a token
        tree from its node probabilities (`Batch.verify_probs`)."""
        if batch.verify_trees is None:
            return self.draw(batch.verify_ids, batch.verify_drafts)
        assert batch.verify_probs is not None
        return np.array([t.sample_accepted(p, self.rng) for t, p in zip(batch.verify_trees, batch.verify_probs)],
                        dtype=np.int64)

    def draw(self, ids: np.ndarray, ks: np.ndarray) -> np.ndarray:
        """Accepted drafts (0..k_i) for requests `ids` speculating `ks` drafts each, this step."""
        out = np.zeros(ids.size, dtype=np.int64)
        if self.trace is not None:
            for i, (rid, k) in enumerate(zip(ids.tolist(), ks.tolist())):
                row = self.trace[rid % len(self.trace)]
                out[i] = min(int(row[self.cursor[rid] % row.size]), k)
                self.cursor[rid] += 1
            return out
        kmax = int(ks.max(initial=0))
        if kmax == 0:
            return out
        u = self.rng.random((ids.size, kmax))
        probs = np.stack([self.position_probs(rid, kmax) for rid in ids.tolist()]) if ids.size else u
        ok = (u < probs) & (np.arange(kmax)[None, :] < ks[:, None])
        return np.cumprod(ok, axis=1).sum(axis=1)

    def expected_tokens(self, k: int) -> float:
        """Closed-form E[accepted drafts + 1] of one step with k drafts (over requests, for `beta`)."""
        c = self.config
        if isinstance(c, (IidAcceptance, RankedAcceptance)):
            a = c.alpha if isinstance(c, IidAcceptance) else c.probs[0]
            return float(k + 1) if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)
        if isinstance(c, PositionalAcceptance):
            return float(1 + np.cumprod(self.position_probs(0, k)).sum())
        if isinstance(c, BetaAcceptance):
            return float(_beta_moments(c.mean, c.concentration, k).sum())
        counts = np.concatenate(self.trace or [])
        return float(1 + np.minimum(counts, k).mean())
