"""Original-layout (OpenGVLab) checkpoints written by hand from transformers models, as section 8 of the
reference describes: the ViT's fused qkv, InternLM2's names and grouped wqkv, ``mlp1``."""

import json

import torch
from safetensors.torch import save_file

from reference import tiny_internvl

VIT_RENAMES = [
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("embeddings.patch_embeddings.projection", "embeddings.patch_embedding"),
    ("encoder.layer.", "encoder.layers."),
    ("attention.projection_layer", "attn.proj"),
    ("attention.q_norm", "attn.q_norm"),
    ("attention.k_norm", "attn.k_norm"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
]
INTERNLM2_RENAMES = [
    ("self_attn.o_proj", "attention.wo"),
    ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.up_proj", "feed_forward.w3"),
    ("mlp.down_proj", "feed_forward.w2"),
    ("input_layernorm", "attention_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("embed_tokens", "tok_embeddings"),
]


def grouped_wqkv(q, k, v, kv_heads: int):
    """InternLM2's ``wqkv`` rows from q [H*D, e], k and v [K*D, e] (torch): per KV head, its query heads, then its
    key, then its value."""
    e = q.shape[1]
    return torch.cat([q.view(kv_heads, -1, e), k.view(kv_heads, -1, e), v.view(kv_heads, -1, e)], 1).reshape(-1, e)


def to_original_layout(sd, internlm2=False, heads=0, kv_heads=0):
    out = {}
    for key, t in sd.items():
        if key.startswith("model.vision_tower."):
            k = key[len("model.vision_tower."):]
            if ".attention." in k and k.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
                if k.split(".")[-2] == "q_proj":  # fuse q, k, v rows into one qkv
                    parts = [sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                    layer = k.split(".")[2]
                    out[f"vision_model.encoder.layers.{layer}.attn.qkv.{k.split('.')[-1]}"] = torch.cat(parts)
                continue
            for a, b in VIT_RENAMES:
                k = k.replace(a, b)
            out["vision_model." + k] = t
        elif key.startswith("model.multi_modal_projector."):
            k = key[len("model.multi_modal_projector."):]
            k = k.replace("layer_norm", "0").replace("linear_1", "1").replace("linear_2", "3")
            out["mlp1." + k] = t
        elif key == "lm_head.weight":
            out["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = t
        else:
            k = key[len("model.language_model."):]
            if internlm2 and k.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
                if k.split(".")[-2] == "q_proj":
                    q, kk, v = (sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj"))
                    out["language_model.model." + k.replace("self_attn.q_proj", "attention.wqkv")] = grouped_wqkv(
                        q, kk, v, kv_heads)
                continue
            if internlm2:
                for a, b in INTERNLM2_RENAMES:
                    k = k.replace(a, b)
            out["language_model.model." + k] = t
    return out


def original_config(ref, arch, model_type, extra_llm=None):
    v, t = ref.config.vision_config, ref.config.text_config
    llm = {
        "architectures": [arch], "model_type": model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_parameters["rope_theta"], **(extra_llm or {}),
    }
    return {
        "architectures": ["InternVLChatModel"], "llm_config": llm, "ps_version": "v2", "select_layer": -1,
        "downsample_ratio": 0.5, "template": "internvl2_5", "img_context_token_id": ref.config.image_token_id,
        "vision_config": {
            "hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "intermediate_size": v.intermediate_size,
            "image_size": v.image_size[0], "patch_size": v.patch_size[0], "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps, "qk_normalization": v.use_qk_norm, "qkv_bias": v.attention_bias,
        },
    }


CASES = {
    # 2 KV heads with 3 query heads each: a wrong grouping cannot pass
    "internlm2": dict(text="llama", vision="rmsnorm_qknorm",
                      text_overrides=dict(num_attention_heads=6, num_key_value_heads=2, head_dim=16, hidden_size=96),
                      arch=("InternLM2ForCausalLM", "internlm2", {"bias": False})),
    "phi3": dict(text="phi3", vision="layernorm_bias", text_overrides={},
                 arch=("Phi3ForCausalLM", "phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                                   "long_factor": [2.0 + 0.5 * i for i in range(8)]},
                                                   "original_max_position_embeddings": 32})),
    "qwen2": dict(text="qwen2", vision="layernorm_bias", text_overrides={}, arch=("Qwen2ForCausalLM", "qwen2", {})),
}




def original_checkpoint(case: str, folder):
    """Write the original-layout checkpoint of ``CASES[case]`` to ``folder``; returns (reference model, tensors)."""
    c = CASES[case]
    ref = tiny_internvl(c["text"], c["vision"], text_overrides=c["text_overrides"])
    tensors = to_original_layout(ref.state_dict(), internlm2=case == "internlm2",
                                 heads=ref.config.text_config.num_attention_heads,
                                 kv_heads=ref.config.text_config.num_key_value_heads)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(original_config(ref, *c["arch"])))
    return ref, tensors
