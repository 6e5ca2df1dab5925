"""LoRA against full fine-tuning: the trainer's step on the same model and batch, and the planner's per-device bytes.

    python bench/lora.py                   # a small model on this CPU, then InternVL2.5-8B / -78B from the planner
    python bench/lora.py --skip-plan       # the CPU part only
    python bench/lora.py --compile         # also the 8B steps compiled for v5p-32 and v5p-2 (libtpu; ~20 min)
    python bench/lora.py --skip-cpu --skip-plan --compile v5p-32 --compile-layers 4 2   # 4 LLM, 2 ViT layers: minutes

1. This CPU (one device): a small InternVL (``--hidden`` wide LLM of ``--layers`` layers, a 4-layer ViT on 112 px
   tiles) in float32; the train step (``train.step``, the trainer's AdamW of ``train.optim``) compiled twice, full
   fine-tuning (everything trains) and LoRA r=16 on the ViT and the LLM (the original's targets, alpha 2r, dropout
   0.05, the projector trained, the base frozen: no gradient, no optimizer state), same batch. Printed: median step
   time (the two steps timed in turns, ``--repeats`` rounds) and the compiled program's per-device memory
   (arguments + outputs - donated + temporaries), and their ratios. Measured (2026-12-07, a host ~1.7x slower than
   the earlier figures' days): **0.77-0.78x** time (full 0.82-0.83 s, LoRA 0.63-0.64 s), **0.58x** memory (257.3 /
   446.6 MiB). Before that day's dropout changes: 0.86-0.89x and 0.65x. The masks there were threefry words
   (16 bits an entry) and each adapted kernel kept its own dropped copy of x for the backward pass; the hashed mask
   of ``lora.dropout_keep`` is ~10x cheaper, and ``lora.down`` recomputes it in the backward pass. In a same-run
   A/B the dropout then cost 0.754x -> 0.782x, against 0.729x -> 0.849x before. Earlier, on faster days: 0.79-0.98x,
   median 0.85x; 0.77-0.81x before the full step's kernels became 2-D products (``layers.Dense``: its kernel
   gradients had paid a transposing copy that the LoRA step, already 2-D in ``lora.down``/``up``, skipped). On a
   loaded host the ratio drops (0.52x), because the full step suffers more: compare idle runs only.
2. The planner (``sharding.plan.estimate``, the analytic per-device bytes ``internvl-jax plan [--lora 16]``
   reports; params in bfloat16, LoRA adapters and their Adam moments in float32): InternVL2.5-8B on a 16-chip and
   on a 1-chip mesh, the same for both, and the smallest v5e / v5p slice where each of 8B and 78B fits (fsdp rules,
   4096 tokens a row, one row per batch shard, full remat).
3. ``--compile``: the same 8B steps compiled ahead of time (exact bytes). Measured, LoRA / full: v5p-2 (one chip)
   22.39 / 66.69 GiB = 0.34x (goal <= 0.4x); v5p-32 (fsdp 16) 6.13 / 8.72 GiB = 0.70x, where the activations,
   the same for both, are most of the bytes. The trainer's Adam moments are in the params' dtype (bfloat16), so
   full fine-tuning's state there is params 0.94 + moments 1.88 GiB (+ gradients 0.94) and LoRA's params 0.94 +
   adapters and moments 0.37 GiB (``sharding.plan.estimate``): the rest, activations and the backward working
   set, is 4.96 GiB for full and 4.69 GiB for LoRA, so the 0.4x goal is out of reach on this mesh (at most 0.65x
   with adapters free). Of LoRA's own bytes, 122 MiB of float32 adapters per device are replicated (those without
   an ``embed`` axis: B of q/k/v/gate/up, A of o/down, and the ViT's like them; the rank axis is never split), ~0.49
   GiB with their moments and gradients.
   ``--compile-layers LLM VIT``: the same widths with fewer layers; two runs give the bytes per layer. Measured on
   v5p-32 (2 ViT layers; 2, 4, 6 LLM layers): full 2.93 / 3.21 / 3.49 GiB, LoRA 2.21 / 2.42 / 2.63 GiB, i.e. per
   LLM layer full +0.139 GiB (arguments 0.076: bf16 params and two moments; temporaries 0.062) and LoRA +0.106
   (arguments 0.035: params and the replicated adapters; temporaries 0.070). In the buffer assignment
   (``XLA_FLAGS=--xla_dump_to=DIR``) the only per-layer temporaries of either are the saved layer inputs
   (bf16 [1, 4096, 4096], 32 MiB a layer) and, for LoRA, the float32 adapter gradients and updates: no dropout
   mask or low-rank product is kept across the remat boundary and no frozen weight is gathered outside the scan.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # bench/train*.py would shadow the train package

import jax

import sharding
from internvl_jax import lora
from internvl_jax.cli import model_config
from internvl_jax.model import abstract_params
from internvl_jax.presets import get_preset
from sharding.plan import _smallest, estimate, plan, target_config, train_step, trainer_optimizer, with_lora
from sharding.rules import get_rules
from sharding.topology import parse_slice
from train import optim

_spec = importlib.util.spec_from_file_location("bench_step", os.path.join(os.path.dirname(__file__), "step.py"))
bench_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_step)

RANK = 16


def variants(config) -> tuple:
    """(name, config, Optimizer) of full fine-tuning (the trainer's AdamW, everything trains) and of LoRA r=16 on
    the ViT and the LLM (``sharding.plan.with_lora``: the original's targets, alpha 2r, dropout 0.05, projector
    trained, base frozen), as ``internvl-jax plan [--lora 16]`` builds them."""
    full = trainer_optimizer("full", optim.OptimConfig(), config)
    return ("full", config, full), (f"LoRA r={RANK}", *with_lora(config, RANK))


def small_config(hidden: int, layers: int):
    """A small InternVL for this CPU: qwen2 LLM ``hidden`` wide, a 4-layer ViT 256 wide on 112 px tiles."""
    base = get_preset("tiny-qwen2")
    text = dataclasses.replace(base.text, hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers,
                               num_heads=hidden // 64, num_kv_heads=max(1, hidden // 256), head_dim=64)
    vision = dataclasses.replace(base.vision, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                                 image_size=112)
    return base.replace(text=text, vision=vision, dtype="float32", param_dtype="float32", remat="none")


def interleaved(runs: dict, repeats: int) -> dict:
    """{name: median seconds per step} of train steps ``runs`` = {name: (compiled, (state, batch))}, timed in turns
    (one step of each per round, after a warm-up step each), so that a change of the host's speed during the run
    reaches every variant alike; each step's donated state is the one the previous step of its variant returned."""
    args = {name: compiled(*a)[0] for name, (compiled, a) in runs.items()}
    jax.block_until_ready(args)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (compiled, (_, batch)) in runs.items():
            t0 = time.perf_counter()
            args[name] = jax.block_until_ready(compiled(args[name], batch))[0]
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_part(args) -> None:
    config = small_config(args.hidden, args.layers)
    mesh = sharding.make_mesh(1, 1, 1)
    seq_len = args.tiles * config.tokens_per_tile + args.text_tokens
    runs, about = {}, {}
    for name, cfg, opt in variants(config):
        step = train_step(cfg, mesh, "fsdp", rows=args.rows, seq_len=seq_len, tiles=args.tiles, optimizer=opt)
        compiled, stats = step.compile(mesh, "fsdp")
        runs[name] = (compiled, bench_step.random_inputs(step, cfg, mesh, "fsdp"))
        params = abstract_params(cfg)
        trained = sum(int(x.size) for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(opt.trainable)) if t)
        about[name] = (stats, trained, lora.count(params))
    seconds = interleaved(runs, args.repeats)
    results = {}
    for name, (stats, trained, total) in about.items():
        results[name] = (seconds[name], stats.total)
        print(f"{name}: step {seconds[name]:.3f} s, compiled per-device memory {stats.total / 2**20:.1f} MiB "
              f"(arguments {stats.argument_bytes / 2**20:.1f}, temporaries {stats.temp_bytes / 2**20:.1f}), "
              f"trainable {trained:,} of {total:,} params")
    (t_full, m_full), (t_lora, m_lora) = results.values()
    print(f"LoRA / full on this CPU: step time {t_lora / t_full:.2f}x, compiled memory {m_lora / m_full:.2f}x "
          f"({config.text.hidden_size}-wide {config.text.num_layers}-layer LLM, {args.rows} rows x {seq_len} tokens, "
          f"{args.tiles} tiles)")


