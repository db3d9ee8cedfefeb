"""`servesim estimate` and `servesim catalog` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from servesim.cli import main


def run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_estimate_prefill(capsys) -> None:
    code, out, _ = run(capsys, "estimate", "--model", "llama-3-8b", "--gpu", "h100", "--prefill", "2048")
    assert code == 0
    assert {"seconds", "flops", "bytes", "mfu", "mbu", "bound"} <= set(out)
    assert out["bound"] == "compute" and out["execution"] == "eager" and out["tokens"] == 2048
    assert 0.02 < out["seconds"] < 0.1 and 0.3 < out["mfu"] < 0.9


def test_estimate_decode_and_modes(capsys) -> None:
    args = ("estimate", "--model", "llama-3-8b", "--gpu", "h100", "--decode", "64", "--context", "2048")
    _, graph, _ = run(capsys, *args)
    _, eager, _ = run(capsys, *args, "--eager")
    assert graph["bound"] == "memory" and graph["execution"] == "graph" and eager["execution"] == "eager"
    assert eager["seconds"] > graph["seconds"]
    _, tp2, _ = run(capsys, *args, "--tp", "2")
    assert tp2["seconds"] < graph["seconds"] and tp2["comm_seconds"] > 0 and tp2["gpu_price_per_hour"] == 6.0
    _, bd, _ = run(capsys, *args, "--breakdown", "--pp", "2")
    names = {row["name"] for row in bd["breakdown"]}
    assert {"qkv_proj", "attention_decode", "lm_head", "sampling", "pp_send_recv"} <= names
    assert len(bd["stage_seconds"]) == 2


def test_estimate_moe_placements(capsys) -> None:
    args = ("estimate", "--model", "deepseek-v3", "--gpu", "h200", "--weight-dtype", "fp8", "--prefill", "8192")
    _, tp8, _ = run(capsys, *args, "--tp", "8")
    _, ep, _ = run(capsys, *args, "--dp", "8", "--expert-parallel", "--breakdown")
    _, skew, _ = run(capsys, *args, "--dp", "8", "--expert-parallel", "--zipf", "1.2")
    _, eplb, _ = run(capsys, *args, "--dp", "8", "--expert-parallel", "--zipf", "1.2", "--eplb")
    assert ep["dp"] == 8 and ep["expert_parallel"] and ep["gpu_price_per_hour"] == tp8["gpu_price_per_hour"]
    assert {"moe_dispatch", "moe_combine", "mla_kv_up_prefill"} <= {row["name"] for row in ep["breakdown"]}
    assert skew["seconds"] > eplb["seconds"] > ep["seconds"] * 0.99
    code, _, err = run(capsys, "estimate", "--model", "llama-3-8b", "--gpu", "h100", "--dp", "2", "--prefill", "8")
    assert code == 2 and "dense" in err and err.count("\n") == 1


def test_estimate_reads_the_run_config_and_its_overrides(capsys, tmp_path) -> None:
    """`estimate CONFIG --set ...` prices the deployment that `run CONFIG --set ...` would simulate; each flag
    is the override of the field it names, so flags, --set and the YAML agree."""
    shape = ("--decode", "64", "--context", "2048")
    _, flags, _ = run(capsys, "estimate", "--model", "llama-3-8b", "--gpu", "h200", "--tp", "2", "--eager", *shape)
    _, sets, _ = run(capsys, "estimate", "--set", "hardware.gpu=h200", "--set", "hardware.tp=2",
                     "--set", "hardware.cuda_graphs=none", *shape)
    config = tmp_path / "run.yaml"
    config.write_text("model: llama-3-8b\nhardware: {gpu: h200, tp: 2, cuda_graphs: none}\n")
    _, yaml_, _ = run(capsys, "estimate", str(config), *shape)
    assert flags == sets == yaml_ and flags["gpu"] == "h200-sxm-141gb" and flags["execution"] == "eager"
    _, default, _ = run(capsys, "estimate", *shape)  # the embedded scenario: Llama-3-8B on one H100
    _, later, _ = run(capsys, "estimate", str(config), "--tp", "1", "--set", "hardware.gpu=h100", *shape)
    assert default["gpu"] == "h100-sxm-80gb" and default["execution"] == "graph"
    assert later["gpu"] == "h100-sxm-80gb" and later["tp"] == 1 and later["execution"] == "eager"
    code, _, err = run(capsys, "estimate", "--set", "hardware.tp=zero", *shape)
    assert code == 2 and err.count("\n") == 1 and "hardware.tp" in err


def test_estimate_with_profile(capsys, tmp_path, ideal_profile) -> None:
    path = tmp_path / "ideal.json"
    path.write_text(ideal_profile.model_dump_json())
    args = ("estimate", "--model", "llama-3-8b", "--gpu", "h100", "--decode", "1", "--context", "10")
    _, ideal, _ = run(capsys, *args, "--profile", str(path))
    _, default, _ = run(capsys, *args)
    assert ideal["profile"] == "ideal" and ideal["overhead_seconds"] == 0
    assert ideal["seconds"] < default["seconds"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "llama-9b", "--gpu", "h100", "--prefill", "8"],
     "unknown model 'llama-9b'; known: deepseek-v2-lite, deepseek-v3, llama-2-13b"),
    (["--model", "llama-3-8b", "--gpu", "h900", "--prefill", "8"], "unknown GPU 'h900'; known: a100"),
    (["--model", "llama-3-8b", "--gpu", "h100", "--decode", "8"], "--context is required with --decode"),
    (["--model", "llama-3-8b", "--gpu", "h100", "--decode", "-5", "--context", "9"], "--decode = -5: the number"),
    (["--model", "llama-3-8b", "--gpu", "h100"], "nothing to run"),
    (["--model", "llama-3-8b", "--gpu", "h100", "--prefill", "0"], "prefill_tokens: value 0 is below the minimum 1"),
    (["--model", "llama-3-70b", "--gpu", "h100", "--prefill", "8"], "does not fit on 1 x h100-sxm-80gb"),
    (["--model", "llama-3-8b", "--gpu", "h100", "--tp", "3", "--prefill", "8"], "tp=3 must divide"),
    (["--model", "llama-3-8b", "--gpu", "h100", "--prefill", "8", "--profile", "nope.json"], "no such file"),
    (["--model", "llama-3-8b", "--gpu", "h100", "--prefill", "8", "--link", "smoke"], "unknown interconnect"),
])
def test_user_errors_are_one_line_with_exit_2(capsys, argv: list[str], message: str) -> None:
    code, _, err = run(capsys, "estimate", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("servesim: error: ") and message in err


def test_kv_overflow_is_warned_not_hidden(capsys) -> None:
    code, out, err = run(capsys, "estimate", "--model", "llama-3-8b", "--gpu", "h100", "--decode", "256",
                         "--context", "8000")
    assert code == 0 and out["warnings"] and "room for" in err


def test_catalog_lists_entries(capsys) -> None:
    code, out, _ = run(capsys, "catalog", "gpus")
    assert code == 0 and out["h100-sxm-80gb"]["hbm_bandwidth"] == 3.35e12
    _, models, _ = run(capsys, "catalog", "models")
    assert models["mixtral-8x7b"]["num_local_experts"] == 8


def test_console_entry_point_is_deterministic() -> None:
    cmd = [sys.executable, "-m", "servesim", "estimate", "--model", "qwen2.5-72b", "--gpu", "h200", "--tp", "4",
           "--prefill", "1000", "--decode", "30", "--context", "3000", "--breakdown"]
    first = subprocess.run(cmd, capture_output=True, check=True).stdout
    second = subprocess.run(cmd, capture_output=True, check=True).stdout
    assert first == second and json.loads(first)["model"] == "qwen2.5-72b"
