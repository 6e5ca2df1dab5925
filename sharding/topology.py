"""Accelerator targets without the accelerator: chip facts, TPU slices as abstract devices, ahead-of-time compiles.

With ``libtpu`` installed (``jax[tpu]``), ``jax.experimental.topologies`` describes a real TPU slice on any host,
even one running JAX on the CPU (``JAX_PLATFORMS=cpu``): its devices cannot run anything, but a program lowered
for a mesh over them compiles with the TPU compiler, which reports exact per-device memory and FLOPs.

Slice names: ``"v5p:4x4x2"`` (chip type and torus shape), or ``"v5p-64"`` / ``"v5e-16"`` / ``"h100-8"`` (the cloud
names: v4 and v5p count TensorCores, two per chip, so v5p-64 = 32 chips = 4x4x2; v5e, v6e and GPUs count chips).
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import jax

from internvl_jax.layers import AUTO_ATTENTION

GiB = 1 << 30


@dataclass(frozen=True)
class Chip:
    """One accelerator type, as a JAX device sees it.

    ``memory``: HBM bytes per device (nominal); ``peak_flops``: dense bfloat16 FLOP/s per device;
    ``torus``: dimensions of the TPU interconnect torus (0 for GPUs); ``cores_in_name``: TensorCores per chip as
    counted by the slice names (v5p-64 = 32 chips); ``chip_config``: libtpu's chip configuration (v4's two
    cores form one "megacore" device, as on a real v4 slice).
    """

    name: str
    memory: int
    peak_flops: float
    torus: int = 0
    cores_in_name: int = 1
    chip_config: str = "default"

    @property
    def platform(self) -> str:
        return "tpu" if self.torus else "gpu"


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", 32 * GiB, 275e12, torus=3, cores_in_name=2, chip_config="megacore"),
    Chip("v5e", 16 * GiB, 197e12, torus=2),
    Chip("v5p", 95 * GiB, 459e12, torus=3, cores_in_name=2),
    Chip("v6e", 32 * GiB, 918e12, torus=2),
    Chip("h100", 80 * GiB, 989e12),
    Chip("h200", 141 * GiB, 989e12),
)}

# Chips per TPU host (the block of a slice one process drives); it only sets the abstract devices'
# process indices, the compiled program does not depend on it.
_HOST_BOUNDS = (2, 2, 1)

# The attention implementation compiled for each platform (``InternVLConfig.attention_impl``): what "auto"
# gives on that platform (layers.AUTO_ATTENTION); "auto" itself would resolve to the CPU's choice here.
TARGET_ATTENTION = {p: AUTO_ATTENTION[p] for p in ("tpu", "gpu")}


@dataclass(frozen=True)
class Slice:
    """``chips`` devices of one chip type; ``shape``: the TPU torus (e.g. (4, 4, 2)), None for GPUs."""

    chip: Chip
    chips: int
    shape: tuple[int, ...] | None

    @property
    def name(self) -> str:
        """The cloud name, e.g. ``v5p-64``."""
        return f"{self.chip.name}-{self.chips * self.chip.cores_in_name}"

    @property
    def topology(self) -> str | None:
        """libtpu's topology name, e.g. ``v5p:4x4x2`` (None for GPUs)."""
        return None if self.shape is None else f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def torus_shape(chip: Chip, chips: int) -> tuple[int, ...]:
    """The torus of a power-of-two slice: doubling one dimension at a time, 3D slices grow their first dimensions
    first (32 chips: 4x4x2), 2D slices their last (8 chips: 2x4), as the cloud slice tables do."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chip.name} slices by chip count need a power of two, got {chips} chips; name the "
                         f"topology instead, e.g. {chip.name}:{'x'.join(['2'] * chip.torus)}")
    shape = [1] * chip.torus
    order = range(chip.torus) if chip.torus == 3 else reversed(range(chip.torus))
    grow = list(order)
    for i in range(int(math.log2(chips))):
        shape[grow[i % chip.torus]] *= 2
    return tuple(shape)


def parse_slice(name: str) -> Slice:
    """``v5p:4x4x2`` (torus), ``v5p-64`` / ``v5e-16`` (cloud name), ``h100-8`` (GPU count) or a bare chip name
    (one device) -> :class:`Slice`."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:([:-])(\d+(?:x\d+)*))?", name.strip().lower())
    chip = CHIPS.get(m.group(1)) if m else None
    if chip is None:
        raise ValueError(f"unknown chips {name!r}; use a chip ({', '.join(CHIPS)}) with a count or TPU torus, "
                         f"e.g. v5p-64, v5p:4x4x2, v5e-16, h100-8")
    sep, spec = m.group(2), m.group(3)
    if sep is None:
        return Slice(chip, 1, torus_shape(chip, 1) if chip.torus else None)
    if sep == ":":
        shape = tuple(int(s) for s in spec.split("x"))
        if 0 in shape:
            raise ValueError(f"chips {name!r}: a torus dimension is 0; expected at least 1 chip along each, "
                             f"e.g. {chip.name}:{'x'.join(['2'] * max(chip.torus, 1))}")
        if not chip.torus or len(shape) != chip.torus:
            raise ValueError(f"{name!r}: {chip.name} " + (f"slices have a {chip.torus}D torus" if chip.torus
                                                          else "is not a TPU; give a count, e.g. h100-8"))
        return Slice(chip, math.prod(shape), shape)
    if "x" not in spec and int(spec) == 0:
        raise ValueError(f"chips {name!r}: a slice of 0 chips; expected at least one, e.g. "
                         f"{chip.name}-{8 * chip.cores_in_name}")
    if "x" in spec or int(spec) % chip.cores_in_name:
        raise ValueError(f"{name!r}: a {chip.name} slice name counts "
                         + ("TensorCores, two per chip (v5p-64 = 32 chips)" if chip.cores_in_name == 2 else "chips"))
    chips = int(spec) // chip.cores_in_name
    return Slice(chip, chips, torus_shape(chip, chips) if chip.torus else None)


