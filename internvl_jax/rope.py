"""Rotary position embeddings: default, linear, dynamic NTK, longrope (Phi-3 "su") and llama3 variants.

All math is float32. Positions may be floats (V2PE). The dynamic and longrope variants depend on the sequence
length, taken per row as ``max(position) + 1``: a row's result never depends on the other rows of the batch,
and unlike the original dynamic NTK nothing persists between calls.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import RopeConfig


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """[dim/2] float32: 1 / theta^(2i/dim), computed in float32 like the reference implementations."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def _llama3_inv_freq(rope: RopeConfig, inv: np.ndarray) -> np.ndarray:
    factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def longrope_attention_factor(rope: RopeConfig, max_position_embeddings: int) -> float:
    """The cos/sin scale of longrope: sqrt(1 + ln(s) / ln(original)) with s = max / original positions."""
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    orig = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def inv_freq_per_row(rope: RopeConfig, dim: int, max_position_embeddings: int, seq_len):
    """Inverse frequencies for each row.

    seq_len: [B] float32 (max position + 1 of each row). Returns [B, dim/2] float32.
    """
    b = seq_len.shape[0]
    inv = base_inv_freq(rope.theta, dim)
    if rope.type == "default":
        return jnp.broadcast_to(inv, (b, dim // 2))
    if rope.type == "linear":
        return jnp.broadcast_to(inv / np.float32(rope.factor or 1.0), (b, dim // 2))
    if rope.type == "llama3":
        return jnp.broadcast_to(_llama3_inv_freq(rope, inv), (b, dim // 2))
    if rope.type == "dynamic":
        factor = rope.factor or 1.0
        length = jnp.maximum(seq_len, float(max_position_embeddings))
        base = rope.theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        exponent = jnp.asarray(np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        return 1.0 / (base[:, None].astype(jnp.float32) ** exponent[None, :])
    if rope.type == "longrope":
        theta_pow = np.float32(rope.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        short = 1.0 / (np.asarray(rope.short_factor, np.float32) * theta_pow)
        long = 1.0 / (np.asarray(rope.long_factor, np.float32) * theta_pow)
        use_long = seq_len > rope.original_max_position_embeddings
        return jnp.where(use_long[:, None], long[None], short[None])
    raise ValueError(f"unsupported rope type {rope.type!r}")


def rope_cos_sin(positions, rope: RopeConfig, dim: int, max_position_embeddings: int):
    """cos, sin tables for ``positions``.

    positions: [B, L] int or float. Returns two float32 arrays [B, L, dim] (halves repeated, rotate-half layout).
    """
    pos = positions.astype(jnp.float32)
    seq_len = jnp.floor(jnp.max(pos, axis=1)) + 1.0
    inv = inv_freq_per_row(rope, dim, max_position_embeddings, seq_len)
    angles = pos[:, :, None] * inv[:, None, :]
    emb = jnp.concatenate([angles, angles], axis=-1)
    scale = longrope_attention_factor(rope, max_position_embeddings) if rope.type == "longrope" else 1.0
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x, cos, sin):
    """Rotate x: [B, L, H, D] with cos/sin [B, L, D] (float32 math, result in x's dtype)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