MESHES_8B = ({"data": 1, "fsdp": 16, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 1})  # the same for both


def plan_part(args) -> None:
    table = get_rules("fsdp")
    seq_len, tiles = 4096, 6
    for preset in ("InternVL2_5-8B", "InternVL2_5-78B"):
        both = variants(target_config(preset, dtype="bfloat16", remat="full"))
        for sizes in MESHES_8B if preset == "InternVL2_5-8B" else ():
            rows = sizes["fsdp"]
            est = {}
            for name, cfg, opt in both:
                e = est[name] = estimate(cfg, sizes, table, rows=rows, seq_len=seq_len, tiles=tiles, optimizer=opt)
                print(f"{preset} {name} on mesh {sizes} ({rows} rows x {seq_len}): per device {e.train / 2**30:.2f} "
                      f"GiB (params {e.params / 2**30:.2f}, grads {e.grads / 2**30:.3f}, optimizer "
                      f"{e.opt_state / 2**30:.3f}, activations {e.activations / 2**30:.2f})")
            full, low = est.values()
            state = lambda e: e.params + e.grads + e.opt_state  # noqa: E731
            print(f"{preset} on mesh {sizes}: LoRA / full per-device bytes {low.train / full.train:.2f}x "
                  f"(params+grads+optimizer {state(low) / state(full):.2f}x)")
        for chip in ("v5e-1", "v5p-2"):
            target = parse_slice(chip).chip
            for name, cfg, opt in both:
                boxed = abstract_params(cfg, boxed=True)
                found = _smallest(cfg, target, table, None, 1, seq_len, tiles, opt, boxed)
                if found is None:
                    print(f"{preset} {name}: no {target.name} slice up to the planner's limit fits")
                    continue
                sl, sizes, e = found
                print(f"{preset} {name}: smallest {target.name} slice {sl.name} (mesh {sizes}), "
                      f"{e.train / 2**30:.2f} GiB per device of {target.memory / 2**30:.0f}")


