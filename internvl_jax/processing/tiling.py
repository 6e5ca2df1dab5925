"""Dynamic-resolution tile planning (host side, exact): the grid of 448 px tiles an image is cut into, and the
original's own PIL tiling of an image by that plan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, in the original's visiting order.

    The original collects the grids in a Python set and sorts them by area (a stable sort), so grids of equal
    area keep the set's iteration order. Building the same set the same way reproduces that order exactly
    (tuple hashes of small ints do not depend on the process).
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to the image's.

    Candidates are visited in :func:`candidate_grids` order, starting from (1, 1) with an infinite difference;
    a strictly smaller difference wins; on an exact tie the later candidate wins only if the image area exceeds
    half the candidate's tiled area (width*height > 0.5 * tile_size^2 * cols * rows).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class TilePlan:
    """How one image becomes tiles: a (cols, rows) grid, row-major, plus a thumbnail of the whole image."""

    width: int
    height: int
    cols: int
    rows: int
    thumbnail: bool

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows + int(self.thumbnail)


def plan_tiles(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    tile_size: int = 448,
    use_thumbnail: bool = True,
    dynamic: bool = True,
) -> TilePlan:
    """The tiles of one image: the chosen grid, and a thumbnail when thumbnails are on and the grid has > 1 tile.

    ``dynamic=False`` gives one tile of the whole image (videos, single-tile models).
    """
    cols, rows = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size) if dynamic else (1, 1)
    return TilePlan(width, height, cols, rows, use_thumbnail and cols * rows > 1)


def pil_tiles(image: Image.Image, plan: TilePlan, tile: int = 448) -> np.ndarray:
    """The original's ``dynamic_preprocess`` on the host: uint8 [plan.num_tiles, tile, tile, 3], row-major tiles
    cropped from the image resized (PIL bicubic) to the grid, then the thumbnail (the whole image resized to one
    tile). The reference itself, in ~2.5x less CPU time than the jitted path of ``resample.image_tiles`` on a CPU
    (which uses the device and returns normalised floats): the training pipeline's path, where host CPU time is
    what competes with the step."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    grid = np.asarray(image.resize((tile * plan.cols, tile * plan.rows), Image.Resampling.BICUBIC))
    tiles = grid.reshape(plan.rows, tile, plan.cols, tile, 3).swapaxes(1, 2).reshape(-1, tile, tile, 3)
    if plan.thumbnail:
        thumb = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC))
        tiles = np.concatenate([tiles, thumb[None]])
    return tiles
