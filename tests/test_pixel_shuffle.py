"""Pixel shuffle v1/v2: the permutation, stated on a small integer grid."""

import numpy as np
import torch

from internvl_jax.projector import pixel_shuffle

# a 4x4 grid of one channel whose value is its row-major index
GRID = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)


def test_v2_token_ij_carries_the_2x2_block_row_major():
    out = np.asarray(pixel_shuffle(GRID, 0.5, "v2"))
    assert out.shape == (1, 2, 2, 4)
    np.testing.assert_array_equal(out[0, 0, 0], [0, 1, 4, 5])
    np.testing.assert_array_equal(out[0, 0, 1], [2, 3, 6, 7])
    np.testing.assert_array_equal(out[0, 1, 0], [8, 9, 12, 13])
    np.testing.assert_array_equal(out[0, 1, 1], [10, 11, 14, 15])


def test_v1_is_the_same_blocks_on_the_transposed_grid():
    out = np.asarray(pixel_shuffle(GRID, 0.5, "v1"))
    np.testing.assert_array_equal(out[0, 0, 1], [8, 9, 12, 13])  # token (j=0, i=1)
    np.testing.assert_array_equal(out[0, 1, 0], [2, 3, 6, 7])
    np.testing.assert_array_equal(out, np.asarray(pixel_shuffle(GRID, 0.5, "v2")).transpose(0, 2, 1, 3))


def test_channels_stay_grouped_per_position():
    x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)  # 3 channels per position
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(x, 0.5, "v2"))[0, 0, 0], np.arange(12))


def test_v2_equals_the_transformers_port():
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = np.random.default_rng(0).standard_normal((2, 8, 8, 5)).astype(np.float32)
    expected = InternVLModel.pixel_shuffle(None, torch.tensor(x), 0.5).numpy()
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(x, 0.5, "v2")), expected)
