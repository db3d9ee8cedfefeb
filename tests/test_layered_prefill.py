"""Layered prefill (arXiv 2510.08055): prompts pass through the layer groups one step at a time, beside
every decode, and an MoE layer's experts are read once per prompt rather than once per chunk."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.operators import StepShape
from policies.batch import Batch
from sim.executor import CostModelExecutor
from tests.test_chunked_prefill import WORK, run_recorded, sched
from tests.test_engine import check_conservation, config


@pytest.mark.parametrize("groups, cohort", [(4, 2048), (1, 512), (3, 300)])
def test_each_chunk_runs_through_every_group_once_and_decodes_never_wait(groups: int, cohort: int) -> None:
    cfg = config(scheduler=sched("layered_prefill", layer_groups=groups, max_prefill_tokens=cohort, max_num_seqs=12),
                 workloads=WORK)
    res, (rec,) = run_recorded(cfg)
    check_conservation(cfg, res)
    req = res.requests.set_index("request_id")
    passes: dict[tuple[int, int], int] = defaultdict(int)
    last: dict[int, int] = {}
    for step, b in enumerate(rec.batches):
        assert b.num_prefill_tokens <= cohort and b.num_requests <= 12
        if b.prefill_ids.size:
            assert b.prefill_layers == pytest.approx(1 / groups)
        for rid, before in zip(b.prefill_ids.tolist(), b.prefill_computed.tolist()):
            passes[rid, before] += 1
            last[rid] = step
        decoding = set(b.decode_ids.tolist())
        assert not decoding & set(b.prefill_ids.tolist())
    assert set(passes.values()) == {groups}  # every chunk through each group exactly once
    steps = res.steps
    end = (steps["start_s"] + steps["duration_s"]).to_numpy()
    for rid, step in last.items():
        assert req.loc[rid, "first_token_s"] == end[step]  # the first token after the last group of the last chunk
    chunks = defaultdict(int)
    for rid, _ in passes:
        chunks[rid] += 1
    assert max(chunks.values()) > 1 or cohort >= 1500  # long prompts are cut into chunks of max_prefill_tokens


def test_a_layered_step_costs_its_share_of_the_mixed_step_plus_the_decodes_alone() -> None:
    model = CostModel(Deployment.build("qwen3-30b-a3b", "h100"))
    executor = CostModelExecutor(model)
    batch = Batch.make([0], [3000], decode_ids=np.arange(1, 33), decode_computed=np.full(32, 900))
    layered = executor.run(Batch(**{**{f: getattr(batch, f) for f in batch.__slots__}, "prefill_layers": 0.25}))
    mixed = model.price(batch.shape()).seconds
    alone = model.price(StepShape.build(decode=[900] * 32)).seconds
    assert layered.seconds == pytest.approx(0.25 * mixed + 0.75 * alone)


def test_expert_weights_are_read_once_per_prompt_not_once_per_chunk() -> None:
    """A 4,096-token prompt on Qwen3-30B-A3B: chunked in eight 512-token steps every chunk hits nearly every
    expert and reads its weights again; layered, the whole prompt passes each layer once."""
    model = CostModel(Deployment.build("qwen3-30b-a3b", "h100"))

    def expert_bytes(shape: StepShape, share: float = 1.0) -> float:
        return share * sum(r.bytes for r in model.price(shape).breakdown if r.name in ("moe_gate_up", "moe_down"))

    chunked = sum(expert_bytes(StepShape.build(prefill=[512], prefill_cached=[512 * i])) for i in range(8))
    layered = sum(expert_bytes(StepShape.build(prefill=[4096]), 0.25) for _ in range(4))
    weights = 48 * 128 * 3 * 2048 * 768 * 2  # every expert of every layer, bf16
    # the same token slots (activation bytes) either way; chunked reads every expert seven more times
    assert chunked - layered == pytest.approx(7 * weights, rel=0.01)


def test_layered_prefill_is_deterministic_and_simulated_only() -> None:
    cfg = config(scheduler=sched("layered_prefill"), workloads=WORK, kv_cache={"prefix_caching": True})
    a, b = run_recorded(cfg)[0], run_recorded(cfg)[0]
    assert a.summary == b.summary and a.requests.equals(b.requests)
