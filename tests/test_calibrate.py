"""Calibration: the fit recovers a synthetic device's known efficiencies and overheads, profiles round-trip
and fail clearly, the cost model applies measured surfaces (and another GPU's profile by the what-if
rule), and the whole `servesim calibrate` pipeline runs on CPU with tiny shapes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from calibrate.fit import fit_profile, layer_kernels
from calibrate.microbench import _decode_shape, gemm_shapes, operators_at
from hardware.catalog import get_gpu, get_interconnect, get_model
from hardware.cost import CostModel, peak_flops
from hardware.deployment import Deployment
from hardware.errors import ServesimError
from hardware.operators import StepShape
from hardware.profile import (
    DEFAULT_PROFILE,
    AttentionSurface,
    Profile,
    load_profile,
    packaged_profile,
    resolve_profile,
)

GPU = get_gpu("h100")
LAUNCH = 1.2e-6  # the synthetic device's GPU time per kernel (not the default's 1.5 us)


def true_gemm(m: float, k: int, n: int) -> float:
    """Fraction of the roofline: compute at 0.75 m / (m + 16) of peak, memory at 0.8 (monotone times)."""
    flops, nbytes = 2.0 * m * k * n, k * n * 2 + (m * k + m * n) * 2
    roof = max(flops / GPU.bf16_flops, nbytes / GPU.hbm_bandwidth)
    return roof / max(flops / (GPU.bf16_flops * 0.75 * m / (m + 16.0)), nbytes / (GPU.hbm_bandwidth * 0.8))


def true_memory(nbytes: float) -> float:
    return 0.8 * nbytes / (nbytes + 2e6)


def true_attention(x: float, y: float) -> float:
    return 0.6 * x / (x + 64.0) * (0.5 + 0.5 * y / (y + 8.0))


def synthetic_raw(noise: float, seed: int = 0) -> dict:
    """Microbenchmark records of a hidden roofline device: roofline / efficiency + kernels x launch,
    times a lognormal noise of `noise`; whole steps from known overheads."""
    rng = np.random.default_rng(seed)
    jitter = lambda: float(np.exp(rng.normal(0.0, noise)))  # noqa: E731
    dep = Deployment.build("tiny-llama", GPU)
    records = []
    for k, n in gemm_shapes([dep]):
        for m in (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536):
            flops, nbytes = 2.0 * m * k * n, k * n * 2 + (m * k + m * n) * 2
            roof = max(flops / GPU.bf16_flops, nbytes / GPU.hbm_bandwidth)
            records.append({"op": "gemm", "kind": "gemm", "k": k, "n": n, "m": m, "flops": flops, "bytes": nbytes,
                            "kernels": 1, "seconds": (roof / true_gemm(m, k, n) + LAUNCH) * jitter()})
    for m in (1, 16, 256, 4096, 65536):
        for name, op in operators_at(dep, _decode_shape(m)).items():
            if op.kind in ("elementwise", "embedding", "kv-write", "sampling"):
                t = op.bytes / GPU.hbm_bandwidth / true_memory(op.bytes) + op.kernels * LAUNCH
                records.append({"op": name, "kind": op.kind, "flops": op.flops, "bytes": op.bytes,
                                "kernels": op.kernels, "seconds": t * jitter(), "rows": m})
    for b in (1, 4, 16, 64):
        for ctx in (64, 512, 4096):
            op = operators_at(dep, StepShape.build(decode=[ctx - 1] * b))["attention_decode"]
            roof = max(op.flops / peak_flops(dep, op.kind), op.bytes / GPU.hbm_bandwidth)
            records.append({"op": op.name, "kind": op.kind, "flops": op.flops, "bytes": op.bytes, "kernels": op.kernels,
                            "x": b, "y": ctx, "heads": dep.heads_per_gpu, "kv_heads": dep.kv_heads_per_gpu,
                            "head_dim": dep.model.head_size,
                            "seconds": (roof / true_attention(b, ctx) + op.kernels * LAUNCH) * jitter()})
    link = get_interconnect(GPU.intra_node_link)
    for size in (2 ** 12, 2 ** 18, 2 ** 24, 2 ** 28):
        moved = size * 2 * (2 - 1) / 2
        t = 2 * link.latency + moved / link.bandwidth / true_memory(moved)
        records.append({"op": "all-reduce", "kind": "all-reduce", "ranks": 2, "comm_bytes": float(size),
                        "seconds": t * jitter()})
    # Whole steps: eager host-bound at 20 us per kernel plus 1 ms + 10 us per request; graphs 0.5 ms + 5 us.
    truth = DEFAULT_PROFILE.overheads.model_copy(update={"launch_eager": 20e-6, "launch_graph": LAUNCH,
                                                         "step_eager": 1e-3, "step_eager_per_request": 10e-6,
                                                         "step_graph": 5e-4, "step_graph_per_request": 5e-6})
    steps = []
    for layers in (2, 4):
        spec = get_model("tiny-llama").model_copy(update={"num_hidden_layers": layers})
        for b in (1, 8, 64, 256):
            shape = StepShape.build(decode=[63] * b)
            k_layer, k_other = layer_kernels(spec, shape, GPU)
            host = (truth.step_eager + truth.step_eager_per_request * b
                    + truth.launch_eager * (k_layer * layers + k_other))
            steps.append({"model": "tiny-llama", "layers": layers, "execution": "eager", "requests": b,
                          "shape": shape.to_dict(), "seconds": host * jitter()})
            overhead = truth.step_graph + truth.step_graph_per_request * b
            steps.append({"model": "tiny-llama", "layers": layers, "execution": "graph", "requests": b,
                          "shape": shape.to_dict(), "truth_overhead": overhead})
    return {"records": records, "fixed": {"graph_kernel_seconds": LAUNCH}, "steps": steps, "truth": truth}


def _finish_graph_steps(raw: dict, profile: Profile) -> None:
    """Graph steps' wall = true overhead + their GPU time on the device (priced with the true surfaces)."""
    for s in raw["steps"]:
        if s["execution"] == "graph":
            spec = get_model("tiny-llama").model_copy(update={"num_hidden_layers": s["layers"]})
            priced = CostModel(Deployment.build(spec, GPU), profile, cuda_graphs=True).price(
                StepShape.from_dict(s["shape"]))
            s["seconds"] = s.pop("truth_overhead") + sum(priced.stage_seconds)


