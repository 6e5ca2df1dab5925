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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

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
    attention_impl: str = "auto"  # one of layers.ATTENTION_IMPLS
    scan_unroll: int = 1  # layers per scan iteration of the ViT and the LLM (layers.scan_layers; >= depth: no loop)
    lora: tuple = ()  # LoRA adapters: a rule table over kernel paths (internvl_jax.lora); () = none

    def __post_init__(self):
        if self.ps_version not in ("v1", "v2"):
            raise ConfigError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        if self.scan_unroll < 1:
            raise ConfigError(f"scan_unroll must be at least 1, got {self.scan_unroll}")
        n = self.vision.num_layers
        if not (-n <= self.select_layer <= n) or self.select_layer == 0:
            raise ConfigError(f"select_layer {self.select_layer} is outside 1..{n} / -{n}..-1")
        if self.lora:
            from .lora import compile_rules

            try:
                compile_rules(self.lora)
            except ValueError as e:
                raise ConfigError(f"InternVLConfig.lora: {e}") from None

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


_REQUIRED = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true parses as a Python int: not a size


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class _Kind:
    """What a config value must be: ``what`` names it in messages, ``ok`` tests it, ``convert`` gives the value kept.
    Strings are never coerced: ``"hidden_size": "64"`` is a broken file, not a size."""

    what: str
    ok: Callable[[object], bool]
    convert: Callable[[object], object] = lambda v: v


INT = _Kind("an integer", _is_int)
SIZE = _Kind("a positive integer", lambda v: _is_int(v) and v > 0)
NUMBER = _Kind("a number", _is_number, float)
BOOL = _Kind("true or false", lambda v: isinstance(v, bool))
STR = _Kind("a string", lambda v: isinstance(v, str))
STRS = _Kind("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), list)
NUMBERS = _Kind("a list of numbers", lambda v: isinstance(v, (list, tuple)) and all(map(_is_number, v)),
                lambda v: tuple(map(float, v)))
OBJECT = _Kind("a JSON object", lambda v: isinstance(v, Mapping))
# image and patch sizes: transformers writes [h, w], the original one number; only square ones are supported
SQUARE = _Kind("a positive integer or a list of equal ones (non-square sizes are not supported)",
               lambda v: SIZE.ok(v) or (isinstance(v, (list, tuple)) and len(set(v)) == 1 and SIZE.ok(v[0])),
               lambda v: v if _is_int(v) else v[0])
NORM_TYPE = _Kind("'layer_norm' or 'rms_norm'", lambda v: v in ("layer_norm", "rms_norm"))


def _json_kind(v) -> str:
    """The JSON type of a parsed value, as messages name it."""
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
             tuple: "a list", type(None): "null"}
    return "an object" if isinstance(v, Mapping) else names.get(type(v), type(v).__name__)


class _Section:
    """One JSON object of a config (``name``: its dotted path, "" at the top) read key by key: a missing required
    key or a value of the wrong type raises :class:`ConfigError` naming the key, what it holds and what it needs."""

    def __init__(self, d, name: str = ""):
        if not isinstance(d, Mapping):
            raise ConfigError(f"{name or 'the top level'} is {_json_kind(d)}, expected a JSON object")
        self.d, self.name = d, name

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def __call__(self, key: str, kind: _Kind, default=_REQUIRED):
        """``d[key]`` checked against ``kind`` and converted; absent or null gives ``default`` (none: required)."""
        value = self.d.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.key(key)} is {'null' if key in self.d else 'missing'}: it is required "
                                  f"({kind.what})")
            return default
        if not kind.ok(value):
            shown = json.dumps(value, default=repr)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ConfigError(f"{self.key(key)} is {shown} ({_json_kind(value)}), expected {kind.what}")
        return kind.convert(value)

    def section(self, key: str, default=_REQUIRED) -> "_Section":
        return _Section(self(key, OBJECT, default), self.key(key))


