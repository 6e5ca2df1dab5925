"""Logical-axis rule tables, one per parallelism preset.

The model names every parameter dimension and main activation with a logical axis (see ``sharding.PARAM_AXES``);
a preset maps each name to mesh axes (``MESH_AXES``: ``data``, ``fsdp``, ``tensor``). Rules are tried in table
order and a mesh axis is used at most once per array (flax semantics), so listing ``batch`` first lets the
activations take the batch split while the same name (e.g. ``embed``) still shards the parameters.

| preset   | batch                 | parameters                                                          |
|----------|-----------------------|---------------------------------------------------------------------|
| dp       | data x fsdp x tensor  | replicated                                                          |
| fsdp     | data x fsdp x tensor  | ZeRO-3: the model width (``embed``/``vit_embed``/...) over fsdp x tensor |
| fsdp_tp  | data x fsdp           | width over fsdp; Megatron split of heads, MLP and vocab over tensor |

The stacked ``layers`` axis, the sequence and ``head_dim`` are never split.
"""

from __future__ import annotations

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

MESH_AXES = ("data", "fsdp", "tensor")

ALL = ("data", "fsdp", "tensor")
WIDTH = ("embed", "vit_embed", "vit_shuffled", "proj_hidden")  # the dimensions FSDP splits

RULES: dict[str, Rules] = {
    "dp": (("batch", ALL),),
    "fsdp": (("batch", ALL),) + tuple((name, ("fsdp", "tensor")) for name in WIDTH),
    "fsdp_tp": (
        ("batch", ("data", "fsdp")),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("vit_heads", "tensor"),
        ("vit_mlp", "tensor"),
        ("proj_hidden", "tensor"),
        ("embed", "fsdp"),
        ("vit_embed", "fsdp"),
        ("vit_shuffled", "fsdp"),
    ),
}


def get_rules(preset: str | Rules) -> Rules:
    """The rule table of a preset name (``dp``, ``fsdp``, ``fsdp_tp``); a table is returned as is."""
    if not isinstance(preset, str):
        return tuple(preset)
    if preset not in RULES:
        raise ValueError(f"unknown sharding preset {preset!r}; use one of {', '.join(RULES)}")
    return RULES[preset]
