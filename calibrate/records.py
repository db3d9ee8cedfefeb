"""The raw measurements a profile is fitted from, as typed records: what `calibrate.microbench.run_all` (plus
`calibrate.collectives`) writes, and the whole steps of `calibrate.steps` and `calibrate reference`.

`Measurements.parse` reads the raw JSON's dict once; a record that lacks a field, or has a value of the wrong
type, or a kind no suite writes, is a one-line error naming the record. Fields the fit does not read (`op`
of a GEMM, `rows` of an elementwise kernel, ...) may be there and are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from hardware.errors import ServesimError
from hardware.operators import StepShape

Engine = dict[str, str]  # the Deployment fields that say which kernels the backend launched
PAGED_ENGINE: Engine = {"kv_access": "paged", "elementwise": "fused"}  # the backend now
LEGACY_ENGINE: Engine = {"kv_access": "gather", "elementwise": "unfused"}  # the backend before its Triton kernels
NAMED_KINDS = ("elementwise", "embedding", "kv-write", "kv-gather", "sampling")  # memory curves per operator
TIMED_COLLECTIVES = ("all-reduce", "all-gather", "send-recv")  # the collectives suite's kinds


def engine(r: Mapping[str, Any]) -> Engine:
    """Which kernels the backend that timed a record (or a reference step) launched: records from before
    its paged and fused kernels carry neither field and describe the K/V gather and PyTorch's separate ops."""
    return {k: r[k] if isinstance(r.get(k), str) else v for k, v in LEGACY_ENGINE.items()}


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class _Engined(_Record):
    kv_access: str | None = None
    elementwise: str | None = None

    @property
    def engine(self) -> Engine:
        return engine({"kv_access": self.kv_access, "elementwise": self.elementwise})


class Timed(_Record):
    """One operator timed alone: seconds a call, and the cost model's FLOPs and bytes and kernels of it."""

    kind: str
    seconds: float
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 1


class Gemm(Timed):
    """A weight GEMM of M rows by a (K, N) weight."""

    m: int
    k: int
    n: int


class GroupedGemm(Gemm):
    """An MoE layer's grouped expert GEMM over M token slots, `experts` experts of (K, N)."""

    experts: int


class MemoryOp(Timed):
    """A named memory-bound operator (`NAMED_KINDS`): the K/V gathers also carry their head configuration, and
    a gather of a ragged batch is a check, not a point of the fit."""

    op: str
    kv_heads: int | None = None
    head_dim: int | None = None
    ragged: bool = False


class Attention(Timed, _Engined):
    """An attention kernel call on a grid cell (x, y: the suite's two sizes, by kind) of a head configuration;
    `ragged` batches are checks; `with_gather` marks records timed with their K/V gather (before profile
    version 3)."""

    x: int | float  # (kept as written: a ragged check reports them)
    y: int | float
    seqs: int | None = None  # sequences in the call (a ragged check reports it)
    queries: int = 1  # queries per sequence of a decode call (speculative verifications: k + 1)
    heads: int
    kv_heads: int
    head_dim: int
    ragged: bool = False
    with_gather: bool = True


class Collective(_Record):
    """A collective over `ranks` GPUs moving `comm_bytes` per rank."""

    kind: Literal["all-reduce", "all-gather", "send-recv"]
    ranks: int
    comm_bytes: float
    seconds: float


class CollectiveDispatch(_Record):
    """One eager NCCL call's seconds in a TP rank, and its kernel's own."""

    seconds: float
    kernel_seconds: float


class Step(_Engined):
    """A whole forward step of `model` cut to `layers` layers (overhead steps, the reference's rounds), its
    wall seconds (and the fast phase's statistic, `calibrate.steps.StepTiming`), and its seconds inside CUDA
    events where measured."""

    layers: int
    execution: Literal["graph", "eager"]
    requests: int
    shape: dict[str, Any]
    seconds: float
    model: str = "tiny-llama"
    tp: int = 1
    kv_tokens: int | None = None  # KV tokens its requests hold (older steps lack it)
    seconds_fast: float | None = None
    gpu_seconds: float | None = None
    gpu_seconds_fast: float | None = None

    @property
    def wall(self) -> float:
        """Wall seconds: the fast phase's statistic where recorded."""
        return self.seconds if self.seconds_fast is None else self.seconds_fast

    @property
    def gpu(self) -> float:
        """Seconds inside its CUDA events (fast phase where recorded); NaN where not measured (CPU)."""
        gpu = self.gpu_seconds if self.gpu_seconds_fast is None else self.gpu_seconds_fast
        return math.nan if gpu is None else gpu

    @property
    def kv(self) -> int:
        """KV tokens its requests hold (0 where not recorded)."""
        return self.kv_tokens or 0

    @property
    def prefills(self) -> bool:
        return bool(self.shape["prefill_tokens"])

    @property
    def mixed(self) -> bool:
        """Prefill chunks and decodes: two attention calls in the backend."""
        return self.prefills and bool(self.shape["decode_context"])

    @property
    def short(self) -> bool:
        """At short contexts (at most 64 KV tokens per request): little GPU work, host-bound when eager."""
        return self.kv <= 64 * self.requests

    def step_shape(self) -> StepShape:
        return StepShape.from_dict(self.shape)


class Fixed(_Record):
    """The fixed-cost suite: a kernel's GPU seconds in a graph, and what one queued on a stream takes more
    (older raw files lack it: 0)."""

    graph_kernel_seconds: float
    stream_gap_seconds: float = 0.0


class Measurements(_Record):
    """A raw file's records by kind, its whole steps and its fixed costs."""

    gemm: list[Gemm]
    grouped_gemm: list[GroupedGemm]
    named: list[MemoryOp]
    attention: list[Attention]
    collectives: list[Collective]
    dispatch: list[CollectiveDispatch]
    steps: list[Step]
    fixed: Fixed

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Measurements:
        """The typed records of a raw dict (`records`, `steps`, `fixed`); errors name the record."""
        groups: dict[str, list[Any]] = {name: [] for name, _ in _GROUPS.values()}
        for i, r in enumerate(raw["records"]):
            kind = r.get("kind") if isinstance(r, Mapping) else None
            if isinstance(kind, str) and kind.startswith("attention"):
                kind = "attention-*"
            if kind not in _GROUPS:
                raise ServesimError(f"raw measurements: records[{i}].kind = {kind!r}; allowed: {', '.join(_GROUPS)}")
            name, model = _GROUPS[kind]
            groups[name].append(_typed(model, r, f"records[{i}]"))
        steps = [_typed(Step, s, f"steps[{i}]") for i, s in enumerate(raw.get("steps", []))]
        return cls.model_construct(**groups, steps=steps, fixed=_typed(Fixed, raw["fixed"], "fixed"))


# each record kind's `Measurements` list and record type (attention kinds: `attention-prefill`, `-decode`, ...)
_GROUPS: dict[str, tuple[str, type[_Record]]] = {
    "gemm": ("gemm", Gemm), "grouped-gemm": ("grouped_gemm", GroupedGemm), "attention-*": ("attention", Attention),
    **{kind: ("named", MemoryOp) for kind in NAMED_KINDS},
    **{kind: ("collectives", Collective) for kind in TIMED_COLLECTIVES},
    "collective-dispatch": ("dispatch", CollectiveDispatch),
}


def _typed(model: type[_Record], data: Any, where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        field = ".".join(str(p) for p in e["loc"])
        raise ServesimError(f"raw measurements: {where}.{field}: {e['msg']} (got {e.get('input')!r:.60})") from None
