"""Token trees: exact expected lengths against Monte Carlo, the Sequoia DP against brute force, greedy
builders and the batched allocation under a verify budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from policies.trees import (
    TokenTree,
    allocate,
    chain,
    dirichlet_confidence,
    greedy_tree,
    sequoia_hardware_optimal,
    sequoia_table,
    sequoia_tree,
    static_tree,
)

P = [0.55, 0.2, 0.1, 0.05]


def plane_trees(n: int):
    """Every ordered tree with n nodes under the root, as parent lists (parents before children)."""
    if n == 0:
        yield []
        return
    # A plane tree is the root's first child subtree (k nodes) followed by the rest of the root's children.
    for k in range(1, n + 1):
        for first in plane_trees(k - 1):
            for rest in plane_trees(n - k):
                parent = [-1] + [0 if q == -1 else q + 1 for q in first]
                parent += [-1 if q == -1 else q + k for q in rest]
                yield parent


def test_plane_tree_enumeration_counts_catalan_numbers() -> None:
    assert [sum(1 for _ in plane_trees(n)) for n in range(8)] == [1, 1, 2, 5, 14, 42, 132, 429]


@pytest.mark.parametrize("d", [1, 2, 3, 7])
def test_sequoia_dp_is_optimal_against_brute_force(d: int) -> None:
    A = sequoia_table(P, 7, d)
    for n in range(1, 8):
        best = max(TokenTree.make(t).expected_tokens(TokenTree.make(t).positional_probs(P)) - 1
                   for t in plane_trees(n) if TokenTree.make(t).max_depth <= d)
        assert A[d, n] == pytest.approx(best, abs=1e-12)
        tree = sequoia_tree(P, n, d)
        assert tree.size <= n and tree.max_depth <= d
        assert tree.expected_tokens(tree.positional_probs(P)) - 1 == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("tree", [chain(5), static_tree([3, 2, 1]), sequoia_tree(P, 20, 6)])
def test_expected_length_matches_monte_carlo(tree: TokenTree) -> None:
    probs = tree.positional_probs(P)
    rng = np.random.default_rng(0)
    draws = np.array([tree.sample_accepted(probs, rng) for _ in range(40_000)])
    assert 1 + draws.mean() == pytest.approx(tree.expected_tokens(probs), abs=4 * draws.std() / 200)


def test_draft_confidence_model_matches_monte_carlo() -> None:
    tree, cond = greedy_tree(dirichlet_confidence(np.random.default_rng(3), 0.5, 3), budget=24, max_depth=6)
    rng = np.random.default_rng(1)
    draws = np.array([tree.sample_accepted(cond, rng) for _ in range(40_000)])
    assert 1 + draws.mean() == pytest.approx(tree.expected_tokens(cond), abs=4 * draws.std() / 200)


def test_sequoia_grows_while_chains_and_kary_trees_saturate() -> None:
    seq = [1 + sequoia_table(P, n, 12)[12, n] for n in (4, 16, 64)]
    ch = [chain(n).expected_tokens(chain(n).positional_probs(P)) for n in (4, 16, 64)]
    assert seq[2] - seq[1] > 0.2 and ch[2] - ch[1] < 0.01  # a chain's tail is worth nothing; the tree keeps gaining
    assert all(s >= c for s, c in zip(seq, ch))


def test_greedy_tree_respects_budget_depth_and_threshold() -> None:
    probs = dirichlet_confidence(np.random.default_rng(0), 0.3, 4)
    tree, cond = greedy_tree(probs, budget=30, max_depth=4)
    assert tree.size == 30 and tree.max_depth <= 4
    path = tree.path_prob(cond)
    dyn, dcond = greedy_tree(dirichlet_confidence(np.random.default_rng(0), 0.3, 4), budget=10_000, max_depth=50,
                             threshold=0.05)
    assert (dyn.path_prob(dcond) >= 0.05).all()
    assert (np.diff(np.sort(path)[::-1]) <= 1e-12).all()


def test_hardware_aware_choice_prefers_bigger_trees_when_verification_is_cheap() -> None:
    draft = lambda n, d: 0.001 * d  # noqa: E731
    cheap, _ = sequoia_hardware_optimal(P, lambda n: 0.02 + 1e-6 * n, draft, 64, 10)
    costly, _ = sequoia_hardware_optimal(P, lambda n: 0.02 + 2e-3 * n, draft, 64, 10)
    assert cheap.size > 2 * costly.size


@pytest.mark.parametrize("budget", [3, 10, 40, 200])
def test_allocation_fits_the_budget_and_beats_equal_split(budget: int) -> None:
    rng = np.random.default_rng(budget)
    gains = []
    for _ in range(6):
        p = np.sort(rng.dirichlet(np.ones(4)) * rng.uniform(0.3, 0.95))[::-1]
        gains.append(sequoia_table(p, 40, 8)[8])
    sizes = allocate(gains, budget)
    assert int((sizes + 1).sum()) <= max(budget, 6) and (sizes >= 0).all()
    equal = min(max(budget - 6, 0) // 6, 40)
    assert sum(g[s] for g, s in zip(gains, sizes)) >= sum(g[equal] for g in gains) - 1e-12
    for combo in itertools.islice(itertools.product(range(4), repeat=6), 0, 500):  # small brute force
        if sum(combo) + 6 <= budget:
            assert sum(g[s] for g, s in zip(gains, sizes)) >= sum(g[c] for g, c in zip(gains, combo)) - 1e-9


# ---- token trees in serving -----------------------------------------------------------------------------
def tree_config(tree: dict, acceptance: dict, rate: float = 6.0, **spec):
    from sim.config import SimConfig

    return SimConfig.model_validate({
        "model": "llama-3-8b", "max_model_len": 4096, "seed": 2,
        "workloads": [{"name": "w", "arrival": {"kind": "poisson", "rate": rate}, "num_requests": 40,
                       "lengths": {"kind": "uniform", "prompt": [100, 2000], "output": [1, 150]}}],
        "speculation": {"draft": {"kind": "draft_model", "model": "llama-3.2-1b"}, "tree": tree,
                        "acceptance": acceptance, **spec}})


RANKED = {"kind": "ranked", "probs": [0.6, 0.2, 0.1]}
CONFIDENCE = {"kind": "confidence", "concentration": 0.3, "top": 4}


@pytest.mark.parametrize("tree,acceptance,spec", [
    ({"kind": "sequoia", "nodes": 12, "depth": 5}, RANKED, {}),
    ({"kind": "static", "widths": [3, 2, 1]}, RANKED, {"batching": "padded"}),
    ({"kind": "sequoia", "nodes": 24, "depth": 6}, RANKED, {"batching": "budgeted", "verify_budget": 40}),
    ({"kind": "opt_tree", "nodes": 12, "depth": 6}, CONFIDENCE, {}),
    ({"kind": "opt_tree", "nodes": 12, "depth": 6}, CONFIDENCE, {"batching": "budgeted", "verify_budget": 40}),
    ({"kind": "dyspec", "nodes": 40, "depth": 6, "threshold": 0.1}, CONFIDENCE, {}),
])
def test_tree_serving_conserves_tokens_and_respects_budgets(tree, acceptance, spec) -> None:
    from sim.engine import simulate

    res = simulate(tree_config(tree, acceptance, **spec))
    req, steps = res.requests, res.steps
    assert (req["status"] == "finished").all()
    depth = tree.get("depth", len(tree.get("widths") or []))
    for row in req.itertuples():
        times = res.token_times[row.token_offset:row.token_offset + row.output_tokens]
        assert not np.isnan(times).any()  # exactly the output length
        assert np.unique(times, return_counts=True)[1].max() <= depth + 1  # at most the deepest path + 1
    assert (steps["accepted_tokens"] <= steps["draft_tokens"]).all()
    if spec.get("batching") == "budgeted":
        assert (steps["verify_requests"] + steps["draft_tokens"] <= spec["verify_budget"]).all()
    assert res.free_blocks_at_end == [res.summary["kv_blocks_per_replica"]]
    again = simulate(tree_config(tree, acceptance, **spec))
    assert again.requests.to_csv() == req.to_csv()  # deterministic


def test_tree_tokens_per_step_match_the_closed_form() -> None:
    from sim.engine import simulate

    res = simulate(tree_config({"kind": "sequoia", "nodes": 16, "depth": 6}, RANKED, rate=0.5)).summary
    tree = sequoia_tree(RANKED["probs"], 16, 6)
    # Requests near their last tokens verify smaller trees, so the mean sits a little under the closed form.
    assert res["spec_tokens_per_verify"] == pytest.approx(tree.expected_tokens(tree.positional_probs(RANKED["probs"])),
                                                          rel=0.08)


def test_tree_config_errors() -> None:
    from hardware.errors import ServesimError
    from sim.config import load_config

    with pytest.raises(ServesimError, match="acceptance.kind must be 'confidence'"):
        load_config(None, ["speculation.tree.kind=opt_tree"])
    with pytest.raises(ServesimError, match="needs tree.kind"):
        load_config(None, ["speculation.acceptance.kind=confidence"])
    with pytest.raises(ServesimError, match="widths"):
        load_config(None, ["speculation.tree.kind=static"])
    with pytest.raises(ServesimError, match="at most 1"):
        load_config(None, ["speculation.acceptance.kind=ranked", "speculation.acceptance.probs=[0.7, 0.5]"])
