"""PIL's bicubic weights (antialiased, 22-bit fixed point) as matrices, checked one axis at a time."""

import numpy as np
import pytest
from PIL import Image

from internvl_jax.processing.resample import bucket_side, pil_bicubic_matrix


def _apply_rows(m, image):
    """One PIL pass along the width: weights, then round and clip to uint8 as PIL does."""
    return np.clip(np.floor(np.einsum("hwk,ow->hok", image.astype(np.float64), m) + 0.5), 0, 255)


@pytest.mark.parametrize("src,dst", [(100, 448), (448, 448 * 3), (1000, 448), (333, 448), (4000, 896), (37, 5), (449, 448)])
def test_width_only_resize_equals_pil(src, dst):
    image = np.random.default_rng(src).integers(0, 256, (7, src, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((dst, 7), Image.BICUBIC))
    np.testing.assert_array_equal(_apply_rows(pil_bicubic_matrix(src, dst), image), expected)


def test_rows_sum_to_one_and_buckets_are_bounded():
    for src, dst in [(100, 448), (3000, 448)]:
        np.testing.assert_allclose(pil_bicubic_matrix(src, dst).sum(axis=1), 1.0, atol=1e-6)
    sides = {bucket_side(n) for n in range(1, 5000)}
    assert len(sides) <= 20 and all(bucket_side(n) >= n for n in range(1, 5000))
    assert all(bucket_side(n) <= max(256, 2 * n) for n in range(1, 5000))
