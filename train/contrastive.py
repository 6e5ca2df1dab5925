"""Symmetric InfoNCE (CLIP) loss over the global batch, on one program or with features all-gathered over a mesh.

For normalised image features I and text features T of a batch of N pairs and scale s = exp(min(logit_scale,
ln 100)), loss = mean over valid rows i of (CE(s I_i T^T, i) + CE(s T_i I^T, i)) / 2, with label smoothing as
torch's ``cross_entropy``. The original gathers the features of every rank (``GatherLayer``: all_gather whose
backward sends every rank's gradient back to the rank that owns the feature) and scores its own rows against
all columns; :func:`gathered_clip_loss` does the same inside ``shard_map`` (``all_gather``'s transpose is a
reduce-scatter: every shard's features get the gradients of all rows), so it equals :func:`clip_loss` on the
whole batch. Rows marked invalid (the original's "empty texts") are dropped from the mean (their columns stay).
The temperature is clamped at 100 (logit_scale <= ln 100), CLIP's rule; the gradient past the clamp is 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

MAX_LOGIT_SCALE = math.log(100.0)


def logit_scale_value(logit_scale):
    """exp of the learnable log-scale, clamped at 100 (float32 [])."""
    return jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
    """Per-row CE of float logits [N, C] against int targets [N] with torch's label smoothing -> [N]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    if not label_smoothing:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def _row_losses(image, text, all_image, all_text, scale, targets, label_smoothing):
    """(CE(image rows vs all texts) + CE(text rows vs all images)) / 2 -> [n]."""
    i2t = scale * image @ all_text.T
    t2i = scale * text @ all_image.T
    return (cross_entropy(i2t, targets, label_smoothing) + cross_entropy(t2i, targets, label_smoothing)) / 2


def clip_loss(image, text, logit_scale, valid=None, *, label_smoothing: float = 0.0):
    """The loss on one program: image, text normalised float [N, D]; logit_scale []; valid bool [N] or None.
    Returns float32 []."""
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    n = image.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid
    rows = _row_losses(image, text, image, text, logit_scale_value(logit_scale), jnp.arange(n), label_smoothing)
    return jnp.sum(jnp.where(valid, rows, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def gathered_clip_loss(image, text, logit_scale, valid=None, *, mesh, batch_axes: tuple[str, ...],
                       label_smoothing: float = 0.0):
    """The loss with the batch split over ``batch_axes`` of ``mesh``: each shard scores its rows against the
    features all-gathered from every shard (gradients flow back to every shard); the row losses are summed over
    the mesh and divided by the global count of valid rows. Same arguments and result as :func:`clip_loss`."""
    axes = tuple(batch_axes)
    n = image.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid

    def local(img, txt, scale, ok):
        img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
        all_img = jax.lax.all_gather(img, axes, tiled=True)
        all_txt = jax.lax.all_gather(txt, axes, tiled=True)
        rows = img.shape[0]
        targets = jax.lax.axis_index(axes) * rows + jnp.arange(rows)
        losses = _row_losses(img, txt, all_img, all_txt, logit_scale_value(scale), targets, label_smoothing)
        total = jax.lax.psum(jnp.sum(jnp.where(ok, losses, 0.0)), axes)
        return total / jnp.maximum(jax.lax.psum(jnp.sum(ok), axes), 1)

    spec = P(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), spec), out_specs=P())(image, text, logit_scale,
                                                                                           valid)