@pytest.fixture(scope="module")
def fitted() -> tuple[dict, Profile]:
    exact = synthetic_raw(noise=0.0)
    _finish_graph_steps(exact, fit_profile({**exact, "steps": []}, GPU, {}))
    noisy = synthetic_raw(noise=0.02, seed=1)
    rng = np.random.default_rng(2)
    for s, e in zip(noisy["steps"], exact["steps"]):
        if s["execution"] == "graph":
            s.pop("truth_overhead")
            s["seconds"] = e["seconds"] * float(np.exp(rng.normal(0.0, 0.02)))
    return noisy, fit_profile(noisy, GPU, {"source": "synthetic"})


def test_fit_recovers_gemm_efficiencies(fitted) -> None:
    """Efficiencies come back where the kernel's busy time is not buried under its fixed cost; the time
    (roofline / efficiency + launch) comes back everywhere, within the noise."""
    _, profile = fitted
    checked = 0
    for g in profile.gemm:
        m = np.array(g.m)
        roof = np.maximum(2.0 * m * g.k * g.n / GPU.bf16_flops,
                          (g.k * g.n * 2 + m * (g.k + g.n) * 2) / GPU.hbm_bandwidth)
        want = np.array([true_gemm(x, g.k, g.n) for x in m])
        assert np.allclose(roof / np.array(g.efficiency) + LAUNCH, roof / want + LAUNCH, rtol=0.08), (g.k, g.n)
        busy = roof / want > 2 * LAUNCH
        checked += int(busy.sum())
        assert np.allclose(np.array(g.efficiency)[busy], want[busy], rtol=0.1), (g.k, g.n)
    assert checked >= 5


