"""Multi-turn sessions (`workloads.N.sessions`, `sim.clients`): prompts grow by the history, turns follow
answers after the think time, prefix caching reuses the history, a refused turn ends its session."""

from __future__ import annotations

from sim.config import load_config
from sim.engine import simulate


def run(*extra: str, sessions: str = "{turns: 4, think_time_s: 1.5}"):
    return simulate(load_config(None, [f"workloads.0.sessions={sessions}", "workloads.0.num_requests=40",
                                       "workloads.0.arrival.rate=0.5", *extra]))


def test_each_turn_sends_the_whole_history_after_the_previous_answer_and_think_time() -> None:
    res = run("workloads.0.lengths={kind: fixed, prompt: 100, output: 50}")
    req = res.requests.set_index("request_id")
    assert len(req) == 160 and (req["status"] == "finished").all()
    for _, turns in req.groupby("session"):
        chain = [i for i in turns.index if i not in set(turns["next_turn"])]  # the first: none points to it
        while req.loc[chain[-1], "next_turn"] >= 0:
            chain.append(int(req.loc[chain[-1], "next_turn"]))
        assert len(chain) == 4
        assert req.loc[chain, "prompt_tokens"].tolist() == [100, 250, 400, 550]  # exactly the earlier turns more
        for a, b in zip(chain, chain[1:]):
            assert req.loc[b, "arrival_s"] == req.loc[a, "finish_s"] + 1.5


def test_prefix_caching_reuses_each_turns_history() -> None:
    res = run("kv_cache.prefix_caching=true", "workloads.0.lengths={kind: uniform, prompt: [20, 300], "
              "output: [10, 200]}")
    req = res.requests.set_index("request_id")
    bs = res.config.kv_cache.block_size
    later = req[req.index.isin(req["next_turn"])]
    for rid, row in later.iterrows():
        prev = req[req["next_turn"] == rid].iloc[0]  # light load, one replica: nothing is evicted in between
        assert row["cached_tokens"] == (prev["prompt_tokens"] + prev["output_tokens"] - 1) // bs * bs
    assert res.summary["prefix_cache_hit_rate"] > 0.5


def test_a_refused_turn_ends_its_session() -> None:
    res = run("max_model_len=500", "workloads.0.lengths={kind: fixed, prompt: 100, output: 100}")
    req = res.requests
    codes = req.groupby("session")["reject_code"].apply(lambda c: c.fillna("").tolist())
    # turns 1 and 2 fit (200 and 400 tokens with their answers); turn 3 (600) is refused; turn 4 is never sent
    assert all(c == ["", "", "exceeds_max_model_len", "session_ended"] for c in codes)
    assert res.summary["requests_finished"] + res.summary["requests_rejected"] == 160


def test_geometric_turns_and_exponential_thinking_are_deterministic() -> None:
    spec = "{turns: 3, turns_kind: geometric, think_time_s: 0.5, think: exponential}"
    a, b = run(sessions=spec), run(sessions=spec)
    assert a.requests.to_csv() == b.requests.to_csv()
    sizes = a.requests.groupby("session").size()
    assert sizes.min() >= 1 and sizes.nunique() > 1 and 2 < sizes.mean() < 4.5
