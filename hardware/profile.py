"""Efficiency profiles: what fraction of the datasheet peaks each operator kind reaches, by its size.

A profile holds, per operator kind, a compute-efficiency curve over the operator's FLOPs and a
memory-efficiency curve over its bytes (collectives: link efficiency over their payload bytes), plus the
fixed costs (per-kernel launch, per-step CPU overhead) in eager and CUDA-graph execution. `servesim
calibrate` writes profiles from kernel timings; without one, `DEFAULT_PROFILE` applies.

Curves are interpolated linearly in log-log space over (size, time-per-size) and tabulated once on a
fine grid so a lookup is O(1). Each curve is made monotone on load: more work never takes less time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, PositiveFloat, ValidationError, model_validator

from hardware.errors import ServesimError, describe_validation_error
from hardware.specs import Spec

OP_KINDS = (
    "gemm",
    "attention-prefill",
    "attention-decode",
    "elementwise",
    "embedding",
    "kv-write",
    "sampling",
    "all-reduce",
    "all-gather",
    "send-recv",
)
COLLECTIVE_KINDS = frozenset({"all-reduce", "all-gather", "send-recv"})
PROFILE_VERSION = 1
_GRID_PER_DECADE = 32


class Curve(Spec):
    """Efficiency (0, 1] at increasing sizes (FLOPs or bytes); constant beyond both ends."""

    sizes: tuple[PositiveFloat, ...] = Field(min_length=1)
    efficiency: tuple[float, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Curve:
        if len(self.sizes) != len(self.efficiency):
            raise ValueError(f"sizes ({len(self.sizes)}) and efficiency ({len(self.efficiency)}) differ in length")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError("sizes must be strictly increasing")
        if any(not 0.0 < e <= 1.0 for e in self.efficiency):
            raise ValueError(f"efficiency values must be in (0, 1], got {self.efficiency}")
        return self


class KindEfficiency(Spec):
    """Compute and memory efficiency of one operator kind (a number is a flat curve)."""

    compute: Curve | float = 1.0
    memory: Curve | float = 1.0


class Overheads(Spec):
    """Fixed costs in seconds: per kernel launched, and per step on the CPU (scheduling, input prep)."""

    launch_eager: float = Field(ge=0.0)
    launch_graph: float = Field(ge=0.0)
    step_eager: float = Field(ge=0.0)
    step_graph: float = Field(ge=0.0)


class Profile(Spec):
    """A versioned efficiency profile for one GPU (see module docstring)."""

    version: Literal[1] = PROFILE_VERSION
    gpu: str
    metadata: dict[str, Any] = {}
    efficiency: dict[str, KindEfficiency]
    overheads: Overheads

    @model_validator(mode="after")
    def _check_kinds(self) -> Profile:
        unknown = set(self.efficiency) - set(OP_KINDS)
        if unknown:
            raise ValueError(f"unknown operator kind(s) {sorted(unknown)}; allowed: {', '.join(OP_KINDS)}")
        return self

    def merged_over(self, base: Profile) -> Profile:
        """This profile with kinds it lacks taken from `base`."""
        return self.model_copy(update={"efficiency": {**base.efficiency, **self.efficiency}})


# Uncalibrated defaults, chosen from published measurements of Hopper-class GPUs: cuBLAS bf16 GEMMs reach
# ~70-80% of dense peak at large shapes and ~85-90% of HBM bandwidth when memory bound; FlashAttention-2
# prefill ~40-55% of peak; paged decode attention ~60-75% of bandwidth; simple elementwise kernels ~70%.
# Launch: ~4.5 us per kernel when eager PyTorch dispatches it, ~1.5 us inside a CUDA graph replay.
# Step CPU overhead (scheduler, input preparation, output processing): 400 us eager, 250 us with graphs.
DEFAULT_PROFILE = Profile(
    gpu="default",
    metadata={"source": "servesim documented defaults (uncalibrated)"},
    efficiency={
        "gemm": KindEfficiency(compute=0.75, memory=0.85),
        "attention-prefill": KindEfficiency(compute=0.50, memory=0.75),
        "attention-decode": KindEfficiency(compute=0.50, memory=0.70),
        "elementwise": KindEfficiency(compute=0.50, memory=0.70),
        "embedding": KindEfficiency(compute=0.50, memory=0.60),
        "kv-write": KindEfficiency(compute=0.50, memory=0.60),
        "sampling": KindEfficiency(compute=0.50, memory=0.60),
        "all-reduce": KindEfficiency(memory=0.80),
        "all-gather": KindEfficiency(memory=0.80),
        "send-recv": KindEfficiency(memory=0.85),
    },
    overheads=Overheads(launch_eager=4.5e-6, launch_graph=1.5e-6, step_eager=400e-6, step_graph=250e-6),
)


def log_time_curve(curve: Curve | float) -> np.ndarray:
    """Grid of (log10 size, log10 size/efficiency) points, one every 1/32 decade, monotone in both.

    Linear interpolation between the points, and slope 1 beyond the ends (constant efficiency), give
    log10(time x peak) at any size. Flat curves need just two points.
    """
    if not isinstance(curve, Curve) or len(curve.sizes) == 1:
        e = curve.efficiency[0] if isinstance(curve, Curve) else curve
        if not 0.0 < e <= 1.0:
            raise ServesimError(f"efficiency {e} must be in (0, 1]")
        u = np.array([0.0, 1.0])
        return np.stack([u, u - math.log10(e)], axis=1)
    u = np.log10(np.asarray(curve.sizes, dtype=float))
    n = max(2, int(math.ceil((u[-1] - u[0]) * _GRID_PER_DECADE)) + 1)
    grid = np.linspace(u[0], u[-1], n)
    log_t = np.interp(grid, u, u - np.log10(np.asarray(curve.efficiency, dtype=float)))
    return np.stack([grid, np.maximum.accumulate(log_t)], axis=1)  # more work never takes less time


class TimeTables:
    """Many `log_time_curve`s packed into flat arrays, evaluated for many operators at once (O(1) each)."""

    def __init__(self, curves: list[Curve | float]) -> None:
        grids = [log_time_curve(c) for c in curves]
        sizes = np.array([g.shape[0] for g in grids])
        self._t = np.concatenate([g[:, 1] for g in grids])
        self._offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._lo = np.array([g[0, 0] for g in grids])
        self._hi = np.array([g[-1, 0] for g in grids])
        self._last = sizes - 2
        self._scale = (sizes - 1) / (self._hi - self._lo)
        flat = all(g.shape[0] == 2 and math.isclose(g[1, 1] - g[0, 1], g[1, 0] - g[0, 0]) for g in grids)
        self._inverse_eff = np.power(10.0, self._t[self._offset] - self._lo) if flat else None

    def seconds(self, work: np.ndarray, table: np.ndarray, peak: np.ndarray) -> np.ndarray:
        """work / (peak x efficiency(work)) for each element, using table `table[i]`; 0 where work <= 0."""
        if self._inverse_eff is not None:  # every curve flat: one multiply
            return np.maximum(work, 0.0) * self._inverse_eff[table] / peak
        positive = work > 0
        u = np.log10(np.where(positive, work, 1.0))
        lo, hi = self._lo[table], self._hi[table]
        uc = np.clip(u, lo, hi)
        pos = (uc - lo) * self._scale[table]
        i = np.minimum(pos.astype(np.int64), self._last[table])
        j = self._offset[table] + i
        left = self._t[j]
        log_t = left + (pos - i) * (self._t[j + 1] - left) + (u - uc)
        return np.where(positive, np.power(10.0, log_t) / peak, 0.0)


def load_profile(path: str | Path) -> Profile:
    """Read a profile JSON file; kinds it lacks fall back to the defaults."""
    p = Path(path)
    if not p.is_file():
        raise ServesimError(f"profile: no such file {str(p)!r}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ServesimError(f"{p}: not valid JSON: {exc}") from None
    try:
        return Profile.model_validate(data).merged_over(DEFAULT_PROFILE)
    except ValidationError as exc:
        raise ServesimError(describe_validation_error(exc, str(p))) from None


def packaged_profile(gpu_id: str) -> Profile | None:
    """The calibrated profile shipped for this GPU id (`hardware/profiles/<id>.json`), if any."""
    path = Path(__file__).parent / "profiles" / f"{gpu_id}.json"
    return load_profile(path) if path.is_file() else None
