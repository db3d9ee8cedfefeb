"""The backend's fused MoE path (`MoE.forward_fused`: Triton routing, permutation and sum around grouped_mm)
against its plain-PyTorch path (`MoE.forward_torch`), on a GPU at real MoE shapes, bf16: Qwen3-30B-A3B
(hidden 2048, 128 experts, top 8, expert intermediate 768) and Qwen1.5-MoE-A2.7B (60 experts, top 4, a
gated shared expert), at 1, 64 and 4,096 tokens. Per case: tokens routed differently (only where weights
tie), the largest output difference on the others relative to the output's largest value, the CUDA-graph
replay's difference from eager, and each path's time eager and as a CUDA graph (CUDA events, median of 20
after warm-up); then each path's kernels per layer (torch.profiler, 64 tokens).

Run: python calibrate/moe_check.py              (CUDA; well under a minute on an H100)
     python calibrate/moe_check.py --cpu-smoke  (tiny shapes on CPU, the kernels in Triton's interpreter)
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from calibrate.timing import capture_graph  # noqa: E402

GPU_MODELS = ("qwen3-30b-a3b", "qwen1.5-moe-a2.7b")
GPU_TOKENS = (1, 64, 4096)
SMOKE_TOKENS = (1, 5, 37)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}  # of the output's largest magnitude


def build(spec, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """An MoE layer of `spec` with random weights (normal, std 1/sqrt(fan-in), as `build_model`)."""
    from backend.moe import MoE

    torch.manual_seed(seed)
    with torch.device(device):
        moe = MoE(spec).to(dtype).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, p.shape[1] ** -0.5)  # fan-in: (out, in) linears, (experts, in, out) stacks
    return moe


def timed(fn: Callable[[], object], cuda: bool, reps: int, warm: int) -> float:
    """Median microseconds of `fn` over `reps` calls after `warm` calls (CUDA events on a GPU)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)




def kernels_per_layer(fn: Callable[[], object]) -> list[str]:
    """Names of the GPU kernels and memsets one call of `fn` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def check(moe, x: torch.Tensor, reps: int, warm: int) -> tuple[dict[str, float], bool]:
    """One case's differences and times; whether it passes."""
    from backend.moe import topk_softmax

    cuda = x.is_cuda
    torch_y, fused_y = moe.forward_torch(x), moe.forward_fused(x)
    w_t, ids_t = moe.route(x)
    counts = torch.zeros(moe.num_experts, dtype=torch.int32, device=x.device)
    w_f, ids_f, _ = topk_softmax(moe.gate(x), moe.top_k, moe.renormalize, counts)
    alike = (ids_t.sort(1).values == ids_f.long().sort(1).values).all(1)
    ties_only = torch.allclose(w_t.sort(1).values, w_f.sort(1).values, atol=1e-6, rtol=1e-5)
    scale = torch_y.float().abs().max().clamp_min(1e-30)
    err = float((fused_y - torch_y)[alike].float().abs().max() / scale) if alike.any() else 0.0
    row = {"tokens": x.shape[0], "routed_apart": int((~alike).sum()), "rel_err": err,
           "torch_us": timed(lambda: moe.forward_torch(x), cuda, reps, warm),
           "fused_us": timed(lambda: moe.forward_fused(x), cuda, reps, warm)}
    ok = ties_only and err <= TOLERANCE[x.dtype] and int(counts.sum()) == x.shape[0] * moe.top_k
    if cuda:
        graph_t, _ = capture_graph(lambda: moe.forward_torch(x))
        graph_f, out = capture_graph(lambda: moe.forward_fused(x))
        graph_f.replay()
        row["graph_err"] = float((out - fused_y).float().abs().max() / scale)
        row["torch_graph_us"] = timed(graph_t.replay, cuda, reps, warm)
        row["fused_graph_us"] = timed(graph_f.replay, cuda, reps, warm)
        ok = ok and row["graph_err"] <= TOLERANCE[x.dtype]
    return row, ok


def smoke_specs() -> list:
    """Tiny Qwen2-MoE (gated shared expert, top-k weights kept) and Qwen3-MoE (renormalised) layers."""
    from hardware.catalog import get_model

    tiny = get_model("tiny-moe").model_copy(update={
        "id": "tiny-qwen2-moe", "hidden_size": 64, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "num_local_experts": 12, "num_experts_per_tok": 4})
    return [tiny, tiny.model_copy(update={"id": "tiny-qwen3-moe", "model_type": "qwen3_moe",
                                          "shared_expert_intermediate_size": 0})]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    parser.add_argument("--models", default=",".join(GPU_MODELS), help="catalog models (GPU run)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported, just below
    from backend import kernels
    from hardware.catalog import get_model

    if not kernels.available():
        print("moe_check: Triton is not installed")
        return 1
    if smoke:
        device, dtype, reps, warm = torch.device("cpu"), torch.float32, 2, 0
        specs, token_counts = smoke_specs(), SMOKE_TOKENS
        print(f"moe_check --cpu-smoke: {torch.__version__}, kernels in Triton's interpreter, float32")
    else:
        device, dtype, reps, warm = torch.device("cuda"), torch.bfloat16, 20, 5
        specs, token_counts = [get_model(m) for m in args.models.split(",")], GPU_TOKENS
        print(f"moe_check on {torch.cuda.get_device_name(0)}: torch {torch.__version__}, bfloat16")
    failed = 0
    with torch.inference_mode(), kernels.kernels_on_cpu() if smoke else contextlib.nullcontext():
        for spec in specs:
            moe = build(spec, device, dtype)
            print(f"\n{spec.id}: hidden {spec.hidden_size}, {spec.num_experts} experts, top {spec.experts_per_token}, "
                  f"expert intermediate {spec.expert_intermediate_size}, shared {spec.shared_intermediate_size}, "
                  f"renormalize {moe.renormalize}")
            gen = torch.Generator(device=device).manual_seed(1)
            for t in token_counts:
                x = torch.randn(t, spec.hidden_size, generator=gen, device=device).to(dtype)
                row, ok = check(moe, x, reps, warm)
                failed += not ok
                speed = f"fused/torch eager {row['fused_us'] / row['torch_us']:.2f}"
                if "fused_graph_us" in row:
                    speed += f", graph {row['fused_graph_us'] / row['torch_graph_us']:.2f}"
                cells = [f"{k} {v:.1f}" if k.endswith("_us") else f"{k} {v:.1e}" if isinstance(v, float)
                         else f"{k} {v}" for k, v in row.items()]
                print("  " + "  ".join(cells) + f"  ({speed}) {'ok' if ok else 'FAILED'}")
            if not smoke:
                x = torch.randn(64, spec.hidden_size, device=device, dtype=dtype)
                for name, fn in (("torch", moe.forward_torch), ("fused", moe.forward_fused)):
                    try:
                        names = kernels_per_layer(lambda fn=fn: fn(x))
                        print(f"  kernels per layer, {name}: {len(names)}: {', '.join(n[:40] for n in names)}")
                    except Exception as exc:  # the profiler's event API differs across releases
                        print(f"  kernels per layer, {name}: unavailable ({exc})")
            del moe
    print(f"\nmoe_check: {'all ok' if not failed else f'{failed} case(s) FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
