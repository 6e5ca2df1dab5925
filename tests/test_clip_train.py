"""Training InternVL 1.0 through the trainer (``internvl-jax train internvl1_contrastive_demo`` /
``internvl1_generative_demo``): the contrastive loss sharded over 8 simulated devices (features all-gathered
across the mesh) equals the single-device one over the same global batch, gradients included; the stages freeze
by the trainer's path rules (the ViT by ``freeze.freeze_backbone``); the generative stage moves exactly its
parameters; the contrastive demo learns zero-shot classification and retrieval of held-out coloured shapes; and the
generative demo, started from the contrastive demo's export, lowers each of its three losses with the frozen
parameters untouched."""

from functools import partial

import jax
import numpy as np
import pytest

import sharding
from internvl_jax.clip import retrieve, zero_shot_classify
from internvl_jax.clip_config import CLIPConfig
from internvl_jax.clip_model import InternVLCLIP, clip_init_fn
from internvl_jax.config import TextConfig, VisionConfig
from internvl_jax.processing import Tokenizer
from train import clip_demo
from train.clip_losses import contrastive_loss
from train.clip_train import STAGE_RULES, make_clip_step, optim_for
from train.config import ConfigError, apply_overrides, load_train_config, optim_config, prepare
from train.contrastive import clip_loss, gathered_clip_loss
from train.optim import OptimConfig, build_optimizer, trainable_grads, trainable_mask
from train.state import TrainState
from train.trainer import train

import clip_data

TOL_SHARDED = 1e-5  # loss and every gradient, 8 devices vs 1


def _config(vocab: int, image: int, patch: int = 14, width: int = 32, embed: int = 16) -> CLIPConfig:
    return CLIPConfig(
        vision=VisionConfig(hidden_size=width, num_layers=2, num_heads=2, intermediate_size=2 * width, image_size=image,
                            patch_size=patch, norm_type="rms_norm", qk_norm=True, qkv_bias=False),
        qllama=TextConfig(family="llama", vocab_size=vocab, hidden_size=width, num_layers=2, num_heads=4,
                          num_kv_heads=4, head_dim=width // 4, intermediate_size=2 * width, max_position_embeddings=64,
                          tie_word_embeddings=True),
        num_query_token=4, clip_embed_dim=embed, attn_pool_num_heads=2)


def test_sharded_losses_and_gradients_equal_the_single_device_ones():
    config = _config(vocab=40, image=28)
    model = InternVLCLIP(config)
    params = clip_data.random_params(config)
    rng = np.random.default_rng(0)
    b, l = 16, 7
    ids = lambda: np.concatenate([np.ones((b, 1)), rng.integers(3, 40, (b, l - 2)), np.full((b, 1), 2)], 1)  # noqa: E731
    batch = {"pixel_values": rng.normal(size=(b, 28, 28, 3)).astype(np.float32), "input_ids": ids().astype(np.int32)}
    batch["input_ids"][rng.random(b) < 0.3, -2:] = 0  # some rows shorter (right padding)

    def losses(contrastive):
        return jax.jit(jax.value_and_grad(lambda p, batch: contrastive_loss(model, p, batch, contrastive=contrastive)))

    one, one_g = losses(clip_loss)(params, batch)
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    with sharding.activate(mesh, "dp"):
        placed = sharding.shard_batch(batch, mesh, "dp")
        eight, eight_g = losses(partial(gathered_clip_loss, mesh=mesh, batch_axes=("data", "fsdp", "tensor")))(params, placed)
    assert abs(float(one) - float(eight)) <= TOL_SHARDED
    worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), one_g, eight_g)))
    assert worst <= TOL_SHARDED
    # the features of every shard got gradients from the other shards' rows: the ViT's do not vanish
    assert float(np.max(np.abs(np.asarray(eight_g["vision"]["embeddings"]["patch_kernel"])))) > 0


