"""Token losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100  # label of tokens that carry no loss (prompt, image, padding), as in the original


def cross_entropy(logits, labels):
    """Mean next-token cross entropy over the tokens whose label is not ``IGNORE``.

    logits float [B, L, V] (already aligned: logits[:, i] predicts labels[:, i]); labels int [B, L].
    Returns a float32 scalar (0 when no token carries a label).
    """
    valid = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
