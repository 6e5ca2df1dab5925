"""The jitted resize/tile/normalise path against PIL resize + crop + the original normalisation."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from internvl_jax.processing.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize
from internvl_jax.processing.resample import bucket_key, image_tiles, render_image
from internvl_jax.processing.tiling import plan_tiles

TILE = 448
MAX_DIFF = 2 / 255  # before normalisation
MEAN_DIFF = 0.3 / 255


def reference_tiles(image: np.ndarray, plan) -> np.ndarray:
    """The original dynamic_preprocess: PIL bicubic resize of the whole image, row-major crops, thumbnail."""
    im = Image.fromarray(image)
    big = im.resize((TILE * plan.cols, TILE * plan.rows), Image.BICUBIC)
    tiles = [big.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)) for r in range(plan.rows) for c in range(plan.cols)]
    if plan.thumbnail:
        tiles.append(im.resize((TILE, TILE), Image.BICUBIC))
    return np.stack([np.asarray(t) for t in tiles]).astype(np.float64) / 255.0


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """A photo-like picture: gradients, shapes, texture, blur, then JPEG compression."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / (20 + 7 * c) + c) * np.cos(yy / (15 + 5 * c)) for c in range(3)], -1)
    im = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        draw.ellipse((x0, y0, x0 + w // 4, y0 + h // 4), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    im = im.filter(ImageFilter.GaussianBlur(1.2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return np.asarray(Image.open(buf).convert("RGB"))


SIZES = [(800, 600), (1600, 1200), (333, 1000), (100, 50), (2000, 300), (448, 448), (1024, 768), (97, 1311), (640, 480),
         (1920, 1080), (50, 50), (3000, 2000)]


@pytest.mark.parametrize("w,h", SIZES)
def test_tiles_equal_pil_on_photos_and_synthetic_images(w, h):
    plan = plan_tiles(w, h)
    for image in (photo(w, h, seed=w + h), np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)):
        ours = np.asarray(image_tiles(image, plan), np.float64) * IMAGENET_STD + IMAGENET_MEAN
        diff = np.abs(ours - reference_tiles(image, plan))
        assert ours.shape == (plan.num_tiles, TILE, TILE, 3)
        assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max() * 255, diff.mean() * 255)


def test_normalisation_is_the_original():
    tile = np.random.default_rng(0).integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
    plan = plan_tiles(TILE, TILE)
    np.testing.assert_allclose(np.asarray(image_tiles(tile, plan))[0], normalize(tile), atol=1e-5)


def test_random_sizes_compile_once_per_bucket():
    rng = np.random.default_rng(0)
    before = render_image._cache_size()
    keys = set()
    for _ in range(50):
        w, h = (int(v) for v in rng.integers(32, 1500, 2))
        plan = plan_tiles(w, h, max_tiles=6)
        image_tiles(np.zeros((h, w, 3), np.uint8), plan)
        keys.add(bucket_key(h, w, plan))
    assert render_image._cache_size() - before <= len(keys) < 50
