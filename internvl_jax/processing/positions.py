"""V2PE positions (InternVL3's variable visual position encoding, from OpenGVLab/V2PE ``get_rope_pos_id``).

Text tokens advance by 1. The n tokens of one image span advance by ``delta = stride / tokens_per_tile`` each
(token k of the span at ``last + delta * (k + 1)``); after the span, ``last`` becomes the ceiling of the span's
last position, so the next text token sits at ``ceil(...) + 1``. Stride = tokens_per_tile gives plain integer
positions; evaluation uses a fixed stride (64 in the V2PE README); training draws one per image from
``TRAINING_STRIDES``. Released checkpoints were trained without V2PE unless their config says otherwise.
"""

from __future__ import annotations

import math

import numpy as np

TRAINING_STRIDES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def image_spans(input_ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[(start, end)) of every maximal run of ``image_token_id`` in a 1-D id array."""
    is_img = np.concatenate([[False], np.asarray(input_ids) == image_token_id, [False]])
    edges = np.flatnonzero(is_img[1:] != is_img[:-1])
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def v2pe_positions(
    input_ids,
    image_token_id: int,
    stride: float | None = 64,
    *,
    tokens_per_tile: int = 256,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """float32 [L] positions for one row of token ids.

    ``stride``: tokens of position per tile for every image, or None to draw one per image from
    ``TRAINING_STRIDES`` with ``rng`` (training).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 1:
        raise ValueError(f"v2pe_positions takes one row of ids, got shape {ids.shape}")
    if stride is None and rng is None:
        raise ValueError("stride=None (random per image) needs an rng")
    pos = np.empty(len(ids), np.float64)
    last, cursor = -1.0, 0
    for start, end in image_spans(ids, image_token_id):
        n_text = start - cursor
        pos[cursor:start] = last + 1 + np.arange(n_text)
        last += n_text
        s = float(rng.choice(TRAINING_STRIDES)) if stride is None else float(stride)
        delta = s / tokens_per_tile
        pos[start:end] = last + delta * np.arange(1, end - start + 1)
        last, cursor = float(math.ceil(pos[end - 1])), end
    pos[cursor:] = last + 1 + np.arange(len(ids) - cursor)
    return pos.astype(np.float32)