def test_fit_recovers_operator_and_collective_curves(fitted) -> None:
    _, profile = fitted
    for name, curve in profile.operators.items():
        sizes = np.array(curve.sizes)
        busy = sizes / GPU.hbm_bandwidth / np.array([true_memory(b) for b in sizes]) > 4 * LAUNCH
        want = np.array([true_memory(b) for b in sizes[busy]])
        assert busy.any() and np.allclose(np.array(curve.efficiency)[busy], want, rtol=0.1), name
    (coll,) = profile.collectives
    assert coll.kind == "all-reduce" and coll.ranks == 2
    big = np.array(coll.curve.sizes) > 1e5  # where bandwidth, not latency, sets the time
    assert np.allclose(np.array(coll.curve.efficiency)[big], [true_memory(s) for s in np.array(coll.curve.sizes)[big]],
                       rtol=0.1)


def test_fit_recovers_attention_surface(fitted) -> None:
    _, profile = fitted
    (surface,) = profile.attention
    dep = Deployment.build("tiny-llama", GPU)
    checked = 0
    for i, x in enumerate(surface.x):
        for j, y in enumerate(surface.y):
            op = operators_at(dep, StepShape.build(decode=[int(y) - 1] * int(x)))["attention_decode"]
            if op.bytes / GPU.hbm_bandwidth / true_attention(x, y) > 4 * op.kernels * LAUNCH:  # not launch-bound
                checked += 1
                assert surface.efficiency[i][j] == pytest.approx(true_attention(x, y), rel=0.1)
    assert checked >= 3


def test_fit_recovers_overheads(fitted) -> None:
    raw, profile = fitted
    truth, got = raw["truth"], profile.overheads
    assert got.launch_graph == LAUNCH
    assert got.launch_eager == pytest.approx(truth.launch_eager, rel=0.1)
    assert got.step_eager == pytest.approx(truth.step_eager, rel=0.25)
    assert got.step_eager_per_request == pytest.approx(truth.step_eager_per_request, rel=0.25)
    assert got.step_graph == pytest.approx(truth.step_graph, rel=0.25)
    assert got.step_graph_per_request == pytest.approx(truth.step_graph_per_request, rel=0.25)


def test_cost_model_reproduces_a_measured_gemm(fitted) -> None:
    """A GEMM measured at (M, K, N) is priced at its measured time (noise-free device)."""
    raw = synthetic_raw(noise=0.0)
    profile = fit_profile({**raw, "steps": []}, GPU, {})
    dep = Deployment.build("tiny-llama", GPU)
    model = CostModel(dep, profile, cuda_graphs=False)
    m = 256
    cost = model.price(StepShape.build(prefill=[m]))
    row = next(r for r in cost.breakdown if r.name == "down_proj")
    op = operators_at(dep, StepShape.build(prefill=[m]))["down_proj"]
    measured = next(r["seconds"] for r in raw["records"]
                    if r["kind"] == "gemm" and (r["k"], r["n"]) == op.dims and r["m"] == m)
    assert row.seconds / row.count == pytest.approx(measured, rel=0.02)


