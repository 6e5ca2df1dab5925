"""PIL-exact bicubic resize, tiling and normalisation on the device (jitted, bucketed shapes).

PIL resizes an 8-bit image in two separable passes (order: :func:`vertical_first`), each output pixel a weighted
sum of a window of inputs (bicubic a = -0.5, the window widened by the downscale factor: antialiasing), weights
normalised to sum 1 and rounded to 22-bit fixed point, the result rounded and clipped to uint8 after each pass.
:func:`pil_bicubic_matrix` builds those weights exactly (host side, numpy). On the device each pass is banded:
every band of (up to) 32 outputs reads one contiguous input window, a small matmul, so the work stays proportional to
the image rather than to image x output. The result equals PIL up to rare off-by-one float rounding.

Shapes are bucketed (image sides to powers of two, grid rows and columns to 1, 2, 3, 4, 6, 8, 12, ...; band windows
follow from those),
so any image reuses a small, bounded set of compiled programs.
"""

from __future__ import annotations

from functools import lru_cache, partial

import PIL

import jax
import jax.numpy as jnp
import numpy as np

from .pixels import normalize_levels
from .tiling import TilePlan

_PRECISION_BITS = 22  # PIL's fixed point for 8-bit resampling: 32 - 8 - 2
_A = -0.5  # PIL's bicubic kernel constant
_SUPPORT = 2.0
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=256)
def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 weights of PIL's ``Image.resize(..., BICUBIC)`` along one axis.

    Output i is centred at (i + 0.5) * in/out; its window is [int(centre - support + 0.5), int(centre + support
    + 0.5)) clipped to the image, support = 2 * max(in/out, 1); weights bicubic((x - centre + 0.5) / max(in/out, 1))
    normalised to sum 1, then rounded to PIL's 22-bit fixed point (half away from zero).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    centre = (np.arange(out_size) + 0.5) * scale
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward zero
    hi = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    x = lo[:, None] + np.arange(int(np.max(hi - lo)))[None]  # [out, widest window]
    inside = x < hi[:, None]
    w = np.where(inside, _bicubic((x - centre[:, None] + 0.5) / filterscale), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=w, where=total != 0.0)
    fixed = np.trunc(w * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], x.shape)
    m[rows[inside], x[inside]] = fixed[inside] / (1 << _PRECISION_BITS)
    return m


def vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pass order of the installed Pillow: since 13.0 the vertical pass runs first when the height shrinks by
    more than twice as many pixels as the width; earlier releases always run the horizontal pass first."""
    if _PILLOW_MAJOR < 13:
        return False
    return (in_h - out_h) > 0 and (in_h - out_h) > 2 * (in_w - out_w)


def bucket_side(n: int) -> int:
    """Round an image side up to a multiple of 256 (of 512 beyond 2048): little padding, few buckets."""
    step = 256 if n <= 2048 else 512
    return max(step, -(-n // step) * step)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


_GRID_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _grid_bucket(n: int) -> int:
    """Tile rows / columns padded to 1, 2, 3, 4, 6, 8, 12, ... (few programs, little wasted work)."""
    return next((b for b in _GRID_BUCKETS if b >= n), _pow2(n))


_MAX_BLOCK = 32  # outputs per band: each band of outputs reads one contiguous window of inputs


def band_size(tile: int) -> int:
    """Outputs per band: the largest divisor of the tile size up to 32 (32 for 448)."""
    return max(d for d in range(1, _MAX_BLOCK + 1) if tile % d == 0)


def _band_spans(m: np.ndarray, block: int) -> list[tuple[int, int]]:
    """[lo, hi) of the input columns each band of ``block`` output rows of ``m`` reads."""
    spans = []
    for b in range(m.shape[0] // block):
        cols = np.flatnonzero(np.any(m[b * block : (b + 1) * block] != 0, axis=0))
        spans.append((int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, 1))
    return spans


def band_window(in_bucket: int, out_size: int, block: int) -> int:
    """Input window of a band, for any image side up to ``in_bucket`` resized to ``out_size``: the widest band
    ((block - 1) * scale + 2 * support + 1 inputs), rounded up to a multiple of 8 and capped at the bucket."""
    scale = in_bucket / out_size
    span = (block - 1) * scale + 4 * max(scale, 1.0) + 2
    return min(-(-int(np.ceil(span)) // 8) * 8, in_bucket)


def axis_bands(m: np.ndarray, n: int, tile: int, in_bucket: int):
    """The bands of the ``n`` tiles along one axis of a [n*tile, in] resampling matrix.

    Returns (starts int32 [n, nb], weights float32 [n, nb, block, window]) with the bucket's window
    (:func:`band_window`); inputs past the real image get zero weight.
    """
    block = band_size(tile)
    window = band_window(in_bucket, m.shape[0], block)
    padded = np.zeros((m.shape[0], in_bucket))
    padded[:, : m.shape[1]] = m
    starts = np.array(
        [[min(lo, in_bucket - window) for lo, _ in _band_spans(padded[i * tile : (i + 1) * tile], block)] for i in range(n)],
        np.int32,
    )
    weights = np.stack([
        np.stack([padded[i * tile + b * block : i * tile + (b + 1) * block, s : s + window] for b, s in enumerate(row)])
        for i, row in enumerate(starts)
    ])
    return starts, weights.astype(np.float32)


def _band_pass(x, starts, weights, axis: int):
    """Resample channel-first ``x`` [3, H, W] along ``axis`` (1 = rows, 2 = columns) with banded weights
    (starts [nb], weights [nb, B, win]); each band is one plain matmul over a contiguous window."""
    hp = jax.lax.Precision.HIGHEST
    win = weights.shape[-1]
    bands = []
    for b in range(weights.shape[0]):
        window = jax.lax.dynamic_slice_in_dim(x, starts[b], win, axis=axis)
        if axis == 2:
            bands.append(jnp.einsum("chw,ow->cho", window, weights[b], precision=hp))
        else:
            bands.append(jnp.einsum("chw,oh->cow", window, weights[b], precision=hp))
    out = jnp.concatenate(bands, axis=axis)
    return jnp.clip(jnp.floor(out + 0.5), 0.0, 255.0)  # PIL rounds to uint8 after each pass


def _resize_tiles(x, v_starts, v_weights, h_starts, h_weights, vertical_first: bool):
    """One PIL resize of channel-first x [3, Hb, Wb] into R x C tiles: [R, C, 3, t, t] (uint8 values as floats)."""
    rows = lambda y: jax.vmap(lambda s, w: _band_pass(y, s, w, 1))(v_starts, v_weights)  # noqa: E731
    cols = lambda y: jax.vmap(lambda s, w: _band_pass(y, s, w, 2))(h_starts, h_weights)  # noqa: E731
    if vertical_first:
        return jax.vmap(cols)(rows(x))
    return jax.vmap(rows, out_axes=1)(cols(x))


@partial(jax.jit, static_argnames=("grid", "orders"))
def render_image(image, grid_bands, thumb_bands, *, grid: tuple[int, int], orders: tuple[bool, bool]):
    """All tiles of one image in one program: the grid resize cut into tiles, then the thumbnail resize.

    image uint8 [Hb, Wb, 3] (zero padded); grid_bands / thumb_bands: (v_starts, v_weights, h_starts, h_weights)
    of :func:`axis_bands` (thumb_bands None without a thumbnail); grid: the real (rows, cols) inside the bucketed
    bands; orders: vertical-first flags of the two resizes. Returns float32 [rows*cols (+1), t, t, 3], normalised.
    """
    x = jnp.moveaxis(image.astype(jnp.float32), -1, 0)  # [3, Hb, Wb]: passes contract contiguous axes
    rows, cols = grid
    tiles = _resize_tiles(x, *grid_bands, orders[0])[:rows, :cols]
    tiles = tiles.reshape(-1, *tiles.shape[2:])
    if thumb_bands is not None:
        tiles = jnp.concatenate([tiles, _resize_tiles(x, *thumb_bands, orders[1])[0]])
    tiles = jnp.moveaxis(tiles, 1, -1)  # [n, t, t, 3]
    return normalize_levels(tiles)


def _pad_first_axis(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.repeat(a[:1], n - len(a), axis=0)]) if n > len(a) else a


def _bands(h: int, w: int, out_h: int, out_w: int, rows: int, cols: int, tile: int):
    """Banded weights of one resize of an (h, w) image to (out_h, out_w), rows and columns padded to buckets."""
    hb, wb = bucket_side(h), bucket_side(w)
    v_starts, v_weights = axis_bands(pil_bicubic_matrix(h, out_h), rows, tile, hb)
    h_starts, h_weights = axis_bands(pil_bicubic_matrix(w, out_w), cols, tile, wb)
    r, c = _grid_bucket(rows), _grid_bucket(cols)
    return (_pad_first_axis(v_starts, r), _pad_first_axis(v_weights, r),
            _pad_first_axis(h_starts, c), _pad_first_axis(h_weights, c))


def _orders(h: int, w: int, plan: TilePlan, tile: int) -> tuple[bool, bool]:
    return vertical_first(w, h, tile * plan.cols, tile * plan.rows), vertical_first(w, h, tile, tile)


def bucket_key(height: int, width: int, plan: TilePlan, tile: int = 448) -> tuple:
    """What selects the compiled program for an image: side buckets, the grid, the thumbnail, the pass orders."""
    return (bucket_side(height), bucket_side(width), plan.rows, plan.cols, plan.thumbnail, _orders(height, width, plan, tile), tile)


def image_tiles(image: np.ndarray, plan: TilePlan, tile: int = 448):
    """uint8 RGB [H, W, 3] -> float32 [plan.num_tiles, tile, tile, 3] normalised tiles (row-major, thumbnail last),
    pixel-equal to PIL's resize + crop up to rare off-by-one rounding."""
    h, w = image.shape[:2]
    padded = np.zeros((bucket_side(h), bucket_side(w), 3), np.uint8)
    padded[:h, :w] = image
    out_h, out_w = tile * plan.rows, tile * plan.cols
    grid_bands = _bands(h, w, out_h, out_w, plan.rows, plan.cols, tile)
    thumb_bands = _bands(h, w, tile, tile, 1, 1, tile) if plan.thumbnail else None
    return render_image(padded, grid_bands, thumb_bands, grid=(plan.rows, plan.cols), orders=_orders(h, w, plan, tile))
