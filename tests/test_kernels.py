"""The CPU decoding kernels (internvl_jax.kernels), each against a float64 reference in float32 and bfloat16, over
the tails of every tile and step size, with its gradients and the XLA fallback it replaces:

* few_row_product: x [M, K] . w [N, K]^T;
* decode_attention: one query token per row over a masked KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax import kernels
from internvl_jax.layers import dot_out_in
from internvl_jax.target import target_platform

# float32 sums of K products: within K * eps of sum |x w| (a bound, not a loosened tolerance)
REL = lambda k: k * np.finfo(np.float32).eps  # noqa: E731

SHAPES = [  # (M, K, N): tiles of 24/12/6/3 weight rows and their tails, K steps of 16 and 32, what is left, K = 0
    (1, 896, 136), (1, 64, 7), (2, 0, 5), (2, 40, 48), (3, 17, 9), (5, 100, 33), (8, 96, 64), (9, 33, 40), (16, 128, 17),
]


def reference(x, w):
    xf, wf = np.asarray(x, np.float64), np.asarray(w.astype(jnp.float32), np.float64)
    return xf @ wf.T, np.abs(xf) @ np.abs(wf).T


def test_the_kernels_are_built_and_used():
    # CI has a compiler: the tests below exercise the kernels, not the fallbacks
    assert kernels.cpu_kernels_enabled()
    x, w = jnp.ones((1, 32), jnp.bfloat16), jnp.ones((8, 32), jnp.bfloat16)
    assert "internvl_matvec" in jax.jit(kernels.few_row_product).lower(x, w).as_text()
    q, kv, mask = jnp.ones((1, 1, 4, 16)), jnp.ones((1, 2, 8, 16)), jnp.ones((1, 8), bool)
    assert "internvl_cache_attention" in jax.jit(attend).lower(q, kv, kv, mask).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_product_equals_float64_reference(dtype, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k)), dtype)
    got = jax.jit(kernels.few_row_product)(x, w)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    expected, scale = reference(x, w)
    assert (np.abs(np.asarray(got, np.float64) - expected) <= REL(k) * scale + 1e-30).all()


def test_gradients_equal_the_matmul_gradients():
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32), jnp.asarray(rng.standard_normal((24, 40)))
    g = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)  # noqa: E731
    got = jax.grad(loss(kernels.few_row_product), argnums=(0, 1))(x, w)
    expected = jax.grad(loss(lambda x, w: x @ w.T), argnums=(0, 1))(x, w)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_rows_beyond_the_kernel_take_the_matmul():
    rng = np.random.default_rng(1)
    kernel = jnp.asarray(rng.standard_normal((48, 64)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((kernels.MAX_ROWS + 1, 64)), jnp.bfloat16)
    many = jax.jit(lambda x: dot_out_in(x, kernel, jnp.bfloat16, jnp.float32))
    assert "internvl_matvec" not in many.lower(x).as_text()
    few = dot_out_in(x[:2], kernel, jnp.bfloat16, jnp.float32)
    np.testing.assert_allclose(few, many(x)[:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 2], ids=["multiply-and-sum", "matmul"])
def test_fallbacks_without_the_kernel_equal_it(monkeypatch, m):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((m, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((48, 64)), jnp.bfloat16)
    with_kernel = jax.jit(lambda x, w: kernels.few_row_product(x, w))(x, w)
    monkeypatch.setattr(kernels, "cpu_kernels_enabled", lambda: False)
    jax.clear_caches()  # traces of the branches are cached by function
    fallback = jax.jit(lambda x, w: kernels.few_row_product(x, w))
    assert "internvl_matvec" not in fallback.lower(x, w).as_text()
    np.testing.assert_allclose(fallback(x, w), with_kernel, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    jax.clear_caches()


# ---------------------------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------------------------

SCALE = 0.3
attend = jax.jit(lambda q, k, v, mask: kernels.decode_attention(q, k, v, mask, scale=SCALE))
# float32 scores, exp and sums of S terms against float64: within ATOL of outputs of order 1 (bfloat16 outputs
# are rounded once more, by 2^-8 of their size)
ATOL = 1e-5

ATTENTION_SHAPES = [  # (B, H, K, S, D): D and S in and off steps of 16, groups of 1, 7 and 18 heads (3 blocks of 8)
    (1, 14, 2, 448, 64), (2, 4, 4, 37, 20), (3, 18, 1, 16, 3), (1, 7, 1, 5, 128),
]


def attention_reference(q, k, v, mask):
    """float64 softmax attention of q [B, 1, H, D] over the slots ``mask`` [B, S] allows; equal weights over every
    slot where it allows none."""
    q, k, v = (np.asarray(a.astype(jnp.float32), np.float64) for a in (q, k, v))
    b, _, h, d = q.shape
    kv = k.shape[1]
    mask = np.asarray(mask)
    qg = q.reshape(b, kv, h // kv, d)
    scores = np.einsum("bkgd,bksd->bkgs", qg, k) * SCALE
    scores = np.where(mask[:, None, None], scores, -np.inf)
    scores[~mask.any(axis=1)] = 0.0
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, h, d)


def attention_inputs(shape, dtype, seed):
    b, h, kv, s, d = shape
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(x), dtype) for x in ((b, 1, h, d), (b, kv, s, d), (b, kv, s, d)))
    mask = rng.random((b, s)) < 0.6
    if b > 1:
        mask[0, :20] = False  # left padding: whole blocks of 16 slots with none allowed
        mask[-1] = False  # a row with no slot to attend to averages them all
    return q, k, v, jnp.asarray(mask)


def assert_near_reference(got, q, k, v, mask):
    expected = attention_reference(q, k, v, mask)
    rounding = 0 if got.dtype == jnp.float32 else 2.0**-8 * np.abs(expected)
    assert (np.abs(np.asarray(got, np.float64) - expected) <= ATOL + rounding).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_equals_float64_reference(dtype, shape):
    q, k, v, mask = attention_inputs(shape, dtype, sum(shape))
    got = attend(q, k, v, mask)
    assert got.dtype == dtype and got.shape == q.shape
    assert_near_reference(got, q, k, v, mask)


def test_attention_over_an_empty_cache_is_zero():
    got = attend(jnp.ones((2, 1, 4, 8)), jnp.ones((2, 2, 0, 8)), jnp.ones((2, 2, 0, 8)), jnp.ones((2, 0), bool))
    np.testing.assert_array_equal(got, np.zeros((2, 1, 4, 8)))


def test_attention_gradients_equal_the_xla_gradients():
    q, k, v, mask = attention_inputs((2, 4, 2, 24, 16), jnp.float32, 3)
    g = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask, scale=SCALE) * g)  # noqa: E731
    got = jax.grad(loss(kernels.decode_attention), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(kernels.xla_decode_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_attention_fallback_without_the_kernel_meets_the_same_bound(monkeypatch):
    q, k, v, mask = attention_inputs((2, 14, 2, 40, 64), jnp.bfloat16, 5)
    with_kernel = attend(q, k, v, mask)
    monkeypatch.setattr(kernels, "cpu_kernels_enabled", lambda: False)
    jax.clear_caches()
    fallback = jax.jit(lambda q, k, v, mask: kernels.decode_attention(q, k, v, mask, scale=SCALE))
    assert "internvl_cache_attention" not in fallback.lower(q, k, v, mask).as_text()
    for got in (with_kernel, fallback(q, k, v, mask)):  # both within the bound of the float64 reference
        assert_near_reference(got, q, k, v, mask)
    monkeypatch.undo()
    jax.clear_caches()


def test_traces_for_a_gpu_or_tpu_never_build_the_kernels(monkeypatch):
    # JAX traces the CPU branch of a platform-dependent function for every platform; on a GPU or TPU host that
    # branch must neither build the CPU kernels nor keep a trace that a later CPU trace would reuse
    asked = []
    monkeypatch.setattr(kernels, "cpu_kernels_enabled", lambda: asked.append(1) or True)
    jax.clear_caches()
    x, w = jnp.ones((1, 32), jnp.bfloat16), jnp.ones((8, 32), jnp.bfloat16)
    q, kv, mask = jnp.ones((1, 1, 4, 16)), jnp.ones((1, 2, 8, 16)), jnp.ones((1, 8), bool)
    for platform in ("gpu", "tpu"):
        with target_platform(platform):
            jax.jit(lambda x, w: kernels.few_row_product(x, w)).trace(x, w)
            jax.jit(lambda *a: kernels.decode_attention(*a, scale=SCALE)).trace(q, kv, kv, mask)
    assert asked == []
    assert "internvl_matvec" in jax.jit(lambda x, w: kernels.few_row_product(x, w)).lower(x, w).as_text()
    assert "internvl_cache_attention" in jax.jit(lambda *a: kernels.decode_attention(*a, scale=SCALE)).lower(
        q, kv, kv, mask).as_text()
    assert len(asked) == 2
    monkeypatch.undo()
    jax.clear_caches()
