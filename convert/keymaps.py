"""Key-map tables: checkpoint tensor names <-> paths in our params tree, with a named transform.

A layout is (prefix aliases, rules). Prefix aliases bring every key of the layout to a canonical form
(``vision.``, ``projector.``, ``llm.``, ``lm_head.``) so that the on-disk and in-memory spellings of one layout
share one table; the first alias of each canonical prefix is the spelling written on export.

A rule's ``source`` is a template over canonical keys: ``{layer}`` is the index on our stacked ``layers`` axis
and ``{part}`` one of ``parts``. A part either names a separate target (``{part}`` in ``target``), an index along
``part_axis`` of one fused target (the transformers ViT's q/k/v in our fused qkv), or, with ``rows``, the rows of
one fused source that feed separate targets (Phi-3 ``qkv_proj``/``gate_up_proj``, InternLM2's grouped ``wqkv``).
``families`` limits a rule to some LLM families (None: all). ``layer_stride`` / ``layer_offset``: source layer
``stride * k + offset`` is index k of the stacked target (QLLaMA's blocks of ``cross_attention_frequency`` layers);
such a rule takes only the source layers of its offset.

Transforms take a torch tensor to our array of shape ``shape`` (``load``) and back (``save``); ``source(shape)``
is the exact torch shape that ``load`` takes to ``shape``, checked before any reshape (a reshape would accept a
transposed matrix or a norm weight stored [8, 8] for [64] without a word):
``same`` (identity), ``flat`` (torch 1-D <-> our multi-dim, e.g. a bias [H*D] <-> [H, D]),
``linear`` (torch [out, in] <-> our [in, *out]), ``linear2`` (torch [out, H*D] <-> our [H, D, out]),
``conv`` (torch [C, 3, p, p] <-> our [p, p, 3, C]).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from internvl_jax.config import TextConfig


@dataclass(frozen=True)
class Transform:
    load: Callable[[np.ndarray, tuple], np.ndarray]
    save: Callable[[np.ndarray], np.ndarray]
    source: Callable[[tuple], tuple]


def transposed(m: np.ndarray, rows: int = 64, cols: int = 512) -> np.ndarray:
    """A contiguous copy of the 2-D ``m``'s transpose, moved tile by tile (``rows`` x ``cols``) as same-width
    unsigned integers: numpy's one-pass transpose of a large matrix runs at about 0.25 GB/s here (every write
    misses the cache), the tiled one at about 1.1 GB/s."""
    bits = np.dtype(f"u{m.dtype.itemsize}")
    out = np.empty(m.shape[::-1], m.dtype)
    src, dst = m.view(bits), out.view(bits)
    for i in range(0, m.shape[0], rows):
        for j in range(0, m.shape[1], cols):
            dst[j : j + cols, i : i + rows] = src[i : i + rows, j : j + cols].T
    return out


TRANSFORMS = {
    "same": Transform(lambda t, shape: t.reshape(shape), lambda a: a, lambda shape: tuple(shape)),
    "flat": Transform(lambda t, shape: t.reshape(shape), lambda a: a.reshape(-1), lambda shape: (math.prod(shape),)),
    "linear": Transform(lambda t, shape: transposed(t).reshape(shape), lambda a: transposed(a.reshape(a.shape[0], -1)),
                        lambda shape: (math.prod(shape[1:]), shape[0])),
    "linear2": Transform(lambda t, shape: transposed(t).reshape(shape),
                         lambda a: transposed(a.reshape(a.shape[0] * a.shape[1], -1)),
                         lambda shape: (shape[-1], math.prod(shape[:-1]))),
    "conv": Transform(lambda t, shape: t.transpose(2, 3, 1, 0).reshape(shape), lambda a: a.transpose(3, 2, 0, 1),
                      lambda shape: (shape[3], shape[2], shape[0], shape[1])),
}

RowsFn = Callable[[TextConfig, str], object]


@dataclass(frozen=True)
class Rule:
    source: str
    target: str
    transform: str = "same"
    parts: tuple[str, ...] = ()
    part_axis: int | None = None
    rows: RowsFn | None = None
    families: tuple[str, ...] | None = None
    layer_stride: int = 1
    layer_offset: int = 0

    def source_key(self, layer: int | None, part) -> str:
        """The canonical source key of stacked index ``layer`` (None: unstacked) and ``part``."""
        return self.source.format(layer=None if layer is None else layer * self.layer_stride + self.layer_offset,
                                  part=part)

    def stack_index(self, match) -> int | None:
        """The stacked index that a matched source key fills (None: unstacked), -1 for a layer of another offset."""
        layer = match.groupdict().get("layer")
        if layer is None:
            return None
        k, r = divmod(int(layer) - self.layer_offset, self.layer_stride)
        return k if r == 0 and k >= 0 else -1

    @cached_property
    def pattern(self) -> re.Pattern:
        regex = re.escape(self.source).replace(r"\{layer\}", r"(?P<layer>\d+)")
        regex = regex.replace(r"\{part\}", "(?P<part>" + "|".join(map(re.escape, self.parts)) + ")")
        return re.compile(regex)

    def applies_to(self, family: str) -> bool:
        return self.families is None or family in self.families


@dataclass(frozen=True)
class Layout:
    name: str
    prefixes: tuple[tuple[str, str], ...]  # (on-disk prefix, canonical prefix), first = written on export
    rules: tuple[Rule, ...]

    def canonical(self, key: str) -> str:
        for src, dst in self.prefixes:
            if key.startswith(src):
                return dst + key[len(src) :]
        return key

    def on_disk(self, key: str) -> str:
        for src, dst in self.prefixes:
            if key.startswith(dst):
                return src + key[len(dst) :]
        return key


# --- fused sources: which rows feed which part -------------------------------------------------------------


def phi3_qkv_rows(c: TextConfig, part: str) -> slice:
    """Phi-3 ``qkv_proj``: q = the first heads*D rows, then k, then v (kv_heads*D rows each)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[part]


