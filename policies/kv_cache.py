"""Paged KV cache bookkeeping of one replica, with optional automatic prefix caching.

Blocks are counted, not addressed (Kwon et al., PagedAttention, SOSP 2023). With prefix caching, a block
whose tokens have a known identity (a key: a hash of the prefix up to and including it) stays cached
after its request frees it, and a later request whose prompt starts with the same keys reuses it instead
of recomputing it (vLLM's automatic prefix caching). Cached blocks nobody holds are evicted least
recently freed first when memory is needed; a block some request holds is never evicted.

Each block is in exactly one of three states: free (holds nothing), held by one or more requests, or
cached and evictable (refcount 0). `free + held + evictable == num_blocks` at all times.

With swap preemption (vLLM's `preemption_mode="swap"`), a preempted request's blocks move to host memory
(`host_blocks` of room, the swap space) and back before it resumes: `host_free + swapped == host_blocks`.

Fan-out samples of one prompt share its full blocks (`fork`): through the prefix cache's refcounts where the
blocks are cached, else as a group whose blocks are freed once, when its last holder lets them go.

With a host tier for the prefix cache (LMCache-style CPU offload), a cached block evicted from the GPU is kept
in host memory (`host_cache_blocks` of room, least recently spilled dropped first); a later request whose
prefix continues into host-cached blocks loads them back into fresh GPU blocks instead of recomputing them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A lookup's result: leading blocks already cached, and how many of them are now evictable."""

    blocks: int = 0
    tokens: int = 0
    reclaimed: int = 0  # hit blocks that sit in the evictable pool: taking them uses up available room
    host: int = 0  # of the hit blocks, those loaded back from the host tier (they need fresh GPU blocks)


NO_HIT = PrefixHit()
# Journal entries (`BlockManager.keep_journal`): what a replay's executor needs to place shared blocks
DROP, HIT, CACHED, EVICT = range(4)  # (DROP, rid), (HIT, rid, *keys), (CACHED, rid, block index, key), (EVICT, key)


class PrefixCache:
    """Refcounted blocks by key, with an LRU pool of the unreferenced ones, and optionally a host tier that
    keeps evicted blocks (an LRU of `host_capacity` keys)."""

    def __init__(self, host_capacity: int = 0) -> None:
        self.refs: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.host_capacity = host_capacity
        self.host: OrderedDict[int, None] = OrderedDict()
        self.journal: list[tuple[int, ...]] | None = None  # `BlockManager.journal`'s list, when kept

    def match(self, keys: Iterable[int]) -> tuple[int, int, int]:
        """(leading keys cached on the GPU, how many of those are evictable, and how many keys after them the
        host tier holds)."""
        hit = reclaimed = host = 0
        for key in keys:
            refs = self.refs.get(key)
            if refs is not None and not host:
                hit += 1
                reclaimed += refs == 0
            elif refs is None and key in self.host:
                host += 1
            else:  # not cached, or on the GPU after host blocks (the match stops at the host run's end)
                break
        return hit, reclaimed, host

    def load(self, keys: Iterable[int]) -> None:
        """Host-tier blocks loaded back into GPU blocks, held by one request."""
        for key in keys:
            del self.host[key]
            assert key not in self.refs, "loading a block the GPU holds"
            self.refs[key] = 1

    def acquire(self, keys: Iterable[int]) -> None:
        for key in keys:
            if self.refs[key] == 0:
                del self.evictable[key]
            self.refs[key] += 1

    def register(self, key: int) -> bool:
        """A held block was just filled with `key`'s tokens; False when another copy is already cached."""
        if key in self.refs:
            return False
        self.refs[key] = 1
        return True

    def release(self, keys: Iterable[int]) -> None:
        for key in keys:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.evictable[key] = None

    def evict(self, n: int) -> int:
        """Drop up to `n` unreferenced blocks, least recently freed first, spilling them to the host tier when
        there is one; returns how many."""
        done = 0
        while done < n and self.evictable:
            key, _ = self.evictable.popitem(last=False)
            assert self.refs.pop(key) == 0, "evicting a block in use"
            if self.journal is not None:
                self.journal.append((EVICT, key))
            if self.host_capacity:
                self.host[key] = None
                self.host.move_to_end(key)
                if len(self.host) > self.host_capacity:
                    self.host.popitem(last=False)
            done += 1
        return done


