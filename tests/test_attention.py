"""internvl_jax.attention: every backend equals the xla reference (dense mask + layers.attention) on the valid query
positions, forward and gradients, with packed segments, right padding, GQA, causal and not, lengths that are not
multiples of the blocks; the splash kernel runs in the Pallas interpreter here and compiles ahead of time for a TPU;
the CPU kernel (cpu_flash, adaptive's choice on the CPU) runs here, whole and per shard on a mesh.

Tolerance: max abs diff <= TOL (float32), outputs and gradients alike.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax import attention, kernels, layers
from internvl_jax.attention import ADAPTIVE_BLOCK, IMPLS, adaptive_impl, attend, segment_mask
from internvl_jax.target import target_platform

TOL = 1e-5
B, L, H, K, D = 2, 200, 4, 2, 32  # L: not a multiple of the blocks below nor of splash's 128
SCALE = D**-0.5
OPTIONS = {  # small blocks so that several q and KV blocks (and the padding of the last) are exercised
    "xla": {}, "batched": {}, "per_kv_head": {}, "dot_product": {}, "adaptive": {}, "cpu_flash": {},
    "blockwise": dict(block_q=64, block_kv=48),
    "splash": dict(block_q=128, block_kv=128),
}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, h, D)), jnp.float32) for h in (H, K, K))
    seg = np.zeros((B, L), np.int32)
    seg[0, :70], seg[0, 70:150], seg[0, 150:190] = 1, 2, 3  # three packed samples, then padding
    seg[1, :130] = 5  # one sample, right-padded
    return q, k, v, jnp.asarray(seg)


def _run(impl, q, k, v, seg, causal):
    return attend(q, k, v, seg, seg, scale=SCALE, causal=causal, impl=impl, **OPTIONS[impl])


def test_segment_mask():
    seg = jnp.asarray([[1, 1, 2, 0]])
    expected = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]  # causal, per segment, padding never a key
    assert np.array_equal(segment_mask(seg, seg, causal=True)[0, 0], np.asarray(expected, bool))
    assert np.array_equal(segment_mask(seg, seg, causal=False)[0, 0, 0], [True, True, False, False])


def test_reference_is_layers_attention():
    q, k, v, seg = _inputs()
    out = attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="batched")
    ref = layers.attention(q, k, v, segment_mask(seg, seg, causal=True), scale=SCALE, impl="batched")
    valid = np.asarray(seg) != 0
    assert np.array_equal(np.asarray(out)[valid], np.asarray(ref)[valid])
    assert not np.asarray(out)[~valid].any()  # padding rows are zeros


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "xla"])
def test_forward_matches_reference(impl, causal):
    q, k, v, seg = _inputs()
    ref = _run("xla", q, k, v, seg, causal)
    out = _run(impl, q, k, v, seg, causal)
    valid = np.asarray(seg) != 0
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.abs(np.asarray(out) - np.asarray(ref))[valid].max() <= TOL
    assert not np.asarray(out)[~valid].any()


@pytest.mark.parametrize("impl", ["dot_product", "blockwise", "splash", "cpu_flash"])
def test_vit_no_segments(impl):
    """The ViT: non-causal, no padding; segment ids None (no mask) equals all-ones segment ids."""
    q, k, v, _ = _inputs(1)
    ones = jnp.ones((B, L), jnp.int32)
    ref = attend(q, k, v, ones, ones, scale=SCALE, causal=False, impl="xla")
    dense = layers.attention(q, k, v, None, scale=SCALE)
    assert np.abs(np.asarray(ref) - np.asarray(dense)).max() <= TOL
    for seg in (None, ones):
        out = attend(q, k, v, seg, seg, scale=SCALE, causal=False, impl=impl, **OPTIONS[impl])
        assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= TOL


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["blockwise", "splash", "cpu_flash"])
def test_gradients_match_reference(impl, causal):
    q, k, v, seg = _inputs(2)
    w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    w = w * (seg != 0)[:, :, None, None]  # valid positions only

    def grads(name):
        loss = lambda q, k, v: jnp.sum(_run(name, q, k, v, seg, causal) * w)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(impl), grads("xla")):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL


def test_blockwise_options_keep_gradients():
    """No block skipping, whole query blocks rematerialised: same outputs and gradients."""
    q, k, v, seg = _inputs(5)
    w = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32) * (seg != 0)[:, :, None, None]

    def value_and_grads(impl, **opts):
        def loss(q, k, v):
            return jnp.sum(attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl=impl, **opts) * w)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got = value_and_grads("blockwise", block_q=64, block_kv=48, skip_masked_blocks=False, remat_q_blocks=True)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(value_and_grads("xla"))):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= TOL * max(1.0, float(np.abs(np.asarray(b)).max()))


def test_blockwise_default_blocks_and_bfloat16():
    """Default (512) blocks clip to short lengths; a 16-bit input gives a 16-bit output close to the reference."""
    q, k, v, seg = _inputs(4)
    valid = np.asarray(seg) != 0
    out = attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="blockwise")
    ref = attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="xla")
    assert np.abs(np.asarray(out) - np.asarray(ref))[valid].max() <= TOL
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out16 = attend(qb, kb, vb, seg, seg, scale=SCALE, causal=True, impl="blockwise")
    assert out16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out16, np.float32) - np.asarray(ref))[valid].max() <= 5e-2


def test_adaptive_choice():
    """The CPU kernel where it is available; without it blockwise where a mask can leave whole blocks empty (causal
    or packed, two blocks or more), dense otherwise."""
    two = 2 * ADAPTIVE_BLOCK
    assert adaptive_impl(two, causal=True, segmented=True, kernel=True) == "cpu_flash"
    assert adaptive_impl(8, causal=False, segmented=False, kernel=True) == "cpu_flash"
    assert adaptive_impl(two, causal=True, segmented=False) == "blockwise"
    assert adaptive_impl(two, causal=False, segmented=True) == "blockwise"
    assert adaptive_impl(two - 1, causal=True, segmented=True) == "per_kv_head"  # one block (and a bit): no skip
    assert adaptive_impl(8 * two, causal=False, segmented=False) == "per_kv_head"  # the ViT: nothing masked


@pytest.mark.parametrize("kernel", [True, False])
def test_adaptive_long_rows_match_reference(kernel, monkeypatch):
    """At 2.5 blocks ``adaptive`` runs the CPU kernel, or without it blockwise (its blocks, the last one padded):
    outputs and gradients equal the reference on packed rows, causal."""
    monkeypatch.setattr(attention, "cpu_kernel_available", lambda: kernel)
    rng = np.random.default_rng(7)
    length = 2 * ADAPTIVE_BLOCK + ADAPTIVE_BLOCK // 2
    q, k, v = (jnp.asarray(rng.standard_normal((B, length, h, D)), jnp.float32) for h in (H, K, K))
    seg = np.zeros((B, length), np.int32)
    seg[0, :300], seg[0, 300:600] = 1, 2
    seg[1, :] = 4
    seg = jnp.asarray(seg)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * (seg != 0)[:, :, None, None]

    def value_and_grads(impl):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl=impl) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    text = jax.jit(lambda q, k, v: attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="adaptive")).lower(
        q, k, v).as_text()
    assert ("internvl_flash_forward" in text) == kernel
    got, want = value_and_grads("adaptive"), value_and_grads("xla")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= TOL * max(1.0, float(np.abs(np.asarray(b)).max()))


def test_cpu_flash_bfloat16_and_long_heads():
    """A 16-bit input is computed in float32 and returned in 16 bits; head dims past 128 and not multiples of 16,
    lengths of q and k that differ (cross attention, not causal)."""
    q, k, v, seg = _inputs(8)
    valid = np.asarray(seg) != 0
    ref = attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="xla")
    out16 = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, seg, scale=SCALE, causal=True, impl="cpu_flash")
    assert out16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out16, np.float32) - np.asarray(ref))[valid].max() <= 5e-2
    rng = np.random.default_rng(9)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
               ((2, 70, 2, 136), (2, 150, 1, 136), (2, 150, 1, 136)))
    def grads(impl):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, scale=0.1, causal=False, impl=impl)))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads("cpu_flash"), grads("xla")):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL


def test_cpu_flash_per_shard_on_a_mesh():
    """Under a mesh and logical rules the kernel runs on each device's shard of the batch and heads (shard_map):
    no gather, the same outputs and gradients as on one device; a batch the mesh does not divide (an init's one
    row) and heads it does not divide stay whole."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    import sharding

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    q, k, v, seg = _inputs(10)
    w = jnp.asarray(np.random.default_rng(11).standard_normal(q.shape), jnp.float32) * (seg != 0)[:, :, None, None]

    def value_and_grads(q, k, v):
        def loss(q, k, v):
            return jnp.sum(attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="cpu_flash") * w)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    want = jax.jit(value_and_grads)(q, k, v)
    with sharding.activate(mesh, "fsdp_tp"):
        heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        fn = jax.jit(value_and_grads, in_shardings=(heads, heads, heads))
        assert "all-gather" not in fn.lower(q, k, v).compile().as_text()
        got = fn(q, k, v)
        one_row = jax.jit(lambda q, k, v: attend(q, k, v, seg[:1], seg[:1], scale=SCALE, causal=True,
                                                 impl="cpu_flash"))(q[:1], k[:1, :, :1], v[:1, :, :1])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= TOL * max(1.0, float(np.abs(np.asarray(b)).max()))
    ref = attend(q[:1], k[:1, :, :1], v[:1, :, :1], seg[:1], seg[:1], scale=SCALE, causal=True, impl="xla")
    assert np.abs(np.asarray(one_row) - np.asarray(ref)).max() <= TOL


