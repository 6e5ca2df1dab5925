"""Training InternVL 1.0: the contrastive loss sharded over 8 simulated devices (features all-gathered across the
mesh) equals the single-device one over the same global batch, gradients included; the stage presets freeze by
path; and a
tiny model trained contrastively with the stage trainer learns zero-shot classification and retrieval of
held-out coloured shapes."""

from functools import partial

import jax
import numpy as np
import pytest

import sharding
from internvl_jax.clip import preprocess, retrieve, tokenize, zero_shot_classify
from internvl_jax.clip_config import CLIPConfig
from internvl_jax.clip_model import InternVLCLIP, init_clip_params
from internvl_jax.config import TextConfig, VisionConfig
from train.clip_losses import contrastive_loss
from train.clip_train import STAGE_RULES, optim_for, train_clip
from train.contrastive import clip_loss, gathered_clip_loss
from train.optim import OptimConfig, trainable_mask

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


def test_stage_presets_freeze_by_path():
    config = _config(vocab=40, image=28)
    params = clip_data.random_params(config)
    trains = lambda stage: trainable_mask(optim_for(stage, OptimConfig()), params)  # noqa: E731
    s1, s2, frozen_vit = trains("contrastive"), trains("generative"), trains("contrastive_frozen_vit")
    assert s1["vision"]["layers"]["fc1"]["kernel"] and not frozen_vit["vision"]["layers"]["fc1"]["kernel"]
    assert s1["qllama"]["blocks"]["layer_0"]["attn"]["q_proj"]["kernel"] and s1["clip_projector"]["q"]["kernel"]
    assert not s1["qllama"]["blocks"]["layer_0"]["cross_attn"]["q_proj"]["kernel"] and not s1["query_tokens"]
    assert s2["qllama"]["blocks"]["layer_0"]["cross_attn"]["q_proj"]["kernel"] and s2["query_tokens"]
    assert s2["clip_projector2"]["q"]["kernel"] and s2["itm_head"]["kernel"] and s2["logit_scale"]
    assert not s2["qllama"]["blocks"]["layer_0"]["attn"]["q_proj"]["kernel"] and not s2["vision"]["embeddings"]["pos_embed"]
    assert not s2["text_projection"] and not s2["clip_projector"]["proj"]["kernel"]
    with pytest.raises(ValueError, match="unknown InternVL 1.0 stage 'stage3'"):
        optim_for("stage3", OptimConfig())
    assert set(STAGE_RULES) == {"contrastive", "contrastive_frozen_vit", "generative"}


def test_generative_stage_trains_only_its_parameters():
    config = _config(vocab=40, image=28)
    model = InternVLCLIP(config)
    params = clip_data.random_params(config)
    rng = np.random.default_rng(0)
    b = 4
    ids = lambda: np.concatenate([np.ones((b, 1)), rng.integers(3, 40, (b, 4)), np.full((b, 1), 2)], 1).astype(np.int32)  # noqa: E731
    batch = {"pixel_values": rng.normal(size=(b, 28, 28, 3)).astype(np.float32)}
    for key in ("", "positive_", "negative_", "summarize_"):
        batch[f"{key}input_ids"] = ids()
        batch[f"{key}attention_mask"] = np.ones_like(batch[f"{key}input_ids"])
    batch["labels"] = batch["input_ids"].copy()
    new, history = train_clip(model, params, iter([batch] * 2), stage="generative", steps=2,
                              optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
    assert all(h["finite"] == 1.0 for h in history) and set(history[0]) >= {"loss_itm", "loss_itc", "loss_itg"}
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new)
    expected = trainable_mask(optim_for("generative", OptimConfig()), params)
    assert moved == expected


IMAGE, PATCH, STEPS = 56, 7, 500  # an 8 x 8 patch grid


def _batches(tok, rng):
    """Each step: every class once (distinct classes, so no pair of the batch is a false negative), a random
    template per caption, fresh images."""
    while True:
        classes = rng.permutation(len(clip_data.CLASSES))
        images = [clip_data.draw(int(c), rng, IMAGE) for c in classes]
        texts = [clip_data.TEMPLATES[int(rng.integers(len(clip_data.TEMPLATES)))].format(clip_data.CLASSES[c])
                 for c in classes]
        yield {"pixel_values": preprocess(images, "classification", IMAGE), "input_ids": tokenize(tok, texts, max_length=10)}


def test_contrastive_training_gives_zero_shot_classification_and_retrieval():
    tok = clip_data.tokenizer()
    config = _config(vocab=len(tok.vocab) + 3, image=IMAGE, patch=PATCH, embed=32)
    model = InternVLCLIP(config)
    params = init_clip_params(config, jax.random.key(0, impl="rbg"))
    optim = OptimConfig(lr=5e-3, warmup_steps=20, weight_decay=0.1, b2=0.98)
    params, history = train_clip(model, params, _batches(tok, np.random.default_rng(0)), stage="contrastive",
                                 steps=STEPS, optim=optim)
    assert np.mean([h["loss"] for h in history[-50:]]) < np.mean([h["loss"] for h in history[:50]])
    assert all(h["finite"] == 1.0 for h in history)
    rng = np.random.default_rng(123)  # held-out images
    classes = np.tile(np.arange(len(clip_data.CLASSES)), 10)
    images = [clip_data.draw(int(c), rng, IMAGE) for c in classes]
    predicted, probs = zero_shot_classify(model, params, tok, images, clip_data.CLASSES, clip_data.TEMPLATES)
    accuracy = float(np.mean(predicted == classes))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # retrieval: groups of one held-out image per class, each captioned; a text must find its own image
    hits = []
    for _ in range(5):
        order = rng.permutation(len(clip_data.CLASSES))
        group = [clip_data.draw(int(c), rng, IMAGE) for c in order]
        found = retrieve(model, params, tok, group, [f"a photo of a {clip_data.CLASSES[c]}" for c in order], k=1)
        hits.extend(found["text_to_image"][:, 0] == np.arange(len(order)))
    recall = float(np.mean(hits))
    print(f"zero-shot top-1 {accuracy:.3f}, text->image recall@1 {recall:.3f}")
    assert accuracy >= 0.9 and recall >= 0.8
