"""Skip-ahead: advance a replica over a stretch of decode-only steps at once.

Most steps of a long run decode the same running requests again, one token each (97.6% of the steps of
`bench/identical_workload.yaml`). While nobody waits, every running request decodes and nothing arrives, each
next step is known: the same decodes one token further, less the requests that just finished. `SkipAhead`
finds how many such steps come before the next arrival or a step the free KV blocks could not hold, prices
them in one vectorised pass (`CostModel.price_decodes`, exactly as each would be priced alone), writes every
step's tokens, finishes and blocks into the state, and the replica sleeps once to the last step's end; the
step log gets every step's row. On a 3,000-request run of that workload, 95.5% of the steps (`vllm`; 92.7%
`sarathi`) fall in stretches of 46 steps on average. The results are identical to stepping one by one
(`tests/test_skip_ahead.py`); runs a stretch could not be proven for (speculation, disaggregation,
closed-loop clients and sessions, prefix caching, KV token budgets, other executors, schedulers without the
promise `Scheduler.decode_stretches`) step one by one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hardware.cost import CostModel
from policies.base import Scheduler
from policies.batch import Batch
from policies.state import ReplicaState, Status
from sim.executor import StepOutcome

FIRST_GUESS = 8  # steps priced first when no step was priced before
MAX_STEPS = 4096  # steps priced at once at most


class ArrivalClock:
    """Open-loop arrival times in order and how many have arrived: a stretch ends before the next one (the
    router may look at any replica's state when it routes a request)."""

    def __init__(self, times: np.ndarray) -> None:
        self.times = np.sort(np.asarray(times, dtype=np.float64))
        self.count = 0

    def next(self) -> float:
        return float(self.times[self.count]) if self.count < self.times.size else math.inf


@dataclass(frozen=True, slots=True)
class Stretch:
    """Consecutive decode steps run by `SkipAhead.advance`, one value per step: seconds, end time, MFU, MBU,
    whether it runs as a CUDA graph, requests decoded, KV blocks in use and requests running after the step."""

    seconds: np.ndarray
    ends: np.ndarray
    mfu: np.ndarray
    mbu: np.ndarray
    graph: np.ndarray
    decodes: np.ndarray
    used: np.ndarray
    running: np.ndarray

    @property
    def steps(self) -> int:
        return self.seconds.size


def folds(policy: Scheduler) -> bool:
    """Whether `policy` promises that, with nobody waiting and every running request decoding, its next step
    decodes every running request in running order (`Scheduler.decode_stretches`), and hears nothing back."""
    return isinstance(policy, Scheduler) and type(policy).decode_stretches and \
        type(policy).on_step_end is Scheduler.on_step_end


class SkipAhead:
    """Finds and runs stretches for one replica (see the module docstring)."""

    def __init__(self, cost_model: CostModel, arrivals: ArrivalClock, blind: bool = False) -> None:
        self.cost_model, self.arrivals = cost_model, arrivals
        self.blind = blind  # the router reads no replica's state: a stretch may run through an arrival's step
        self.step_seconds = 0.0  # the last step priced: how many steps to price first
        self.unfit: tuple[np.ndarray, np.ndarray, StepOutcome] | None = None  # a next step priced but not run
        self.fans: bool | None = None  # whether the run has fan-out samples (found at the first stretch)

    def advance(self, state: ReplicaState, batch: Batch, now: float) -> Stretch | StepOutcome | None:
        """Run the stretch that begins with `batch` at `now` on `state` (every step's tokens, finishes and
        blocks, as `complete_step` and the scheduler would one by one), or return None when `batch` is not a
        decode of every running request with nobody waiting, or `batch`'s price when it ends after the next
        arrival (it runs alone). A stretch goes on through requests finishing (the others decode on) and ends
        before the next arrival, a step the free blocks cannot hold, a fan-out sample finishing, or when no
        request is left. Nobody looks at the state before its end: it is the next arrival's router that would,
        so where none looks at it (`blind`: one replica, or a router whose `reads_state` is false) the stretch
        takes in the step the arrival falls in, whose end is where the replica first hears of it."""
        ids = batch.decode_ids
        if (state.waiting or state.unforked or batch.prefill_ids.size or batch.verify_ids.size or batch.pad_rows
                or batch.prefill_layers < 1.0 or batch.swap_in_tokens or batch.swap_out_tokens
                or ids.tolist() != state.running):
            return None
        unfit, self.unfit = self.unfit, None
        if unfit is not None and np.array_equal(unfit[0], ids) and np.array_equal(unfit[1], batch.decode_computed):
            return unfit[2]  # (priced at the end of the last stretch: it ends after the next arrival)
        r, kv = state.req, state.kv
        context, held, gen = batch.decode_computed, kv.blocks[ids], r.generated[ids]
        left = r.output[ids] - gen  # the step (from 1) in which each request emits its last token
        stop = int(left.max())
        if self.fans is None:
            self.fans = bool((r.group >= 0).any())
        if self.fans and (fan := r.group[ids] >= 0).any():  # a fan-out sample finishing may cancel its siblings:
            stop = min(stop, int(left[fan].min()) - 1)  # that step runs alone
            if stop == 0:
                return None
        arrival, available = self.arrivals.next(), kv.available
        guess = FIRST_GUESS if not self.step_seconds else (arrival - now) / self.step_seconds + 2
        size = max(1, min(stop, int(min(guess, MAX_STEPS))))
        pieces, done, end = [], 0, now
        while True:
            run = self.cost_model.price_decodes(context + done, size, left - done)
            ends = run.seconds.copy()
            ends[0] += end
            ends = np.cumsum(ends)  # (sequential sums from `end`: the clock's own)
            step = np.arange(done + 1, done + size + 1)[:, None]  # (from 1)
            grown = np.maximum(kv.blocks_for(context + step) - held, 0)  # beyond now's, per request
            # a step's blocks must fit what is free now and what the requests finished before it gave back
            on = left >= step
            room = np.where(on, grown, -held).sum(1) <= available
            fits = (ends < arrival) & room
            k = size if fits.all() else int(fits.argmin())
            # the step an arrival falls in (begun before it, ended after it): the replica hears of the
            # request only at its end, so when nobody looks at the state in between, it runs in the stretch
            straddles = k < size and self.blind and room[k] and ends[k] > arrival and \
                (ends[k - 1] if k else end) < arrival
            k += straddles
            pieces.append((run, ends, grown, k))
            done += k
            if straddles:
                break
            if k < size:  # the next step, priced: the scheduler may make it next (it ends after an arrival)
                alive = left > done
                self.unfit = ids[alive], context[alive] + done, StepOutcome(
                    seconds=float(run.seconds[k]), mfu=float(run.mfu[k]), mbu=float(run.mbu[k]),
                    execution="graph" if run.graph[k] else "eager")
                break
            if done >= stop:
                break
            end = float(ends[-1])
            size = min(stop - done, 2 * size)
        if not done:  # `batch` itself ends after the next arrival: it runs alone, at the price just found
            outcome, self.unfit = self.unfit[2], None
            return outcome
        if len(pieces) == 1:
            run, ends, grown, k = pieces[0]
            seconds, mfu, mbu, graph, decodes = run.seconds, run.mfu, run.mbu, run.graph, run.decodes
            if k < ends.size:
                seconds, ends, mfu, mbu, graph, decodes, grown = (a[:k] for a in (seconds, ends, mfu, mbu, graph,
                                                                                  decodes, grown))
        else:
            seconds, ends, mfu, mbu, graph, decodes, grown = (np.concatenate(a) for a in zip(*(
                (run.seconds[:k], ends[:k], run.mfu[:k], run.mbu[:k], run.graph[:k], run.decodes[:k], grown[:k])
                for run, ends, grown, k in pieces)))
        self.step_seconds = float(seconds[-1])
        # the steps' outcome: as `complete_step` and the scheduler would write it, step by step
        took = np.minimum(left, done)  # steps each request decoded in
        rows = np.repeat(np.arange(ids.size), took)
        nth = np.arange(rows.size) - np.repeat(np.cumsum(took) - took, took)
        r.token_time[r.token_offset[ids][rows] + gen[rows] + nth] = ends[nth]
        r.generated[ids] = gen + took
        r.computed[ids] = context + took
        after = left > np.arange(1, done + 1)[:, None]  # still running after each step
        used_before = kv.used
        finished = left <= done
        alive = ~finished
        if finished.any():
            gone = ids[finished]
            r.status[gone] = Status.FINISHED
            r.finish[gone] = ends[left[finished] - 1]
            kv.release(gone)
            out = set(gone.tolist())
            state.running = [rid for rid in state.running if rid not in out]
        need = grown[-1][alive]  # (`BlockManager.grow_many`: the room check above found the blocks)
        kv.take(int(need.sum()))
        kv.blocks[ids[alive]] += need
        used = used_before + np.where(after, grown, -held).sum(1)
        return Stretch(seconds, ends, mfu, mbu, graph, decodes, used, after.sum(1))


def delays_to(now: float, end: float) -> list[float]:
    """The delays of the timeouts, one after the other from `now`, that land on exactly `end` (SimPy adds
    now + delay): the longest delay that does not pass `end`, then, where the spacing of floats leaves `end`
    out of its reach, the rest (exact: the two times are within a unit in the last place)."""
    d = end - now
    while now + d < end:
        d = np.nextafter(d, math.inf)
    while now + d > end:
        d = np.nextafter(d, -math.inf)
    there = now + float(d)
    return [float(d)] if there == end else [float(d), end - there]