def test_profile_round_trips_through_json(fitted, tmp_path) -> None:
    _, profile = fitted
    path = tmp_path / "p.json"
    path.write_text(profile.model_dump_json())
    again = load_profile(path)
    assert again == profile.merged_over(DEFAULT_PROFILE)
    shape = StepShape.build(prefill=[300], decode=[100] * 7)
    dep = Deployment.build("tiny-llama", GPU)
    assert CostModel(dep, again).price(shape).seconds == CostModel(dep, profile).price(shape).seconds


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    (json.dumps({"gpu": "x", "efficiency": {"gemm": {"compute": 2.0}},
                 "overheads": DEFAULT_PROFILE.overheads.model_dump()}), "efficiency.gemm.compute"),
    (json.dumps({"version": 9, "gpu": "x", "efficiency": {}, "overheads": {}}), "version"),
])
def test_bad_profile_file_gives_one_line_error(tmp_path, content, needle) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ServesimError) as exc:
        load_profile(path)
    assert "bad.json" in str(exc.value) and needle in str(exc.value) and "\n" not in str(exc.value)


def test_resolve_profile_names() -> None:
    assert resolve_profile("datasheet", "h100-sxm-80gb") is None and resolve_profile(None, "h100-sxm-80gb") is None
    assert resolve_profile("calibrated", "h100-sxm-80gb") == packaged_profile("h100-sxm-80gb")
    assert resolve_profile("h100", "h200-sxm-141gb").gpu == "h100-sxm-80gb"
    with pytest.raises(ServesimError, match="neither a profile JSON file nor a catalog GPU id"):
        resolve_profile("no-such-thing", "h100-sxm-80gb")
    with pytest.raises(ServesimError, match="no committed profile for GPU 'l40s-48gb'"):
        resolve_profile("l40s", "h100-sxm-80gb")


def test_borrowed_profile_scales_by_datasheet_peaks() -> None:
    """What-if rule: another GPU's efficiencies on this GPU's peaks; a memory-bound kernel's time scales by
    the bandwidth ratio, a compute-bound one's by the FLOP/s ratio."""
    h100 = packaged_profile("h100-sxm-80gb")
    assert h100 is not None and h100.gemm and h100.attention
    a = CostModel(Deployment.build("llama-3-8b", "h100"), h100)
    b = CostModel(Deployment.build("llama-3-8b", "h200"), h100)
    decode = StepShape.build(decode=[1000])  # weights streaming: memory bound
    ra = {r.name: r for r in a.price(decode).breakdown}
    rb = {r.name: r for r in b.price(decode).breakdown}
    launch = h100.overheads.launch_graph
    ratio = get_gpu("h200").hbm_bandwidth / get_gpu("h100").hbm_bandwidth
    assert (ra["down_proj"].seconds - 32 * launch) / (rb["down_proj"].seconds - 32 * launch) == pytest.approx(ratio)


def test_attention_surface_interpolates_in_log_space() -> None:
    s = AttentionSurface(kind="attention-decode", heads=4, kv_heads=1, head_dim=64, x=(1, 100), y=(10, 1000),
                         efficiency=((0.1, 0.2), (0.3, 0.4)))
    assert s.at(1, 10) == pytest.approx(0.1) and s.at(100, 1000) == pytest.approx(0.4)
    assert s.at(10, 100) == pytest.approx(0.25)  # the geometric middle is the mean of the corners
    assert s.at(1e6, 1e-3) == pytest.approx(0.3)  # clamped to the grid
    with pytest.raises(ValueError, match="efficiency must be 2 rows of 2 values"):
        AttentionSurface(kind="attention-decode", heads=4, kv_heads=1, head_dim=64, x=(1, 100), y=(10, 1000),
                         efficiency=((0.1, 0.2),))


def test_committed_profiles_beat_the_datasheet_on_their_reference_steps() -> None:
    """The committed H100 and H200 profiles against the committed whole-model measurements."""
    from calibrate.validate import compare, read_measurements

    for gpu in ("h100-sxm-80gb", "h200-sxm-141gb"):
        steps, table = compare(read_measurements(f"calibrate/measurements/{gpu}_llama-3-8b_steps.csv"), gpu,
                               packaged_profile(gpu))
        assert steps["error"].abs().mean() < 0.5 * steps["error_datasheet"].abs().mean()
        prefill = table[table.category == "prefill"]
        assert float(prefill["mape"].iloc[0]) < 10.0
        assert not math.isnan(float(table["mape"].max()))


