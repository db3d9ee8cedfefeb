"""KV memory options (issue 26): integer-quantized KV with group scales, and KV eviction to a token budget."""

from __future__ import annotations

import numpy as np
import pytest

from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.operators import StepShape
from hardware.specs import DTYPE_BYTES
from sim.engine import build_pools, simulate
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
