"""The PyTorch backend on CPU with a tiny model: paged attention against a contiguous reference, and the
same greedy tokens under continuous batching (chunked, preempted) as when each request runs alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # tiny shapes: threads only add contention

import torch.nn.functional as F  # noqa: E402

from backend.attention import Chunk, attention_meta  # noqa: E402
from backend.executor import prompt_tokens  # noqa: E402
from backend.model import LlamaModel, PagedKVCache, build_model, rope, rope_tables  # noqa: E402
from backend.moe import MoE, reference_moe  # noqa: E402
from backend.parallel import Shard, shard_model  # noqa: E402
from backend.replay import replay  # noqa: E402
from hardware.catalog import get_model  # noqa: E402
from hardware.errors import ServesimError  # noqa: E402
from servesim.cli import main  # noqa: E402
from sim.config import KvCacheConfig, SimConfig  # noqa: E402

SPEC = get_model("tiny-llama")


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    """Last-position logits of a plain causal forward over the whole sequence (no cache, no paging)."""
    t = len(tokens)
    pos = torch.arange(t)
    x = model.embed_tokens(torch.tensor(tokens))
    for layer in model.layers:
        a, h = layer.self_attn, layer.input_layernorm(x)
        rot = rope_tables(pos, a.head_dim, a.theta, x.dtype)
        q, k, v = a.qkv_proj(h).split([a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.head_dim], -1)
        q = rope(q.reshape(t, a.heads, a.head_dim), *rot).transpose(0, 1)
        k = rope(k.reshape(t, a.kv_heads, a.head_dim), *rot).transpose(0, 1)
        v = v.reshape(t, a.kv_heads, a.head_dim).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + a.o_proj(o.transpose(0, 1).reshape(t, -1))
        h = layer.post_attention_layernorm(x)
        x = x + (reference_moe(layer.mlp, h) if isinstance(layer.mlp, MoE) else layer.mlp(h))
    return model.lm_head(model.norm(x[-1:])).float()[0]


def reference_generate(model, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            toks.append(int(reference_logits(model, toks).argmax()))
    return toks[len(prompt):]


def run_step(model, cache, parts, prefills: int) -> torch.Tensor:
    """One pass over `parts` ((tokens, cached, block table) each, the first `prefills` of them prefill chunks)
    through the paged cache; each part's last-row logits."""
    flat, pos, chunks, rows = [], [], [], []
    for toks, cached, table in parts:
        chunks.append(Chunk(len(flat), len(toks) - cached, cached, table))
        flat += toks[cached:]
        pos += range(cached, len(toks))
        rows.append(len(flat) - 1)
    meta = attention_meta(chunks, cache.block_size, torch.device("cpu"), prefills, SPEC.num_key_value_heads)
    return model(torch.tensor(flat), torch.tensor(pos), meta, cache, torch.tensor(rows))


def test_paged_attention_matches_contiguous_reference() -> None:
    model = build_model(SPEC, torch.device("cpu"), torch.float32, seed=3)
    cache = PagedKVCache(SPEC.num_hidden_layers, 32, 16, SPEC.num_key_value_heads, SPEC.head_size, torch.float32,
                         torch.device("cpu"))
    a = prompt_tokens(0, 1, 45, SPEC.vocab_size)
    b = prompt_tokens(0, 2, 20, SPEC.vocab_size)
    table_a, table_b = [7, 2, 11], [5, 9]  # scattered blocks

    run_step(model, cache, [(a[:30], 0, table_a)], 1)  # a's first chunk alone
    # a's second chunk (cached prefix, mid-block) with b's prompt
    out = run_step(model, cache, [(a, 30, table_a), (b, 0, table_b)], 2)
    with torch.no_grad():
        assert torch.allclose(out[0], reference_logits(model, a), atol=1e-4)
        assert torch.allclose(out[1], reference_logits(model, b), atol=1e-4)
        a2, b2 = a + [int(out[0].argmax())], b + [int(out[1].argmax())]
        dec = run_step(model, cache, [(a2, 45, table_a), (b2, 20, table_b)], 0)  # a batched decode of both
        assert torch.allclose(dec[0], reference_logits(model, a2), atol=1e-4)
        assert torch.allclose(dec[1], reference_logits(model, b2), atol=1e-4)


