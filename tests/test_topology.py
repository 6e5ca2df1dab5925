"""TPU slices without a TPU: libtpu describes a slice on this CPU host, and the tiny model's sharded forward, train
step and decode step compile for it with every rule preset, attention through the splash kernel."""

import jax
import optax
import pytest
from flax import linen as nn

import sharding
from internvl_jax.model import abstract_params
from sharding import plan as steps
from sharding.topology import CompiledStats, compile_for, parse_slice, torus_shape, tpu_devices

TARGETS = ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
MESHES = {"dp": (4, 1, 1), "fsdp": (1, 4, 1), "fsdp_tp": (1, 2, 2)}
CONFIG = steps.target_config("tiny-qwen2", dtype="float32")


@pytest.mark.parametrize("name,kind,chips,topology", [
    ("v5p-64", "TPU v5", 32, "v5p:4x4x2"),
    ("v5p:4x4x2", "TPU v5", 32, "v5p:4x4x2"),
    ("v5e-16", "TPU v5 lite", 16, "v5e:4x4"),
    ("v6e-8", "TPU v6 lite", 8, "v6e:2x4"),
    ("v4-16", "TPU v4", 8, "v4:2x2x2"),  # one megacore device per chip
    ("v5p:2x2x1", "TPU v5", 4, "v5p:2x2x1"),
])
def test_slices_give_abstract_devices(name, kind, chips, topology):
    assert parse_slice(name).topology == topology
    devices = tpu_devices(name)
    assert len(devices) == chips and {d.device_kind for d in devices} == {kind}
    assert jax.devices()[0].platform == "cpu"  # the CPU backend is untouched
    mesh = sharding.make_mesh(1, -1, 1, devices=devices)
    assert sharding.mesh_shape(mesh) == {"data": 1, "fsdp": chips, "tensor": 1}


def test_slice_names():
    assert parse_slice("h100-8").chips == 8 and parse_slice("h100-8").topology is None
    assert parse_slice("v5p-64").name == "v5p-64" and parse_slice("v5e:2x2").name == "v5e-4"
    assert torus_shape(sharding.CHIPS["v5p"], 16) == (4, 2, 2)
    for bad, msg in [("v9-8", "unknown chips"), ("v5p-63", "TensorCores"), ("v5e:2x2x2", "2D torus"),
                     ("v5e-12", "power of two"), ("h100:2x2", "not a TPU")]:
        with pytest.raises(ValueError, match=msg):
            parse_slice(bad)
    with pytest.raises(ValueError, match="not a TPU slice"):
        tpu_devices("h100-8")


def test_optimizer_state_keeps_logical_axes():
    state = jax.eval_shape(optax.adamw(1e-4).init, abstract_params(CONFIG, boxed=True))
    mu = state[0].mu["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert isinstance(mu, nn.LogicallyPartitioned) and mu.names == ("layers", "embed", "mlp")


def _check(stats: CompiledStats):
    assert stats.argument_bytes > 0 and stats.flops > 0 and stats.total > stats.argument_bytes - stats.alias_bytes


# every chip and every rule preset, each pair of the grid in this test or in test_train_step's compile test
TARGET_RULES = [(t, r) for i, t in enumerate(TARGETS) for j, r in enumerate(sharding.RULES) if i != j]


@pytest.mark.parametrize("target,rules", TARGET_RULES)
def test_tiny_steps_compile_for_tpu(target, rules):
    mesh = sharding.make_mesh(*MESHES[rules], devices=tpu_devices(target))
    assert CONFIG.attention_impl == "splash"  # the TPU target's attention: the Pallas kernel, per shard
    train = steps.train_step(CONFIG, mesh, rules, rows=4, seq_len=16, tiles=2)
    compiled, stats = train.compile(mesh, rules)
    _check(stats)
    assert stats.alias_bytes > 0  # params and optimizer state updated in place
    # splash forward and backward kernels (segment ids from the rows) for the ViT and the decoder
    assert compiled.as_text().count("tpu_custom_call") >= 4
    compiled, stats = steps.forward_step(CONFIG, mesh, rules, rows=4, seq_len=16, tiles=2).compile(mesh, rules)
    _check(stats)
    assert "tpu_custom_call" in compiled.as_text()
    _check(steps.decode_step(CONFIG, mesh, rules, rows=4, cache_len=32).compile(mesh, rules)[1])


def test_compile_for_a_plain_function():
    mesh = sharding.make_mesh(1, 4, 1, devices=tpu_devices("v5e:2x2"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    x = jax.ShapeDtypeStruct((512, 256), jax.numpy.bfloat16)
    _, stats = compile_for(lambda a: a @ a.T, (x,), (spec,), spec)
    assert stats.argument_bytes == 512 * 256 * 2 // 4 and stats.output_bytes == 512 * 512 * 2 // 4
    assert stats.flops == 2 * 512 * 512 * 256 / 4  # XLA counts one device's share
