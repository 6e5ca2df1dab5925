"""Attention pooling (InternVL 1.0's ``clip_projector`` / ``clip_projector2``): a token sequence -> one vector.

One query, the mean of all tokens (class token or all queries included); separate LayerNorms (eps 1e-5) on the
query, key and value inputs; bias-free q/k/v kernels with their own bias vectors; multi-head softmax attention
with scale head_dim^-0.5; an output projection with bias to the embedding width.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from .layers import Dense, Norm, attention


class AttentionPooling(nn.Module):
    """x [B, N, C] -> [B, out_dim]. ``axis``: the logical name of C (``vit_embed`` or ``embed``)."""

    out_dim: int
    num_heads: int
    axis: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        hd = c // self.num_heads
        heads = "vit_heads" if self.axis == "vit_embed" else "heads"
        query = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(self.dtype)
        proj = lambda name, t: Dense((self.num_heads, hd), (self.axis,), (heads, "head_dim"), True,  # noqa: E731
                                     name=name, **kw)(Norm("layer_norm", 1e-5, self.axis, name=f"norm_{name}", **kw)(t))
        q, k, v = proj("q", query), proj("k", x), proj("v", x)
        out = attention(q, k, v, None, scale=hd**-0.5)  # [B, 1, H, D]
        return Dense((self.out_dim,), (heads, "head_dim"), (None,), True, name="proj", **kw)(out)[:, 0]
