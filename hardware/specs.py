"""Frozen pydantic specs of GPUs, interconnects and model architectures (see catalog/*.yaml)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from hardware.errors import ServesimError, describe_validation_error

DType = Literal["fp32", "bf16", "fp16", "fp8"]
# KV caches may also be quantized to integers in groups with an fp16 scale and zero point each (KIVI, Liu et
# al., ICML 2024; QServe's KV4): the scales add 4 bytes per group of `KV_QUANT_GROUP` values.
KvDType = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "int2"]
KV_QUANT_GROUP = 64
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0,
                                 **{f"int{bits}": bits / 8 + 4.0 / KV_QUANT_GROUP for bits in (8, 4, 2)}}
# How attention reads the paged KV cache: "gather" copies a step's K/V into contiguous buffers before the
# kernel (servesim's PyTorch backend: PyTorch's FlashAttention takes no block tables); "paged" reads the
# blocks in place (vLLM's FlashAttention and FlashInfer kernels).
KvAccess = Literal["gather", "paged"]
Elementwise = Literal["fused", "unfused"]

# Hugging Face `model_type`s whose architecture this cost model prices: pre-norm decoders with RMSNorm and
# SwiGLU MLPs; attention GQA with RoPE (Llama family) or multi-head latent attention (DeepSeek-V2/V3); MLPs
# dense, or top-k routed experts (Mixtral), with shared experts (Qwen2-MoE, DeepSeek) and dense first layers
# (DeepSeek's `first_k_dense_replace`, Qwen's `mlp_only_layers`).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "deepseek_v2",
                         "deepseek_v3")
# Other names of the same fields in some families' config.json: (model types, their name, ours).
_HF_RENAMES = ((("qwen2_moe", "qwen3_moe"), "num_experts", "num_local_experts"),
               (("deepseek_v2", "deepseek_v3"), "n_routed_experts", "num_local_experts"))


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
    host_link: str = "pcie5-x16"

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
    # MoE beyond Mixtral: the routed experts' size (default intermediate_size, which then sizes dense layers),
    # shared experts (Qwen2-MoE: one of `shared_expert_intermediate_size`; DeepSeek: `n_shared_experts` of
    # the routed size), and which layers stay dense.
    moe_intermediate_size: PositiveInt | None = None
    shared_expert_intermediate_size: int = Field(0, ge=0)
    n_shared_experts: int = Field(0, ge=0)
    first_k_dense_replace: int = Field(0, ge=0)
    moe_layer_freq: PositiveInt = 1
    decoder_sparse_step: PositiveInt = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434): K and V are up-projected from a cached
    # latent of kv_lora_rank plus a shared RoPE key of qk_rope_head_dim per token.
    kv_lora_rank: PositiveInt | None = None
    q_lora_rank: PositiveInt | None = None
    qk_nope_head_dim: PositiveInt | None = None
    qk_rope_head_dim: PositiveInt | None = None
    v_head_dim: PositiveInt | None = None

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
        mla = (self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
        if any(v is not None for v in mla) and None in mla:
            raise ValueError("kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim must be given together "
                             "(multi-head latent attention)")
        if self.model_type.startswith("deepseek") and not self.is_mla:
            raise ValueError(f"model_type {self.model_type!r} needs kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim "
                             "and v_head_dim (multi-head latent attention)")
        return self

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], model_id: str) -> ModelSpec:
        """Build from a Hugging Face `config.json` dict, keeping the fields that shape the compute."""
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; allowed: silu (SwiGLU MLP)")
        keep = set(cls.model_fields) - {"id", "hf_id", "aliases"}
        config = dict(config)
        for types, theirs, ours in _HF_RENAMES:
            if config.get("model_type") in types and theirs in config:
                config.setdefault(ours, config.pop(theirs))
        fields = {k: v for k, v in config.items() if k in keep}
        fields.setdefault("num_key_value_heads", config.get("num_attention_heads"))
        if config.get("model_type") in ("qwen2", "qwen2_moe"):
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
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def expert_intermediate_size(self) -> int:
        """Intermediate size of one routed expert."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def shared_intermediate_size(self) -> int:
        """Intermediate size of the shared experts of an MoE layer, taken together (0: none)."""
        return self.shared_expert_intermediate_size + self.n_shared_experts * self.expert_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (from 0) routes to experts: DeepSeek's first_k_dense_replace and
        moe_layer_freq, Qwen's mlp_only_layers and decoder_sparse_step, as their modelling code reads them."""
        return (self.is_moe and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0
                and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0)

    def moe_layers(self, layers: range | None = None) -> int:
        """How many of `layers` (default all) are MoE layers."""
        return sum(map(self.is_moe_layer, layers if layers is not None else range(self.num_hidden_layers)))

    @property
    def experts_per_token(self) -> int:
        return self.num_experts_per_tok or 1

    # ---- parameter counts ----------------------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            return self.mla_replicated_params + self.num_attention_heads * self.mla_params_per_head
        bias = (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + bias

    @property
    def mla_qk_head_dim(self) -> int:
        return (self.qk_nope_head_dim or 0) + (self.qk_rope_head_dim or 0)

    @property
    def mla_replicated_params(self) -> int:
        """MLA weights every TP rank holds whole: the down-projections to the latents and their norms."""
        h, lq, lkv, dr = self.hidden_size, self.q_lora_rank or 0, self.kv_lora_rank or 0, self.qk_rope_head_dim or 0
        return h * lq + lq + h * (lkv + dr) + lkv

    @property
    def mla_params_per_head(self) -> int:
        """MLA weights of one attention head (sharded by TP): its query up-projection (or projection), its
        K and V up-projections from the latent, and its slice of the output projection."""
        h, lkv = self.hidden_size, self.kv_lora_rank or 0
        q_in = self.q_lora_rank or h
        return q_in * self.mla_qk_head_dim + lkv * ((self.qk_nope_head_dim or 0) + (self.v_head_dim or 0)) + \
            (self.v_head_dim or 0) * h

    def mlp_params(self, layer: int) -> int:
        """SwiGLU weights (gate, up, down) of one layer: a dense MLP, or an MoE layer's routed and shared
        experts with its router (and Qwen2-MoE's shared-expert gate)."""
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * h * self.intermediate_size
        shared_gate = h if self.shared_expert_intermediate_size else 0
        return (3 * h * (self.expert_intermediate_size * self.num_experts + self.shared_intermediate_size)
                + h * self.num_experts + shared_gate)

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head when it is not tied to it."""
        table = self.vocab_size * self.hidden_size
        return table if self.tie_word_embeddings else 2 * table

    @property
    def num_params(self) -> int:
        layers = self.num_hidden_layers
        mlp = sum(map(self.mlp_params, range(layers)))
        return layers * (self.attention_params_per_layer + 2 * self.hidden_size) + mlp + self.embedding_params + \
            self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters one token touches (top-k routed experts of an MoE layer instead of all of them)."""
        inactive = 3 * self.hidden_size * self.expert_intermediate_size * (self.num_experts - self.experts_per_token)
        return self.num_params - self.moe_layers() * inactive

    @property
    def kv_values_per_token_per_layer(self) -> int:
        """Values one token stores per layer: K and V of each KV head, or MLA's latent and RoPE key."""
        if self.is_mla:
            return (self.kv_lora_rank or 0) + (self.qk_rope_head_dim or 0)
        return 2 * self.kv_size

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> float:
        """KV of one token over all layers, unsharded."""
        return self.num_hidden_layers * self.kv_values_per_token_per_layer * DTYPE_BYTES[kv_dtype]


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    """KV heads one TP rank holds: sharded when there are enough, else replicated (one per rank); MLA's latent
    is one 'head' that every rank holds whole."""
    if model.is_mla:
        return 1
    return max(1, math.ceil(model.num_key_value_heads / tp))
