"""Typed, frozen configs for InternViT, the LLM decoders and InternVL.

Read from a checkpoint's own ``config.json`` in either layout:

* original OpenGVLab ``InternVLChatConfig``: ``vision_config`` + ``llm_config`` (``architectures`` names the LLM);
* transformers-native ``InternVLConfig``: ``vision_config`` + ``text_config`` (``model_type`` names the LLM).

``to_hf_dict`` writes the transformers-native form back (used by export and by the parameter-count tests).
Configs are hashable so Flax modules can hold them as attributes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

# LLM families of the dense releases, keyed by the names that configs use for them.
FAMILY_BY_ARCH = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
    "InternLM3ForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
}
FAMILY_BY_MODEL_TYPE = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "llama": "llama",
    "internlm2": "internlm2",
    "internlm3": "llama",
    "phi3": "phi3",
}
ROPE_TYPES = ("default", "linear", "dynamic", "longrope", "llama3")


class ConfigError(ValueError):
    """A config.json that this library cannot turn into a model (names the offending field)."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings.

    type: default | linear | dynamic (NTK, applied only beyond max positions) | longrope (Phi-3 "su") | llama3.
    """

    type: str = "default"
    theta: float = 10000.0
    factor: float | None = None  # None: 1 for linear/dynamic; longrope derives it from max/original positions
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {self.type!r}; supported: {', '.join(ROPE_TYPES)}")


@dataclass(frozen=True)
class VisionConfig:
    """InternViT. Defaults describe InternViT-300M-448px."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    norm_type: str = "layer_norm"  # layer_norm | rms_norm
    norm_eps: float = 1e-6
    qk_norm: bool = False  # RMSNorm over the full width on q and k (the 6B variant)
    qkv_bias: bool = True
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0  # training only; inference never drops

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """One decoder; ``family`` picks the checkpoint key names, the flags pick the architecture."""

    family: str = "qwen2"  # qwen2 | qwen3 | llama | internlm2 | phi3
    vocab_size: int = 151674
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 4864
    norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )


