"""InternVL end to end against transformers.InternVLForConditionalGeneration (tiny, random, perturbed, saved)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.load import load_pretrained
from internvl_jax.model import ImageTokenMismatch
from reference import TOL_LOGITS, image_batch, max_diff, tiny_internvl

# row 0: two images of 2 and 3 tiles; row 1: one 1-tile image, other tile slots padding
TILES = [[2, 3], [1]]


def _compare(tmp_path, text, vision, tie=False, **extra):
    ref = tiny_internvl(text, vision, tie=tie, **extra)
    ref.save_pretrained(tmp_path)
    model, params = load_pretrained(str(tmp_path))
    ids, torch_pixels, pixels, mask = image_batch(TILES, length=48, max_tiles=6)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch_pixels).logits.numpy()
    got = model.apply({"params": params}, jnp.asarray(ids), pixels, mask)
    assert got.dtype == jnp.float32 and got.shape == expected.shape
    return max_diff(got, expected)


@pytest.mark.parametrize("text", ["qwen2", "llama", "qwen3"])
def test_logits_match_transformers_per_text_family(tmp_path, text):
    assert _compare(tmp_path, text, "layernorm_bias") <= TOL_LOGITS


@pytest.mark.parametrize("vision", ["layernorm_bias", "rmsnorm_qknorm"])
def test_logits_match_transformers_per_vision_variant(tmp_path, vision):
    assert _compare(tmp_path, "qwen2", vision, tie=True) <= TOL_LOGITS


def test_earlier_vision_feature_layer(tmp_path):
    assert _compare(tmp_path, "qwen2", "layernorm_bias", vision_feature_layer=-2) <= TOL_LOGITS


def test_token_count_mismatch_is_a_clear_error(tmp_path):
    ref = tiny_internvl("qwen2")
    ref.save_pretrained(tmp_path)
    model, params = load_pretrained(str(tmp_path))
    ids, _, pixels, mask = image_batch(TILES, length=48, max_tiles=6)
    mask[1, 1] = True  # row 1 now claims a second tile its text has no tokens for
    with pytest.raises(ImageTokenMismatch, match="row 1 has 4 IMG_CONTEXT tokens .* 2 valid tiles x 4 tokens = 8"):
        model.apply({"params": params}, jnp.asarray(ids), pixels, mask)
