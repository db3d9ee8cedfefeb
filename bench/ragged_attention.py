"""Ragged decode batches: the cost model's decode attention against the kernel timed on ragged batches.

Run: python bench/ragged_attention.py calibrate/measurements/raw/h100-sxm-80gb_attention_raw.json [...] --gpu h100

The attention suite times, per head configuration, batches of 2, 16 and 128 decodes with lognormal contexts
(records marked `ragged`, with their mean and longest context). Each is priced twice with the GPU's
committed profile: at its mean context alone (a uniform batch) and as the cost model prices it (at least
one wave of sequences at the longest context, `CostModel._longest_decode`). Prints the median and range of
the errors per batch size.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from hardware.catalog import get_gpu
from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.operators import StepShape
from hardware.profiles import packaged_profile

MODELS = ("llama-3-8b", "llama-3-70b", "qwen2.5-7b", "llama-2-7b")


def models_by_heads(gpu: str) -> dict[tuple[int, int], CostModel]:
    """A cost model (one layer's attention is what is compared) per (heads, KV heads) per GPU."""
    out: dict[tuple[int, int], CostModel] = {}
    profile = packaged_profile(get_gpu(gpu).id)
    for mid in MODELS:
        for tp in (1, 2, 4, 8):
            try:
                dep = Deployment.build(mid, gpu, tp=tp)
            except ServesimError:  # TP does not divide the heads
                continue
            out.setdefault((dep.heads_per_gpu, dep.kv_heads_per_gpu), CostModel(dep, profile))
    return out


def attention_seconds(model: CostModel, shape: StepShape) -> float:
    """One layer's decode attention kernel (GPU seconds, with its launches)."""
    op = next(o for o in model.price(shape).breakdown if o.name == "attention_decode")
    return op.seconds / op.count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", nargs="+")
    ap.add_argument("--gpu", required=True)
    args = ap.parse_args()
    models = models_by_heads(args.gpu)
    errors: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in args.raw:
        for r in json.loads(open(path).read())["records"]:
            if not (r.get("ragged") and r["kind"] == "attention-decode" and "longest" in r):
                continue
            model = models.get((r["heads"], r["kv_heads"]))
            if model is None:
                continue
            b, mean, longest = r["seqs"], r["y"], r["longest"]
            rest = (b * mean - longest) / (b - 1) if b > 1 else mean
            ragged = StepShape.build(decode=[longest - 1] + [max(1, round(rest)) - 1] * (b - 1))
            uniform = StepShape.build(decode=[max(1, round(mean)) - 1] * b)
            for name, shape in (("mean context", uniform), ("cost model", ragged)):
                errors[b][name].append(attention_seconds(model, shape) / r["seconds"] - 1.0)
    print(f"{'batch':>5} {'records':>7}  {'priced at':<13} {'median':>7}  range")
    for b, by in sorted(errors.items()):
        for name, e in by.items():
            a = np.array(e)
            print(f"{b:>5} {a.size:>7}  {name:<13} {np.median(a):+7.1%}  {a.min():+.1%} .. {a.max():+.1%}")


if __name__ == "__main__":
    main()