def gate_up_rows(c: TextConfig, part: str) -> slice:
    """Phi-3 ``gate_up_proj``: gate is the first half of the rows, up the second."""
    n = c.intermediate_size
    return slice(0, n) if part == "gate" else slice(n, 2 * n)


def internlm2_wqkv_rows(c: TextConfig, part: str) -> np.ndarray:
    """InternLM2 ``wqkv`` rows grouped per KV head: for KV head h, its g = heads/kv query heads, then its key
    head, then its value head (head_dim rows each). Query head h*g + j is block h*(g+2) + j."""
    g, d = c.num_heads // c.num_kv_heads, c.head_dim
    if part == "q":
        blocks = [h * (g + 2) + j for h in range(c.num_kv_heads) for j in range(g)]
    else:
        blocks = [h * (g + 2) + g + (part == "v") for h in range(c.num_kv_heads)]
    return (np.asarray(blocks)[:, None] * d + np.arange(d)[None]).reshape(-1)


# --- shared rule groups --------------------------------------------------------------------------------------

_LLM = "llm.layers.{layer}."
_DEC = "language_model/layers/"


def _decoder(plain: tuple[str, ...]) -> tuple[Rule, ...]:
    """The Llama-style decoder names; ``plain`` are the families stored with separate q/k/v and gate/up
    (Phi-3 always fuses them)."""
    named = plain + ("phi3",)
    return (
        Rule("llm.embed_tokens.weight", "language_model/embed_tokens", families=named),
        Rule(_LLM + "self_attn.{part}_proj.weight", _DEC + "attn/{part}_proj/kernel", "linear", ("q", "k", "v"), families=plain),
        Rule(_LLM + "self_attn.{part}_proj.bias", _DEC + "attn/{part}_proj/bias", "flat", ("q", "k", "v"), families=plain),
        Rule(_LLM + "self_attn.qkv_proj.weight", _DEC + "attn/{part}_proj/kernel", "linear", ("q", "k", "v"), rows=phi3_qkv_rows, families=("phi3",)),
        Rule(_LLM + "self_attn.o_proj.weight", _DEC + "attn/o_proj/kernel", "linear2", families=named),
        Rule(_LLM + "self_attn.o_proj.bias", _DEC + "attn/o_proj/bias", families=plain),
        Rule(_LLM + "self_attn.{part}_norm.weight", _DEC + "attn/{part}_norm/scale", parts=("q", "k"), families=("qwen3",)),
        Rule(_LLM + "mlp.{part}_proj.weight", _DEC + "mlp/{part}_proj/kernel", "linear", ("gate", "up", "down"), families=plain),
        Rule(_LLM + "mlp.{part}_proj.bias", _DEC + "mlp/{part}_proj/bias", parts=("gate", "up", "down"), families=("llama",)),
        Rule(_LLM + "mlp.gate_up_proj.weight", _DEC + "mlp/{part}_proj/kernel", "linear", ("gate", "up"), rows=gate_up_rows, families=("phi3",)),
        Rule(_LLM + "mlp.down_proj.weight", _DEC + "mlp/down_proj/kernel", "linear", families=("phi3",)),
        Rule(_LLM + "input_layernorm.weight", _DEC + "input_norm/scale", families=named),
        Rule(_LLM + "post_attention_layernorm.weight", _DEC + "post_attn_norm/scale", families=named),
        Rule("llm.norm.weight", "language_model/norm/scale"),
        Rule("lm_head.weight", "language_model/lm_head/kernel", "linear", families=named),
    )


