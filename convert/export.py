"""Export our params as a safetensors checkpoint in either layout, written under a temporary name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax

from internvl_jax.config import InternVLConfig, to_hf_dict, to_original_dict

from .keymaps import LAYOUTS
from .load import export_tensors
from .safetensors_io import CheckpointError, write_safetensors

CONFIG_WRITERS = {"hf": to_hf_dict, "original": to_original_dict}


def export_checkpoint(params: dict, config: InternVLConfig, dst: str, *, layout: str = "hf", overwrite: bool = False,
                      max_shard_bytes: int = 4 << 30, progress: bool = False) -> None:
    """Write ``params`` to ``dst`` as safetensors + config.json that the matching PyTorch code loads.

    ``layout``: ``hf`` (transformers ``InternVLForConditionalGeneration``) or ``original`` (OpenGVLab custom code).
    Tensors keep the params' dtype. Nothing appears at ``dst`` unless the whole export succeeds. ``progress``
    shows a bar with bytes/s.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"destination {dst} already exists (pass overwrite to replace it)")
    params = jax.device_get(params)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        tensors = export_tensors(params, config, LAYOUTS[layout])
        if progress:
            tensors = _with_progress(tensors, sum(a.nbytes for a in jax.tree_util.tree_leaves(params)))
        write_safetensors(tmp, tensors, max_shard_bytes=max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(CONFIG_WRITERS[layout](config), f, indent=2)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _with_progress(tensors, total_bytes: int):
    from tqdm import tqdm

    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="export") as bar:
        for key, array in tensors:
            yield key, array
            bar.update(array.nbytes)
