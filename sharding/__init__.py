"""Meshes and logical-axis rules. The model names every parameter and main activation with these logical axes;
rule tables here map them onto mesh axes.

Parameters: ``vocab``, ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ``layers`` (the scanned axis),
``vit_embed``, ``vit_mlp``, ``vit_heads``, ``vit_shuffled`` (the projector's 4C input), ``proj_hidden``.
Activations: ``batch``, ``length``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``, ``vit_embed``; the KV cache
``layers``, ``batch``, ``cache_length``, ``kv_heads``, ``head_dim``.
"""

PARAM_AXES = (
    "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers",
    "vit_embed", "vit_mlp", "vit_heads", "vit_shuffled", "proj_hidden",
)
