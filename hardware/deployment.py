"""A model served on GPUs with TP x PP: per-GPU shards, the memory plan and the check that it fits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from pydantic import Field, PositiveInt, ValidationError, model_validator

from hardware.catalog import get_gpu, get_interconnect, get_model
from hardware.errors import DoesNotFitError, ServesimError, describe_validation_error
from hardware.specs import (
    DTYPE_BYTES,
    DType,
    Elementwise,
    GPUSpec,
    InterconnectSpec,
    KvAccess,
    ModelSpec,
    Spec,
    kv_heads_per_gpu,
)

GB = 1e9


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
    kv_capacity_tokens: int  # tokens of KV the replica can hold

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
    kv_dtype: DType = "bf16"
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    max_num_batched_tokens: PositiveInt = 8192
    max_num_seqs: PositiveInt = 256
    max_model_len: PositiveInt | None = None
    runtime_reserve_bytes: float = Field(1.0e9, ge=0.0)
    kv_access: KvAccess = "paged"
    elementwise: Elementwise = "fused"

    @model_validator(mode="after")
    def _check(self) -> Deployment:
        m = self.model
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
        try:
            return cls(
                model=model_spec,
                gpu=gpu_spec,
                tp=tp,
                pp=pp,
                tp_link=tp_link,
                pp_link=get_interconnect(pp_link) if pp_link else tp_link,
                **settings,
            )
        except ValidationError as exc:
            raise ServesimError(describe_validation_error(exc, "deployment")) from None

    # ---- shapes of one TP shard ------------------------------------------------------------------------
    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

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

    def layer_params_per_gpu(self) -> float:
        m, d = self.model, self.model.head_size
        qkv_out = (self.heads_per_gpu + 2 * self.kv_heads_per_gpu) * d
        attn = m.hidden_size * qkv_out + self.heads_per_gpu * d * m.hidden_size
        attn += qkv_out if m.attention_bias else 0
        mlp = 3 * m.hidden_size * self.intermediate_per_gpu * m.num_experts
        router = m.hidden_size * m.num_experts if m.is_moe else 0
        return attn + mlp + router + 2 * m.hidden_size

    def kv_bytes_per_token_per_layer(self) -> float:
        """K and V of one token in one layer on one GPU."""
        return 2 * self.kv_heads_per_gpu * self.model.head_size * DTYPE_BYTES[self.kv_dtype]

    # ---- memory ----------------------------------------------------------------------------------------
    def _stage_weights(self, stage: int) -> float:
        m = self.model
        params = self.layers_per_stage[stage] * self.layer_params_per_gpu()
        table = self.vocab_per_gpu * m.hidden_size
        if stage == 0:
            params += table
        if stage == self.pp - 1:
            params += m.hidden_size + (0 if (m.tie_word_embeddings and self.pp == 1) else table)
        return params * DTYPE_BYTES[self.weight_dtype]

    def _activation_bytes(self) -> float:
        m, d = self.model, self.model.head_size
        per_token = (
            4 * m.hidden_size
            + (2 * self.heads_per_gpu + 2 * self.kv_heads_per_gpu) * d
            + 3 * self.intermediate_per_gpu * m.experts_per_token
        )
        logits = 2 * self.max_num_seqs * self.vocab_per_gpu * 4.0  # fp32 logits and probabilities
        return self.max_num_batched_tokens * per_token * self.act_bytes + logits

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
                kv_reserve=self.context_limit * kv_per_token,
                kv_cache=kv_cache,
                kv_bytes_per_token=kv_per_token,
                kv_capacity_tokens=max(0, int(kv_cache // kv_per_token)),
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
            f"{self.model.id} does not fit on {self.num_gpus} x {self.gpu.id} (tp={self.tp}, pp={self.pp}, "
            f"weights {self.weight_dtype}): needs {needed / GB:.1f} GB per GPU (weights {plan.weights / GB:.1f} + "
            f"activations {plan.activations / GB:.1f} + runtime {plan.runtime / GB:.1f} + KV for "
            f"{self.context_limit} tokens {plan.kv_reserve / GB:.2f}) but {plan.usable / GB:.1f} GB is usable "
            f"(gpu_memory_utilization {self.gpu_memory_utilization} x {self.gpu.hbm_bytes / GB:.0f} GB); "
            "use a larger tp or pp, fp8 weights, a smaller max_model_len or a GPU with more memory"
        )