# InternLM2's own names (original layout only; the transformers converter renames them to Llama's)
_INTERNLM2_DECODER = (
    Rule("llm.tok_embeddings.weight", "language_model/embed_tokens", families=("internlm2",)),
    Rule(_LLM + "attention.wqkv.weight", _DEC + "attn/{part}_proj/kernel", "linear", ("q", "k", "v"), rows=internlm2_wqkv_rows, families=("internlm2",)),
    Rule(_LLM + "attention.wqkv.bias", _DEC + "attn/{part}_proj/bias", "flat", ("q", "k", "v"), rows=internlm2_wqkv_rows, families=("internlm2",)),
    Rule(_LLM + "attention.wo.weight", _DEC + "attn/o_proj/kernel", "linear2", families=("internlm2",)),
    Rule(_LLM + "attention.wo.bias", _DEC + "attn/o_proj/bias", families=("internlm2",)),
    Rule(_LLM + "feed_forward.w1.weight", _DEC + "mlp/gate_proj/kernel", "linear", families=("internlm2",)),
    Rule(_LLM + "feed_forward.w3.weight", _DEC + "mlp/up_proj/kernel", "linear", families=("internlm2",)),
    Rule(_LLM + "feed_forward.w2.weight", _DEC + "mlp/down_proj/kernel", "linear", families=("internlm2",)),
    Rule(_LLM + "attention_norm.weight", _DEC + "input_norm/scale", families=("internlm2",)),
    Rule(_LLM + "ffn_norm.weight", _DEC + "post_attn_norm/scale", families=("internlm2",)),
    Rule("output.weight", "language_model/lm_head/kernel", "linear", families=("internlm2",)),
)

_PROJECTOR = lambda norm, fc1, fc2: (  # noqa: E731
    Rule(f"projector.{norm}.weight", "projector/norm/scale"),
    Rule(f"projector.{norm}.bias", "projector/norm/bias"),
    Rule(f"projector.{fc1}.weight", "projector/fc1/kernel", "linear"),
    Rule(f"projector.{fc1}.bias", "projector/fc1/bias"),
    Rule(f"projector.{fc2}.weight", "projector/fc2/kernel", "linear"),
    Rule(f"projector.{fc2}.bias", "projector/fc2/bias"),
)

_VIT = "vision/layers/"

# transformers-native InternVLForConditionalGeneration (on-disk and in-memory prefixes), and bare transformers
# causal LMs (Qwen2/Qwen3/Llama/Phi3ForCausalLM) whose decoder lives under "model.". InternLM2 arrives as Llama.
HF = Layout(
    name="hf",
    prefixes=(
        ("vision_tower.", "vision."),  # what save_pretrained writes
        ("multi_modal_projector.", "projector."),
        ("language_model.model.", "llm."),
        ("language_model.lm_head.", "lm_head."),
        ("model.vision_tower.", "vision."),  # the in-memory module names
        ("model.multi_modal_projector.", "projector."),
        ("model.language_model.", "llm."),
        ("lm_head.", "lm_head."),
        ("model.", "llm."),  # a bare causal LM
    ),
    rules=(
        Rule("vision.embeddings.cls_token", "vision/embeddings/cls_token"),
        Rule("vision.embeddings.position_embeddings", "vision/embeddings/pos_embed"),
        Rule("vision.embeddings.patch_embeddings.projection.weight", "vision/embeddings/patch_kernel", "conv"),
        Rule("vision.embeddings.patch_embeddings.projection.bias", "vision/embeddings/patch_bias"),
        Rule("vision.encoder.layer.{layer}.attention.{part}_proj.weight", _VIT + "attn/qkv/kernel", "linear", ("q", "k", "v"), part_axis=1),
        Rule("vision.encoder.layer.{layer}.attention.{part}_proj.bias", _VIT + "attn/qkv/bias", "flat", ("q", "k", "v"), part_axis=0),
        Rule("vision.encoder.layer.{layer}.attention.{part}_norm.weight", _VIT + "attn/{part}_norm/scale", parts=("q", "k")),
        Rule("vision.encoder.layer.{layer}.attention.projection_layer.weight", _VIT + "attn/proj/kernel", "linear2"),
        Rule("vision.encoder.layer.{layer}.attention.projection_layer.bias", _VIT + "attn/proj/bias"),
        Rule("vision.encoder.layer.{layer}.mlp.{part}.weight", _VIT + "{part}/kernel", "linear", ("fc1", "fc2")),
        Rule("vision.encoder.layer.{layer}.mlp.{part}.bias", _VIT + "{part}/bias", parts=("fc1", "fc2")),
        Rule("vision.encoder.layer.{layer}.layernorm_before.weight", _VIT + "norm1/scale"),
        Rule("vision.encoder.layer.{layer}.layernorm_before.bias", _VIT + "norm1/bias"),
        Rule("vision.encoder.layer.{layer}.layernorm_after.weight", _VIT + "norm2/scale"),
        Rule("vision.encoder.layer.{layer}.layernorm_after.bias", _VIT + "norm2/bias"),
        Rule("vision.encoder.layer.{layer}.lambda_1", _VIT + "ls1"),
        Rule("vision.encoder.layer.{layer}.lambda_2", _VIT + "ls2"),
        *_PROJECTOR("layer_norm", "linear_1", "linear_2"),
        *_decoder(("qwen2", "qwen3", "llama", "internlm2")),  # InternLM2 is stored as Llama here
    ),
)

