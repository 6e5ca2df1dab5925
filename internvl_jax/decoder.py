"""One causal decoder for every LLM family of the dense InternVL releases.

The families differ only by the switches of :class:`~internvl_jax.config.TextConfig`:

| family    | qkv bias | o bias | per-head q/k norm | rope                          |
|-----------|----------|--------|-------------------|-------------------------------|
| qwen2     | yes      | no     | no                | default / dynamic NTK         |
| qwen3     | no*      | no*    | yes               | default                       |
| llama     | no*      | no*    | no                | default / linear / llama3     |
| internlm2 | `bias`   | `bias` | no                | dynamic NTK                   |
| phi3      | no       | no     | no                | longrope (short/long factors) |

(* ``attention_bias`` of the config.) InternLM2's fused grouped ``wqkv`` and Phi-3's fused projections are a
checkpoint-layout matter handled by ``convert/``; the module always holds separate q/k/v and gate/up kernels
(LoRA on the fused torch modules: a shared-A group, :func:`internvl_jax.layers.lora_groups`).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn

from .config import TextConfig
from .attention import attend
from .layers import (
    Dense, Norm, attention, constrain, dense_impl, dot_out_in, lora_groups, param_with_axes,
    resolve_attention_impl, scan_layers,
)
from .kernels import decode_attention
from .rope import apply_rope, rope_cos_sin


class Attention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    impl: str = "batched"
    transposed: bool = False  # kernels stored transposed (the unrolled layout, see Dense)
    lora: tuple = ()  # LoRA rule table (internvl_jax.lora)

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """x [B, L, E]. Without a cache, ``mask`` is the segment ids int [B, L] (causal within each segment,
        0 = padding) and attention runs through the configured backend (:func:`internvl_jax.attention.attend`),
        or a dense bool mask [B, 1, L, L] (True = attend; QLLaMA's query/text masks), on the dense XLA path.
        With ``cache`` = (k, v) [B, K, S, D], ``mask`` is bool [B, 1, L, S]: the new keys/values go to slots
        ``cache_index`` .. ``cache_index + L - 1`` (int scalar, the same slots in every row) and attention runs
        over the whole cache; returns (output, updated cache)."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = dict(transposed=self.transposed, lora=self.lora, **kw)
        shared = lora_groups(self, x, ("q_proj", "k_proj", "v_proj"), ("embed",)) if self.lora else {}
        q = Dense((c.num_heads, c.head_dim), ("embed",), ("heads", "head_dim"), c.qkv_bias, name="q_proj", **dense)(
            x, shared.get("q_proj"))
        k = Dense((c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"), c.qkv_bias, name="k_proj",
                  **dense)(x, shared.get("k_proj"))
        v = Dense((c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"), c.qkv_bias, name="v_proj",
                  **dense)(x, shared.get("v_proj"))
        if c.qk_norm:
            q = Norm("rms_norm", c.norm_eps, "head_dim", name="q_norm", **kw)(q)
            k = Norm("rms_norm", c.norm_eps, "head_dim", name="k_norm", **kw)(k)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        scale = c.head_dim**-0.5
        if cache is None and mask is not None and mask.ndim == 4:
            out = attention(q, k, v, mask, scale=scale, impl=dense_impl(self.impl))
        elif cache is None:
            out = attend(q, k, v, mask, mask, scale=scale, causal=True, impl=self.impl)
        else:
            # one dynamic_update_slice per buffer: every row writes at the same slots (prompts are left-padded)
            write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                buf, new.transpose(0, 2, 1, 3).astype(buf.dtype), cache_index, axis=2)
            cache = tuple(constrain(write(buf, new), CACHE_AXES) for buf, new in zip(cache, (k, v)))
            k, v = cache
            if x.shape[1] == 1:
                out = decode_attention(q, k, v, mask[:, 0, 0], scale=scale)
            else:
                # prefill into the cache: slot masks with per-row starts, on the dense XLA path
                out = attention(q, k.swapaxes(1, 2).astype(q.dtype), v.swapaxes(1, 2).astype(q.dtype), mask,
                                scale=scale, impl=dense_impl(self.impl))
        return Dense((c.hidden_size,), ("heads", "head_dim"), ("embed",), c.o_bias, name="o_proj", **dense)(out), cache


class MLP(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    transposed: bool = False
    lora: tuple = ()

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, transposed=self.transposed, lora=self.lora)
        shared = lora_groups(self, x, ("gate_proj", "up_proj"), ("embed",)) if self.lora else {}
        gate = Dense((c.intermediate_size,), ("embed",), ("mlp",), c.mlp_bias, name="gate_proj", **kw)(
            x, shared.get("gate_proj"))
        up = Dense((c.intermediate_size,), ("embed",), ("mlp",), c.mlp_bias, name="up_proj", **kw)(
            x, shared.get("up_proj"))
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Dense((c.hidden_size,), ("mlp",), ("embed",), c.mlp_bias, name="down_proj", **kw)(h)


class CrossAttention(nn.Module):
    """QLLaMA's cross-attention of the query tokens to the vision states: o_proj(softmax(q k^T / sqrt(D)) v) with
    q = q_proj(RMSNorm1(x)), k, v = k_proj, v_proj(RMSNorm2(vision)); no mask, no RoPE, no biases, float32 softmax.

    x [B, Q, E]; vision [B, S, C] (C = the ViT's width) -> [B, Q, E]."""

    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: tuple = ()

    @nn.compact
    def __call__(self, x, vision):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = dict(lora=self.lora, **kw)
        x = Norm("rms_norm", c.norm_eps, "embed", name="norm1", **kw)(x)
        vision = Norm("rms_norm", c.norm_eps, "vit_embed", name="norm2", **kw)(vision.astype(self.dtype))
        q = Dense((c.num_heads, c.head_dim), ("embed",), ("heads", "head_dim"), name="q_proj", **dense)(x)
        k = Dense((c.num_heads, c.head_dim), ("vit_embed",), ("heads", "head_dim"), name="k_proj", **dense)(vision)
        v = Dense((c.num_heads, c.head_dim), ("vit_embed",), ("heads", "head_dim"), name="v_proj", **dense)(vision)
        out = attention(q, k, v, None, scale=c.head_dim**-0.5)
        return Dense((c.hidden_size,), ("heads", "head_dim"), ("embed",), name="o_proj", **dense)(out)


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "batched"
    transposed: bool = False
    lora: tuple = ()
    # QLLaMA: after self-attention, the first ``num_queries`` positions cross-attend to ``vision`` (with a residual)
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, vision=None, num_queries: int = 0):
        """``vision`` [B, S, C] and ``num_queries`` only with ``cross_attention``; as the original, the block is
        skipped when the step holds fewer than ``num_queries`` positions (cached decoding) or no vision states."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Norm("rms_norm", c.norm_eps, "embed", name="input_norm", **kw)(x)
        h, cache = Attention(c, name="attn", impl=self.attention_impl, transposed=self.transposed, lora=self.lora,
                             **kw)(
            h, cos, sin, mask, cache, cache_index)
        x = x + h
        if self.cross_attention and vision is not None and x.shape[1] >= num_queries:
            queries = x[:, :num_queries]
            queries = queries + CrossAttention(c, name="cross_attn", lora=self.lora, **kw)(queries, vision)
            x = jnp.concatenate([queries, x[:, num_queries:]], axis=1)
        h = Norm("rms_norm", c.norm_eps, "embed", name="post_attn_norm", **kw)(x)
        x = x + MLP(c, name="mlp", transposed=self.transposed, lora=self.lora, **kw)(h)
        return constrain(x, ("batch", "length", "embed")), cache


def positions_from_segments(segment_ids):
    """[B, L] segment ids -> int32 [B, L] positions restarting at 0 at each new segment."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")  # logical axes of each layer's k and v cache


