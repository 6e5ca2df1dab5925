"""InternViT and the projector against the transformers modules, incl. position embeddings on other grids."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.load import load_pretrained
from internvl_jax.vision import resize_position_embedding
from reference import TOL_MODULE, max_diff, tiny_internvl


@pytest.mark.parametrize("src,out", [((4, 4), (5, 3)), ((4, 4), (2, 7)), ((6, 6), (6, 6)), ((32, 32), (24, 40))])
def test_position_embedding_resize_equals_torch_bicubic(src, out):
    g = src[0]
    pos = np.random.default_rng(0).standard_normal((g * g, 8)).astype(np.float32)
    grid = torch.tensor(pos).reshape(1, g, g, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=out, mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    assert max_diff(resize_position_embedding(jnp.asarray(pos), *out), expected) <= TOL_MODULE


@pytest.fixture(scope="module", params=["layernorm_bias", "rmsnorm_qknorm"])
def loaded(request, tmp_path_factory):
    ref = tiny_internvl("qwen2", request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    model, params = load_pretrained(str(path))
    return ref, model, params


@pytest.mark.parametrize("hw", [(56, 56), (70, 42), (28, 84)], ids=["native", "5x3", "2x6"])
def test_vision_tower_on_any_patch_grid(loaded, hw):
    ref, model, params = loaded
    x = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref.model.vision_tower(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).last_hidden_state
    got = model.apply({"params": params}, jnp.asarray(x), method=lambda m, t: m.vision(t))
    assert max_diff(got, expected.numpy()) <= TOL_MODULE


def test_image_features_after_projector(loaded):
    ref, model, params = loaded
    x = np.random.default_rng(2).standard_normal((3, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).pooler_output
    got = model.apply({"params": params}, jnp.asarray(x), method=lambda m, t: m.encode_images(t))
    assert max_diff(got, expected.numpy()) <= TOL_MODULE


def test_image_features_of_uint8_levels_are_those_of_the_normalised_tiles(loaded):
    """The training pipeline's uint8 tiles: the model normalises them itself (the reference gets the host's
    normalisation, the original's)."""
    from internvl_jax.processing import normalize

    ref, model, params = loaded
    levels = np.random.default_rng(4).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = ref.model.get_image_features(
            pixel_values=torch.tensor(normalize(levels).transpose(0, 3, 1, 2))).pooler_output
    got = model.apply({"params": params}, jnp.asarray(levels), method=lambda m, t: m.encode_images(t))
    assert max_diff(got, expected.numpy()) <= TOL_MODULE


def test_drop_path_is_off_without_rng_and_stochastic_with_it():
    from internvl_jax.model import InternVL, init_params
    from internvl_jax.presets import get_preset

    cfg = get_preset("tiny-qwen2")
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, drop_path_rate=0.5))
    params = init_params(cfg, jax.random.PRNGKey(0))
    model = InternVL(cfg)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, cfg.image_size, cfg.image_size, 3)), jnp.float32)
    run = lambda **kw: model.apply({"params": params}, x, method=lambda m, t: m.vision(t), **kw)  # noqa: E731
    np.testing.assert_array_equal(run(), run())
    a = run(rngs={"dropout": jax.random.PRNGKey(1)})
    b = run(rngs={"dropout": jax.random.PRNGKey(2)})
    assert max_diff(a, run()) > 0 and max_diff(a, b) > 0


def test_from_scratch_class_token_and_position_table_are_unit_normal_as_the_original():
    """The original InternViT creates both with torch.randn; zeros would leave every patch position alike."""
    from internvl_jax.model import init_params
    from train.demo_data import demo_model_config  # the model the demo trains from scratch

    emb = init_params(demo_model_config(), jax.random.PRNGKey(0))["vision"]["embeddings"]
    table = np.concatenate([np.ravel(emb["pos_embed"]), np.ravel(emb["cls_token"])])
    assert table.size >= 500 and abs(table.mean()) < 0.15 and 0.85 < table.std() < 1.15
    rows = np.asarray(emb["pos_embed"])[0]
    assert np.linalg.matrix_rank(rows) == min(rows.shape)  # positions pairwise distinct


def test_empty_tile_slots_skip_the_vits_attention_and_change_nothing_else():
    """With ``cpu_flash`` the ViT skips the attention of empty tile slots (tile_mask False): their hidden states are
    not those of a full run, the valid tiles' are; the model's logits and parameter gradients equal those of the XLA
    attention, which computes every slot."""
    from internvl_jax.model import InternVL, init_params
    from internvl_jax.presets import get_preset

    cfg = get_preset("tiny-qwen2")
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    tile_mask = np.array([[True, True, False], [True, False, False]])
    pixels = jnp.asarray(rng.standard_normal((2, 3, cfg.image_size, cfg.image_size, 3)), jnp.float32)
    length = 2 * cfg.tokens_per_tile + 6
    ids = rng.integers(1, 50, (2, length))
    for b, n in enumerate(tile_mask.sum(axis=1)):
        ids[b, 2:2 + n * cfg.tokens_per_tile] = cfg.image_token_id
    ids = jnp.asarray(ids, jnp.int32)

    def hidden(impl):
        model = InternVL(cfg.replace(attention_impl=impl))
        return model.apply({"params": params}, pixels.reshape(6, *pixels.shape[2:]), jnp.asarray(tile_mask.reshape(6)),
                           method=lambda m, t, v: m.vision(t, v))

    skipped, full = hidden("cpu_flash"), hidden("per_kv_head")
    valid = tile_mask.reshape(6)
    assert max_diff(skipped[valid], full[valid]) <= TOL_MODULE
    assert max_diff(skipped[~valid], full[~valid]) > 10 * TOL_MODULE  # their attention did not run

    def logits_and_grads(impl):
        model = InternVL(cfg.replace(attention_impl=impl))
        loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, ids, pixels, jnp.asarray(tile_mask))))  # noqa: E731
        return jax.value_and_grad(loss)(params)

    got, want = logits_and_grads("cpu_flash"), logits_and_grads("per_kv_head")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert max_diff(a, b) <= TOL_MODULE * max(1.0, float(np.abs(np.asarray(b)).max()))
