"""Eager steps: the host issues kernels while the GPU runs them. The closed form over one decoder layer equals
the kernel-by-kernel recurrence; steps are priced between their host's dispatch and GPU work and their sum;
the fit inverts the window for the host's seconds per kernel."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrate.fit import dispatch_per_kernel
from hardware.cost import CostModel, dispatch_segments, pipelined_seconds, step_operators
from hardware.deployment import Deployment
from hardware.operators import StepShape, StepTotals
from hardware.profile import DEFAULT_PROFILE


def recurrence(h: np.ndarray, g: np.ndarray, k: np.ndarray, a: int, b: int, layers: int) -> float:
    """Kernel by kernel: each operator's kernels share its host and GPU time; kernel j starts once the host
    has issued it and the GPU has finished kernel j - 1."""
    ops = [*range(a), *[i for _ in range(layers) for i in range(a, b)], *range(b, len(h))]
    issued = done = 0.0
    for i in ops:
        n = max(int(k[i]), 1)
        for _ in range(n):
            issued += h[i] / n
            done = max(done, issued) + g[i] / n
    return done


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 12), st.integers(0, 4), st.integers(1, 40),
       st.floats(0.05, 20.0))
def test_closed_form_equals_the_recurrence(seed: int, before: int, layer: int, after: int, layers: int,
                                           gpu_scale: float) -> None:
    rng = np.random.default_rng(seed)
    n = before + layer + after
    k = rng.integers(0, 8, n).astype(float)
    h = rng.exponential(1.0, n) * (k > 0)  # an operator without kernels (absent) costs nothing
    g = rng.exponential(gpu_scale, n) * (k > 0)
    a, b = before, before + layer
    assert pipelined_seconds(h, g, k, a, b, layers) == pytest.approx(recurrence(h, g, k, a, b, layers), rel=1e-9)


def test_segments_cover_every_operator_in_issue_order() -> None:
    for model, tp, pp, access in (("llama-3-8b", 1, 1, "gather"), ("llama-3-8b", 2, 2, "paged"),
                                  ("mixtral-8x7b", 2, 1, "gather"), ("llama-3-70b", 4, 4, "paged")):
        dep = Deployment.build(model, "h100", tp=tp, pp=pp, kv_access=access)
        t = StepTotals.of(StepShape.build(prefill=[64], decode=[100, 200]))
        ops = step_operators(dep, t, float(t.tokens))
        segments = dispatch_segments(dep)
        order = np.concatenate([np.concatenate([first, layer, last]) for first, layer, last, _ in segments])
        assert sorted(order.tolist()) == list(range(len(ops)))
        first, layer, last, n = segments[0]
        assert ops[first[0]][0].name == "embedding" and n == dep.layers_per_stage[0]
        moe = dep.model.moe_layers(dep.stage_layers(0))
        per_kind = {"all": n, "moe": moe, "dense": n - moe}  # layer operators, counted per layer of their kind
        assert all(ops[i][1] == per_kind[ops[i][0].layers] * ops[i][0].count for i in layer)
        names = [ops[i][0].name for i in layer]
        if access == "gather":
            assert names.index("kv_gather_prefill") < names.index("attention_prefill") < names.index("kv_gather_decode")
        else:
            assert names.index("attention_prefill") < names.index("attention_decode")
            assert "kv_gather_decode" not in names
        assert [ops[i][0].name for i in segments[-1][2]][-1] == "sampling"


SLOW_HOST = DEFAULT_PROFILE.model_copy(update={"overheads": DEFAULT_PROFILE.overheads.model_copy(
    update={"launch_eager": 20e-6})})  # a lent H100's host: 20 us per kernel


def test_eager_steps_lie_between_the_longer_and_the_sum_of_host_and_gpu() -> None:
    dep = Deployment.build("llama-3-8b", "h100")
    model = CostModel(dep, SLOW_HOST, cuda_graphs=False)
    ovh = SLOW_HOST.overheads
    for shape in (StepShape.build(decode=[100]), StepShape.build(prefill=[300], decode=[500] * 60),
                  StepShape.build(prefill=[8192])):
        cost = model.price(shape)
        host = cost.kernels * ovh.launch_eager
        window = sum(cost.stage_seconds)
        assert max(host, cost.kernel_seconds) <= window <= host + cost.kernel_seconds
        assert cost.seconds == pytest.approx(window + cost.overhead_seconds)
    # A host-bound step ends one kernel after its host (here the sampling's); a long prefill one dispatch
    # after its kernels
    decode = model.price(StepShape.build(decode=[100]))
    assert sum(decode.stage_seconds) < decode.kernels * ovh.launch_eager * 1.1
    prefill = model.price(StepShape.build(prefill=[8192]))
    assert sum(prefill.stage_seconds) == pytest.approx(prefill.kernel_seconds, rel=1e-3)


def test_slower_host_makes_a_balanced_step_wait_more_than_the_longer_of_the_two() -> None:
    """Where host and GPU time are close, the GPU waits in the layers' host-heavy parts (the attention's
    small kernels) and the host in their GPU-heavy ones (the MLP's GEMMs): the window exceeds both."""
    dep = Deployment.build("llama-3-8b", "h100")
    model = CostModel(dep, DEFAULT_PROFILE, cuda_graphs=False)
    shape = StepShape.build(prefill=[700], decode=[600] * 40)
    cost = model.price(shape)
    launch = cost.kernel_seconds / cost.kernels  # host and GPU take the same time
    assert model.eager_window(cost, launch) > 1.02 * cost.kernel_seconds


@pytest.mark.parametrize("shape", [StepShape.build(decode=[63]), StepShape.build(prefill=[32], decode=[63] * 8),
                                   StepShape.build(prefill=[500])])
def test_the_fit_inverts_the_window_for_the_dispatch_per_kernel(shape: StepShape) -> None:
    dep = Deployment.build("llama-3-8b", "h100")
    model = CostModel(dep, DEFAULT_PROFILE, cuda_graphs=False)
    cost = model.price(shape)
    window = model.eager_window(cost, 20e-6)
    assert dispatch_per_kernel(model, shape, window) == pytest.approx(20e-6, rel=1e-6)
    assert dispatch_per_kernel(model, shape, 0.5 * model.eager_window(cost, 0.0)) == 0.0  # the GPU alone is slower
