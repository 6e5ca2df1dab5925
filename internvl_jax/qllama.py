"""QLLaMA: InternVL 1.0's language middleware, a Llama decoder whose first positions are learnable queries.

The layers are the library's one :class:`~internvl_jax.decoder.DecoderLayer`; every ``cross_attention_frequency``-th
layer (index % frequency == 0) turns on its cross-attention switch, which lets the query positions attend to the
ViT states after self-attention. The layers are scanned in blocks of ``frequency`` layers (the first with
cross-attention), so the params are ``blocks/layer_{j}/...`` stacked on the block axis: QLLaMA layer i is
``layer_{i % frequency}`` of block ``i // frequency``.

What attends to what is a dense mask built by :func:`qllama_mask` from the row's key padding and the number of
query positions in front (0 for text alone):

| kind      | use                              | query rows                | text rows                       |
|-----------|----------------------------------|---------------------------|---------------------------------|
| causal    | text features (no queries)       | -                         | causal                          |
| full      | image queries alone; ITM         | everything                | everything                      |
| prefix    | captioning; ITG                  | the queries               | the queries + causal text       |
| separate  | ITC (one pass, two features)     | the queries               | causal text                     |

Keys that are padding are never attended. RoPE positions run 0..L-1 over the queries and the text.

KV cache (captioning, :func:`internvl_jax.clip.caption`): :func:`init_cache` gives per block one (k, v) pair per
layer of the block, stacked on the block axis, and ``QLLaMA(..., cache=, cache_index=)`` writes the L new positions
at slots ``cache_index ..`` and attends over the cache with a mask [B, 1, L, S] (:func:`cached_prefix_mask`: the
``prefix`` kind over slots). The cross-attention runs when a call holds at least the queries (the prefill over
[queries ; prompt]), not in one-token decode steps, as the original's ``seq_len >= 96`` rule.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from .clip_config import CLIPConfig
from .decoder import DecoderLayer
from .layers import (Dense, Norm, as_dtype, constrain, dense_impl, dot_out_in, param_with_axes, resolve_attention_impl,
                     scan_layers)
from .rope import rope_cos_sin

MASK_KINDS = ("causal", "full", "prefix", "separate")


def qllama_mask(kind: str, num_queries: int, key_valid):
    """bool [B, 1, L, L] attention mask (True = attend) of a row of ``num_queries`` queries then text.

    key_valid: bool [B, L], False at padding. See the module docstring for the kinds.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown QLLaMA mask kind {kind!r}; use one of {', '.join(MASK_KINDS)}")
    l = key_valid.shape[1]
    i, j = jnp.arange(l)[:, None], jnp.arange(l)[None, :]
    causal, key_query, row_query = j <= i, j < num_queries, i < num_queries
    allowed = {
        "causal": causal,
        "full": jnp.ones((l, l), bool),
        "prefix": key_query | causal,
        "separate": (row_query & key_query) | (~row_query & ~key_query & causal),
    }[kind]
    return (allowed[None] & key_valid[:, None, :])[:, None]


def cached_prefix_mask(num_queries: int, query_slots, length: int, batch: int):
    """bool [B, 1, L, S]: :func:`qllama_mask`'s ``prefix`` kind for the positions at cache ``query_slots`` int [L]
    over ``length`` slots: slot j is seen from slot i when j is a query slot (j < ``num_queries``) or j <= i, so
    the queries see the queries only and a text position the queries and the text up to itself."""
    slots = jnp.arange(length)[None, :]
    allowed = (slots < num_queries) | (slots <= query_slots[:, None])
    return jnp.broadcast_to(allowed, (batch, 1, *allowed.shape))


def init_cache(config: CLIPConfig, batch: int, length: int):
    """Zeroed QLLaMA KV cache of ``length`` slots: per layer of a block, (k, v) each [blocks, B, kv_heads, length,
    head_dim] in the compute dtype (block i's slice is QLLaMA layer ``i * frequency + j``'s cache)."""
    q = config.qllama
    shape = (config.num_blocks, batch, q.num_kv_heads, length, q.head_dim)
    dtype = as_dtype(config.dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.cross_attention_frequency))


