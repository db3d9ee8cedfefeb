"""The SimPy serving engine, its config and results (the `servesim` command line and the searches over many runs
are in the `servesim` package).

    from sim import load_config, simulate
    results = simulate(load_config("examples/default.yaml", ["workloads.0.arrival.rate=10"]))
    results.requests, results.steps, results.summary
"""

from sim.config import SimConfig, load_config
from sim.engine import simulate
from sim.metrics import Results

__all__ = ["Results", "SimConfig", "load_config", "simulate"]
