"""Named configs of the dense InternVL releases, and tiny ones for tests.

Each release preset carries the shapes of that checkpoint's own ``config.json``: the vocabulary as InternVL
resized it (base tokenizer + 9 image/grounding tokens), the LLM's rope, norm epsilon and biases, the
untied head (the <= 3.0 config class forces it; 3.5 checkpoints are untied too), and the runtime fields
(template, pixel-shuffle version, tiling). ``image_token_id`` is the ``<IMG_CONTEXT>`` id of that tokenizer;
code that has the tokenizer should still look it up there.

A value that could not be checked against a source is marked ``# unverified: <field>`` on its line.
Look presets up with :func:`get_preset`; ``replace`` any field for experiments.
"""

from __future__ import annotations

import dataclasses

from .clip_config import QLLAMA_ROPE, CLIPConfig
from .config import InternVLConfig, RopeConfig, TextConfig, VisionConfig

# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

_DYNAMIC_X2 = RopeConfig(type="dynamic", theta=1e6, factor=2.0)  # NTK, active only beyond max positions

# Phi-3-mini-128k-instruct (April 2024 "su" release) rope factors, one per rotary frequency (head_dim 96 / 2).
_PHI3_SHORT = (
    1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.2500000000000002, 1.2500000000000002, 1.4000000000000004,
    1.4500000000000004, 1.5500000000000005, 1.8500000000000008, 1.9000000000000008, *(2.000000000000001,) * 19,
    2.1000000000000005, 2.1000000000000005, 2.2, 2.3499999999999996, 2.3499999999999996, 2.3499999999999996,
    2.3499999999999996, 2.3999999999999995, 2.3999999999999995, 2.6499999999999986, 2.6999999999999984,
    2.8999999999999977, 2.9499999999999975, 3.049999999999997, 3.049999999999997, 3.049999999999997,
)
_PHI3_LONG = (
    1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547, 1.2299998998641968,
    1.2299998998641968, 1.2999999523162842, 1.4499999284744263, 1.5999999046325684, 1.6499998569488525,
    1.8999998569488525, 2.859999895095825, 3.68999981880188, 5.419999599456787, 5.489999771118164,
    5.489999771118164, 9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355,
    15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055, 30.009998321533203,
    32.35000228881836, 32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156,
    56.20000457763672, 57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844,
    61.190006256103516, 61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086,
    63.48000717163086, 63.66000747680664, 63.850006103515625, 64.08000946044922, 64.760009765625,
    64.80001068115234, 64.81001281738281, 64.81001281738281,
)


def _vit300m() -> VisionConfig:
    """InternViT-300M-448px (and -V2_5): the VisionConfig defaults."""
    return VisionConfig()


def _vit6b() -> VisionConfig:
    """InternViT-6B-448px-V1-2 / V1-5 / V2_5 (45 layers)."""
    return VisionConfig(
        hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
        norm_type="rms_norm", qk_norm=True, qkv_bias=False,
    )


def _vit6b_v1_0(image_size: int) -> VisionConfig:
    """InternViT-6B-224px (InternVL 1.0) and InternViT-6B-448px-V1-0: the 6B ViT with all 48 layers."""
    return dataclasses.replace(_vit6b(), num_layers=48, image_size=image_size)


def _qwen2(vocab, hidden, layers, heads, kv, mlp, *, eps=1e-6, rope=_DYNAMIC_X2) -> TextConfig:
    """Qwen2 / Qwen2.5: q/k/v bias, no o bias."""
    return TextConfig(
        family="qwen2", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=hidden // heads, intermediate_size=mlp, norm_eps=eps,
        max_position_embeddings=32768, rope=rope, qkv_bias=True,
    )


def _qwen3(hidden, layers, heads, mlp) -> TextConfig:
    """Qwen3 dense: 8 KV heads of 128, per-head q/k norm, no biases."""
    return TextConfig(
        family="qwen3", vocab_size=151936, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=8, head_dim=128, intermediate_size=mlp, norm_eps=1e-6, max_position_embeddings=40960,
        rope=RopeConfig(theta=1e6), qk_norm=True,
    )


def _internlm2(hidden, layers, heads, mlp) -> TextConfig:
    """InternLM2 / 2.5 (``bias`` false in the released configs), tokenizer 92544 + 9."""
    return TextConfig(
        family="internlm2", vocab_size=92553, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=8, head_dim=hidden // heads, intermediate_size=mlp, norm_eps=1e-5,
        max_position_embeddings=32768, rope=_DYNAMIC_X2,
    )


