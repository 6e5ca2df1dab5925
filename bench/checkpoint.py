"""Checkpoint-save benchmark: the CPU one asynchronous save of the trainer's checkpoints takes, by arrays and bytes.

    python bench/checkpoint.py                      # 1, 12, 122 and 1220 float32 arrays of 27 MiB in all, and 122 of 270
    python bench/checkpoint.py --arrays 122 --mib 27 --saves 10

Each setting saves a dict of equal float32 arrays through ``train.checkpoint.Checkpoints`` (the trainer's orbax
manager: the state uncompressed, the data position through grain's handler, the meta as JSON, asynchronous), every
step, and waits for each save. Reported: this process's CPU seconds per save (every thread's: orbax's background
writer and tensorstore's included), the seconds ``save`` blocks its caller, and the wall time until the save is on
disk, as means over the saves after the first two. On a CPU backend the trainer's step shares the cores with this
work, so a step that overlaps a save loses about its CPU; ``bench/trainer.py`` (a state of 122 arrays, a save every
4 steps) shows where that lands.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import types

import jax.numpy as jnp
import numpy as np

from train.checkpoint import Checkpoints, IteratorPosition

DEFAULT_SETTINGS = [(1, 27.0), (12, 27.0), (122, 27.0), (1220, 27.0), (122, 270.0)]


def save_cost(arrays: int, mib: float, saves: int) -> tuple[float, float, float]:
    """(CPU seconds, blocking seconds, wall seconds) per save of ``arrays`` float32 arrays of ``mib`` MiB in all,
    means over the saves after the first two (the first ones start orbax's threads)."""
    each = max(1, int(mib * 2**20 / 4 / arrays))
    state = {f"a{i:05d}": jnp.full((each,), i, jnp.float32) for i in range(arrays)}
    workdir = tempfile.mkdtemp(prefix="bench_checkpoint_")
    checkpoints = Checkpoints(workdir, save_every=1, keep=2)
    position = IteratorPosition(types.SimpleNamespace(get_state=dict))  # the trainer's kind, of an empty state
    cpu, call, wall = [], [], []
    try:
        for step in range(1, saves + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            checkpoints.save(step, state, position, {"step": step})
            t1 = time.perf_counter()
            checkpoints.wait()
            cpu.append(time.process_time() - c0)
            call.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
    finally:
        checkpoints.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return statistics.mean(cpu[2:]), statistics.mean(call[2:]), statistics.mean(wall[2:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arrays", type=int, default=None, help="arrays in the state (default: the settings above)")
    p.add_argument("--mib", type=float, default=27.0, help="MiB of float32 in all, with --arrays")
    p.add_argument("--saves", type=int, default=6, help="saves per setting (the first two are not counted)")
    args = p.parse_args()
    if args.saves < 3:
        p.error("--saves must be at least 3 (the first two are not counted)")
    if args.arrays is not None and args.arrays < 1:
        p.error(f"--arrays {args.arrays}: expected at least 1")
    settings = [(args.arrays, args.mib)] if args.arrays else DEFAULT_SETTINGS
    print(f"asynchronous saves through train.checkpoint.Checkpoints, {args.saves} per setting; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    cpu_of = {}
    for arrays, mib in settings:
        cpu, call, wall = save_cost(arrays, mib, args.saves)
        cpu_of[arrays, mib] = cpu
        print(f"{arrays:5d} arrays, {mib:6.1f} MiB: CPU {cpu:.3f} s a save, the call blocks {call:.3f} s, on disk "
              f"after {wall:.3f} s")
    same_bytes = sorted((a, c) for (a, m), c in cpu_of.items() if m == args.mib)
    if len(same_bytes) >= 2:
        slope, fixed = np.polyfit([a for a, _ in same_bytes], [c for _, c in same_bytes], 1)
        print(f"at {args.mib:g} MiB, CPU a save = {fixed:.3f} s + {1e3 * slope:.2f} ms an array (least squares over "
              f"{len(same_bytes)} settings)")


if __name__ == "__main__":
    main()