def tiny_config(scheduler: dict, blocks: int, n: int = 10, model: str = "tiny-llama") -> SimConfig:
    return SimConfig.model_validate({
        "model": model, "seed": 5, "scheduler": scheduler, "kv_cache": {"num_blocks": blocks},
        "max_model_len": min(2048, blocks * 16),
        "workloads": [{"arrival": {"kind": "poisson", "rate": 200.0}, "num_requests": n,
                       "lengths": {"kind": "uniform", "prompt": [5, 70], "output": [1, 24]}}],
    })


@pytest.mark.parametrize("scheduler,blocks", [
    ({"name": "vllm"}, 128),
    ({"name": "vllm_v1", "max_num_batched_tokens": 40}, 128),
    ({"name": "sarathi", "token_budget": 24}, 128),  # chunks of 24 split prompts mid-block (block size 16)
    ({"name": "vllm"}, 9),  # 144 tokens of KV for ten requests: preemption and recompute
    ({"name": "sarathi", "token_budget": 24}, 9),
])
def test_continuous_batching_gives_the_tokens_of_running_alone(scheduler: dict, blocks: int) -> None:
    res, executor, shapes = replay(tiny_config(scheduler, blocks), asap=True)
    req = res.requests
    assert (req["status"] == "finished").all()
    if blocks == 9:
        assert res.summary["preemptions"] > 0
    else:
        assert any(s.prefill_tokens.size and s.decode_context.size for s in shapes) or scheduler["name"] == "vllm"
    model = executor.model
    for row in req.itertuples():
        prompt = prompt_tokens(5, row.request_id, row.prompt_tokens, SPEC.vocab_size)
        got = executor.tokens[row.request_id][row.prompt_tokens:]
        assert got == reference_generate(model, prompt, row.output_tokens), row.request_id
    assert sorted(executor.blocks.free) == list(range(blocks))  # every block came back


@pytest.mark.parametrize("scheduler", [{"name": "vllm"}, {"name": "vllm_v1", "max_num_batched_tokens": 40}])
def test_swapped_requests_resume_with_the_tokens_of_running_alone(scheduler: dict) -> None:
    """Swap preemption in the backend: a preempted request's K/V goes to host memory and comes back into new
    blocks; it resumes without recomputing (only its newest sampled token runs) and generates what it would
    have alone."""
    cfg = tiny_config(scheduler, 9).model_copy(update={"kv_cache": KvCacheConfig(
        num_blocks=9, preemption="swap", swap_space_gb=0.01)})
    res, executor, shapes = replay(cfg, asap=True)
    req = res.requests
    assert (req["status"] == "finished").all() and res.summary["preemptions_swapped"] > 0
    assert res.summary["preemptions_swapped"] == res.summary["preemptions"]  # the swap space never filled
    extra = sum(int(s.prefill_tokens.sum()) for s in shapes) - req["prompt_tokens"].sum()
    assert 0 <= extra <= res.summary["preemptions_swapped"]  # a resume runs its newest token, as a chunk or a decode
    for row in req.itertuples():
        prompt = prompt_tokens(5, row.request_id, row.prompt_tokens, SPEC.vocab_size)
        got = executor.tokens[row.request_id][row.prompt_tokens:]
        assert got == reference_generate(executor.model, prompt, row.output_tokens), row.request_id
    assert not executor.host and sorted(executor.blocks.free) == list(range(9))


@pytest.mark.parametrize("scheduler,blocks", [({"name": "vllm"}, 40),
                                              ({"name": "vllm_v1", "max_num_batched_tokens": 40}, 40),
                                              ({"name": "sarathi", "token_budget": 24}, 14)])
