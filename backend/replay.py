"""Replay: the simulator's config, workload and policy objects, run for real on one device by wall clock.

The simulator's own engine (`sim.engine.drive`: its replica loop, router, speculation wrapper and step log); only the
executor (`TorchExecutor`) and the clock (`sim.clock.WallClock`) differ. Arrivals are released at their times
(with `asap`, idle gaps are skipped: the clock jumps to the next event when nothing can run). Every step's
batch shape is kept so `servesim validate` can re-price exactly these steps with the cost model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from backend.executor import TorchExecutor
from backend.kernels import CompileWatch
from hardware.catalog import get_model
from hardware.errors import ServesimError
from hardware.operators import StepShape
from policies.batch import Batch
from policies.speculation import DraftModel
from sim.clock import WallClock
from sim.config import SimConfig
from sim.engine import drive
from sim.executor import StepOutcome
from sim.metrics import Results
from sim.setup import prepare


def free_memory(device: str) -> float:
    """Bytes free on the device (host RAM for cpu)."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class _Recorded:
    """The torch executor, each step's shape kept (what `servesim validate` re-prices) and each step's CUDA-graph
    captures left out of the wall clock (a server captures its graphs at start)."""

    def __init__(self, executor: TorchExecutor, clock: WallClock) -> None:
        self.executor, self.clock = executor, clock
        self.shapes: list[StepShape] = []

    def run(self, batch: Batch) -> StepOutcome:
        outcome = self.executor.run(batch)
        self.clock.skip(self.executor.capture_seconds)
        self.shapes.append(batch.shape())
        return outcome


def replay(config: SimConfig, device: str = "cpu", asap: bool = False, temperature: float = 0.0,
           checkpoint: str | None = None, acceptance: str = "oracle"
           ) -> tuple[Results, TorchExecutor, list[StepShape]]:
    """Run `config` on a real device; returns its results, the executor (tokens) and every step's shape.
    With speculation, `acceptance` "oracle" forces the simulator's drawn acceptance counts (random weights
    never agree) and "model" applies the real lossless rule to the draft's proposals."""
    hw = config.hardware
    if config.cluster.replicas != 1 or hw.tp != 1 or hw.pp != 1:
        raise ServesimError(f"replay runs one replica on one device: cluster.replicas = {config.cluster.replicas}, "
                            f"hardware.tp = {hw.tp}, hardware.pp = {hw.pp}; allowed: 1")
    if config.scheduler.name == "layered_prefill":
        raise ServesimError("replay: scheduler.name = 'layered_prefill' is simulated only; the backend runs every "
                            "layer of a step's prefills (use vllm, vllm_v1, sarathi, orca or static)")
    if config.disaggregation is not None:
        raise ServesimError("replay: disaggregation is simulated only; the backend replays one colocated replica "
                            "(remove the disaggregation section)")
    ran = {"kv_access": "paged", "elementwise": "fused", "weight_dtype": "bf16", "kv_dtype": "bf16"}
    for field, value in ran.items():  # the backend runs one engine: a config describing another is refused
        if getattr(hw, field) != value:
            raise ServesimError(f"replay: hardware.{field} = {getattr(hw, field)!r} is simulated only; the backend "
                                f"runs {field} {value!r} (set it, and the same for `servesim run`)")
    spec = config.speculation
    if spec is not None and not isinstance(spec.draft, DraftModel):
        raise ServesimError(f"replay: speculation.draft.kind = {spec.draft.kind!r} is simulated only; the backend "
                            "runs kind 'draft_model'")
    if spec is not None and isinstance(spec.draft, DraftModel) and spec.draft.kv_window is not None:
        raise ServesimError("replay: speculation.draft.kv_window is simulated only; the backend's draft attends "
                            "to the whole context (remove kv_window)")
    for i, w in enumerate(config.workloads):
        if w.arrival.kind == "closed_loop" or w.sessions is not None:
            what = "arrival.kind = 'closed_loop'" if w.sessions is None else "sessions"
            raise ServesimError(f"replay: workloads.{i}.{what} is simulated only; the backend replays arrivals "
                                "known in advance (poisson, gamma, constant, burst, trace)")
        if w.fan_out is not None:
            raise ServesimError(f"replay: workloads.{i}.fan_out is simulated only; the backend's block tables do not "
                                "share a prompt's blocks between samples (remove fan_out)")
    if acceptance not in ("oracle", "model"):
        raise ServesimError(f"replay: acceptance = {acceptance!r}; allowed: oracle, model")
    if config.kv_cache.host_cache_gb:
        raise ServesimError(f"replay: kv_cache.host_cache_gb = {config.kv_cache.host_cache_gb} is simulated only; the "
                            "backend's prefix cache lives on the device (set it to 0)")
    setup = prepare(config)
    requests = setup.requests
    spec_model = setup.deployment.model
    cache_bytes = setup.num_blocks * config.kv_cache.block_size * spec_model.kv_bytes_per_token(
        "bf16" if device.startswith("cuda") else "fp32")
    if cache_bytes > 0.9 * free_memory(device):
        raise ServesimError(f"replay: the KV cache of {setup.num_blocks} blocks ({cache_bytes / 1e9:.2f} GB) does "
                            f"not fit the free memory of {device} ({free_memory(device) / 1e9:.2f} GB); set "
                            "kv_cache.num_blocks, and the same value for `servesim run`")
    (state,) = setup.replica_states()
    draft = get_model(spec.draft.model) if spec is not None and isinstance(spec.draft, DraftModel) else None
    if draft is not None and draft.vocab_size != spec_model.vocab_size:
        raise ServesimError(f"replay: the draft {draft.id} has vocab_size {draft.vocab_size}, the target "
                            f"{spec_model.vocab_size}; a draft must share the target's vocabulary")
    executor = TorchExecutor(setup.deployment.model, requests, setup.num_blocks, config.kv_cache.block_size,
                             device, config.seed, temperature, checkpoint, hw.cuda_graphs, draft=draft,
                             oracle=setup.acceptance if acceptance == "oracle" else None)
    if config.kv_cache.prefix_caching:  # the executor follows the cache's changes to share physical blocks
        executor.journal = state.kv.keep_journal()
    executor.warm_up(setup.deployment.max_num_batched_tokens)
    clock = WallClock(asap)
    recorded = _Recorded(executor, clock)
    with CompileWatch() as compiles:  # kernels compiled in steps' time (none after the warm-up, we expect)
        results = drive(setup, clock, lambda dep: recorded, skip_ahead=False, states=[state])
    executor.sync_tables()  # the last steps' finished requests give their blocks back
    results.summary["replay_kernel_compiles"] = len(compiles.kernels)
    results.summary["replay_kernel_compile_s"] = compiles.seconds
    return results, executor, recorded.shapes


def write_shapes(shapes: list[StepShape], path: str | Path) -> None:
    """Each step's batch shape, one JSON line per step (what `servesim validate` re-prices)."""
    with open(path, "w") as f:
        for s in shapes:
            f.write(json.dumps(s.to_dict()) + "\n")

