"""InternVL 1.0's modules on their own (reference section 9): attention pooling against a float64 reference,
QLLaMA's masks, where cross-attention sits and what it reaches, the full-size parameter count, preprocessing
and tokenisation of the APIs."""

import dataclasses

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from internvl_jax.clip import preprocess, tokenize
from internvl_jax.clip_config import CLIPConfig
from internvl_jax.clip_model import InternVLCLIP as M, abstract_clip_params, clip_param_count
from internvl_jax.config import TextConfig, VisionConfig
from internvl_jax.decoder import DecoderLayer
from internvl_jax.pooling import AttentionPooling
from internvl_jax.presets import CLIP_PRESETS, VISION_PRESETS
from internvl_jax.processing.pixels import IMAGENET_MEAN, IMAGENET_STD
from internvl_jax.qllama import qllama_mask

import clip_data

TOL = 1e-5  # float32 modules against float64 references


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def test_attention_pooling_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    b, n, c, heads, out = 2, 7, 12, 3, 5
    x = rng.normal(size=(b, n, c)).astype(np.float32)
    pool = AttentionPooling(out, heads, "vit_embed")
    params = jax.tree_util.tree_map(lambda p: p + rng.normal(size=p.shape).astype(np.float32) * 0.3,
                                    jax.device_get(nn.unbox(pool.init(jax.random.PRNGKey(0), x)["params"])))
    ours = np.asarray(pool.apply({"params": params}, x))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    xd = x.astype(np.float64)
    ln = lambda name, t: _layer_norm(t, p[f"norm_{name}"]["scale"], p[f"norm_{name}"]["bias"])  # noqa: E731
    lin = lambda name, t: t @ p[name]["kernel"].reshape(c, c) + p[name]["bias"].reshape(c)  # noqa: E731
    q = lin("q", ln("q", xd.mean(1, keepdims=True)))  # the query: the mean over every token
    k, v = lin("k", ln("k", xd)), lin("v", ln("v", xd))
    hd = c // heads
    split = lambda t: t.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) * hd**-0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    pooled = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, c)
    ref = pooled @ p["proj"]["kernel"].reshape(c, out) + p["proj"]["bias"]
    assert np.max(np.abs(ours - ref)) <= TOL


