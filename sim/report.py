"""Writing a run's results: summary.json, requests.csv, steps.csv, token_times.npy, config.yaml and plots
(and links.csv, the KV links' rates over time, for a disaggregated run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from hardware.errors import ServesimError  # noqa: E402
from sim.metrics import Results  # noqa: E402

SUMMARY_ROWS = (
    ("requests finished / rejected", "requests_finished", "requests_rejected", "{:d} / {:d}"),
    ("duration", "duration_s", None, "{:.1f} s"),
    ("throughput", "throughput_req_s", "throughput_output_tok_s", "{:.2f} req/s, {:.0f} output tok/s"),
    ("latencies", None, None, ""),  # TTFT, TPOT, ITL, E2E in ms at the reported percentiles
    ("goodput / SLO attainment", "goodput_req_s", "slo_attainment", "{:.2f} req/s / {:.1%}"),
    ("mean batch / mean KV use", "mean_batch_size", "mean_kv_usage", "{:.1f} / {:.1%}"),
    ("preemptions / steps", "preemptions", "steps", "{:d} / {:d}"),
    ("cost", "cost_per_hour", "cost_per_million_output_tokens", "${:.2f}/h, ${:.3f} per M output tokens"),
    ("energy", "energy_j", "output_tokens_per_joule", "{:.3g} J, {:.2f} output tokens/J"),
)
FAN_OUT_ROWS = (
    ("fan-out prompts / cancelled", "fanout_requests", "requests_cancelled", "{:d} / {:d} samples"),
    ("prompt E2E p50 / p99", "fanout_e2e_p50_s", "fanout_e2e_p99_s", "{:.3f} / {:.3f} s"),
)
DISAGG_ROWS = (
    ("KV transfer p50 / p99", "kv_transfer_p50_s", "kv_transfer_p99_s", "{:.4f} / {:.4f} s"),
    ("wait for decode room p50 / p99", "decode_wait_p50_s", "decode_wait_p99_s", "{:.4f} / {:.4f} s"),
    ("KV link use mean / max", "link_utilisation_mean", "link_utilisation_max", "{:.1%} / {:.1%}"),
    ("prefill / decode pool busy", "prefill_utilisation", "decode_utilisation", "{:.1%} / {:.1%}"),
)
LATENCIES = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if abs(ms) >= 100 else f"{ms:.1f}" if abs(ms) >= 10 else f"{ms:.2f}"


def _shown_percentiles(summary: dict[str, Any]) -> list[str]:
    """The reported percentiles but p90 (p50, p99 and any asked in `metrics.percentiles`)."""
    return [p for p in (k.removeprefix("ttft_p").removesuffix("_s") for k in summary
                        if k.startswith("ttft_p") and k.endswith("_s")) if p != "90"]


def _latency_lines(summary: dict[str, Any]) -> list[str]:
    shown = _shown_percentiles(summary)
    lines = []
    for label, key in LATENCIES:
        values = [summary.get(f"{key}_p{p}_s") for p in shown]
        if values and all(v is not None for v in values):
            name = f"{label} " + " / ".join(f"p{p}" for p in shown)
            lines.append(f"{name:30s} {' / '.join(_ms(v) for v in values)} ms")
    return lines


def run_header(config: Any) -> str:
    """What ran: model, GPU x replicas (TP, PP), scheduler and each workload's arrivals."""
    hw = config.hardware
    loads = []
    for w in config.workloads:
        a = w.arrival
        load = (f"{a.rate:g} req/s {a.kind}" if hasattr(a, "rate") else f"{a.concurrency} clients (closed loop)"
                if a.kind == "closed_loop" else f"trace x{a.rate_scale:g}" if a.kind == "trace" else "all at once")
        loads.append(f"{w.name}: {load}")
    where = (f"{hw.gpu} x{config.cluster.replicas} (TP {hw.tp}" + (f", PP {hw.pp}" if hw.pp > 1 else "")
             + (f", DP {hw.dp}" if hw.dp > 1 else "") + (", EP" if hw.expert_parallel else "") + ")"
             if config.disaggregation is None else "disaggregated pools")
    return f"{config.model} on {where}, {config.scheduler.name}; " + "; ".join(loads)


