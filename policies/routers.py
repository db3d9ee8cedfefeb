"""Routers: pick the replica for each arriving request (ties go to the lowest index, for determinism)."""

from __future__ import annotations

from collections.abc import Sequence

from policies.state import ReplicaState


class Router:
    """Base: `route(rid, replicas)` returns an index into `replicas`."""

    def route(self, rid: int, replicas: Sequence[ReplicaState]) -> int:
        raise NotImplementedError


class RoundRobin(Router):
    """Replicas in turn, ignoring load."""

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


ROUTERS: dict[str, type[Router]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "least_kv": LeastKvLoad,
}
