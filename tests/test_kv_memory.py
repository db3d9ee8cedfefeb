"""KV memory options (issue 26): integer-quantized KV with group scales, and KV eviction to a token budget."""

from __future__ import annotations

import numpy as np
import pytest

from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.operators import StepShape
from hardware.specs import DTYPE_BYTES
from sim.engine import simulate
from sim.setup import build_pools
from tests.test_chunked_prefill import CheckedBlocks
from tests.test_engine import check_conservation, config


@pytest.mark.parametrize("dtype, bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_integer_kv_costs_its_bits_plus_a_scale_and_zero_point_per_group(dtype: str, bits: int) -> None:
    assert DTYPE_BYTES[dtype] == bits / 8 + 4 / 64  # fp16 scale and zero point per 64 values
    bf16 = Deployment.build("llama-3-8b", "h100")
    quant = Deployment.build("llama-3-8b", "h100", kv_dtype=dtype)
    assert quant.memory.kv_bytes_per_token == 32 * 2 * 8 * 128 * DTYPE_BYTES[dtype]
    assert quant.memory.kv_capacity_tokens == pytest.approx(bf16.memory.kv_capacity_tokens * 2 / DTYPE_BYTES[dtype],
                                                            rel=1e-3)
    shape = StepShape.build(decode=[8000] * 64)
    att = {d: next(r for r in CostModel(dep).price(shape).breakdown if r.name == "attention_decode")
           for d, dep in (("bf16", bf16), (dtype, quant))}
    queries = 2 * 64 * 32 * 128 * 2 * 32  # q read, output written, per layer, 32 layers
    kv = {d: a.bytes - queries for d, a in att.items()}
    assert kv[dtype] / kv["bf16"] == pytest.approx(DTYPE_BYTES[dtype] / 2)


def test_a_token_budget_caps_what_attention_reads() -> None:
    dep = Deployment.build("llama-3-8b", "h100", kv_token_budget=1024)
    assert dep.attention_window == 1024 and dep.kv_tokens_limit == 1024
    model, plain = CostModel(dep), CostModel(Deployment.build("llama-3-8b", "h100"))
    assert model.price(StepShape.build(decode=[8000] * 32)).seconds == pytest.approx(
        plain.price(StepShape.build(decode=[1023] * 32)).seconds)
    assert model.price(StepShape.build(decode=[500] * 32)).seconds == plain.price(
        StepShape.build(decode=[500] * 32)).seconds  # below the budget nothing changes


def test_a_token_budget_caps_the_blocks_each_request_holds() -> None:
    work = [{"arrival": {"kind": "poisson", "rate": 50.0}, "num_requests": 60,
             "lengths": {"kind": "uniform", "prompt": [100, 1500], "output": [200, 900]}}]
    budget = config(workloads=work, hardware={"kv_token_budget": 256}, kv_cache={"num_blocks": 400},
                    max_model_len=4096, scheduler={"name": "vllm_v1", "max_num_batched_tokens": 2048})
    full = config(workloads=work, kv_cache={"num_blocks": 400}, max_model_len=4096,
                  scheduler={"name": "vllm_v1", "max_num_batched_tokens": 2048})
    a, b = simulate(budget), simulate(full)
    check_conservation(budget, a)
    cap = -(-256 // 16) + 1
    assert (a.steps["kv_blocks_used"] <= a.steps["running"] * cap).all()
    assert a.summary["preemptions"] < b.summary["preemptions"]  # at most 17 blocks each instead of up to 150
    assert a.steps["running"].max() > b.steps["running"].max()
    assert a.summary["duration_s"] < b.summary["duration_s"]
    assert build_pools(budget)[0].num_blocks == 400


def test_a_token_budget_with_prefix_caching_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_token_budget = 256: KV eviction is simulated for colocated"):
        config(hardware={"kv_token_budget": 256}, kv_cache={"prefix_caching": True})
    with pytest.raises(ServesimError, match="kv_dtype = 'int3'"):
        Deployment.build("llama-3-8b", "h100", kv_dtype="int3")
    assert np.isclose(DTYPE_BYTES["fp8"], 1.0)


def _swap_config(blocks: int, space_gb: float = 4.0, scheduler: dict | None = None, seed: int = 0, n: int = 80):
    work = [{"arrival": {"kind": "poisson", "rate": 40.0}, "num_requests": n,
             "lengths": {"kind": "uniform", "prompt": [50, 1200], "output": [20, 400]}}]
    return config(workloads=work, kv_cache={"num_blocks": blocks, "preemption": "swap", "swap_space_gb": space_gb},
                  max_model_len=2048, scheduler=scheduler or {"name": "vllm_v1", "max_num_batched_tokens": 1024},
                  seed=seed)


def test_swapped_requests_resume_without_recomputing() -> None:
    """With room in host memory every preemption swaps, and every token is computed exactly once."""
    res = simulate(_swap_config(200))
    s, steps, req = res.summary, res.steps, res.requests
    assert s["preemptions"] > 0 and s["preemptions_swapped"] == s["preemptions"]
    assert steps["prefill_tokens"].sum() + steps["decode_tokens"].sum() == \
        req["prompt_tokens"].sum() + req["output_tokens"].sum() - len(req)
    recompute = simulate(_swap_config(200).model_copy(update={"kv_cache": _swap_config(200).kv_cache.model_copy(
        update={"preemption": "recompute"})}))
    redone = recompute.steps["prefill_tokens"].sum() + recompute.steps["decode_tokens"].sum()
    assert redone > req["prompt_tokens"].sum() + req["output_tokens"].sum() - len(req)


def test_a_full_swap_space_falls_back_to_recompute() -> None:
    s = simulate(_swap_config(200, space_gb=0.001)).summary  # 0.001 GB holds 7 tokens: not one block
    assert s["preemptions"] > 0 and s["preemptions_swapped"] == 0


def test_swap_copies_are_priced_over_the_host_link() -> None:
    from policies.batch import Batch
    from sim.executor import CostModelExecutor

    dep = Deployment.build("llama-3-8b", "h100")
    executor = CostModelExecutor(CostModel(dep))
    batch = Batch(decode_ids=np.arange(8), decode_computed=np.full(8, 500))
    plain = executor.run(batch).seconds
    swapped = executor.run(Batch(decode_ids=batch.decode_ids, decode_computed=batch.decode_computed,
                                 swap_in_tokens=3200, swap_out_tokens=1600)).seconds
    assert dep.host_link.id == "pcie5-x16"
    assert swapped - plain == pytest.approx(2e-6 + 4800 * 131072 / (63e9 * 0.8))


@pytest.mark.parametrize("scheduler", [{"name": "vllm"}, {"name": "vllm_v1", "max_num_batched_tokens": 512},
                                       {"name": "sarathi", "token_budget": 256}, {"name": "layered_prefill"}])
@pytest.mark.parametrize("blocks, space", [(130, 4.0), (150, 0.05), (300, 1.0)])
def test_blocks_are_conserved_across_gpu_and_host(monkeypatch, scheduler, blocks, space) -> None:
    import policies

    original = policies.make_scheduler
    monkeypatch.setattr("sim.engine.make_scheduler", lambda params: CheckedBlocks(original(params)))
    cfg = _swap_config(blocks, space, scheduler, n=50)
    res = simulate(cfg)
    check_conservation(cfg, res)
    assert (res.requests["status"] == "finished").all()


def _prompts_config(host_gb: float, blocks: int = 300, seed: int = 0):
    """40 system prompts of 1,000 tokens shared by 300 requests: more prompts than the GPU cache keeps."""
    work = [{"arrival": {"kind": "poisson", "rate": 8.0}, "num_requests": 300,
             "lengths": {"kind": "uniform", "prompt": [100, 400], "output": [5, 40]},
             "shared_prefix": {"tokens": 1000, "fraction": 1.0, "prompts": 40}}]
    return config(workloads=work, kv_cache={"num_blocks": blocks, "prefix_caching": True, "host_cache_gb": host_gb},
                  max_model_len=4096, scheduler={"name": "vllm_v1", "max_num_batched_tokens": 2048}, seed=seed)


def test_the_host_tier_keeps_evicted_prefixes_and_loads_them_back(monkeypatch) -> None:
    import policies

    original = policies.make_scheduler
    monkeypatch.setattr("sim.engine.make_scheduler", lambda params: CheckedBlocks(original(params)))
    gpu_only, tiered = simulate(_prompts_config(0.0)), simulate(_prompts_config(8.0))
    check_conservation(_prompts_config(8.0), tiered)
    a, b = gpu_only.summary, tiered.summary
    assert "prefix_cache_host_hit_rate" not in a and b["prefix_cache_host_hit_rate"] > 0.2
    assert b["prefix_cache_block_hit_rate"] > a["prefix_cache_block_hit_rate"] + 0.2
    assert b["prefill_tokens_saved"] > a["prefill_tokens_saved"]
    assert b["prefix_cache_gpu_hit_rate"] + b["prefix_cache_host_hit_rate"] == pytest.approx(
        b["prefix_cache_block_hit_rate"])


def test_a_small_host_tier_keeps_fewer_prefixes(monkeypatch) -> None:
    """0.05 GB holds 23 blocks of Llama-3-8B's KV (about one system prompt): the least recently spilled are
    dropped, and fewer hits come back than from 8 GB."""
    import policies

    original = policies.make_scheduler
    monkeypatch.setattr("sim.engine.make_scheduler", lambda params: CheckedBlocks(original(params)))
    small, large = simulate(_prompts_config(0.05)).summary, simulate(_prompts_config(8.0)).summary
    assert small["prefix_cache_host_hit_rate"] < large["prefix_cache_host_hit_rate"]


def test_host_cache_needs_prefix_caching() -> None:
    with pytest.raises(ValueError, match="host_cache_gb = 4.0: the host tier holds prefix-cache blocks"):
        config(kv_cache={"host_cache_gb": 4.0})
