"""Export our params as a safetensors checkpoint in either layout, written under a temporary name."""

from __future__ import annotations

import json
import os

import jax

from internvl_jax.clip_config import to_internvl_g_dict
from internvl_jax.config import InternVLConfig, to_hf_dict, to_original_dict

from .keymaps import layout_for
from .load import export_tensors
from .safetensors_io import write_safetensors
from .staging import byte_bar, copy_side_files, staged_folder

CONFIG_WRITERS = {"hf": to_hf_dict, "original": to_original_dict, "internvl_g": to_internvl_g_dict}


def export_checkpoint(params: dict, config: InternVLConfig, dst: str, *, layout: str = "hf", overwrite: bool = False,
                      max_shard_bytes: int = 4 << 30, progress: bool = False, side_files_from: str | None = None) -> None:
    """Write ``params`` to ``dst`` as safetensors + config.json that the matching PyTorch code loads.

    ``layout``: ``hf`` (transformers ``InternVLForConditionalGeneration``) or ``original`` (OpenGVLab custom code);
    ``internvl_g`` for an InternVL 1.0 :class:`~internvl_jax.clip_config.CLIPConfig` (the original InternVLModel).
    Tensors keep the params' dtype. Nothing appears at ``dst`` unless the whole export succeeds. ``progress``
    shows a bar with bytes/s. ``side_files_from``: a checkpoint folder whose tokenizer, processor and generation
    files are copied along (its config.json is not: the layout's own is written).
    """
    table = layout_for(layout, config)  # a bad name fails before anything is written
    with staged_folder(dst, overwrite=overwrite) as tmp:
        params = jax.device_get(params)
        total = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
        with byte_bar(total, "export", progress) as bar:
            write_safetensors(tmp, _counted(export_tensors(params, config, table), bar),
                              max_shard_bytes=max_shard_bytes)
        if side_files_from:
            copy_side_files(side_files_from, tmp, exclude=("config.json",))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(CONFIG_WRITERS[layout](config), f, indent=2)


def _counted(tensors, bar):
    for key, array in tensors:
        yield key, array
        bar.update(array.nbytes)