def layers_8b(llm: int | None, vit: int | None):
    """InternVL2.5-8B's config with ``llm`` decoder and ``vit`` ViT layers (None: the preset's), same widths: the
    compiled bytes of a few layers, whose slope per layer is the full model's, compile in minutes."""
    config = model_config("InternVL2_5-8B")
    text = dataclasses.replace(config.text, num_layers=llm or config.text.num_layers)
    return config.replace(text=text, vision=dataclasses.replace(config.vision, num_layers=vit or config.vision.num_layers))


def compile_part(chips: str, llm: int | None = None, vit: int | None = None) -> None:
    """The InternVL2.5-8B train step, full and LoRA, compiled ahead of time for ``chips`` (``internvl-jax plan
    InternVL2_5-8B --chips CHIPS --seq-len 4096 [--lora 16]``; ``llm`` / ``vit``: that many layers, see
    :func:`layers_8b`): exact per-device bytes and their ratio."""
    name = "InternVL2_5-8B" + (f" ({llm or 'all'} LLM / {vit or 'all'} ViT layers)" if llm or vit else "")
    totals = []
    for rank in (0, RANK):
        p = plan(layers_8b(llm, vit), chips=chips, seq_len=4096, tiles=6, lora=rank)
        c = p.compiled
        totals.append(c.total)
        print(f"{name} {'LoRA r=%d' % rank if rank else 'full'} compiled for {chips} (mesh {p.mesh}, "
              f"{p.rows} rows x 4096): {c.total / 2**30:.3f} GiB per device (arguments {c.argument_bytes / 2**30:.3f}, "
              f"temporaries {c.temp_bytes / 2**30:.3f}; estimate {p.estimate.train / 2**30:.2f}), "
              f"compile {p.compile_seconds:.0f} s", flush=True)
    print(f"{name} on {chips}: LoRA / full compiled per-device bytes {totals[1] / totals[0]:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tiles", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=240)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-plan", action="store_true")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--compile", nargs="*", metavar="CHIPS", default=None,
                   help="also compile the 8B steps ahead of time for these v5p slices (default v5p-32 and v5p-2: "
                        "the two meshes above; minutes each, needs libtpu)")
    p.add_argument("--compile-layers", nargs=2, type=int, metavar=("LLM", "VIT"), default=(None, None),
                   help="compile the 8B's widths with this many LLM and ViT layers (0: the preset's): minutes "
                        "instead of ~20 per step; two runs give the bytes per layer")
    args = p.parse_args()
    if not args.skip_cpu:
        cpu_part(args)
    if not args.skip_plan:
        plan_part(args)
    for chips in (args.compile or ["v5p-32", "v5p-2"]) if args.compile is not None else ():
        compile_part(chips, *args.compile_layers)


if __name__ == "__main__":
    main()
