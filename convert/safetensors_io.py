"""Reading safetensors checkpoints: one file or shards listed by ``model.safetensors.index.json``.

The reader parses each shard's header itself and reads one tensor at a time with positional reads into a fresh
buffer: no memory map, so the process's resident memory stays at the tensors it holds, whatever the
checkpoint's size (a mapped file's touched pages would count towards it). Headers are validated against the
file size, so a truncated or corrupt shard is an error that names it before anything is read.
"""

from __future__ import annotations

import glob
import json
import math
import os

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (the message names the file or tensor)."""


def _check_entry(path: str, name: str, info) -> tuple[int, int]:
    """The ``data_offsets`` of one header entry, after checking that it is an object with a known ``dtype``, a
    ``shape`` of non-negative integers and offsets that span exactly the bytes that shape needs."""
    fields = ("dtype", "shape", "data_offsets")
    if not isinstance(info, dict) or any(f not in info for f in fields):
        lacks = [f for f in fields if not isinstance(info, dict) or f not in info]
        raise CheckpointError(f"cannot read {path}: header entry of tensor {name} lacks {', '.join(lacks)} "
                              f"(each entry needs dtype, shape and data_offsets)")
    dtype, shape, offsets = (info[f] for f in fields)
    if dtype not in DTYPES:
        raise CheckpointError(f"cannot read {path}: tensor {name} has unsupported dtype {dtype!r} "
                              f"(supported: {', '.join(DTYPES)})")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(shape, list) or not all(map(is_int, shape)):
        raise CheckpointError(f"cannot read {path}: tensor {name} has shape {shape!r}, expected a list of "
                              "non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_int, offsets)) or offsets[0] > offsets[1]:
        raise CheckpointError(f"cannot read {path}: tensor {name} has data_offsets {offsets!r}, expected [begin, end] "
                              "with 0 <= begin <= end")
    expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(f"cannot read {path}: tensor {name} has data_offsets {offsets} ({offsets[1] - offsets[0]} "
                              f"bytes) but {dtype} {shape} needs {expected} bytes (corrupt file)")
    return offsets[0], offsets[1]


def read_header(path: str) -> tuple[dict, int]:
    """The tensor table of a safetensors file ({name: {"dtype", "shape", "data_offsets"}}) and the byte offset of
    its data section. Raises :class:`CheckpointError` naming the file and the tensor for a header that is not a
    JSON object of complete, well-typed entries, for tensors whose bytes overlap and for a truncated file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"cannot read {path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors header "
                                  f"(header of {n} bytes in a file of {size})")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: corrupt safetensors header ({e})") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"cannot read {path}: corrupt safetensors header (a JSON {type(table).__name__}, "
                              "expected an object of tensor entries)")
    table.pop("__metadata__", None)
    data = size - 8 - n
    spans = sorted((_check_entry(path, name, info), name) for name, info in table.items())
    for ((_, end), name), ((begin, _), after) in zip(spans, spans[1:]):
        if begin < end:  # two tensors sharing bytes: one of them, at least, reads the other's data
            raise CheckpointError(f"cannot read {path}: tensors {name} and {after} overlap (bytes up to {end} and "
                                  f"from {begin}; corrupt file)")
    for (begin, end), name in spans[-1:]:  # sorted and disjoint: only the last can run past the end
        if end > data:
            raise CheckpointError(f"cannot read {path}: tensor {name} needs bytes {begin}..{end} of a "
                                  f"{data}-byte data section (corrupt or truncated file)")
    return table, 8 + n


def _read_index(index: str) -> dict:
    """The ``weight_map`` of a ``model.safetensors.index.json`` ({tensor name: shard file name})."""
    try:
        with open(index, "rb") as f:
            parsed = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {index}: not valid JSON ({e})") from None
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"cannot read {index}: weight_map must be an object of tensor name -> shard file name")
    return weight_map


class SafetensorsReader:
    """Maps tensor names to their shard; ``get(name)`` reads one tensor into a numpy array (bf16 via ml_dtypes)."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        self.folder = folder
        index = os.path.join(folder, INDEX)
        if os.path.exists(index):
            weight_map = _read_index(index)
            missing = sorted({s for s in weight_map.values() if not os.path.exists(os.path.join(folder, s))})
            if missing:
                raise CheckpointError(f"{INDEX} names missing shard(s): {', '.join(missing)}")
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
            if not shards:
                raise CheckpointError(f"no *.safetensors files in {folder}")
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for shard in shards:
            table, start = read_header(os.path.join(folder, shard))
            for name, info in table.items():
                self._entries[name] = (shard, info, start)
        if os.path.exists(index):
            absent = sorted(k for k, s in weight_map.items() if self._entries.get(k, (s,))[0] != s)
            if absent:
                raise CheckpointError(f"{INDEX} lists tensors that its shards do not hold: {', '.join(absent[:10])}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    @property
    def source(self) -> str:
        """The checkpoint folder (for messages)."""
        return self.folder

    def where(self, name: str) -> str:
        """The file that holds tensor ``name`` (for messages)."""
        return os.path.join(self.folder, self._entries[name][0])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._entries[name][1]["dtype"]])

    def nbytes(self, name: str) -> int:
        _, info, _ = self._entries[name]
        return info["data_offsets"][1] - info["data_offsets"][0]

    def get(self, name: str) -> np.ndarray:
        shard, info, start = self._entries[name]
        out = np.empty(info["shape"], DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        with open(os.path.join(self.folder, shard), "rb", buffering=0) as f:
            f.seek(start + begin)
            view = memoryview(out.reshape(-1).view(np.uint8))
            done = 0
            while done < end - begin:
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"cannot read tensor {name} from {shard}: file ends early")
                done += n
        return out

    def close(self):
        """Nothing stays open between reads; kept so the reader works as a context manager."""

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