def _demo(name: str, workdir, *overrides: str):
    """The demo preset ``name`` with ``workdir`` and ``overrides``, after its setup hook (data written)."""
    return prepare(apply_overrides(load_train_config(name), [f"workdir={workdir}", *overrides]))


def test_stage_presets_freeze_by_path(tmp_path):
    config = clip_demo.clip_demo_model_config()
    params = clip_data.random_params(config)
    trains = lambda *o: trainable_mask(optim_config(apply_overrides(  # noqa: E731
        load_train_config("internvl1_contrastive_demo"), list(o)), config), params)
    s1, s2, frozen_vit = trains(), trains("objective=generative"), trains("freeze.freeze_backbone=true")
    assert s1["vision"]["layers"]["fc1"]["kernel"] and not frozen_vit["vision"]["layers"]["fc1"]["kernel"]
    assert frozen_vit["qllama"]["blocks"]["layer_0"]["attn"]["q_proj"]["kernel"]
    assert s1["qllama"]["blocks"]["layer_0"]["attn"]["q_proj"]["kernel"] and s1["clip_projector"]["q"]["kernel"]
    assert not s1["qllama"]["blocks"]["layer_0"]["cross_attn"]["q_proj"]["kernel"] and not s1["query_tokens"]
    assert s2["qllama"]["blocks"]["layer_0"]["cross_attn"]["q_proj"]["kernel"] and s2["query_tokens"]
    assert s2["clip_projector2"]["q"]["kernel"] and s2["itm_head"]["kernel"] and s2["logit_scale"]
    assert not s2["qllama"]["blocks"]["layer_0"]["attn"]["q_proj"]["kernel"] and not s2["vision"]["embeddings"]["pos_embed"]
    assert not s2["text_projection"] and not s2["clip_projector"]["proj"]["kernel"]
    with pytest.raises(ValueError, match="unknown InternVL 1.0 stage 'stage3'"):
        optim_for("stage3", OptimConfig())
    assert set(STAGE_RULES) == {"contrastive", "generative"}
    with pytest.raises(ConfigError, match="accum_steps=2"):
        train(_demo("internvl1_contrastive_demo", tmp_path, "accum_steps=2"))


def test_generative_stage_trains_only_its_parameters():
    """The trainer's step and optimizer of the generative demo (a jitted step of the run, not the whole run)."""
    cfg = apply_overrides(load_train_config("internvl1_generative_demo"),
                          ["optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-2"])
    config = cfg.model
    model = InternVLCLIP(config)
    params = clip_data.random_params(config)
    ocfg = optim_config(cfg, config)
    trainable = trainable_mask(ocfg, params)
    tx = build_optimizer(ocfg, params, 2)
    step = jax.jit(make_clip_step(model, tx, "generative", trainable=trainable,
                                  grad_view=lambda g: trainable_grads(ocfg, g, g)))
    rng = np.random.default_rng(0)
    b, size, vocab = 4, config.vision.image_size, config.qllama.vocab_size
    ids = lambda: np.concatenate([np.ones((b, 1)), rng.integers(3, vocab, (b, 4)), np.full((b, 1), 2)], 1).astype(np.int32)  # noqa: E731
    batch = {"pixel_values": rng.normal(size=(b, size, size, 3)).astype(np.float32)}
    for key in ("", "positive_", "negative_", "summarize_"):
        batch[f"{key}input_ids"] = ids()
        batch[f"{key}attention_mask"] = np.ones_like(batch[f"{key}input_ids"])
    batch["labels"] = batch["input_ids"].copy()
    state = TrainState.create(params, tx, jax.random.PRNGKey(0))
    for _ in range(2):
        state, metrics = step(state, batch)
        assert float(metrics["finite"]) == 1.0 and {"loss_itm", "loss_itc", "loss_itg"} <= set(metrics)
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, state.params)
    assert moved == trainable


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory):
    """(config, result) of the contrastive demo's whole run (300 steps, its original-layout export written)."""
    cfg = _demo("internvl1_contrastive_demo", tmp_path_factory.mktemp("contrastive"))
    return cfg, train(cfg)


