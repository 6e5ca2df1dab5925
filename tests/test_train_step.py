"""The train step (train/step.py): the chunked loss equals the plain one, accumulation equals one large batch,
text-only rows send no gradient into the vision tower or projector, a non-finite loss is not applied, frozen
parameters stay bit-identical, and the step compiles for TPU slices under every rule preset with splash attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding
from internvl_jax.config import ConfigError
from internvl_jax.model import InternVL, init_params
from internvl_jax.presets import get_preset
from sharding.plan import target_config
from sharding.topology import tpu_devices
from train import optim
from train.loss import IGNORE, token_cross_entropy, weighted_loss_sum
from train.state import TrainState
from train.step import loss_sum, make_train_step, train_step_spec

CFG = get_preset("tiny-qwen2")
TOL = 1e-5  # float32, relative to the reference's magnitude (loss) or max |grad|
MODEL = InternVL(CFG)


def _batch(rows=4, length=24, tiles=2, seed=0, text_only_rows=()):
    """Rows with image tokens matching their tiles, random supervised labels and positive weights."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 250, (rows, length)).astype(np.int32)
    mask = np.ones((rows, tiles), bool)
    ids[:, 3:3 + tiles] = CFG.image_token_id
    for r in text_only_rows:
        ids[r, 3:3 + tiles] = 7
        mask[r] = False
    labels = np.where(rng.random((rows, length)) < 0.6, rng.integers(0, 250, (rows, length)), IGNORE).astype(np.int32)
    weights = np.where(labels == IGNORE, 0, rng.uniform(0.1, 1.0, (rows, length))).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "loss_weights": weights,
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "segment_ids": np.ones((rows, length), np.int32),
            "pixel_values": rng.standard_normal((rows, tiles, 28, 28, 3)).astype(np.float32), "tile_mask": mask}


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-30))


def _tree_rel(a, b) -> float:
    return max(_rel(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


PARAMS = init_params(CFG, jax.random.PRNGKey(0))


def test_chunked_loss_equals_the_plain_loss_and_its_gradients():
    b = _batch()

    def plain(p):
        logits = MODEL.apply({"params": p}, b["input_ids"], b["pixel_values"], b["tile_mask"])
        return jnp.sum(b["loss_weights"] * token_cross_entropy(logits, b["labels"]))

    ref, ref_g = jax.jit(jax.value_and_grad(plain))(PARAMS)
    for chunk in (5, 8, 24):  # 5 does not divide the 24 positions: padding with zero weights
        got, got_g = jax.jit(jax.value_and_grad(lambda p: loss_sum(MODEL, p, b, vocab_chunk=chunk)))(PARAMS)
        assert _rel(got, ref) <= TOL and _tree_rel(got_g, ref_g) <= TOL


def test_unrolled_layer_scans_give_the_same_loss_and_gradients_without_a_loop():
    """``scan_unroll`` at the depth of both stacks: the same params, loss and gradients, and no loop left in the
    program of the layers (the loss's own chunk loop is not used here); unroll 0 is refused."""
    b = _batch()
    cfg = CFG.replace(scan_unroll=max(CFG.vision.num_layers, CFG.text.num_layers))

    def step(model):
        return jax.jit(jax.value_and_grad(lambda p: loss_sum(model, p, b, vocab_chunk=None)))

    ref, ref_g = step(MODEL)(PARAMS)
    got, got_g = step(InternVL(cfg))(PARAMS)
    assert _rel(got, ref) <= TOL and _tree_rel(got_g, ref_g) <= TOL
    loops = lambda model: step(model).lower(PARAMS).compile().as_text().count(" while(")  # noqa: E731
    assert loops(MODEL) > 0 and loops(InternVL(cfg)) == 0
    with pytest.raises(ConfigError, match="scan_unroll"):
        CFG.replace(scan_unroll=0)


def test_weighted_loss_sum_ignores_weights_on_ignored_labels():
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 10))
    labels = jnp.array([[1, IGNORE, 3, 4, IGNORE, 0], [IGNORE] * 6])
    head = lambda x: x @ w  # noqa: E731
    ref = jnp.sum(jnp.where(labels == IGNORE, 0, token_cross_entropy(head(h), labels)))
    assert _rel(weighted_loss_sum(head, h, labels, jnp.ones((2, 6)), chunk=4), ref) <= TOL


