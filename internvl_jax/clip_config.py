"""Config of InternVL 1.0 (``InternVLModel``: InternViT-6B-224 + QLLaMA, the InternVL-C / InternVL-G models).

Read from the original checkpoint's own ``config.json`` (``vision_config`` + ``qllama_config``), with the
original code's reload semantics where they differ from the file:

* ``num_query_token`` and ``cross_attention_frequency`` come from the top level (defaults 96 and 2) and override
  the copies inside ``qllama_config``: the original's ``save_pretrained`` does not write the frequency at the top,
  so a reload there always falls back to 2 unless the top level names it;
* the head is tied to the embeddings by ``qllama_config.tie_word_embeddings`` (LlamaConfig's default: true),
  which the original's config class copies over the top-level flag;
* QLLaMA's RoPE is plain with base 10000 whatever ``rope_theta`` / ``rope_scaling`` say (hard-coded there);
* InternViT 1.0 is RMSNorm only (no ``norm_type`` key), qk-norm over the full width, no final norm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import (BOOL, NUMBER, SIZE, ConfigError, RopeConfig, TextConfig, VisionConfig, _Section, _text_config,
                     _vision_config, parse_config_file, text_config_to_hf_dict)

QLLAMA_ROPE = RopeConfig(type="default", theta=10000.0)  # hard-coded in modeling_qllama.py


@dataclass(frozen=True)
class CLIPConfig:
    """InternVL 1.0 (the full size: ``internvl_jax.presets.CLIP_PRESETS``)."""

    vision: VisionConfig
    qllama: TextConfig
    num_query_token: int = 96
    cross_attention_frequency: int = 2  # cross-attention in QLLaMA layers i with i % frequency == 0
    clip_embed_dim: int = 768
    attn_pool_num_heads: int = 16
    label_smoothing: float = 0.0
    force_image_size: int | None = None
    # runtime
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"
    scan_unroll: int = 1  # layers per scan iteration of the ViT and QLLaMA (as InternVLConfig.scan_unroll)

    def __post_init__(self):
        if self.scan_unroll < 1:
            raise ConfigError(f"scan_unroll must be at least 1, got {self.scan_unroll}")
        n, f = self.qllama.num_layers, self.cross_attention_frequency
        if n % f:
            raise ConfigError(f"qllama_config.num_hidden_layers ({n}) must be a multiple of cross_attention_frequency "
                              f"({f}): the layers are scanned in blocks of that many")
        for name, width in (("vision_config.hidden_size", self.vision.hidden_size),
                            ("qllama_config.hidden_size", self.qllama.hidden_size)):
            if width % self.attn_pool_num_heads:
                raise ConfigError(f"{name} ({width}) is not a multiple of attn_pool_num_heads "
                                  f"({self.attn_pool_num_heads})")

    @property
    def text(self) -> TextConfig:
        """The decoder whose family the converter's rules are filtered by (QLLaMA: Llama)."""
        return self.qllama

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def num_blocks(self) -> int:
        """Scanned QLLaMA blocks: each is ``cross_attention_frequency`` layers, cross-attention in its first."""
        return self.qllama.num_layers // self.cross_attention_frequency

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)


def is_clip_config(d) -> bool:
    """Whether a parsed config.json is InternVL 1.0's (it has a ``qllama_config``)."""
    return isinstance(d, dict) and "qllama_config" in d


def clip_config_from_dict(d: dict, **runtime) -> CLIPConfig:
    """A :class:`CLIPConfig` from the original ``InternVLConfig`` dict; :class:`ConfigError` names a bad key."""
    s = _Section(d)
    vision = _vision_config(s.section("vision_config"))
    if s.section("vision_config").has("norm_type") and vision.norm_type != "rms_norm":
        raise ConfigError(f"vision_config.norm_type is {vision.norm_type!r}: InternViT 1.0 is RMSNorm only")
    q = s.section("qllama_config")
    qllama = _text_config(q, tie_word_embeddings=q("tie_word_embeddings", BOOL, True))
    if qllama.family != "llama":
        raise ConfigError(f"qllama_config describes a {qllama.family} model: QLLaMA is a Llama decoder")
    return CLIPConfig(
        vision=vision,
        qllama=dataclasses.replace(qllama, rope=QLLAMA_ROPE),
        num_query_token=s("num_query_token", SIZE, 96),
        cross_attention_frequency=s("cross_attention_frequency", SIZE, 2),
        clip_embed_dim=s("clip_embed_dim", SIZE, 768),
        attn_pool_num_heads=s("attn_pool_num_heads", SIZE, 16),
        label_smoothing=s("label_smoothing", NUMBER, 0.0),
        force_image_size=s("force_image_size", SIZE, None),
        **runtime,
    )


def load_clip_config(path: str, **runtime) -> CLIPConfig:
    """Read an InternVL 1.0 ``path/config.json``."""
    return parse_config_file(path, clip_config_from_dict, **runtime)


def to_internvl_g_dict(c: CLIPConfig) -> dict:
    """The original ``InternVLConfig`` dict (what its ``from_pretrained`` reads back to the same model).

    ``cross_attention_frequency`` is written at the top level too, where the original reads it."""
    v, q = c.vision, c.qllama
    qllama = text_config_to_hf_dict(q)
    qllama.pop("rope_parameters")
    qllama.update(rope_theta=QLLAMA_ROPE.theta, rope_scaling=None, num_query_token=c.num_query_token,
                  cross_attention_frequency=c.cross_attention_frequency, bos_token_id=1, eos_token_id=2)
    return {
        "architectures": ["InternVLModel"],
        "model_type": "internvl",
        "vision_config": {
            "model_type": "intern_vit_6b", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
            "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_eps": v.norm_eps,
            "qk_normalization": v.qk_norm, "qkv_bias": v.qkv_bias, "initializer_factor": v.layer_scale_init,
            "drop_path_rate": v.drop_path_rate, "hidden_act": "gelu", "num_channels": 3,
        },
        "qllama_config": qllama,
        "hidden_size": q.hidden_size,
        "num_query_token": c.num_query_token,
        "cross_attention_frequency": c.cross_attention_frequency,
        "clip_embed_dim": c.clip_embed_dim,
        "attn_pool_num_heads": c.attn_pool_num_heads,
        "label_smoothing": c.label_smoothing,
        "force_image_size": c.force_image_size,
        "tie_word_embeddings": q.tie_word_embeddings,
        "use_backbone_lora": 0,
        "use_qllama_lora": 0,
    }
