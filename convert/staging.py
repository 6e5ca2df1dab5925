"""Output folders: written under a temporary name beside the destination and renamed when complete, with the
source's side files (tokenizer, processor, generation config) copied along."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .safetensors_io import INDEX, CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


@contextlib.contextmanager
def staged_folder(dst: str, *, overwrite: bool, prefix: str):
    """Yield a fresh temporary folder next to ``dst``; on success it replaces ``dst``, on any error it is removed
    and ``dst`` is untouched. An existing ``dst`` is an error unless ``overwrite``."""
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"destination {dst} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{prefix}-", dir=parent)
    try:
        yield tmp
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def byte_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar counting bytes (shows bytes/s); disabled: a bar that prints nothing."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


def copy_side_files(src: str, dst: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Copy config, tokenizer, processor and generation files (every file but weights, the index and
    ``exclude``)."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES) and name not in (INDEX, *exclude):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied
