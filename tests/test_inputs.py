"""The input boundary (issue 23): every user file read through one reader (UTF-8 with a byte-order mark
dropped, line and column of syntax errors), finite and bounded numbers, output paths checked before the
work, unknown keys with the allowed ones and a suggestion, a quiet broken pipe, `--version`, the livelock
watchdog, non-finite step times refused, and a property-based fuzz of `--set` overrides."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from servesim.cli import main

SMALL = ["--set", "workloads.0.num_requests=20", "--quiet"]


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    return err


def test_files_that_are_not_utf8_are_one_line_errors(tmp_path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(b"seed: 1\nmodel: llama-3-8b\n# caf\xe9\n")
    assert main(["run", str(config), *SMALL]) == 2
    one_line_error(capsys, "c.yaml:3: not UTF-8 text (byte 0xe9")
    spec = tmp_path / "plan.yaml"
    spec.write_bytes(b"rates: [1]\xff\n")
    assert main(["plan", str(spec), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "plan.yaml:1: not UTF-8")
    profile = tmp_path / "p.json"
    profile.write_bytes(b'{"gpu": "h100\xc3"}')
    assert main(["estimate", "--model", "llama-3-8b", "--gpu", "h100", "--profile", str(profile), "--decode", "1",
                 "--context", "10"]) == 2
    one_line_error(capsys, "p.json:1: not UTF-8")
    summary = tmp_path / "run" / "summary.json"
    summary.parent.mkdir()
    summary.write_text("[1, 2")
    assert main(["validate", str(summary.parent), str(summary.parent)]) == 2
    one_line_error(capsys, "summary.json:1:6: not valid JSON")


def test_traces_with_a_bom_blank_lines_and_bad_bytes(tmp_path, capsys) -> None:
    from traces.readers import read_azure, read_mooncake

    azure = tmp_path / "a.csv"
    azure.write_bytes(b"\xef\xbb\xbfTIMESTAMP,ContextTokens,GeneratedTokens\n"
                      b"2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.1,100,\xff9\n"
                      b"2023-11-16 18:15:48.0,20,5\n\n\n")
    trace = read_azure(azure, on_bad_row="skip")
    assert len(trace) == 2 and trace.skipped_rows == 1  # the BOM and the blank lines are no rows
    with pytest.raises(Exception, match=r"a.csv:3: bad row .*not UTF-8"):
        read_azure(azure)
    moon = tmp_path / "m.jsonl"
    moon.write_bytes(b'{"timestamp": 0, "input_length": 5, "output_length": 2}\n'
                     b'{"timestamp": 1\xfe, "input_length": 5, "output_length": 2}\n\n')
    assert read_mooncake(moon, on_bad_row="skip").skipped_rows == 1
    with pytest.raises(Exception, match="m.jsonl:2: bad row: not UTF-8"):
        read_mooncake(moon)


@pytest.mark.parametrize("override,needle", [
    ("workloads=5", "workloads = 5"),
    ("workloads.0.arrival={kind: gamma, rate: 2, cv: .inf}", "arrival.gamma.cv = inf"),
    ("slo.ttft_s=.nan", "slo.ttft_s = nan"),
    ("hardware.gpu_price=.inf", "hardware.gpu_price = inf"),
    ("workloads.0.start_s=.inf", "workloads.0.start_s = inf"),
    ("cluster.replicas=100000", "cluster.replicas = 100000"),
    (".=1", "has an empty part"),
    ("workloads.0.arrival.ratee=3", "unknown key (did you mean 'rate'?); allowed: kind, rate"),
    ("workloads.0.num_requests=2000000", "output tokens in all"),
])
def test_bad_values_are_one_line_errors(override: str, needle: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sim.setup.MAX_RECORDED_TOKENS", 10_000_000)  # the bound, scaled down for the test
    assert main(["run", "--set", override, "--quiet"]) == 2
    one_line_error(capsys, needle)


def test_yaml_syntax_errors_give_the_line_and_column(tmp_path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\nworkloads: [\n  {a: 1\n")
    assert main(["run", str(config), *SMALL]) == 2
    err = one_line_error(capsys, "c.yaml:4:1: not valid YAML")
    assert "Traceback" not in err


def test_output_paths_are_checked_before_the_run(tmp_path, capsys) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    for argv in (["run", *SMALL, "--out", str(afile)], ["run", *SMALL, "--out", str(afile / "sub")],
                 ["plan", "examples/plan_llama3_8b.yaml", "--out", str(afile / "sub")]):
        assert main(argv) == 2
        one_line_error(capsys, "is a file, not a folder")


def test_calibrate_validate_refuses_empty_and_non_numeric_tables(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    header = "model,category,execution,tp,shape,seconds\n"
    for text, needle in (("", "empty CSV"), (header, "a header only"),
                         (header + 'llama-3-8b,decode,graph,1,"{""prefill_tokens"": [], ""prefill_cached"": [], '
                          '""decode_context"": [5]}",fast\n', "seconds = 'fast': not a finite number")):
        path = tmp_path / "steps.csv"
        path.write_text(text)
        assert main(["calibrate", "validate", str(path), "--gpu", "h100"]) == 2
        one_line_error(capsys, needle)


def test_version_and_a_broken_pipe_are_quiet() -> None:
    out = subprocess.run([sys.executable, "-m", "servesim", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("servesim ")
    proc = subprocess.Popen([sys.executable, "-m", "servesim", "run", "--json", "--set",
                             "workloads.0.num_requests=200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.read(10)
    proc.stdout.close()  # the reader leaves, as `| head` does
    _, err = proc.communicate()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_a_run_that_goes_nowhere_stops_with_the_stuck_requests(monkeypatch, capsys) -> None:
    """The watchdog: a replica that runs WATCHDOG_STEPS steps in a row without a token stops the run (scaled
    down here: a 2,000-token prompt prefilled 16 tokens a step takes 125 steps before its first token)."""
    monkeypatch.setattr("sim.engine.WATCHDOG_STEPS", 50)
    argv = ["run", "--set", "scheduler={name: vllm_v1, long_prefill_token_threshold: 16}",
            "--set", "workloads.0.lengths={kind: fixed, prompt: 2000, output: 4}", "--set",
            "workloads.0.num_requests=3", "--quiet"]
    assert main(argv) == 2
    one_line_error(capsys, "50 steps in a row without a token")
    monkeypatch.setattr("sim.engine.WATCHDOG_STEPS", 200)
    assert main(argv) == 0


def test_a_step_time_that_is_not_finite_stops_the_run(monkeypatch, capsys) -> None:
    from sim.executor import CostModelExecutor, StepOutcome

    monkeypatch.setattr(CostModelExecutor, "run", lambda self, batch: StepOutcome(seconds=float("nan")))
    assert main(["run", *SMALL]) == 2
    one_line_error(capsys, "not a finite time")


KEYS = ["seed", "model", "max_model_len", "hardware.gpu", "hardware.tp", "hardware.gpu_price", "cluster.replicas",
        "cluster.router", "scheduler.name", "scheduler.max_num_seqs", "kv_cache.block_size", "kv_cache.num_blocks",
        "workloads.0.arrival.rate", "workloads.0.arrival.kind", "workloads.0.lengths.kind", "workloads.0.start_s",
        "slo.ttft_s", "slo.tpot_s", "hardware.cuda_graphs", "nonsense.key", "workloads.5.rate"]
VALUES = st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from(["h100", "vllm", "poisson", "lognormal", "", "x", "[1, 2]", "{a: 1}", "null",
                                    "true", "sarathi", "trace", "decode"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
# a section switched to a kind whose required fields are all missing: one line for the section
@example(sets=[("workloads.0.lengths.kind", 0), ("workloads.0.lengths.kind", "lognormal")])
def test_fuzzed_overrides_end_in_a_result_or_one_line(sets, capsys) -> None:
    """Random overrides of the schema's fields: a run that finishes with finite numbers (every request
    finished or rejected), or exit 2 with one line per wrong field; never a traceback."""
    argv = ["run", "--set", "workloads.0.num_requests=15", "--json"]
    for key, value in sets:
        argv += ["--set", f"{key}={value}"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 2)
    if code == 2:  # one line per wrong field
        lines = err.splitlines()
        assert 1 <= len(lines) <= len(sets) and all(line.startswith("servesim: error: ") for line in lines), err
    else:
        summary = json.loads(out)
        assert summary["requests_finished"] + summary["requests_rejected"] == summary["requests_total"]
        assert all(not isinstance(v, float) or v == v for v in summary.values())  # no NaN


def test_a_rewritten_trace_is_read_again(tmp_path) -> None:
    import os

    from sim.config import SimConfig
    from sim.engine import simulate

    trace = tmp_path / "t.csv"
    rows = "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{s:02d}.0,100,{out}\n" for s, out in ((1, 5), (2, 5), (3, 5)))
    trace.write_text(rows)
    cfg = SimConfig.model_validate({"workloads": [{"arrival": {"kind": "trace"}, "lengths": {"kind": "trace"},
                                                   "trace": {"path": str(trace)}}]})
    assert simulate(cfg).summary["throughput_output_tok_s"] > 0
    first = int(simulate(cfg).requests["output_tokens"].sum())
    trace.write_text(rows.replace(",5\n", ",7\n"))
    os.utime(trace, ns=(1, 10**18))  # a different modification time even on coarse clocks
    assert first == 15 and int(simulate(cfg).requests["output_tokens"].sum()) == 21


def test_plan_with_an_unknown_gpu_is_refused(tmp_path, capsys) -> None:
    assert main(["plan", "examples/plan_llama3_8b.yaml", "--set", "search.gpus.0.id=h1000", "--out",
                 str(tmp_path)]) == 2
    one_line_error(capsys, "search.gpus.0.id: unknown GPU 'h1000'")


def test_several_config_errors_are_listed_one_line_each(capsys) -> None:
    assert main(["run", "--set", "seed=-1", "--set", "workloads.0.num_requests=0", "--set",
                 "scheduler.max_num_seqs=x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("servesim: error: default scenario: ") for line in lines)
    for needle in ("seed = -1", "workloads.0.num_requests = 0", "max_num_seqs = 'x'"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)


AZURE_ROW = st.one_of(
    st.tuples(st.sampled_from(["2023-11-16 18:15:46.68", "2023-11-16 18:15:47", "x", "", "2023-13-45 99:99:99"]),
              st.one_of(st.integers(-3, 10**10), st.just("")), st.one_of(st.integers(-3, 10**10), st.just("7.5")))
    .map(lambda t: ",".join(str(v) for v in t)),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")))
MOONCAKE_ROW = st.one_of(
    st.fixed_dictionaries({"timestamp": st.one_of(st.integers(-5, 10**6), st.floats(), st.just("t")),
                           "input_length": st.one_of(st.integers(-3, 10**10), st.just(None)),
                           "output_length": st.one_of(st.integers(-3, 10**10), st.just([1]))},
                          optional={"hash_ids": st.lists(st.integers(-2, 50), max_size=4)}).map(json.dumps),
    st.text(max_size=30))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["azure", "mooncake"]), data=st.data(), skip=st.booleans())
def test_fuzzed_traces_end_in_a_result_or_one_line_each(fmt, data, skip, tmp_path, capsys) -> None:
    """Random trace files (good rows, bad values, junk text and bytes) under either bad-row rule: a run whose
    requests are all accounted for, or exit 2 with one line per error; never a traceback."""
    rows = data.draw(st.lists(AZURE_ROW if fmt == "azure" else MOONCAKE_ROW, max_size=8))
    good = "2023-11-16 18:15:46.68,300,20" if fmt == "azure" else json.dumps(
        {"timestamp": 0, "input_length": 300, "output_length": 20})
    rows.insert(data.draw(st.integers(0, len(rows))), good)
    path = tmp_path / ("t.csv" if fmt == "azure" else "t.jsonl")
    header = "TIMESTAMP,ContextTokens,GeneratedTokens\n" if fmt == "azure" else ""
    path.write_text(header + "\n".join(r.replace("\n", " ").replace("\r", " ") for r in rows) + "\n",
                    encoding="latin-1" if fmt == "azure" else "utf-8", errors="replace")
    code = main(["run", "--json", "--set", "workloads.0.lengths={kind: trace}", "--set",
                 f"workloads.0.trace={{path: '{path}', on_bad_row: {'skip' if skip else 'error'}}}",
                 "--set", "workloads.0.num_requests=5"])
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 2:
        assert err and all(line.startswith("servesim: error: ") for line in err.splitlines()), err
    else:
        summary = json.loads(out)
        assert summary["requests_finished"] + summary["requests_rejected"] == summary["requests_total"] == 5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(["a", "b", "file.txt", "..", ".", "c d", "é"]), min_size=1, max_size=4),
       make_file=st.booleans())
def test_fuzzed_output_paths_end_in_outputs_or_one_line(parts, make_file, tmp_path, capsys) -> None:
    """`--out` anywhere under a folder holding a file and a folder: written, or one line; never a traceback."""
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "file.txt").write_text("x")
    if make_file:
        (tmp_path / "a" / "b").write_text("x") if not (tmp_path / "a" / "b").is_dir() else None
    out_dir = tmp_path.joinpath(*parts)
    code = main(["run", "--quiet", "--out", str(out_dir), "--set", "workloads.0.num_requests=3"])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 0:
        assert (out_dir / "summary.json").is_file()
    else:
        assert len(err.splitlines()) == 1 and err.startswith("servesim: error: "), err
