"""The `servesim` command line: `run` (simulate), `estimate` (one step's cost), `catalog` (its entries)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibrate.cli import add_parser as calibrate_parser
from hardware.catalog import get_gpu, get_interconnect, get_model, gpu_ids, interconnect_ids, model_ids
from hardware.cost import GRAPH_MODES, CostModel
from hardware.errors import ServesimError
from hardware.files import check_out_dir
from hardware.operators import StepShape
from hardware.profiles import resolve_profile
from servesim.capacity import Horizon

if TYPE_CHECKING:
    from sim.config import SimConfig


# `estimate`'s deployment flags: each one an alias of a field of the run config (`sim.config`), applied as an
# override before any --set. (flag, config field, help)
DEPLOYMENT_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--model", "model", "catalog model id (see `servesim catalog models`) or a config.json"),
    ("--gpu", "hardware.gpu", "catalog GPU id or alias (see `servesim catalog gpus`) or a YAML file"),
    ("--tp", "hardware.tp", "tensor-parallel degree"),
    ("--pp", "hardware.pp", "pipeline-parallel stages"),
    ("--link", "hardware.link", "interconnect for TP collectives (default: the GPU's intra-node link)"),
    ("--pp-link", "hardware.pp_link", "interconnect between pipeline stages"),
    ("--weight-dtype", "hardware.weight_dtype", "bf16, fp16, fp8 or fp32"),
    ("--kv-dtype", "hardware.kv_dtype", "bf16, fp16, fp8, fp32, or int8 / int4 / int2 in groups of 64 with fp16 "
     "scales"),
    ("--kv-token-budget", "hardware.kv_token_budget", "keep at most this many tokens of KV per request "
     "(StreamingLLM / H2O-style eviction)"),
    ("--kv-access", "hardware.kv_access", "how attention reads the paged KV cache: paged (in place, as vLLM and "
     "servesim's backend) or gather (into contiguous buffers first)"),
    ("--elementwise", "hardware.elementwise", "fused (one kernel each for add + RMSNorm, RoPE with the K/V write, "
     "SiLU-mul, as vLLM and servesim's backend) or unfused (PyTorch ops)"),
    ("--dp", "hardware.dp", "MoE: data-parallel attention ranks"),
    ("--ep-link", "hardware.ep_link", "link of the MoE all-to-all (default: the TP link up to 8 GPUs, ib-ndr beyond)"),
    ("--redundant-experts", "hardware.redundant_experts", "EPLB: extra expert replicas"),
    ("--gpu-memory-utilization", "hardware.gpu_memory_utilization", "fraction of HBM usable"),
    ("--max-model-len", "max_model_len", "longest request in tokens (default: the model's maximum)"),
    ("--max-num-batched-tokens", "scheduler.max_num_batched_tokens", "tokens per step (activation memory)"),
    ("--max-num-seqs", "scheduler.max_num_seqs", "requests per step (activation memory)"),
    ("--gpu-price", "hardware.gpu_price", "override the GPU's hourly price in USD"),
    ("--profile", "hardware.profile", "efficiency profile: a JSON file, the GPU id of a committed profile, or "
     "'calibrated' for the GPU's committed one (default: the datasheet defaults)"),
    ("--engine", "hardware.engine", "the serving engine's host costs, named as --profile is (e.g. 'datasheet'), "
     "over the profile's GPU kernels (default: the profile's own engine section)"),
)
DEPLOYMENT_SWITCHES = (("--expert-parallel", "hardware.expert_parallel", "MoE: spread whole experts over tp x dp GPUs"),
                       ("--eplb", "hardware.eplb", "MoE: balance experts over the expert-parallel GPUs"))


def _add_deployment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="scenario YAML whose model, hardware and scheduler limits describe "
                   "the deployment (default: the embedded scenario, as `servesim run`)")
    g = p.add_argument_group("deployment (each flag sets the config field it names; --set sets any)")
    for flag, field, text in DEPLOYMENT_FLAGS:
        g.add_argument(flag, dest=f"field:{field}", metavar=field.rsplit(".", 1)[-1].upper(), help=f"{text} ({field})")
    for flag, field, text in DEPLOYMENT_SWITCHES:
        g.add_argument(flag, dest=f"field:{field}", action="store_const", const="true", help=f"{text} ({field})")
    g.add_argument("--zipf", type=float, help="MoE: Zipf-skewed routing with this exponent (hardware.routing)")
    g.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set hardware.tp=2 (repeatable; after the flags)")


def _estimate_config(args: argparse.Namespace) -> SimConfig:
    """The run config that `estimate`'s arguments describe: the YAML (or the embedded scenario), the flags as
    overrides of the fields they name, then --set."""
    from sim.config import load_config

    flags = [f"{dest[6:]}={value}" for dest, value in vars(args).items()
             if dest.startswith("field:") and value is not None]
    if args.zipf is not None:
        flags += ["hardware.routing.distribution=zipf", f"hardware.routing.zipf_s={args.zipf}"]
    return load_config(args.config, [*flags, *args.set])


def _shape(args: argparse.Namespace) -> StepShape:
    for flag in ("decode", "verify"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ServesimError(f"--{flag} = {value}: the number of requests must be at least 1")
    prefill = args.prefill or []
    cached = args.cached or [0]
    if len(cached) not in (1, len(prefill)):
        raise ServesimError(
            f"--cached: give one value or one per --prefill request ({len(prefill)}), got {len(cached)}")
    if (args.decode or args.verify) and args.context is None:
        raise ServesimError("--context is required with --decode or --verify (tokens of KV per request)")
    if not (prefill or args.decode or args.verify):
        raise ServesimError("nothing to run: give --prefill N, --decode N --context L, or --verify N --context L")
    context = args.context or 0
    return StepShape.build(
        prefill=prefill,
        prefill_cached=cached * len(prefill) if len(cached) == 1 else cached,
        decode=[context] * (args.decode or 0),
        verify=[args.verify_tokens] * (args.verify or 0),
        verify_context=[context] * (args.verify or 0),
    )


def cmd_estimate(args: argparse.Namespace) -> dict[str, Any]:
    from sim.setup import build_deployment

    config = _estimate_config(args)
    dep = build_deployment(config)
    plan = dep.check_fits()
    profile = resolve_profile(config.hardware.profile, dep.gpu.id, config.hardware.engine)
    model = CostModel(dep, profile=profile, cuda_graphs=config.hardware.cuda_graphs)
    shape = _shape(args)
    cost = model.price(shape)
    held = np.concatenate([shape.prefill_tokens + shape.prefill_cached, shape.decode_context + 1,
                           shape.verify_tokens + shape.verify_context])
    kv_needed = int(np.minimum(held, dep.kv_tokens_limit).sum())  # a KV token budget caps each request
    warnings = []
    if kv_needed > plan.kv_capacity_tokens:
        warnings.append(f"the batch holds {kv_needed} tokens of KV but the KV cache has room for "
                        f"{plan.kv_capacity_tokens}: no real server could run this step")
    out: dict[str, Any] = {
        "model": dep.model.id,
        "gpu": dep.gpu.id,
        "tp": dep.tp,
        "pp": dep.pp,
        "dp": dep.dp,
        "expert_parallel": dep.expert_parallel,
        "profile": model.profile.gpu,
        "engine": model.profile.engine_name,
        "execution": cost.execution,
        "seconds": cost.seconds,
        "tokens": cost.tokens,
        "tokens_per_second": cost.tokens / cost.seconds,
        "flops": cost.flops,
        "bytes": cost.bytes,
        "comm_bytes": cost.comm_bytes,
        "mfu": cost.mfu,
        "mbu": cost.mbu,
        "bound": cost.bound,
        "compute_seconds": cost.compute_seconds,
        "memory_seconds": cost.memory_seconds,
        "comm_seconds": cost.comm_seconds,
        "launch_seconds": cost.launch_seconds,
        "overhead_seconds": cost.overhead_seconds,
        "stage_seconds": list(cost.stage_seconds),
        "kernels": cost.kernels,
        "kv_bytes_per_token": dep.model.kv_bytes_per_token(dep.kv_dtype),
        "kv_bytes_per_token_per_gpu": plan.kv_bytes_per_token,
        "kv_capacity_tokens": plan.kv_capacity_tokens,
        "weights_bytes_per_gpu": plan.weights,
        "gpu_price_per_hour": dep.gpu.price_per_hour * dep.num_gpus,
        "warnings": warnings,
    }
    if args.breakdown:
        out["breakdown"] = [asdict(row) for row in cost.breakdown]
    for w in warnings:
        print(f"servesim: warning: {w}", file=sys.stderr)
    return out


def cmd_run(args: argparse.Namespace) -> dict[str, Any] | None:
    check_out_dir(args.out)
    from sim.config import load_config
    from sim.engine import simulate
    from sim.report import format_summary, write_outputs

    if args.trace and not args.out:
        raise ServesimError("--trace writes trace.json into --out: give --out DIR")
    if args.step_rows < 1:
        raise ServesimError(f"--step-rows = {args.step_rows}: the steps to write must be at least 1")
    extra = [f"metrics.percentiles=[{args.percentiles}]"] if args.percentiles else []
    config = load_config(args.config, [*args.set, *extra])
    results = simulate(config, progress=not args.quiet, skip_ahead=not args.step_by_step)
    if args.out:
        paths = write_outputs(results, args.out, args.format, args.trace, args.steps, args.step_rows)
        if not args.json:
            print(f"wrote {', '.join(p.name for p in paths)} to {args.out}")
    if args.json:
        return results.summary
    print(format_summary(results.summary, config))
    print(f"simulated {results.summary['requests_total']} requests in {results.wall_seconds:.1f} s wall",
          file=sys.stderr)
    return None


def cmd_replay(args: argparse.Namespace) -> dict[str, Any] | None:
    check_out_dir(args.out)
    from sim.config import load_config
    from sim.report import format_summary, write_outputs

    try:
        from backend.replay import replay, write_shapes
    except ImportError as exc:
        raise ServesimError(f"replay needs torch (pip install -e '.[torch]'): {exc}") from None
    config = load_config(args.config, args.set)
    results, _, shapes = replay(config, device=args.device, asap=args.asap, temperature=args.temperature,
                                checkpoint=args.checkpoint, acceptance=args.acceptance)
    print(format_summary(results.summary, config))
    print(f"Triton kernels compiled in serving steps' time: {results.summary['replay_kernel_compiles']} "
          f"({results.summary['replay_kernel_compile_s']:.2f} s; graph captures excluded)")
    if args.out:
        paths = write_outputs(results, args.out)
        write_shapes(shapes, Path(args.out) / "batches.jsonl")
        print(f"wrote {', '.join(p.name for p in paths)}, batches.jsonl to {args.out}")
    return None


def cmd_validate(args: argparse.Namespace) -> dict[str, Any] | None:
    from sim.validate import format_report, validate

    report = validate(args.sim_dir, args.real_dir, profile=args.profile, out=args.out)
    if args.json:
        return report
    print(format_report(report))
    return None


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ServesimError(f"{flag} = {text!r}: expected comma-separated positive integers, e.g. 1,2,4")
    return values


def _check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise ServesimError(f"--workers = {workers}: allowed values are 1 or more")


def cmd_disagg_search(args: argparse.Namespace) -> dict[str, Any] | None:
    from policies import SCHEDULERS
    from servesim.disagg_search import best_ratio, search
    from sim.config import load_config

    overrides = list(args.set)
    overrides += [f"slo.ttft_s={args.ttft}"] if args.ttft is not None else []
    overrides += [f"slo.tpot_s={args.tpot}"] if args.tpot is not None else []
    config = load_config(args.config, overrides)
    colocated = [c for c in args.colocated.split(",") if c]
    for name in colocated:
        if name not in SCHEDULERS:
            raise ServesimError(f"--colocated: {name!r} is not a scheduler; allowed: {', '.join(SCHEDULERS)}")
    _check_workers(args.workers)
    horizon = Horizon(args.horizon, args.min_requests)
    table = search(config, args.gpus, _int_list("--tp", args.tp), colocated, args.attainment, args.link,
                   args.transfer, args.start, args.tolerance, args.workers, horizon, args.seeds,
                   progress=not args.json)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    ratio = best_ratio(table)
    if args.json:
        return {"configurations": table.to_dict(orient="records"), "disaggregated_over_colocated": ratio}
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if ratio is not None:
        print(f"best disaggregated / best colocated goodput per GPU: {ratio:.2f}x")
    return None


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any] | None:
    check_out_dir(args.out)
    from servesim.sweep import plot, sweep
    from sim.config import load_config

    config = load_config(args.config, args.set)
    _check_workers(args.workers)
    if args.rates < 0:
        raise ServesimError(f"--rates = {args.rates}: allowed values are 0 or more")
    table = sweep(config, args.rates, Horizon(args.horizon, args.min_requests), args.workers, progress=not args.json)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "sweep.csv", index=False)
        hw = config.hardware
        plot(table, out / "sweep.png", f"{config.model} on {hw.gpu} (TP {hw.tp}), {config.scheduler.name}")
    if args.json:
        return {"sweep": table.to_dict(orient="records")}
    hw = config.hardware
    print(f"{config.model} on {hw.gpu} x{config.cluster.replicas} (TP {hw.tp}), scheduler {config.scheduler.name}")
    shown = table.copy()
    for c in [c for c in shown.columns if c.split("_")[0] in ("ttft", "tpot", "itl", "e2e")]:
        shown[c.removesuffix("_s") + "_ms"] = shown.pop(c) * 1e3  # latencies in ms, as benchmarks print them
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out:
        print(f"wrote sweep.csv, sweep.png to {args.out}")
    return None


def cmd_plan(args: argparse.Namespace) -> dict[str, Any] | None:
    check_out_dir(args.out)
    from servesim.planner import load_spec, plan

    spec = load_spec(args.spec, args.set)
    _check_workers(args.workers)
    t0 = time.perf_counter()
    table = plan(spec, args.out, workers=args.workers, ray=args.ray, ray_address=args.ray_address,
                 progress=not args.quiet)
    wall = time.perf_counter() - t0
    if args.json:
        return {"configurations": table.to_dict(orient="records"), "wall_seconds": wall}
    cols = [c for c in ("label", "pruned", "capacity_req_s", "capacity_max_req_s", "gpus", "cost_per_hour",
                        "cost_per_million_output_tokens", f"replicas_at_{spec.rates[0]:g}",
                        f"cost_per_hour_at_{spec.rates[0]:g}", "verified") if c in table]
    print(table[cols].head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{len(table)} configurations ({int(table['cached'].sum())} from the cache) in {wall:.1f} s; "
          f"wrote plan.csv, plan.parquet, best.yaml, pareto.png, latency.png to {args.out}", file=sys.stderr)
    return None


def cmd_catalog(args: argparse.Namespace) -> dict[str, Any]:
    kinds = {
        "gpus": (gpu_ids, get_gpu),
        "models": (model_ids, get_model),
        "links": (interconnect_ids, get_interconnect),
    }
    ids, get = kinds[args.kind]
    return {i: get(i).model_dump(mode="json") for i in ids()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servesim", description="Discrete-event simulator for LLM serving.")
    parser.add_argument("--version", action="version", version=f"servesim {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    est = sub.add_parser("estimate", help="cost of one forward step, as JSON on stdout")
    _add_deployment_args(est)
    b = est.add_argument_group("batch")
    b.add_argument("--prefill", type=int, nargs="+", metavar="N", help="prefill chunk(s), one request each")
    b.add_argument("--cached", type=int, nargs="+", metavar="P", help="tokens already cached before each chunk")
    b.add_argument("--decode", type=int, metavar="N", help="number of decoding requests")
    b.add_argument("--verify", type=int, metavar="N", help="number of requests verifying speculative tokens")
    b.add_argument("--verify-tokens", type=int, default=5, metavar="K", help="tokens each verifies (default 5)")
    b.add_argument("--context", type=int, metavar="L", help="tokens of KV per decoding/verifying request")
    x = est.add_argument_group("execution")
    x.add_argument("--graphs", dest="field:hardware.cuda_graphs", choices=GRAPH_MODES,
                   help="CUDA graphs: 'mixed' every step of at most 512 tokens, 'decode' "
                        "decode-only steps alone, 'none' eager (default: the config's hardware.cuda_graphs, mixed)")
    x.add_argument("--eager", dest="field:hardware.cuda_graphs", action="store_const", const="none",
                   help="run every step eagerly (--graphs none)")
    x.add_argument("--breakdown", action="store_true", help="add the per-operator table")
    est.set_defaults(func=cmd_estimate)

    run = sub.add_parser("run", help="simulate a serving scenario (default: the embedded one)")
    run.add_argument("config", nargs="?", help="scenario YAML (default: Llama-3-8B on one H100, Poisson arrivals)")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config field, e.g. --set scheduler.max_num_seqs=128 (repeatable)")
    run.add_argument("--out", help="directory for summary.json, requests.csv, steps.csv, token_times.npy, plots")
    run.add_argument("--format", choices=["csv", "parquet"], default="csv",
                     help="requests, steps (and links) tables as CSV or Parquet (default csv)")
    run.add_argument("--steps", choices=["all", "sampled", "none"], default="all",
                     help="the steps table written to --out: every step (default), about --step-rows of them evenly "
                     "(`sampled`, with each one's index in the whole table), or none (a million requests log "
                     "millions of steps); the summary and plots use every step either way")
    run.add_argument("--step-rows", type=int, default=100_000, metavar="N", help="rows of --steps sampled")
    run.add_argument("--trace", action="store_true", help="also write trace.json (Chrome trace events: open it in "
                     "ui.perfetto.dev): a slice per step, request lifetimes, KV transfers; about 250 bytes a step")
    run.add_argument("--percentiles", metavar="P,P,...", help="percentiles to report besides 50, 90, 99 (e.g. "
                     "50,90,99,99.9: adds ttft_p99.9_s and the like)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    run.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    run.add_argument("--step-by-step", action="store_true", help="simulate every decode step one by one instead "
                     "of skipping ahead over stretches of them (the same results, slower: a check)")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("replay", help="run a scenario for real on a PyTorch device (needs torch)")
    rep.add_argument("config", nargs="?", help="scenario YAML (default: the embedded one)")
    rep.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field")
    rep.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    rep.add_argument("--out", help="directory for the same files as `run`, plus batches.jsonl")
    rep.add_argument("--asap", action="store_true", help="skip idle gaps: jump to the next arrival when idle")
    rep.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    rep.add_argument("--checkpoint", help="local safetensors file or folder to load instead of random weights")
    rep.add_argument("--acceptance", choices=["oracle", "model"], default="oracle",
                     help="speculation: force the acceptance model's draws (oracle, default: random weights never "
                          "agree) or apply the real rule to the draft's proposals (model)")
    rep.set_defaults(func=cmd_replay)

    val = sub.add_parser("validate", help="compare a simulated run with a replay")
    val.add_argument("sim_dir", help="--out folder of `servesim run`")
    val.add_argument("real_dir", help="--out folder of `servesim replay`")
    val.add_argument("--profile", help="efficiency profile for re-pricing the real steps")
    val.add_argument("--out", help="where validation.json and step_scatter.png go (default: REAL_DIR)")
    val.add_argument("--json", action="store_true", help="print the report as JSON")
    val.set_defaults(func=cmd_validate)

    ds = sub.add_parser("disagg-search", help="goodput per GPU of prefill/decode placements vs colocated serving")
    ds.add_argument("config", nargs="?", help="scenario YAML: model, GPU, workload, SLOs (default: the embedded one)")
    ds.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field")
    ds.add_argument("--gpus", type=int, required=True, help="GPU budget: placements use at most this many")
    ds.add_argument("--tp", default="1,2,4,8", help="TP degrees to try for each pool (default 1,2,4,8)")
    ds.add_argument("--colocated", default="vllm,sarathi", help="schedulers of the colocated baselines ('' for none)")
    ds.add_argument("--ttft", type=float, help="TTFT target in s (default: the config's slo.ttft_s)")
    ds.add_argument("--tpot", type=float, help="TPOT target in s (default: the config's slo.tpot_s)")
    ds.add_argument("--attainment", type=float, default=0.9, help="share of requests within both (default 0.9)")
    ds.add_argument("--link", help="KV link (default: the config's disaggregation.link, else ib-ndr)")
    ds.add_argument("--transfer", choices=["after_prefill", "layerwise"], help="KV transfer mode")
    ds.add_argument("--start", type=float, default=1.0, help="first rate probed, req/s (default 1)")
    ds.add_argument("--tolerance", type=float, default=0.05, help="relative precision of each goodput (default 0.05)")
    ds.add_argument("--workers", "--jobs", dest="workers", type=int,
                    help="local processes (default: all cores; --jobs is the old name)")
    ds.add_argument("--horizon", type=float, default=Horizon.min_duration_s, metavar="S",
                    help="simulated seconds of arrivals per probe, at least (default 60; grown until the steady "
                         "window lasts 3x the p90 service time)")
    ds.add_argument("--min-requests", type=int, default=Horizon.min_requests, metavar="N",
                    help="requests per probe, at least (default 1000)")
    ds.add_argument("--seeds", type=int, default=3, help="seeds near each goodput boundary; the goodput is "
                    "their lowest (default 3)")
    ds.add_argument("--out", help="CSV of every configuration")
    ds.add_argument("--json", action="store_true", help="print the table as JSON")
    ds.set_defaults(func=cmd_disagg_search)

    sw = sub.add_parser("sweep", help="GuideLLM-style rate sweep: synchronous, max throughput, rates between")
    sw.add_argument("config", nargs="?", help="scenario YAML (default: the embedded one); its first workload is swept")
    sw.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field")
    sw.add_argument("--rates", type=int, default=8, help="Poisson rates between the two ends (default 8)")
    sw.add_argument("--workers", type=int, help="local processes (default: all cores)")
    sw.add_argument("--horizon", type=float, default=Horizon.min_duration_s, metavar="S",
                    help="simulated seconds of arrivals per rate, at least (default 60; grown while the steady "
                         "window is too short to judge)")
    sw.add_argument("--min-requests", type=int, default=Horizon.min_requests, metavar="N",
                    help="requests per rate and in the throughput burst, at least (default 1000)")
    sw.add_argument("--out", help="folder for sweep.csv and sweep.png")
    sw.add_argument("--json", action="store_true", help="print the table as JSON")
    sw.set_defaults(func=cmd_sweep)

    pl = sub.add_parser("plan", help="the cheapest configuration that meets the SLOs (capacity planning)")
    pl.add_argument("spec", help="plan spec YAML: base scenario, rates, SLO attainment, search space, objective")
    pl.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    pl.add_argument("--out", default="plan_out", help="output folder (also holds the result cache; default plan_out)")
    pl.add_argument("--workers", type=int, help="local processes (default: all cores)")
    pl.add_argument("--ray", action="store_true", help="run the configurations on a local Ray instance")
    pl.add_argument("--ray-address", help="run them on an existing Ray cluster (e.g. ray://head:10001 or auto)")
    pl.add_argument("--top", type=int, default=10, help="rows of the table to print (default 10)")
    pl.add_argument("--json", action="store_true", help="print every configuration as JSON")
    pl.add_argument("--quiet", action="store_true", help="no progress line")
    pl.set_defaults(func=cmd_plan)

    calibrate_parser(sub)

    cat = sub.add_parser("catalog", help="list catalog entries as JSON")
    cat.add_argument("kind", choices=["gpus", "models", "links"])
    cat.set_defaults(func=cmd_catalog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
        if result is not None:
            json.dump(result, sys.stdout, indent=2)
            sys.stdout.write("\n")
            sys.stdout.flush()
    except ServesimError as exc:
        for line in str(exc).splitlines() or [""]:  # several errors (a config's fields): one line each
            print(f"servesim: error: {line}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `servesim run --json | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # an output or input path the system refuses (a file where a folder goes, ...)
        where = f" {exc.filename!r}" if exc.filename else ""
        print(f"servesim: error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("servesim")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
