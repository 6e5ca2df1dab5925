"""Token losses: cross entropy, and the weighted loss of packed rows computed a length chunk at a time.

The training loss of InternVL 2.5+ (``loss_reduction_all_gather``) is ``sum(w * CE) / sum(w)`` over the global
batch, ``w`` the per-token weight of its packed sub-sample (``train.data.packing.loss_weights``). With the
vocabulary of the released models (~152k) the float32 logits of one 16k-token row are 10 GB, and the backward
pass keeps as much again; :func:`weighted_loss_sum` makes the logits of ``chunk`` positions at a time and
recomputes them in the backward pass, so only [B, chunk, V] float32 exists at once.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

IGNORE = -100  # label of tokens that carry no loss (prompt, image, padding), as in the original


def token_cross_entropy(logits, labels):
    """Per-position cross entropy, float32 [B, L]: 0 where the label is ``IGNORE``.

    logits float [B, L, V] (aligned: logits[:, i] predicts labels[:, i]); labels int [B, L].
    """
    valid = labels != IGNORE
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)


def cross_entropy(logits, labels):
    """Mean next-token cross entropy over the tokens whose label is not ``IGNORE``.

    logits float [B, L, V] (already aligned: logits[:, i] predicts labels[:, i]); labels int [B, L].
    Returns a float32 scalar (0 when no token carries a label).
    """
    valid = labels != IGNORE
    return jnp.sum(token_cross_entropy(logits, labels)) / jnp.maximum(jnp.sum(valid), 1)


def token_losses(head: Callable, hidden, labels, *, chunk: int | None = 1024):
    """Per-position cross entropy float32 [B, L] (0 where the label is ``IGNORE``) of the logits ``head(hidden)``,
    made ``chunk`` positions at a time.

    head: hidden [B, c, E] -> float32 logits [B, c, V]; hidden [B, L, E]; labels int [B, L] (aligned). Each chunk's
    logits are recomputed in the backward pass (``jax.checkpoint``), so at most [B, chunk, V] float32 logits live at
    once. ``chunk`` None or >= L: one piece. L is padded up to a multiple of ``chunk`` (and cut back after).
    """
    b, length, e = hidden.shape
    if chunk is None or chunk >= length:
        return token_cross_entropy(head(hidden), labels)
    n = math.ceil(length / chunk)
    pad = n * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE)
    # [n, B, chunk, ...]: the scan walks the length; rows stay where the batch sharding put them
    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def piece(_, xs):
        h, y = xs
        return None, token_cross_entropy(head(h), y)

    _, ce = jax.lax.scan(piece, None, (split(hidden), split(labels)))
    return jnp.moveaxis(ce, 0, 1).reshape(b, n * chunk)[:, :length]


def weighted_loss_sum(head: Callable, hidden, labels, weights, *, chunk: int | None = 1024):
    """``sum(weights * CE)`` (float32 scalar) of the logits ``head(hidden)``, made ``chunk`` positions at a time
    (:func:`token_losses`). weights float [B, L] (counted only where the label is not ``IGNORE``)."""
    weights = jnp.where(labels == IGNORE, 0.0, weights.astype(jnp.float32))
    return jnp.sum(weights * token_losses(head, hidden, labels, chunk=chunk))
