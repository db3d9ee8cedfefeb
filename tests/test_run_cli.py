"""`servesim run` as a user runs it: the default scenario, configs, overrides, outputs, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from servesim.cli import main
from sim.config import SimConfig, load_config
from sim.engine import simulate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["--set", "workloads.0.num_requests=200", "--quiet"]


def test_run_writes_every_output_and_is_byte_identical(tmp_path, capsys) -> None:
    """Twice, the second time stepping every decode one by one (no skip-ahead): the same bytes."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, flags in zip(outs, ([], ["--step-by-step"])):
        assert main(["run", *SMALL, "--out", str(out), *flags]) == 0
    table = capsys.readouterr().out
    assert "TTFT p50 / p99" in table and "goodput" in table
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == ["config.yaml", "latency_cdf.png", "requests.csv", "steps.csv", "summary.json", "timeline.png",
                     "token_times.npy"]
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    summary = json.loads((outs[0] / "summary.json").read_text())
    for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p99_s", "e2e_p50_s",
                "throughput_output_tok_s", "requests_finished", "requests_rejected", "goodput_req_s", "slo_attainment"):
        assert key in summary
    req = pd.read_csv(outs[0] / "requests.csv")
    assert len(req) == 200 and summary["requests_finished"] == (req["status"] == "finished").sum()
    again = load_config(outs[0] / "config.yaml")  # the written config reproduces the run
    assert again == load_config(None, ["workloads.0.num_requests=200"])


def test_switching_a_kind_resets_its_section(capsys) -> None:
    cfg = load_config(None, ["workloads.0.arrival.kind=constant", "workloads.0.arrival.rate=3"])
    assert cfg.workloads[0].arrival.kind == "constant" and cfg.workloads[0].arrival.rate == 3
    assert main(["run", "--set", "workloads.0.arrival.kind=trace", "--quiet"]) == 2  # no trace given: one line
    assert "a `trace` section (path) is required" in capsys.readouterr().err


def test_orca_rejects_prompts_over_its_token_cap(capsys) -> None:
    assert main(["run", *SMALL, "--json", "--set", "scheduler.name=orca",
                 "--set", "scheduler.max_num_batched_tokens=512"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rejected_exceeds_token_budget"] > 0 and "rejected_stalled" not in s
    assert s["requests_finished"] + s["rejected_exceeds_token_budget"] == 200


def test_json_summary_and_overrides(capsys) -> None:
    assert main(["run", *SMALL, "--json", "--set", "scheduler.max_num_seqs=8", "--set", "hardware.gpu=h200"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests_total"] == 200 and summary["cost_per_hour"] == 3.80


@pytest.mark.parametrize("argv,message", [
    (["--set", "scheduler.max_num_seqs=-3"], "scheduler.vllm.max_num_seqs = -3: Input should be greater than 0"),
    (["--set", "scheduler.name=fcfs"], "scheduler.name = 'fcfs': allowed: 'static', 'orca', 'vllm'"),
    (["--set", "hardware.gpu=h900"], "unknown GPU 'h900'"),
    (["--set", "cluster.router=random"], "cluster.router = 'random'"),
    (["--set", "workloads.3.arrival.rate=1"], "'3' is not an index of a list of 1"),
    (["--set", "nonsense"], "expected key.path=value"),
    (["--set", "hardware.colour=blue"], "hardware.colour = 'blue': unknown key; allowed: gpu, tp"),
    (["--set", "model=llama-3-70b"], "does not fit on 1 x h100-sxm-80gb"),
    (["missing.yaml"], "config: no such file 'missing.yaml'"),
    (["--set", "seed=-1"], "seed = -1: Input should be greater than or equal to 0"),
    (["--set", "scheduler.name=orca", "--set", "scheduler.max_num_batched_tokens=0"], "max_num_batched_tokens = 0"),
])
def test_bad_configs_fail_in_one_line(capsys, argv: list[str], message: str) -> None:
    assert main(["run", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("servesim: error: ") and message in err, err


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("plan_")))
def test_examples_run_when_shortened(example: str) -> None:
    config = load_config(EXAMPLES / example)
    for w in config.workloads:
        if w.trace is not None and not Path(w.trace.path).is_file():
            pytest.skip(f"trace {w.trace.path} not present")
    shorten = [f"workloads.{i}.{'duration_s=20' if w.duration_s else 'num_requests=40'}"
               for i, w in enumerate(config.workloads)]
    results = simulate(load_config(EXAMPLES / example, shorten))
    assert results.summary["requests_finished"] > 0
    assert results.summary["requests_finished"] + results.summary["requests_rejected"] == len(results.requests)


def test_examples_exist() -> None:
    assert len(list(EXAMPLES.glob("*.yaml"))) >= 4


def test_plan_examples_load() -> None:
    from servesim.planner import candidates, load_spec

    for path in EXAMPLES.glob("plan_*.yaml"):
        assert len(list(candidates(load_spec(path)))) > 1


def test_console_script_runs_the_default_scenario(tmp_path) -> None:
    cfg = tmp_path / "small.yaml"
    data = SimConfig().model_dump(mode="json")
    data["workloads"][0]["num_requests"] = 100
    cfg.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "servesim", "run", str(cfg), "--json", "--quiet"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["requests_finished"] == 100


def test_renaming_a_workload_keeps_its_fields() -> None:
    cfg = load_config(None, ["workloads.0.name=chat", "scheduler.max_num_seqs=64"])
    assert cfg.workloads[0].name == "chat" and cfg.workloads[0].arrival.rate == 15.0
    assert cfg.scheduler.max_num_seqs == 64
