"""``internvl-jax convert``: a safetensors checkpoint (either layout) -> an orbax checkpoint that
``load_pretrained`` reads back, tensor by tensor in bounded memory.

The output folder holds ``params/`` (the orbax PyTree checkpoint of our params tree), the source's own
``config.json`` (so the layout-specific fields survive) and its tokenizer and processor files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading

import numpy as np
from flax import traverse_util

from internvl_jax.layers import as_dtype

from .load import PARAMS_DIR, Group, checkpoint_model, plan_groups, source_dtype
from .orbax_io import StreamedParam, save_streamed
from .safetensors_io import SafetensorsReader
from .staging import byte_bar, copy_side_files, prepare_destination, staged_folder


def convert_checkpoint(src: str, dst: str, *, dtype: str | None = None, overwrite: bool = False,
                       progress: bool = False) -> str:
    """Convert the safetensors checkpoint folder ``src`` to an orbax checkpoint folder ``dst``.

    ``dtype``: params dtype (default: the checkpoint's own). Each tensor is read, cast and written on its own,
    stacked parameters one layer at a time, so memory stays at about the largest single source tensor. Nothing
    appears at ``dst`` unless the whole conversion succeeds; a failed, interrupted or killed run leaves ``dst`` as
    it was (:mod:`convert.staging`). Returns the dtype written.
    """
    prepare_destination(dst, overwrite=overwrite)  # before any reading: a bad destination fails at once
    config, layout, abstract = checkpoint_model(src)
    with SafetensorsReader(src) as reader:
        dtype = dtype or source_dtype(reader)
        shapes = {p: s.shape for p, s in traverse_util.flatten_dict(abstract, sep="/").items()}
        groups = plan_groups(reader, layout, config.text, shapes, dtype)
        np_dtype = np.dtype(as_dtype(dtype))
        stop = threading.Event()
        params = {path: StreamedParam(path, shapes[path], np_dtype, group, stacked="/layers/" in path)
                  for group in (_stoppable(g, stop) for g in groups) for path in group.paths}
        total = sum(p.size for p in params.values()) * np_dtype.itemsize
        with staged_folder(dst, overwrite=overwrite) as tmp:
            with byte_bar(total, "convert", progress) as bar:
                _save_interruptibly(os.path.join(tmp, PARAMS_DIR), traverse_util.unflatten_dict(params, sep="/"),
                                    bar.update, stop)
            copy_side_files(src, tmp)
    return dtype


def _stoppable(group: Group, stop: threading.Event) -> Group:
    """``group`` whose pieces stop coming once ``stop`` is set: the writer then awaits the writes it has in flight
    and ends (an exception would leave them running, and tensorstore recreates a removed folder to write)."""
    def writes():
        for piece in group.writes():
            if stop.is_set():
                return
            yield piece
    return dataclasses.replace(group, writes=writes)


def _save_interruptibly(directory: str, params: dict, on_bytes, stop: threading.Event) -> None:
    """:func:`save_streamed` in a worker thread. Ctrl-C or SIGTERM reaches the main thread only, here: it sets
    ``stop`` and waits for the writer to wind down, so nothing writes into the staging folder once the
    interruption removes it. (In the main thread, it would stop only the wait on orbax's own writer thread.)"""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="convert") as pool:  # exit: waits for it
        future = pool.submit(save_streamed, directory, params, on_bytes)
        try:
            future.result()
        except KeyboardInterrupt:
            stop.set()
            raise