class BlockManager:
    """Blocks of `block_size` tokens: per-request counts in `blocks`, and the pool's state."""

    def __init__(self, requests, num_blocks: int, block_size: int, watermark: float = 0.0,
                 prefix_caching: bool = False, blocks: np.ndarray | None = None, max_tokens: int | None = None,
                 host_blocks: int = 0, host_cache_blocks: int = 0) -> None:
        self.req = requests
        # Blocks each request holds here; replicas of one pool share `requests.blocks`, and a disaggregated
        # decode pool has its own array, since a request holds KV on both sides while it is transferred.
        self.blocks = requests.blocks if blocks is None else blocks
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free = num_blocks
        self.watermark_blocks = int(watermark * num_blocks)
        self.cache = PrefixCache(host_cache_blocks) if prefix_caching else None
        self.held: dict[int, list[int]] = {}  # request -> keys of the cached blocks it references, in order
        # KV eviction to a token budget (StreamingLLM, H2O): a request holds the budget's blocks plus the one
        # being written, however long its context
        self.max_blocks = None if max_tokens is None else -(-max_tokens // block_size) + 1
        self.host_blocks = self.host_free = host_blocks  # swap space in host memory
        self.swapped: dict[int, int] = {}  # request -> its blocks held in host memory
        self.groups: dict[int, list[int]] = {}  # fan-out: first sample -> [blocks shared outside the cache, holders]
        self.group_of: dict[int, int] = {}  # sample -> the group whose blocks it holds
        self.journal: list[tuple[int, ...]] | None = None

    def keep_journal(self) -> list[tuple[int, ...]]:
        """Record, in order, each release, prefix hit, newly cached block and eviction (a replay's executor
        reads them to give requests the physical blocks the prefix cache shares); returns the list."""
        self.journal = []
        if self.cache is not None:
            self.cache.journal = self.journal
        return self.journal

    # ---- counts ---------------------------------------------------------------------------------------
    @property
    def evictable(self) -> int:
        return len(self.cache.evictable) if self.cache is not None else 0

    @property
    def available(self) -> int:
        """Blocks an allocation can use: free ones plus cached ones nobody holds."""
        return self.free + self.evictable

    @property
    def used(self) -> int:
        """Blocks held by requests."""
        return self.num_blocks - self.available

    def blocks_for(self, tokens: int | np.ndarray) -> int | np.ndarray:
        n = -(-tokens // self.block_size)
        return n if self.max_blocks is None else np.minimum(n, self.max_blocks)

    def can_allocate(self, blocks: int, watermark: bool = True) -> bool:
        """Whether `blocks` more fit, keeping the watermark free when asked (vLLM admits new requests so)."""
        return self.available - blocks >= (self.watermark_blocks if watermark else 0)

    # ---- allocation -----------------------------------------------------------------------------------
    def take(self, n: int) -> None:
        """Use `n` blocks, evicting cached ones when the free pool is short. Callers check room first."""
        if n > self.free:
            self.free += self.cache.evict(n - self.free) if self.cache is not None else 0
            if n > self.free:
                raise RuntimeError(f"KV overflow: {n} blocks asked, {self.free} available")
        self.free -= n

    def grow_to(self, rid: int, tokens: int) -> int:
        """Give `rid` blocks for `tokens` tokens of KV; returns the blocks added."""
        need = int(self.blocks_for(tokens)) - int(self.blocks[rid])
        if need <= 0:
            return 0
        self.take(need)
        self.blocks[rid] += need
        return need

    def grow_many(self, ids: np.ndarray, tokens: np.ndarray) -> bool:
        """Blocks for `tokens[i]` tokens to each `ids[i]` if they all fit (no watermark); False otherwise."""
        need = np.maximum(self.blocks_for(tokens) - self.blocks[ids], 0)
        total = int(need.sum())
        if total > self.available:
            return False
        self.take(total)
        self.blocks[ids] += need
        return True

    def shrink_to(self, ids: np.ndarray, tokens: np.ndarray) -> None:
        """Free the blocks beyond `tokens[i]` tokens of each `ids[i]` (rejected draft tokens' KV rolled back).
        Only private tail blocks are freed: a prefix-cached block always lies below `tokens`."""
        extra = np.maximum(self.blocks[ids] - self.blocks_for(tokens), 0)
        self.blocks[ids] -= extra
        self.free += int(extra.sum())

    def release(self, rid: int | np.ndarray) -> None:
        """Free every block of one request, or of an array of requests; cached ones stay as evictable, and a
        fan-out group's shared ones are freed with their last holder."""
        if self.cache is None and not self.group_of:
            blocks = self.blocks[rid]
            self.free += int(blocks.sum()) if isinstance(rid, np.ndarray) else int(blocks)
            self.blocks[rid] = 0
            return
        for r in np.atleast_1d(rid).tolist():
            if self.journal is not None:
                self.journal.append((DROP, r))
            held = self.held.pop(r, [])
            if held:
                self.cache.release(reversed(held))  # the tail of a prompt is evicted before its head
            shared = self._leave_group(r)  # (before reading `free`: the group's last holder frees its blocks)
            self.free += int(self.blocks[r]) - len(held) - shared
            self.blocks[r] = 0

    # ---- fan-out (n samples of one prompt) ------------------------------------------------------------------
    def fork(self, first: int, samples: list[int], tokens: int) -> None:
        """`samples` start holding the full blocks of `first`'s `tokens` computed tokens (its prompt): those
        in the prefix cache through their refcounts, the others as a group. The partial last block is not
        shared: each sample gets its own copy when it first writes (copy-on-write), as a block it grows into."""
        held = self.held.get(first, [])
        full = int(self.blocks[first]) - (tokens % self.block_size != 0)
        for s in samples:
            if held:
                self.cache.acquire(held)
                self.held[s] = list(held)
            self.blocks[s] = full
        if full > len(held):
            self.groups[first] = [full - len(held), 1 + len(samples)]
            for s in (first, *samples):
                self.group_of[s] = first

    def _leave_group(self, rid: int) -> int:
        """`rid` lets go of its fan-out group's blocks (freed if it was the last holder); returns how many it held."""
        first = self.group_of.pop(rid, None)
        if first is None:
            return 0
        group = self.groups[first]
        group[1] -= 1
        if group[1] == 0:
            del self.groups[first]
            self.free += group[0]
        return group[0]

    # ---- swap (host memory) ---------------------------------------------------------------------------------
    def swap_out(self, rid: int) -> int:
        """Move `rid`'s blocks to host memory when the swap space holds them; returns the blocks moved (0: no
        room, nothing moved). Only for a request whose blocks are all its own: without prefix caching, and not a
        fan-out sample sharing its prompt's blocks with another (those recompute, as the prefix would otherwise
        be copied out and come back unshared)."""
        n = int(self.blocks[rid])
        shares = rid in self.group_of and self.groups[self.group_of[rid]][1] > 1
        if self.cache is not None or shares or n == 0 or n > self.host_free:
            return 0
        self.host_free -= n
        self.swapped[rid] = n
        self.release(rid)
        return n

    def swap_in(self, rid: int) -> int:
        """Give back `rid`'s host blocks (its GPU blocks are allocated as for any admission); returns them."""
        n = self.swapped.pop(rid, 0)
        self.host_free += n
        return n

    def check(self, members: np.ndarray) -> None:
        """Assert the bookkeeping invariants; `members` are the requests routed to this replica."""
        private = int(self.blocks[members].sum()) - sum(len(k) for k in self.held.values()) \
            - sum(self.groups[g][0] for g in self.group_of.values())
        holders: dict[int, int] = {}
        for g in self.group_of.values():
            holders[g] = holders.get(g, 0) + 1
        assert holders == {g: n for g, (_, n) in self.groups.items()}, "fan-out groups disagree with their holders"
        shared = sum(b for b, _ in self.groups.values())
        if self.cache is not None:
            refs: dict[int, int] = {}
            for keys in self.held.values():
                for k in keys:
                    refs[k] = refs.get(k, 0) + 1
            assert all(self.cache.refs.get(k) == n for k, n in refs.items()), "refcounts disagree with holders"
            assert all(v == 0 for k, v in self.cache.refs.items() if k not in refs), "unheld block not at refcount 0"
            assert set(self.cache.evictable) == {k for k, v in self.cache.refs.items() if v == 0}
            shared += len(refs)
        assert private >= 0 and self.free >= 0
        assert self.free + private + shared + self.evictable == self.num_blocks, "blocks appeared or vanished"
        if self.cache is not None:
            assert len(self.cache.host) <= self.cache.host_capacity, "the host tier holds more than its room"
        assert self.host_free >= 0 and self.host_free + sum(self.swapped.values()) == self.host_blocks, \
            "host blocks appeared or vanished"
        assert all(self.blocks[r] == 0 for r in self.swapped), "a swapped request holds GPU blocks"

    # ---- prefix caching -------------------------------------------------------------------------------
    def lookup(self, rid: int, known_tokens: int) -> PrefixHit:
        """Cached leading blocks of `rid`'s known tokens; the last token is always recomputed."""
        if self.cache is None:
            return NO_HIT
        keys = self.req.keys_of(rid)
        limit = min(len(keys), (known_tokens - 1) // self.block_size)
        hit, reclaimed, host = self.cache.match(keys[:limit].tolist())
        return PrefixHit(hit + host, (hit + host) * self.block_size, reclaimed, host) if hit + host else NO_HIT

    def admission_blocks(self, hit: PrefixHit, kv_tokens: int) -> int:
        """Room an admission with this hit and `kv_tokens` tokens of KV uses up (blocks loaded from the host
        tier need fresh GPU blocks like computed ones)."""
        return int(self.blocks_for(kv_tokens)) - (hit.blocks - hit.host) + hit.reclaimed

    def apply_hit(self, rid: int, hit: PrefixHit) -> None:
        """`rid` starts holding its cached leading blocks; those on the host tier are loaded into new blocks."""
        if not hit.blocks:
            return
        keys = self.req.keys_of(rid)[: hit.blocks].tolist()
        on_gpu = hit.blocks - hit.host
        self.cache.acquire(keys[:on_gpu])
        if hit.host:
            self.cache.load(keys[on_gpu:])
            self.take(hit.host)
        self.held[rid] = keys
        self.blocks[rid] = hit.blocks
        if self.journal is not None:
            self.journal.append((HIT, rid, *keys))

    def register_computed(self, ids: np.ndarray, before: np.ndarray) -> None:
        """Blocks that steps filled (computed went from `before` to now) become cached under their keys."""
        if self.cache is None:
            return
        r, bs = self.req, self.block_size
        first = before // bs
        last = np.minimum(r.computed[ids] // bs, r.num_keys[ids])
        for rid, lo, hi in zip(ids[last > first].tolist(), first[last > first].tolist(), last[last > first].tolist()):
            held = self.held.setdefault(rid, [])
            if len(held) != lo:  # an earlier block was a duplicate kept private: later ones stay private too
                continue
            for key in r.keys_of(rid)[lo:hi].tolist():
                if not self.cache.register(key):
                    break
                if self.journal is not None:
                    self.journal.append((CACHED, rid, len(held), key))
                held.append(key)
