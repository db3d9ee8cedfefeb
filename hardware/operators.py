"""The operator list of one forward step: FLOPs and bytes of every kernel, per GPU, for a batch shape.

A step's batch is described by `StepShape` (per request: prefill chunks with the KV already cached before
them, decodes with their context, speculative verifications). Per-request arrays are reduced with numpy to
a handful of totals (`StepTotals`), and operators are built from totals only, so pricing a step never
loops in Python over requests. Every decoder layer has the same operators, so they are built once and
counted `layers` times.

Attention counts the query-key pairs actually computed under the causal (or sliding-window, or tree) mask:
a chunk of c tokens after p cached ones computes c*p + c(c+1)/2 pairs; QK^T and PV cost 2 FLOPs per pair
per head dimension each. Attention reads each request's K and V once. A paged kernel (the default,
`Deployment.kv_access = "paged"`: vLLM's FlashAttention or FlashInfer, servesim's backend) reads the cache
in place. Where an engine gathers the K/V of a step out of the paged cache before a contiguous-KV kernel
(`"gather"`, as servesim's backend did before its paged kernels), the gather is its own memory-bound
operator that reads and writes each K/V token once more.

Elementwise work is fused by default (`Deployment.elementwise = "fused"`: vLLM's custom ops, servesim's
backend): one kernel per residual add + RMSNorm, one for RoPE with the K/V cache write, one for SiLU-mul.
`"unfused"` counts the kernels PyTorch's separate ops launch (servesim's backend before its fused kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hardware.deployment import GPUS_PER_NODE, Deployment
from hardware.errors import ServesimError
from hardware.specs import DTYPE_BYTES

IntArray = np.ndarray

# Host-dispatched kernels of an attention call, by how it reads the paged cache. `paged` (the backend's
# Triton kernels, as vLLM's): a prefill runs one kernel; a decode runs flash-decoding and, where it splits the
# keys (`decode_splits`), the reduction of its splits. `gather` (the backend before its paged kernels,
# counted with torch.profiler on an H200): a prefill runs FlashAttention-2's varlen kernel; a decode also
# multiplies the query offsets by the group size and copies the query heads into and out of the grouped-query
# layout (GQA, no window), beside its K/V gather.
ATTENTION_KERNELS = {"paged": {"attention-prefill": 1, "attention-decode": 2},
                     "gather": {"attention-prefill": 1, "attention-decode": 4}}
GATHER_KERNELS = 2  # index_select of K, then of V
SPLIT_TOKENS = 256  # keys of the longest sequence per flash-decoding split, at least
# Speculative verifications attend in the decode kernel, this many queries per tile (`backend.kernels`): each
# tile reads the keys up to its last query, as one decode sequence does (k + 1 <= 8: one tile per chain).
VERIFY_TILE = 8


def decode_splits(sequences: int, kv_heads: int, longest: int, sms: int, most: int = 64) -> int:
    """KV splits per sequence of a paged decode attention call (flash-decoding, as `backend.kernels` runs it):
    enough programs for about four per SM, each with at least `SPLIT_TOKENS` keys of the longest sequence;
    a power of two. Above one split a second kernel reduces the splits' partial results."""
    want = math.ceil(4 * sms / max(1, sequences * kv_heads))
    room = max(1, longest // SPLIT_TOKENS)
    n = max(1, min(want, room, most))
    return 1 << (n.bit_length() - 1)


def decode_reduces(sequences: np.ndarray, kv_heads: int, longest: np.ndarray, sms: int) -> np.ndarray:
    """Whether each decode step's paged attention splits its keys (`decode_splits` > 1), and so launches the
    reduction kernel, vectorised over steps."""
    return (4 * sms > np.asarray(sequences) * kv_heads) & (np.asarray(longest) >= 2 * SPLIT_TOKENS)


def _ints(name: str, values: Sequence[int] | np.ndarray | None, n: int | None = None, minimum: int = 0) -> IntArray:
    arr = np.zeros(n or 0, dtype=np.int64) if values is None else np.asarray(values, dtype=np.int64).reshape(-1)
    if n is not None and arr.size != n:
        raise ServesimError(f"{name}: has {arr.size} values but must have one per request ({n})")
    if arr.size and int(arr.min()) < minimum:
        raise ServesimError(f"{name}: value {int(arr.min())} is below the minimum {minimum}")
    return arr


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one step runs, per request.

    - `prefill_tokens[i]`: tokens in request i's prefill chunk; `prefill_cached[i]`: tokens of its KV
      already cached before the chunk (earlier chunks or a prefix-cache hit).
    - `decode_context[j]`: tokens in request j's KV before this step; it decodes one token.
    - `verify_tokens[k]`: tokens verified for a speculating request (k+1 for k draft tokens, or the nodes
      of a token tree) after `verify_context[k]` tokens of KV; `verify_levels[k]` a token tree's nodes per
      depth (a chain of verify_tokens[k] - 1 when omitted: the draft runs one step per level); `draft_feed[k]`
      the tokens the draft model takes in its first step (those of the request it has not cached: after a
      verification the target's token, plus the last draft where all k were accepted; a tree's accepted path
      and the target's token; one each when omitted).
    """

    prefill_tokens: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    prefill_cached: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    decode_context: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    verify_tokens: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    verify_context: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    verify_levels: IntArray | None = None  # (verifications, depth)
    draft_feed: IntArray | None = None

    @classmethod
    def build(
        cls,
        prefill: Sequence[int] | np.ndarray = (),
        prefill_cached: Sequence[int] | np.ndarray | None = None,
        decode: Sequence[int] | np.ndarray = (),
        verify: Sequence[int] | np.ndarray = (),
        verify_context: Sequence[int] | np.ndarray | None = None,
        verify_levels: Sequence[Sequence[int]] | np.ndarray | None = None,
        draft_feed: Sequence[int] | np.ndarray | None = None,
    ) -> StepShape:
        """Validated shape; cached prefixes and verify contexts default to zero."""
        chunks = _ints("prefill_tokens", prefill, minimum=1)
        vtok = _ints("verify_tokens", verify, minimum=1)
        return cls(
            prefill_tokens=chunks,
            prefill_cached=_ints("prefill_cached", prefill_cached, chunks.size),
            decode_context=_ints("decode_context", decode),
            verify_tokens=vtok,
            verify_context=_ints("verify_context", verify_context, vtok.size),
            verify_levels=None if verify_levels is None else _levels(verify_levels, vtok),
            draft_feed=None if draft_feed is None else _ints("draft_feed", draft_feed, vtok.size, minimum=1),
        )

    @property
    def num_requests(self) -> int:
        return self.prefill_tokens.size + self.decode_context.size + self.verify_tokens.size

    @property
    def uniform_queries(self) -> int:
        """New tokens per request where every request of the step runs as many and none is a prefill chunk
        or a token tree (what a full CUDA graph can run): 1 for a decode-only step, k + 1 for verifications
        of k drafts each; 0 otherwise."""
        if self.prefill_tokens.size or not self.num_requests:
            return 0
        if not self.verify_tokens.size:
            return 1
        q = int(self.verify_tokens[0])
        uniform = not self.decode_context.size and self.verify_levels is None and (self.verify_tokens == q).all()
        return q if uniform else 0

    @property
    def num_tokens(self) -> int:
        """New tokens through the model: prefill chunks, decodes and verified tokens."""
        return int(self.prefill_tokens.sum() + self.decode_context.size + self.verify_tokens.sum())

    @property
    def kv_tokens(self) -> int:
        """Tokens that the step's requests hold in the KV cache once it has run (their block tables)."""
        return int(self.prefill_cached.sum() + self.prefill_tokens.sum() + self.decode_context.sum()
                   + self.decode_context.size + self.verify_context.sum() + self.verify_tokens.sum())

    def to_dict(self) -> dict[str, list[int]]:
        """Prefill chunks, decodes and verifications as plain lists (the line format of a replay's
        batches.jsonl; verification keys only when the step has any)."""
        out = {"prefill_tokens": self.prefill_tokens.tolist(), "prefill_cached": self.prefill_cached.tolist(),
               "decode_context": self.decode_context.tolist()}
        if self.verify_tokens.size:
            out |= {"verify_tokens": self.verify_tokens.tolist(), "verify_context": self.verify_context.tolist()}
            if self.verify_levels is not None:
                out["verify_levels"] = self.verify_levels.tolist()
            if self.draft_feed is not None:
                out["draft_feed"] = self.draft_feed.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> StepShape:
        return cls.build(prefill=d["prefill_tokens"], prefill_cached=d["prefill_cached"], decode=d["decode_context"],
                         verify=d.get("verify_tokens", ()), verify_context=d.get("verify_context"),
                         verify_levels=d.get("verify_levels"),
                         draft_feed=d.get("draft_feed"))

    @property
    def is_decode_only(self) -> bool:
        return self.prefill_tokens.size == 0 and self.verify_tokens.size == 0


def _levels(values: Sequence[Sequence[int]] | np.ndarray, verify: IntArray) -> IntArray:
    """Token trees' nodes per depth, one row per verification (its nodes at most its verified tokens but the root)."""
    try:
        arr = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError):
        raise ServesimError("verify_levels: not a table of integers (one row of nodes per depth per "
                            "verification)") from None
    if arr.ndim != 2 or arr.shape[0] != verify.size:
        raise ServesimError(f"verify_levels: shape {arr.shape}; allowed: one row per verification "
                            f"({verify.size} rows)")
    if arr.size and int(arr.min()) < 0:
        raise ServesimError(f"verify_levels: value {int(arr.min())} is below the minimum 0")
    if (arr.sum(axis=1) > verify - 1).any():  # (fewer where a batch pads its verifications)
        raise ServesimError(f"verify_levels: rows of {arr.sum(axis=1).tolist()} nodes; allowed: at most each "
                            f"verification's tokens but the root ({(verify - 1).tolist()})")
    return arr


def _window_pairs(first: IntArray, count: IntArray, window: int | None) -> float:
    """Sum over requests of sum_{j=first}^{first+count-1} min(j, window): keys seen by each query."""
    last = first + count - 1
    if window is None:
        return float(((first + last) * count).sum() / 2)
    w = window
    full = (first + last) * count / 2  # all below the window
    capped = count * w  # all at or above it
    mixed = (first + w) * (w - first + 1) / 2 + (last - w) * w
    return float(np.where(last <= w, full, np.where(first > w, capped, mixed)).sum())


@dataclass(frozen=True, slots=True)
class StepTotals:
    """The few sums of a `StepShape` that operator costs depend on."""

    tokens: int  # new tokens through the GEMMs
    logit_tokens: int  # tokens whose logits are computed (last of each prefill chunk, decodes, all verified)
    prefill_seqs: int  # prefill chunks (the prefill attention kernel)
    prefill_queries: int
    prefill_pairs: float
    prefill_kv_tokens: float  # K/V tokens read by the prefill attention
    decode_seqs: int  # decodes and verification tiles (the decode attention kernel)
    decode_pairs: float  # = K/V tokens read by decode attention (a verification tile: up to its last query)
    decode_longest: int = 0  # K/V tokens of the longest decode (its attention blocks run longest)
    prefill_on: float = 0.0  # 1 when the step has prefill chunks, else 0
    decode_on: float = 0.0  # 1 when it has decodes or verifications

    @classmethod
    def of(cls, shape: StepShape, sliding_window: int | None = None) -> StepTotals:
        """Verifications attend in the decode kernel (vLLM V1 routes requests of up to k + 1 tokens to its
        decode path): one sequence per `VERIFY_TILE` queries, reading the keys up to its last query. Their
        attention FLOPs are counted as one query's (k + 1 of them, memory-bound: at most 8 queries times the
        query heads of a KV head per key read)."""
        w = sliding_window
        n_dec = shape.decode_context.size
        dec_pairs, longest = 0.0, 0
        dec = shape.decode_context + 1
        v = shape.verify_tokens
        if v.size:  # each tile's keys: the context and the verified tokens up to the tile's last
            tiles = -(-v // VERIFY_TILE)
            if int(tiles.max()) == 1:
                reads = shape.verify_context + v
            else:
                ends = np.minimum(np.arange(1, int(tiles.max()) + 1)[None, :] * VERIFY_TILE, v[:, None])
                reads = (shape.verify_context[:, None] + ends)[np.arange(ends.shape[1])[None, :] < tiles[:, None]]
            dec = np.concatenate([dec, reads])
        if dec.size:
            if w is not None:
                dec = np.minimum(dec, w)
            dec_pairs, longest = float(dec.sum()), int(dec.max())
        tokens_c = pairs = kv_read = 0.0
        c = shape.prefill_tokens
        if c.size:
            p = shape.prefill_cached
            tokens_c = float(c.sum())
            pairs = _window_pairs(p + 1, c, w)
            kv_read = float(((p + c) if w is None else np.minimum(p + c, w)).sum())
        tokens_v = int(v.sum())
        return cls(
            tokens=int(tokens_c) + tokens_v + n_dec,
            logit_tokens=c.size + n_dec + tokens_v,
            prefill_seqs=c.size,
            prefill_queries=int(tokens_c),
            prefill_pairs=pairs,
            prefill_kv_tokens=kv_read,
            decode_seqs=dec.size,
            decode_pairs=dec_pairs,
            decode_longest=longest,
            prefill_on=float(c.size > 0),
            decode_on=float(dec.size > 0),
        )


    def share(self, ranks: int) -> StepTotals:
        """One DP attention rank's even share of the step (fractional counts are expectations)."""
        return StepTotals(self.tokens / ranks, self.logit_tokens / ranks, self.prefill_seqs / ranks,  # type: ignore[arg-type]
                          self.prefill_queries / ranks, self.prefill_pairs / ranks,  # type: ignore[arg-type]
                          self.prefill_kv_tokens / ranks, self.decode_seqs / ranks,  # type: ignore[arg-type]
                          self.decode_pairs / ranks, self.decode_longest, self.prefill_on, self.decode_on)


@dataclass(frozen=True, slots=True)
class Operator:
    """One kernel (or fused group) on one GPU: FLOPs and HBM bytes per instance, `count` instances.

    Collectives carry their payload in `comm_bytes` and the number of ranks in `ranks`; GEMMs their weight
    shape (K, N) in `dims`, so a calibrated profile can use the curve measured for that shape (dense, or
    grouped over experts when `grouped`).
    """

    name: str
    kind: str
    flops: float
    bytes: float
    count: int = 1
    kernels: int = 1
    comm_bytes: float = 0.0
    ranks: int = 1
    stage: int = 0
    dims: tuple[int, int] | None = None
    layers: str = "all"  # the decoder layers it runs in: all, dense (MLP) or moe
    grouped: bool = False  # a grouped GEMM over MoE experts (priced by the profile's grouped-GEMM curves)


def gemm_operator(name: str, m: float, k: float, n: float, w_bytes: float, a_bytes: float, count: int = 1,
                  weight_reads: float = 1.0, expert: bool = False, layers: str = "all") -> Operator:
    """Y[m,n] = X[m,k] W[k,n]: reads X and `weight_reads` matrices W (MoE: the experts hit), writes Y; an
    `expert` GEMM is one grouped GEMM over the experts (its rows split among them)."""
    return Operator(name, "gemm", 2.0 * m * k * n, k * n * w_bytes * weight_reads + (m * k + m * n) * a_bytes,
                    count, dims=(int(k), int(n)), layers=layers, grouped=expert)


@dataclass(frozen=True, slots=True)
class MoeLoad:
    """What an MoE layer computes on the busiest GPU of its group in one step: routed token slots (`rows`),
    distinct experts whose weights it reads, the tokens of the whole group (every DP rank's), and the tokens
    each GPU dispatches in an all-to-all."""

    rows: float = 0.0
    active_experts: float = 0.0
    group_tokens: float = 0.0
    dispatched: float = 0.0


def attention_operators(dep: Deployment, t: StepTotals, rows: float) -> list[Operator]:
    """Q/K/V projections, RoPE with the KV write, attention (and K/V gathers) of one layer: GQA or MLA."""
    m = dep.model
    if m.is_mla:
        return mla_operators(dep, t, rows)
    h, d = m.hidden_size, m.head_size
    a, w = dep.act_bytes, DTYPE_BYTES[dep.weight_dtype]
    kvb = DTYPE_BYTES[dep.kv_dtype]
    hq, hkv = dep.heads_per_gpu, dep.kv_heads_per_gpu
    ops = [gemm_operator("qkv_proj", rows, h, (hq + 2 * hkv) * d, w, a)]
    ops += rope_operators(dep, t, rows, (hq + hkv) * d, hq * d, hkv * d, 2 * hkv * d)
    gather = {op.name: [op] for op in kv_gather_operators(dep, t)}  # before its attention call (none: paged)
    ops += [*gather.get("kv_gather_prefill", []),
            Operator("attention_prefill", "attention-prefill", 4.0 * t.prefill_pairs * d * hq,
                     2.0 * t.prefill_queries * hq * d * a + t.prefill_kv_tokens * 2 * hkv * d * kvb,
                     kernels=ATTENTION_KERNELS[dep.kv_access]["attention-prefill"]),
            *gather.get("kv_gather_decode", []),
            Operator("attention_decode", "attention-decode", 4.0 * t.decode_pairs * d * hq,
                     2.0 * t.decode_seqs * hq * d * a + t.decode_pairs * 2 * hkv * d * kvb,
                     kernels=ATTENTION_KERNELS[dep.kv_access]["attention-decode"])]
    return ops


def rope_operators(dep: Deployment, t: StepTotals, rows: float, rotated: int, q_width: int, k_width: int,
                   cached: int) -> list[Operator]:
    """RoPE over `rotated` values per token (queries of `q_width`, keys of `k_width`) and the write of `cached`
    values per token into the KV cache: one fused kernel, or PyTorch's separate ops."""
    a, kvb = dep.act_bytes, DTYPE_BYTES[dep.kv_dtype]
    if dep.elementwise == "fused":  # read q, k, v; write the rotated q, and the rotated k and v into the cache
        return [Operator("rope_kv_write", "elementwise", 6.0 * rows * rotated,
                         rows * (2 * q_width + k_width) * a + t.tokens * cached / 2 * (a + 2 * kvb))]
    return [Operator("rope", "elementwise", 6.0 * rows * rotated, 2.0 * rows * rotated * a, kernels=7),
            Operator("kv_write", "kv-write", 0.0, t.tokens * cached * (a + kvb), kernels=2)]


def mla_operators(dep: Deployment, t: StepTotals, rows: float) -> list[Operator]:
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434) on one TP rank: the query (through its
    latent when q_lora_rank is set) and the KV latent with its RoPE key are projected, the latent is cached
    (one copy per rank), and attention runs either *naive* (the cached latents of every key are up-projected
    to per-head K and V, then multi-head attention of head size nope + rope) or *absorbed* (the K and V
    up-projections fold into the query and the output: multi-query attention over the latent itself). vLLM
    and SGLang run prefill naive and decode absorbed (`mla_attention: auto`)."""
    m = dep.model
    h, hq = m.hidden_size, dep.heads_per_gpu
    a, w, kvb = dep.act_bytes, DTYPE_BYTES[dep.weight_dtype], DTYPE_BYTES[dep.kv_dtype]
    lkv, dr = m.kv_lora_rank or 0, m.qk_rope_head_dim or 0
    dn, dv, dqk = m.qk_nope_head_dim or 0, m.v_head_dim or 0, m.mla_qk_head_dim
    ops: list[Operator] = []
    if m.q_lora_rank:
        ops += [gemm_operator("q_a_proj", rows, h, m.q_lora_rank, w, a),
                Operator("q_a_norm", "elementwise", 4.0 * rows * m.q_lora_rank, 2.0 * rows * m.q_lora_rank * a),
                gemm_operator("q_b_proj", rows, m.q_lora_rank, hq * dqk, w, a)]
    else:
        ops.append(gemm_operator("q_proj", rows, h, hq * dqk, w, a))
    ops += [gemm_operator("kv_a_proj", rows, h, lkv + dr, w, a),
            Operator("kv_a_norm", "elementwise", 4.0 * rows * lkv, 2.0 * rows * lkv * a)]
    ops += rope_operators(dep, t, rows, (hq + 1) * dr, hq * dr, lkv + dr, lkv + dr)
    ops += kv_gather_operators(dep, t)
    for kind, queries, pairs, kv_tokens, on in (
            ("prefill", t.prefill_queries, t.prefill_pairs, t.prefill_kv_tokens, t.prefill_on),
            ("decode", t.decode_seqs, t.decode_pairs, t.decode_pairs, t.decode_on)):
        mode = dep.mla_attention if dep.mla_attention != "auto" else ("naive" if kind == "prefill" else "absorbed")
        attention = f"attention-{kind}"
        if mode == "naive":  # (`on`: a step without this kind of attention reads none of its weights)
            ops += [gemm_operator(f"mla_kv_up_{kind}", kv_tokens, lkv, hq * (dn + dv), w, a, weight_reads=on),
                    Operator(f"attention_{kind}", attention, 2.0 * pairs * hq * (dqk + dv),
                             (queries + kv_tokens) * hq * (dqk + dv) * a,
                             kernels=ATTENTION_KERNELS["paged"][attention])]
        else:  # per head: q_nope (dn) -> latent (lkv) before, latent -> v (dv) after
            ops += [Operator(f"mla_q_absorb_{kind}", "gemm", 2.0 * queries * hq * dn * lkv,
                             on * hq * dn * lkv * w + queries * hq * (dn + lkv) * a),
                    Operator(f"attention_{kind}", attention, 2.0 * pairs * hq * (2 * lkv + dr),
                             queries * hq * (2 * lkv + dr) * a + kv_tokens * (lkv + dr) * kvb,
                             kernels=ATTENTION_KERNELS["paged"][attention]),
                    Operator(f"mla_v_up_{kind}", "gemm", 2.0 * queries * hq * lkv * dv,
                             on * hq * lkv * dv * w + queries * hq * (lkv + dv) * a)]
    return ops


def mlp_operators(dep: Deployment, rows: float, moe: MoeLoad) -> list[Operator]:
    """The MLP of a dense layer and of an MoE layer (each counted over the layers of its kind).

    An MoE layer on the `tp x dp` GPUs of its group: the router, then the routed experts of the busiest GPU
    (`moe.rows` token slots, `moe.active_experts` experts' weights read), beside the shared experts (a dense
    MLP sharded over TP). Tensor-parallel experts with DP attention gather the DP ranks' tokens first and
    reduce-scatter the outputs after; expert parallelism with DP attention dispatches each token to the GPUs
    of its experts and combines the results (all-to-all, `moe.dispatched` tokens per GPU, as DeepEP and
    pplx-kernels do); expert parallelism with TP attention has every token on every GPU already, and the
    TP all-reduce combines. An all-to-all's bytes are those sent over its link: to the other GPUs of the
    group on the node's fabric, or to the GPUs outside the node (8 GPUs) on an inter-node link; tokens are
    dispatched in fp8 when the weights are fp8 (DeepEP's low-precision dispatch) and combined in bf16."""
    m = dep.model
    h, a, w = m.hidden_size, dep.act_bytes, DTYPE_BYTES[dep.weight_dtype]
    fused = dep.elementwise == "fused"
    inter = dep.intermediate_per_gpu
    ops = [gemm_operator("gate_up_proj", rows, h, 2 * inter, w, a, layers="dense"),
           Operator("silu_mul", "elementwise", 5.0 * rows * inter, 3.0 * rows * inter * a,
                    kernels=1 if fused else 2, layers="dense"),
           gemm_operator("down_proj", rows, inter, h, w, a, layers="dense")]
    if dep.tp > 1:
        ops.append(Operator("all_reduce_mlp", "all-reduce", 0.0, 0.0, comm_bytes=rows * h * a, ranks=dep.tp,
                            layers="dense"))
    if not m.is_moe:
        return ops
    k, e, g = m.experts_per_token, m.num_experts, dep.moe_group
    inter_e, shared = dep.expert_intermediate_per_gpu, dep.shared_intermediate_per_gpu
    tp_experts_dp = dep.dp > 1 and not dep.expert_parallel
    a2a = dep.dp > 1 and dep.expert_parallel
    local = 1 if dep.moe_link.id == dep.tp_link.id else min(g, GPUS_PER_NODE)
    sent = moe.dispatched * k * h * (g - local) / g  # values of the token copies sent across the link
    dispatch_bytes = 1.0 if dep.weight_dtype == "fp8" else a  # fp8 weights: tokens dispatched in fp8 (DeepEP)
    # the router's logits, then one fused softmax + top-k kernel (vLLM's topk_softmax): k weights (fp32) and ids each
    ops += [gemm_operator("moe_router", rows, h, e, w, a, layers="moe"),
            Operator("moe_topk", "elementwise", 5.0 * rows * e, rows * e * a + rows * k * 8.0, layers="moe")]
    if shared:
        ops += [gemm_operator("shared_gate_up", rows, h, 2 * shared, w, a, layers="moe"),
                Operator("shared_silu_mul", "elementwise", 5.0 * rows * shared, 3.0 * rows * shared * a, layers="moe"),
                gemm_operator("shared_down", rows, shared, h, w, a, layers="moe")]
    if tp_experts_dp:
        ops.append(Operator("moe_all_gather", "all-gather", 0.0, 0.0, comm_bytes=moe.group_tokens * h * a,
                            ranks=dep.dp, layers="moe"))
    if a2a:
        ops.append(Operator("moe_dispatch", "all-to-all", 0.0, 0.0, comm_bytes=sent * dispatch_bytes, ranks=g,
                            layers="moe"))
    ops += [gemm_operator("moe_gate_up", moe.rows, h, 2 * inter_e, w, a, weight_reads=moe.active_experts,
                          expert=True, layers="moe"),
            Operator("moe_silu_mul", "elementwise", 5.0 * moe.rows * inter_e, 3.0 * moe.rows * inter_e * a,
                     layers="moe"),
            gemm_operator("moe_down", moe.rows, inter_e, h, w, a, weight_reads=moe.active_experts, expert=True,
                          layers="moe")]
    if a2a:
        ops.append(Operator("moe_combine", "all-to-all", 0.0, 0.0, comm_bytes=sent * a, ranks=g, layers="moe"))
    # the weighted sum of each token's expert outputs (vLLM's moe_sum): at home after the combine, else where the
    # experts ran
    summed = rows * k if a2a else moe.rows
    ops.append(Operator("moe_sum", "elementwise", 2.0 * summed * h, (summed + rows) * h * a, layers="moe"))
    if tp_experts_dp:
        ops.append(Operator("moe_reduce_scatter", "reduce-scatter", 0.0, 0.0, comm_bytes=moe.group_tokens * h * a,
                            ranks=g, layers="moe"))
    elif dep.tp > 1:
        ops.append(Operator("all_reduce_moe", "all-reduce", 0.0, 0.0, comm_bytes=rows * h * a, ranks=dep.tp,
                            layers="moe"))
    return ops


def layer_operators(dep: Deployment, t: StepTotals, rows: float, moe: MoeLoad | None = None) -> list[Operator]:
    """Operators of one decoder layer on one GPU, in the order the backend issues them.

    `rows` is the tokens through the dense layers (padded to a captured CUDA-graph batch when one is
    replayed); `moe` what the busiest GPU's MoE layer computes. Every FLOP and byte count is an affine
    function of these and of the totals (the cost model relies on it); an operator with no work (attention
    kinds absent from the step) launches nothing. Dense-MLP and MoE operators carry `layers` = 'dense' or
    'moe' and count over the layers of their kind.
    """
    m = dep.model
    h, a = m.hidden_size, dep.act_bytes
    ops = [Operator("add_rmsnorm", "elementwise", 5.0 * rows * h, 4.0 * rows * h * a + h * a, count=2,
                    kernels=1 if dep.elementwise == "fused" else 2)]
    ops += attention_operators(dep, t, rows)
    o_in = dep.heads_per_gpu * (m.v_head_dim if m.is_mla else m.head_size)
    ops.append(gemm_operator("o_proj", rows, o_in, h, DTYPE_BYTES[dep.weight_dtype], a))
    if dep.tp > 1:
        ops.append(Operator("all_reduce_attn", "all-reduce", 0.0, 0.0, comm_bytes=rows * h * a, ranks=dep.tp))
    return ops + mlp_operators(dep, rows, moe or MoeLoad())


def kv_gather_operators(dep: Deployment, t: StepTotals) -> list[Operator]:
    """The K/V gathers before each attention kernel (none when the kernel reads the paged cache): every
    K/V token the kernel reads is read from the cache and written to a contiguous buffer."""
    if dep.kv_access != "gather":
        return []
    token = dep.kv_bytes_per_token_per_layer()
    return [Operator("kv_gather_prefill", "kv-gather", 0.0, 2.0 * t.prefill_kv_tokens * token, kernels=GATHER_KERNELS),
            Operator("kv_gather_decode", "kv-gather", 0.0, 2.0 * t.decode_pairs * token, kernels=GATHER_KERNELS)]


def first_stage_operators(dep: Deployment, rows: float) -> list[Operator]:
    """Embedding gather (vocab-parallel: an all-reduce joins the shards under TP)."""
    h, a = dep.model.hidden_size, dep.act_bytes
    ops = [Operator("embedding", "embedding", 0.0, 2.0 * rows * h * a + rows * 8.0)]
    if dep.tp > 1:
        ops.append(Operator("all_reduce_embed", "all-reduce", 0.0, 0.0, comm_bytes=rows * h * a, ranks=dep.tp))
    return ops


def last_stage_operators(dep: Deployment, t: StepTotals) -> list[Operator]:
    """Final norm, LM head on the tokens that need logits, logits gathered across TP, sampling."""
    m = dep.model
    h, a, w = m.hidden_size, dep.act_bytes, DTYPE_BYTES[dep.weight_dtype]
    n, v = t.logit_tokens, dep.vocab_per_gpu
    ops = [
        Operator("final_norm", "elementwise", 4.0 * n * h, 2.0 * n * h * a + h * a),
        gemm_operator("lm_head", n, h, v, w, a),
    ]
    if dep.tp > 1:
        ops.append(Operator("gather_logits", "all-gather", 0.0, 0.0, comm_bytes=n * m.vocab_size * a, ranks=dep.tp))
    ops.append(Operator("sampling", "sampling", 6.0 * n * m.vocab_size, 3.0 * n * m.vocab_size * 4.0, kernels=3))
    return ops


def pipeline_operator(dep: Deployment, rows: float, stage: int) -> Operator:
    """Hidden states and residual sent from stage-1 to stage (vLLM's intermediate tensors)."""
    payload = 2.0 * rows * dep.model.hidden_size * dep.act_bytes
    return Operator("pp_send_recv", "send-recv", 0.0, 0.0, comm_bytes=payload, ranks=2, stage=stage)