def _run(step_fn, params, tx, batch, n=1):
    state = TrainState.create(params, tx, jax.random.PRNGKey(1))
    fn = jax.jit(step_fn)
    out = []
    for _ in range(n):
        state, m = fn(state, batch)
        out.append(m)
    return state, out


def test_accumulation_equals_one_large_batch():
    tx = optax.sgd(0.1)  # params move by the gradients themselves (Adam would amplify rounding in tiny gradients)
    b = _batch(rows=4)
    one, m1 = _run(make_train_step(MODEL, tx, accum_steps=1), PARAMS, tx, b, n=2)
    four, m4 = _run(make_train_step(MODEL, tx, accum_steps=4, vocab_chunk=8), PARAMS, tx, b, n=2)
    assert _rel(m4[0]["loss"], m1[0]["loss"]) <= TOL and _rel(m4[0]["grad_norm"], m1[0]["grad_norm"]) <= TOL
    assert _tree_rel(four.params, one.params) <= TOL


def test_text_only_rows_send_no_gradient_into_the_vision_tower_or_projector():
    b = _batch(text_only_rows=(0, 1, 2, 3))
    grads = jax.jit(jax.grad(lambda p: loss_sum(MODEL, p, b)))(PARAMS)
    for part in ("vision", "projector"):
        assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree_util.tree_leaves(grads[part])), part
    assert float(jnp.max(jnp.abs(grads["language_model"]["embed_tokens"]))) > 0
    mixed = jax.jit(jax.grad(lambda p: loss_sum(MODEL, p, _batch(text_only_rows=(0,)))))(PARAMS)
    assert float(jnp.max(jnp.abs(mixed["vision"]["embeddings"]["patch_kernel"]))) > 0  # the image rows do


def test_a_non_finite_loss_is_not_applied_and_is_counted():
    tx = optim.build_optimizer(optim.OptimConfig(lr=1e-3), PARAMS, 10)
    b = _batch()
    b["pixel_values"][0, 0, 0, 0, 0] = np.nan
    state, (m,) = _run(make_train_step(MODEL, tx), PARAMS, tx, b)
    assert not np.isfinite(float(m["loss"])) and float(m["finite"]) == 0
    assert int(state.step) == 1 and int(state.skipped) == 1
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                     jax.tree_util.tree_leaves(PARAMS)))


def test_frozen_parameters_stay_bit_identical_through_steps():
    cfg = optim.OptimConfig(lr=1e-2, lr_rules=optim.stage_rules(freeze_backbone=True, freeze_llm=True))
    tx = optim.build_optimizer(cfg, PARAMS, 10)
    trainable = optim.trainable_mask(cfg, PARAMS)
    state, _ = _run(make_train_step(MODEL, tx, trainable=trainable), PARAMS, tx, _batch(), n=3)
    for part in ("vision", "language_model"):
        for a, b in zip(jax.tree_util.tree_leaves(state.params[part]), jax.tree_util.tree_leaves(PARAMS[part])):
            assert np.array_equal(a, b), part
    assert not np.array_equal(state.params["projector"]["fc1"]["kernel"], PARAMS["projector"]["fc1"]["kernel"])


