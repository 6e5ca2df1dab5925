"""InternVL: InternViT -> pixel shuffle -> projector, merged into the decoder's embeddings at IMG_CONTEXT tokens.

All shapes are static: every tile slot of ``pixel_values [B, T, H, W, 3]`` goes through the ViT, and
``tile_mask [B, T]`` says which slots are real. The IMG_CONTEXT positions of row b are filled, in order, from the
valid tiles of row b (``tokens_per_tile`` features each) with a cumulative-count gather and a ``where``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from .config import InternVLConfig
from .decoder import Decoder
from .layers import as_dtype
from .projector import Projector, pixel_shuffle
from .vision import InternViT


class ImageTokenMismatch(ValueError):
    """The IMG_CONTEXT tokens of a row do not match its valid tiles."""


def check_image_tokens(input_ids, tile_mask, image_token_id: int, tokens_per_tile: int) -> None:
    """Host-side check: every row has exactly ``tokens_per_tile`` x (valid tiles) IMG_CONTEXT tokens.

    input_ids: int [B, L]; tile_mask: bool [B, T] or None (no images). Raises :class:`ImageTokenMismatch`.
    """
    ids = np.asarray(input_ids)
    counts = (ids == image_token_id).sum(axis=1)
    tiles = np.zeros(ids.shape[0], np.int64) if tile_mask is None else np.asarray(tile_mask).sum(axis=1)
    bad = np.nonzero(counts != tiles * tokens_per_tile)[0]
    if bad.size:
        b = int(bad[0])
        raise ImageTokenMismatch(
            f"row {b} has {int(counts[b])} IMG_CONTEXT tokens (id {image_token_id}) but {int(tiles[b])} valid "
            f"tiles x {tokens_per_tile} tokens = {int(tiles[b]) * tokens_per_tile}"
            + (f" ({bad.size} rows mismatch)" if bad.size > 1 else "")
        )


def merge_image_features(embeds, is_image, features, tile_mask, image_index=None):
    """Put image features into the text embeddings.

    embeds: [B, L, E]; is_image: bool [B, L]; features: [B, T, n, E] (n tokens per tile); tile_mask: bool [B, T].
    The k-th image token of row b receives feature (k mod n) of the (k div n)-th valid tile of row b; k counts the
    row's image tokens, or is ``image_index`` int [B, L] where given (two sequences of a preference pair then read
    the same tiles: the vision tower runs once for both).
    Returns [B, L, E].
    """
    b, t, n, e = features.shape
    k = jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1 if image_index is None else image_index
    # slots of the valid tiles first, in their original order
    valid_slots = jnp.argsort(~tile_mask, axis=1, stable=True)
    slot = jnp.take_along_axis(valid_slots, jnp.clip(k // n, 0, t - 1), axis=1)
    flat = jnp.clip(slot * n + k % n, 0, t * n - 1)
    gathered = jnp.take_along_axis(features.reshape(b, t * n, e), flat[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class InternVL(nn.Module):
    """The InternVL chat model. ``apply`` returns float32 logits [B, L, V].

    ``unrolled``: the decoder's generation layout (KV cache; params from
    :func:`internvl_jax.generate.unrolled_params`), see :class:`~internvl_jax.decoder.Decoder`.
    """

    config: InternVLConfig
    unrolled: bool = False

    def setup(self):
        c = self.config
        kw = dict(dtype=as_dtype(c.dtype), param_dtype=as_dtype(c.param_dtype))
        stack = dict(remat=c.remat, attention_impl=c.attention_impl, scan_unroll=c.scan_unroll)
        self.vision = InternViT(c.vision, layers_used=c.vision_layers_used, lora=c.lora, **stack, **kw)
        self.projector = Projector(c.text.hidden_size, lora=c.lora, **kw)
        self.language_model = Decoder(c.text, unrolled=self.unrolled, lora=c.lora, **stack, **kw)

    def encode_images(self, tiles, valid=None):
        """tiles [N, H, W, 3] -> [N, tokens_per_tile, E] LLM-space features; valid: bool [N] or None, False for
        empty tile slots, whose features are not used (the ViT may skip their attention). Tiles are normalised
        floats, or uint8 levels (the training pipeline's), which the ViT's embedding normalises."""
        c = self.config
        h = self.vision(tiles, valid)[:, 1:]  # drop the class token
        n, p, width = h.shape
        gh, gw = tiles.shape[1] // c.vision.patch_size, tiles.shape[2] // c.vision.patch_size
        h = pixel_shuffle(h.reshape(n, gh, gw, width), c.downsample_ratio, c.ps_version)
        return self.projector(h.reshape(n, -1, h.shape[-1]))

    def __call__(self, input_ids, pixel_values=None, tile_mask=None, positions=None, segment_ids=None, cache=None,
                 cache_index=None, cache_start=None, last_only: bool = False, return_hidden: bool = False,
                 image_index=None):
        """input_ids int [B, L]; pixel_values [B, T, H, W, 3] (normalised, or uint8 levels); tile_mask bool [B, T]
        (default: all valid); positions [B, L] int or float (V2PE); segment_ids int [B, L] (0 = padding, packed
        samples differ).
        ``last_only``: logits of the last position only. With a KV ``cache`` (generation, ``unrolled``), returns
        (logits, cache); see :class:`~internvl_jax.decoder.Decoder`. ``return_hidden``: the final-norm hidden
        states [B, L, E] instead of logits (:meth:`head` makes logits of any piece of them). ``image_index``: int
        [B, L], which image token's feature each IMG_CONTEXT position takes (:func:`merge_image_features`)."""
        c = self.config
        if pixel_values is not None and tile_mask is None:
            tile_mask = jnp.ones(pixel_values.shape[:2], bool)
        concrete = not isinstance(input_ids, jax.core.Tracer) and not isinstance(tile_mask, jax.core.Tracer)
        if image_index is None and concrete:  # an image_index maps tokens to tiles itself (preference rows)
            check_image_tokens(input_ids, tile_mask, c.image_token_id, c.tokens_per_tile)
        x = self.language_model.embed(input_ids)
        if pixel_values is not None:
            b, t = pixel_values.shape[:2]
            feats = self.encode_images(pixel_values.reshape(b * t, *pixel_values.shape[2:]), tile_mask.reshape(b * t))
            feats = feats.reshape(b, t, *feats.shape[1:])
            x = merge_image_features(x, input_ids == c.image_token_id, feats, tile_mask, image_index)
        return self.language_model(
            embeddings=x, positions=positions, segment_ids=segment_ids, cache=cache, cache_index=cache_index,
            cache_start=cache_start, last_only=last_only, return_hidden=return_hidden,
        )

    def head(self, hidden):
        """Final-norm hidden states [..., E] -> float32 logits [..., V]."""
        return self.language_model.head(hidden)


def _dummy_inputs(config: InternVLConfig):
    """One text token and one (masked-out) tile: enough to create every parameter."""
    size = config.image_size
    return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, size, size, 3), as_dtype(config.dtype)), jnp.zeros((1, 1), bool)


def init_params(config: InternVLConfig, rng) -> dict:
    """Randomly initialised params (plain nested dicts, logical-axis boxes removed)."""
    return nn.unbox(InternVL(config).init(rng, *_dummy_inputs(config))["params"])


def abstract_params(config: InternVLConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the params without allocating them (``jax.eval_shape``).

    With ``boxed``, leaves stay ``nn.LogicallyPartitioned`` so their logical axis names can be read.
    """
    tree = jax.eval_shape(lambda: InternVL(config).init(jax.random.PRNGKey(0), *_dummy_inputs(config)))["params"]
    return tree if boxed else nn.unbox(tree)


def param_count(config: InternVLConfig) -> int:
    """Exact number of parameters, computed with ``jax.eval_shape`` (nothing is allocated)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params(config)))
