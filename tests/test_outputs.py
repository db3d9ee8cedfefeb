"""Output formats of `servesim run`: Parquet tables, the Chrome trace (`sim.chrome_trace`) and `--json --out`."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd

from servesim.cli import main

SMALL = ["--set", "workloads.0.num_requests=120", "--quiet"]


def events(path) -> list[dict]:
    data = json.loads(path.read_text())  # valid JSON (NaN or Infinity would fail here)
    assert data["otherData"]["model"] == "llama-3-8b" and data["displayTimeUnit"] == "ms"
    return data["traceEvents"]


def test_the_chrome_trace_has_a_slice_per_step_and_each_request_life(tmp_path) -> None:
    assert main(["run", *SMALL, "--out", str(tmp_path), "--trace"]) == 0
    ev = events(tmp_path / "trace.json")
    assert set(Counter(e["ph"] for e in ev)) <= {"M", "X", "b", "e", "i", "C"}
    steps, req = pd.read_csv(tmp_path / "steps.csv"), pd.read_csv(tmp_path / "requests.csv")
    slices = [e for e in ev if e["ph"] == "X"]
    assert len(slices) == len(steps) and all(e["dur"] > 0 and e["tid"] == 1 for e in slices)
    assert sum(e["args"]["prefill_tokens"] for e in slices) == steps["prefill_tokens"].sum()
    named = {e["pid"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    assert {e["pid"] for e in ev if e["ph"] != "M"} <= named
    lives = [e for e in ev if e["ph"] in "be" and e["name"].startswith("request ")]
    assert Counter(e["ph"] for e in lives) == {"b": len(req), "e": len(req)}
    for e in lives:  # each life spans arrival to the last token
        row = req.loc[e["id"]]
        assert e["ts"] == round((row.arrival_s if e["ph"] == "b" else row.finish_s) * 1e6, 3)
    opened = Counter((e["id"], e["name"]) for e in ev if e["ph"] == "b")
    assert opened == Counter((e["id"], e["name"]) for e in ev if e["ph"] == "e")  # balanced, nested by id


def test_a_disaggregated_trace_shows_kv_transfers_and_link_rates(tmp_path) -> None:
    assert main(["run", "examples/disaggregated.yaml", "--set", "workloads.0.num_requests=60", "--quiet",
                 "--out", str(tmp_path), "--trace", "--format", "parquet"]) == 0
    ev = events(tmp_path / "trace.json")
    req = pd.read_parquet(tmp_path / "requests.parquet")
    transfers = [e for e in ev if e.get("cat") == "kv" and e["ph"] == "b"]
    assert len(transfers) == int((req["decode_replica"] >= 0).sum())
    counters = [e for e in ev if e["ph"] == "C"]
    links = pd.read_parquet(tmp_path / "links.parquet")
    assert len(counters) == len(links) and {e["name"] for e in counters} == set(links["link"])
    assert (tmp_path / "links.png").stat().st_size > 10_000
    pools = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    assert {"replica 0 (prefill)", "replica 2 (decode)"} <= pools


def test_parquet_tables_hold_what_the_csv_tables_hold(tmp_path) -> None:
    assert main(["run", *SMALL, "--out", str(tmp_path / "c")]) == 0
    assert main(["run", *SMALL, "--out", str(tmp_path / "p"), "--format", "parquet"]) == 0
    for name in ("requests", "steps"):
        csv, pq = pd.read_csv(tmp_path / "c" / f"{name}.csv"), pd.read_parquet(tmp_path / "p" / f"{name}.parquet")
        assert list(csv.columns) == list(pq.columns) and len(csv) == len(pq) > 0
        for col in csv.columns:
            if pd.api.types.is_numeric_dtype(pq[col]):
                assert np.allclose(csv[col].astype(float), pq[col].astype(float), equal_nan=True, rtol=1e-12), col
            else:
                assert (csv[col].astype(object).fillna("").astype(str) ==
                        pq[col].astype(object).fillna("").astype(str)).all(), col


def test_json_with_out_still_writes_the_files_and_trace_needs_out(tmp_path, capsys) -> None:
    assert main(["run", *SMALL, "--json", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["requests_total"] == 120
    assert (tmp_path / "requests.csv").is_file()
    assert main(["run", *SMALL, "--trace"]) == 2
    assert "--trace writes trace.json into --out" in capsys.readouterr().err


def test_extra_percentiles_are_exact_and_the_table_names_what_ran(capsys) -> None:
    assert main(["run", *SMALL, "--percentiles", "50,99.9", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert {"ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_p99.9_s", "itl_p99.9_s", "e2e_p99.9_s"} <= set(s)
    from sim.config import load_config
    from sim.engine import simulate

    res = simulate(load_config(None, ["workloads.0.num_requests=120", "metrics.percentiles=[99.9]"]))
    done = res.requests[res.requests["status"] == "finished"]
    assert s["ttft_p99.9_s"] == np.percentile(done["ttft_s"], 99.9)
    gaps = np.concatenate([res.itls(i) for i in done["request_id"]])
    assert abs(s["itl_p99.9_s"] / np.percentile(gaps, 99.9) - 1) < 1e-12
    assert main(["run", *SMALL, "--percentiles", "99.9"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "llama-3-8b on h100 x1 (TP 1), vllm; azure-conv-like: 15 req/s poisson"
    assert any(line.startswith("TTFT p50 / p99 / p99.9") and line.endswith(" ms") for line in table)
    assert main(["run", *SMALL, "--percentiles", "0"]) == 2
    assert "metrics.percentiles" in capsys.readouterr().err


def test_progress_bars_show_only_where_someone_watches(monkeypatch, capsys) -> None:
    from sim import engine
    from sim.config import load_config

    config = load_config(None, ["workloads.0.num_requests=1500"])
    monkeypatch.setattr(engine, "watched", lambda: False)  # stderr captured, not a terminal, no kernel: no bar
    engine.simulate(config, progress=True)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(engine, "watched", lambda: True)
    engine.simulate(config, progress=True)
    err = capsys.readouterr().err
    assert "servesim run" in err and "1500/1500" in err and "req" in err


def test_the_steps_table_written_whole_sampled_or_not_at_all(tmp_path, capsys) -> None:
    """`--steps sampled` writes every k-th step of each replica, each with its index in the whole table; `none`
    writes no steps file; the summary is the same (it reads every step)."""
    two = [*SMALL, "--set", "cluster.replicas=2"]
    for mode in ("all", "sampled", "none"):
        assert main(["run", *two, "--out", str(tmp_path / mode), "--steps", mode, "--step-rows", "40"]) == 0
    whole = pd.read_csv(tmp_path / "all" / "steps.csv")
    sampled = pd.read_csv(tmp_path / "sampled" / "steps.csv")
    assert not (tmp_path / "none" / "steps.csv").exists() and (tmp_path / "none" / "requests.csv").exists()
    k = -(-len(whole) // 40)
    assert k > 1 and len(sampled) <= 40 + 2  # (each replica's first step is kept)
    assert list(sampled.columns) == ["step", *whole.columns]
    pd.testing.assert_frame_equal(sampled.drop(columns="step"), whole.loc[sampled["step"]].reset_index(drop=True))
    for _, own in sampled.groupby("replica"):  # every k-th step of its replica
        ranks = whole.groupby("replica").cumcount().loc[own["step"]]
        assert (ranks.to_numpy() == k * np.arange(len(own))).all()
    summaries = [(tmp_path / m / "summary.json").read_text() for m in ("all", "sampled", "none")]
    assert summaries[0] == summaries[1] == summaries[2]
    assert main(["run", *SMALL, "--steps", "sampled", "--step-rows", "0"]) == 2
    assert "--step-rows = 0" in capsys.readouterr().err
