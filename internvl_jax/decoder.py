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
checkpoint-layout matter handled by ``convert/``; the module always holds separate q/k/v and gate/up kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .config import TextConfig
from .layers import (
    Dense, Norm, attention, causal_segment_mask, constrain, param_with_axes, resolve_attention_impl, scan_layers,
)
from .rope import apply_rope, rope_cos_sin


class Attention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    impl: str = "batched"

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """x [B, L, E]. With ``cache`` = (k, v) [B, S, K, D] the new keys/values are written at ``cache_index``
        [B] (per row) and attention runs over the whole cache; returns (output, updated cache)."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Dense((c.num_heads, c.head_dim), ("embed",), ("heads", "head_dim"), c.qkv_bias, name="q_proj", **kw)(x)
        k = Dense((c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"), c.qkv_bias, name="k_proj", **kw)(x)
        v = Dense((c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"), c.qkv_bias, name="v_proj", **kw)(x)
        if c.qk_norm:
            q = Norm("rms_norm", c.norm_eps, "head_dim", name="q_norm", **kw)(q)
            k = Norm("rms_norm", c.norm_eps, "head_dim", name="k_norm", **kw)(k)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        if cache is not None:
            write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, 0))
            cache = (write(cache[0], k, cache_index), write(cache[1], v, cache_index))
            k, v = (constrain(t, ("batch", "cache_length", "kv_heads", "head_dim")) for t in cache)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=c.head_dim**-0.5, impl=self.impl)
        return Dense((c.hidden_size,), ("heads", "head_dim"), ("embed",), c.o_bias, name="o_proj", **kw)(out), cache


class MLP(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Dense((c.intermediate_size,), ("embed",), ("mlp",), c.mlp_bias, name="gate_proj", **kw)(x)
        up = Dense((c.intermediate_size,), ("embed",), ("mlp",), c.mlp_bias, name="up_proj", **kw)(x)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Dense((c.hidden_size,), ("mlp",), ("embed",), c.mlp_bias, name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "batched"

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Norm("rms_norm", c.norm_eps, "embed", name="input_norm", **kw)(x)
        h, cache = Attention(c, name="attn", impl=self.attention_impl, **kw)(h, cos, sin, mask, cache, cache_index)
        x = x + h
        h = Norm("rms_norm", c.norm_eps, "embed", name="post_attn_norm", **kw)(x)
        x = x + MLP(c, name="mlp", **kw)(h)
        return constrain(x, ("batch", "length", "embed")), cache


def positions_from_segments(segment_ids):
    """[B, L] segment ids -> int32 [B, L] positions restarting at 0 at each new segment."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Decoder(nn.Module):
    """Token embedding, scanned decoder layers, final norm and LM head.

    ``embed(input_ids)`` gives the token embeddings (InternVL overwrites the image positions), then
    ``__call__(embeddings, positions, segment_ids)`` returns float32 logits [B, L, V].
    """

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str = "auto"  # see layers.resolve_attention_impl

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = self.param(
            "embed_tokens",
            param_with_axes(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size),
            self.param_dtype,
        )
        # cos, sin, mask and cache_index are shared by the layers; the KV cache is stacked on the layers axis
        in_axes = (nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast)
        stack = scan_layers(DecoderLayer, length=c.num_layers, remat=self.remat, in_axes=in_axes)
        self.layers = stack(c, name="layers", attention_impl=resolve_attention_impl(self.attention_impl), **kw)
        self.norm = Norm("rms_norm", c.norm_eps, "embed", **kw)
        if not c.tie_word_embeddings:
            self.lm_head = Dense((c.vocab_size,), ("embed",), ("vocab",), out_dtype=jnp.float32, name="lm_head", **kw)

    def embed(self, input_ids):
        """int [B, L] -> [B, L, E] in the compute dtype."""
        x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def __call__(self, input_ids=None, *, embeddings=None, positions=None, segment_ids=None, cache=None,
                 cache_index=None):
        """input_ids int [B, L], or embeddings [B, L, E] (e.g. with image features merged in);
        positions: [B, L] int or float (V2PE); segment_ids: int [B, L], 0 = padding, packed samples differ.

        Without ``positions``, positions count from 0 in every segment (or along the row).
        Returns float32 logits [B, L, V]. With a KV ``cache`` ((k, v) each [layers, B, S, K, D], see
        ``internvl_jax.generate.init_cache``) the tokens are written at ``cache_index`` [B] and attend to every
        earlier cache slot of their row; returns (logits, updated cache).
        """
        c = self.cfg
        x = self.embed(input_ids) if embeddings is None else embeddings
        b, l = x.shape[:2]
        if cache is None:
            if segment_ids is None:
                segment_ids = jnp.ones((b, l), jnp.int32)
            if positions is None:
                positions = positions_from_segments(segment_ids)
            mask = causal_segment_mask(segment_ids)
        else:
            query_slot = cache_index[:, None] + jnp.arange(l)[None]  # [B, L]
            if positions is None:
                positions = query_slot
            mask = (jnp.arange(cache[0].shape[2])[None, None] <= query_slot[:, :, None])[:, None]  # [B, 1, L, S]
        cos, sin = rope_cos_sin(positions, c.rope, c.head_dim, c.max_position_embeddings)
        x, cache = self.layers(x, cos, sin, mask, cache, cache_index)
        x = self.norm(x)
        if c.tie_word_embeddings:
            logits = jnp.einsum("ble,ve->blv", x, self.embed_tokens.astype(self.dtype), preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits if cache is None else (logits, cache)
