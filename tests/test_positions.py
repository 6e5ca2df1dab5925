"""V2PE positions, stated on small sequences."""

import numpy as np
import pytest

from internvl_jax.processing.positions import v2pe_positions

I = 9  # image token id
# 2 text, an image of 2 tiles x 4 tokens, 2 text, an image of 1 tile, 1 text
IDS = np.array([1, 2] + [I] * 8 + [3, 4] + [I] * 4 + [5])


def test_full_stride_gives_integer_positions():
    np.testing.assert_array_equal(v2pe_positions(IDS, I, stride=4, tokens_per_tile=4), np.arange(len(IDS)))


def test_fractional_stride():
    got = v2pe_positions(IDS, I, stride=1, tokens_per_tile=4)  # 0.25 per image token
    expected = [0, 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3, 4, 5, 5.25, 5.5, 5.75, 6, 7]
    np.testing.assert_allclose(got, expected)


def test_span_end_is_rounded_up():
    got = v2pe_positions(np.array([1, I, I, I, 2]), I, stride=1, tokens_per_tile=2)  # 0.5 per token
    np.testing.assert_allclose(got, [0, 0.5, 1.0, 1.5, 3])


def test_random_strides_per_image_are_reproducible():
    a = v2pe_positions(IDS, I, stride=None, tokens_per_tile=4, rng=np.random.default_rng(0))
    b = v2pe_positions(IDS, I, stride=None, tokens_per_tile=4, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(a) > 0)
    with pytest.raises(ValueError, match="needs an rng"):
        v2pe_positions(IDS, I, stride=None)
