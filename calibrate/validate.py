"""Whole-model step-time error of the cost model against reference measurements (`calibrate.reference`).

Each measured step is priced twice on the named GPU: with the profile under test and with the datasheet
defaults alone, so the gain from calibration is visible. A step is measured by its fast-phase wall time
(the lent hosts' CPUs have slow phases that host-bound eager steps follow; the median is reported beside
it). Errors are (predicted - measured) / measured;
the table gives the mean absolute percentage error (MAPE) per category (prefill, decode, mixed), execution
(eager, graph) and TP degree, with the worst cases and a predicted-vs-measured plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calibrate.records import engine
from hardware.catalog import get_gpu
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.files import numeric_columns, read_table
from hardware.operators import StepShape
from hardware.profile import DEFAULT_PROFILE, Profile

COLUMNS = ("model", "category", "execution", "tp", "shape", "seconds")


def read_measurements(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    df = read_table(p, what="measurements")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ServesimError(f"{p}: missing column(s) {missing}; expected {', '.join(COLUMNS)}")
    if df.empty:
        raise ServesimError(f"{p}: no measured steps (a header only)")
    df = numeric_columns(df, p, tuple(c for c in ("tp", "seconds", "seconds_fast") if c in df.columns))
    for i, cell in enumerate(df["shape"]):
        try:
            StepShape.from_dict(json.loads(cell))
        except (ValueError, KeyError, TypeError) as exc:
            raise ServesimError(f"{p}: row {i + 1}: shape = {cell!r} is not a step shape ({exc!r})") from None
    return df


def predict(df: pd.DataFrame, gpu: str, profile: Profile) -> np.ndarray:
    """Predicted seconds of every measured step on `gpu` under `profile`."""
    gpu_spec = get_gpu(gpu)
    models: dict[tuple[Any, ...], CostModel] = {}
    out = []
    for row in df.itertuples():
        kernels = engine(row._asdict())  # references from before the paged and fused kernels name neither
        key = (row.model, int(row.tp), row.execution == "graph", *kernels.values())
        if key not in models:
            dep = Deployment.build(row.model, gpu_spec, tp=int(row.tp), **kernels)
            models[key] = CostModel(dep, profile, cuda_graphs=key[2])
        out.append(models[key].price(StepShape.from_dict(json.loads(row.shape))).seconds)
    return np.array(out)


def statistic_column(df: pd.DataFrame, statistic: str | None) -> str:
    """The measured column to compare with: `seconds_fast` (the host's fast phase, see
    `calibrate.steps.StepTiming`) or `seconds` (median); by default fast where the file records it."""
    if statistic is None:
        statistic = "fast" if "seconds_fast" in df.columns else "median"
    if statistic not in ("fast", "median"):
        raise ServesimError(f"--statistic = {statistic!r}: allowed: fast, median")
    if statistic == "fast" and "seconds_fast" not in df.columns:
        raise ServesimError("--statistic = 'fast': the measurements have no seconds_fast column (older file); "
                            "use median")
    return "seconds_fast" if statistic == "fast" else "seconds"


def compare(df: pd.DataFrame, gpu: str, profile: Profile,
            statistic: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-step predictions and errors against the chosen statistic (`statistic_column`), and the MAPE
    table per (category, execution, tp), with the MAPE against the median beside it."""
    measured = statistic_column(df, statistic)
    steps = df.copy()
    steps["measured"] = steps[measured]
    steps["predicted"] = predict(df, gpu, profile)
    steps["predicted_datasheet"] = predict(df, gpu, DEFAULT_PROFILE)
    steps["error"] = steps["predicted"] / steps["measured"] - 1.0
    steps["error_median"] = steps["predicted"] / steps["seconds"] - 1.0
    steps["error_datasheet"] = steps["predicted_datasheet"] / steps["measured"] - 1.0
    table = (steps.assign(ape=steps["error"].abs() * 100, ape_median=steps["error_median"].abs() * 100,
                          ape_datasheet=steps["error_datasheet"].abs() * 100)
             .groupby(["category", "execution", "tp"])
             .agg(steps=("ape", "size"), mape=("ape", "mean"), worst=("ape", "max"),
                  mape_median=("ape_median", "mean"), mape_datasheet=("ape_datasheet", "mean"))
             .reset_index())
    table.attrs["statistic"] = measured
    return steps, table


def summary(steps: pd.DataFrame, table: pd.DataFrame, worst: int = 5) -> dict[str, Any]:
    bad = steps.reindex(steps["error"].abs().sort_values(ascending=False).index).head(worst)
    return {
        "steps": len(steps),
        "statistic": table.attrs.get("statistic", "seconds"),
        "mape": float(steps["error"].abs().mean() * 100),
        "mape_median": float(steps["error_median"].abs().mean() * 100),
        "mape_datasheet": float(steps["error_datasheet"].abs().mean() * 100),
        "categories": table.round(2).to_dict(orient="records"),
        "worst": bad[["category", "execution", "tp", "shape", "measured", "predicted", "error"]].round(6)
        .to_dict(orient="records"),
    }


def format_table(result: dict[str, Any]) -> str:
    fast = result.get("statistic") == "seconds_fast"
    lines = [f"measured: {'fast phase (10th percentile)' if fast else 'median'} wall seconds per step",
             f"{'category':<9} {'exec':<6} {'tp':>2} {'steps':>5} {'MAPE %':>7} {'worst %':>8} {'median %':>9} "
             f"{'datasheet %':>11}"]
    for r in result["categories"]:
        lines.append(f"{r['category']:<9} {r['execution']:<6} {r['tp']:>2} {r['steps']:>5} {r['mape']:>7.1f} "
                     f"{r['worst']:>8.1f} {r['mape_median']:>9.1f} {r['mape_datasheet']:>11.1f}")
    lines.append(f"all: {result['steps']} steps, MAPE {result['mape']:.1f}% (against medians "
                 f"{result['mape_median']:.1f}%; datasheet only: {result['mape_datasheet']:.1f}%)")
    for w in result["worst"]:
        lines.append(f"  worst: {w['category']} {w['execution']} ({describe(w['shape'])}) measured "
                     f"{w['measured'] * 1e3:.2f} ms, predicted {w['predicted'] * 1e3:.2f} ms "
                     f"({w['error'] * 100:+.1f}%)")
    return "\n".join(lines)


def describe(shape: str) -> str:
    """A step shape (JSON) in a few words: prefill chunks and cached tokens, decodes and their contexts."""
    d = json.loads(shape)
    parts = []
    if d["prefill_tokens"]:
        parts.append(f"prefill {'+'.join(map(str, d['prefill_tokens']))} after {sum(d['prefill_cached'])} cached")
    if d["decode_context"]:
        ctx = d["decode_context"]
        parts.append(f"{len(ctx)} decodes at context {min(ctx)}" + (f"-{max(ctx)}" if max(ctx) > min(ctx) else ""))
    return ", ".join(parts)


def plot(steps: pd.DataFrame, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for column, label, marker in (("predicted_datasheet", "datasheet only", "x"), ("predicted", "calibrated", "o")):
        for (cat, ex), g in steps.groupby(["category", "execution"]):
            ax.scatter(g["measured"] * 1e3, g[column] * 1e3, marker=marker, s=18,
                       label=f"{label}: {cat} {ex}", alpha=0.4 if marker == "x" else 0.9)
    lo, hi = steps[["measured", "predicted", "predicted_datasheet"]].min().min() * 1e3, \
        steps[["measured", "predicted", "predicted_datasheet"]].max().max() * 1e3
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="measured step (ms)", ylabel="predicted step (ms)", title=title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
