"""InternVL 1.0 (InternVL-C / InternVL-G) against the original ``internvl_g`` PyTorch code.

``tests/fixtures/internvl1`` is a tiny checkpoint written by the original's ``save_pretrained`` with the inputs
and outputs of the original calls (its README names every array and the call that made it). It is loaded with
``load_pretrained`` and every array of ``reference_io.npz`` is matched within TOL in float32: the ViT (every
layer), both image-feature modes, QLLaMA's query outputs per layer, text features, CLIP logits, the captioning
logits and greedy generation, the position-embedding resize, and the stage-2 training forward and losses.
"""

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.load import load_pretrained
from internvl_jax.clip import caption
from internvl_jax.clip_model import InternVLCLIP as M, normalize
from internvl_jax.decoder import DecoderLayer
from internvl_jax.qllama import qllama_mask
from internvl_jax.rope import rope_cos_sin
from internvl_jax.vision import InternViT, resize_position_embedding
from train.clip_losses import stage2_losses, stage2_outputs

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "internvl1")
TOL = 1e-4  # float32, the suite's logits tolerance


@pytest.fixture(scope="module")
def case():
    model, params = load_pretrained(FIXTURE)
    ref = dict(np.load(os.path.join(FIXTURE, "reference_io.npz")))
    i32 = lambda k: jnp.asarray(ref[k], jnp.int32)  # noqa: E731
    pixels = jnp.asarray(ref["pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    train = {k[len("train_"):]: i32(k) for k in ref if k.startswith("train_") and ref[k].dtype == np.int64}
    train["pixel_values"] = pixels
    c = model.config

    @jax.jit
    def everything(params):
        v = {"params": params}
        out = {}
        vit = model.apply(v, pixels, method=M.vision_states)
        out["vit_last_hidden_state"] = vit
        out["vit_hidden_states"] = jnp.stack([InternViT(c.vision, layers_used=k).apply({"params": params["vision"]}, pixels)
                                              for k in range(c.vision.num_layers + 1)])
        queries = model.apply(v, vit, method=M.query_outputs)
        out["qllama_query_outputs"] = queries
        out["qllama_query_layer_outputs"] = query_layer_outputs(c, params, vit)
        out["image_features_C"] = model.apply(v, pixels, "InternVL-C", method=M.image_features)
        out["image_features_G"] = model.apply(v, pixels, "InternVL-G", method=M.image_features)
        out["image_features_G_vit"] = model.apply(v, vit, method=lambda m, x: m.clip_projector(x))
        out["image_features_G_qllama"] = model.apply(v, queries, method=lambda m, x: m.clip_projector2(x))
        for mode in ("C", "G"):
            out[f"image_features_{mode}_normalized"] = normalize(out[f"image_features_{mode}"])
            per_image, per_text = model.apply(v, pixels, i32("text_ids"), f"InternVL-{mode}")
            out[f"logits_per_image_{mode}"], out[f"logits_per_text_{mode}"] = per_image, per_text
        out["text_last_hidden_state"] = model.apply(v, i32("text_ids"), method=M.text_hidden)
        out["text_features"] = model.apply(v, i32("text_ids"), method=M.text_features)
        out["text_features_normalized"] = normalize(out["text_features"])
        out["logit_scale"] = params["logit_scale"]
        out["logit_scale_exp"] = jnp.exp(params["logit_scale"])
        out["caption_lm_logits"] = model.apply(v, vit, i32("caption_prompt_ids"), i32("caption_prompt_attention_mask"),
                                               method=M.lm_logits)
        grid = int(round((ref["pos_resize_output"].shape[1] - 1) ** 0.5))
        pos = jnp.asarray(ref["pos_resize_input"][0])
        out["pos_resize_output"] = jnp.concatenate([pos[:1], resize_position_embedding(pos[1:], grid, grid)])[None]
        s2 = stage2_outputs(model, params, train)
        out.update({"train_qllama_last_hidden_state": s2["hidden"], "train_itm_logits": s2["itm_logits"],
                    "train_image_itc_raw": s2["image_itc"], "train_backbone_embeds": s2["backbone"],
                    "train_itg_logits": s2["itg_logits"]})
        out.update({f"train_{k}": v for k, v in stage2_losses(model, params, train).items()})
        return out

    ours = jax.device_get(everything(params))
    steps = ref["caption_generated_ids"].shape[1] - 1
    ids, _ = caption(model, params, pixels, i32("caption_prompt_ids"), steps)  # KV-cached
    ours["caption_generated_ids"] = np.concatenate([np.ones_like(ids[:, :1]), ids], axis=1)  # transformers' BOS column
    ours["caption_generate_scores"] = uncached_greedy(model, params, pixels, i32("caption_prompt_ids"), steps)[1]
    return model, params, ref, ours


@partial(jax.jit, static_argnums=(0, 4))
def uncached_greedy(model, params, pixels, prompt_ids, max_new_tokens):
    """The reference captioning loop: every step recomputes QLLaMA over [queries ; prompt ; generated so far]
    (``lm_logits``, the prefix mask; the unfilled tail is masked out) and appends the argmax. Returns (ids int
    [B, max_new_tokens], per-step logits float32 [B, max_new_tokens, V])."""
    v = {"params": params}
    vit = model.apply(v, pixels, method=M.vision_states)
    b, p = prompt_ids.shape
    q = model.config.num_query_token
    ids = jnp.concatenate([prompt_ids, jnp.zeros((b, max_new_tokens), prompt_ids.dtype)], axis=1)

    def step(i, carry):
        ids, scores = carry
        mask = jnp.broadcast_to(jnp.arange(ids.shape[1]) < p + i, ids.shape).astype(jnp.int32)
        logits = model.apply(v, vit, ids, mask, method=M.lm_logits)[:, q + p + i - 1]
        return ids.at[:, p + i].set(jnp.argmax(logits, axis=-1).astype(ids.dtype)), scores.at[:, i].set(logits)

    scores = jnp.zeros((b, max_new_tokens, model.config.qllama.vocab_size), jnp.float32)
    ids, scores = jax.lax.fori_loop(0, max_new_tokens, step, (ids, scores))
    return ids[:, p:], scores


def query_layer_outputs(c, params, vit):
    """QLLaMA's decoder-layer outputs for the queries alone, layer by layer ([layers, B, Q, E]), from the stored
    blocks: layer i is ``layer_{i % frequency}`` of block ``i // frequency``, cross-attention in layer_0 only."""
    b, q, f = vit.shape[0], c.num_query_token, c.cross_attention_frequency
    x = jnp.broadcast_to(params["query_tokens"], (b, q, c.qllama.hidden_size))
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(q), (b, q)), c.qllama.rope, c.qllama.head_dim, 512)
    mask = qllama_mask("full", q, jnp.ones((b, q), bool))
    outs = []
    for i in range(c.qllama.num_layers):
        layer = DecoderLayer(c.qllama, jnp.float32, jnp.float32, cross_attention=i % f == 0)
        p = jax.tree_util.tree_map(lambda a: a[i // f], params["qllama"]["blocks"][f"layer_{i % f}"])
        x, _ = layer.apply({"params": p}, x, cos, sin, mask, vision=vit, num_queries=q)
        outs.append(x)
    return jnp.stack(outs)


INPUTS = ("pixel_values", "text_ids", "text_attention_mask", "text_eos_index", "caption_prompt_ids",
          "caption_prompt_attention_mask", "pos_resize_input")


def test_every_reference_array_matches(case):
    _, _, ref, ours = case
    expected = sorted(k for k in ref if k not in INPUTS and not (k.startswith("train_") and ref[k].dtype == np.int64))
    assert sorted(ours) == expected
    errors = {k: float(np.max(np.abs(np.asarray(ours[k], np.float64) - ref[k]))) for k in expected}
    assert all(e <= TOL for e in errors.values()), {k: e for k, e in errors.items() if e > TOL}


def test_cached_captioning_gives_the_tokens_of_the_uncached_loop(case):
    """Longer than the fixture's 4 steps, from other prompts: the KV-cached prefill + decode steps give exactly the
    reference loop's tokens, and each token's log-probability within TOL of the reference's logits."""
    model, params, ref, _ = case
    pixels = jnp.asarray(ref["pixel_values"].transpose(0, 2, 3, 1))
    rng = np.random.default_rng(7)
    prompts = np.concatenate([np.ones((2, 1)), rng.integers(3, model.config.qllama.vocab_size, (2, 6))], 1)
    prompts = jnp.asarray(prompts, jnp.int32)
    steps = 16
    want_ids, want_logits = uncached_greedy(model, params, pixels, prompts, steps)
    ids, logprobs = caption(model, params, pixels, prompts, steps)
    np.testing.assert_array_equal(ids, np.asarray(want_ids))
    want_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(want_logits, axis=-1)), ids[..., None], -1)[..., 0]
    assert np.max(np.abs(logprobs - want_lp)) <= TOL
    # an end-of-sequence id: each row is padded after its first one and nothing else changes
    eos = int(ids[0, 5])
    stopped, _ = caption(model, params, pixels, prompts, steps, eos_token_id=eos, pad_token_id=0)
    for row, out in zip(ids, stopped):
        end = list(row).index(eos) + 1 if eos in row else steps
        np.testing.assert_array_equal(out[:end], row[:end])
        assert (out[end:] == 0).all()


def test_the_fixture_config_is_read_as_the_original_reloads_it(case):
    model, params, ref, _ = case
    c = model.config
    assert (c.num_query_token, c.cross_attention_frequency, c.clip_embed_dim, c.attn_pool_num_heads) == (96, 2, 16, 2)
    assert not c.qllama.tie_word_embeddings and "lm_head" in params["qllama"]
    assert c.qllama.rope.theta == 10000.0 and c.vision.norm_type == "rms_norm" and c.vision.qk_norm
    # cross-attention only in the even layers: block 0's layer_0 has it, layer_1 has none
    assert "cross_attn" in params["qllama"]["blocks"]["layer_0"]
    assert "cross_attn" not in params["qllama"]["blocks"]["layer_1"]
    assert params["qllama"]["blocks"]["layer_0"]["cross_attn"]["k_proj"]["kernel"].shape[1:] == (32, 4, 16)
    np.testing.assert_array_equal(np.asarray(ref["text_eos_index"]), np.sum(ref["text_ids"] > 0, 1) - 1)
