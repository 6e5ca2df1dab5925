"""The CPU decoding kernel (internvl_jax.kernels): x [M, K] . w [N, K]^T against a float64 reference, for float32
and bfloat16 weights, tails of every tile and step size, its gradients, and the XLA fallbacks it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax import kernels
from internvl_jax.layers import dot_out_in

# float32 sums of K products: within K * eps of sum |x w| (a bound, not a loosened tolerance)
REL = lambda k: k * np.finfo(np.float32).eps  # noqa: E731

SHAPES = [  # (M, K, N): tiles of 8/4/2 rows and their tails, K steps of 16 and 32, what is left of them, K = 0
    (1, 896, 136), (1, 64, 7), (2, 0, 5), (2, 40, 48), (3, 17, 9), (5, 100, 33), (8, 96, 64), (9, 33, 40), (16, 128, 17),
]


def reference(x, w):
    xf, wf = np.asarray(x, np.float64), np.asarray(w.astype(jnp.float32), np.float64)
    return xf @ wf.T, np.abs(xf) @ np.abs(wf).T


def test_the_kernel_is_built_and_used():
    # CI has a compiler: the tests below exercise the kernel, not the fallback
    assert kernels.cpu_kernels_enabled()
    x, w = jnp.ones((1, 32), jnp.bfloat16), jnp.ones((8, 32), jnp.bfloat16)
    assert "internvl_matvec" in jax.jit(kernels.few_row_product).lower(x, w).as_text()


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