def test_qllama_masks():
    valid = jnp.asarray([[True, True, True, True, False]])  # 2 queries, 2 text tokens, 1 padding
    m = lambda kind: np.asarray(qllama_mask(kind, 2, valid))[0, 0].astype(int)  # noqa: E731
    np.testing.assert_array_equal(m("full"), np.tile([1, 1, 1, 1, 0], (5, 1)))
    np.testing.assert_array_equal(m("prefix"), [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                                [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(m("separate"), [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                                  [0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(qllama_mask("causal", 0, valid))[0, 0].astype(int),
                                  np.tril(np.ones((5, 5), int)) * [1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="unknown QLLaMA mask kind 'bidirectional'"):
        qllama_mask("bidirectional", 2, valid)


TINY = CLIPConfig(
    vision=VisionConfig(hidden_size=24, num_layers=2, num_heads=2, intermediate_size=48, image_size=28,
                        norm_type="rms_norm", qk_norm=True, qkv_bias=False),
    qllama=TextConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=4,
                      head_dim=8, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True),
    num_query_token=3, cross_attention_frequency=2, clip_embed_dim=8, attn_pool_num_heads=2)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(1)
    params = clip_data.random_params(TINY, seed=1)
    pixels = jnp.asarray(rng.normal(size=(2, 28, 28, 3)), jnp.float32)
    ids = jnp.asarray([[1, 5, 9, 2, 0, 0], [1, 7, 3, 4, 8, 2]], jnp.int32)
    return M(TINY), params, pixels, ids



def test_cross_attention_sits_in_every_frequency_th_layer_and_reaches_the_queries_only(tiny):
    model, params, pixels, ids = tiny
    blocks = params["qllama"]["blocks"]
    # 4 layers in 2 blocks: layers 0 and 2 cross-attend (layer_0 of each block), layers 1 and 3 do not
    assert blocks["layer_0"]["cross_attn"]["k_proj"]["kernel"].shape == (2, 24, 4, 8)
    assert "cross_attn" not in blocks["layer_1"]
    q = TINY.num_query_token
    layer = DecoderLayer(TINY.qllama, jnp.float32, jnp.float32, cross_attention=True)

    @jax.jit
    def run(params):
        v = {"params": params}
        vit = model.apply(v, pixels, method=M.vision_states)
        other = vit[::-1]
        mask = (ids > 0).astype(jnp.int32)
        lp = jax.tree_util.tree_map(lambda a: a[0], params["qllama"]["blocks"]["layer_0"])
        short = jnp.ones((2, q - 1, 32))
        cos = sin = jnp.zeros((2, q - 1, 8))
        full = qllama_mask("full", 0, jnp.ones((2, q - 1), bool))
        return {
            "separate": model.apply(v, vit, ids, mask, "separate", method=M.lm_hidden),
            "separate_other": model.apply(v, other, ids, mask, "separate", method=M.lm_hidden),
            "text_alone": model.apply(v, ids, method=M.text_hidden),
            "queries_alone": model.apply(v, vit, method=M.query_outputs),
            "short": layer.apply({"params": lp}, short, cos, sin, full, vision=vit, num_queries=q)[0],
            "short_other": layer.apply({"params": lp}, short, cos, sin, full, vision=other, num_queries=q)[0],
            "c": model.apply(v, pixels, "InternVL-C", method=M.image_features),
            "g": model.apply(v, pixels, "InternVL-G", method=M.image_features),
            "logits": model.apply(v, pixels, ids, "InternVL-G"),
        }

    out = jax.device_get(run(params))
    # ITC's mask keeps queries and text apart: the text rows equal the text alone (RoPE is relative), whatever the
    # images; the query rows equal the queries alone
    valid = np.asarray(ids > 0)
    sep, sep_other = out["separate"], out["separate_other"]
    np.testing.assert_allclose(sep[:, q:][valid], out["text_alone"][valid], atol=TOL)
    np.testing.assert_allclose(sep[:, :q], out["queries_alone"], atol=TOL)
    np.testing.assert_array_equal(sep_other[:, q:], sep[:, q:])
    assert np.max(np.abs(sep_other[:, :q] - sep[:, :q])) > 1e-3
    # a step shorter than the query block (cached decoding) skips cross-attention, as the original does
    np.testing.assert_array_equal(out["short"], out["short_other"])
    # InternVL-G is a sum of two unit vectors; the logits are scaled cosines, per text the transpose
    norms = np.linalg.norm(out["g"], axis=-1)
    assert out["c"].shape == out["g"].shape == (2, 8) and np.all((norms > 0) & (norms <= 2 + 1e-6))
    per_image, per_text = out["logits"]
    np.testing.assert_array_equal(per_image.T, per_text)
    assert np.max(np.abs(per_image)) <= 1 / 0.07 + 1e-4
    with pytest.raises(ValueError, match="mode must be one of InternVL-C, InternVL-G"):
        model.apply({"params": params}, pixels, "InternVL-H", method=M.image_features)


def _vit_count(v: VisionConfig) -> int:
    c, m, p = v.hidden_size, v.intermediate_size, v.patch_size
    layer = 3 * c * c + 2 * c + (c * c + c) + 2 * c + 2 * c + (c * m + m) + (m * c + c)  # qkv, qk-norm, proj, ls, norms, mlp
    return 3 * p * p * c + c + c + (v.grid**2 + 1) * c + v.num_layers * layer


def _pool_count(c: int, out: int) -> int:
    return 3 * 2 * c + 3 * (c * c + c) + c * out + out


def test_full_size_parameter_count():
    c = CLIP_PRESETS["InternVL-14B-224px"]
    q, e, v = c.qllama, c.qllama.hidden_size, c.vision.hidden_size
    layer = 4 * e * e + 3 * e * q.intermediate_size + 2 * e
    cross = 2 * e * e + 2 * v * e + e + v
    qllama = q.vocab_size * e + q.num_layers * layer + (q.num_layers // 2) * cross + e  # tied head
    expected = (_vit_count(c.vision) + qllama + c.num_query_token * e + e * c.clip_embed_dim + 1
                + _pool_count(v, c.clip_embed_dim) + _pool_count(e, c.clip_embed_dim) + 2 * e + 2)
    assert clip_param_count(c) == expected
    assert 13.5e9 < expected < 14.5e9  # "InternVL-14B": InternViT-6B + QLLaMA-8B
    untied = dataclasses.replace(c, qllama=dataclasses.replace(q, tie_word_embeddings=False))
    assert clip_param_count(untied) == expected + q.vocab_size * e
    assert c.vision == VISION_PRESETS["InternViT-6B-224px"] and c.vision.num_layers == 48
    assert VISION_PRESETS["InternViT-6B-448px-V1-0"].num_layers == 48 and VISION_PRESETS["InternViT-6B-448px-V1-0"].grid == 32
    boxed = abstract_clip_params(c, boxed=True)
    assert boxed["qllama"]["blocks"]["layer_0"]["cross_attn"]["k_proj"]["kernel"].names == (
        "layers", "vit_embed", "heads", "head_dim")


def test_preprocess_crops_for_classification_and_squeezes_for_retrieval():
    # 56 x 28: a red left half and a blue right half, a green centre square
    a = np.zeros((28, 56, 3), np.uint8)
    a[:, :28] = (255, 0, 0)
    a[:, 28:] = (0, 0, 255)
    a[7:21, 21:35] = (0, 255, 0)
    image = Image.fromarray(a)
    cls, ret = preprocess([image], "classification", 14)[0], preprocess([image], "retrieval", 14)[0]
    assert cls.shape == ret.shape == (14, 14, 3)
    pixel = lambda x, i, j: np.round(x[i, j] * IMAGENET_STD + IMAGENET_MEAN, 2)  # noqa: E731
    # the crop keeps the centre 28 x 28: the green square fills its middle, half red / half blue around it
    np.testing.assert_allclose(pixel(cls, 7, 7), [0, 1, 0], atol=0.02)
    np.testing.assert_allclose(pixel(cls, 0, 1), [1, 0, 0], atol=0.02)
    np.testing.assert_allclose(pixel(cls, 0, 12), [0, 0, 1], atol=0.02)
    # the squeeze keeps everything: the green square is half as wide
    np.testing.assert_allclose(pixel(ret, 7, 7), [0, 1, 0], atol=0.02)
    np.testing.assert_allclose(pixel(ret, 7, 4), [1, 0, 0], atol=0.02)
    with pytest.raises(ValueError, match="task must be one of classification, retrieval"):
        preprocess([image], "detection")


def test_tokenize_prefixes_adds_eos_and_truncates_before_it():
    tok = clip_data.WordTokenizer(["summarize: a red circle x"])
    ids = tokenize(tok, ["a red circle", " ".join(["x"] * 100)], max_length=8)
    s, colon, a, red, circle, x = (tok.vocab[w] for w in ("summarize", ":", "a", "red", "circle", "x"))
    np.testing.assert_array_equal(ids, [[1, s, colon, a, red, circle, 2, 0], [1, s, colon, x, x, x, x, 2]])