def _llama(vocab, hidden, layers, heads, kv, mlp, *, max_pos, rope, head_dim=128) -> TextConfig:
    """Llama-architecture decoders (Yi, Llama-3, InternLM3): no biases."""
    return TextConfig(
        family="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, intermediate_size=mlp, norm_eps=1e-5,
        max_position_embeddings=max_pos, rope=rope,
    )


def _phi3() -> TextConfig:
    """Phi-3-mini-128k-instruct, tokenizer 32011 + 9."""
    return TextConfig(
        family="phi3", vocab_size=32020, hidden_size=3072, num_layers=32, num_heads=32, num_kv_heads=32,
        head_dim=96, intermediate_size=8192, norm_eps=1e-5, max_position_embeddings=131072,
        rope=RopeConfig(
            type="longrope", theta=10000.0, original_max_position_embeddings=4096,
            short_factor=_PHI3_SHORT, long_factor=_PHI3_LONG,
        ),
    )


_YI_34B = dict(hidden=7168, layers=60, heads=56, kv=8, mlp=20480)
_YI_ROPE = RopeConfig(theta=5e6)
_HERMES_LLAMA3_70B = _llama(  # unverified: vocab_size (128256 + 9 assumed)
    128265, 8192, 80, 64, 8, 28672, max_pos=8192, rope=RopeConfig(theta=500000.0)
)
_INTERNLM2_1_8B = _internlm2(2048, 24, 16, 8192)  # unverified: rope (dynamic x2 assumed, as in internlm2.5-7b)
_INTERNLM2_7B = _internlm2(4096, 32, 32, 14336)
_INTERNLM2_20B = _internlm2(6144, 48, 48, 16384)  # unverified: rope (dynamic x2 assumed, as in internlm2.5-7b)


def _chat(vision: VisionConfig, text: TextConfig, template: str, image_token_id: int, **kw) -> InternVLConfig:
    """A chat release: 448 tiles, pixel shuffle v2, last ViT layer, up to 12 tiles plus a thumbnail."""
    return InternVLConfig(
        vision=vision, text=text, template=template, image_token_id=image_token_id, force_image_size=448, **kw
    )


