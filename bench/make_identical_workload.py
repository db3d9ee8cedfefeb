"""The identical-workload request list of issue 28 (servesim against Vidur on the same requests), as a trace.

Llama-2-70B on two A100-80GB (TP 2), one replica, Poisson arrivals at 0.526 req/s, Azure LLM 2023 conversation
lengths (Patel et al., Splitwise, ISCA 2024) restricted to requests of at most 4,096 tokens (prompt + output:
the model's context), drawn with replacement. Written in the Azure trace's own format so that any simulator
reads it:

    python bench/make_identical_workload.py [--trace ../shared/traces/azure_llm_2023_conv.csv] [--requests 100000]

writes bench/data/identical_workload_100k.csv (seed 0); `bench/identical_workload.yaml` replays it.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from traces.readers import read_trace

ROOT = Path(__file__).resolve().parents[1]
RATE = 0.526  # requests per second
MAX_TOKENS = 4096


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"))
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "data" / "identical_workload_100k.csv"))
    args = ap.parse_args(argv)
    trace = read_trace(args.trace)
    fits = np.flatnonzero(trace.prompt + trace.output <= MAX_TOKENS)
    rng = np.random.default_rng(0)
    rows = fits[rng.integers(0, fits.size, args.requests)]
    times = np.cumsum(rng.exponential(1.0 / RATE, args.requests))
    start = datetime(2023, 11, 16)
    with open(args.out, "w") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for t, p, o in zip(times.tolist(), trace.prompt[rows].tolist(), trace.output[rows].tolist()):
            f.write(f"{(start + timedelta(seconds=t)).strftime('%Y-%m-%d %H:%M:%S.%f')},{p},{o}\n")
    print(f"wrote {args.requests} requests ({fits.size} of {len(trace)} trace rows fit {MAX_TOKENS} tokens) to "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
