"""Device meshes with the axes ``data``, ``fsdp`` and ``tensor``.

``make_mesh`` orders the devices for the physical topology (``jax.experimental.mesh_utils``): within a slice
the mesh follows the ICI torus; for multi-slice TPU the ``dcn_*`` factors split an axis across slices, so only
that axis's collectives cross the slower data-centre network.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from .rules import MESH_AXES


def _resolve(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    """Replace the one -1 in ``sizes`` by what is left of ``total``; check the product. ``what``: the mesh's name
    in messages (``mesh``, ``per-slice mesh``)."""
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one {what} axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{what} sizes {sizes}: expected positive sizes (or one -1 for the rest of the devices)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ValueError(f"{total} devices cannot be split into {what} axes {sizes}")
        sizes[sizes.index(-1)] = total // known
    if math.prod(sizes) != total:
        raise ValueError(
            f"{what} {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but there are {total}"
        )
    return tuple(sizes)


def _num_slices(devices) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, dcn_data: int = 1, dcn_fsdp: int = 1,
              devices: Sequence | None = None) -> Mesh:
    """A mesh with axes (``data``, ``fsdp``, ``tensor``) over ``devices`` (default: all of ``jax.devices()``).

    One of ``data``/``fsdp``/``tensor`` may be -1 for the rest of the devices. These are the sizes *within* one
    slice times the ``dcn_*`` factors across slices: ``make_mesh(data=2, fsdp=-1, dcn_data=2)`` on two v5p-64
    slices puts ``data`` = 2 x 2 with the across-slice factor outermost. ``tensor`` never crosses slices.
    Devices may be abstract ones from :func:`sharding.topology.tpu_devices` (compiling ahead of time).
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = (dcn_data, dcn_fsdp, 1)
    slices = math.prod(dcn)
    if len(devices) % slices:
        raise ValueError(f"{len(devices)} devices cannot form {slices} slices (dcn_data x dcn_fsdp)")
    per_slice = _resolve((data, fsdp, tensor), len(devices), "mesh") if slices == 1 else None
    if slices > 1:
        ici = _resolve([s if s == -1 else s // d for s, d in zip((data, fsdp, tensor), dcn)], len(devices) // slices,
                       "per-slice mesh")
        if _num_slices(devices) == slices:
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        else:  # no slice information (CPU, or abstract devices of one slice): slices are contiguous device blocks
            grid = np.asarray(devices).reshape(*dcn, *ici).transpose(0, 3, 1, 4, 2, 5).reshape(
                [a * b for a, b in zip(dcn, ici)])
        return Mesh(grid, MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(per_slice, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # a shape the topology helper cannot map
        grid = np.asarray(devices).reshape(per_slice)
    return Mesh(grid, MESH_AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """{axis name: size}, e.g. ``{"data": 1, "fsdp": 8, "tensor": 1}``."""
    return dict(zip(mesh.axis_names, mesh.devices.shape))
