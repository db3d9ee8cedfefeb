"""A run as a Chrome trace (`trace.json`), the event format Perfetto (ui.perfetto.dev) and chrome://tracing open.

One process per replica (named by its pool), with two tracks: `steps`, a slice per forward step named by its
batch (`3P+40D`: prefill chunks and decodes; `V` verifications) with its tokens, KV use and queue lengths as
arguments; and `requests`, each request's life as an async slice from arrival to its last token with nested
`queue` (arrival to first step), `prefill` (to the first token) and `decode` slices (a rejected request is
an instant event with its reason; one rejected before reaching a replica goes on the `cluster` process). A
disaggregated run adds to `cluster` each request's KV transfer as an async slice, and one counter per link
port with its rate in GB/s. Times are microseconds of simulated
time. Events are written one by one, so the file is written without holding it in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sim.metrics import Results

LINKS_PID = 0  # replicas are pids 1..n


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _name(row: Any) -> str:
    parts = [f"{row.prefill_requests}P" if row.prefill_requests else "", f"{row.decode_requests}D"
             if row.decode_requests else "", f"{row.verify_requests}V" if row.verify_requests else ""]
    return "+".join(p for p in parts if p) or "idle"


def _step_events(results: Results) -> Iterator[dict[str, Any]]:
    for row in results.steps.itertuples(index=False):
        yield {"ph": "X", "cat": "step", "name": _name(row), "pid": int(row.replica) + 1, "tid": 1,
               "ts": _us(row.start_s), "dur": _us(row.duration_s),
               "args": {"prefill_tokens": int(row.prefill_tokens), "decode_tokens": int(row.decode_tokens),
                        "kv_blocks_used": int(row.kv_blocks_used), "waiting": int(row.waiting),
                        "running": int(row.running), "preemptions": int(row.preemptions),
                        "execution": row.execution}}


def _request_events(results: Results) -> Iterator[dict[str, Any]]:
    for row in results.requests.itertuples(index=False):
        pid = int(row.replica) + 1 if row.replica >= 0 else LINKS_PID
        rid = int(row.request_id)
        base = {"cat": "request", "pid": pid, "tid": 2, "id": rid}
        if row.status == "rejected":
            yield {"ph": "i", "s": "t", "name": f"rejected {rid}", "pid": pid, "tid": 2, "ts": _us(row.arrival_s),
                   "args": {"reason": row.reject_reason}}
            continue
        args = {"prompt_tokens": int(row.prompt_tokens), "output_tokens": int(row.output_tokens),
                "ttft_s": row.ttft_s, "preemptions": int(row.preemptions)}
        if row.status == "cancelled":  # a fan-out sample stopped by its group (its life ends there)
            args |= {"cancelled": True, "generated_tokens": int(row.generated_tokens)}
        yield {**base, "ph": "b", "name": f"request {rid}", "ts": _us(row.arrival_s), "args": args}
        for name, a, b in (("queue", row.arrival_s, row.first_scheduled_s),
                           ("prefill", row.first_scheduled_s, row.first_token_s),
                           ("decode", row.first_token_s, row.finish_s)):
            if b > a:
                yield {**base, "ph": "b", "name": name, "ts": _us(a)}
                yield {**base, "ph": "e", "name": name, "ts": _us(b)}
        yield {**base, "ph": "e", "name": f"request {rid}", "ts": _us(row.finish_s)}


def _link_events(results: Results) -> Iterator[dict[str, Any]]:
    req = results.requests
    if "kv_ready_s" in req:
        for row in req.itertuples(index=False):
            if not math.isnan(row.kv_ready_s):
                base = {"cat": "kv", "pid": LINKS_PID, "tid": 1, "id": int(row.request_id),
                        "name": f"KV {int(row.request_id)} to replica {int(row.decode_replica)}"}
                yield {**base, "ph": "b", "ts": _us(row.kv_ready_s - row.kv_transfer_s),
                       "args": {"bytes": float(row.kv_bytes)}}
                yield {**base, "ph": "e", "ts": _us(row.kv_ready_s)}
    if results.links is not None:
        for row in results.links.itertuples(index=False):
            yield {"ph": "C", "name": row.link, "pid": LINKS_PID, "ts": _us(row.time_s),
                   "args": {"GB/s": row.rate_bytes_s / 1e9}}


def _metadata(results: Results) -> Iterator[dict[str, Any]]:
    pools = results.steps.groupby("replica")["pool"].first().to_dict() if len(results.steps) else {}
    for replica in sorted(set(results.requests["replica"].tolist()) | set(pools)):
        if replica < 0:
            continue
        pid = int(replica) + 1
        yield {"ph": "M", "name": "process_name", "pid": pid,
               "args": {"name": f"replica {int(replica)} ({pools.get(replica, 'colocated')})"}}
        yield {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}}
        for tid, name in ((1, "steps"), (2, "requests")):
            yield {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
    if results.links is not None or "kv_ready_s" in results.requests or (results.requests["replica"] < 0).any():
        yield {"ph": "M", "name": "process_name", "pid": LINKS_PID, "args": {"name": "cluster (KV links, rejections)"}}


def write_trace(results: Results, path: str | Path) -> Path:
    """Write `results` as a Chrome trace event file (JSON object format) at `path`."""
    path = Path(path)
    with open(path, "w") as f:
        _write(f, results)
    return path


def _write(f: IO[str], results: Results) -> None:
    c = results.config
    meta = {"model": c.model, "gpu": c.hardware.gpu, "tp": c.hardware.tp, "scheduler": c.scheduler.name}
    f.write('{"displayTimeUnit": "ms", "otherData": ' + json.dumps(meta) + ', "traceEvents": [\n')
    first = True
    for source in (_metadata, _step_events, _request_events, _link_events):
        for event in source(results):
            f.write(("" if first else ",\n") + json.dumps(event, allow_nan=False))
            first = False
    f.write("\n]}\n")