def test_quick_calibration_pipeline_on_cpu(tmp_path, capsys) -> None:
    """`servesim calibrate --quick`, `reference --quick` and `validate` end to end on the CPU."""
    pytest.importorskip("torch")
    from sim.cli import main

    prof, raw, steps = tmp_path / "p.json", tmp_path / "raw.json", tmp_path / "steps.csv"
    assert main(["calibrate", "--quick", "--out", str(prof), "--raw", str(raw)]) == 0
    profile = load_profile(prof)
    assert profile.version == 2 and profile.gemm and profile.attention and "rope" in profile.operators
    assert profile.metadata["device"] == "cpu" and profile.metadata["torch"]
    assert main(["calibrate", "--refit", "--raw", str(raw), "--out", str(tmp_path / "again.json")]) == 0
    assert load_profile(tmp_path / "again.json").gemm == profile.gemm
    assert main(["calibrate", "reference", "--quick", "--out", str(steps)]) == 0
    capsys.readouterr()
    assert main(["calibrate", "validate", str(steps), "--gpu", "h100", "--profile", str(prof),
                 "--out", str(tmp_path / "val")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 7 and {c["category"] for c in report["categories"]} == {"prefill", "decode", "mixed"}
    assert (tmp_path / "val" / "predicted_vs_measured.png").stat().st_size > 0


@pytest.mark.parametrize("argv,needle", [
    (["calibrate", "--quick", "--out", "x.json", "--suites", "gemm,magic"], "--suites: unknown ['magic']"),
    (["calibrate", "--quick", "--out", "x.json", "--tp", "one"], "--tp = 'one'"),
    (["calibrate", "--quick", "--out", "x.json", "--tp", "0"], "--tp = '0'"),
    (["calibrate", "--quick", "--out", "x.json", "--models", "mixtral-8x7b"], "name at least one dense model"),
    (["calibrate", "--refit", "--out", "x.json"], "--raw = None"),
    (["calibrate", "validate", "missing.csv", "--gpu", "h100"], "measurements: no such file 'missing.csv'"),
    (["calibrate", "validate", "x.csv"], "--gpu: required"),
    (["calibrate", "reference", "--quick", "--out", "x.csv", "--tp", "1,2"], "--tp = '1,2': reference runs one"),
])
def test_calibrate_cli_errors(argv, needle, capsys) -> None:
    pytest.importorskip("torch")
    from sim.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_bad_raw_and_measurement_files_give_one_line_errors(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    from sim.cli import main

    raw, steps = tmp_path / "raw.json", tmp_path / "steps.csv"
    raw.write_text("{oops")
    steps.write_text('model,category,execution,tp,shape,seconds\nllama-3-8b,decode,graph,1,"{bad",0.01\n')
    assert main(["calibrate", "--refit", "--raw", str(raw), "--out", str(tmp_path / "p.json")]) == 2
    assert main(["calibrate", "validate", str(steps), "--gpu", "h100"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not raw calibration measurements" in err[0] and "row 1: shape = '{bad'" in err[1]


def test_tensor_parallel_reference_steps_on_cpu(tmp_path, capsys) -> None:
    """`calibrate reference --tp 2`: one Gloo process per rank, rank 0's timings, TP recorded for pricing."""
    pytest.importorskip("torch")
    import pandas as pd

    from sim.cli import main

    out = tmp_path / "tp2.csv"
    assert main(["calibrate", "reference", "--quick", "--tp", "2", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(df) == 7 and set(df["tp"]) == {2} and (df["seconds"] > 0).all()
    capsys.readouterr()
    assert main(["calibrate", "validate", str(out), "--gpu", "h100", "--profile", "datasheet"]) == 0
    assert json.loads(capsys.readouterr().out)["categories"][0]["tp"] == 2
