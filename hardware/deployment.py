"""A model served on GPUs with TP x PP (x DP attention for MoE): per-GPU shards, the memory plan, the check
that it fits.

MoE layers run on the `tp * dp` GPUs of a stage (the MoE group), as vLLM and SGLang deploy them: each
expert sharded over the group (tensor-parallel experts, the default), or whole experts spread over it
(`expert_parallel`, EP = tp x dp), optionally balanced by EPLB with redundant replicas. With `dp > 1` attention
is data-parallel: each of the dp attention groups (tp GPUs) holds its own requests' KV and runs its share of
the step's requests; one scheduler stands for the dp ranks in lockstep, so the scheduler's limits
(max_num_seqs, max_num_batched_tokens) are for the whole replica and split evenly over the ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, ValidationError, model_validator

from hardware.catalog import get_gpu, get_interconnect, get_model
from hardware.errors import DoesNotFitError, ServesimError, describe_validation_error
from hardware.routing import ExpertPlacement, RoutingModel
from hardware.specs import (
    DTYPE_BYTES,
    DType,
    Elementwise,
    GPUSpec,
    InterconnectSpec,
    KvAccess,
    KvDType,
    ModelSpec,
    Spec,
    kv_heads_per_gpu,
)

GB = 1e9
GPUS_PER_NODE = 8  # HGX/DGX nodes: an MoE group larger than this sends part of its all-to-all between nodes
INTER_NODE_LINK = "ib-ndr"


def stage_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per pipeline stage, as even as possible, the first stages taking the remainder."""
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if s < extra else 0) for s in range(pp))


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of the most loaded pipeline stage, in bytes."""

    usable: float  # gpu_memory_utilization x HBM
    weights: float
    activations: float  # peak of one forward at max_num_batched_tokens, plus the logits of max_num_seqs
    runtime: float  # CUDA context, NCCL buffers, CUDA-graph pools
    kv_reserve: float  # KV of max_model_len tokens: the least that must fit
    kv_cache: float  # what is left for the KV cache (may be negative when it does not fit)
    kv_bytes_per_token: float  # per GPU of that stage
    kv_capacity_tokens: int  # tokens of KV the replica can hold (all its DP attention ranks)

    @property
    def fits(self) -> bool:
        return self.kv_cache >= self.kv_reserve


class Deployment(Spec):
    """One replica: a model on `tp * pp` GPUs of one type, with dtypes and vLLM-style memory settings."""

    model: ModelSpec
    gpu: GPUSpec
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    tp_link: InterconnectSpec
    pp_link: InterconnectSpec
    weight_dtype: DType = "bf16"
    kv_dtype: KvDType = "bf16"
    kv_token_budget: PositiveInt | None = None
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    max_num_batched_tokens: PositiveInt = 8192
    max_num_seqs: PositiveInt = 256
    max_model_len: PositiveInt | None = None
    runtime_reserve_bytes: float = Field(1.0e9, ge=0.0)
    kv_access: KvAccess = "paged"
    elementwise: Elementwise = "fused"
    dp: PositiveInt = 1
    expert_parallel: bool = False
    ep_link: InterconnectSpec | None = None
    eplb: bool = False
    redundant_experts: NonNegativeInt = 0
    routing: RoutingModel = RoutingModel()
    mla_attention: Literal["auto", "absorbed", "naive"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> Deployment:
        m = self.model
        if not m.is_moe and (self.dp > 1 or self.expert_parallel or self.eplb):
            raise ValueError(f"dp, expert_parallel and eplb are for MoE models; {m.id} is dense (serve more "
                             "replicas instead of dp > 1)")
        if self.redundant_experts and not (self.expert_parallel and self.eplb):
            raise ValueError(f"redundant_experts = {self.redundant_experts} needs expert_parallel and eplb")
        if self.eplb and not self.expert_parallel:
            raise ValueError("eplb balances experts over expert-parallel ranks: set expert_parallel too")
        if self.expert_parallel and (m.num_experts + self.redundant_experts) % self.moe_group:
            raise ValueError(f"expert_parallel over tp x dp = {self.moe_group} GPUs must divide the "
                             f"{m.num_experts} experts + {self.redundant_experts} redundant of {m.id}")
        if m.is_moe:
            self.routing.probabilities(m.num_experts, m.experts_per_token)  # counts must match the experts
        if m.num_attention_heads % self.tp:
            raise ValueError(f"tp={self.tp} must divide num_attention_heads={m.num_attention_heads} of {m.id}")
        if m.num_key_value_heads < self.tp and self.tp % m.num_key_value_heads:
            raise ValueError(
                f"tp={self.tp} must be a multiple of num_key_value_heads={m.num_key_value_heads} of {m.id}"
            )
        if self.max_model_len is not None and self.max_model_len > m.max_position_embeddings:
            raise ValueError(f"max_model_len = {self.max_model_len} exceeds max_position_embeddings = "
                             f"{m.max_position_embeddings} of {m.id}")
        if self.pp > m.num_hidden_layers:
            raise ValueError(f"pp={self.pp} exceeds num_hidden_layers={m.num_hidden_layers} of {m.id}")
        return self

    @classmethod
    def build(
        cls,
        model: str | ModelSpec,
        gpu: str | GPUSpec,
        tp: int = 1,
        pp: int = 1,
        link: str | None = None,
        pp_link: str | None = None,
        **settings: object,
    ) -> Deployment:
        """Resolve catalog ids (or user files) and validate; TP uses the GPU's intra-node link by default."""
        model_spec = model if isinstance(model, ModelSpec) else get_model(model)
        gpu_spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
        tp_link = get_interconnect(link or gpu_spec.intra_node_link)
        group = tp * int(settings.get("dp", 1))  # type: ignore[call-overload]
        ep_link = settings.pop("ep_link", None)
        if ep_link is not None and not isinstance(ep_link, InterconnectSpec):
            ep_link = get_interconnect(str(ep_link))
        try:
            return cls(
                model=model_spec,
                gpu=gpu_spec,
                tp=tp,
                pp=pp,
                tp_link=tp_link,
                pp_link=get_interconnect(pp_link) if pp_link else tp_link,
                ep_link=ep_link or (tp_link if group <= GPUS_PER_NODE else get_interconnect(INTER_NODE_LINK)),
                **settings,
            )
        except ValidationError as exc:
            raise ServesimError(describe_validation_error(exc, "deployment")) from None

    # ---- shapes of one TP shard ------------------------------------------------------------------------
    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def moe_group(self) -> int:
        """GPUs of a stage that an MoE layer spans: tp x dp."""
        return self.tp * self.dp

    @property
    def host_link(self) -> InterconnectSpec:
        """The GPU's link to host memory (swapped KV, the prefix cache's host tier)."""
        return get_interconnect(self.gpu.host_link)

    @property
    def moe_link(self) -> InterconnectSpec:
        return self.ep_link or self.tp_link

    @cached_property
    def placement(self) -> ExpertPlacement:
        """The routed experts over the MoE group (EP), or all on every GPU (each sharded)."""
        m = self.model
        p = self.routing.probabilities(m.num_experts, m.experts_per_token)
        if not self.expert_parallel:
            return ExpertPlacement(p, 1)
        return ExpertPlacement(p, self.moe_group, balanced=self.eplb, redundant=self.redundant_experts)

    @property
    def experts_per_gpu(self) -> int:
        return self.placement.experts_per_rank

    @property
    def expert_intermediate_per_gpu(self) -> int:
        """Intermediate size of each routed expert a GPU computes: whole under EP, else sharded over the group."""
        inter = self.model.expert_intermediate_size
        return inter if self.expert_parallel else math.ceil(inter / self.moe_group)

    @property
    def shared_intermediate_per_gpu(self) -> int:
        """Shared experts run as a dense MLP sharded over the attention TP group."""
        return math.ceil(self.model.shared_intermediate_size / self.tp)

    def stage_layers(self, stage: int) -> range:
        start = sum(self.layers_per_stage[:stage])
        return range(start, start + self.layers_per_stage[stage])

    @cached_property
    def layers_per_stage(self) -> tuple[int, ...]:
        return stage_layers(self.model.num_hidden_layers, self.pp)

    @property
    def heads_per_gpu(self) -> int:
        return self.model.num_attention_heads // self.tp

    @property
    def kv_heads_per_gpu(self) -> int:
        return kv_heads_per_gpu(self.model, self.tp)

    @property
    def intermediate_per_gpu(self) -> int:
        return math.ceil(self.model.intermediate_size / self.tp)

    @property
    def vocab_per_gpu(self) -> int:
        return math.ceil(self.model.vocab_size / self.tp)

    @property
    def act_bytes(self) -> float:
        """Activations run in bf16 (fp32 when the weights are fp32)."""
        return 4.0 if self.weight_dtype == "fp32" else 2.0

    @property
    def context_limit(self) -> int:
        return self.max_model_len or self.model.max_position_embeddings

    @property
    def attention_window(self) -> int | None:
        """Keys a query attends to at most: the model's sliding window and the KV token budget (an engine
        that evicts KV down to `kv_token_budget` tokens per request, as StreamingLLM and H2O do)."""
        limits = [w for w in (self.model.sliding_window, self.kv_token_budget) if w is not None]
        return min(limits) if limits else None

    @property
    def kv_tokens_limit(self) -> int:
        """Tokens of KV one request holds at most: its whole context, or the budget."""
        return min(self.context_limit, self.kv_token_budget or self.context_limit)

    def attention_params_per_gpu(self) -> int:
        m, d = self.model, self.model.head_size
        if m.is_mla:
            return m.mla_replicated_params + self.heads_per_gpu * m.mla_params_per_head
        qkv_out = (self.heads_per_gpu + 2 * self.kv_heads_per_gpu) * d
        attn = m.hidden_size * qkv_out + self.heads_per_gpu * d * m.hidden_size
        return attn + (qkv_out if m.attention_bias else 0)

    def mlp_params_per_gpu(self, moe: bool) -> int:
        """A dense layer's MLP shard, or an MoE layer's: the GPU's routed experts (with EPLB's replicas), its
        shard of the shared experts, the router (and Qwen2-MoE's shared-expert gate)."""
        m, h = self.model, self.model.hidden_size
        if not moe:
            return 3 * h * self.intermediate_per_gpu
        gate = h if m.shared_expert_intermediate_size else 0
        return (3 * h * (self.expert_intermediate_per_gpu * self.experts_per_gpu + self.shared_intermediate_per_gpu)
                + h * m.num_experts + gate)

    def layer_params_per_gpu(self, layer: int = 0) -> float:
        moe = self.model.is_moe_layer(layer)
        return self.attention_params_per_gpu() + self.mlp_params_per_gpu(moe) + 2 * self.model.hidden_size

    def kv_bytes_per_token_per_layer(self) -> float:
        """KV of one token in one layer on one GPU (K and V of its KV heads; MLA: the whole latent)."""
        m = self.model
        values = m.kv_values_per_token_per_layer if m.is_mla else 2 * self.kv_heads_per_gpu * m.head_size
        return values * DTYPE_BYTES[self.kv_dtype]

    def kv_bytes_per_token(self) -> float:
        """KV of one token of the replica over all layers and the GPUs that hold a copy of it (what a
        disaggregated transfer moves): each TP rank sends its own heads; MLA's latent, replicated, once."""
        per_layer = self.kv_bytes_per_token_per_layer() * (1 if self.model.is_mla else self.tp)
        return per_layer * self.model.num_hidden_layers

    # ---- memory ----------------------------------------------------------------------------------------
    def _stage_weights(self, stage: int) -> float:
        m = self.model
        params = sum(map(self.layer_params_per_gpu, self.stage_layers(stage)))
        table = self.vocab_per_gpu * m.hidden_size
        if stage == 0:
            params += table
        if stage == self.pp - 1:
            params += m.hidden_size + (0 if (m.tie_word_embeddings and self.pp == 1) else table)
        return params * DTYPE_BYTES[self.weight_dtype]

    def _activation_bytes(self) -> float:
        m, d = self.model, self.model.head_size
        mlp = self.intermediate_per_gpu
        if m.is_moe:  # the routed slots of the busiest GPU's experts, at most every token's top-k
            slots = m.experts_per_token * (float(self.placement.rank_share.max()) if self.expert_parallel else 1)
            mlp = max(mlp, math.ceil(slots * self.expert_intermediate_per_gpu) + self.shared_intermediate_per_gpu)
        per_token = 4 * m.hidden_size + (2 * self.heads_per_gpu + 2 * self.kv_heads_per_gpu) * d + 3 * mlp
        tokens, seqs = self.max_num_batched_tokens / self.dp, self.max_num_seqs / self.dp  # per attention rank
        logits = 2 * seqs * self.vocab_per_gpu * 4.0  # fp32 logits and probabilities
        return tokens * per_token * self.act_bytes + logits

    @cached_property
    def memory(self) -> MemoryPlan:
        """The plan of the tightest stage: weights, activations, runtime, and what is left for KV."""
        usable = self.gpu_memory_utilization * self.gpu.hbm_bytes
        activations = self._activation_bytes()
        best: MemoryPlan | None = None
        for stage, layers in enumerate(self.layers_per_stage):
            weights = self._stage_weights(stage)
            kv_per_token = layers * self.kv_bytes_per_token_per_layer()
            kv_cache = usable - weights - activations - self.runtime_reserve_bytes
            plan = MemoryPlan(
                usable=usable,
                weights=weights,
                activations=activations,
                runtime=self.runtime_reserve_bytes,
                kv_reserve=self.kv_tokens_limit * kv_per_token,
                kv_cache=kv_cache,
                kv_bytes_per_token=kv_per_token,
                kv_capacity_tokens=self.dp * max(0, int(kv_cache // kv_per_token)),
            )
            if best is None or plan.kv_capacity_tokens < best.kv_capacity_tokens:
                best = plan
        assert best is not None
        return best

    def check_fits(self) -> MemoryPlan:
        """The memory plan, or `DoesNotFitError` with the bytes needed and available."""
        plan = self.memory
        if plan.fits:
            return plan
        needed = plan.weights + plan.activations + plan.runtime + plan.kv_reserve
        raise DoesNotFitError(
            f"{self.model.id} does not fit on {self.num_gpus} x {self.gpu.id} (tp={self.tp}, pp={self.pp}"
            + (f", dp={self.dp}" if self.dp > 1 else "") + (", ep" if self.expert_parallel else "") + ", "
            f"weights {self.weight_dtype}): needs {needed / GB:.1f} GB per GPU (weights {plan.weights / GB:.1f} + "
            f"activations {plan.activations / GB:.1f} + runtime {plan.runtime / GB:.1f} + KV for "
            f"{self.context_limit} tokens {plan.kv_reserve / GB:.2f}) but {plan.usable / GB:.1f} GB is usable "
            f"(gpu_memory_utilization {self.gpu_memory_utilization} x {self.gpu.hbm_bytes / GB:.0f} GB); "
            "use a larger tp or pp, fp8 weights, a smaller max_model_len or a GPU with more memory"
        )
