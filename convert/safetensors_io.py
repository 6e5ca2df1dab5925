"""Reading safetensors checkpoints: one file or shards listed by ``model.safetensors.index.json``.

Tensors are memory-mapped and read one at a time, so the host never holds the whole checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
from contextlib import ExitStack

import numpy as np
from safetensors import safe_open

INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (the message names the file or tensor)."""


class SafetensorsReader:
    """Maps tensor names to their shard; ``get(name)`` returns a numpy array (bf16 via ml_dtypes)."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        self.folder = folder
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        index = os.path.join(folder, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            missing = sorted({s for s in weight_map.values() if not os.path.exists(os.path.join(folder, s))})
            if missing:
                raise CheckpointError(f"{INDEX} names missing shard(s): {', '.join(missing)}")
            self._shard_of = dict(weight_map)
        else:
            files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {folder}")
            self._shard_of = {}
            for path in files:
                for key in self._open(os.path.basename(path)).keys():
                    self._shard_of[key] = os.path.basename(path)

    def _open(self, shard: str):
        if shard not in self._handles:
            path = os.path.join(self.folder, shard)
            try:
                self._handles[shard] = self._stack.enter_context(safe_open(path, framework="numpy"))
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from None
        return self._handles[shard]

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def get(self, name: str) -> np.ndarray:
        handle = self._open(self._shard_of[name])
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self._shard_of[name]}: {e}") from None

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(folder: str, tensors, *, max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write (key, numpy array) pairs as safetensors shards of at most ``max_shard_bytes`` (one tensor may exceed
    it), plus ``model.safetensors.index.json`` when there are several. Holds at most one shard in memory.
    Returns the shard file names. ``folder`` must exist (callers write into a temporary folder and rename it).
    """
    from safetensors.numpy import save_file

    shards: list[dict] = []
    current: dict = {}
    size = 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(folder, name), metadata={"format": "pt"})
            shards.append({"name": name, "keys": list(current)})
            current, size = {}, 0

    for key, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            flush()
        current[key] = array
        size += array.nbytes
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(folder, shards[0]["name"]), os.path.join(folder, "model.safetensors"))
        return ["model.safetensors"]
    names = []
    weight_map = {}
    for i, shard in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(folder, shard["name"]), os.path.join(folder, final))
        weight_map.update(dict.fromkeys(shard["keys"], final))
        names.append(final)
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return names