# ----------------------------------------------------------------------------------------------
# Releases
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, InternVLConfig] = {
    # 1.2 / 1.5: internvl_chat/shell/internvl1.{2,5} finetune scripts (template, select layer, tiling, ps version);
    # Yi-34B shapes and ids from mindformers research/internvl2/internvl2_40B/predict_internvl2_40b.yaml.
    "InternVL-Chat-V1-2": _chat(  # unverified: vocab_size, image_token_id, max_position_embeddings (as 2-40B)
        _vit6b(), _llama(64007, **_YI_34B, max_pos=4096, rope=_YI_ROPE), "Hermes-2", 64000,
        ps_version="v1", max_dynamic_patch=1, use_thumbnail=False,
    ),
    "InternVL-Chat-V1-5": _chat(_vit6b(), _INTERNLM2_20B, "internlm2-chat", 92546),
    "Mini-InternVL-Chat-2B-V1-5": _chat(_vit300m(), _INTERNLM2_1_8B, "internlm2-chat", 92546),
    "Mini-InternVL-Chat-4B-V1-5": _chat(  # unverified: vocab_size, image_token_id, rope factors (April 'su' lists)
        _vit300m(), _phi3(), "phi3-chat", 32013
    ),
    # 2.0: model cards (ViT + LLM pairs), reference section 4; 8B LLM shapes verified from its config.json.
    "InternVL2-1B": _chat(  # unverified: vocab_size, image_token_id (Qwen2 tokenizer 151646 + 9), rope (none assumed)
        _vit300m(), _qwen2(151655, 896, 24, 14, 2, 4864, rope=RopeConfig(theta=1e6)), "Hermes-2", 151648
    ),
    "InternVL2-2B": _chat(_vit300m(), _INTERNLM2_1_8B, "internlm2-chat", 92546),
    "InternVL2-4B": _chat(  # unverified: vocab_size, image_token_id, rope factors (April 'su' lists)
        _vit300m(), _phi3(), "phi3-chat", 32013
    ),
    "InternVL2-8B": _chat(_vit300m(), _INTERNLM2_7B, "internlm2-chat", 92546),
    "InternVL2-26B": _chat(_vit6b(), _INTERNLM2_20B, "internlm2-chat", 92546),
    "InternVL2-40B": _chat(  # unverified: max_position_embeddings
        _vit6b(), _llama(64007, **_YI_34B, max_pos=4096, rope=_YI_ROPE), "Hermes-2", 64000
    ),
    "InternVL2-Llama3-76B": _chat(  # unverified: image_token_id (128256 + 2 assumed)
        _vit6b(), _HERMES_LLAMA3_70B, "internlm2-chat", 128258
    ),
    # 2.5: model cards, internvl_chat/shell/internvl2.5 scripts; Qwen2.5 tokenizer 151665 + 9 (IMG_CONTEXT 151667).
    "InternVL2_5-1B": _chat(  # unverified: rope (dynamic x2 assumed, as in InternVL3-1B)
        _vit300m(), _qwen2(151674, 896, 24, 14, 2, 4864), "internvl2_5", 151667
    ),
    "InternVL2_5-2B": _chat(_vit300m(), _INTERNLM2_1_8B, "internvl2_5", 92546),
    "InternVL2_5-4B": _chat(  # unverified: rope (dynamic x2 assumed)
        _vit300m(), _qwen2(151674, 2048, 36, 16, 2, 11008), "internvl2_5", 151667
    ),
    "InternVL2_5-8B": _chat(_vit300m(), _INTERNLM2_7B, "internvl2_5", 92546),
    "InternVL2_5-26B": _chat(_vit6b(), _INTERNLM2_20B, "internvl2_5", 92546),
    "InternVL2_5-38B": _chat(  # unverified: rope (dynamic x2 assumed), norm_eps (Qwen2.5-32B-Instruct 1e-6)
        _vit6b(), _qwen2(151674, 5120, 64, 40, 8, 27648), "internvl2_5", 151667
    ),
    "InternVL2_5-78B": _chat(  # unverified: rope (dynamic x2 assumed), norm_eps (Qwen2.5-72B-Instruct 1e-6)
        _vit6b(), _qwen2(151674, 8192, 80, 64, 8, 29568), "internvl2_5", 151667
    ),
    # 3.0: InternVL3-1B config.json (Qwen2, dynamic x2, vocab 151674), shell/internvl3.0 scripts, transformers'
    # convert_internvl_weights_to_hf.py (9B is a Llama-type LLM: InternLM3-8B).
    "InternVL3-1B": _chat(_vit300m(), _qwen2(151674, 896, 24, 14, 2, 4864), "internvl2_5", 151667),
    "InternVL3-2B": _chat(  # unverified: rope (dynamic x2 as in 1B)
        _vit300m(), _qwen2(151674, 1536, 28, 12, 2, 8960), "internvl2_5", 151667
    ),
    "InternVL3-8B": _chat(  # unverified: rope (dynamic x2 as in 1B)
        _vit300m(), _qwen2(151674, 3584, 28, 28, 4, 18944), "internvl2_5", 151667
    ),
    # InternLM3-8B tokenizer not checked: vocab and IMG_CONTEXT assume the 9 added tokens end a 128512 vocabulary.
    "InternVL3-9B": _chat(  # unverified: vocab_size, image_token_id, rope (internlm3-8b: theta 5e7, dynamic x6)
        _vit300m(),
        _llama(128512, 4096, 48, 32, 2, 10240, max_pos=32768, rope=RopeConfig(type="dynamic", theta=5e7, factor=6.0)),
        "internvl2_5", 128505,
    ),
    "InternVL3-14B": _chat(  # unverified: rope (dynamic x2 as in 1B), norm_eps (Qwen2.5-14B base 1e-5)
        _vit300m(), _qwen2(151674, 5120, 48, 40, 8, 13824, eps=1e-5), "internvl2_5", 151667
    ),
    "InternVL3-38B": _chat(  # unverified: rope (dynamic x2 as in 1B), norm_eps (Qwen2.5-32B base 1e-5)
        _vit6b(), _qwen2(151674, 5120, 64, 40, 8, 27648, eps=1e-5), "internvl2_5", 151667
    ),
    "InternVL3-78B": _chat(  # unverified: rope (dynamic x2 as in 1B), norm_eps (Qwen2.5-72B base 1e-5)
        _vit6b(), _qwen2(151674, 8192, 80, 64, 8, 29568, eps=1e-5), "internvl2_5", 151667
    ),
    # 3.5: model card parameter table (untied heads: 1B = 0.3B + 0.8B), internvl_chat_gpt_oss scripts;
    # <img> is 151669 in the Qwen3 tokenizer (after <think>/</think>), so IMG_CONTEXT is 151671.
    # unverified for every 3.5 preset: vocab_size (Qwen3's 151936 kept), rope (plain, theta 1e6, 40960 positions)
    "InternVL3_5-1B": _chat(_vit300m(), _qwen3(1024, 28, 16, 3072), "internvl2_5", 151671),
    "InternVL3_5-2B": _chat(_vit300m(), _qwen3(2048, 28, 16, 6144), "internvl2_5", 151671),
    "InternVL3_5-4B": _chat(_vit300m(), _qwen3(2560, 36, 32, 9728), "internvl2_5", 151671),
    "InternVL3_5-8B": _chat(_vit300m(), _qwen3(4096, 36, 32, 12288), "internvl2_5", 151671),
    "InternVL3_5-14B": _chat(_vit300m(), _qwen3(5120, 40, 40, 17408), "internvl2_5", 151671),
    "InternVL3_5-38B": _chat(_vit6b(), _qwen3(5120, 64, 64, 25600), "internvl2_5", 151671),
}

