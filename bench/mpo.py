"""MPO against SFT: the trainer's steps on the same model and token rows, and the planner's per-device bytes.

    python bench/mpo.py                    # a small model on this CPU, then InternVL2.5-8B / -78B from the planner
    python bench/mpo.py --compile          # also compile the 8B MPO steps ahead of time for v5p slices (minutes)
    python bench/mpo.py --skip-cpu --compile InternVL2_5-8B InternVL2_5-78B     # and the 78B's (~15 min each)

1. This CPU (one device): a small InternVL (``--hidden`` wide LLM of ``--layers`` layers, a 4-layer ViT on 112 px
   tiles) in float32. ``--rows`` rows, each one preference pair (prompt with ``--tiles`` tiles and text, a chosen
   and a rejected answer) packed by train/data/pairs.py. Three steps compiled on these rows: the SFT step
   (train.step, the rows as supervised tokens), the MPO step with the frozen copy (policy forward + backward and a
   reference forward) and with reference log-probs from file (the batch's ``ref_logps``). Printed: median step
   time, pairs/s, and the ratios MPO / SFT (goals: <= 2.1x with the copy, <= 1.1x from file).
2. The planner: per-device bytes of the InternVL2.5-8B and -78B MPO steps (frozen copy and from file) and the
   smallest v5p slice where each fits (fsdp rules, one pair of 2 x 4096 tokens per row, one row per batch shard).
3. ``--compile``: the MPO steps (frozen copy and from file) compiled ahead of time for the abstract devices of
   v5p-128 and of the smallest v5p slice the estimate fits, then of ever smaller slices while the compiled step
   still fits (libtpu's compiler, no TPU needed), same rows; printed: the compiled per-device bytes (arguments +
   outputs - donated + temporaries + code) next to the estimate, and the smallest slice the compiled step fits.

Compiled per-device memory (jax 0.10.2, libtpu 0.0.42.1; rows of 2 x 4096 tokens with 6 tiles, one row per
fsdp shard, bf16, remat full, AdamW), of 95 GiB HBM:

| model | slice (mesh fsdp) | frozen copy | from file |
|---|---|---|---|
| InternVL2.5-8B | v5p-2 (1 chip): the smallest | 85.22 GiB | 70.22 GiB |
| InternVL2.5-8B | v5p-4 (2) | 48.31 GiB | 40.77 GiB |
| InternVL2.5-8B | v5p-128 (64) | 9.35 GiB | 8.95 GiB |
| InternVL2.5-78B | v5p-32 (16): the smallest | 77.38 GiB | 68.36 GiB |
| InternVL2.5-78B | v5p-64 (32) | 51.22 GiB | 46.59 GiB |
| InternVL2.5-78B | v5p-128 (64) | 48.21 GiB | 45.91 GiB |

All fit. The planner's estimates are upper bounds (8B on one chip: 112.8 / 97.8 GiB; 78B on v5p-32: 127.6 / 118.4),
which is why ``--compile`` walks down from the estimate's smallest slice. 78B on v5p-16 (fsdp 8) was not compiled:
its params, gradients and Adam moments alone are 73 GiB per device (exact, from the shardings) and the step's
temporaries at this row length were 40.8 GiB on v5p-32. The 8B compiles took 1.5-12 min and the 78B ones 1.5-14
min on a busy 2-core host (peak RSS 2.5-4.2 GB).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # bench/train*.py would shadow the train package

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.model import InternVL, abstract_params, init_params
from sharding.plan import _smallest, estimate, make_optimizer, parse_mesh, plan, target_config
from sharding.rules import get_rules
from sharding.topology import parse_slice
from train import optim
from train.data.packing import PackConfig
from train.data.pairs import PAIR_ROWS
from train.loss import IGNORE
from train.preference import MPOConfig
from train.preference_step import PreferenceState, make_preference_step
from train.state import TrainState
from train.step import make_train_step

TILES = 6  # image tiles per pair in the planner's rows

_spec = importlib.util.spec_from_file_location("bench_lora", os.path.join(os.path.dirname(__file__), "lora.py"))
bench_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_lora)


def pair_rows(config, rows: int, tiles: int, prompt: int, answer: int, seed: int = 0) -> dict:
    """``rows`` preference rows of one pair each: ``tiles`` tiles, ``prompt`` text tokens, two answers of ``answer``
    tokens (random ids), packed by the pair packer."""
    rng = np.random.default_rng(seed)
    n_img = tiles * config.tokens_per_tile
    length = 2 * (n_img + prompt + answer)
    cfg = PackConfig(max_tokens=length, max_tiles=tiles, tile_size=config.image_size,
                     img_context_id=config.image_token_id, tokens_per_tile=config.tokens_per_tile, max_segments=1)
    packer, pieces = PAIR_ROWS.packer(cfg), []
    for line in range(rows):
        text = lambda n: [int(t) for t in rng.integers(1, config.image_token_id, n)]  # noqa: E731
        head = [config.image_token_id] * n_img + text(prompt)
        halves = []
        for _ in range(2):
            ans = text(answer)
            ids = np.asarray(head + ans, np.int32)
            halves.append((ids, np.asarray([IGNORE] * len(head) + ans, np.int32), np.arange(len(ids), dtype=np.int32)))
        pixels = rng.standard_normal((tiles, config.image_size, config.image_size, 3)).astype(np.float32)
        item = {"chosen": halves[0], "rejected": halves[1], "pixel_values": pixels, "dataset": "bench", "line": line,
                "ref": rng.normal(-50, 5, 2).astype(np.float32)}
        pieces.append(packer.expand(item))
    return PAIR_ROWS.build_batch(pieces, cfg, rows)


def cpu_part(args) -> None:
    config = bench_lora.small_config(args.hidden, args.layers)
    model = InternVL(config)
    params = init_params(config, jax.random.PRNGKey(0))
    ocfg = optim.OptimConfig()
    tx = optim.build_optimizer(ocfg, params, 1000)
    fresh = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731  (each step donates its state)
    batch = pair_rows(config, args.rows, args.tiles, args.prompt, args.answer)
    # the SFT step on the same rows: one forward and backward over the same tokens and tiles (its image tokens past
    # the first half read the last tile again: the same compute)
    sft_batch = {k: batch[k] for k in ("input_ids", "labels", "loss_weights", "positions", "segment_ids",
                                       "pixel_values", "tile_mask")}
    steps = {
        "SFT": (jax.jit(make_train_step(model, tx), donate_argnums=0),
                lambda: TrainState.create(fresh(), tx, jax.random.PRNGKey(1)), (sft_batch,)),
        "MPO, frozen copy": (jax.jit(make_preference_step(model, tx, MPOConfig(max_pairs=1)), donate_argnums=0),
                             lambda: PreferenceState.create(fresh(), tx, jax.random.PRNGKey(1)), (batch, params)),
        "MPO, reference from file": (jax.jit(make_preference_step(model, tx, MPOConfig(max_pairs=1, reference="file")),
                                             donate_argnums=0),
                                     lambda: PreferenceState.create(fresh(), tx, jax.random.PRNGKey(1)), (batch,)),
    }
    times = {}
    for name, (fn, state_fn, rest) in steps.items():
        state = state_fn()
        state, _ = fn(state, *rest)
        jax.block_until_ready(state)
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, m = fn(state, *rest)
            jax.block_until_ready(m)
            samples.append(time.perf_counter() - t0)
        times[name] = float(np.median(samples))
        print(f"{name}: {times[name]:.3f} s per step, {args.rows / times[name]:.2f} pairs/s")
    sft = times["SFT"]
    print(f"MPO / SFT step time on this CPU: frozen copy {times['MPO, frozen copy'] / sft:.2f}x (goal <= 2.1x), "
          f"reference from file {times['MPO, reference from file'] / sft:.2f}x (goal <= 1.1x) "
          f"({config.text.hidden_size}-wide {config.text.num_layers}-layer LLM, {args.rows} rows x "
          f"{batch['input_ids'].shape[1]} tokens, {args.tiles} tiles per pair)")


def plan_part(args) -> None:
    table = get_rules("fsdp")
    seq_len = 2 * 4096
    chip = parse_slice("v5p-2").chip
    smallest = {}  # (preset, mpo) -> the smallest slice the planner's estimate fits, or None
    for preset in ("InternVL2_5-8B", "InternVL2_5-78B"):
        config = target_config(preset, dtype="bfloat16", remat="full")
        opt = make_optimizer(config, "adamw")
        boxed = abstract_params(config, boxed=True)
        for mpo in (None, "copy", "file"):
            found = _smallest(config, chip, table, None, 1, seq_len, TILES, opt, boxed, mpo)
            smallest[preset, mpo] = found and found[0].name
            name = {None: "SFT", "copy": "MPO, frozen copy", "file": "MPO, reference from file"}[mpo]
            if found is None:
                print(f"{preset} {name}: no v5p slice up to the planner's limit fits")
                continue
            sl, sizes, e = found
            print(f"{preset} {name}: smallest v5p slice {sl.name} (mesh {sizes}), {e.train / 2**30:.2f} GiB per "
                  f"device of {chip.memory / 2**30:.0f} (params {e.params / 2**30:.2f}, reference "
                  f"{e.reference / 2**30:.2f}, optimizer {e.opt_state / 2**30:.2f}, activations "
                  f"{e.activations / 2**30:.2f})")
        sizes = parse_mesh(None, 64, boxed, table)
        for mpo in ("copy", "file"):
            e = estimate(config, sizes, table, rows=sizes["fsdp"] * sizes["data"], seq_len=seq_len, tiles=TILES,
                         optimizer=opt, mpo=mpo)
            print(f"{preset} MPO ({mpo}) on v5p-128 mesh {sizes}: {e.train / 2**30:.2f} GiB per device (estimate)")
    for preset in args.compile or ():
        for mpo in ("copy", "file"):
            compile_line(preset, "v5p-128", mpo, seq_len)
            smallest_compiled(preset, mpo, smallest.get((preset, mpo)) or "v5p-128", seq_len)


def compile_line(preset: str, chips: str, mpo: str, seq_len: int) -> bool:
    """Compile ``preset``'s MPO step ahead of time for the v5p slice ``chips`` (sharding.plan), print its
    per-device bytes next to the planner's estimate; whether it fits the chip's memory."""
    t0 = time.perf_counter()
    p = plan(preset, chips=chips, seq_len=seq_len, tiles=TILES, mpo=mpo)
    c, chip = p.compiled, p.target.chip
    fits = c.total <= chip.memory
    print(f"{preset} MPO ({mpo}) compiled for {chips} (mesh {p.mesh}, {p.rows} rows): {c.total / 2**30:.2f} GiB per "
          f"device of {chip.memory / 2**30:.0f} (arguments {c.argument_bytes / 2**30:.2f}, temporaries "
          f"{c.temp_bytes / 2**30:.2f}); estimate {p.estimate.train / 2**30:.2f} GiB; "
          f"{'fits' if fits else 'does not fit'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return fits


def smallest_compiled(preset: str, mpo: str, start: str, seq_len: int) -> None:
    """The smallest v5p slice the compiled step fits: from ``start`` (the estimate's smallest; the compiled step
    needs less, the estimate being an upper bound), halve the chips while it still fits."""
    chips, best = parse_slice(start).chips, None
    while chips >= 1 and compile_line(preset, f"v5p-{2 * chips}", mpo, seq_len):
        best, chips = f"v5p-{2 * chips}", chips // 2
    print(f"{preset} MPO ({mpo}): smallest v5p slice the compiled step fits: {best or 'none from ' + start}",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tiles", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--answer", type=int, default=56)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", nargs="*", metavar="PRESET", default=None,
                   help="also compile these presets' MPO steps (frozen copy and from file) ahead of time for v5p-128 "
                        "and from the smallest v5p slice the planner's estimate fits down to the smallest the "
                        "compiled step fits (no preset: InternVL2_5-8B; minutes each, InternVL2_5-78B up to 15)")
    p.add_argument("--skip-plan", action="store_true")
    p.add_argument("--skip-cpu", action="store_true")
    args = p.parse_args()
    if args.compile == []:
        args.compile = ["InternVL2_5-8B"]
    if not args.skip_cpu:
        cpu_part(args)
    if not args.skip_plan:
        plan_part(args)


if __name__ == "__main__":
    main()