class Decoder(nn.Module):
    """Token embedding, decoder layers, final norm and LM head.

    ``embed(input_ids)`` gives the token embeddings (InternVL overwrites the image positions), then
    ``__call__(embeddings, positions, segment_ids)`` returns float32 logits [B, L, V].

    The layers are one ``nn.scan`` over params stacked on a leading ``layers`` axis (training, full forwards),
    or, with ``unrolled``, separate modules ``layers_0`` ... with [out, in] matrix kernels (the generation
    layout, made from the stacked params by :func:`unrolled_params`). On XLA CPU a scan or a slice of stacked
    weights copies every weight it feeds to a matmul on every call, which doubles the memory traffic of a decode
    step. The KV cache is supported in the unrolled layout only.
    """

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str = "auto"  # see layers.resolve_attention_impl
    unrolled: bool = False
    scan_unroll: int = 1  # layers per scan iteration of the stacked layout (layers.scan_layers)
    lora: tuple = ()  # LoRA rule table (internvl_jax.lora), for every Dense below

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = self.param(
            "embed_tokens",
            param_with_axes(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size),
            self.param_dtype,
        )
        impl = resolve_attention_impl(self.attention_impl)
        if self.unrolled:
            self.layers = [DecoderLayer(c, attention_impl=impl, transposed=True, lora=self.lora, **kw)
                           for _ in range(c.num_layers)]
        else:
            # cos, sin and the segment ids are shared by the layers
            stack = scan_layers(DecoderLayer, length=c.num_layers, remat=self.remat, in_axes=(nn.broadcast,) * 3,
                                unroll=self.scan_unroll)
            self.layers = stack(c, name="layers", attention_impl=impl, lora=self.lora, **kw)
        self.norm = Norm("rms_norm", c.norm_eps, "embed", **kw)
        if not c.tie_word_embeddings:
            self.lm_head = Dense((c.vocab_size,), ("embed",), ("vocab",), out_dtype=jnp.float32, name="lm_head",
                                 transposed=self.unrolled, lora=self.lora, **kw)

    def embed(self, input_ids):
        """int [B, L] -> [B, L, E] in the compute dtype."""
        x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def head(self, x):
        """Final-norm hidden states [B, L, E] -> float32 logits [B, L, V] (the tied table or ``lm_head``)."""
        if self.cfg.tie_word_embeddings:
            logits = dot_out_in(x, self.embed_tokens, self.dtype, jnp.float32)  # the table is [out, in] already
        else:
            logits = self.lm_head(x)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, input_ids=None, *, embeddings=None, positions=None, segment_ids=None, cache=None,
                 cache_index=None, cache_start=None, last_only: bool = False, return_hidden: bool = False):
        """input_ids int [B, L], or embeddings [B, L, E] (e.g. with image features merged in);
        positions: [B, L] int or float (V2PE); segment_ids: int [B, L], 0 = padding, packed samples differ.

        Without ``positions``, positions count from 0 in every segment (or along the row).
        Returns float32 logits [B, L, V] ([B, 1, V] of the last position only with ``last_only``); with
        ``return_hidden``, the final-norm hidden states [B, L, E] instead (training: a chunked loss applies
        :meth:`head` a piece at a time, so the [B, L, V] logits never exist at once).

        KV cache (``unrolled`` only): ``cache`` is one (k, v) pair per layer, each [B, K, S, D] (see
        ``internvl_jax.generate.init_cache``); the L tokens of every row go to slots ``cache_index`` ..
        ``cache_index + L - 1`` (int scalar) and attend to the earlier slots of their row from ``cache_start``
        (int [B], default 0: the slots before it are padding). Positions default to slot - cache_start.
        ``segment_ids`` are not used. Returns (logits, updated cache).
        """
        c = self.cfg
        x = self.embed(input_ids) if embeddings is None else embeddings
        b, l = x.shape[:2]
        if cache is None:
            if segment_ids is None:
                segment_ids = jnp.ones((b, l), jnp.int32)
            if positions is None:
                positions = positions_from_segments(segment_ids)
            mask = segment_ids  # each layer's attention backend builds (or blocks) its own mask
        else:
            if not self.unrolled:
                raise ValueError("the KV cache needs the unrolled layout: InternVL(config, unrolled=True) with "
                                 "params from internvl_jax.generate.unrolled_params")
            start = jnp.zeros((b,), jnp.int32) if cache_start is None else cache_start
            query_slot = cache_index + jnp.arange(l)  # [L]
            if positions is None:
                positions = query_slot[None] - start[:, None]
            slots = jnp.arange(cache[0][0].shape[2])
            mask = (slots[None, None] <= query_slot[None, :, None]) & (slots[None, None] >= start[:, None, None])
            mask = mask[:, None]  # [B, 1, L, S]
        cos, sin = rope_cos_sin(positions, c.rope, c.head_dim, c.max_position_embeddings)
        if not self.unrolled:
            x = self.layers(x, cos, sin, mask)[0]
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_index)
                new_cache.append(layer_cache)
            cache = None if cache is None else tuple(new_cache)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if return_hidden:
            return x
        logits = self.head(x)
        return logits if cache is None else (logits, cache)


