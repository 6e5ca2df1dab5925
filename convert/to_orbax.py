"""``internvl-jax convert``: a safetensors checkpoint (either layout) -> an orbax checkpoint that
``load_pretrained`` reads back, tensor by tensor in bounded memory.

The output folder holds ``params/`` (the orbax PyTree checkpoint of our params tree), the source's own
``config.json`` (so the layout-specific fields survive) and its tokenizer and processor files.
"""

from __future__ import annotations

import os

import numpy as np
from flax import traverse_util

from internvl_jax.config import load_config
from internvl_jax.layers import as_dtype
from internvl_jax.model import abstract_params

from .load import PARAMS_DIR, checkpoint_layout, plan_groups
from .orbax_io import StreamedParam, save_streamed
from .safetensors_io import SafetensorsReader
from .staging import byte_bar, copy_side_files, staged_folder

def source_dtype(reader: SafetensorsReader) -> str:
    """The dtype name of the checkpoint's floating-point tensors (the first one found)."""
    for key in reader.keys():
        dtype = np.dtype(reader.dtype(key))
        if dtype.kind == "f" or dtype.name == "bfloat16":
            return dtype.name
    return "float32"


def convert_checkpoint(src: str, dst: str, *, dtype: str | None = None, overwrite: bool = False,
                       progress: bool = False) -> str:
    """Convert the safetensors checkpoint folder ``src`` to an orbax checkpoint folder ``dst``.

    ``dtype``: params dtype (default: the checkpoint's own). Each tensor is read, cast and written on its own,
    stacked parameters one layer at a time, so memory stays at about the largest single source tensor. Nothing
    appears at ``dst`` unless the whole conversion succeeds. Returns the dtype written.
    """
    config = load_config(src)
    with SafetensorsReader(src) as reader:
        dtype = dtype or source_dtype(reader)
        shapes = {p: s.shape for p, s in traverse_util.flatten_dict(abstract_params(config), sep="/").items()}
        groups = plan_groups(reader, checkpoint_layout(src), config.text, shapes, dtype)
        np_dtype = np.dtype(as_dtype(dtype))
        params = {path: StreamedParam(path, shapes[path], np_dtype, group, stacked="/layers/" in path)
                  for group in groups for path in group.paths}
        total = sum(p.size for p in params.values()) * np_dtype.itemsize
        with staged_folder(dst, overwrite=overwrite, prefix="convert") as tmp:
            with byte_bar(total, "convert", progress) as bar:
                save_streamed(os.path.join(tmp, PARAMS_DIR), traverse_util.unflatten_dict(params, sep="/"),
                              on_bytes=bar.update)
            copy_side_files(src, tmp)
    return dtype
