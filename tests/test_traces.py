"""Trace readers, arrival processes and length distributions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from hardware.errors import ServesimError
from traces.readers import read_azure, read_mooncake, read_trace
from traces.workload import Workload, generate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"


def write(tmp_path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:48.0000000,10,5
"""


def test_azure_reader_sorts_and_starts_at_zero(tmp_path) -> None:
    t = read_azure(write(tmp_path, "a.csv", AZURE))
    assert t.time_s.tolist() == pytest.approx([0.0, 1.31941, 4.314579])
    assert t.prompt.tolist() == [374, 10, 396] and t.output.tolist() == [44, 5, 109]


def test_azure_bad_row_names_file_and_line(tmp_path) -> None:
    p = write(tmp_path, "bad.csv", AZURE + "2023-11-16 18:15:51.0,abc,3\n2023-11-16 18:15:52.0,5,0\n")
    with pytest.raises(ServesimError, match=r"bad\.csv:5: bad row .*abc"):
        read_azure(p)
    skipped = read_azure(p, on_bad_row="skip")
    assert len(skipped) == 3 and skipped.skipped_rows == 2
    with pytest.raises(ServesimError, match="header must be TIMESTAMP,ContextTokens,GeneratedTokens"):
        read_azure(write(tmp_path, "h.csv", "time,in,out\n1,2,3\n"))


def test_azure_reader_at_once_gives_the_row_by_row_values(tmp_path) -> None:
    """Plain files are read whole by pandas (`_azure_at_once`); the values must be the row-by-row reader's
    to the bit (timestamps truncated to the microsecond), and any row off the plain form falls back to it."""
    import traces.readers as readers

    plain = AZURE + ("2023-11-16T18:16:00,007,1\n2023-11-16 18:15:59.123456789,2147483648,3\n"
                     "2023-11-17 00:00:00.0000005,8,9\n\n")
    quirky = AZURE + " 2023-11-16 18:16:01.5 , 12 ,3\n"  # (spaces: int() and fromisoformat() take them)
    shifted = "TIMESTAMP,ContextTokens,GeneratedTokens\nx,2023-11-16 00:00:01,1,2\n"  # (a field too many)
    files = [write(tmp_path, "plain.csv", plain), write(tmp_path, "quirky.csv", quirky)]
    assert readers._azure_at_once(files[0]) is not None and readers._azure_at_once(files[1]) is None
    assert readers._azure_at_once(write(tmp_path, "shifted.csv", shifted)) is None
    late = write(tmp_path, "late.csv", AZURE + "2300-01-01 00:00:00,5,5\n")  # (past 64-bit nanoseconds)
    assert readers._azure_at_once(late) is None and read_azure(late).time_s[-1] > 8e9
    with pytest.raises(ServesimError, match=r"shifted\.csv:2: bad row .*expected 3 fields, got 4"):
        read_azure(tmp_path / "shifted.csv")
    at_once = [read_azure(f) for f in files]
    for a, b in zip(at_once, (readers._azure_by_rows(f, "error") for f in files)):
        for field in ("time_s", "prompt", "output"):
            assert getattr(a, field).dtype == getattr(b, field).dtype
            assert getattr(a, field).tobytes() == getattr(b, field).tobytes(), field
    assert at_once[0].prompt.max() == 2147483648 and len(at_once[1]) == 4


def test_mooncake_reader(tmp_path) -> None:
    text = ('{"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [0, 1]}\n'
            '{"timestamp": 1500, "input_length": 800, "output_length": 7, "hash_ids": [0, 2]}\n')
    t = read_mooncake(write(tmp_path, "m.jsonl", text))
    assert t.time_s.tolist() == [0.0, 1.5] and t.hash_ids == ((0, 1), (0, 2))
    bad = write(tmp_path, "b.jsonl", text + '{"timestamp": 2000, "output_length": 3}\nnot json\n')
    with pytest.raises(ServesimError, match=r"b\.jsonl:3: bad row: missing field 'input_length'"):
        read_mooncake(bad)
    assert read_mooncake(bad, on_bad_row="skip").skipped_rows == 2
    with pytest.raises(ServesimError, match="trace.format = None"):
        read_trace(write(tmp_path, "x.txt", ""))


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared traces not present")
def test_real_traces_read_cleanly() -> None:
    conv = read_trace(SHARED / "azure_llm_2023_conv.csv")
    assert len(conv) == 19366 and conv.skipped_rows == 0
    assert conv.prompt.mean() == pytest.approx(1155, rel=0.01) and conv.output.mean() == pytest.approx(211, rel=0.01)
    assert 3400 < conv.time_s[-1] < 3700
    moon = read_trace(SHARED / "mooncake_conversation.jsonl")
    assert len(moon) == 12031 and moon.hash_ids is not None and len(moon.hash_ids[0]) > 0


def workload(**kw) -> Workload:
    base = {"arrival": {"kind": "poisson", "rate": 10.0}, "lengths": {"kind": "fixed", "prompt": 5, "output": 3},
            "num_requests": 20000}
    base.update(kw)
    return Workload.model_validate(base)


