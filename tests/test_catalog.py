from __future__ import annotations

import json

import pytest
import yaml

from hardware.catalog import get_gpu, get_interconnect, get_model, gpu_ids, interconnect_ids, model_ids
from hardware.errors import ServesimError, UnknownIdError
from hardware.specs import GPUSpec, ModelSpec

REQUIRED_GPUS = ["h100-sxm-80gb", "h200-sxm-141gb", "a100-sxm-80gb", "l40s-48gb", "b200-180gb", "mi300x-192gb"]
REQUIRED_LINKS = ["nvlink3", "nvlink4", "nvlink5", "pcie4-x16", "pcie5-x16", "ib-hdr", "ib-ndr", "eth-100g", "eth-400g"]

# Published parameter counts (model cards / safetensors metadata), in billions.
PUBLISHED_PARAMS = {
    "llama-2-7b": 6.74,
    "llama-2-13b": 13.02,
    "llama-2-70b": 68.98,
    "llama-3-8b": 8.03,
    "llama-3-70b": 70.55,
    "llama-3.1-405b": 405.85,
    "mistral-7b": 7.25,
    "qwen2.5-7b": 7.62,
    "qwen2.5-14b": 14.77,
    "qwen2.5-72b": 72.71,
    "mixtral-8x7b": 46.70,
}


def test_required_entries_present() -> None:
    assert set(REQUIRED_GPUS) <= set(gpu_ids())
    assert set(REQUIRED_LINKS) <= set(interconnect_ids())
    assert set(PUBLISHED_PARAMS) | {"qwen2.5-32b"} <= set(model_ids())


@pytest.mark.parametrize("gpu_id", REQUIRED_GPUS)
def test_gpu_entries_are_sane(gpu_id: str) -> None:
    gpu = get_gpu(gpu_id)
    assert isinstance(gpu, GPUSpec)
    assert gpu.bf16_flops > gpu.fp32_flops
    if gpu.fp8_flops is not None:
        assert gpu.fp8_flops >= gpu.bf16_flops
    assert get_interconnect(gpu.intra_node_link).bandwidth > 0
    with pytest.raises(Exception):
        gpu.hbm_bytes = 1.0  # frozen


@pytest.mark.parametrize("alias,gpu_id", [
    ("h100", "h100-sxm-80gb"), ("H200", "h200-sxm-141gb"), ("a100", "a100-sxm-80gb"), ("mi300x", "mi300x-192gb"),
    ("b200", "b200-180gb"),
])
def test_gpu_aliases(alias: str, gpu_id: str) -> None:
    assert get_gpu(alias).id == gpu_id


@pytest.mark.parametrize("model_id,billions", sorted(PUBLISHED_PARAMS.items()))
def test_parameter_counts_match_published(model_id: str, billions: float) -> None:
    assert get_model(model_id).num_params / 1e9 == pytest.approx(billions, rel=0.005)


def test_mixtral_active_parameters() -> None:
    m = get_model("mixtral-8x7b")
    assert m.is_moe and m.num_experts == 8 and m.experts_per_token == 2
    assert m.active_params / 1e9 == pytest.approx(12.9, rel=0.01)  # Mistral's "12.9B active"


def test_kv_bytes_per_token() -> None:
    m = get_model("llama-3-8b")  # 32 layers x 8 KV heads x 128 dims x (K and V) x 2 bytes
    assert m.kv_bytes_per_token("bf16") == 32 * 8 * 128 * 2 * 2
    assert m.kv_bytes_per_token("fp8") == 32 * 8 * 128 * 2


def test_unknown_ids_list_known_ones() -> None:
    with pytest.raises(UnknownIdError) as exc:
        get_gpu("h900")
    assert "h900" in str(exc.value) and "h100-sxm-80gb" in str(exc.value)
    with pytest.raises(UnknownIdError, match="llama-3-8b"):
        get_model("llama-9b")
    with pytest.raises(UnknownIdError, match="nvlink4"):
        get_interconnect("carrier-pigeon")


def test_hf_config_json_loads(tmp_path) -> None:
    cfg = {  # the shape of a real Qwen2 config.json, with fields we do not use
        "_name_or_path": "someone/qwen-ish", "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1e6,
        "sliding_window": 32768, "use_sliding_window": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
    }
    path = tmp_path / "qwen-small" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    m = get_model(str(path))
    assert m.id == "qwen-small" and m.attention_bias and m.sliding_window is None
    assert m.num_params / 1e9 == pytest.approx(0.494, rel=0.01)  # Qwen2-0.5B: 0.49B


def test_hf_config_rejects_unsupported_activation() -> None:
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ModelSpec.from_hf_config({"model_type": "llama", "hidden_act": "gelu"}, "x")


def test_bad_model_fields_give_one_line(tmp_path) -> None:
    base = get_model("llama-3-8b").model_dump(exclude={"id", "aliases"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base, "num_key_value_heads": 7}))
    with pytest.raises(ServesimError) as exc:
        get_model(str(path))
    msg = str(exc.value)
    assert "\n" not in msg and "num_key_value_heads (7)" in msg
    path.write_text(yaml.safe_dump({**base, "model_type": "gpt2"}))
    with pytest.raises(ServesimError, match="model_type 'gpt2' is not supported; allowed: llama"):
        get_model(str(path))


def test_user_gpu_file_and_price_override(tmp_path) -> None:
    fields = get_gpu("h100").model_dump(exclude={"id", "aliases"})
    path = tmp_path / "my-h100.yaml"
    path.write_text(yaml.safe_dump({**fields, "price_per_hour": 2.1}))
    assert get_gpu(str(path)).price_per_hour == 2.1
    assert get_gpu("h100").with_price(1.5).price_per_hour == 1.5
    path.write_text(yaml.safe_dump({**fields, "hbm_bandwidth": -1}))
    with pytest.raises(ServesimError, match=r"hbm_bandwidth = -1: Input should be greater than 0"):
        get_gpu(str(path))
    with pytest.raises(ServesimError, match="price_per_hour"):
        get_gpu("h100").with_price(-2)
