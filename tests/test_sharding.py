"""Sharding by rule tables alone: on 8 CPU devices, every preset x mesh gives the single-device numbers."""

import dataclasses

import jax
import numpy as np
import pytest

import sharding
from internvl_jax.model import InternVL, _dummy_inputs, abstract_params, init_params
from sharding_case import CONFIG, batch, param_shardings, step

TOL = 1e-5  # sharded vs single-device, float32, max abs diff
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


@pytest.fixture(scope="module")
def reference():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    rows = batch()
    (loss, logits), grads = jax.jit(step)(params, rows)
    return params, rows, loss, logits, grads


def test_eight_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("preset", list(sharding.RULES))
@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_sharded_step_equals_single_device(reference, preset, shape):
    params, rows, loss, logits, grads = reference
    mesh = sharding.make_mesh(*shape)
    param_sh = param_shardings(mesh, preset)
    sharded_params = sharding.place(params, param_sh)
    sharded_batch = sharding.shard_batch(rows, mesh, preset)
    with sharding.activate(mesh, preset):
        (s_loss, s_logits), s_grads = jax.jit(step, out_shardings=((None, None), param_sh))(
            sharded_params, sharded_batch)
    np.testing.assert_allclose(s_loss, loss, atol=TOL, rtol=0)
    np.testing.assert_allclose(s_logits, logits, atol=TOL, rtol=0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL, rtol=0), s_grads, grads)
    kernel = s_grads["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.is_equivalent_to(param_sh["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"], 3)


# (path, preset) -> expected PartitionSpec
EXPECTED_SPECS = {
    ("language_model/layers/mlp/gate_proj/kernel", "dp"): (None, None, None),
    ("language_model/layers/mlp/gate_proj/kernel", "fsdp"): (None, ("fsdp", "tensor"), None),
    ("language_model/layers/mlp/gate_proj/kernel", "fsdp_tp"): (None, "fsdp", "tensor"),
    ("language_model/layers/mlp/down_proj/kernel", "fsdp_tp"): (None, "tensor", "fsdp"),
    ("language_model/layers/attn/q_proj/kernel", "fsdp_tp"): (None, "fsdp", "tensor", None),
    ("language_model/layers/attn/k_proj/kernel", "fsdp_tp"): (None, "fsdp", "tensor", None),
    ("language_model/layers/attn/o_proj/kernel", "fsdp_tp"): (None, "tensor", None, "fsdp"),
    ("language_model/embed_tokens", "fsdp_tp"): ("tensor", "fsdp"),
    ("language_model/embed_tokens", "fsdp"): (None, ("fsdp", "tensor")),
    ("vision/layers/attn/qkv/kernel", "fsdp_tp"): (None, "fsdp", None, "tensor", None),
    ("vision/layers/fc1/kernel", "fsdp_tp"): (None, "fsdp", "tensor"),
    ("projector/fc1/kernel", "fsdp_tp"): ("fsdp", "tensor"),
    ("projector/fc2/kernel", "fsdp_tp"): ("tensor", "fsdp"),
}


@pytest.mark.parametrize("path,preset", list(EXPECTED_SPECS))
def test_partition_spec(path, preset):
    specs = sharding.partition_specs(abstract_params(CONFIG, boxed=True), preset)
    node = specs
    for key in path.split("/"):
        node = node[key]
    assert tuple(node) == EXPECTED_SPECS[path, preset]


def test_init_sharded_places_and_equals_plain_init():
    mesh = sharding.make_mesh(1, 4, 2)
    sh = sharding.shardings(abstract_params(CONFIG, boxed=True), mesh, "fsdp_tp")
    model = InternVL(CONFIG)
    params = sharding.init_sharded(lambda r: model.init(r, *_dummy_inputs(CONFIG))["params"], mesh, "fsdp_tp",
                                   jax.random.PRNGKey(3))
    plain = init_params(CONFIG, jax.random.PRNGKey(3))
    jax.tree_util.tree_map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"), params, sh)
    # the same random bits; the normal transform may round 1 ulp differently once partitioned
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8, rtol=0), params, plain)
    shard = params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].addressable_shards[0]
    assert shard.data.shape == (2, 64 // 4, 128 // 2)  # no device holds the full tensor


def test_indivisible_dimension_names_tensor_shape_mesh_and_suggests():
    config = CONFIG.replace(text=dataclasses.replace(CONFIG.text, num_heads=3, num_kv_heads=3, head_dim=16))
    mesh = sharding.make_mesh(1, 4, 2)
    with pytest.raises(sharding.ShardingError) as e:
        sharding.shardings(abstract_params(config, boxed=True), mesh, "fsdp_tp")
    msg = str(e.value)
    assert "tensor language_model/layers/attn/k_proj/bias with shape [2, 3, 16]: dim 1 (size 3) over tensor" in msg
    assert "{'data': 1, 'fsdp': 4, 'tensor': 2}" in msg
    assert "meshes that work: {'data': 1, 'fsdp': 8, 'tensor': 1}" in msg


def test_make_mesh_axes_and_errors():
    assert sharding.mesh_shape(sharding.make_mesh(data=2)) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.mesh_shape(sharding.make_mesh(1, 2, -1)) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert sharding.mesh_shape(sharding.make_mesh(data=2, fsdp=4, dcn_data=2)) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(1, 3, 2)
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh(3, -1, 1)
    with pytest.raises(ValueError, match="unknown sharding preset 'zero'"):
        sharding.get_rules("zero")
