"""Key-map tables: checkpoint tensor names -> paths in our params tree, with a named transform.

A layout is (prefix aliases, rules). Prefix aliases first bring every key of the layout to a canonical form
(``vision.``, ``projector.``, ``llm.``, ``lm_head.``), so that the on-disk and in-memory spellings of one layout
share one table. A rule's regex may capture ``layer`` (the index on the stacked ``layers`` axis) and ``part``
(q/k/v of a fused target, or the name spliced into the target path).

Transforms take the torch tensor to our slice of shape ``shape``:
``same`` (reshape only), ``linear`` (torch [out, in] -> [in..., out...]), ``conv`` ([C, 3, p, p] -> [p, p, 3, C]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from internvl_jax.config import TextConfig

PARTS = {"q": 0, "k": 1, "v": 2}


def _linear(t: np.ndarray, shape) -> np.ndarray:
    return t.T.reshape(shape)


TRANSFORMS: dict[str, Callable[[np.ndarray, tuple], np.ndarray]] = {
    "same": lambda t, shape: t.reshape(shape),
    "linear": _linear,
    "conv": lambda t, shape: t.transpose(2, 3, 1, 0).reshape(shape),
}


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex over the canonical key
    target: str  # "/"-joined param path; may contain {part}
    transform: str = "same"
    part_axis: int | None = None  # fused target: PARTS[part] indexes this axis of the per-layer slice
    rows: Callable[[TextConfig], object] | None = None  # take these rows of the source tensor first


@dataclass(frozen=True)
class Layout:
    name: str
    prefixes: tuple[tuple[str, str], ...]
    rules: tuple[Rule, ...]


_L = r"(?P<layer>\d+)"
_VIT = r"vision\.encoder\.layer\." + _L
_LLM = r"llm\.layers\." + _L


def _phi3_qkv_rows(part: str) -> Callable[[TextConfig], slice]:
    def rows(c: TextConfig) -> slice:
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[part]

    return rows


def _half(first: bool) -> Callable[[TextConfig], slice]:
    return lambda c: slice(0, c.intermediate_size) if first else slice(c.intermediate_size, 2 * c.intermediate_size)


_DECODER_RULES = (
    Rule(r"llm\.embed_tokens\.weight", "language_model/embed_tokens"),
    Rule(_LLM + r"\.self_attn\.(?P<part>q|k|v|o)_proj\.weight", "language_model/layers/attn/{part}_proj/kernel", "linear"),
    Rule(_LLM + r"\.self_attn\.(?P<part>q|k|v|o)_proj\.bias", "language_model/layers/attn/{part}_proj/bias"),
    Rule(_LLM + r"\.self_attn\.(?P<part>q|k)_norm\.weight", "language_model/layers/attn/{part}_norm/scale"),
    *(
        Rule(_LLM + r"\.self_attn\.qkv_proj\.weight", f"language_model/layers/attn/{p}_proj/kernel", "linear", rows=_phi3_qkv_rows(p))
        for p in "qkv"
    ),
    Rule(_LLM + r"\.mlp\.(?P<part>gate|up|down)_proj\.weight", "language_model/layers/mlp/{part}_proj/kernel", "linear"),
    Rule(_LLM + r"\.mlp\.(?P<part>gate|up|down)_proj\.bias", "language_model/layers/mlp/{part}_proj/bias"),
    Rule(_LLM + r"\.mlp\.gate_up_proj\.weight", "language_model/layers/mlp/gate_proj/kernel", "linear", rows=_half(True)),
    Rule(_LLM + r"\.mlp\.gate_up_proj\.weight", "language_model/layers/mlp/up_proj/kernel", "linear", rows=_half(False)),
    Rule(_LLM + r"\.input_layernorm\.weight", "language_model/layers/input_norm/scale"),
    Rule(_LLM + r"\.post_attention_layernorm\.weight", "language_model/layers/post_attn_norm/scale"),
    Rule(r"llm\.norm\.weight", "language_model/norm/scale"),
    Rule(r"lm_head\.weight", "language_model/lm_head/kernel", "linear"),
)

# transformers-native InternVLForConditionalGeneration (both the on-disk and the in-memory prefixes), and bare
# transformers causal LMs (Qwen2/Qwen3/Llama/Phi3ForCausalLM) whose decoder lives under "model.".
HF = Layout(
    name="transformers",
    prefixes=(
        ("model.vision_tower.", "vision."),
        ("vision_tower.", "vision."),
        ("model.multi_modal_projector.", "projector."),
        ("multi_modal_projector.", "projector."),
        ("model.language_model.", "llm."),
        ("language_model.model.", "llm."),
        ("language_model.lm_head.", "lm_head."),
        ("model.", "llm."),
        ("lm_head.", "lm_head."),
    ),
    rules=(
        Rule(r"vision\.embeddings\.cls_token", "vision/embeddings/cls_token"),
        Rule(r"vision\.embeddings\.position_embeddings", "vision/embeddings/pos_embed"),
        Rule(r"vision\.embeddings\.patch_embeddings\.projection\.weight", "vision/embeddings/patch_kernel", "conv"),
        Rule(r"vision\.embeddings\.patch_embeddings\.projection\.bias", "vision/embeddings/patch_bias"),
        Rule(_VIT + r"\.attention\.(?P<part>q|k|v)_proj\.weight", "vision/layers/attn/qkv/kernel", "linear", part_axis=1),
        Rule(_VIT + r"\.attention\.(?P<part>q|k|v)_proj\.bias", "vision/layers/attn/qkv/bias", part_axis=0),
        Rule(_VIT + r"\.attention\.(?P<part>q|k)_norm\.weight", "vision/layers/attn/{part}_norm/scale"),
        Rule(_VIT + r"\.attention\.projection_layer\.weight", "vision/layers/attn/proj/kernel", "linear"),
        Rule(_VIT + r"\.attention\.projection_layer\.bias", "vision/layers/attn/proj/bias"),
        Rule(_VIT + r"\.mlp\.(?P<part>fc1|fc2)\.weight", "vision/layers/{part}/kernel", "linear"),
        Rule(_VIT + r"\.mlp\.(?P<part>fc1|fc2)\.bias", "vision/layers/{part}/bias"),
        Rule(_VIT + r"\.layernorm_before\.weight", "vision/layers/norm1/scale"),
        Rule(_VIT + r"\.layernorm_before\.bias", "vision/layers/norm1/bias"),
        Rule(_VIT + r"\.layernorm_after\.weight", "vision/layers/norm2/scale"),
        Rule(_VIT + r"\.layernorm_after\.bias", "vision/layers/norm2/bias"),
        Rule(_VIT + r"\.lambda_1", "vision/layers/ls1"),
        Rule(_VIT + r"\.lambda_2", "vision/layers/ls2"),
        Rule(r"projector\.layer_norm\.weight", "projector/norm/scale"),
        Rule(r"projector\.layer_norm\.bias", "projector/norm/bias"),
        Rule(r"projector\.linear_1\.weight", "projector/fc1/kernel", "linear"),
        Rule(r"projector\.linear_1\.bias", "projector/fc1/bias"),
        Rule(r"projector\.linear_2\.weight", "projector/fc2/kernel", "linear"),
        Rule(r"projector\.linear_2\.bias", "projector/fc2/bias"),
        *_DECODER_RULES,
    ),
)


def canonical_key(layout: Layout, key: str) -> str:
    """Apply the first matching prefix alias of ``layout`` (aliases are tried in order)."""
    for src, dst in layout.prefixes:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key
