"""Whole-model reference steps: the backend's model (random weights) timed step by step through the same
`TorchExecutor` a replay uses, over prefill, decode and mixed shapes, eager and with CUDA graphs (decodes, and
steps of up to 512 tokens with prefill chunks).

The shapes are deliberately off the microbenchmark grids (odd prompt lengths, batch sizes and contexts),
so that checking the cost model against them is not circular. With TP > 1 the model is sharded over one
process per GPU (`backend.parallel`) and rank 0 times. Each row: category, execution, TP, the
step shape (JSON), wall seconds (what the cost model predicts: CPU overhead included) and GPU seconds
(CUDA events around the forward pass and sampling), each as the median and the fast-phase statistic over
rounds spread in time (`calibrate.steps.StepTiming`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import pandas as pd

from backend.parallel import Shard
from calibrate.microbench import overhead_record, overhead_shapes
from calibrate.ranks import on_ranks
from calibrate.records import PAGED_ENGINE
from calibrate.steps import StepRunner, agreed_blocks, release_memory
from hardware.catalog import get_model
from hardware.cost import graph_rows
from hardware.operators import StepShape

PREFILL = (131, 397, 1000, 2900, 6000, 11000, 16000)
DECODE_BATCH = (1, 3, 13, 37, 90, 200, 256)
DECODE_CONTEXT = (300, 1100, 3000, 7000, 16000)
# (chunk, cached before it, decodes, their context); those of at most 512 tokens also run as mixed CUDA graphs
MIXED = ((500, 0, 7, 700), (1500, 2000, 30, 1300), (300, 6000, 60, 500), (2000, 0, 120, 900),
         (61, 0, 9, 450), (230, 1100, 19, 1700), (449, 2600, 47, 830), (90, 0, 170, 610))
REPEATS = 15  # rounds over all shapes: about a minute on a GPU, so that slow host phases are sampled


def shapes(quick: bool, capacity: int) -> list[tuple[str, StepShape]]:
    """(category, shape) pairs that fit a cache of `capacity` tokens."""
    if quick:
        out = [("prefill", StepShape.build(prefill=[n])) for n in (7, 45)]
        out += [("decode", StepShape.build(decode=[c] * b)) for b in (1, 5) for c in (9, 40)]
        out.append(("mixed", StepShape.build(prefill=[20], prefill_cached=[13], decode=[30, 11])))
        return out
    out = [("prefill", StepShape.build(prefill=[n])) for n in PREFILL]
    out += [("decode", StepShape.build(decode=[c] * b)) for b in DECODE_BATCH for c in DECODE_CONTEXT
            if b * (c + 17) <= capacity]
    for chunk, cached, b, ctx in MIXED:
        out.append(("mixed", StepShape.build(prefill=[chunk], prefill_cached=[cached], decode=[ctx] * b)))
    return out


def measure(model: str, device: str, quick: bool, log: Callable[[str], None] = print, tp: int = 1,
            overheads: bool = False) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Every reference shape, eager and (decode on CUDA) with CUDA graphs; with `tp` > 1, one process per
    rank (`calibrate.ranks`), timed on rank 0. With `overheads`, the overhead fit's whole steps
    (`calibrate.microbench.overhead_shapes`) run in the same rounds and come back as raw step records
    (the lent hosts' speed drifts over minutes: steps timed in the same rounds share it)."""
    job = partial(_measure, model, quick, overheads)
    rows = job(device, Shard(), log) if tp == 1 else on_ranks(job, tp, device)
    steps = [r for r in rows if "layers" in r]
    return pd.DataFrame([r for r in rows if "layers" not in r]), steps


def _measure(model: str, quick: bool, overheads: bool, device: str, shard: Shard,
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    spec = get_model(model)
    blocks = agreed_blocks(spec, device, shard)
    rows = []
    modes = (False, True) if device.startswith("cuda") else (False,)
    for graphs in modes:
        runner = StepRunner(spec, device, blocks, cuda_graphs=graphs, max_requests=512, shard=shard)
        cases = [(c, shape) for c, shape in shapes(quick, runner.capacity) if not graphs or c == "decode"
                 or graph_rows("mixed", shape.num_tokens, shape.prefill_tokens.size) is not None]
        extra = overhead_shapes(quick, graphs) if overheads else []
        timed = runner.time([shape for _, shape in cases] + extra, repeats=3 if quick else REPEATS)
        for (category, shape), t in zip(cases, timed):
            rows.append({"model": spec.id, "category": category, "execution": t.execution, "tp": shard.size,
                         **PAGED_ENGINE, "shape": json.dumps(shape.to_dict()), **t.columns()})
            log(f"{category} {t.execution} {shape.num_requests} requests: {t.seconds * 1e3:.2f} ms "
                f"(fast {t.seconds_fast * 1e3:.2f})")
        rows += [overhead_record(spec.id, spec.num_hidden_layers, shard.size, shape, t)
                 for shape, t in zip(extra, timed[len(cases):])]
        del runner
        release_memory(device)
    return rows
