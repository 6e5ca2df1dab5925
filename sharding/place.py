"""Placing params, optimizer state, batches and the KV cache on a mesh, by logical-axis rules alone.

Every array's sharding comes from the logical axis names the model gave it (``nn.LogicallyPartitioned`` boxes,
e.g. from ``abstract_params(config, boxed=True)``) and a rule table (:mod:`sharding.rules`); nothing here knows
the model's structure. A dimension that its mesh axes do not divide is an error naming the tensor, its shape and
the mesh, with mesh shapes that would work.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internvl_jax.target import target_platform

from .mesh import mesh_shape
from .rules import MESH_AXES, RULES, Rules, get_rules


class ShardingError(ValueError):
    """A tensor whose dimensions its mesh axes do not divide (the message names tensor, shape, mesh)."""


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def logical_axes(tree):
    """Per array, its tuple of logical axis names (None = unnamed; plain arrays: all None). The result has the
    structure of ``nn.unbox(tree)`` with tuples as leaves."""
    return jax.tree_util.tree_map(
        lambda x: tuple(x.names) if _is_box(x) else (None,) * len(np.shape(x)), tree, is_leaf=_is_box)


def _is_axes(x) -> bool:
    # exactly a tuple: optax's empty NamedTuple states (EmptyState) are tree nodes, not axes
    return type(x) is tuple and all(a is None or isinstance(a, str) for a in x)


def partition_specs(tree, rules: str | Rules):
    """The mesh ``PartitionSpec`` of every array of a boxed tree under a rule table."""
    rules = get_rules(rules)
    return jax.tree_util.tree_map(lambda axes: nn.logical_to_mesh_axes(axes, rules), logical_axes(tree),
                                  is_leaf=_is_axes)


def mesh_axes_size(sizes: dict[str, int], axes) -> int:
    """How many ways one dimension is split: the product of its mesh axes' sizes (``axes``: a name, a tuple of
    names or None)."""
    if axes is None:
        return 1
    return math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _first_indivisible(tree, specs, sizes: dict[str, int]) -> str | None:
    """A description of the first array that ``sizes`` does not divide, or None."""
    shapes = jax.tree_util.tree_leaves_with_path(nn.unbox(tree))
    for (path, leaf), spec in zip(shapes, jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))):
        bad = [i for i, axes in enumerate(spec) if leaf.shape[i] % mesh_axes_size(sizes, axes)]
        if bad:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            dims = ", ".join(f"dim {i} (size {leaf.shape[i]}) over {spec[i]}" for i in bad)
            return f"tensor {name} with shape {list(leaf.shape)}: {dims}"
    return None


def working_meshes(tree, num_devices: int, rules: str | Rules, limit: int = 4) -> list[dict[str, int]]:
    """Mesh shapes {data, fsdp, tensor} over ``num_devices`` on which every array of ``tree`` divides, the most
    sharded (fewest data replicas, then most fsdp) first."""
    specs = partition_specs(tree, rules)
    found = []
    for data, fsdp in itertools.product(range(1, num_devices + 1), repeat=2):
        if num_devices % (data * fsdp) == 0:
            sizes = dict(zip(MESH_AXES, (data, fsdp, num_devices // (data * fsdp))))
            if _first_indivisible(tree, specs, sizes) is None:
                found.append(sizes)
    return sorted(found, key=lambda s: (s["data"], -s["fsdp"]))[:limit]


def _rules_name(rules: Rules) -> str:
    return next((name for name, table in RULES.items() if table == rules), "(custom rules)")


def shardings(tree, mesh: Mesh, rules: str | Rules):
    """``NamedSharding`` for every array of a boxed tree (params, optimizer state, ... from ``jax.eval_shape``);
    the result has the unboxed tree's structure. Raises :class:`ShardingError` when a dimension does not
    divide, suggesting mesh shapes that work."""
    rules = get_rules(rules)
    specs = partition_specs(tree, rules)
    problem = _first_indivisible(tree, specs, mesh_shape(mesh))
    if problem:
        ok = working_meshes(tree, mesh.devices.size, rules)
        hint = f"; meshes that work: {', '.join(map(str, ok))}" if ok else "; no mesh of this size works"
        raise ShardingError(f"{problem} does not divide on mesh {mesh_shape(mesh)} with rules "
                            f"{_rules_name(rules)}{hint}")
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: str | Rules):
    """Within this context, the model's activation constraints (``nn.with_logical_constraint``) apply ``rules``
    on ``mesh``, and attention kernels are chosen for the mesh's platform. Trace (jit) the model inside it."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules(rules)), target_platform(mesh.devices.flat[0].platform):
        yield


def init_sharded(init_fn: Callable, mesh: Mesh, rules: str | Rules, *args):
    """Run ``init_fn(*args)`` (returning a boxed tree, e.g. ``model.init``'s ``params``) under jit with every output
    created in its sharding: no device ever holds a full tensor that is meant to be split."""
    boxed = jax.eval_shape(init_fn, *args)
    out = shardings(boxed, mesh, rules)
    with activate(mesh, rules):
        return jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=out)(*args)


def batch_spec(ndim: int, rules: str | Rules) -> PartitionSpec:
    """The spec of a batch-leading array with ``ndim`` dimensions (only the batch dimension is split)."""
    return nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), get_rules(rules))


def shard_batch(batch, mesh: Mesh, rules: str | Rules):
    """Host arrays of this process's rows (a dict or tree of numpy arrays, batch first) -> global arrays split
    over the batch mesh axes. With several processes each passes its own rows
    (``jax.make_array_from_process_local_data``); the global batch is their concatenation."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(x.ndim, rules)), x)

    return jax.tree_util.tree_map(one, batch)


def place(tree, shardings_tree):
    """Put host arrays (numpy or jax) into the given shardings, each process filling only its own devices."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x[idx])), tree,
        shardings_tree)
