"""Speed of pricing one step: median microseconds per `CostModel.price` call, by batch shape.

Run: python bench/step_cost.py [--repeat 7] [--number 2000] [--profile calibrated|PATH]
The engine prices every simulated step, so this is its inner loop; the cost must not grow with batch size.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import numpy as np

from hardware.cost import CostModel
from hardware.deployment import Deployment
from hardware.operators import StepShape
from hardware.profiles import resolve_profile

SHAPES = {
    "decode x1": StepShape.build(decode=[1000]),
    "decode x64": StepShape.build(decode=np.full(64, 1000)),
    "decode x256": StepShape.build(decode=np.full(256, 1000)),
    "decode x4096": StepShape.build(decode=np.full(4096, 1000)),
    "prefill 2048": StepShape.build(prefill=[2048]),
    "mixed 512 + 200 decodes": StepShape.build(prefill=[512], prefill_cached=[1024], decode=np.full(200, 1500)),
}
DEPLOYMENTS = {
    "llama-3-8b h100 tp1": ("llama-3-8b", "h100", 1, 1),
    "llama-3-70b h100 tp4": ("llama-3-70b", "h100", 4, 1),
    "llama-3.1-405b h200 tp8 pp2": ("llama-3.1-405b", "h200", 8, 2),
    "mixtral-8x7b h100 tp2": ("mixtral-8x7b", "h100", 2, 1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--profile", help="'calibrated' (each GPU's committed profile) or a profile JSON")
    args = ap.parse_args()
    print(f"{'deployment':30s} {'shape':26s} {'us/step (median)':>16s} {'min':>8s}")
    medians = []
    for dname, (model, gpu, tp, pp) in DEPLOYMENTS.items():
        dep = Deployment.build(model, gpu, tp=tp, pp=pp, max_model_len=8192)
        cost_model = CostModel(dep, resolve_profile(args.profile, dep.gpu.id))
        for sname, shape in SHAPES.items():
            runs = timeit.repeat(lambda: cost_model.price(shape), repeat=args.repeat, number=args.number)
            per = [r / args.number * 1e6 for r in runs]
            medians.append(statistics.median(per))
            print(f"{dname:30s} {sname:26s} {statistics.median(per):16.1f} {min(per):8.1f}")
    model, gpu, tp, pp = next(iter(DEPLOYMENTS.values()))  # batch size alone: both decodes eager
    eager = CostModel(Deployment.build(model, gpu, tp=tp, pp=pp, max_model_len=8192),
                      resolve_profile(args.profile, gpu), cuda_graphs=False)
    one, many = (statistics.median(timeit.repeat(lambda: eager.price(SHAPES[s]), repeat=args.repeat,
                                                 number=args.number)) for s in ("decode x1", "decode x4096"))
    print(f"overall median: {statistics.median(medians):.1f} us/step "
          f"({1e6 / statistics.median(medians):,.0f} steps/s); "
          f"decode x4096 / decode x1 ratio (8B, both eager): {many / one:.2f}")


if __name__ == "__main__":
    main()
