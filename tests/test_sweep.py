"""`servesim sweep` (`servesim.sweep`): GuideLLM's sweep profile over the default scenario, shortened."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from servesim.capacity import Horizon
from servesim.cli import main
from servesim.sweep import COLUMNS, sweep
from sim.config import load_config

SHORT = Horizon(min_duration_s=20.0, min_requests=300)


def test_a_sweep_is_monotone_in_rate_between_its_ends() -> None:
    table = sweep(load_config(None, []), rates=3, horizon=SHORT, workers=1)
    assert list(table.columns) == COLUMNS and len(table) == 5
    assert table["profile"].iloc[0] == "synchronous" and table["profile"].iloc[-1] == "throughput"
    rates = table["rate_req_s"].to_numpy()
    assert (np.diff(rates) > 0).all()  # synchronous < rates between < all at once
    middle = table.iloc[1:-1]
    assert (middle["window"] == "steady").all() and set(middle["stability"]) <= {"stable", "overloaded", "too_short"}
    assert (np.diff(table["throughput_req_s"].to_numpy()) > 0).all()
    for col in ("ttft_p50_s", "tpot_p50_s", "e2e_p50_s"):
        assert (np.diff(table[col].to_numpy()) > 0).all(), col  # more load, longer latencies
    # the synchronous end serves one request at a time: its throughput is one over the mean end-to-end time
    assert table["tpot_p50_s"].iloc[0] < table["tpot_p50_s"].iloc[-1] / 3


def test_the_sweep_command_writes_its_table_and_plot(tmp_path, capsys) -> None:
    out = tmp_path / "sw"
    argv = ["sweep", "--rates", "1", "--horizon", "10", "--min-requests", "200", "--workers", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("llama-3-8b on h100 x1 (TP 1), scheduler vllm") and "ttft_p50_ms" in printed
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 3 and (out / "sweep.png").stat().st_size > 10_000
    assert main([*argv, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["sweep"]
    assert [r["throughput_req_s"] for r in again] == table["throughput_req_s"].tolist()  # deterministic
    assert main([*argv, "--rates", "-1"]) == 2
    assert main([*argv, "--set", "workloads.0.sessions={turns: 2}"]) == 2
