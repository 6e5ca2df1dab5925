"""InternViT (300M and 6B variants) as a scanned stack of pre-norm blocks with LayerScale.

Input tiles are NHWC. Drop path is active only when a ``dropout`` rng is given to ``apply`` (training); inference
never drops, whatever the config's rate.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from .config import VisionConfig
from .attention import attend
from .layers import Dense, Norm, constrain, param_with_axes, resolve_attention_impl, scan_layers
from .processing.pixels import normalize_levels

_CUBIC_A = -0.75  # torch's bicubic kernel constant


@lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix of torch's bicubic resize (align_corners=False, no antialias).

    Source coordinate of output i is (i + 0.5) * in/out - 0.5 (not clamped, as torch does for cubic); four taps
    with the A = -0.75 kernel, indices clamped to the border. At in == out it is the identity.
    """
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    a = _CUBIC_A
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        t = src - base
        for off, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[i, min(max(base + off, 0), in_size - 1)] += w
    return m.astype(np.float32)


def resize_position_embedding(pos, out_h: int, out_w: int):
    """Bicubic resize of square-grid patch position embeddings, in float32.

    pos: [g*g, C] -> [out_h*out_w, C] (row-major grid).
    """
    g = int(round(pos.shape[0] ** 0.5))
    grid = pos.astype(jnp.float32).reshape(g, g, -1)
    if (out_h, out_w) == (g, g):
        return grid.reshape(g * g, -1)
    mh, mw = bicubic_matrix(g, out_h), bicubic_matrix(g, out_w)
    hp = jax.lax.Precision.HIGHEST
    out = jnp.einsum("hi,ijc->hjc", mh, grid, precision=hp)
    out = jnp.einsum("wj,hjc->hwc", mw, out, precision=hp)
    return out.reshape(out_h * out_w, -1)


