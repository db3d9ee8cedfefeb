"""Capacity planning: the binary search, pruning, the cache, the best configuration re-simulated, Ray equal
to the local pool, and spec errors."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from hardware.errors import ServesimError
from servesim.capacity import find_capacity
from servesim.cli import main
from servesim.planner import PlanSpec, load_spec, plan
from sim.config import SimConfig, load_config
from sim.engine import simulate

BASE = {
    "model": "llama-3-8b", "max_model_len": 4096, "slo": {"ttft_s": 1.0, "tpot_s": 0.05},
    "workloads": [{"name": "w", "arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": 150,
                   "lengths": {"kind": "uniform", "prompt": [100, 1500], "output": [20, 200]}}],
}


def spec(**extra) -> PlanSpec:
    data = {"base": BASE, "rates": [12], "attainment": 0.9, "tolerance": 0.2, "start_rate": 4, "horizon_s": 30,
            "min_requests": 300, "seeds": 2,
            "search": {"gpus": [{"id": "h100"}, {"id": "l40s", "price": 0.8}], "tp": [1],
                       "schedulers": [{"name": "vllm"}]}}
    data.update(extra)
    return PlanSpec.model_validate(data)


def test_binary_search_finds_a_known_capacity() -> None:
    cfg = SimConfig()
    for true in (0.9, 7.3, 55.0):
        run = lambda c, t=true: {"ok": c.workloads[0].arrival.rate <= t}  # noqa: E731
        cap = find_capacity(cfg, lambda s: s["ok"], start=4.0, rel_tol=0.02, run=run)
        assert true * 0.98 <= cap.rate <= true


def test_plan_finds_the_cheapest_configuration_and_caches_it(tmp_path, monkeypatch) -> None:
    s = spec()
    table = plan(s, tmp_path, workers=1)
    assert len(table) == 2 and (table["pruned"] == "").all()
    best = table.iloc[0]
    costs = table["cost_per_hour_at_12"]
    assert best["cost_per_hour_at_12"] == costs.min()  # ranked cheapest first
    for name in ("plan.csv", "plan.parquet", "best.yaml", "pareto.png", "latency.png"):
        assert (tmp_path / name).is_file()
    assert pd.read_parquet(tmp_path / "plan.parquet")["label"].tolist() == table["label"].tolist()
    cfg = load_config(tmp_path / "best.yaml")  # ready to run: the winning config at the target rate
    assert cfg.workloads[0].arrival.rate == 12 and cfg.cluster.replicas == best["replicas_at_12"]
    # verified: re-simulated over 10x its probes' horizon at the target rate, it is stable and meets the SLOs
    assert best["verified"] == "yes" and best["verified_horizon_s"] == 10 * best["probe_horizon_s"]
    assert "# verified: stable" in (tmp_path / "best.yaml").read_text()
    assert cfg.workloads[0].num_requests >= 12 * best["verified_horizon_s"]
    check = simulate(cfg).summary
    assert check["stability"] == "stable" and check["steady_slo_attainment"] >= 0.9
    assert best["capacity_req_s"] <= best["capacity_median_req_s"] <= best["capacity_max_req_s"]
    monkeypatch.setattr("servesim.planner.size", lambda *a: pytest.fail("a cached configuration was sized again"))
    again = plan(s, tmp_path, workers=1)
    assert again["cached"].all()
    assert again.drop(columns="cached").equals(table.drop(columns="cached"))


def test_plan_prunes_what_cannot_fit_or_meet_tpot(tmp_path) -> None:
    s = spec(base={**BASE, "model": "llama-3-70b", "slo": {"ttft_s": 1.0, "tpot_s": 0.05}},
             search={"gpus": [{"id": "h100"}], "tp": [1, 2], "schedulers": [{"name": "vllm"}]})
    table = plan(s, tmp_path, workers=1)
    assert table.set_index("label").loc["h100 tp1 vllm", "pruned"].startswith("does not fit")
    tight = spec(base={**BASE, "slo": {"tpot_s": 0.001}})
    assert plan(tight, tmp_path / "t", workers=1)["pruned"].str.contains("unreachable").all()


def test_ray_gives_the_local_pool_result(tmp_path) -> None:
    pytest.importorskip("ray")
    s = spec()
    local = plan(s, tmp_path / "local", workers=2)
    ray = plan(s, tmp_path / "ray", workers=2, ray=True)
    assert ray.drop(columns="cached").equals(local.drop(columns="cached"))


def test_spec_errors_are_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "rates": [10]}))
    assert main(["plan", str(path)]) == 2
    assert "search = missing" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"base": BASE, "rates": [-1], "search": {"gpus": [{"id": "h100"}]}}))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rates.0 = -1" in err and err.count("\n") == 1
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    with pytest.raises(ServesimError, match="base: hardware.tp = 0"):
        load_spec(path, ["base.hardware.tp=0", "rates.0=5"])


def test_configurations_that_differ_only_in_parameters_are_kept_apart(tmp_path) -> None:
    budgets = [{"name": "sarathi", "token_budget": 256}, {"name": "sarathi", "token_budget": 1024}]
    s = spec(search={"gpus": [{"id": "h100"}], "tp": [1], "schedulers": budgets})
    table = plan(s, tmp_path, workers=1)
    assert sorted(table["label"]) == ["h100 tp1 sarathi(token_budget=1024)", "h100 tp1 sarathi(token_budget=256)"]


def test_a_configuration_failing_its_long_check_is_ranked_after_those_that_pass(tmp_path, monkeypatch) -> None:
    s = spec(rates=[3])  # both GPUs carry it; the L40S is cheaper
    first = plan(s, tmp_path / "a", workers=1)
    loser = first.iloc[0]
    assert loser["gpu"] == "l40s" and loser["verified"] == "yes" and first.iloc[1]["verified"] == "yes"
    (tmp_path / "b" / "cache").mkdir(parents=True)
    for f in (tmp_path / "a" / "cache").glob("*.json"):  # the sizing, not the checks
        if not f.name.startswith("verify-"):
            (tmp_path / "b" / "cache" / f.name).write_bytes(f.read_bytes())
    real = simulate

    def long_runs_of_the_winner_overload(cfg: SimConfig):
        res = real(cfg)
        if cfg.hardware.gpu == loser["gpu"] and cfg.workloads[0].num_requests > 500:  # the 10x check only
            res.summary["stability"] = "overloaded"
        return res

    monkeypatch.setattr("servesim.planner.simulate", long_runs_of_the_winner_overload)
    table = plan(s, tmp_path / "b", workers=1)
    assert table["cached"].all()
    assert table.iloc[-1]["label"] == loser["label"] and table.iloc[-1]["verified"] == "no"
    assert table.iloc[0]["verified"] == "yes" and table.iloc[0]["label"] != loser["label"]
    assert table.iloc[0]["label"] in (tmp_path / "b" / "best.yaml").read_text().splitlines()[0]


def test_moe_placements_are_searched_and_count_every_gpu() -> None:
    from servesim.planner import candidates

    base = {**BASE, "model": "qwen3-30b-a3b"}
    s = spec(base=base, search={"gpus": [{"id": "h100"}], "tp": [1, 2], "max_gpus": 4,
                                "placements": [{}, {"dp": 4, "expert_parallel": True}]})
    found = {label: cfg.hardware for label, cfg in candidates(s)}
    assert list(found) == ["h100 tp1 vllm", "h100 tp1 dp=4 expert_parallel=True vllm", "h100 tp2 vllm"]
    assert found["h100 tp1 dp=4 expert_parallel=True vllm"].dp == 4  # tp2 x dp4 = 8 GPUs: over max_gpus
