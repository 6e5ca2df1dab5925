"""Conversion benchmark: a synthetic InternVL2.5-8B original-layout checkpoint -> orbax, and a 1B load onto 8 devices.

    python bench/conversion.py                          # 8B convert (about 16 GB on disk, twice) + 1B sharded load
    python bench/conversion.py --model InternVL2_5-1B   # a smaller run

1. Writes a checkpoint with the real shapes and names of ``--model`` in the original OpenGVLab layout (random
   bf16 values, ``--shard-gb`` shards with an index), through our own exporter's key map.
2. Baseline, the same bytes moved without any conversion: a sequential read of every shard, then a write of as
   many bytes to a new file until it is on the disk (fsync). The page cache is dropped before the baseline and
   before the conversion when the process may (root), and the conversion's time includes the final sync.
3. ``internvl-jax convert SRC DST`` in a child process: wall time and peak resident memory (``ru_maxrss`` of the
   child). Goals: peak RSS <= 2 GiB (the process never holds the model) and wall <= 2 x (raw read + write).
4. ``load_pretrained(..., mesh=8 CPU devices, rules=fsdp)`` of a ``--load-model`` checkpoint (bf16) in a child
   process with ``--xla_force_host_platform_device_count=8``: peak RSS against the checkpoint's bytes
   (goal <= 1.25x), also shown net of the process's RSS before loading (Python + JAX + the mesh).

Files go to ``--workdir`` (default: a temporary folder next to /tmp) and are removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

GiB = 1 << 30


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="InternVL2_5-8B", help="preset whose shapes the converted checkpoint has")
    p.add_argument("--load-model", default="InternVL2_5-1B", help="preset for the sharded load (empty: skip)")
    p.add_argument("--shard-gb", type=float, default=4.0, help="safetensors shard size of the synthetic checkpoint")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a new folder in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    return p.parse_args()


def write_synthetic(preset: str, folder: str, shard_gb: float, layout: str = "original") -> int:
    """Write random-bf16 tensors with the shapes and names of ``preset`` in ``layout``; returns the bytes written.

    Tensors are generated one at a time from zero-stride placeholders of our params tree, so this process never
    holds the model either."""
    import jax
    import ml_dtypes

    from convert.export import CONFIG_WRITERS
    from convert.keymaps import LAYOUTS
    from convert.load import export_tensors
    from convert.safetensors_io import write_safetensors
    from internvl_jax.model import abstract_params
    from internvl_jax.presets import get_preset

    config = get_preset(preset)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    placeholders = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), bf16), s.shape),
                                          abstract_params(config))
    rng = np.random.default_rng(0)
    total = 0

    def random_tensors():
        nonlocal total
        for key, like in export_tensors(placeholders, config, LAYOUTS[layout]):
            bits = rng.integers(0, 1 << 16, like.size, dtype=np.uint16) & 0xBFFF  # finite values in (-2, 2)
            total += like.nbytes
            yield key, bits.view(bf16).reshape(like.shape)

    os.makedirs(folder)
    write_safetensors(folder, random_tensors(), max_shard_bytes=int(shard_gb * GiB))
    d = CONFIG_WRITERS[layout](config)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    return total


def drop_caches() -> bool:
    """Flush dirty pages and empty the page cache (root only), so reads come from the disk; False if refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def raw_read_write(folder: str, scratch: str, block: int = 64 << 20) -> tuple[float, float, int]:
    """Seconds to read every file of ``folder`` sequentially, and to write as many bytes to ``scratch`` (until
    they are on the disk: the page cache would otherwise hide the writes)."""
    buf = bytearray(block)
    t0 = time.perf_counter()
    total = 0
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(scratch, "wb", buffering=0) as f:
        left = total
        while left:
            left -= f.write(memoryview(buf)[: min(block, left)])
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    os.remove(scratch)
    return read_s, write_s, total


# VmHWM belongs to the child's own address space; ru_maxrss would carry the parent's over fork + exec
PEAK = "\nprint('peak', next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"


def run_child(code: str, env: dict | None = None) -> tuple[float, int, str]:
    """Run ``python -c code`` (which prints its own peak RSS last); returns (wall seconds, peak RSS bytes, stdout)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + PEAK], env={**os.environ, **(env or {})}, check=True,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return wall, int(out.stdout.split()[-1]), out.stdout


CONVERT = """
from internvl_jax.cli import main
assert main(["convert", {src!r}, {dst!r}]) == 0
"""

LOAD = """
import jax, jax.numpy as jnp
import sharding
from convert.load import load_pretrained
mesh = sharding.make_mesh(1, 8, 1)
print("before", next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS")))
model, params = load_pretrained({src!r}, dtype=jnp.bfloat16, mesh=mesh, rules="fsdp")
jax.block_until_ready(params)
leaf = params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
print("devices", len(leaf.sharding.device_set), "shard", leaf.addressable_shards[0].data.shape, "of", leaf.shape)
"""


def main():
    args = parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="internvl-bench-convert-")
    os.makedirs(work, exist_ok=True)
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    try:
        t0 = time.perf_counter()
        size = write_synthetic(args.model, src, args.shard_gb)
        print(f"{args.model}: wrote {size / GiB:.2f} GiB of original-layout safetensors in "
              f"{time.perf_counter() - t0:.0f} s ({len(os.listdir(src)) - 1} files)")
        cold = drop_caches()
        read_s, write_s, total = raw_read_write(src, os.path.join(work, "scratch.bin"))
        print(f"raw ({'cold page cache' if cold else 'page cache not dropped: run as root for disk figures'}): "
              f"read {total / GiB:.2f} GiB in {read_s:.1f} s ({total / GiB / read_s:.2f} GiB/s), "
              f"write in {write_s:.1f} s ({total / GiB / write_s:.2f} GiB/s); read + write {read_s + write_s:.1f} s")
        drop_caches()
        wall, rss, _ = run_child(CONVERT.format(src=src, dst=dst))
        t0 = time.perf_counter()
        os.sync()  # the conversion's writes on the disk too, as the raw write's are
        wall += time.perf_counter() - t0
        ratio = wall / (read_s + write_s)
        print(f"convert: {wall:.1f} s = {ratio:.2f}x raw read + write (goal <= 2x: {'met' if ratio <= 2 else 'missed'}); "
              f"peak RSS {rss / GiB:.2f} GiB (goal <= 2 GiB: {'met' if rss <= 2 * GiB else 'missed'})")
        shutil.rmtree(src)
        shutil.rmtree(dst)
        if args.load_model:
            size = write_synthetic(args.load_model, src, args.shard_gb)
            _, rss, out = run_child(LOAD.format(src=src),
                                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                                         "JAX_PLATFORMS": "cpu"})
            before = int(next(line.split()[1] for line in out.splitlines() if line.startswith("before")))
            print(f"{args.load_model} load onto 8 CPU devices (fsdp): checkpoint {size / GiB:.2f} GiB, peak RSS "
                  f"{rss / GiB:.2f} GiB = {rss / size:.2f}x (goal <= 1.25x: {'met' if rss <= 1.25 * size else 'missed'}); "
                  f"net of the {before / GiB:.2f} GiB before loading: {(rss - before) / size:.2f}x")
            print("  " + next(line for line in out.splitlines() if line.startswith("devices")))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
