"""Configs: both config.json layouts, presets, and exact parameter counts against transformers."""

import json

import pytest
import torch

from internvl_jax.config import ConfigError, config_from_dict, load_config, to_hf_dict
from internvl_jax.model import param_count
from internvl_jax.presets import PRESETS, get_preset

# InternVL3-1B's own config.json (original layout), abridged to the fields the port reads
ORIGINAL_3_1B = {
    "architectures": ["InternVLChatModel"],
    "downsample_ratio": 0.5,
    "force_image_size": 448,
    "max_dynamic_patch": 12,
    "ps_version": "v2",
    "select_layer": -1,
    "template": "internvl2_5",
    "use_thumbnail": True,
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "vocab_size": 151674,
    },
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "drop_path_rate": 0.1,
        "hidden_size": 1024,
        "image_size": 448,
        "initializer_factor": 1.0,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-06,
        "norm_type": "layer_norm",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "qk_normalization": False,
        "qkv_bias": True,
    },
}


def test_original_layout_config():
    c = config_from_dict(ORIGINAL_3_1B)
    assert (c.text.family, c.text.hidden_size, c.text.num_kv_heads, c.text.head_dim) == ("qwen2", 896, 2, 64)
    assert (c.text.rope.type, c.text.rope.factor, c.text.rope.theta) == ("dynamic", 2.0, 1e6)
    assert c.text.qkv_bias and not c.text.o_bias and not c.text.tie_word_embeddings
    assert (c.vision.norm_type, c.vision.qkv_bias, c.vision.qk_norm, c.vision.layer_scale_init) == (
        "layer_norm", True, False, 1.0)
    assert (c.ps_version, c.template, c.tokens_per_tile, c.vision.drop_path_rate) == ("v2", "internvl2_5", 256, 0.1)
    assert c.vision_layers_used == 24


def test_original_layout_defaults_ps_version_to_v1():
    d = {k: v for k, v in ORIGINAL_3_1B.items() if k != "ps_version"}
    assert config_from_dict(d).ps_version == "v1"


def test_transformers_layout_round_trip(tmp_path):
    c = get_preset("InternVL3-1B")
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(c)))
    back = load_config(str(tmp_path))
    assert back.vision == c.vision and back.text == c.text and back.tokens_per_tile == 256


def test_bad_configs_name_the_problem():
    with pytest.raises(ConfigError, match="not an InternVL checkpoint"):
        config_from_dict({"model_type": "llama"})
    bad = json.loads(json.dumps(ORIGINAL_3_1B))
    bad["llm_config"]["architectures"] = ["MixtralForCausalLM"]
    with pytest.raises(ConfigError, match="unsupported LLM architecture.*Mixtral"):
        config_from_dict(bad)
    with pytest.raises(KeyError, match="InternVL2_5-8B"):
        get_preset("InternVL9-1B")


def _transformers_count(config) -> int:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    hf = to_hf_dict(config.replace(ps_version="v2"))  # the pixel-shuffle order has no parameters
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(InternVLConfig(**hf))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_equals_transformers(name):
    """Every preset's LLM family exists in transformers (InternLM2 as the Llama it converts to)."""
    config = get_preset(name)
    assert param_count(config) == _transformers_count(config)


def test_internlm2_llm_config_defaults_bias_to_true():
    """InternLM2Config defaults `bias` to True when the key is missing (released configs set it false)."""
    d = json.loads(json.dumps(ORIGINAL_3_1B))
    d["llm_config"] = {
        "architectures": ["InternLM2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1e6,
    }
    c = config_from_dict(d)
    assert (c.text.family, c.text.qkv_bias, c.text.o_bias, c.text.rope.type) == ("internlm2", True, True, "dynamic")
    d["llm_config"]["bias"] = False
    assert not config_from_dict(d).text.qkv_bias