# InternViT in the original OpenGVLab naming (chat models and InternVL 1.0 alike)
_ORIGINAL_VIT = (
    Rule("vision.embeddings.class_embedding", "vision/embeddings/cls_token"),
    Rule("vision.embeddings.position_embedding", "vision/embeddings/pos_embed"),
    Rule("vision.embeddings.patch_embedding.weight", "vision/embeddings/patch_kernel", "conv"),
    Rule("vision.embeddings.patch_embedding.bias", "vision/embeddings/patch_bias"),
    Rule("vision.encoder.layers.{layer}.attn.qkv.weight", _VIT + "attn/qkv/kernel", "linear"),
    Rule("vision.encoder.layers.{layer}.attn.qkv.bias", _VIT + "attn/qkv/bias", "flat"),
    Rule("vision.encoder.layers.{layer}.attn.{part}_norm.weight", _VIT + "attn/{part}_norm/scale", parts=("q", "k")),
    Rule("vision.encoder.layers.{layer}.attn.proj.weight", _VIT + "attn/proj/kernel", "linear2"),
    Rule("vision.encoder.layers.{layer}.attn.proj.bias", _VIT + "attn/proj/bias"),
    Rule("vision.encoder.layers.{layer}.mlp.{part}.weight", _VIT + "{part}/kernel", "linear", ("fc1", "fc2")),
    Rule("vision.encoder.layers.{layer}.mlp.{part}.bias", _VIT + "{part}/bias", parts=("fc1", "fc2")),
    Rule("vision.encoder.layers.{layer}.{part}.weight", _VIT + "{part}/scale", parts=("norm1", "norm2")),
    Rule("vision.encoder.layers.{layer}.{part}.bias", _VIT + "{part}/bias", parts=("norm1", "norm2")),
    Rule("vision.encoder.layers.{layer}.{part}", _VIT + "{part}", parts=("ls1", "ls2")),
)

# original OpenGVLab InternVLChatModel (custom code; the ViT's fused qkv, mlp1, InternLM2's own names)
ORIGINAL = Layout(
    name="original",
    prefixes=(
        ("vision_model.", "vision."),
        ("mlp1.", "projector."),
        ("language_model.model.", "llm."),
        ("language_model.lm_head.", "lm_head."),
        ("language_model.output.", "output."),
    ),
    rules=(
        *_ORIGINAL_VIT,
        *_PROJECTOR("0", "1", "3"),
        *_decoder(("qwen2", "qwen3", "llama")),
        *_INTERNLM2_DECODER,
    ),
)

LAYOUTS = {"hf": HF, "original": ORIGINAL}


# InternVL 1.0 (the original InternVLModel: InternVL-C / InternVL-G) ---------------------------------------------

_QLLAMA_LAYER = "qllama.layers.{layer}."
_POOLERS = ("clip_projector", "clip_projector2")


