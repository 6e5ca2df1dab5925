"""Paths used by training: remat policies, float (V2PE) positions, mixed precision, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.model import InternVL, init_params
from internvl_jax.presets import get_preset
from reference import TOL_MODULE, max_diff

CFG = get_preset("tiny-qwen2")


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 250, (2, 12)).astype(np.int32)
    ids[0, 2:4] = ids[1, 5] = CFG.image_token_id
    pixels = rng.standard_normal((2, 2, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
    mask = np.array([[True, True], [True, False]])
    return jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)


def _loss_and_grads(config, params, batch):
    ids, pixels, mask = batch

    def loss(p):
        logits = InternVL(config).apply({"params": p}, ids, pixels, mask)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_loss_and_gradients(policy):
    params = init_params(CFG, jax.random.PRNGKey(0))
    base_loss, base_grads = _loss_and_grads(CFG, params, _batch())
    loss, grads = _loss_and_grads(CFG.replace(remat=policy), params, _batch())
    assert abs(float(loss - base_loss)) <= TOL_MODULE
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(base_grads)):
        assert max_diff(a, b) <= TOL_MODULE
    # the gradient reaches both the ViT and the embedding table
    assert float(jnp.abs(grads["vision"]["embeddings"]["patch_kernel"]).sum()) > 0
    assert float(jnp.abs(grads["language_model"]["embed_tokens"]).sum()) > 0


def test_float_positions_v2pe():
    params = init_params(CFG, jax.random.PRNGKey(1))
    ids, pixels, mask = _batch()
    apply = jax.jit(lambda pos: InternVL(CFG).apply({"params": params}, ids, pixels, mask, positions=pos))
    ints = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    as_int = apply(ints)
    as_float = apply(ints.astype(jnp.float32))
    np.testing.assert_array_equal(as_int, as_float)
    # image tokens advance by a fraction (stride 1/4): later text positions shift, logits change
    frac = jnp.where(ints >= 4, ints - 0.75, ints).astype(jnp.float32)
    shifted = apply(frac)
    assert np.isfinite(np.asarray(shifted)).all() and max_diff(shifted, as_int) > 1e-4


def test_bfloat16_compute_with_float32_params():
    params = init_params(CFG, jax.random.PRNGKey(2))
    ids, pixels, mask = _batch()
    run = lambda cfg: jax.jit(InternVL(cfg).apply)({"params": params}, ids, pixels, mask)  # noqa: E731
    exact, mixed = run(CFG), run(CFG.replace(dtype="bfloat16"))
    assert mixed.dtype == jnp.float32
    assert 0 < max_diff(mixed, exact) < 0.05


def test_attention_impls_agree():
    """The CPU-friendly per-KV-head loop and the batched form compute the same attention (GQA, packed, padded)."""
    params = init_params(CFG, jax.random.PRNGKey(3))
    ids, pixels, mask = _batch()
    seg = jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
    run = lambda impl: jax.jit(InternVL(CFG.replace(attention_impl=impl)).apply)(  # noqa: E731
        {"params": params}, ids, pixels, mask, segment_ids=seg
    )
    assert max_diff(run("batched"), run("per_kv_head")) <= TOL_MODULE