def format_summary(summary: dict[str, Any], config: Any = None) -> str:
    """A short human-readable table of the headline numbers (latencies in ms), under the run's header when
    its config is given."""
    lines = [run_header(config)] if config is not None else []
    rows = SUMMARY_ROWS + (FAN_OUT_ROWS if "fanout_requests" in summary else ()) + \
        (DISAGG_ROWS if "kv_transfers" in summary else ())
    for label, a, b, fmt in rows:
        if a is None:
            lines += _latency_lines(summary)
            continue
        values = [summary.get(a)] + ([summary.get(b)] if b else [])
        text = fmt.format(*values) if all(v is not None for v in values) else "n/a"
        lines.append(f"{label:30s} {text}")
    lines += _steady_lines(summary)
    return "\n".join(lines)


def _steady_lines(summary: dict[str, Any]) -> list[str]:
    """The steady-state window's headline numbers, its verdict, and a warning when it is not stable."""
    verdict = summary.get("stability")
    if verdict is None:
        return []
    get = summary.get
    lines = []
    if get("steady_offered_req_s") is not None:
        lines.append(f"{'steady state (after warm-up)':30s} {verdict}: {get('steady_offered_req_s'):.2f} req/s "
                     f"offered, {get('steady_throughput_req_s'):.2f} sustained, backlog "
                     f"{get('steady_backlog_growth_req_s'):+.3f} req/s over {get('steady_window_s'):.0f} s")
    for label, key in LATENCIES[:2]:
        a, b = get(f"steady_{key}_p50_s"), get(f"steady_{key}_p99_s")
        if a is not None and b is not None:
            lines.append(f"{'  ' + label + ' p50 / p99':30s} {_ms(a)} / {_ms(b)} ms")
    if get("steady_slo_attainment") is not None:
        lines.append(f"{'  SLO attainment':30s} {get('steady_slo_attainment'):.1%}")
    if verdict != "stable":
        lines.append(f"WARNING: {verdict.replace('_', ' ')}: {get('stability_reason')}")
    return lines


