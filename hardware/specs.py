"""Frozen pydantic specs of GPUs, interconnects and model architectures (see catalog/*.yaml)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from hardware.errors import ServesimError, describe_validation_error

DType = Literal["fp32", "bf16", "fp16", "fp8"]
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
# How attention reads the paged KV cache: "gather" copies a step's K/V into contiguous buffers before the
# kernel (servesim's PyTorch backend: PyTorch's FlashAttention takes no block tables); "paged" reads the
# blocks in place (vLLM's FlashAttention and FlashInfer kernels).
KvAccess = Literal["gather", "paged"]
Elementwise = Literal["fused", "unfused"]

# Hugging Face `model_type`s whose architecture is the Llama family this cost model prices: pre-norm
# decoder, GQA attention with RoPE, RMSNorm, SwiGLU MLP (dense, or Mixtral-style top-k experts).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")


class Spec(BaseModel):
    """Base of every spec: immutable, and unknown fields are an error (typos do not pass silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class GPUSpec(Spec):
    """Datasheet figures of one GPU; FLOP/s are dense tensor-core peaks, bandwidth in bytes/s."""

    id: str
    name: str
    aliases: tuple[str, ...] = ()
    vendor: Literal["nvidia", "amd", "other"] = "other"
    bf16_flops: PositiveFloat
    fp8_flops: PositiveFloat | None = None
    fp32_flops: PositiveFloat
    hbm_bytes: PositiveFloat
    hbm_bandwidth: PositiveFloat
    l2_bytes: PositiveFloat
    sm_count: PositiveInt
    tdp_watts: PositiveFloat
    price_per_hour: float = Field(ge=0.0)
    intra_node_link: str

    def matmul_flops(self, weight_dtype: str) -> float:
        """Tensor-core peak for GEMMs with weights of this dtype.

        fp8 weights run W8A8 at the fp8 peak where the GPU has fp8 tensor cores; elsewhere (A100) they are
        weight-only quantised: 1-byte weights, bf16 compute. fp32 runs at the fp32 peak.
        """
        if weight_dtype == "fp8" and self.fp8_flops is not None:
            return self.fp8_flops
        if weight_dtype == "fp32":
            return self.fp32_flops
        return self.bf16_flops

    def with_price(self, price_per_hour: float) -> GPUSpec:
        """The same GPU at another hourly price (validated like the catalog's)."""
        try:
            return GPUSpec.model_validate({**self.model_dump(), "price_per_hour": price_per_hour})
        except ValidationError as exc:
            raise ServesimError(describe_validation_error(exc, self.id)) from None


class InterconnectSpec(Spec):
    """A link: bandwidth per direction (bytes/s) and the latency of one transfer step (s)."""

    id: str
    name: str
    aliases: tuple[str, ...] = ()
    bandwidth: PositiveFloat
    latency: float = Field(ge=0.0)


class ModelSpec(Spec):
    """A Llama-family decoder described with the field names of its Hugging Face `config.json`."""

    id: str
    hf_id: str | None = None
    aliases: tuple[str, ...] = ()
    model_type: str
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    head_dim: PositiveInt | None = None
    vocab_size: PositiveInt
    max_position_embeddings: PositiveInt
    tie_word_embeddings: bool = False
    rope_theta: PositiveFloat = 10000.0
    sliding_window: PositiveInt | None = None
    attention_bias: bool = False
    num_local_experts: PositiveInt | None = None
    num_experts_per_tok: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; allowed: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if (self.num_local_experts is None) != (self.num_experts_per_tok is None):
            raise ValueError("num_local_experts and num_experts_per_tok must be given together")
        if self.is_moe and self.experts_per_token > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts ({self.num_local_experts})"
            )
        return self

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], model_id: str) -> ModelSpec:
        """Build from a Hugging Face `config.json` dict, keeping the fields that shape the compute."""
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; allowed: silu (SwiGLU MLP)")
        keep = set(cls.model_fields) - {"id", "hf_id", "aliases"}
        fields = {k: v for k, v in config.items() if k in keep}
        fields.setdefault("num_key_value_heads", config.get("num_attention_heads"))
        if config.get("model_type") == "qwen2":
            fields.setdefault("attention_bias", True)  # Qwen2 always has q/k/v biases
            if not config.get("use_sliding_window", False):
                fields["sliding_window"] = None
        return cls.model_validate({"id": model_id, "hf_id": config.get("_name_or_path"), **fields})

    # ---- derived shapes -------------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_size

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts is not None

    @property
    def num_experts(self) -> int:
        return self.num_local_experts or 1

    @property
    def experts_per_token(self) -> int:
        return self.num_experts_per_tok or 1

    # ---- parameter counts ----------------------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        bias = (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + bias

    @property
    def mlp_params_per_layer(self) -> int:
        """All experts' SwiGLU weights (gate, up, down) plus the router of an MoE."""
        router = self.hidden_size * self.num_experts if self.is_moe else 0
        return 3 * self.hidden_size * self.intermediate_size * self.num_experts + router

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head when it is not tied to it."""
        table = self.vocab_size * self.hidden_size
        return table if self.tie_word_embeddings else 2 * table

    @property
    def num_params(self) -> int:
        per_layer = self.attention_params_per_layer + self.mlp_params_per_layer + 2 * self.hidden_size
        return self.num_hidden_layers * per_layer + self.embedding_params + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters one token touches (top-k experts of an MoE instead of all of them)."""
        inactive = 3 * self.hidden_size * self.intermediate_size * (self.num_experts - self.experts_per_token)
        return self.num_params - self.num_hidden_layers * inactive

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> float:
        """K and V of one token over all layers, unsharded."""
        return 2 * self.num_hidden_layers * self.kv_size * DTYPE_BYTES[kv_dtype]


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    """KV heads one TP rank holds: sharded when there are enough, else replicated (one per rank)."""
    return max(1, math.ceil(model.num_key_value_heads / tp))
