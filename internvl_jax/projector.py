"""Pixel shuffle (v1 and v2) and the MLP projector ``mlp1`` from ViT features to LLM embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .layers import Dense, Norm


def pixel_shuffle(x, ratio: float = 0.5, version: str = "v2"):
    """Merge each s x s block of patch features into one token (s = 1/ratio).

    x: [N, h, w, C] -> [N, h/s, w/s, s*s*C]. Token (i, j) carries the channels of input positions
    (s*i + a, s*j + b) for a, then b, in row-major order: for s = 2, (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1).
    Version v1 (Chat-V1-2) emits the same tokens with the grid transposed: [N, w/s, h/s, s*s*C], token (j, i).
    """
    s = int(round(1 / ratio))
    n, h, w, c = x.shape
    if h % s or w % s:
        raise ValueError(f"patch grid {h}x{w} is not divisible by the pixel-shuffle factor {s}")
    y = x.reshape(n, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // s, w // s, s * s * c)
    if version == "v1":
        return y.transpose(0, 2, 1, 3)
    if version != "v2":
        raise ValueError(f"unknown pixel-shuffle version {version!r}")
    return y


class Projector(nn.Module):
    """LayerNorm(4C, eps 1e-5) -> Linear(4C, D) -> exact GELU -> Linear(D, D), all with biases."""

    out_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: tuple = ()  # LoRA rule table (internvl_jax.lora)

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Norm("layer_norm", 1e-5, "vit_shuffled", name="norm", **kw)(x)
        x = Dense((self.out_dim,), ("vit_shuffled",), ("proj_hidden",), True, name="fc1", lora=self.lora, **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return Dense((self.out_dim,), ("proj_hidden",), ("embed",), True, name="fc2", lora=self.lora, **kw)(x)
