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
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from .clip_config import CLIPConfig
from .decoder import DecoderLayer
from .layers import Dense, Norm, constrain, dot_out_in, param_with_axes, resolve_attention_impl, scan_layers
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


class QLLaMABlock(nn.Module):
    """``frequency`` decoder layers, cross-attention in the first; one step of the scan over blocks."""

    cfg: CLIPConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "batched"

    @nn.compact
    def __call__(self, x, cos, sin, mask, vision):
        c = self.cfg
        for j in range(c.cross_attention_frequency):
            layer = DecoderLayer(c.qllama, self.dtype, self.param_dtype, attention_impl=self.attention_impl,
                                 cross_attention=j == 0, name=f"layer_{j}")
            x, _ = layer(x, cos, sin, mask, vision=vision, num_queries=c.num_query_token)
        return constrain(x, ("batch", "length", "embed")), None


class QLLaMA(nn.Module):
    """Token embeddings, the scanned blocks, the final RMSNorm and the LM head (or the tied table)."""

    cfg: CLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str = "auto"

    def setup(self):
        c, q = self.cfg, self.cfg.qllama
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = self.param("embed_tokens", param_with_axes(nn.initializers.normal(0.02), ("vocab", "embed")),
                                       (q.vocab_size, q.hidden_size), self.param_dtype)
        impl = resolve_attention_impl(self.attention_impl)
        impl = impl if impl in ("batched", "per_kv_head") else "batched"  # the masks are dense
        stack = scan_layers(QLLaMABlock, length=c.num_blocks, remat=self.remat, in_axes=(nn.broadcast,) * 4)
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

    def __call__(self, embeddings, mask, vision=None):
        """embeddings [B, L, E] (queries first where there are any); mask bool [B, 1, L, L] (:func:`qllama_mask`);
        vision [B, S, C] ViT states for the query positions' cross-attention (None: text only). Returns the
        final-norm hidden states [B, L, E]."""
        q = self.cfg.qllama
        b, l = embeddings.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        cos, sin = rope_cos_sin(positions, q.rope, q.head_dim, q.max_position_embeddings)
        x = self.blocks(constrain(embeddings, ("batch", "length", "embed")), cos, sin, mask, vision)[0]
        return self.norm(x)