def unrolled_params(params: dict, cfg: TextConfig) -> dict:
    """Decoder params (stacked layers, as stored) -> those of ``Decoder(cfg, unrolled=True)``: ``layers_0`` ...
    ``layers_{n-1}``, every kernel (LM head too) as one [out, in] matrix; the rest is shared, not copied.

    The new arrays are a second copy of nearly all LLM weights (the price of decoding without per-step weight
    copies on XLA CPU); they are freed with the returned tree. LoRA adapters are sliced per layer as they
    are (the same shapes in both layouts).
    """
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.num_layers):
        out[f"layers_{i}"] = _unstack_layer(params["layers"], jnp.int32(i), cfg)
    if "lm_head" in params:
        out["lm_head"] = {**params["lm_head"], "kernel": _as_matrix(params["lm_head"]["kernel"], 1)}
    return out


@partial(jax.jit, static_argnums=1)
def _as_matrix(kernel, n_in: int):
    """A kernel [*in_shape, *features] (``n_in`` input dims) as one matrix [prod(features), prod(in_shape)]."""
    return kernel.reshape(math.prod(kernel.shape[:n_in]), -1).T


@partial(jax.jit, static_argnums=2)
def _unstack_layer(stacked, i, cfg: TextConfig):
    """Layer ``i`` of the stacked layer params, kernels as [out, in] matrices (the unrolled DecoderLayer's); LoRA
    adapters (``lora_a``/``lora_b``, the same shapes in both layouts) are sliced as they are."""
    layer = DecoderLayer(cfg, jnp.float32, jnp.float32, transposed=True)
    e, d = cfg.hidden_size, cfg.head_dim
    target = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros((1, 1, e)), jnp.zeros((1, 1, d)),
                                     jnp.zeros((1, 1, d)), None)["params"])

    def one(path, x):
        if path[-1].key != "kernel":
            return x[i]
        t = target
        for k in path:
            t = t[k.key]
        return x[i].reshape(t.shape[::-1]).T

    return jax.tree_util.tree_map_with_path(one, stacked)
