"""Links as shared SimPy resources: transfers in flight share each link's bandwidth max-min fairly.

A transfer (a flow) crosses one or more links, e.g. the sender's egress port and the receiver's ingress
port, and may carry its own rate cap (a layer-wise KV stream cannot outrun the prefill that produces it).
Rates are the max-min fair allocation (progressive filling, Bertsekas & Gallager, "Data Networks", 6.5):
every flow gets the same share of a bottleneck link unless it is held lower elsewhere. Rates are
recomputed whenever a flow starts or ends, so no link ever carries more than its bandwidth. A transfer pays
the largest latency of its links once before its bytes start moving (the alpha of an alpha-beta model).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import simpy


@dataclass
class Link:
    """One direction of one port: `bandwidth` bytes/s, `latency` s; `moved` counts the bytes it carried."""

    name: str
    bandwidth: float
    latency: float
    moved: float = 0.0


@dataclass
class Flow:
    links: tuple[Link, ...]
    size: float
    remaining: float
    cap: float  # the flow's own rate limit (inf when none)
    done: simpy.Event
    rate: float = 0.0


@dataclass
class LinkSample:
    """Rows of the link timeline: from `time_s` on, `link` carries `rate` bytes/s over `flows` transfers."""

    rows: list[tuple[float, str, float, float, int]] = field(default_factory=list)


def fair_rates(flows: list[Flow]) -> list[float]:
    """Max-min fair rates of `flows` over their links and caps (progressive filling)."""
    rates = [0.0] * len(flows)
    left = {id(link): link.bandwidth for f in flows for link in f.links}
    bandwidth = dict(left)
    active = set(range(len(flows)))
    while active:
        users: dict[int, int] = {}
        for i in active:
            for link in flows[i].links:
                users[id(link)] = users.get(id(link), 0) + 1
        share = min(left[k] / n for k, n in users.items())
        share = min(share, min(flows[i].cap - rates[i] for i in active))
        frozen = set()
        for i in active:
            rates[i] += share
            if rates[i] >= flows[i].cap * (1 - 1e-12):
                frozen.add(i)
        for i in active:
            for link in flows[i].links:
                left[id(link)] -= share
        saturated = {k for k, v in left.items() if v <= 1e-12 * bandwidth[k]}
        frozen |= {i for i in active if any(id(link) in saturated for link in flows[i].links)}
        active -= frozen
    return rates


class Network:
    """The links of a cluster and the transfers in flight over them."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.links: dict[str, Link] = {}
        self.flows: list[Flow] = []
        self.timeline = LinkSample()
        self._last = 0.0
        self._kick: simpy.Event | None = None
        self._recorded: dict[str, tuple[float, int]] = {}
        env.process(self._loop())

    def link(self, name: str, bandwidth: float, latency: float) -> Link:
        """The link called `name`, created on first use."""
        if name not in self.links:
            self.links[name] = Link(name, bandwidth, latency)
        return self.links[name]

    def transfer(self, links: tuple[Link, ...], size: float, cap: float = float("inf")) -> simpy.Process:
        """A process that ends when `size` bytes have crossed `links` (after their latency)."""
        return self.env.process(self._transfer(links, size, cap))

    def _transfer(self, links: tuple[Link, ...], size: float, cap: float) -> Iterator[simpy.Event]:
        latency = max(link.latency for link in links)
        if latency > 0:
            yield self.env.timeout(latency)
        if size <= 0:
            return
        flow = Flow(links, size, size, cap, self.env.event())
        self._advance()
        self.flows.append(flow)
        self._reallocate()
        yield flow.done

    # ---- the event loop ---------------------------------------------------------------------------------
    def _advance(self) -> None:
        """Move every flow forward at its rate since the last update; finish those that are done."""
        dt = self.env.now - self._last
        self._last = self.env.now
        if dt > 0:
            for f in self.flows:
                moved = min(f.remaining, f.rate * dt)
                f.remaining -= moved
                for link in f.links:
                    link.moved += moved
        finished = [f for f in self.flows if self._done(f)]
        if finished:
            for f in finished:
                f.done.succeed()
            self.flows = [f for f in self.flows if not self._done(f)]
            self._reallocate()

    @staticmethod
    def _done(f: Flow) -> bool:
        """Done when what is left is rounding: a byte fraction, or under a nanosecond at its rate (finer
        than the clock resolves late in a long run, where waiting for it would never advance time)."""
        return f.remaining <= max(1e-9 * f.size + 1e-6, f.rate * 1e-9)

    def _reallocate(self) -> None:
        for f, rate in zip(self.flows, fair_rates(self.flows)):
            f.rate = rate
        totals: dict[str, tuple[float, int]] = {}
        for f in self.flows:
            for link in f.links:
                rate, n = totals.get(link.name, (0.0, 0))
                totals[link.name] = (rate + f.rate, n + 1)
        for name in sorted(set(totals) | set(self._recorded)):
            now = totals.get(name, (0.0, 0))
            if self._recorded.get(name, (0.0, 0)) != now:
                self._recorded[name] = now
                self.timeline.rows.append((self.env.now, name, now[0], self.links[name].bandwidth, now[1]))
        if self._kick is not None and not self._kick.triggered:
            self._kick.succeed()

    def _loop(self) -> Iterator[simpy.Event]:
        while True:
            self._kick = self.env.event()
            if not self.flows:
                yield self._kick
                continue
            dt = min(f.remaining / f.rate for f in self.flows if f.rate > 0)
            yield self.env.timeout(dt) | self._kick
            self._advance()
