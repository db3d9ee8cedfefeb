"""Efficiency curves tabulated for the cost model: each curve is interpolated linearly in log-log space over
(size, time-per-size) and tabulated once on a fine grid so a lookup is O(1), for many operators at once.

Each curve is made monotone (more work never takes less time), except a measured GEMM's curve over M, which
is interpolated as measured: cuBLAS picks its kernel per shape, and a GEMM of more rows can run faster than
one of fewer (on an H200, Llama-3-8B's 4,096 x 6,144 projection took 33.5 us at M = 320 and 27.5 us at
M = 384); the fit drops the isolated spikes (`calibrate.fit`).
"""

from __future__ import annotations

import math

import numpy as np

from hardware.errors import ServesimError
from hardware.profile import Curve

_GRID_PER_DECADE = 32
_MEASURED_PER_DECADE = 4096  # measured GEMM curves: M and M + 1 in different cells up to M = 1,779


def log_time_curve(curve: Curve | float, measured: bool = False) -> np.ndarray:
    """Grid of (log10 size, log10 size/efficiency) points, one every 1/32 decade, monotone in both; a
    `measured` GEMM curve on a finer grid (1/4096 decade) and as measured (see the module docstring).

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
    n = max(2, int(math.ceil((u[-1] - u[0]) * (_MEASURED_PER_DECADE if measured else _GRID_PER_DECADE))) + 1)
    grid = np.linspace(u[0], u[-1], n)
    log_t = np.interp(grid, u, u - np.log10(np.asarray(curve.efficiency, dtype=float)))
    return np.stack([grid, log_t if measured else np.maximum.accumulate(log_t)], axis=1)


class TimeTables:
    """Many `log_time_curve`s packed into flat arrays, evaluated for many operators at once (O(1) each);
    `measured[i]` marks curve i as a measured GEMM's."""

    def __init__(self, curves: list[Curve | float], measured: list[bool] | None = None) -> None:
        grids = [log_time_curve(c, m) for c, m in zip(curves, measured or [False] * len(curves))]
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
