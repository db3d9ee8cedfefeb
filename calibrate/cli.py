"""`servesim calibrate`: microbenchmarks to a profile, whole-model reference steps, and their validation.

    servesim calibrate --out PROFILE.json [--quick] [--gpu ID] [--models a,b] [--tp 1,2,4,8]
    servesim calibrate --refit --raw RAW.json [--later LATER_RAW.json ...] --out PROFILE.json
    servesim calibrate reference --out STEPS.csv [--model llama-3-8b] [--quick] [--tp N] [--raw OVERHEADS_RAW.json]
    servesim calibrate validate STEPS.csv --gpu ID [--profile PROFILE.json|GPU-ID] [--overheads PROFILE.json|GPU-ID]
        [--statistic fast|median] [--out DIR]

Torch is imported only by the first two (the `torch` extra).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

from hardware.catalog import get_gpu, model_ids
from hardware.errors import ServesimError
from hardware.files import read_json

# Catalog GPU ids by a word of the device name torch reports.
GPU_NAMES = {"H200": "h200-sxm-141gb", "H100": "h100-sxm-80gb", "A100": "a100-sxm-80gb", "L40S": "l40s",
             "B200": "b200", "MI300X": "mi300x"}


def add_parser(sub: Any) -> None:
    cal = sub.add_parser("calibrate", help="time PyTorch kernels and fit an efficiency profile (needs torch)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cal.add_argument("action", nargs="?", choices=["profile", "reference", "validate"], default="profile",
                     help="profile (default): microbenchmarks to PROFILE.json; reference: whole-model steps; "
                          "validate: cost model vs reference steps")
    cal.add_argument("measurements", nargs="?", help="validate: the reference steps CSV")
    cal.add_argument("--out", help="profile: PROFILE.json; reference: STEPS.csv; validate: folder for the report")
    cal.add_argument("--quick", action="store_true", help="tiny shapes, on CPU unless --device says otherwise")
    cal.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    cal.add_argument("--gpu", help="catalog GPU id the profile is for (default: detected from the device name)")
    cal.add_argument("--models", help="comma-separated catalog models whose shapes to time (default: all dense)")
    cal.add_argument("--tp", help="profile: TP degrees whose shards to time (default 1,2,4,8); reference: the TP "
                                   "degree to run (one process per GPU; default 1)")
    cal.add_argument("--suites", default="gemm,elementwise,attention,fixed,collectives,moe",
                     help="profile: which microbenchmark suites to run (default: all)")
    cal.add_argument("--raw", help="profile: also write the raw measurements here; with --refit, read them; "
                                   "reference: also run the overhead fit's whole steps in the same rounds and write "
                                   "them, with the fixed costs, here (a file for --refit --later)")
    cal.add_argument("--refit", action="store_true", help="profile: fit --raw measurements again, time nothing")
    cal.add_argument("--later", "--steps", dest="later", action="append", metavar="LATER_RAW",
                     help="profile, with --refit: overlay a later session's raw file: its whole steps replace the "
                          "earlier ones of the same TP degrees (e.g. `reference --raw`), its fixed costs the earlier "
                          "ones, and each group of records it measured (an attention head configuration, a GEMM "
                          "shape, a collective over n ranks, the NCCL dispatch) replaces the same group; "
                          "repeatable, applied in order")
    cal.add_argument("--model", help="reference: catalog model (default llama-3-8b; tiny-llama with --quick)")
    cal.add_argument("--profile", default="calibrated",
                     help="validate: profile JSON, the GPU id of a committed one, or 'calibrated' (default: the "
                          "committed profile of --gpu)")
    cal.add_argument("--overheads", help="validate: take the host overheads (dispatch, per-step costs; not the "
                                         "GPU's own per-kernel costs) from this profile instead: the host the steps "
                                         "ran on was calibrated apart")
    cal.add_argument("--statistic", choices=["fast", "median"],
                     help="validate: compare with the steps' fast-phase or median wall time (default: fast where "
                          "recorded)")
    cal.set_defaults(func=run)


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.device:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ServesimError(f"--device = {args.device!r}: no CUDA device is visible; allowed: cpu")
        return args.device
    return "cpu" if args.quick or not torch.cuda.is_available() else "cuda"


def _gpu_id(args: argparse.Namespace, device: str) -> str:
    if args.gpu:
        return get_gpu(args.gpu).id
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        for key, gid in GPU_NAMES.items():
            if key in name.upper():
                return gid
        raise ServesimError(f"--gpu: the device {name!r} matches no catalog GPU; name one with --gpu")
    if args.quick:
        return get_gpu("h100").id
    raise ServesimError("--gpu: required when calibrating on the CPU without --quick")


def _tp_degrees(value: str) -> list[int]:
    try:
        tps = [int(t) for t in value.split(",")]
    except ValueError:
        tps = []
    if not tps or min(tps) < 1:
        raise ServesimError(f"--tp = {value!r}: give comma-separated positive integers, e.g. 1,2,4,8")
    return tps


def _metadata(device: str, argv: list[str]) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "source": "servesim calibrate", "command": "servesim " + " ".join(argv), "device": device,
        "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    }
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        meta.update(device_name=p.name, sm_count=p.multi_processor_count, memory_bytes=p.total_memory)
    return meta


def _log(message: str) -> None:
    print(f"servesim calibrate: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.action == "validate":
        return _validate(args)
    try:
        import torch
    except ImportError:
        raise ServesimError("calibrate needs torch: pip install torch==2.13.0 'servesim[torch]'") from None
    torch.manual_seed(0)
    if args.action == "reference":
        from calibrate.reference import measure

        if not args.out:
            raise ServesimError("--out: required (the reference steps CSV)")
        device = _device(args)
        tp = _tp_degrees(args.tp or "1")
        if len(tp) != 1 or (device.startswith("cuda") and tp[0] > torch.cuda.device_count()):
            raise ServesimError(f"--tp = {args.tp!r}: reference runs one TP degree, at most the "
                                f"{torch.cuda.device_count() if device.startswith('cuda') else 'any'} visible devices")
        model = args.model or ("tiny-llama" if args.quick else "llama-3-8b")
        raw: dict[str, Any] = {}
        if args.raw:  # the fixed costs first, on a device that holds nothing yet
            from calibrate.microbench import run_all

            gpu = get_gpu(_gpu_id(args, device))
            raw = run_all(torch.device(device), gpu, [model], tp, args.quick, [model], _log, suites=())
            raw.update(gpu=gpu.id, metadata=_metadata(device, sys.argv[1:]))
        df, steps = measure(model, device, args.quick, _log, tp[0], overheads=bool(args.raw))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
        if args.raw:
            Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
            Path(args.raw).write_text(json.dumps({**raw, "steps": steps}))
        return {"steps": len(df), "out": args.out, "overhead_steps": len(steps)}
    return _profile(args)


def _profile(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from calibrate.collectives import run_collectives
    from calibrate.fit import fit_profile
    from calibrate.microbench import SUITES, run_all, tp_overhead_steps
    from calibrate.ranks import tp_degrees

    if not args.out:
        raise ServesimError("--out: required (the profile JSON to write)")
    if args.refit:
        if not args.raw or not Path(args.raw).is_file():
            raise ServesimError(f"--raw = {args.raw!r}: --refit needs the raw measurements file")
        try:
            raw = read_json(args.raw, "--raw")
            gpu, metadata = get_gpu(args.gpu or raw["gpu"]), raw["metadata"]
            missing = {"records", "fixed"} - raw.keys()
            if missing:
                raise KeyError(sorted(missing))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ServesimError(f"--raw = {args.raw!r}: not raw calibration measurements ({exc!r}); expected "
                                "the --raw file of an earlier `servesim calibrate`") from None
        for later in args.later or ():
            raw = _overlay(raw, later)
        metadata = raw["metadata"]
    else:
        device = _device(args)
        gpu = get_gpu(_gpu_id(args, device))
        models = args.models.split(",") if args.models else [m for m in model_ids() if not m.startswith("tiny-")]
        if args.quick and not args.models:
            models = ["tiny-llama", "tiny-moe"]
        tps = _tp_degrees(args.tp or "1,2,4,8")
        from hardware.catalog import get_model

        dense = [get_model(m).id for m in models if not get_model(m).is_moe]
        moe = tuple(get_model(m).id for m in models if get_model(m).is_moe and not get_model(m).is_mla)
        metadata = _metadata(device, sys.argv[1:])
        suites = tuple(args.suites.split(","))
        unknown = set(suites) - set(SUITES)
        if unknown:
            raise ServesimError(f"--suites: unknown {sorted(unknown)}; allowed: {', '.join(SUITES)}")
        if not dense and set(suites) - {"moe"}:
            raise ServesimError(f"--models = {args.models!r}: name at least one dense model (the suites other than "
                                "moe time dense models' shapes)")
        raw = run_all(torch.device(device), gpu, dense, tps, args.quick, dense[:3], _log, suites, moe)
        if device.startswith("cuda") and "collectives" in suites:
            raw["records"] += run_collectives()
            if "fixed" in suites:  # the overhead steps again as TP ranks: the host's cost per eager collective
                raw["steps"] += tp_overhead_steps(dense[0], args.quick, "cuda", tp_degrees(torch.cuda.device_count()))
        raw.update(gpu=gpu.id, metadata=metadata)
        if args.raw:
            Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
            Path(args.raw).write_text(json.dumps(raw))
    profile = fit_profile(raw, gpu, metadata)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(profile.model_dump_json(indent=1))
    return {"profile": args.out, "gpu": gpu.id, "gemm_shapes": len(profile.gemm),
            "operators": sorted(profile.operators), "attention_surfaces": len(profile.attention),
            "collectives": len(profile.collectives), "overheads": profile.overheads.model_dump()}


RECORD_GROUP = ("kind", "op", "heads", "kv_heads", "head_dim", "ranks", "k", "n", "model", "tp")


def _overlay(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """`raw` under a later raw file: the later whole steps replace the earlier steps of the TP degrees they
    cover, the later fixed costs the earlier ones, and every group of records the later file holds (same
    kind, operator, head configuration, GEMM shape, ranks, model, TP) replaces the earlier records of that
    group; the rest stays (e.g. a later session re-timing one model's attention, or the host overheads
    measured in the same rounds as a reference)."""
    try:
        later = read_json(path, "--later")
        steps, records, fixed = later.get("steps") or [], later["records"], later.get("fixed", {})
        tps = {s.get("tp", 1) for s in steps}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ServesimError(f"--later = {path!r}: not raw calibration measurements ({exc!r})") from None

    def group(r: dict[str, Any]) -> tuple:
        return tuple(r.get(k) for k in RECORD_GROUP)

    replaced = {group(r) for r in records}
    kept = [r for r in raw["records"] if group(r) not in replaced]
    steps = [s for s in raw.get("steps", []) if s.get("tp", 1) not in tps] + steps
    overlays = [*raw["metadata"].get("overlays", []), later.get("metadata", {}).get("command", path)]
    return {**raw, "steps": steps, "records": kept + records, "fixed": {**raw.get("fixed", {}), **fixed},
            "metadata": {**raw["metadata"], "overlays": overlays}}


def _validate(args: argparse.Namespace) -> dict[str, Any]:
    from calibrate.validate import compare, format_table, plot, read_measurements, summary
    from hardware.profile import DEFAULT_PROFILE
    from hardware.profiles import resolve_profile

    if not args.measurements:
        raise ServesimError("validate: give the reference steps CSV (from `servesim calibrate reference`)")
    if not args.gpu:
        raise ServesimError("--gpu: required (the GPU the steps are priced on)")
    gpu = get_gpu(args.gpu).id
    profile = resolve_profile(args.profile, gpu) or DEFAULT_PROFILE
    if args.overheads:
        profile = profile.with_engine_of(resolve_profile(args.overheads, gpu, field="--overheads") or DEFAULT_PROFILE)
    steps, table = compare(read_measurements(args.measurements), gpu, profile, args.statistic)
    result = {"gpu": gpu, "profile": profile.gpu, "overheads": args.overheads or profile.gpu, **summary(steps, table)}
    print(format_table(result), file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "validation.json").write_text(json.dumps(result, indent=1))
        steps.to_csv(out / "steps.csv", index=False)
        plot(steps, out / "predicted_vs_measured.png", f"{gpu} with profile {profile.gpu}")
    return result
