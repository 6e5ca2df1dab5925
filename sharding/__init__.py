"""Meshes and logical-axis rules. The model names every parameter and main activation with these logical axes;
rule tables here map them onto mesh axes.

Parameters: ``vocab``, ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ``layers`` (the scanned axis),
``vit_embed``, ``vit_mlp``, ``vit_heads``, ``vit_shuffled`` (the projector's 4C input), ``proj_hidden``, and
``lora_rank`` (the rank of LoRA adapters, which no preset splits: an adapter shards as its kernel's other axes).
Activations: ``batch``, ``length``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``, ``vit_embed``; the KV cache
``layers``, ``batch``, ``cache_length``, ``kv_heads``, ``head_dim``.

Entry points: :func:`make_mesh`, the rule presets ``RULES`` (``dp``, ``fsdp``, ``fsdp_tp``), :func:`shardings`
(NamedSharding per array of a boxed tree), :func:`init_sharded`, :func:`shard_batch`, :func:`activate` (the
context the model is traced in so its activation constraints apply). Compiling for TPU slices without a TPU:
:func:`tpu_devices`, :func:`compile_for` (:mod:`sharding.topology`); memory and FLOPs plans: :mod:`sharding.plan`.
"""

from .mesh import make_mesh, mesh_shape
from .place import (
    ShardingError, activate, batch_spec, init_sharded, logical_axes, partition_specs, place, shard_batch, shardings,
    working_meshes,
)
from .rules import MESH_AXES, RULES, get_rules
from .topology import CHIPS, compile_for, parse_slice, tpu_devices

PARAM_AXES = (
    "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers",
    "vit_embed", "vit_mlp", "vit_heads", "vit_shuffled", "proj_hidden", "lora_rank",
)
