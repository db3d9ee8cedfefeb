"""Routers: pick the replica for each arriving request (ties go to the lowest index, for determinism)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.state import ReplicaState


class Router:
    """Base: `route(rid, replicas)` returns an index into `replicas`; `reads_state` says whether the choice
    looks at the replicas' state (the skip-ahead lets a replica run through an arrival's step when it does not)."""

    reads_state = True

    def route(self, rid: int, replicas: Sequence[ReplicaState]) -> int:
        raise NotImplementedError


class RoundRobin(Router):
    """Replicas in turn, ignoring load."""

    reads_state = False

    def __init__(self) -> None:
        self._next = 0

    def route(self, rid: int, replicas: Sequence[ReplicaState]) -> int:
        i = self._next % len(replicas)
        self._next += 1
        return i


class LeastOutstanding(Router):
    """Fewest requests waiting or running (the "least outstanding requests" of load balancers)."""

    def route(self, rid: int, replicas: Sequence[ReplicaState]) -> int:
        return min(range(len(replicas)), key=lambda i: (replicas[i].outstanding, i))


class LeastKvLoad(Router):
    """Lowest fraction of KV blocks in use or owed: blocks held plus the prompts still waiting."""

    def route(self, rid: int, replicas: Sequence[ReplicaState]) -> int:
        def load(i: int) -> tuple[float, int]:
            s = replicas[i]
            owed = sum(int(s.kv.blocks_for(s.tokens_to_run(w))) for w in s.waiting)
            return (s.kv.used + owed) / s.kv.num_blocks, i

        return min(range(len(replicas)), key=load)


class PowerOfTwoChoices(Router):
    """Two replicas drawn at random, the less loaded one taken (Mitzenmacher, "The Power of Two Choices in
    Randomized Load Balancing", IEEE TPDS 2001)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def route(self, rid: int, replicas: Sequence[ReplicaState]) -> int:
        if len(replicas) == 1:
            return 0
        a, b = self.rng.choice(len(replicas), size=2, replace=False).tolist()
        return min((replicas[a].outstanding, a), (replicas[b].outstanding, b))[1]


class PrefixAffinity(Router):
    """The replica whose prefix cache holds most of the request's leading blocks, among those within
    `slack` outstanding requests of the least loaded one (a load cap, as in cache-aware routers such as
    SGLang's); ties go to the less loaded. Without prefix caching it is least-outstanding."""

    def __init__(self, slack: int) -> None:
        self.slack = slack

    def route(self, rid: int, replicas: Sequence[ReplicaState]) -> int:
        least = min(s.outstanding for s in replicas)

        def score(i: int) -> tuple[int, int, int]:
            s = replicas[i]
            hit = s.kv.cache.match(s.req.keys_of(rid).tolist())[0] if s.kv.cache is not None else 0
            return -hit, s.outstanding, i

        return min((i for i, s in enumerate(replicas) if s.outstanding <= least + self.slack), key=score)


ROUTERS = ("round_robin", "least_outstanding", "least_kv", "power_of_two", "prefix_affinity")


def make_router(name: str, seed: int, affinity_slack: int = 8) -> Router:
    """A router by name; `power_of_two` draws from a generator seeded by the run's seed."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_outstanding":
        return LeastOutstanding()
    if name == "least_kv":
        return LeastKvLoad()
    if name == "power_of_two":
        return PowerOfTwoChoices(np.random.default_rng([seed, 2]))
    if name == "prefix_affinity":
        return PrefixAffinity(affinity_slack)
    raise ValueError(f"router {name!r} is not one of {', '.join(ROUTERS)}")
