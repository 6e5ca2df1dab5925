"""The host tiling (pil_tiles: the original's own PIL calls) and the jitted resize/tile/normalise path against PIL
resize + crop + the original normalisation."""

import numpy as np
import pytest
from PIL import Image

import jax

from internvl_jax.processing.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize, normalize_levels
from internvl_jax.processing.resample import bucket_key, image_tiles, render_image
from internvl_jax.processing.tiling import pil_tiles, plan_tiles
from internvl_jax.samples import photo_like

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


SIZES = [(800, 600), (1600, 1200), (333, 1000), (100, 50), (2000, 300), (448, 448), (1024, 768), (97, 1311), (640, 480),
         (1920, 1080), (50, 50), (3000, 2000)]


@pytest.mark.parametrize("w,h", SIZES)
def test_tiles_equal_pil_on_photos_and_synthetic_images(w, h):
    plan = plan_tiles(w, h)
    for image in (photo_like(w, h, seed=w + h), np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)):
        ours = np.asarray(image_tiles(image, plan), np.float64) * IMAGENET_STD + IMAGENET_MEAN
        diff = np.abs(ours - reference_tiles(image, plan))
        assert ours.shape == (plan.num_tiles, TILE, TILE, 3)
        assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max() * 255, diff.mean() * 255)


@pytest.mark.parametrize("w,h", SIZES[:6])
def test_pil_tiles_are_the_originals_crops_bit_for_bit(w, h):
    """pil_tiles (the training pipeline's and the default Processor's tiling) is the original dynamic_preprocess
    exactly: uint8 tiles equal to the crops of the resized image and the thumbnail; a non-RGB image is converted."""
    plan = plan_tiles(w, h)
    image = photo_like(w, h, seed=w * h)
    tiles = pil_tiles(Image.fromarray(image), plan)
    assert tiles.dtype == np.uint8 and tiles.shape == (plan.num_tiles, TILE, TILE, 3)
    np.testing.assert_array_equal(tiles, np.rint(reference_tiles(image, plan) * 255).astype(np.uint8))
    rgba = Image.fromarray(image).convert("RGBA")
    np.testing.assert_array_equal(pil_tiles(rgba, plan), tiles)


def test_normalize_is_the_formula_bit_for_bit():
    """normalize equals torchvision's ToTensor + Normalize order, (x / 255 - mean) / std in float32, for every level
    of every channel, on tiles (contiguous or a strided view) and on a single pixel, and leaves its input alone."""
    formula = lambda x: (x.astype(np.float32) / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD  # noqa: E731
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # [256, 3]: every level per channel
    tiles = np.random.default_rng(0).integers(0, 256, (2, 28, 30, 3), dtype=np.uint8)
    for x in (levels, tiles, tiles.swapaxes(1, 2), levels[7], levels.astype(np.float32)):  # a strided view too
        kept = x.copy()
        out = normalize(x)
        assert out.dtype == np.float32 and out.shape == x.shape
        np.testing.assert_array_equal(out, formula(x))
        np.testing.assert_array_equal(x, kept)


DEVICE_TOL = 1e-6  # normalize_levels: XLA multiplies by reciprocals where normalize divides (values up to 2.7)


def test_normalize_levels_on_the_device_is_normalize_within_a_last_bit():
    """The model's normalisation of uint8 tiles (jitted) against the host's, for every level of every channel."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    out = np.asarray(jax.jit(normalize_levels)(levels))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, normalize(levels), rtol=0, atol=DEVICE_TOL)


def test_normalisation_is_the_original():
    tile = np.random.default_rng(0).integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
    plan = plan_tiles(TILE, TILE)
    np.testing.assert_allclose(np.asarray(image_tiles(tile, plan))[0], normalize(tile), atol=1e-5)


def test_random_sizes_compile_once_per_bucket():
    rng = np.random.default_rng(0)
    before = render_image._cache_size()
    keys = set()
    for _ in range(24):
        w, h = (int(v) for v in rng.integers(32, 520, 2))
        plan = plan_tiles(w, h, max_tiles=6)
        image_tiles(np.zeros((h, w, 3), np.uint8), plan)
        keys.add(bucket_key(h, w, plan))
    assert render_image._cache_size() - before <= len(keys) < 24