def _rope(s: _Section) -> RopeConfig:
    # transformers >= 5 writes rope_parameters, older configs rope_scaling; where both hold a field the former
    # wins, and theta and the original positions may also sit at the top of the LLM config
    nested = [s.section("rope_parameters", {}), s.section("rope_scaling", {})]

    def get(key: str, kind: _Kind, default=None, top: bool = False):
        for source in nested + [s] * top:
            if source.has(key):
                return source(key, kind)
        return default

    rtype = get("rope_type", STR) or get("type", STR) or "default"
    if rtype == "su":
        rtype = "longrope"
    if rtype == "v2pe":  # V2PE sets this to turn dynamic NTK off; positions carry the scaling
        rtype = "default"
    return RopeConfig(
        type=rtype,
        theta=get("rope_theta", NUMBER, 10000.0, top=True),
        factor=get("factor", NUMBER),
        original_max_position_embeddings=get("original_max_position_embeddings", SIZE, top=True),
        short_factor=get("short_factor", NUMBERS),
        long_factor=get("long_factor", NUMBERS),
        attention_factor=get("attention_factor", NUMBER),
        low_freq_factor=get("low_freq_factor", NUMBER),
        high_freq_factor=get("high_freq_factor", NUMBER),
    )


def _text_config(s: _Section, tie_word_embeddings: bool | None) -> TextConfig:
    archs = s("architectures", STRS, [])
    family = next((FAMILY_BY_ARCH[a] for a in archs if a in FAMILY_BY_ARCH), None)
    family = family or FAMILY_BY_MODEL_TYPE.get(s("model_type", STR, ""))
    if family is None:
        raise ConfigError(
            f"unsupported LLM architecture {archs or s('model_type', STR, None)!r} ({s.key('architectures')} / "
            f"{s.key('model_type')}); supported: {', '.join(sorted(FAMILY_BY_ARCH))}"
        )
    heads = s("num_attention_heads", SIZE)
    hidden = s("hidden_size", SIZE)
    if family == "phi3" and s("partial_rotary_factor", NUMBER, 1.0) != 1.0:
        raise ConfigError(f"{s.key('partial_rotary_factor')} != 1 is not supported")
    if family == "internlm2":  # InternLM2Config defaults `bias` to True when the key is missing
        qkv_bias = o_bias = s("bias", BOOL, True)
    elif family == "qwen2":
        qkv_bias, o_bias = True, False
    else:  # InternLM3 spells attention_bias "qkv_bias"
        qkv_bias = o_bias = s("attention_bias", BOOL, s("qkv_bias", BOOL, False))
    tie = s("tie_word_embeddings", BOOL, False) if tie_word_embeddings is None else tie_word_embeddings
    return TextConfig(
        family=family,
        vocab_size=s("vocab_size", SIZE),
        hidden_size=hidden,
        num_layers=s("num_hidden_layers", SIZE),
        num_heads=heads,
        num_kv_heads=s("num_key_value_heads", SIZE, heads),
        head_dim=s("head_dim", SIZE, hidden // heads),
        intermediate_size=s("intermediate_size", SIZE),
        norm_eps=s("rms_norm_eps", NUMBER, 1e-6),
        max_position_embeddings=s("max_position_embeddings", SIZE, 32768),
        rope=_rope(s),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=s("mlp_bias", BOOL, s("bias", BOOL, False)) if family == "llama" else False,
        qk_norm=family == "qwen3",
        tie_word_embeddings=tie,
    )


def _vision_config(s: _Section) -> VisionConfig:
    hf = s("model_type", STR, "") == "internvl_vision" or s.has("use_qk_norm")
    return VisionConfig(
        hidden_size=s("hidden_size", SIZE),
        num_layers=s("num_hidden_layers", SIZE),
        num_heads=s("num_attention_heads", SIZE),
        intermediate_size=s("intermediate_size", SIZE),
        image_size=s("image_size", SQUARE, 448),
        patch_size=s("patch_size", SQUARE, 14),
        norm_type=s("norm_type", NORM_TYPE, "rms_norm" if not hf else "layer_norm"),
        norm_eps=s("layer_norm_eps", NUMBER, 1e-6),
        qk_norm=s("use_qk_norm" if hf else "qk_normalization", BOOL, False),
        qkv_bias=s("attention_bias" if hf else "qkv_bias", BOOL, False),
        layer_scale_init=s("layer_scale_init_value" if hf else "initializer_factor", NUMBER, 0.1),
        drop_path_rate=s("drop_path_rate", NUMBER, 0.0),
    )


def text_config_from_dict(d: dict, *, tie_word_embeddings: bool | None = None) -> TextConfig:
    """Parse an LLM config (``llm_config`` or ``text_config``); ``tie_word_embeddings`` overrides the dict's."""
    return _text_config(_Section(d), tie_word_embeddings)


def vision_config_from_dict(d: dict) -> VisionConfig:
    """Parse an InternViT config in either layout."""
    return _vision_config(_Section(d))


def config_from_dict(d: dict, **runtime) -> InternVLConfig:
    """An :class:`InternVLConfig` from a parsed config.json of either layout (``runtime``: dtype etc.).

    Raises :class:`ConfigError` naming the key (dotted, e.g. ``llm_config.num_attention_heads``) for a required
    key that is missing or null and for a value of the wrong JSON type; strings are never read as numbers."""
    s = _Section(d)
    if not s.has("vision_config") or not (s.has("llm_config") or s.has("text_config")):
        raise ConfigError("no vision_config with llm_config or text_config: not an InternVL checkpoint")
    vision = _vision_config(s.section("vision_config"))
    if s.has("llm_config"):  # original layout
        llm = s.section("llm_config")
        # <= 3.0 forces an untied head; 3.5 configs carry the flag in llm_config
        text = _text_config(llm, tie_word_embeddings=llm("tie_word_embeddings", BOOL, False))
        scaling = llm.section("rope_scaling", {})
        rope_kind = scaling("type", STR, None) or scaling("rope_type", STR, None)
        v2pe = s("rope_pos_id_version", STR, "").startswith("v2pe") or rope_kind == "v2pe"
        return InternVLConfig(
            vision=vision,
            text=text,
            downsample_ratio=s("downsample_ratio", NUMBER, 0.5),
            ps_version=s("ps_version", STR, "") or "v1",  # the original class defaults to v1
            select_layer=s("select_layer", INT, -1),
            image_token_id=s("img_context_token_id", INT, -1),  # -1: left to the tokenizer
            force_image_size=s("force_image_size", SIZE, None),
            template=s("template", STR, None),
            min_dynamic_patch=s("min_dynamic_patch", SIZE, 1),
            max_dynamic_patch=s("max_dynamic_patch", SIZE, 12),
            use_thumbnail=s("use_thumbnail", BOOL, True),
            v2pe_stride=(s("rope_pos_id_stride", NUMBER, None) or 64.0) if v2pe else None,
            **runtime,
        )
    return InternVLConfig(
        vision=vision,
        text=_text_config(s.section("text_config"), tie_word_embeddings=s("tie_word_embeddings", BOOL, True)),
        downsample_ratio=s("downsample_ratio", NUMBER, 0.5),
        ps_version="v2",  # the transformers port implements v2 only
        select_layer=s("vision_feature_layer", INT, -1),  # a list of layers (concatenated features): unsupported
        image_token_id=s("image_token_id", INT, 151667),
        **runtime,
    )


def parse_config_file(path: str, parse: Callable = config_from_dict, **kw):
    """``parse(parsed JSON, **kw)`` for ``path/config.json`` (or a config.json path). Every problem: no such file,
    bytes that are not UTF-8, text that is not JSON, a key that ``parse`` rejects, raises :class:`ConfigError`
    naming the file."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise ConfigError(f"no config.json at {path}")
    with open(f, "rb") as fh:
        raw = fh.read()
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{f} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    try:
        return parse(d, **kw)
    except ConfigError as e:
        raise ConfigError(f"{f}: {e}") from None


def load_config(path: str, **runtime) -> InternVLConfig:
    """Read ``path/config.json`` (or a config.json path) in either layout."""
    return parse_config_file(path, config_from_dict, **runtime)


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
