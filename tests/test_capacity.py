from __future__ import annotations

import pytest

from hardware.errors import ServesimError
from sim.capacity import find_capacity, slo_predicate, with_rate
from tests.test_engine import config


def test_capacity_search_brackets_the_saturation_rate() -> None:
    cfg = config(workloads=[{"arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": 400,
                             "lengths": {"kind": "fixed", "prompt": 1000, "output": 200}}])
    meets = slo_predicate(ttft_p99_s=2.0)
    cap = find_capacity(cfg, meets, start=4.0, rel_tol=0.05)
    assert cap.rate > 0 and cap.summary is not None and meets(cap.summary)
    failed = [r for r, ok in cap.probes if not ok]
    assert failed and min(failed) > cap.rate and (min(failed) - cap.rate) <= 0.05 * min(failed) + 1e-9
    assert all(ok for r, ok in cap.probes if r <= cap.rate)  # monotone on this workload
    again = find_capacity(cfg, meets, start=4.0, rel_tol=0.05)
    assert again.rate == cap.rate  # deterministic


def test_unmeetable_slo_gives_zero_and_trace_arrivals_are_refused(tmp_path) -> None:
    cfg = config()
    assert find_capacity(cfg, slo_predicate(ttft_p99_s=1e-6), start=2.0).rate == 0.0
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n")
    replay = config(workloads=[{"arrival": {"kind": "trace"}, "lengths": {"kind": "trace"},
                                "trace": {"path": str(trace)}}])
    with pytest.raises(ServesimError, match="needs a rate"):
        with_rate(replay, 2.0)
