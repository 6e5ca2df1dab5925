"""Each decoder family against its transformers causal LM; packed rows against one-by-one runs."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.load import load_language_model
from reference import TOL_LOGITS, max_diff, tiny_causal_lm


def _load(tmp_path, family, **overrides):
    ref = tiny_causal_lm(family, **overrides)
    ref.save_pretrained(tmp_path)
    decoder, params = load_language_model(str(tmp_path))
    return ref, decoder, params


def _ref_logits(ref, ids):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _ids(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "internlm3"])
def test_logits_match_transformers(tmp_path, family):
    ref, decoder, params = _load(tmp_path, family)
    ids = _ids(2, 40)
    assert max_diff(decoder.apply({"params": params}, jnp.asarray(ids)), _ref_logits(ref, ids)) <= TOL_LOGITS


@pytest.mark.parametrize("length", [24, 48], ids=["short", "long"])
def test_phi3_longrope_both_sides_of_the_switch(tmp_path, length):
    """original_max_position_embeddings is 32: 24 tokens use short_factor, 48 use long_factor."""
    ref, decoder, params = _load(tmp_path, "phi3")
    ids = _ids(1, length)
    assert max_diff(decoder.apply({"params": params}, jnp.asarray(ids)), _ref_logits(ref, ids)) <= TOL_LOGITS


def test_phi3_long_and_short_factors_differ(tmp_path):
    """Guard for the test above: the switch must change the logits, or it proves nothing."""
    _, decoder, params = _load(tmp_path, "phi3")
    ids = _ids(1, 48)
    long = decoder.apply({"params": params}, jnp.asarray(ids))[:, :24]
    short = decoder.apply({"params": params}, jnp.asarray(ids[:, :24]))
    assert max_diff(long, short) > 1e-3


def test_dynamic_ntk_beyond_max_positions(tmp_path):
    """Qwen2 with dynamic NTK and 16 max positions run on 40 tokens (the base is rescaled)."""
    ref, decoder, params = _load(
        tmp_path, "qwen2", max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    )
    ids = _ids(1, 40)
    assert max_diff(decoder.apply({"params": params}, jnp.asarray(ids)), _ref_logits(ref, ids)) <= TOL_LOGITS


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_packed_rows_equal_samples_run_one_by_one(tmp_path, family):
    _, decoder, params = _load(tmp_path, family)
    lengths = [7, 12, 9]
    samples = [_ids(1, n, seed=i) for i, n in enumerate(lengths)]
    row = np.zeros((1, 32), np.int32)
    seg = np.zeros((1, 32), np.int32)  # the 4 trailing tokens are padding
    start = 0
    for i, s in enumerate(samples):
        row[0, start : start + s.shape[1]] = s[0]
        seg[0, start : start + s.shape[1]] = i + 1
        start += s.shape[1]
    packed = decoder.apply({"params": params}, jnp.asarray(row), segment_ids=jnp.asarray(seg))
    assert np.isfinite(np.asarray(packed)).all()
    start = 0
    for s in samples:
        alone = decoder.apply({"params": params}, jnp.asarray(s))
        assert max_diff(packed[:, start : start + s.shape[1]], alone) <= TOL_LOGITS
        start += s.shape[1]