def quiet_tpu_runtime() -> None:
    """On a host without TPU chips, tell libtpu that it is one host alone (``TPU_HOST_BOUNDS``,
    ``TPU_WORKER_HOSTNAMES``): otherwise loading it (JAX's backend start-up with ``JAX_PLATFORMS`` unset, or a
    TPU topology for an ahead-of-time compile) prints five lines of errors about the cloud TPU metadata it cannot
    find. Values already set are kept; a host with TPU chips is left to libtpu's own discovery. Compiled
    programs do not change (the topology is given explicitly)."""
    from jax._src import hardware_utils  # the probe JAX's own TPU start-up uses (cloud_tpu_init)

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


@functools.lru_cache(maxsize=None)
def tpu_devices(name: str) -> tuple:
    """The abstract (compile-only) devices of a TPU slice, e.g. ``tpu_devices("v5p-64")``: 32 devices in torus
    order. Needs ``libtpu`` (``jax[tpu]``); works on a host without TPUs. Give them to
    :func:`sharding.make_mesh` (``devices=``) to lower and compile for that slice."""
    s = parse_slice(name)
    if s.shape is None:
        raise ValueError(f"{name!r} is not a TPU slice; abstract devices exist for TPU slices only")
    from jax.experimental import topologies

    # libtpu takes a host-wide lock file so that two processes never drive one TPU; compile-only devices drive
    # nothing, and without this any other JAX process that loaded libtpu (one started without
    # JAX_PLATFORMS=cpu) would make the topology fail
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_tpu_runtime()
    padded = s.shape + (1,) * (3 - len(s.shape))
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=s.topology, chip_config_name=s.chip.chip_config,
            chips_per_host_bounds=tuple(min(h, d) for h, d in zip(_HOST_BOUNDS, padded)), num_slices=1)
    except (RuntimeError, ValueError) as e:  # no libtpu, or a torus libtpu does not know
        raise ValueError(f"cannot describe TPU slice {s.topology} ({name}): {e}; compiling for TPUs needs "
                         f"libtpu (pip install 'jax[tpu]')") from e
    return tuple(topo.devices)


@dataclass(frozen=True)
class CompiledStats:
    """Per-device figures of a compiled program (bytes, FLOPs).

    ``total`` = arguments + outputs - aliased (donated buffers reused for outputs) + temporaries + generated code:
    the HBM the program needs on each device. ``flops``: XLA's count for one device's share of the program.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float

    @property
    def total(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def compiled_stats(compiled) -> CompiledStats:
    """:class:`CompiledStats` of a ``jax.stages.Compiled``."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # one dict per program on older JAX
    return CompiledStats(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                         mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, float(cost.get("flops", 0.0)))


def abstract(tree, shardings_tree):
    """``jax.ShapeDtypeStruct`` leaves carrying the given shardings (arguments for an ahead-of-time lowering).
    ``shardings_tree`` may be a prefix of ``tree``, as ``jax.jit``'s ``in_shardings`` may."""
    def put(s, subtree):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), subtree)

    return jax.tree_util.tree_map(put, shardings_tree, tree)


def compile_for(fn: Callable, args: tuple, in_shardings, out_shardings, *, donate_argnums=(), mesh=None,
                rules=None):
    """Compile ``fn(*args)`` ahead of time for the devices its shardings name (e.g. a mesh over
    :func:`tpu_devices`). ``args``: pytrees of arrays or ``ShapeDtypeStruct`` (only shapes and dtypes are used);
    with ``mesh`` and ``rules``, tracing runs inside :func:`sharding.activate` so the model's activation
    constraints apply. Returns (``jax.stages.Compiled``, :class:`CompiledStats`)."""
    from .place import activate

    abstract_args = abstract(args, in_shardings)
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)
    if mesh is None:
        compiled = jitted.lower(*abstract_args).compile()
    else:
        with activate(mesh, rules):
            compiled = jitted.lower(*abstract_args).compile()
    return compiled, compiled_stats(compiled)


@dataclass(frozen=True)
class Step:
    """A function with abstract arguments (``ShapeDtypeStruct`` pytrees), their shardings, the output shardings
    and the donated argument numbers: everything :func:`compile_for` needs."""

    fn: Callable
    args: tuple
    in_shardings: tuple
    out_shardings: object
    donate: tuple = ()

    def compile(self, mesh, rules):
        """(compiled, :class:`~sharding.topology.CompiledStats`) for the devices of ``mesh``."""
        return compile_for(self.fn, self.args, self.in_shardings, self.out_shardings, donate_argnums=self.donate,
                           mesh=mesh, rules=rules)