@dataclass(frozen=True)
class InternVLConfig:
    """The whole model plus the runtime choices (dtypes, remat) that do not change the parameters."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    image_token_id: int = 151667
    force_image_size: int | None = None
    template: str | None = None
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    v2pe_stride: float | None = None  # V2PE: position stride per tile (64 in the V2PE evaluation); None: off
    # runtime
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch (internvl_jax.layers.REMAT_POLICIES)
    attention_impl: str = "auto"  # auto | batched | per_kv_head | dot_product | blockwise | splash (layers.ATTENTION_IMPLS)

    def __post_init__(self):
        if self.ps_version not in ("v1", "v2"):
            raise ConfigError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        n = self.vision.num_layers
        if not (-n <= self.select_layer <= n) or self.select_layer == 0:
            raise ConfigError(f"select_layer {self.select_layer} is outside 1..{n} / -{n}..-1")

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def tokens_per_tile(self) -> int:
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def vision_layers_used(self) -> int:
        """How many ViT layers feed the projector (hidden_states[k], index 0 = embeddings)."""
        n = self.vision.num_layers
        return n + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    def replace(self, **kw) -> "InternVLConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# Reading config.json (both layouts)
# ----------------------------------------------------------------------------------------------


def _pair(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ConfigError(f"non-square sizes are not supported: {v}")
        return int(v[0])
    return int(v)


def _rope_from_dict(d: dict) -> RopeConfig:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rtype == "su":
        rtype = "longrope"
    if rtype == "v2pe":  # V2PE sets this to turn dynamic NTK off; positions carry the scaling
        rtype = "default"
    orig = merged.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    tup = lambda v: None if v is None else tuple(float(x) for x in v)  # noqa: E731
    return RopeConfig(
        type=rtype,
        theta=float(theta),
        factor=None if merged.get("factor") is None else float(merged["factor"]),
        original_max_position_embeddings=None if orig is None else int(orig),
        short_factor=tup(merged.get("short_factor")),
        long_factor=tup(merged.get("long_factor")),
        attention_factor=merged.get("attention_factor"),
        low_freq_factor=merged.get("low_freq_factor"),
        high_freq_factor=merged.get("high_freq_factor"),
    )


def text_config_from_dict(d: dict, *, tie_word_embeddings: bool | None = None) -> TextConfig:
    """Parse an LLM config (``llm_config`` or ``text_config``); ``tie_word_embeddings`` overrides the dict's."""
    archs = d.get("architectures") or []
    family = next((FAMILY_BY_ARCH[a] for a in archs if a in FAMILY_BY_ARCH), None)
    family = family or FAMILY_BY_MODEL_TYPE.get(d.get("model_type", ""))
    if family is None:
        raise ConfigError(
            f"unsupported LLM architecture {archs or d.get('model_type')!r}; supported: "
            f"{', '.join(sorted(FAMILY_BY_ARCH))}"
        )
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    if family == "phi3" and float(d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    if family == "internlm2":  # InternLM2Config defaults `bias` to True when the key is missing
        qkv_bias = o_bias = bool(d.get("bias", True))
    elif family == "qwen2":
        qkv_bias, o_bias = True, False
    else:  # InternLM3 spells attention_bias "qkv_bias"
        qkv_bias = o_bias = bool(d.get("attention_bias", d.get("qkv_bias", False)))
    tie = d.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
    return TextConfig(
        family=family,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        intermediate_size=int(d["intermediate_size"]),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        rope=_rope_from_dict(d),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(d.get("mlp_bias", d.get("bias", False))) if family == "llama" else False,
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(tie),
    )


def vision_config_from_dict(d: dict) -> VisionConfig:
    """Parse an InternViT config in either layout."""
    hf = d.get("model_type") == "internvl_vision" or "use_qk_norm" in d
    return VisionConfig(
        hidden_size=int(d["hidden_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=int(d["num_attention_heads"]),
        intermediate_size=int(d["intermediate_size"]),
        image_size=_pair(d.get("image_size", 448)),
        patch_size=_pair(d.get("patch_size", 14)),
        norm_type=d.get("norm_type", "rms_norm" if not hf else "layer_norm"),
        norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        qk_norm=bool(d.get("use_qk_norm" if hf else "qk_normalization", False)),
        qkv_bias=bool(d.get("attention_bias" if hf else "qkv_bias", False)),
        layer_scale_init=float(d.get("layer_scale_init_value" if hf else "initializer_factor", 0.1)),
        drop_path_rate=float(d.get("drop_path_rate", 0.0)),
    )


def config_from_dict(d: dict, **runtime) -> InternVLConfig:
    """An :class:`InternVLConfig` from a parsed config.json of either layout (``runtime``: dtype etc.)."""
    if "vision_config" not in d or not ({"llm_config", "text_config"} & d.keys()):
        raise ConfigError("config.json has no vision_config with llm_config/text_config: not an InternVL checkpoint")
    vision = vision_config_from_dict(d["vision_config"])
    if "llm_config" in d:  # original layout
        llm = d["llm_config"]
        # <= 3.0 forces an untied head; 3.5 configs carry the flag in llm_config
        text = text_config_from_dict(llm, tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)))
        img_ctx = d.get("img_context_token_id")
        rope_kind = (llm.get("rope_scaling") or {}).get("type") or (llm.get("rope_scaling") or {}).get("rope_type")
        v2pe = str(d.get("rope_pos_id_version", "")).startswith("v2pe") or rope_kind == "v2pe"
        return InternVLConfig(
            vision=vision,
            text=text,
            downsample_ratio=float(d.get("downsample_ratio", 0.5)),
            ps_version=d.get("ps_version") or "v1",  # the original class defaults to v1
            select_layer=int(d.get("select_layer", -1)),
            image_token_id=int(img_ctx) if img_ctx is not None else -1,
            force_image_size=d.get("force_image_size"),
            template=d.get("template"),
            min_dynamic_patch=int(d.get("min_dynamic_patch", 1)),
            max_dynamic_patch=int(d.get("max_dynamic_patch", 12)),
            use_thumbnail=bool(d.get("use_thumbnail", True)),
            v2pe_stride=float(d.get("rope_pos_id_stride") or 64) if v2pe else None,
            **runtime,
        )
    layer = d.get("vision_feature_layer", -1)
    if isinstance(layer, (list, tuple)):
        raise ConfigError(f"vision_feature_layer must be one layer, got {layer}")
    text = text_config_from_dict(d["text_config"], tie_word_embeddings=bool(d.get("tie_word_embeddings", True)))
    return InternVLConfig(
        vision=vision,
        text=text,
        downsample_ratio=float(d.get("downsample_ratio", 0.5)),
        ps_version="v2",  # the transformers port implements v2 only
        select_layer=int(layer),
        image_token_id=int(d.get("image_token_id", 151667)),
        **runtime,
    )


def load_config(path: str, **runtime) -> InternVLConfig:
    """Read ``path/config.json`` (or a config.json path) in either layout."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise ConfigError(f"no config.json at {path}")
    with open(f) as fh:
        try:
            d = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f} is not valid JSON: {e}") from None
    return config_from_dict(d, **runtime)


# ----------------------------------------------------------------------------------------------
# Writing the transformers-native config.json
# ----------------------------------------------------------------------------------------------


def _rope_to_dict(r: RopeConfig) -> dict:
    out = {"rope_type": r.type, "rope_theta": r.theta}
    for k in ("factor", "original_max_position_embeddings", "attention_factor", "low_freq_factor", "high_freq_factor"):
        if getattr(r, k) is not None:
            out[k] = getattr(r, k)
    for k in ("short_factor", "long_factor"):
        if getattr(r, k) is not None:
            out[k] = list(getattr(r, k))
    return out


def text_config_to_hf_dict(t: TextConfig) -> dict:
    """transformers config dict for the decoder (InternLM2 becomes Llama, as the transformers converter does)."""
    model_type = {"internlm2": "llama"}.get(t.family, t.family)
    d = {
        "model_type": model_type,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": _rope_to_dict(t.rope),
        "hidden_act": "silu",
        "tie_word_embeddings": t.tie_word_embeddings,
        "pad_token_id": None,  # the LLM defaults (Phi-3: 32000) may not exist in a resized vocabulary
    }
    if model_type in ("llama", "qwen3"):
        if t.qkv_bias != t.o_bias:
            raise ConfigError(f"{model_type} cannot express qkv_bias={t.qkv_bias} with o_bias={t.o_bias}")
        d["attention_bias"] = t.qkv_bias
    if model_type == "llama":
        d["mlp_bias"] = t.mlp_bias
    if model_type == "phi3" and t.rope.original_max_position_embeddings is not None:
        d["original_max_position_embeddings"] = t.rope.original_max_position_embeddings
    return d


def vision_config_to_hf_dict(v: VisionConfig) -> dict:
    return {
        "model_type": "internvl_vision",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "image_size": [v.image_size, v.image_size],
        "patch_size": [v.patch_size, v.patch_size],
        "norm_type": v.norm_type,
        "layer_norm_eps": v.norm_eps,
        "use_qk_norm": v.qk_norm,
        "attention_bias": v.qkv_bias,
        "layer_scale_init_value": v.layer_scale_init,
        "drop_path_rate": v.drop_path_rate,
        "hidden_act": "gelu",
        "use_mean_pooling": True,
    }


def to_hf_dict(c: InternVLConfig) -> dict:
    """The transformers-native ``InternVLConfig`` dict for ``c``."""
    if c.ps_version != "v2":
        raise ConfigError("the transformers-native layout supports pixel shuffle v2 only")
    return {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "vision_config": vision_config_to_hf_dict(c.vision),
        "text_config": text_config_to_hf_dict(c.text),
        "downsample_ratio": c.downsample_ratio,
        "vision_feature_layer": c.select_layer,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "image_token_id": c.image_token_id,
        "image_seq_length": c.tokens_per_tile,
        "tie_word_embeddings": c.text.tie_word_embeddings,
    }


# ----------------------------------------------------------------------------------------------
# Writing the original (OpenGVLab InternVLChatConfig) config.json
# ----------------------------------------------------------------------------------------------

ARCH_BY_FAMILY = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                  "internlm2": "InternLM2ForCausalLM", "phi3": "Phi3ForCausalLM"}


def to_original_dict(c: InternVLConfig) -> dict:
    """The original ``InternVLChatConfig`` dict for ``c`` (llm_config in the LLM's own remote-code form)."""
    v, t = c.vision, c.text
    llm = text_config_to_hf_dict(t)
    llm.pop("rope_parameters")
    rope = _rope_to_dict(t.rope)
    llm["rope_theta"] = rope.pop("rope_theta")
    if t.rope.type != "default":
        llm["rope_scaling"] = {"type": rope["rope_type"], **rope}
    llm.update(architectures=[ARCH_BY_FAMILY[t.family]], model_type=t.family)
    if t.family == "internlm2":  # its config spells both biases `bias`
        llm.pop("attention_bias", None)
        llm.pop("mlp_bias", None)
        llm["bias"] = t.qkv_bias
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.norm_eps,
            "qk_normalization": v.qk_norm,
            "qkv_bias": v.qkv_bias,
            "initializer_factor": v.layer_scale_init,
            "drop_path_rate": v.drop_path_rate,
            "hidden_act": "gelu",
        },
        "llm_config": llm,
        "downsample_ratio": c.downsample_ratio,
        "ps_version": c.ps_version,
        "select_layer": c.select_layer,
        "template": c.template,
        "force_image_size": c.image_size,
        "min_dynamic_patch": c.min_dynamic_patch,
        "max_dynamic_patch": c.max_dynamic_patch,
        "use_thumbnail": c.use_thumbnail,
        "img_context_token_id": c.image_token_id,
    }