def test_contrastive_demo_gives_zero_shot_classification_and_retrieval(contrastive_run):
    cfg, result = contrastive_run
    losses = [m["loss"] for m in result.metrics]
    assert np.mean(losses[-50:]) < np.mean(losses[:50]) and all(m["finite"] == 1.0 for m in result.metrics)
    model, params, tok = result.model, result.state.params, Tokenizer.from_pretrained(cfg.tokenizer)
    classes_, templates, size = clip_demo.CLASSES, clip_demo.TEMPLATES, clip_demo.IMAGE_SIZE
    rng = np.random.default_rng(123)  # held-out images (the training set is drawn from seed 0)
    classes = np.tile(np.arange(len(classes_)), 10)
    images = [clip_demo.draw(int(c), rng, size) for c in classes]
    predicted, probs = zero_shot_classify(model, params, tok, images, classes_, templates)
    accuracy = float(np.mean(predicted == classes))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # retrieval: groups of one held-out image per class, each captioned; a text must find its own image
    hits = []
    for _ in range(5):
        order = rng.permutation(len(classes_))
        group = [clip_demo.draw(int(c), rng, size) for c in order]
        found = retrieve(model, params, tok, group, [f"a photo of a {classes_[c]}" for c in order], k=1)
        hits.extend(found["text_to_image"][:, 0] == np.arange(len(order)))
    recall = float(np.mean(hits))
    print(f"zero-shot top-1 {accuracy:.3f}, text->image recall@1 {recall:.3f}")
    assert accuracy >= 0.9 and recall >= 0.8


GENERATIVE_WINDOW = 20  # steps averaged at each end of the generative run (one step's batch is 24 pairs: noisy)


def test_generative_demo_from_the_contrastive_export_lowers_every_loss(contrastive_run, tmp_path):
    """Stage 2 as the original runs it, from stage 1's export: 200 trainer steps of ``internvl1_generative_demo``
    (init = the contrastive demo's export, lr 5e-3) bring matching (ITM, below chance), contrastive (ITC) and
    image-grounded generation (ITG) each below their values at the start; the parameters the stage freezes stay
    bit-identical to the loaded ones, and every one it trains moves."""
    from convert.load import load_pretrained

    init = f"{contrastive_run[0].workdir}/export"
    cfg = _demo("internvl1_generative_demo", tmp_path, f"init={init}", "steps=200", "optim.lr=5e-3",
                "save_every=200", "export=", "progress=false")
    result = train(cfg)
    start = jax.device_get(load_pretrained(init)[1])  # what the run started from, read again from the checkpoint
    assert all(m["finite"] == 1.0 for m in result.metrics)
    for part in ("loss_itm", "loss_itc", "loss_itg"):
        values = np.array([m[part] for m in result.metrics])
        first, last = values[:GENERATIVE_WINDOW].mean(), values[-GENERATIVE_WINDOW:].mean()
        print(f"{part}: mean of the first {GENERATIVE_WINDOW} steps {first:.4f}, of the last {last:.4f}")
        assert last < first, part
    assert np.mean([m["loss_itm"] for m in result.metrics[-GENERATIVE_WINDOW:]]) < np.log(2) - 0.02  # not chance
    trainable = trainable_mask(optim_config(cfg, result.model.config), start)
    final = jax.device_get(result.state.params)
    for path, train_it in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        before, after = (np.asarray(_leaf(tree, path)) for tree in (start, final))
        if train_it:
            assert not np.array_equal(before, after), jax.tree_util.keystr(path)
        else:
            np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
    assert 0 < sum(jax.tree_util.tree_leaves(trainable)) < len(jax.tree_util.tree_leaves(trainable))


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree
