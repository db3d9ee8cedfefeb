"""Token trees for speculative decoding, their expected accepted length, and tree builders.

A tree's nodes are draft tokens 0..n-1 under the root (the newest verified token): `parent[i]` is -1 for a
child of the root, else an earlier node; `rank[i]` is i's place among its siblings (0: the draft's top
choice). Verification runs n + 1 tokens (root included) with a tree attention mask; the target accepts the
longest root-to-node path whose every token it agrees with, plus its own next token.

Acceptance models:
- positional (Sequoia, Chen et al., 2024): at any node, the target's next token is the draft's i-th ranked
  child with probability p_i (exclusive events, sum p_i <= 1), independently of depth;
- draft confidence: every node carries the draft's probability of its token given its parent, and the
  target agrees with it with that probability (a calibrated draft; OPT-Tree, DySpec).
Either way a node is on the accepted path with the product of its path's probabilities, so
E[accepted drafts] = sum over nodes of their path probability, exactly.

Builders: chains; static trees with per-depth widths (k-ary, Medusa-style); Sequoia's dynamic program
(the tree of n nodes and depth <= d with the most expected accepted tokens under the positional model) and
its hardware-aware choice of n and d; OPT-Tree's greedy expansion by path probability under a node budget
(Wang et al., 2024); DySpec's expansion while the path probability stays above a threshold (Xiong et al.,
2024).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class TokenTree:
    """Draft tokens under the verified root, in an order where parents come before children."""

    parent: np.ndarray
    rank: np.ndarray

    @classmethod
    def make(cls, parent: Sequence[int], rank: Sequence[int] | None = None) -> TokenTree:
        """A tree from parents (ranks default to the order of siblings)."""
        p = np.asarray(parent, dtype=np.int64)
        if p.size and (np.any(p >= np.arange(p.size)) or np.any(p < -1)):
            raise ValueError("every parent must be -1 (the root) or an earlier node")
        if rank is None:
            siblings: dict[int, int] = {}
            ranks = []
            for q in p.tolist():
                ranks.append(siblings.get(q, 0))
                siblings[q] = ranks[-1] + 1
            r = np.asarray(ranks, dtype=np.int64)
        else:
            r = np.asarray(rank, dtype=np.int64)
        return cls(p, r)

    @property
    def size(self) -> int:
        return int(self.parent.size)

    @property
    def depth(self) -> np.ndarray:
        """Depth of each node (1 for the root's children)."""
        d = np.zeros(self.size, dtype=np.int64)
        for i, q in enumerate(self.parent.tolist()):
            d[i] = 1 if q < 0 else d[q] + 1
        return d

    @property
    def max_depth(self) -> int:
        return int(self.depth.max(initial=0))

    def level_widths(self) -> np.ndarray:
        """Nodes at each depth 1..max_depth (what each draft step processes)."""
        return np.bincount(self.depth, minlength=self.max_depth + 1)[1:]

    def path_prob(self, node_prob: np.ndarray) -> np.ndarray:
        """Each node's probability of being on the accepted path, from per-node conditional probabilities."""
        out = np.zeros(self.size)
        for i, q in enumerate(self.parent.tolist()):
            out[i] = node_prob[i] * (1.0 if q < 0 else out[q])
        return out

    def positional_probs(self, p: Sequence[float]) -> np.ndarray:
        """Per-node conditional probabilities under the positional model (ranks past the list: 0)."""
        pp = np.asarray(p, dtype=float)
        return np.where(self.rank < pp.size, pp[np.minimum(self.rank, pp.size - 1)], 0.0)

    def expected_tokens(self, node_prob: np.ndarray) -> float:
        """E[accepted drafts + the target's own token] of one verification."""
        return 1.0 + float(self.path_prob(node_prob).sum())

    def sample_accepted(self, node_prob: np.ndarray, rng: np.random.Generator) -> int:
        """Draw the accepted path length: from the root, the target picks child i w.p. its probability
        (siblings exclusive), or none."""
        children: dict[int, list[int]] = {}
        for i, q in enumerate(self.parent.tolist()):
            children.setdefault(q, []).append(i)
        node, depth = -1, 0
        while node in children:
            kids = children[node]
            u, acc, nxt = rng.random(), 0.0, None
            for k in kids:
                acc += node_prob[k]
                if u < acc:
                    nxt = k
                    break
            if nxt is None:
                break
            node, depth = nxt, depth + 1
        return depth


def chain(k: int) -> TokenTree:
    """k draft tokens in a line (plain speculative decoding)."""
    return TokenTree.make(list(range(-1, k - 1)), [0] * k)


def static_tree(widths: Sequence[int]) -> TokenTree:
    """Every node at depth j has widths[j] children (k-ary trees; Medusa's top-k per head as a full tree)."""
    parent: list[int] = []
    rank: list[int] = []
    level = [-1]
    for w in widths:
        nxt = []
        for q in level:
            for r in range(w):
                parent.append(q)
                rank.append(r)
                nxt.append(len(parent) - 1)
        level = nxt
    return TokenTree.make(parent, rank)


# ---- Sequoia -------------------------------------------------------------------------------------------
def sequoia_table(p: Sequence[float], n: int, d: int) -> np.ndarray:
    """A[h, r]: the most expected accepted drafts of at most r nodes placed under one node, within h more
    levels, under positional probabilities p (Sequoia's dynamic program, Chen et al., 2024, section 3.1).
    Children past len(p) are never accepted, so more nodes never help there: "at most"."""
    return np.maximum.accumulate(_sequoia(tuple(float(x) for x in p), n, d)[0], axis=1)


@lru_cache(maxsize=64)
def _sequoia(p: tuple[float, ...], n: int, d: int) -> tuple[np.ndarray, dict]:
    """The table with exactly r nodes under the ranked children 0..len(p)-1, and the argmax choices."""
    m = len(p)
    A = np.full((d + 1, n + 1), -np.inf)
    A[:, 0] = 0.0
    choice: dict[tuple[int, int, int], int] = {}  # (h, child j, r) -> size given to child j
    for h in range(1, d + 1):
        at_most = np.maximum.accumulate(A[h - 1, :n])
        V = np.concatenate([[0.0], 1.0 + at_most])  # V[s]: a subtree of at most s nodes within h levels
        B = np.full(n + 1, -np.inf)
        B[0] = 0.0
        best_after = [B]  # B_j over children j..m-1, built from the last child
        for j in range(m - 1, -1, -1):
            prev = best_after[-1]
            cur = np.full(n + 1, -np.inf)
            arg = np.zeros(n + 1, dtype=np.int64)
            for s in range(n + 1):
                if not np.isfinite(V[s]):
                    continue
                cand = p[j] * V[s] + prev[: n + 1 - s]
                better = cand > cur[s:] + 1e-15
                cur[s:][better] = cand[better]
                arg[s:][better] = s
            for r in range(n + 1):
                choice[(h, j, r)] = int(arg[r])
            best_after.append(cur)
        A[h] = best_after[-1]
    return A, choice


def sequoia_tree(p: Sequence[float], n: int, d: int) -> TokenTree:
    """The tree of at most n nodes and depth <= d that maximises expected accepted drafts (positional p)."""
    pp = tuple(float(x) for x in p)
    A, choice = _sequoia(pp, n, d)
    r_best = int(np.argmax(A[d]))  # the smallest exact count that reaches the optimum
    parent: list[int] = []
    rank: list[int] = []

    def place(node: int, r: int, h: int) -> None:
        for j in range(len(pp)):
            s = choice[(h, j, r)] if r > 0 else 0
            if s <= 0:
                continue
            parent.append(node)
            rank.append(j)
            me = len(parent) - 1
            place(me, int(np.argmax(A[h - 1, :s])), h - 1)  # its best exact size below s
            r -= s

    place(-1, r_best, d)  # a parent is appended before its children
    return TokenTree.make(parent, rank)


def sequoia_hardware_optimal(p: Sequence[float], verify_seconds: Callable[[int], float],
                             draft_seconds: Callable[[int, int], float], n_max: int, d_max: int
                             ) -> tuple[TokenTree, float]:
    """Sequoia's hardware-aware choice: over n <= n_max nodes and depth d <= d_max, the tree with the most
    expected tokens per second, (1 + A[d, n]) / (verify_seconds(n + 1 tokens) + draft_seconds(n, d));
    returns that tree and its rate."""
    A = sequoia_table(p, n_max, d_max)
    verify = np.array([verify_seconds(n + 1) for n in range(n_max + 1)])
    best: tuple[float, int, int] = (-1.0, 0, 0)
    for d in range(1, d_max + 1):
        draft = np.array([draft_seconds(n, d) for n in range(n_max + 1)])
        rate = (1.0 + A[d]) / (verify + draft)
        n = int(np.argmax(rate[1:])) + 1
        if rate[n] > best[0] + 1e-12:
            best = (float(rate[n]), n, d)
    return sequoia_tree(p, best[1], best[2]), best[0]


# ---- dynamic trees from draft confidences ---------------------------------------------------------------
def greedy_forest(child_probs: Sequence[Callable[[int, int], np.ndarray]], budget: int, max_depth: int,
                  threshold: float = 0.0) -> list[tuple[TokenTree, np.ndarray]]:
    """One tree per request, grown together: repeatedly add the candidate child with the highest path
    probability across all requests (`child_probs[i](node, depth)`: request i's draft probabilities of a
    node's top children, descending) until `budget` nodes in all (OPT-Tree's greedy expansion; across a batch,
    the tree form of TETRIS) or until no candidate reaches `threshold` (DySpec). Returns each request's
    tree and its nodes' conditional probabilities."""
    R = len(child_probs)
    parent: list[list[int]] = [[] for _ in range(R)]
    rank: list[list[int]] = [[] for _ in range(R)]
    cond: list[list[float]] = [[] for _ in range(R)]
    path: list[list[float]] = [[] for _ in range(R)]
    depth: list[list[int]] = [[] for _ in range(R)]
    heap: list[tuple[float, int, int, int, int]] = []  # (-path prob, tie, request, parent, rank)
    tie = 0

    def offer(i: int, node: int, node_path: float, d: int) -> None:
        nonlocal tie
        if d >= max_depth:
            return
        for r, q in enumerate(child_probs[i](node, d).tolist()):
            heapq.heappush(heap, (-node_path * q, tie, i, node, r))
            tie += 1

    for i in range(R):
        offer(i, -1, 1.0, 0)
    total = 0
    while heap and total < budget:
        neg, _, i, q, r = heapq.heappop(heap)
        if -neg < threshold or -neg <= 0.0:
            break
        base = 1.0 if q < 0 else path[i][q]
        parent[i].append(q)
        rank[i].append(r)
        cond[i].append(-neg / base if base > 0 else 0.0)
        path[i].append(-neg)
        depth[i].append(1 if q < 0 else depth[i][q] + 1)
        total += 1
        offer(i, len(parent[i]) - 1, -neg, depth[i][-1])
    return [(TokenTree.make(parent[i], rank[i]), np.array(cond[i])) for i in range(R)]


def greedy_tree(child_probs: Callable[[int, int], np.ndarray], budget: int, max_depth: int,
                threshold: float = 0.0) -> tuple[TokenTree, np.ndarray]:
    """`greedy_forest` for one request."""
    return greedy_forest([child_probs], budget, max_depth, threshold)[0]


def dirichlet_confidence(rng: np.random.Generator, concentration: float, top: int) -> Callable[[int, int], np.ndarray]:
    """A draft whose top-`top` child probabilities at every node are sorted draws of a symmetric Dirichlet
    over `top` + 1 outcomes (the last: everything else), fresh per node (the draft-confidence model)."""
    def probs(node: int, depth: int) -> np.ndarray:
        x = rng.dirichlet(np.full(top + 1, concentration))
        return np.sort(x[:top])[::-1]

    return probs


# ---- batched allocation ---------------------------------------------------------------------------------
def allocate(gains: Sequence[np.ndarray], budget: int) -> np.ndarray:
    """Tree sizes per request (n_i >= 0) maximising sum_i gains[i][n_i] with sum_i (n_i + 1) <= budget, each
    request's own token included (gains[i][n]: expected accepted drafts of request i's best n-node tree).
    Greedy by marginal gain (optimal when the gains are concave), never worse than the equal split."""
    R = len(gains)
    extra = budget - R
    if extra <= 0 or R == 0:
        return np.zeros(R, dtype=np.int64)
    sizes = np.zeros(R, dtype=np.int64)
    heap = [(-(g[1] - g[0]) if g.size > 1 else 0.0, i) for i, g in enumerate(gains)]
    heapq.heapify(heap)
    while extra > 0 and heap:
        neg, i = heapq.heappop(heap)
        if -neg <= 0:
            break
        sizes[i] += 1
        extra -= 1
        g = gains[i]
        if sizes[i] + 1 < g.size:
            heapq.heappush(heap, (-(g[sizes[i] + 1] - g[sizes[i]]), i))
    equal = np.array([min((budget - R) // R, g.size - 1) for g in gains], dtype=np.int64)
    value = sum(float(g[s]) for g, s in zip(gains, sizes))
    if sum(float(g[s]) for g, s in zip(gains, equal)) > value:
        return equal
    return sizes