def _qllama_layer(j: int, frequency: int) -> tuple[Rule, ...]:
    """QLLaMA layer ``stride * k + j`` <-> ``layer_{j}`` of scanned block k (cross-attention in layer_0 only)."""
    dst = f"qllama/blocks/layer_{j}/"
    kw = dict(layer_stride=frequency, layer_offset=j)
    rules = (
        Rule(_QLLAMA_LAYER + "self_attn.{part}_proj.weight", dst + "attn/{part}_proj/kernel", "linear", ("q", "k", "v"), **kw),
        Rule(_QLLAMA_LAYER + "self_attn.o_proj.weight", dst + "attn/o_proj/kernel", "linear2", **kw),
        Rule(_QLLAMA_LAYER + "mlp.{part}_proj.weight", dst + "mlp/{part}_proj/kernel", "linear", ("gate", "up", "down"), **kw),
        Rule(_QLLAMA_LAYER + "input_layernorm.weight", dst + "input_norm/scale", **kw),
        Rule(_QLLAMA_LAYER + "post_attention_layernorm.weight", dst + "post_attn_norm/scale", **kw),
    )
    if j == 0:
        rules += (
            Rule(_QLLAMA_LAYER + "cross_attn.{part}_proj.weight", dst + "cross_attn/{part}_proj/kernel", "linear", ("q", "k", "v"), **kw),
            Rule(_QLLAMA_LAYER + "cross_attn.o_proj.weight", dst + "cross_attn/o_proj/kernel", "linear2", **kw),
            Rule(_QLLAMA_LAYER + "cross_attn.{part}.weight", dst + "cross_attn/{part}/scale", parts=("norm1", "norm2"), **kw),
        )
    return rules


def _pooler(name: str) -> tuple[Rule, ...]:
    """An attention-pooling block: three LayerNorms, bias-free q/k/v with separate bias vectors, proj."""
    return (
        Rule(name + ".norm1_{part}.weight", name + "/norm_{part}/scale", parts=("q", "k", "v")),
        Rule(name + ".norm1_{part}.bias", name + "/norm_{part}/bias", parts=("q", "k", "v")),
        Rule(name + ".cross_attn.{part}.weight", name + "/{part}/kernel", "linear", ("q", "k", "v")),
        Rule(name + ".cross_attn.{part}_bias", name + "/{part}/bias", "flat", ("q", "k", "v")),
        Rule(name + ".cross_attn.proj.weight", name + "/proj/kernel", "linear2"),
        Rule(name + ".cross_attn.proj.bias", name + "/proj/bias"),
    )


def internvl_g_layout(cross_attention_frequency: int) -> Layout:
    """The original InternVL 1.0 ``InternVLModel`` (``internvl_g`` / the hub's InternVL-14B-224px) for a QLLaMA
    with cross-attention every ``cross_attention_frequency`` layers."""
    return Layout(
        name="internvl_g",
        prefixes=(("vision_model.", "vision."), ("qllama.model.", "qllama."), ("qllama.lm_head.", "lm_head.")),
        rules=(
            *_ORIGINAL_VIT,
            Rule("qllama.embed_tokens.weight", "qllama/embed_tokens"),
            *(r for j in range(cross_attention_frequency) for r in _qllama_layer(j, cross_attention_frequency)),
            Rule("qllama.norm.weight", "qllama/norm/scale"),
            Rule("lm_head.weight", "qllama/lm_head/kernel", "linear"),
            Rule("query_tokens", "query_tokens"),
            Rule("text_projection", "text_projection"),
            Rule("logit_scale", "logit_scale"),
            *_pooler("clip_projector"),
            *_pooler("clip_projector2"),
            Rule("itm_head.weight", "itm_head/kernel", "linear"),
            Rule("itm_head.bias", "itm_head/bias"),
        ),
    )


def layout_for(name: str, config) -> Layout:
    """The layout table called ``name`` for ``config`` (``internvl_g`` depends on the QLLaMA layer pattern)."""
    clip = hasattr(config, "qllama")  # an InternVL 1.0 CLIPConfig
    if name in (*LAYOUTS, "internvl_g") and (name == "internvl_g") != clip:
        raise ValueError(f"layout {name!r} does not fit {'an InternVL 1.0' if clip else 'an InternVL chat'} model: "
                         f"use {'internvl_g' if clip else ' or '.join(LAYOUTS)}")
    if name == "internvl_g":
        return internvl_g_layout(config.cross_attention_frequency)
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; use one of {', '.join([*LAYOUTS, 'internvl_g'])}")
    return LAYOUTS[name]