class QLLaMABlock(nn.Module):
    """``frequency`` decoder layers, cross-attention in the first; one step of the scan over blocks."""

    cfg: CLIPConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "batched"

    @nn.compact
    def __call__(self, x, cos, sin, mask, vision, cache, cache_index):
        """cache: None, or this block's (k, v) per layer (see :func:`init_cache`); returns (x, new cache)."""
        c = self.cfg
        new_cache = []
        for j in range(c.cross_attention_frequency):
            layer = DecoderLayer(c.qllama, self.dtype, self.param_dtype, attention_impl=self.attention_impl,
                                 cross_attention=j == 0, name=f"layer_{j}")
            x, layer_cache = layer(x, cos, sin, mask, None if cache is None else cache[j], cache_index,
                                   vision=vision, num_queries=c.num_query_token)
            new_cache.append(layer_cache)
        return constrain(x, ("batch", "length", "embed")), None if cache is None else tuple(new_cache)


class QLLaMA(nn.Module):
    """Token embeddings, the scanned blocks, the final RMSNorm and the LM head (or the tied table)."""

    cfg: CLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str = "auto"
    scan_unroll: int = 1  # blocks per scan iteration (layers.scan_layers)

    def setup(self):
        c, q = self.cfg, self.cfg.qllama
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = self.param("embed_tokens", param_with_axes(nn.initializers.normal(0.02), ("vocab", "embed")),
                                       (q.vocab_size, q.hidden_size), self.param_dtype)
        impl = dense_impl(resolve_attention_impl(self.attention_impl))  # the masks are dense
        stack = scan_layers(QLLaMABlock, length=c.num_blocks, remat=self.remat,
                            in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast), unroll=self.scan_unroll)
        self.blocks = stack(c, name="blocks", attention_impl=impl, **kw)
        self.norm = Norm("rms_norm", q.norm_eps, "embed", **kw)
        if not q.tie_word_embeddings:
            self.lm_head = Dense((q.vocab_size,), ("embed",), ("vocab",), out_dtype=jnp.float32, name="lm_head", **kw)

    def embed(self, input_ids):
        """int [B, L] -> [B, L, E]."""
        return jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)

    def head(self, x):
        """[B, L, E] -> float32 logits [B, L, V]."""
        if self.cfg.qllama.tie_word_embeddings:
            return dot_out_in(x, self.embed_tokens, self.dtype, jnp.float32)
        return self.lm_head(x)

    def __call__(self, embeddings, mask, vision=None, *, positions=None, cache=None, cache_index=None):
        """embeddings [B, L, E] (queries first where there are any); mask bool [B, 1, L, L] (:func:`qllama_mask`),
        or [B, 1, L, S] over the cache's slots with a ``cache`` (:func:`cached_prefix_mask`); vision [B, S, C] ViT
        states for the query positions' cross-attention (None: text only). positions int [B, L]: RoPE positions
        (default 0..L-1, from ``cache_index`` with a cache). Returns the final-norm hidden states [B, L, E], with a
        cache (:func:`init_cache`; the L positions go to slots ``cache_index`` ..) also the updated cache."""
        q = self.cfg.qllama
        b, l = embeddings.shape[:2]
        if positions is None:
            first = 0 if cache is None else cache_index
            positions = jnp.broadcast_to(first + jnp.arange(l, dtype=jnp.int32), (b, l))
        cos, sin = rope_cos_sin(positions, q.rope, q.head_dim, q.max_position_embeddings)
        x, cache = self.blocks(constrain(embeddings, ("batch", "length", "embed")), cos, sin, mask, vision, cache,
                               cache_index)
        return self.norm(x) if cache is None else (self.norm(x), cache)
