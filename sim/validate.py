"""Compare a simulated run with a real one (`servesim validate SIM_DIR REAL_DIR`).

Two views:
- latency metrics: p50/p90/p99 of TTFT, TPOT, ITL and E2E and the output throughput of the two runs'
  summaries, as relative errors (sim - real) / real;
- steps: when the real run kept its batch shapes (`batches.jsonl`, written by `servesim replay`), each real
  step is re-priced by the cost model of the real run's config (with the profile given, if any), so the
  step-level error (MAPE) is measured on identical batches; a scatter plot shows predicted against measured.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from hardware.errors import ServesimError  # noqa: E402
from hardware.files import read_json, read_table, read_text  # noqa: E402
from hardware.operators import StepShape  # noqa: E402
from sim.config import load_config  # noqa: E402
from sim.setup import build_pools  # noqa: E402

METRICS = [f"{m}_{p}_s" for m in ("ttft", "tpot", "itl", "e2e") for p in ("p50", "p90", "p99")]


def _read_summary(d: Path) -> dict[str, Any]:
    path = d / "summary.json"
    if not path.is_file():
        raise ServesimError(f"validate: {d} has no summary.json (give the --out folder of a run or replay)")
    summary = read_json(path, "validate")
    if not isinstance(summary, dict):
        raise ServesimError(f"{path}: a run's summary must be a JSON object, got {type(summary).__name__}")
    return summary


def read_shapes(path: Path) -> list[StepShape]:
    """Batch shapes written by `servesim replay`, one JSON line per step."""
    out = []
    for number, line in enumerate(read_text(path, "validate").splitlines(), start=1):
        try:
            out.append(StepShape.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ServesimError(f"{path}:{number}: not a batch shape ({exc!r})") from None
    return out


def reprice(real_dir: Path, profile: str | None = None) -> pd.DataFrame:
    """Measured and predicted duration of every step of a replay, on identical batches (with the draft's
    time when the replay speculated)."""
    config = load_config(real_dir / "config.yaml")
    (pool,) = build_pools(config)
    if profile is not None:
        pool = replace(pool, hardware=pool.hardware.model_copy(update={"profile": profile}))
    executor = pool.executor(config.speculation)
    steps = read_table(real_dir / "steps.csv", ("duration_s",))
    shapes = read_shapes(real_dir / "batches.jsonl")
    if len(shapes) != len(steps):
        raise ServesimError(f"validate: {real_dir} has {len(steps)} steps but {len(shapes)} batch shapes")
    predicted = [executor.price(s) for s in shapes]
    return pd.DataFrame({
        "measured_s": steps["duration_s"],
        "predicted_s": [c.seconds + draft for c, draft in predicted],
        "tokens": [c.tokens for c, _ in predicted],
        "execution": [c.execution for c, _ in predicted],
        "measured_execution": steps["execution"] if "execution" in steps.columns else None,
        "draft_predicted_s": [draft for _, draft in predicted],
    })


def validate(sim_dir: str | Path, real_dir: str | Path, profile: str | None = None,
             out: str | Path | None = None) -> dict[str, Any]:
    """The comparison as a flat dict (also written to OUT/validation.json with the scatter plot)."""
    sim_dir, real_dir = Path(sim_dir), Path(real_dir)
    sim, real = _read_summary(sim_dir), _read_summary(real_dir)
    report: dict[str, Any] = {"sim_dir": str(sim_dir), "real_dir": str(real_dir)}
    for key in METRICS + ["throughput_output_tok_s", "throughput_req_s"]:
        s, r = sim.get(key), real.get(key)
        report[f"{key}_sim"], report[f"{key}_real"] = s, r
        report[f"{key}_error"] = (s - r) / r if s is not None and r else None
    out_dir = Path(out) if out else real_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if (real_dir / "batches.jsonl").is_file():
        steps = reprice(real_dir, profile)
        ape = (steps["predicted_s"] - steps["measured_s"]).abs() / steps["measured_s"]
        report["steps"] = int(len(steps))
        report["step_mape"] = float(ape.mean())
        report["step_median_ape"] = float(ape.median())
        measured = steps["measured_s"].sum()
        report["step_bias"] = float((steps["predicted_s"].sum() - measured) / measured)
        for execution in ("graph", "eager"):  # per execution, as the cost model runs each step
            part = ape[steps["execution"] == execution]
            report[f"step_mape_{execution}"] = float(part.mean()) if len(part) else None
            report[f"steps_{execution}"] = int(len(part))
        # steps the cost model runs otherwise than the replay did (a disagreement on which steps are graphed)
        report["execution_mismatches"] = int((steps["measured_execution"].notna()
                                              & (steps["measured_execution"] != steps["execution"])).sum())
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(steps["measured_s"] * 1e3, steps["predicted_s"] * 1e3, s=4, alpha=0.5)
        top = float(max(steps["measured_s"].max(), steps["predicted_s"].max()) * 1e3)
        low = float(min(steps["measured_s"].min(), steps["predicted_s"].min()) * 1e3)
        ax.plot([low, top], [low, top], color="grey", lw=0.8)
        if low > 0 and top / low > 20:  # steps span decades (decodes of a few ms, prefills of a few hundred)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("measured step (ms)")
        ax.set_ylabel("predicted step (ms)")
        ax.set_title(f"step MAPE {report['step_mape']:.1%} over {len(steps)} steps")
        fig.tight_layout()
        fig.savefig(out_dir / "step_scatter.png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        steps.to_csv(out_dir / "repriced_steps.csv", index=False)
    (out_dir / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'metric':28s} {'sim':>12s} {'real':>12s} {'error':>8s}"]
    for key in METRICS + ["throughput_output_tok_s", "throughput_req_s"]:
        s, r, e = report[f"{key}_sim"], report[f"{key}_real"], report[f"{key}_error"]
        fmt = (lambda v: "n/a" if v is None else f"{v:.4g}")
        lines.append(f"{key:28s} {fmt(s):>12s} {fmt(r):>12s} {'n/a' if e is None else f'{e:+.1%}':>8s}")
    if "step_mape" in report:
        lines.append(f"steps re-priced on identical batches: {report['steps']}, MAPE {report['step_mape']:.1%}, "
                     f"median APE {report['step_median_ape']:.1%}, total-time bias {report['step_bias']:+.1%}")
        parts = [f"{e} {report[f'steps_{e}']} steps MAPE {report[f'step_mape_{e}']:.1%}"
                 for e in ("graph", "eager") if report.get(f"step_mape_{e}") is not None]
        if parts:
            lines.append("  by execution: " + ", ".join(parts)
                         + f"; run otherwise than the replay: {report['execution_mismatches']}")
    return "\n".join(lines)