def test_drop_path_draws_a_new_mask_every_step():
    cfg = CFG.replace(vision=dataclasses.replace(CFG.vision, drop_path_rate=0.5))
    model = InternVL(cfg)
    tx = optim.build_optimizer(optim.OptimConfig(lr=0.0, warmup_steps=0), PARAMS, 10)
    _, ms = _run(make_train_step(model, tx, dropout=True), PARAMS, tx, _batch(), n=4)
    losses = {round(float(m["loss"]), 6) for m in ms}
    assert len(losses) > 1  # lr 0: only the drop-path masks change the loss


@pytest.mark.parametrize("target,rules", [("v5e:2x2", "dp"), ("v5p:2x2x1", "fsdp"), ("v6e:2x2", "fsdp_tp")])
def test_the_trainers_step_compiles_for_tpu_slices(target, rules):
    """The step as the trainer builds it (AdamW of train.optim with a frozen ViT, accumulation, chunked loss), each
    chip and each rule preset once (test_topology compiles the other pairs of the grid)."""
    config = target_config("tiny-qwen2", dtype="bfloat16")
    assert config.attention_impl == "splash"
    mesh = sharding.make_mesh(*{"dp": (4, 1, 1), "fsdp": (1, 4, 1), "fsdp_tp": (1, 2, 2)}[rules],
                              devices=tpu_devices(target))
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    ocfg = optim.OptimConfig(lr_rules=optim.stage_rules(freeze_backbone=True, unfreeze_vit_layers=-1))
    tx = optim.build_optimizer(ocfg, params, 100)
    step = train_step_spec(config, mesh, rules, tx, rows=8, seq_len=32, tiles=2, lr_fn=optim.schedule(ocfg, 100),
                           trainable=optim.trainable_mask(ocfg, params), accum_steps=2, vocab_chunk=16)
    compiled, stats = step.compile(mesh, rules)
    assert stats.alias_bytes > 0  # the state is updated in place
    assert compiled.as_text().count("tpu_custom_call") >= 4  # splash forward + backward, ViT and decoder


def test_plan_of_an_mlp_only_stage_holds_adam_moments_for_the_projector_alone():
    from sharding import plan as P

    config = P.target_config("InternVL2_5-8B", platform="gpu")
    boxed = P._boxed_params(config)
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    stage = P.estimate(config, sizes, "fsdp", rows=8, seq_len=2048, tiles=4,
                       optimizer=P.make_optimizer(config, stage="internvl2_5_stage1"))
    full = P.estimate(config, sizes, "fsdp", rows=8, seq_len=2048, tiles=4,
                      optimizer=P.make_optimizer(config, stage="internvl2_5_stage2"))
    projector = P.tree_bytes_per_device({"projector": boxed["projector"]}, sharding.get_rules("fsdp"), sizes)
    assert stage.grads == projector and full.grads == full.params
    # two float moments per projector parameter (bf16 params: moments in the params' dtype) plus Adam's counters
    assert 2 * projector <= stage.opt_state <= 2 * projector + 64
    assert full.opt_state >= 2 * full.params


def test_a_new_image_size_resizes_the_position_table_once_as_the_on_the_fly_interpolation():
    from train.config import TrainConfig
    from train.trainer import _model_config, _resize_positions

    config = _model_config(TrainConfig(image_size=56, dtype="float32", remat="none", attention="batched"), CFG)
    resized = _resize_positions(PARAMS, config)
    assert resized["vision"]["embeddings"]["pos_embed"].shape == (1, 1 + 4 * 4, 32)
    assert config.image_size == 56 and config.force_image_size is None
    tiles = np.random.default_rng(1).standard_normal((3, 56, 56, 3)).astype(np.float32)
    ours = InternVL(config).apply({"params": resized}, tiles, method=InternVL.encode_images)
    # the 28 px model forced to 56 px interpolates its 2x2 table on every call, with the same bicubic weights
    forced = InternVL(CFG.replace(force_image_size=56)).apply({"params": PARAMS}, tiles, method=InternVL.encode_images)
    assert ours.shape == (3, 4, 64)
    assert _rel(ours, forced) <= TOL