class VisionEmbeddings(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixels):
        """pixels [N, H, W, 3] (normalised floats, or uint8 levels: normalised here, so that the host sends a
        quarter of float32's bytes) -> [N, 1 + (H/p)*(W/p), C]: class token, then patches row-major."""
        c, p = self.cfg, self.cfg.patch_size
        n, h, w, ch = pixels.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        kernel = self.param(
            "patch_kernel",
            param_with_axes(nn.initializers.normal(0.02), (None, None, None, "vit_embed")),
            (p, p, ch, c.hidden_size),
            self.param_dtype,
        )
        bias = self.param("patch_bias", param_with_axes(nn.initializers.zeros, ("vit_embed",)), (c.hidden_size,), self.param_dtype)
        # unit normal, as the original's torch.randn: from scratch, every patch position starts distinguishable
        cls = self.param("cls_token", param_with_axes(nn.initializers.normal(1.0), (None, None, "vit_embed")), (1, 1, c.hidden_size), self.param_dtype)
        pos = self.param(
            "pos_embed",
            param_with_axes(nn.initializers.normal(1.0), (None, None, "vit_embed")),
            (1, c.grid * c.grid + 1, c.hidden_size),
            self.param_dtype,
        )
        if pixels.dtype == jnp.uint8:
            pixels = normalize_levels(pixels)
        # a stride-p p x p convolution is a matmul over non-overlapping patches
        patches = pixels.astype(self.dtype).reshape(n, gh, p, gw, p, ch)
        x = jnp.einsum("nhpwqc,pqcd->nhwd", patches, kernel.astype(self.dtype)) + bias.astype(self.dtype)
        x = x.reshape(n, gh * gw, c.hidden_size)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c.hidden_size)), x], axis=1)
        pos_patches = resize_position_embedding(pos[0, 1:], gh, gw)
        pos_all = jnp.concatenate([pos[0, :1].astype(jnp.float32), pos_patches], axis=0)
        return x + pos_all.astype(self.dtype)[None]


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    impl: str = "batched"
    lora: tuple = ()  # LoRA rule table (internvl_jax.lora)

    @nn.compact
    def __call__(self, x, valid=None):
        """x [N, S, C]; valid: bool [N] or None, False for an empty tile slot (see :func:`attend`'s batch_valid)."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = dict(lora=self.lora, **kw)
        qkv = Dense((3, c.num_heads, c.head_dim), ("vit_embed",), (None, "vit_heads", "head_dim"), c.qkv_bias, name="qkv", **dense)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if c.qk_norm:  # RMSNorm over the full width, before the head split
            full = lambda t, name: Norm("rms_norm", c.norm_eps, "vit_embed", name=name, **kw)(  # noqa: E731
                t.reshape(*t.shape[:2], -1)
            ).reshape(t.shape)
            q, k = full(q, "q_norm"), full(k, "k_norm")
        out = attend(q, k, v, scale=c.head_dim**-0.5, causal=False, impl=self.impl, head_axes=("vit_heads",) * 2,
                     batch_valid=valid)
        return Dense((c.hidden_size,), ("vit_heads", "head_dim"), ("vit_embed",), True, name="proj", **dense)(out)


class VisionLayer(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str = "batched"
    lora: tuple = ()

    @nn.compact
    def __call__(self, x, layer_xs, valid=None):
        """x [N, S, C]; layer_xs = (drop-path rate, active): an inactive layer (past select_layer) is skipped;
        valid: bool [N] or None (empty tile slots, see :class:`VisionAttention`)."""
        rate, active = layer_xs
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ls_init = nn.initializers.constant(c.layer_scale_init)
        ls1 = self.param("ls1", param_with_axes(ls_init, ("vit_embed",)), (c.hidden_size,), self.param_dtype)
        ls2 = self.param("ls2", param_with_axes(ls_init, ("vit_embed",)), (c.hidden_size,), self.param_dtype)
        h = VisionAttention(c, name="attn", impl=self.attention_impl, lora=self.lora, **kw)(
            Norm(c.norm_type, c.norm_eps, "vit_embed", name="norm1", **kw)(x), valid)
        y = x + self._drop_path(ls1.astype(self.dtype) * h, rate)
        h = Norm(c.norm_type, c.norm_eps, "vit_embed", name="norm2", **kw)(y)
        h = Dense((c.intermediate_size,), ("vit_embed",), ("vit_mlp",), True, name="fc1", lora=self.lora, **kw)(h)
        h = Dense((c.hidden_size,), ("vit_mlp",), ("vit_embed",), True, name="fc2", lora=self.lora, **kw)(jax.nn.gelu(h, approximate=False))
        y = y + self._drop_path(ls2.astype(self.dtype) * h, rate)
        return constrain(jnp.where(active, y, x), ("batch", "length", "vit_embed")), None

    def _drop_path(self, h, rate):
        """Stochastic depth per sample (timm semantics: survivors scaled by 1/keep); only with a dropout rng."""
        if self.cfg.drop_path_rate == 0 or not self.has_rng("dropout"):
            return h
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (h.shape[0],) + (1,) * (h.ndim - 1))
        return jnp.where(mask, h / keep, 0).astype(h.dtype)


class InternViT(nn.Module):
    """pixels [N, H, W, 3] (normalised) -> hidden states [N, 1 + patches, C] after ``layers_used`` layers.

    All layers are scanned; with ``layers_used`` below the depth (select_layer != -1, e.g. InternVL 1.0 style
    feature taps) the later layers' results are discarded, so the scan keeps one static program.
    """

    cfg: VisionConfig
    layers_used: int | None = None  # None = all (select_layer = -1)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str = "auto"  # see layers.resolve_attention_impl
    scan_unroll: int = 1  # layers per scan iteration (layers.scan_layers)
    lora: tuple = ()  # LoRA rule table (internvl_jax.lora)

    @nn.compact
    def __call__(self, pixels, valid=None):
        """pixels [N, H, W, 3]; valid: bool [N] or None, False for an empty tile slot, whose attention a backend
        that can skip it skips (its hidden states are then not those of its pixels: callers drop them)."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VisionEmbeddings(c, name="embeddings", **kw)(pixels)
        used = c.num_layers if self.layers_used is None else self.layers_used
        rates = jnp.linspace(0.0, c.drop_path_rate, c.num_layers, dtype=jnp.float32)
        active = jnp.arange(c.num_layers) < used
        stack = scan_layers(VisionLayer, length=c.num_layers, remat=self.remat, in_axes=(0, nn.broadcast),
                            unroll=self.scan_unroll)
        impl = resolve_attention_impl(self.attention_impl)
        x, _ = stack(c, name="layers", attention_impl=impl, lora=self.lora, **kw)(x, (rates, active), valid)
        return x