def _cdf_plot(results: Results, path: Path) -> None:
    done = results.requests[results.requests["status"] == "finished"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    slo = results.config.slo
    for ax, col, title, target in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "E2E latency"),
                                      (slo.ttft_s, slo.tpot_s, slo.e2e_s)):
        values = np.sort(done[col].dropna().to_numpy())
        if values.size:
            ax.plot(values, np.arange(1, values.size + 1) / values.size)
            if values[0] > 0 and values[-1] / values[0] > 100:  # spans decades
                ax.set_xscale("log")
        if target is not None:
            ax.axvline(target, color="C3", ls="--", lw=1, label=f"SLO {target:g} s")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results.config.model} on {results.config.hardware.gpu}: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _links_plot(results: Results, path: Path, bins: int = 200) -> None:
    """Each KV link port's utilisation over time (a disaggregated run's `links` table: a step function)."""
    links = results.links
    assert links is not None
    used = links.groupby("link")["rate_bytes_s"].max()
    busy = [name for name in used.index if used[name] > 0]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    end = float(links["time_s"].max()) or 1.0
    edges = np.linspace(0.0, end, bins + 1)
    for name in busy:  # each row holds until the link's next row: time-weighted means per bin
        rows = links[links["link"] == name]
        t, u = rows["time_s"].to_numpy(), rows["utilisation"].to_numpy() * 100
        area = np.concatenate([[0.0], np.cumsum(u[:-1] * np.diff(t))])  # its integral is linear between rows
        mean = np.diff(np.interp(edges, t, area)) / np.diff(edges)
        ax.plot((edges[:-1] + edges[1:]) / 2, mean, lw=0.9, label=name)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("link utilisation (%)")
    ax.set_title(f"KV links ({results.summary.get('kv_link')}): {len(busy)} ports carried transfers; "
                 f"time-weighted means over {bins} bins")
    if 0 < len(busy) <= 12:
        ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _binned(start: np.ndarray, duration: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Time-weighted mean of a per-step series in each time bin (NaN where no step ran)."""
    weight, _ = np.histogram(start, edges, weights=duration)
    total, _ = np.histogram(start, edges, weights=values * duration)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / weight


def _timeline_plot(results: Results, path: Path, bins: int = 300) -> None:
    steps = results.steps
    fig, axes = plt.subplots(3, 1, figsize=(11, 7), sharex=True)
    end = float((steps["start_s"] + steps["duration_s"]).max()) if len(steps) else 1.0
    edges = np.linspace(0.0, end, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    batch = (steps["prefill_requests"] + steps["decode_requests"] + steps["verify_requests"]).to_numpy(dtype=float)
    series = (("batch size (requests)", batch), ("KV cache in use", steps["kv_usage"].to_numpy(dtype=float)),
              ("waiting requests", steps["waiting"].to_numpy(dtype=float)))
    for ax, (label, values) in zip(axes, series):
        for (replica, pool), idx in steps.groupby(["replica", "pool"]).groups.items():
            sel = np.asarray(idx)
            name = f"replica {replica}" if pool == "colocated" else f"{pool} {replica}"
            ax.plot(centers, _binned(steps["start_s"].to_numpy()[sel], steps["duration_s"].to_numpy()[sel],
                                     values[sel], edges), lw=0.9, label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"time-weighted means over {bins} bins of {end / bins:.2f} s")
    axes[-1].set_xlabel("simulated time (s)")
    if steps["replica"].nunique() > 1:
        axes[0].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


STEP_TABLES = ("all", "sampled", "none")


def sampled_steps(steps: pd.DataFrame, rows: int) -> pd.DataFrame:
    """At most about `rows` steps of the table, evenly: every k-th step of each replica (its first included),
    k = ceil(steps / rows), in the table's order, with their index in the whole table as a first column `step`."""
    k = max(1, math.ceil(len(steps) / rows))
    kept = steps[(steps.groupby("replica", observed=True).cumcount() % k == 0).to_numpy()]
    return kept.reset_index(names="step")


def write_outputs(results: Results, out: str | Path, table_format: str = "csv", trace: bool = False,
                  steps: str = "all", step_rows: int = 100_000) -> list[Path]:
    """Write every output file under `out` (created if needed): the tables as CSV or Parquet (the steps table
    whole, `sampled` to about `step_rows` rows (`sampled_steps`), or `none`: a run logs about five steps a
    request), and with `trace` the Chrome trace `trace.json` (`sim.chrome_trace`); returns their paths. The
    summary and the plots read every step either way."""
    if steps not in STEP_TABLES:
        raise ServesimError(f"steps = {steps!r}; allowed: {', '.join(STEP_TABLES)}")
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    summary, tokens, config, cdf, timeline = (d / n for n in ("summary.json", "token_times.npy", "config.yaml",
                                                              "latency_cdf.png", "timeline.png"))
    tables = [(results.requests, d / f"requests.{table_format}")]
    if steps != "none":
        tables.append((results.steps if steps == "all" else sampled_steps(results.steps, step_rows),
                       d / f"steps.{table_format}"))
    paths = [summary, *(path for _, path in tables), tokens, config, cdf, timeline]
    if results.links is not None:
        tables.append((results.links, d / f"links.{table_format}"))
        paths.append(tables[-1][1])
    summary.write_text(json.dumps(results.summary, indent=2) + "\n")
    for frame, path in tables:
        frame.to_parquet(path, index=False) if table_format == "parquet" else frame.to_csv(path, index=False)
    np.save(tokens, results.token_times)
    config.write_text(yaml.safe_dump(results.config.model_dump(mode="json"), sort_keys=False))
    _cdf_plot(results, cdf)
    _timeline_plot(results, timeline)
    if results.links is not None and len(results.links):
        paths.append(d / "links.png")
        _links_plot(results, paths[-1])
    if trace:
        from sim.chrome_trace import write_trace

        paths.append(write_trace(results, d / "trace.json"))
    return paths