def test_prefix_cached_replays_share_blocks_and_give_the_tokens_of_running_alone(scheduler: dict, blocks: int) -> None:
    """Prefix caching in the backend: requests starting with one of two 40-token system prompts reuse its
    cached blocks (the same physical blocks, holding the same tokens) and generate what they would alone; a
    small cache (14 blocks) evicts and preempts too. Every block ends free or pinned by the cache."""
    cfg = SimConfig.model_validate({
        "model": "tiny-llama", "seed": 5, "scheduler": scheduler, "max_model_len": 224,
        "kv_cache": {"num_blocks": blocks, "prefix_caching": True},
        "workloads": [{"arrival": {"kind": "poisson", "rate": 100.0}, "num_requests": 12,
                       "lengths": {"kind": "uniform", "prompt": [5, 50], "output": [1, 20]},
                       "shared_prefix": {"tokens": 40, "fraction": 0.9, "prompts": 2}}]})
    res, executor, shapes = replay(cfg, asap=True)
    req = res.requests
    assert (req["status"] == "finished").all() and req["cached_tokens"].sum() >= 64
    assert sum(int(s.prefill_tokens.sum()) for s in shapes) < req["prompt_tokens"].sum()  # hits skip tokens
    for row in req.itertuples():
        tokens = executor.tokens[row.request_id]
        got, prompt = tokens[row.prompt_tokens:], tokens[:row.prompt_tokens]
        assert got == reference_generate(executor.model, prompt, row.output_tokens), row.request_id
    keys = executor.req
    by_key: dict[int, list[int]] = {}  # requests with equal block keys hold equal tokens there
    for rid in range(len(req)):
        for j, key in enumerate(keys.keys_of(rid).tolist()):
            by_key.setdefault(key, []).append(executor.tokens[rid][j * 16:(j + 1) * 16])
    assert any(len(v) > 1 for v in by_key.values()) and all(v == v[:1] * len(v) for v in by_key.values())
    assert sorted(executor.blocks.free + list(executor.key_block.values())) == list(range(blocks))
    if blocks == 14:
        assert res.summary["preemptions"] > 0 or len(executor.key_block) < len(by_key)  # evicted or preempted


