"""Workloads: an arrival process plus a length distribution, or a real trace replayed (time-scaled).

Arrivals: `poisson` (exponential gaps), `gamma` (gaps with a coefficient of variation: cv > 1 is burstier
than Poisson), `constant`, `trace` (the trace's timestamps divided by `rate_scale`: 2.0 replays it at
twice the load), `burst` (all at the start; `rate: inf`) and `closed_loop` (N clients, each sending its
next request after its previous response and a think time; `sim/clients.py` releases them). Lengths:
`fixed`, `uniform` (inclusive ranges), `lognormal` (mean and coefficient of variation of prompt and output
tokens) and `trace` (the trace's own pairs: in order when the arrivals replay the trace, else drawn with
replacement, keeping each prompt with its output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from hardware.errors import ServesimError
from traces.readers import MAX_TOKENS, BadRow, TraceData, read_trace

Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
MAX_REQUESTS = 50_000_000  # a generated workload larger than this is surely a typo


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# Rates and times within which simulated clocks keep microsecond resolution in float64 (2^53 us ~ 285 years)
Rate = Annotated[float, Field(ge=1e-6, le=1e7, description="requests per second")]


class PoissonArrival(_Spec):
    kind: Literal["poisson"] = "poisson"
    rate: Rate


class GammaArrival(_Spec):
    kind: Literal["gamma"] = "gamma"
    rate: Rate
    cv: float = Field(ge=1e-3, le=1e3, description="coefficient of variation of the gaps (1 = Poisson)")


class ConstantArrival(_Spec):
    kind: Literal["constant"] = "constant"
    rate: Rate


class TraceArrival(_Spec):
    kind: Literal["trace"] = "trace"
    rate_scale: float = Field(1.0, ge=1e-6, le=1e6, description="load multiplier: timestamps are divided by it")


class BurstArrival(_Spec):
    """Every request at the stream's start (vLLM bench's `--request-rate inf`): `rate: inf` on a poisson,
    gamma or constant arrival means this."""

    kind: Literal["burst"] = "burst"


class ClosedLoopArrival(_Spec):
    """`concurrency` clients, each sending its next request once its previous one has finished (or was
    rejected) and a think time has passed (vLLM bench's `--max-concurrency`, GuideLLM's concurrent profile).
    The stream sends `num_requests` in all; every client's first request goes at the stream's start."""

    kind: Literal["closed_loop"] = "closed_loop"
    concurrency: int = Field(ge=1, le=1_000_000, description="clients, each with one request in flight at most")
    think_time_s: float = Field(0.0, ge=0.0, le=1e6, description="pause between a response and the next request")
    think: Literal["fixed", "exponential"] = Field("fixed", description="the pause: always think_time_s, or "
                                                                        "exponential with that mean")


Arrival = Annotated[Union[PoissonArrival, GammaArrival, ConstantArrival, TraceArrival, BurstArrival,
                          ClosedLoopArrival], Field(discriminator="kind")]
RATED_KINDS = ("poisson", "gamma", "constant")  # the arrival kinds with a rate (capacity searches vary it)


class FixedLengths(_Spec):
    kind: Literal["fixed"] = "fixed"
    prompt: Tokens
    output: Tokens


class UniformLengths(_Spec):
    kind: Literal["uniform"] = "uniform"
    prompt: tuple[Tokens, Tokens] = Field(description="inclusive [min, max]")
    output: tuple[Tokens, Tokens]

    @model_validator(mode="after")
    def _ordered(self) -> UniformLengths:
        for name, (lo, hi) in (("prompt", self.prompt), ("output", self.output)):
            if lo > hi:
                raise ValueError(f"{name} range [{lo}, {hi}] must have min <= max")
        return self


class LognormalLengths(_Spec):
    kind: Literal["lognormal"] = "lognormal"
    prompt_mean: float = Field(gt=0, le=MAX_TOKENS)
    prompt_cv: float = Field(gt=0, le=1e3)
    output_mean: float = Field(gt=0, le=MAX_TOKENS)
    output_cv: float = Field(gt=0, le=1e3)
    max_prompt: Tokens | None = Field(None, description="clip prompts to this many tokens")
    max_output: Tokens | None = None


class TraceLengths(_Spec):
    kind: Literal["trace"] = "trace"


Lengths = Annotated[Union[FixedLengths, UniformLengths, LognormalLengths, TraceLengths],
                    Field(discriminator="kind")]


class TraceSource(_Spec):
    path: str
    format: Literal["azure", "mooncake"] | None = Field(None, description="default: from the file suffix")
    on_bad_row: BadRow = "error"


class SharedPrefix(_Spec):
    """A `fraction` of requests start with one of `prompts` system prompts of `tokens` tokens (added to
    their drawn prompt length), chosen uniformly: the blocks of a system prompt are shared across requests."""

    tokens: PositiveInt
    fraction: float = Field(1.0, ge=0.0, le=1.0)
    prompts: PositiveInt = 1


class Sessions(_Spec):
    """Multi-turn conversations: the arrival process starts sessions; a session's next turn is sent
    `think_time_s` after the previous answer, its prompt the whole history (every earlier prompt and answer)
    plus a new message drawn from `lengths` (whose output is the turn's answer length), so prefix caching
    can reuse the history's KV."""

    turns: int = Field(ge=1, le=1000, description="turns per session (the mean when turns_kind is geometric)")
    turns_kind: Literal["fixed", "geometric"] = "fixed"
    think_time_s: float = Field(0.0, ge=0.0, le=1e6, description="pause between an answer and the next turn")
    think: Literal["fixed", "exponential"] = "fixed"


class FanOut(_Spec):
    """`n` samples of each prompt (OpenAI's and vLLM's `n`; parallel test-time scaling): the prompt is computed
    once, then the samples decode side by side sharing its KV blocks (copy-on-write: each gets its own copy of
    the prompt's partial last block). Each sample's output length is drawn from the workload's lengths (the
    first keeps its request's). With `finish_after` k, the request ends once k samples have finished and the
    others are cancelled, their KV freed (first-finish cancellation: k = 1)."""

    n: int = Field(ge=2, le=1024, description="samples per prompt")
    finish_after: int | None = Field(None, ge=1, le=1024, description="cancel the other samples once this many "
                                     "have finished (default: every sample runs to its end)")

    @model_validator(mode="after")
    def _check(self) -> FanOut:
        if self.finish_after is not None and self.finish_after > self.n:
            raise ValueError(f"finish_after = {self.finish_after} exceeds n = {self.n}")
        return self


class SloTargets(_Spec):
    """Per-request latency targets; a request meets the SLOs when it finishes within every one given."""

    ttft_s: PositiveFloat | None = None
    tpot_s: PositiveFloat | None = None
    e2e_s: PositiveFloat | None = None


class Workload(_Spec):
    """One request stream. Give `num_requests` or `duration_s` (a replayed trace may give neither: all rows)."""

    name: str = "default"
    arrival: Arrival
    lengths: Lengths
    trace: TraceSource | None = None
    num_requests: int | None = Field(None, ge=1, le=MAX_REQUESTS)
    duration_s: float | None = Field(None, gt=0.0, le=1e9)
    start_s: float = Field(0.0, ge=0.0, le=1e9, description="time of the stream's start (at most 1e9 s)")
    shared_prefix: SharedPrefix | None = None
    sessions: Sessions | None = Field(None, description="multi-turn conversations (num_requests: sessions)")
    priority: int = Field(0, ge=-1000, le=1000, description="request class: lower numbers are more urgent (under "
                          "priority.mode strict or weighted_fair)")
    slo: SloTargets | None = Field(None, description="this stream's latency targets (default: the top-level slo)")
    fan_out: FanOut | None = Field(None, description="n samples per prompt sharing its KV")

    @model_validator(mode="before")
    @classmethod
    def _infinite_rate(cls, data: object) -> object:
        """`rate: inf` (vLLM bench's request rate inf): every request at once, the `burst` arrival."""
        arrival = data.get("arrival") if isinstance(data, dict) else None
        if isinstance(arrival, dict) and arrival.get("kind", "poisson") in RATED_KINDS and \
                str(arrival.get("rate")).lower() in ("inf", ".inf", "infinity"):
            data = {**data, "arrival": {"kind": "burst"}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Workload:
        uses_trace = self.arrival.kind == "trace" or self.lengths.kind == "trace"
        if uses_trace and self.trace is None:
            raise ValueError("a `trace` section (path) is required when arrival or lengths is of kind trace")
        if self.num_requests is not None and self.duration_s is not None:
            raise ValueError("give num_requests or duration_s, not both")
        if self.arrival.kind != "trace" and self.num_requests is None and self.duration_s is None:
            raise ValueError("give num_requests or duration_s for a generated arrival process")
        if self.sessions is not None and (self.arrival.kind not in (*RATED_KINDS, "burst")
                                          or self.shared_prefix is not None):
            raise ValueError("sessions start by a poisson, gamma, constant or burst arrival, without shared_prefix")
        if self.fan_out is not None and (self.sessions is not None or self.arrival.kind == "closed_loop"):
            raise ValueError("fan_out is simulated for open-loop single-turn requests: remove sessions or the "
                             "closed_loop arrival")
        if self.arrival.kind in ("burst", "closed_loop") and self.num_requests is None:
            raise ValueError(f"arrival.kind = {self.arrival.kind!r}: give num_requests (duration_s needs a rate)")
        return self


# Prefix-cache block keys: int64 of (namespace << 58) | (id << 24) | block index. Equal keys mean equal
# token prefixes up to the end of that block.
_NS_TRACE, _NS_SYSTEM_PROMPT, _NS_SESSION = 1, 2, 3


def _keys(namespace: int, ident: int | np.ndarray, index: np.ndarray) -> np.ndarray:
    return (np.int64(namespace) << 58) | (np.asarray(ident, dtype=np.int64) << 24) | index.astype(np.int64)


@dataclass(frozen=True)
class GeneratedRequests:
    """Requests of one workload, in arrival order, with what identifies their shared prefixes."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    skipped_rows: int
    hash_ids: list[tuple[int, ...]] | None = None  # Mooncake rows: ids of 512-token prompt blocks
    hash_block_tokens: int = 512
    prefix_group: np.ndarray | None = None  # system prompt each request starts with (-1: none)
    prefix_tokens: int = 0
    session: np.ndarray | None = None  # multi-turn: each request's session (its turns are consecutive)
    next_turn: np.ndarray | None = None  # index of the session's next turn (-1: none)
    group: np.ndarray | None = None  # fan-out: each sample's first sample (the one that runs the prompt)

    def block_keys(self, block_size: int, workload_index: int) -> list[np.ndarray]:
        """Keys of each request's full KV blocks whose tokens are shared (empty where nothing is)."""
        keys = [np.zeros(0, dtype=np.int64)] * self.arrival.size
        if self.hash_ids is not None:  # block j is identified by the trace block holding its last token
            for i, (ids, n) in enumerate(zip(self.hash_ids, self.prompt.tolist())):
                j = np.arange(min(n // block_size, len(ids) * self.hash_block_tokens // block_size))
                last = ((j + 1) * block_size - 1) // self.hash_block_tokens
                ident = (workload_index << 26) | np.asarray(ids, dtype=np.int64)[last]  # hash ids < 2**26
                keys[i] = _keys(_NS_TRACE, ident, j)
        if self.session is not None:  # a turn's history and answer are the next turn's prompt's start
            for i, (sid, n) in enumerate(zip(self.session.tolist(), (self.prompt + self.output - 1).tolist())):
                keys[i] = _keys(_NS_SESSION, (workload_index << 30) | sid, np.arange(n // block_size))
        if self.prefix_group is not None:
            shared = np.arange(self.prefix_tokens // block_size)
            for i in np.flatnonzero(self.prefix_group >= 0).tolist():
                group = workload_index * (1 << 20) + int(self.prefix_group[i])
                keys[i] = _keys(_NS_SYSTEM_PROMPT, group, shared)
        return keys


def _load(source: TraceSource) -> TraceData:
    """The trace, read once per version of its file: the cache is keyed by the file's size and modification
    time as well as its path, so a rewritten file is read again."""
    try:
        stat = Path(source.path).stat()
        version = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        version = None  # the reader says what is wrong with the path
    return _read(source, version)


@lru_cache(maxsize=8)
def _read(source: TraceSource, version: tuple[int, int] | None) -> TraceData:
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
    if w.arrival.kind == "burst":
        return np.zeros(w.num_requests or 0)
    if w.arrival.kind == "closed_loop":  # the first request of each client at the start; the rest when sent
        n = w.num_requests or 0
        return np.where(np.arange(n) < w.arrival.concurrency, 0.0, np.nan)
    if w.num_requests is not None:
        return np.cumsum(_gaps(w.arrival, w.num_requests, rng))
    assert w.duration_s is not None
    expected = w.arrival.rate * w.duration_s
    if expected > MAX_REQUESTS:
        raise ServesimError(f"workload {w.name!r}: rate x duration_s = {expected:.3g} requests; allowed: at most "
                            f"{MAX_REQUESTS:,}")
    chunk = int(expected + 10 * math.sqrt(expected) + 16)
    times = np.cumsum(_gaps(w.arrival, chunk, rng))
    while times[-1] < w.duration_s:  # rare: draw more gaps until past the end
        times = np.concatenate([times, times[-1] + np.cumsum(_gaps(w.arrival, chunk, rng))])
    return times[times < w.duration_s]


def _lognormal(mean: float, cv: float, n: int, rng: np.random.Generator, cap: int | None) -> np.ndarray:
    sigma2 = math.log1p(cv**2)
    x = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)
    return np.clip(np.rint(x), 1, cap or MAX_TOKENS).astype(np.int64)


def _lengths(w: Workload, n: int, rng: np.random.Generator, trace: TraceData | None,
             rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    spec = w.lengths
    if spec.kind == "fixed":
        return np.full(n, spec.prompt, dtype=np.int64), np.full(n, spec.output, dtype=np.int64)
    if spec.kind == "uniform":
        return (rng.integers(spec.prompt[0], spec.prompt[1], n, endpoint=True),
                rng.integers(spec.output[0], spec.output[1], n, endpoint=True))
    if spec.kind == "lognormal":
        return (_lognormal(spec.prompt_mean, spec.prompt_cv, n, rng, spec.max_prompt),
                _lognormal(spec.output_mean, spec.output_cv, n, rng, spec.max_output))
    assert trace is not None and rows is not None
    return trace.prompt[rows], trace.output[rows]


def _trace_rows(w: Workload, n: int, rng: np.random.Generator, trace: TraceData) -> np.ndarray:
    """Rows of the trace the requests take: in order when replaying its arrivals, else drawn."""
    return np.arange(n) if w.arrival.kind == "trace" else rng.integers(0, len(trace), n)


def generate(w: Workload, rng: np.random.Generator) -> GeneratedRequests:
    """Draw one workload's requests (deterministic for a given generator state)."""
    trace = _load(w.trace) if w.trace is not None else None
    arrival = _arrivals(w, rng, trace) + w.start_s
    if w.sessions is not None:
        return _sessions(w, arrival, rng, trace)
    n = arrival.size
    rows = _trace_rows(w, n, rng, trace) if w.lengths.kind == "trace" and trace is not None else None
    hash_ids = None
    if rows is not None and trace is not None and trace.hash_ids is not None:
        hash_ids = [trace.hash_ids[i] for i in rows.tolist()]
    prompt, output = _lengths(w, n, rng, trace, rows)
    group = None
    if w.shared_prefix is not None:
        sp = w.shared_prefix
        group = np.where(rng.random(n) < sp.fraction, rng.integers(0, sp.prompts, n), -1)
        prompt = prompt + np.where(group >= 0, sp.tokens, 0)
    out = GeneratedRequests(arrival=arrival, prompt=prompt, output=output,
                            skipped_rows=trace.skipped_rows if trace is not None else 0, hash_ids=hash_ids,
                            prefix_group=group, prefix_tokens=w.shared_prefix.tokens if w.shared_prefix else 0)
    return out if w.fan_out is None else _fan_out(w, out, rng, trace)


def _fan_out(w: Workload, g: GeneratedRequests, rng: np.random.Generator, trace: TraceData | None
             ) -> GeneratedRequests:
    """Each request as `n` consecutive samples of its prompt: the first keeps its output length, the others
    draw theirs from the workload's lengths (a trace's from rows drawn at random)."""
    assert w.fan_out is not None
    n, size = w.fan_out.n, g.arrival.size
    rows = rng.integers(0, len(trace), size * (n - 1)) if w.lengths.kind == "trace" and trace is not None else None
    _, drawn = _lengths(w, size * (n - 1), rng, trace, rows)
    output = np.column_stack([g.output, drawn.reshape(size, n - 1)]).ravel()
    first = np.repeat(np.arange(size) * n, n)
    rep = np.repeat(np.arange(size), n)
    return GeneratedRequests(arrival=g.arrival[rep], prompt=g.prompt[rep], output=output, skipped_rows=g.skipped_rows,
                             hash_ids=None if g.hash_ids is None else [g.hash_ids[i] for i in rep.tolist()],
                             hash_block_tokens=g.hash_block_tokens,
                             prefix_group=None if g.prefix_group is None else g.prefix_group[rep],
                             prefix_tokens=g.prefix_tokens, group=first)


def _sessions(w: Workload, starts: np.ndarray, rng: np.random.Generator, trace: TraceData | None
              ) -> GeneratedRequests:
    """Turns of sessions starting at `starts`: each turn's new message and answer drawn from `w.lengths`, its
    prompt its session's history (earlier messages and answers) plus its message; later turns' arrival is
    NaN (`sim.clients` sends each after the previous answer)."""
    spec = w.sessions
    assert spec is not None
    n = starts.size
    turns = (np.full(n, spec.turns) if spec.turns_kind == "fixed"
             else rng.geometric(1.0 / spec.turns, n)).astype(np.int64)
    total = int(turns.sum())
    rows = _trace_rows(w, total, rng, trace) if w.lengths.kind == "trace" and trace is not None else None
    message, answer = _lengths(w, total, rng, trace, rows)
    session = np.repeat(np.arange(n), turns)
    first = np.cumsum(turns) - turns
    turn = np.arange(total) - np.repeat(first, turns)
    spoken = message + answer  # each turn adds its message and its answer to the history
    before = np.cumsum(spoken) - spoken  # over all sessions so far
    history = before - np.repeat(before[first], turns)
    arrival = np.where(turn == 0, np.repeat(starts, turns), np.nan)
    next_turn = np.where(turn == np.repeat(turns, turns) - 1, -1, np.arange(total) + 1)
    return GeneratedRequests(arrival=arrival, prompt=history + message, output=answer,
                             skipped_rows=trace.skipped_rows if trace is not None else 0,
                             session=session, next_turn=next_turn)