# ----------------------------------------------------------------------------------------------
# Tiny configs for tests: one 28 px tile = a 2x2 patch grid = 1 token after pixel shuffle
# ----------------------------------------------------------------------------------------------

_TINY_VIT = VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=28)
_TINY_TEXT = TextConfig(
    family="qwen2", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, max_position_embeddings=128, qkv_bias=True,
)


def _tiny(template: str, vision: VisionConfig = _TINY_VIT, **text) -> InternVLConfig:
    return InternVLConfig(
        vision=vision, text=dataclasses.replace(_TINY_TEXT, **text), template=template, image_token_id=255
    )


PRESETS.update({
    "tiny-qwen2": _tiny("internvl2_5"),
    "tiny-llama": _tiny("Hermes-2", family="llama", qkv_bias=False),
    "tiny-qwen3": _tiny("internvl2_5", family="qwen3", qkv_bias=False, qk_norm=True),
    "tiny-phi3": _tiny(
        "phi3-chat", family="phi3", qkv_bias=False,
        rope=RopeConfig(
            type="longrope", original_max_position_embeddings=32,
            short_factor=(1.0,) * 8, long_factor=tuple(1.0 + 0.5 * i for i in range(8)),
        ),
    ),
    "tiny-internlm2": _tiny("internlm2-chat", family="internlm2", qkv_bias=False),
    "tiny-vit6b": _tiny(
        "internvl2_5", vision=VisionConfig(
            hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=28,
            norm_type="rms_norm", qk_norm=True, qkv_bias=False,
        ),
    ),
})


# ----------------------------------------------------------------------------------------------
# Vision towers on their own, and InternVL 1.0 (InternVL-C / InternVL-G, internvl_jax.clip_model)
# ----------------------------------------------------------------------------------------------

VISION_PRESETS: dict[str, VisionConfig] = {
    "InternViT-300M-448px": _vit300m(),
    "InternViT-6B-224px": _vit6b_v1_0(224),
    "InternViT-6B-448px-V1-0": _vit6b_v1_0(448),
    "InternViT-6B-448px-V1-2": _vit6b(),
    "InternViT-6B-448px-V1-5": _vit6b(),
    "InternViT-6B-448px-V2_5": _vit6b(),
}

CLIP_PRESETS: dict[str, CLIPConfig] = {
    # reference section 9: InternViT-6B-224px + QLLaMA (LLaMA-7B shapes, vocab 49954, 96 queries, cross-attention
    # every 2nd layer), 768-d CLIP space, 16 pooling heads
    "InternVL-14B-224px": CLIPConfig(
        vision=VISION_PRESETS["InternViT-6B-224px"],
        qllama=TextConfig(  # unverified: max_position_embeddings, tie_word_embeddings (LlamaConfig's defaults)
            family="llama", vocab_size=49954, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
            head_dim=128, intermediate_size=11008, norm_eps=1e-6, max_position_embeddings=2048, rope=QLLAMA_ROPE,
            tie_word_embeddings=True),
    ),
}


def get_preset(name: str) -> InternVLConfig:
    """The preset called ``name``; case-insensitive, and a hub prefix such as ``OpenGVLab/`` is ignored."""
    if name in PRESETS:
        return PRESETS[name]
    folded = {k.lower(): k for k in PRESETS}
    key = folded.get(name.rsplit("/", 1)[-1].lower())
    if key is None:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]