def test_spread_routing_keeps_a_prompts_tokens_on_many_experts(monkeypatch) -> None:
    """Qwen1.5-MoE's 24 layers and 60 experts (top 4) at small widths: at the default random init one prompt's
    397 tokens converge and most of them go to one expert in deep layers; with the scaled init of MoE timing
    runs (`spread_routing`), every layer's busiest expert holds under twice the uniform share (26.5 slots)."""
    from calibrate.steps import StepRunner
    from hardware.operators import StepShape

    spec = get_model("qwen1.5-moe-a2.7b").model_copy(update={
        "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 1000,
        "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "intermediate_size": 256})
    routed: list[np.ndarray] = []
    original = MoE.route

    def route(self, x):
        weights, ids = original(self, x)
        routed.append(np.bincount(ids.flatten().numpy(), minlength=60))
        return weights, ids

    monkeypatch.setattr(MoE, "route", route)
    busiest = {}
    for spread in (False, True):
        runner = StepRunner(spec, "cpu", num_blocks=40, cuda_graphs=False, max_requests=4)
        runner.executor.model = build_model(spec, torch.device("cpu"), torch.float32, 0, spread_routing=spread)
        routed.clear()
        with torch.no_grad():
            runner.executor.run(runner.batch(StepShape.build(prefill=[397])))
        busiest[spread] = [int(c.max()) for c in routed]
    assert len(busiest[True]) == 24 and max(busiest[True]) < 2 * 397 * 4 / 60
    assert max(busiest[False][-6:]) > 300  # collapsed: most of the 397 tokens on one expert


@pytest.mark.parametrize("scheduler", [{"name": "vllm"}, {"name": "sarathi", "token_budget": 24}])
def test_moe_replay_gives_the_tokens_of_running_alone(scheduler: dict) -> None:
    """A Qwen2-MoE-style model (routed experts as grouped GEMMs, a gated shared expert, a dense first layer):
    batched, chunked replays give each request the tokens of a token-by-token, expert-by-expert reference."""
    res, executor, _ = replay(tiny_config(scheduler, 128, n=6, model="tiny-moe"), asap=True)
    req = res.requests
    assert (req["status"] == "finished").all()
    model = executor.model
    assert isinstance(model.layers[1].mlp, MoE) and not isinstance(model.layers[0].mlp, MoE)
    for row in req.itertuples():
        prompt = prompt_tokens(5, row.request_id, row.prompt_tokens, model.spec.vocab_size)
        got = executor.tokens[row.request_id][row.prompt_tokens:]
        assert got == reference_generate(model, prompt, row.output_tokens), row.request_id


def test_backend_refuses_mla_and_sharded_moe() -> None:
    with pytest.raises(ValueError, match="multi-head latent attention is simulated only"):
        LlamaModel(get_model("deepseek-v2-lite").model_copy(update={"num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="MoE models on one GPU"):
        shard_model(build_model(get_model("tiny-moe"), torch.device("cpu"), torch.float32), Shard(0, 2))


def test_replay_and_validate_cli(tmp_path, capsys) -> None:
    args = ["--set", "model=tiny-llama", "--set", "workloads.0.num_requests=12", "--set", "kv_cache.num_blocks=128",
            "--set", "workloads.0.lengths.max_prompt=200", "--set", "workloads.0.lengths.max_output=20"]
    assert main(["replay", *args, "--asap", "--out", str(tmp_path / "real")]) == 0
    assert main(["run", *args, "--quiet", "--out", str(tmp_path / "sim")]) == 0
    assert main(["validate", str(tmp_path / "sim"), str(tmp_path / "real"), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    steps = (tmp_path / "real" / "steps.csv").read_text().count("\n") - 1
    assert report["steps"] == steps > 0 and report["step_mape"] >= 0
    assert report["ttft_p50_s_real"] > 0 and "ttft_p99_s_error" in report
    # on CPU the replay runs every step eagerly; the config's cost model graphs steps of up to 512 tokens
    assert report["steps_graph"] + report["steps_eager"] == steps and report["steps_graph"] > 0
    assert report["execution_mismatches"] == report["steps_graph"]
    assert (tmp_path / "real" / "step_scatter.png").is_file() and (tmp_path / "real" / "batches.jsonl").is_file()
    assert main(["replay", "--set", "cluster.replicas=2"]) == 2


def test_token_tree_replay_keeps_the_tree_levels_for_validation(tmp_path) -> None:
    """A token-tree replay's batch shapes (batches.jsonl) keep each verification's nodes per depth, so that
    `servesim validate` prices the draft one step per level, as the simulator does, and not as a chain."""
    from dataclasses import replace

    from backend.replay import write_shapes
    from sim.setup import prepare
    from sim.validate import read_shapes

    cfg = tiny_config({"name": "vllm"}, 128, n=3)
    spec = {"draft": {"kind": "draft_model", "model": "tiny-llama"}, "tree": {"kind": "static", "widths": [3, 2]},
            "acceptance": {"kind": "ranked", "probs": [0.6, 0.2, 0.1]}}
    cfg = cfg.model_copy(update={"speculation": SimConfig.model_validate({"speculation": spec}).speculation})
    _, _, shapes = replay(cfg, asap=True)
    write_shapes(shapes, tmp_path / "batches.jsonl")
    read = read_shapes(tmp_path / "batches.jsonl")
    trees = [(a, b) for a, b in zip(shapes, read) if a.verify_tokens.size]
    assert trees and all(b.verify_levels is not None and np.array_equal(a.verify_levels, b.verify_levels)
                         for a, b in trees)
    executor = prepare(cfg).pools[0].executor(cfg.speculation)
    tree_s = [executor.price(b)[1] for _, b in trees]
    chain_s = [executor.price(replace(b, verify_levels=None))[1] for _, b in trees]
    assert all(t < c for t, c in zip(tree_s, chain_s))  # 2 draft steps per tree, where a chain of 5 takes 5


def test_temperature_sampling_is_seeded() -> None:
    cfg = tiny_config({"name": "vllm_v1"}, 128, n=4)
    _, a, _ = replay(cfg, asap=True, temperature=1.0)
    _, b, _ = replay(cfg, asap=True, temperature=1.0)
    assert a.tokens == b.tokens
    greedy = replay(cfg, asap=True)[1].tokens
    assert any(a.tokens[r] != greedy[r] for r in greedy)
    assert np.isfinite(len(a.tokens))


def test_hugging_face_projections_fuse_into_qkv_and_gate_up() -> None:
    """A checkpoint with HF's separate q/k/v and gate/up weights loads into the fused projections."""
    from backend.model import fuse_hf_projections

    model = build_model(SPEC, torch.device("cpu"), torch.float32, seed=4)
    a, d = model.layers[0].self_attn, SPEC.head_size
    split = {}
    for name, t in model.state_dict().items():
        if "qkv_proj" in name:
            q, k, v = t.split([a.heads * d, a.kv_heads * d, a.kv_heads * d])
            for part, tensor in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                split[name.replace("qkv_proj", part)] = tensor
        elif "gate_up_proj" in name:
            gate, up = t.chunk(2)
            split[name.replace("gate_up_proj", "gate_proj")], split[name.replace("gate_up_proj", "up_proj")] = gate, up
        else:
            split[name] = t
    fused = fuse_hf_projections(split)
    assert fused.keys() == model.state_dict().keys()
    assert all(torch.equal(fused[n], t) for n, t in model.state_dict().items())


def test_table_buckets_bound_the_decode_graphs() -> None:
    from backend.graphs import table_bucket

    blocks = np.arange(1, 100_000)
    buckets = np.array([table_bucket(int(n)) for n in blocks])
    assert (buckets >= blocks).all() and (buckets[blocks > 16] < 2 * blocks[blocks > 16]).all()
    assert len(set(buckets.tolist())) <= 14  # few captures per batch size


def _tp_worker(rank: int, size: int, port: int, out: str) -> None:
    """One tensor-parallel rank on the CPU (Gloo): a mixed step and a decode step over a paged cache."""
    import torch.distributed as dist

    from backend.parallel import Shard
    from hardware.specs import kv_heads_per_gpu

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        torch.save(_paged_steps(Shard(rank, size), kv_heads_per_gpu(SPEC, size)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _paged_steps(shard, kv_heads: int) -> list[torch.Tensor]:
    model = build_model(SPEC, torch.device("cpu"), torch.float32, seed=7, shard=shard)
    cache = PagedKVCache(SPEC.num_hidden_layers, 16, 16, kv_heads, SPEC.head_size, torch.float32, torch.device("cpu"))
    a, b = prompt_tokens(0, 1, 40, SPEC.vocab_size), prompt_tokens(0, 2, 9, SPEC.vocab_size)
    steps = ((((a, 0, [3, 5, 1]), (b, 0, [7])), 2), (((a[:40] + [5], 40, [3, 5, 1]),), 0))
    return [run_step(model, cache, parts, prefills) for parts, prefills in steps]


@pytest.mark.parametrize("size", [2, 4])
def test_tensor_parallel_ranks_compute_the_unsharded_logits(size: int, tmp_path) -> None:
    """TP 2 shards KV heads, TP 4 replicates them (2 KV heads): every rank's gathered logits equal TP 1's."""
    import socket

    import torch.multiprocessing as mp

    from backend.parallel import Shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_tp_worker, args=(size, port, str(tmp_path / "logits")), nprocs=size, join=True)
    want = _paged_steps(Shard(), SPEC.num_key_value_heads)
    for rank in range(size):
        got = torch.load(tmp_path / f"logits.{rank}")
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.allclose(g, w, atol=1e-4)


def test_tensor_parallel_size_must_divide_the_shapes() -> None:
    from backend.parallel import Shard

    with pytest.raises(ValueError, match="tensor parallel size 3 must divide num_attention_heads = 8"):
        build_model(SPEC, torch.device("cpu"), torch.float32, shard=Shard(0, 3))


# ---- speculative decoding in the backend ----------------------------------------------------------------
def spec_config(scheduler: dict, blocks: int, draft: str, k: int = 3, alpha: float = 0.7, n: int = 8) -> SimConfig:
    cfg = tiny_config(scheduler, blocks, n)
    return cfg.model_copy(update={"speculation": SimConfig.model_validate({"speculation": {
        "draft": {"kind": "draft_model", "model": draft}, "k": k,
        "acceptance": {"kind": "iid", "alpha": alpha}}}).speculation})


@pytest.fixture
def other_draft(tmp_path) -> str:
    """A smaller tiny model with the target's vocabulary (its proposals mostly disagree)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "vocab_size": SPEC.vocab_size, "max_position_embeddings": 2048}))
    return str(path)


@pytest.mark.parametrize("scheduler,blocks", [({"name": "vllm"}, 128), ({"name": "sarathi", "token_budget": 24}, 128),
                                              ({"name": "vllm"}, 9)])
@pytest.mark.parametrize("which", ["same", "other"])
def test_speculative_replay_gives_the_greedy_tokens(scheduler, blocks, which, other_draft) -> None:
    draft = "tiny-llama" if which == "same" else other_draft
    res, executor, _ = replay(spec_config(scheduler, blocks, draft), asap=True, acceptance="model")
    req = res.requests
    assert (req["status"] == "finished").all()
    for row in req.itertuples():  # lossless: exactly the target's greedy continuation, whatever the draft
        prompt = prompt_tokens(5, row.request_id, row.prompt_tokens, SPEC.vocab_size)
        got = executor.tokens[row.request_id][row.prompt_tokens:]
        assert got == reference_generate(executor.model, prompt, row.output_tokens), row.request_id
    s = res.summary
    assert s["spec_draft_tokens"] > 0
    if which == "same":  # the draft is the target (same weights): every draft is accepted
        assert s["spec_acceptance_rate"] == 1.0
    else:
        assert s["spec_acceptance_rate"] < 0.5
    assert sorted(executor.blocks.free) == list(range(blocks))
    assert not executor.draft.blocks.ids() and len(executor.draft.blocks.free) == blocks + 256  # the draft's cache


@pytest.mark.parametrize("blocks, tree", [(128, None), (9, None), (128, {"kind": "static", "widths": [2, 2]})])
def test_the_simulated_draft_feed_is_what_the_backends_draft_runs(blocks, tree, other_draft, monkeypatch) -> None:
    """The tokens each verification's draft takes in its first step, as the `Speculator` follows them
    (`StepShape.draft_feed`, recorded in the replay's shapes), equal what the backend's draft model runs:
    chains accepted in part and in full, preemption (9 blocks) and token trees."""
    from backend.speculative import DraftRunner
    ran: list[list[int]] = []

    def record(method: str) -> None:
        original = getattr(DraftRunner, method)

        def first_step(self, ids, plan, tokens_of, *rest):
            if ids:
                ran.append([len(tokens_of(rid)) - self.done.get(rid, 0) for rid in ids])
            return original(self, ids, plan, tokens_of, *rest)
        monkeypatch.setattr(DraftRunner, method, first_step)

    record("propose")
    record("propose_tree")
    cfg = spec_config({"name": "vllm"}, blocks, other_draft, alpha=0.6)
    if tree is not None:
        cfg = cfg.model_copy(update={"speculation": cfg.speculation.model_copy(update={
            "tree": SimConfig.model_validate({"speculation": {"tree": tree}}).speculation.tree,
            "acceptance": SimConfig.model_validate({"speculation": {"acceptance": {
                "kind": "ranked", "probs": [0.6, 0.3]}}}).speculation.acceptance})})
    res, _, shapes = replay(cfg, asap=True)
    want = [s.draft_feed.tolist() for s in shapes if s.verify_tokens.size]
    assert ran == want
    assert any(max(feed) > 1 for feed in want) and any(min(feed) == 1 for feed in want)
    if blocks == 9:
        assert res.summary["preemptions"] > 0


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_oracle_forces_the_configured_acceptance(alpha, other_draft) -> None:
    res, _, _ = replay(spec_config({"name": "vllm"}, 128, other_draft, alpha=alpha), asap=True)
    steps = res.steps
    assert steps["draft_tokens"].sum() > 0
    assert (steps["accepted_tokens"] == (steps["draft_tokens"] if alpha == 1.0 else 0)).all()
    assert (res.requests["status"] == "finished").all()


def test_speculative_sampling_accepts_a_draft_equal_to_the_target() -> None:
    cfg = spec_config({"name": "vllm_v1"}, 128, "tiny-llama", n=4)
    a, ex_a, _ = replay(cfg, asap=True, temperature=1.0, acceptance="model")
    _, ex_b, _ = replay(cfg, asap=True, temperature=1.0, acceptance="model")
    assert a.summary["spec_acceptance_rate"] == 1.0  # p == q: min(1, p/q) = 1
    assert ex_a.tokens == ex_b.tokens  # seeded draws


def test_replay_rejects_simulated_only_speculation() -> None:
    cfg = tiny_config({"name": "vllm"}, 128)
    heads = cfg.model_copy(update={"speculation": SimConfig.model_validate(
        {"speculation": {"draft": {"kind": "ngram"}}}).speculation})
    with pytest.raises(ServesimError, match="simulated only"):
        replay(heads)


@pytest.mark.parametrize("field, value", [("kv_access", "gather"), ("elementwise", "unfused"),
                                          ("weight_dtype", "fp8"), ("kv_dtype", "fp8")])
def test_replay_refuses_an_engine_the_backend_does_not_run(field, value) -> None:
    cfg = tiny_config({"name": "vllm"}, 128)
    other = cfg.model_copy(update={"hardware": cfg.hardware.model_copy(update={field: value})})
    with pytest.raises(ServesimError, match=f"hardware.{field} = '{value}' is simulated only"):
        replay(other)


@pytest.mark.parametrize("tree", [{"kind": "sequoia", "nodes": 10, "depth": 4},
                                  {"kind": "static", "widths": [3, 2]}])
@pytest.mark.parametrize("which", ["same", "other"])
def test_token_tree_verification_gives_the_greedy_tokens(tree, which, other_draft) -> None:
    cfg = tiny_config({"name": "vllm"}, 9 if which == "other" else 128, n=8)  # 9 blocks: preemption too
    spec = {"draft": {"kind": "draft_model", "model": "tiny-llama" if which == "same" else other_draft},
            "tree": tree, "acceptance": {"kind": "ranked", "probs": [0.6, 0.2, 0.1]}}
    cfg = cfg.model_copy(update={"speculation": SimConfig.model_validate({"speculation": spec}).speculation})
    res, executor, _ = replay(cfg, asap=True, acceptance="model")
    req = res.requests
    assert (req["status"] == "finished").all()
    for row in req.itertuples():  # the tree mask and the K/V moves keep decoding exactly greedy
        prompt = prompt_tokens(5, row.request_id, row.prompt_tokens, SPEC.vocab_size)
        got = executor.tokens[row.request_id][row.prompt_tokens:]
        assert got == reference_generate(executor.model, prompt, row.output_tokens), row.request_id
    steps = res.steps
    assert steps["draft_tokens"].sum() > 0
    if which == "same":  # the rank-0 spine is the target's own greedy path: accepted to its full depth
        assert res.summary["spec_tokens_per_verify"] > 2.5
    assert sorted(executor.blocks.free) == list(range(9 if which == "other" else 128))


def test_tree_oracle_accepts_the_forced_depth(other_draft) -> None:
    cfg = tiny_config({"name": "vllm"}, 128, n=6)
    spec = {"draft": {"kind": "draft_model", "model": other_draft}, "tree": {"kind": "sequoia", "nodes": 8, "depth": 3},
            "acceptance": {"kind": "ranked", "probs": [0.9, 0.05]}}
    cfg = cfg.model_copy(update={"speculation": SimConfig.model_validate({"speculation": spec}).speculation})
    res, _, _ = replay(cfg, asap=True)  # oracle: the drawn depth along rank-0 children
    assert res.summary["spec_tokens_per_verify"] > 2.0 and (res.requests["status"] == "finished").all()