def gaps(w: Workload, seed: int = 0) -> np.ndarray:
    return np.diff(generate(w, np.random.default_rng(seed)).arrival)


def test_arrival_processes_match_their_statistics() -> None:
    poisson = gaps(workload())
    assert 1 / poisson.mean() == pytest.approx(10.0, rel=0.03)
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)
    bursty = gaps(workload(arrival={"kind": "gamma", "rate": 4.0, "cv": 3.0}))
    assert 1 / bursty.mean() == pytest.approx(4.0, rel=0.08)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.1)
    const = gaps(workload(arrival={"kind": "constant", "rate": 8.0}))
    assert const == pytest.approx(np.full(const.size, 0.125))
    timed = generate(workload(num_requests=None, duration_s=100.0), np.random.default_rng(1)).arrival
    assert timed.max() < 100.0 and timed.size == pytest.approx(1000, rel=0.15)


def test_length_distributions() -> None:
    rng = np.random.default_rng(0)
    u = generate(workload(lengths={"kind": "uniform", "prompt": [10, 20], "output": [1, 3]}), rng)
    assert u.prompt.min() == 10 and u.prompt.max() == 20 and set(u.output.tolist()) == {1, 2, 3}
    ln = generate(workload(lengths={"kind": "lognormal", "prompt_mean": 1000, "prompt_cv": 1.0,
                                    "output_mean": 200, "output_cv": 0.5}), rng)
    assert ln.prompt.mean() == pytest.approx(1000, rel=0.05) and ln.output.mean() == pytest.approx(200, rel=0.05)
    assert ln.prompt.std() / ln.prompt.mean() == pytest.approx(1.0, rel=0.15)
    capped = generate(workload(lengths={"kind": "lognormal", "prompt_mean": 1000, "prompt_cv": 1.0,
                                        "output_mean": 200, "output_cv": 0.5, "max_prompt": 1500}), rng)
    assert capped.prompt.max() == 1500 and capped.prompt.min() >= 1


def test_trace_replay_scales_time_and_keeps_pairs(tmp_path) -> None:
    p = write(tmp_path, "a.csv", AZURE)
    w = workload(arrival={"kind": "trace", "rate_scale": 2.0}, lengths={"kind": "trace"}, trace={"path": str(p)},
                 num_requests=None)
    g = generate(w, np.random.default_rng(0))
    assert g.arrival.tolist() == pytest.approx([0.0, 1.31941 / 2, 4.314579 / 2])
    assert g.prompt.tolist() == [374, 10, 396] and g.output.tolist() == [44, 5, 109]
    boot = generate(workload(lengths={"kind": "trace"}, trace={"path": str(p)}, num_requests=500),
                    np.random.default_rng(0))
    pairs = set(zip(boot.prompt.tolist(), boot.output.tolist()))
    assert pairs == {(374, 44), (10, 5), (396, 109)}  # drawn as (prompt, output) pairs


@pytest.mark.parametrize("fields,message", [
    ({"arrival": {"kind": "trace"}, "num_requests": None}, "a `trace` section (path) is required"),
    ({"num_requests": None}, "give num_requests or duration_s"),
    ({"duration_s": 5.0}, "not both"),
    ({"lengths": {"kind": "uniform", "prompt": [5, 1], "output": [1, 2]}}, "min <= max"),
    ({"arrival": {"kind": "poisson", "rate": -1}}, "greater than or equal to 0.000001"),
])
def test_bad_workloads_are_rejected(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        workload(**fields)


@pytest.mark.parametrize("row,message", [
    ('{"timestamp": 0, "input_length": 1e400, "output_length": 5}', "bad row: cannot convert float infinity"),
    ('{"timestamp": NaN, "input_length": 10, "output_length": 5}', "timestamp must be a finite number"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [99999999999]}', "hash_ids must be"),
])
def test_mooncake_rejects_unusable_rows(tmp_path, row: str, message: str) -> None:
    with pytest.raises(ServesimError, match=message):
        read_mooncake(write(tmp_path, "m.jsonl", row + "\n"))


@pytest.mark.parametrize("fields,message", [
    ({"lengths": {"kind": "uniform", "prompt": [1, 9e21], "output": [1, 2]}}, "exceeded maximum size"),
    ({"lengths": {"kind": "uniform", "prompt": [1, 3e9], "output": [1, 2]}}, "less than or equal to 2147483648"),
    ({"arrival": {"kind": "gamma", "rate": 1.0, "cv": 1e-200}}, "greater than or equal to 0.001"),
])
def test_absurd_workload_fields_fail_validation(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        workload(**fields)


def test_absurd_request_counts_are_refused() -> None:
    w = workload(arrival={"kind": "poisson", "rate": 1e7}, num_requests=None, duration_s=10.0)
    with pytest.raises(ServesimError, match="allowed: at most 50,000,000"):
        generate(w, np.random.default_rng(0))
