"""Workloads: an arrival process plus a length distribution, or a real trace replayed (time-scaled).

Arrivals: `poisson` (exponential gaps), `gamma` (gaps with a coefficient of variation: cv > 1 is burstier
than Poisson), `constant`, and `trace` (the trace's timestamps divided by `rate_scale`: 2.0 replays it at
twice the load). Lengths: `fixed`, `uniform` (inclusive ranges), `lognormal` (mean and coefficient of
variation of prompt and output tokens) and `trace` (the trace's own pairs: in order when the arrivals
replay the trace, else drawn with replacement, keeping each prompt with its output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from traces.readers import BadRow, TraceData, read_trace


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PoissonArrival(_Spec):
    kind: Literal["poisson"] = "poisson"
    rate: PositiveFloat = Field(description="requests per second")


class GammaArrival(_Spec):
    kind: Literal["gamma"] = "gamma"
    rate: PositiveFloat = Field(description="requests per second")
    cv: PositiveFloat = Field(description="coefficient of variation of the gaps (1 = Poisson)")


class ConstantArrival(_Spec):
    kind: Literal["constant"] = "constant"
    rate: PositiveFloat


class TraceArrival(_Spec):
    kind: Literal["trace"] = "trace"
    rate_scale: PositiveFloat = Field(1.0, description="load multiplier: timestamps are divided by it")


Arrival = Annotated[Union[PoissonArrival, GammaArrival, ConstantArrival, TraceArrival], Field(discriminator="kind")]


class FixedLengths(_Spec):
    kind: Literal["fixed"] = "fixed"
    prompt: PositiveInt
    output: PositiveInt


class UniformLengths(_Spec):
    kind: Literal["uniform"] = "uniform"
    prompt: tuple[PositiveInt, PositiveInt] = Field(description="inclusive [min, max]")
    output: tuple[PositiveInt, PositiveInt]

    @model_validator(mode="after")
    def _ordered(self) -> UniformLengths:
        for name, (lo, hi) in (("prompt", self.prompt), ("output", self.output)):
            if lo > hi:
                raise ValueError(f"{name} range [{lo}, {hi}] must have min <= max")
        return self


class LognormalLengths(_Spec):
    kind: Literal["lognormal"] = "lognormal"
    prompt_mean: PositiveFloat
    prompt_cv: PositiveFloat
    output_mean: PositiveFloat
    output_cv: PositiveFloat
    max_prompt: PositiveInt | None = Field(None, description="clip prompts to this many tokens")
    max_output: PositiveInt | None = None


class TraceLengths(_Spec):
    kind: Literal["trace"] = "trace"


Lengths = Annotated[Union[FixedLengths, UniformLengths, LognormalLengths, TraceLengths],
                    Field(discriminator="kind")]


class TraceSource(_Spec):
    path: str
    format: Literal["azure", "mooncake"] | None = Field(None, description="default: from the file suffix")
    on_bad_row: BadRow = "error"


class Workload(_Spec):
    """One request stream. Give `num_requests` or `duration_s` (a replayed trace may give neither: all rows)."""

    name: str = "default"
    arrival: Arrival
    lengths: Lengths
    trace: TraceSource | None = None
    num_requests: PositiveInt | None = None
    duration_s: PositiveFloat | None = None
    start_s: float = Field(0.0, ge=0.0, description="time of the stream's start")

    @model_validator(mode="after")
    def _check(self) -> Workload:
        uses_trace = self.arrival.kind == "trace" or self.lengths.kind == "trace"
        if uses_trace and self.trace is None:
            raise ValueError("a `trace` section (path) is required when arrival or lengths is of kind trace")
        if self.num_requests is not None and self.duration_s is not None:
            raise ValueError("give num_requests or duration_s, not both")
        if self.arrival.kind != "trace" and self.num_requests is None and self.duration_s is None:
            raise ValueError("give num_requests or duration_s for a generated arrival process")
        return self


@dataclass(frozen=True)
class GeneratedRequests:
    """Requests of one workload, in arrival order."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    skipped_rows: int


@lru_cache(maxsize=8)
def _load(source: TraceSource) -> TraceData:
    return read_trace(source.path, source.format, source.on_bad_row)


def _gaps(arrival: PoissonArrival | GammaArrival | ConstantArrival, n: int, rng: np.random.Generator) -> np.ndarray:
    if arrival.kind == "poisson":
        return rng.exponential(1.0 / arrival.rate, n)
    if arrival.kind == "gamma":
        shape = 1.0 / arrival.cv**2
        return rng.gamma(shape, 1.0 / (arrival.rate * shape), n)
    return np.full(n, 1.0 / arrival.rate)


def _arrivals(w: Workload, rng: np.random.Generator, trace: TraceData | None) -> np.ndarray:
    if w.arrival.kind == "trace":
        assert trace is not None
        times = trace.time_s / w.arrival.rate_scale
        if w.duration_s is not None:
            times = times[times < w.duration_s]
        return times[: w.num_requests] if w.num_requests else times
    if w.num_requests is not None:
        return np.cumsum(_gaps(w.arrival, w.num_requests, rng))
    assert w.duration_s is not None
    expected = w.arrival.rate * w.duration_s
    chunk = int(expected + 10 * math.sqrt(expected) + 16)
    times = np.cumsum(_gaps(w.arrival, chunk, rng))
    while times[-1] < w.duration_s:  # rare: draw more gaps until past the end
        times = np.concatenate([times, times[-1] + np.cumsum(_gaps(w.arrival, chunk, rng))])
    return times[times < w.duration_s]


def _lognormal(mean: float, cv: float, n: int, rng: np.random.Generator, cap: int | None) -> np.ndarray:
    sigma2 = math.log1p(cv**2)
    x = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)
    return np.clip(np.rint(x), 1, cap or np.inf).astype(np.int64)


def _lengths(w: Workload, n: int, rng: np.random.Generator, trace: TraceData | None) -> tuple[np.ndarray, np.ndarray]:
    spec = w.lengths
    if spec.kind == "fixed":
        return np.full(n, spec.prompt, dtype=np.int64), np.full(n, spec.output, dtype=np.int64)
    if spec.kind == "uniform":
        return (rng.integers(spec.prompt[0], spec.prompt[1], n, endpoint=True),
                rng.integers(spec.output[0], spec.output[1], n, endpoint=True))
    if spec.kind == "lognormal":
        return (_lognormal(spec.prompt_mean, spec.prompt_cv, n, rng, spec.max_prompt),
                _lognormal(spec.output_mean, spec.output_cv, n, rng, spec.max_output))
    assert trace is not None
    if w.arrival.kind == "trace":  # replay: the rows that arrived, in order
        return trace.prompt[:n].copy(), trace.output[:n].copy()
    pick = rng.integers(0, len(trace), n)
    return trace.prompt[pick], trace.output[pick]


def generate(w: Workload, rng: np.random.Generator) -> GeneratedRequests:
    """Draw one workload's requests (deterministic for a given generator state)."""
    trace = _load(w.trace) if w.trace is not None else None
    arrival = _arrivals(w, rng, trace) + w.start_s
    prompt, output = _lengths(w, arrival.size, rng, trace)
    return GeneratedRequests(arrival=arrival, prompt=prompt, output=output,
                             skipped_rows=trace.skipped_rows if trace is not None else 0)