def test_cpu_flash_only_in_cpu_traces(monkeypatch):
    """A trace for a TPU never calls the CPU kernel: ``adaptive`` takes the XLA path, ``cpu_flash`` is refused."""
    q, k, v, seg = _inputs()
    built = []
    monkeypatch.setattr(kernels, "cpu_kernels_enabled", lambda: built.append(1) or True)
    with target_platform("tpu"):
        text = jax.jit(lambda q, k, v: attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="adaptive")).lower(
            q, k, v).as_text()
        with pytest.raises(ValueError, match="CPU only"):
            attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="cpu_flash")
    assert "internvl_flash" not in text and not built


def test_bad_arguments():
    q, k, v, seg = _inputs()
    with pytest.raises(ValueError, match="unknown attention impl"):
        attend(q, k, v, seg, seg, scale=SCALE, causal=True, impl="flash")
    with pytest.raises(ValueError, match="multiple"):
        attend(q[:, :, :3], k, v, seg, seg, scale=SCALE, causal=True)
    with pytest.raises(ValueError, match="both segment ids"):
        attend(q, k, v, seg, None, scale=SCALE, causal=True)


def test_splash_compiles_for_tpu():
    """The real (not interpreted) splash kernel, forward and backward with segment ids, compiled by the TPU compiler
    for one abstract v5e device (sharding.topology; libtpu on this CPU host)."""
    from sharding.topology import tpu_devices

    mesh = jax.sharding.Mesh(np.array(tpu_devices("v5e:2x2")[:1]), ("x",))  # libtpu is a test requirement
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    l, d = 200, 64
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
    args = (spec((1, l, H, d)), spec((1, l, K, d)), spec((1, l, K, d)), spec((1, l), jnp.int32))

    def fwd(q, k, v, seg):
        return attend(q, k, v, seg, seg, scale=d**-0.5, causal=True, impl="splash", interpret=False)

    def grad(q, k, v, seg):
        return jax.grad(lambda *x: jnp.sum(fwd(*x, seg).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    for fn in (fwd, grad):
        compiled = jax.jit(fn).lower(*args).compile()
        assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, not an XLA fallback
        assert compiled.memory_analysis().temp_size_in_bytes > 0
