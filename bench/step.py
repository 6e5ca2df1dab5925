"""Training-step benchmark: forward, and forward + backward + AdamW, of an InternVL model on a mesh.

    python bench/step.py                                   # InternVL2.5-1B shapes, 1 row, float32, all devices (fsdp)
    python bench/step.py --dtype bfloat16 --rows 8 --attention dot_product     # the GPU run
    python bench/step.py --preset tiny-qwen2 --rows 8 --mesh 1,8,1 --rules fsdp_tp   # quick, 8 CPU devices

Each row holds ``--tiles`` image tiles (256 tokens each) plus ``--text-tokens`` text tokens (default 6 + 512 =
2048 tokens), random weights and data (one sample per row: its image tokens first, unsupervised, then supervised
text). The steps are ``sharding.plan.forward_step`` / ``train_step``: the latter is the trainer's step
(``train.step``: ``(TrainState, batch) -> (state, metrics)``, the weighted cross entropy over the batch, gradients,
optax AdamW with its state sharded like the params, the state donated), compiled once, then timed (median of
``--repeats`` after one warm-up). Reported: step time, tokens/s, model FLOPs (6 per weight per
token for the ViT and the LLM plus the attention matmuls, no rematerialisation; forward: a third) and MFU against
the devices' peak: ``--peak-tflops`` per device if given, else the H100/H200 bf16 dense peak (989 TFLOP/s) on
those GPUs, else a matmul rate measured here with a jitted ``jnp.dot`` in the same dtype (CPU: simulated devices
share the host's cores, so the peak is the host's, not multiplied by the device count).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from sharding.plan import forward_step, model_flops, target_config, train_step
from train.state import TrainState

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="InternVL2_5-1B", help="model shapes (internvl_jax.presets)")
    p.add_argument("--rows", type=int, default=1, help="global rows per step")
    p.add_argument("--tiles", type=int, default=6, help="image tiles per row")
    p.add_argument("--text-tokens", type=int, default=512, help="text tokens per row besides the image tokens")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params and compute dtype")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (default: every device on fsdp)")
    p.add_argument("--rules", default="fsdp", choices=list(sharding.RULES), help="sharding rule preset")
    p.add_argument("--remat", default="none", help="remat policy (internvl_jax.layers.REMAT_POLICIES)")
    p.add_argument("--attention", default="auto", help="attention implementation (InternVLConfig.attention_impl)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    return p.parse_args()


def device_peak(dtype, n: int = 2048) -> tuple[float, str]:
    """Peak FLOP/s of one device: a known GPU's bf16 peak, else a matmul measured now."""
    device = jax.devices()[0]
    for name, tflops in GPU_PEAK_TFLOPS.items():
        if name in device.device_kind:
            return tflops * 1e12, f"{name} bf16 dense peak"
    a = jnp.ones((n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        dot(a, a).block_until_ready()
    return 5 * 2 * n**3 / (time.perf_counter() - t0), f"measured {n}^3 {jnp.dtype(dtype).name} matmul"


def random_batch(spec: dict, config, seed: int = 0) -> dict:
    """Host arrays of a training batch of ``spec``'s shapes (``train.step.abstract_batch``): one sample per row,
    its image tokens (every tile valid, 256 positions per tile) first and unsupervised, the rest random text
    supervised with weight 1; positions restart at 0 in every row, segment id 1 throughout."""
    rng = np.random.default_rng(seed)
    rows, length = spec["input_ids"].shape
    ids = rng.integers(0, config.text.vocab_size, (rows, length)).astype(np.int32)
    ids[ids == config.image_token_id] = 0
    batch = {"input_ids": ids, "labels": np.roll(ids, -1, axis=1),
             "positions": np.broadcast_to(np.arange(length), (rows, length)).astype(spec["positions"].dtype),
             "segment_ids": np.ones((rows, length), np.int32)}
    supervised = np.ones((rows, length), bool)
    supervised[:, -1] = False  # the last position has no next token
    if "tile_mask" in spec:
        tiles = spec["tile_mask"].shape[1]
        image = tiles * config.tokens_per_tile
        ids[:, :image] = config.image_token_id
        supervised[:, : image] = False
        batch["pixel_values"] = rng.integers(0, 256, spec["pixel_values"].shape, np.uint8)  # levels
        batch["tile_mask"] = np.ones((rows, tiles), bool)
    batch["labels"] = np.where(supervised, batch["labels"], -100).astype(np.int32)  # train.loss.IGNORE
    batch["loss_weights"] = supervised.astype(np.float32)
    return batch


def random_inputs(step, config, mesh, rules, seed: int = 0):
    """Concrete arguments for a plan step, in its shardings: ``(params, batch)`` for the forward,
    ``(TrainState, batch)`` for the train step (params random, optimizer moments and counters zero, which is what
    ``optax.adamw``'s init gives)."""
    batch = sharding.shard_batch(random_batch(step.args[-1], config, seed), mesh, rules)
    normal = lambda k, tree: jax.tree_util.tree_map(  # noqa: E731
        lambda s: jax.random.normal(k, s.shape, s.dtype) * 0.02, tree)
    zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    if isinstance(step.args[0], TrainState):
        init = lambda k: TrainState(  # noqa: E731
            step=jnp.zeros((), jnp.int32), params=normal(k, step.args[0].params),
            opt_state=zeros(step.args[0].opt_state), rng=jax.random.PRNGKey(seed), skipped=jnp.zeros((), jnp.int32))
    else:
        init = lambda k: normal(k, step.args[0])  # noqa: E731
    first = jax.jit(init, out_shardings=step.in_shardings[0])(jax.random.PRNGKey(seed))
    return first, batch


def timed(compiled, args, repeats: int, train: bool) -> float:
    """Median seconds per call; a train step's donated state is replaced by the state it returns between calls
    (``(state, batch) -> (state, metrics)``)."""
    times = []
    out = compiled(*args)
    jax.block_until_ready(out)
    for _ in range(repeats):
        if train:
            args = (out[0], args[1])
        t0 = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    args = parse_args()
    config = target_config(args.preset, dtype=args.dtype, remat=args.remat).replace(attention_impl=args.attention)
    n = jax.device_count()
    sizes = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else (1, n, 1)
    mesh = sharding.make_mesh(*sizes)
    seq_len = args.tiles * config.tokens_per_tile + args.text_tokens
    peak, peak_what = (args.peak_tflops * 1e12, "given") if args.peak_tflops else device_peak(jnp.dtype(args.dtype))
    print(f"{args.preset} {args.dtype}, {args.rows} rows x {seq_len} tokens ({args.tiles} tiles), mesh "
          f"{sharding.mesh_shape(mesh)} rules {args.rules}, remat {args.remat}, attention {args.attention}, "
          f"{n} x {jax.devices()[0].device_kind}; peak {peak / 1e12:.1f} TFLOP/s per device ({peak_what})")
    train_flops = model_flops(config, args.rows, seq_len, args.tiles, devices=1)
    for name, build, flops in (("forward", forward_step, train_flops / 3), ("train step", train_step, train_flops)):
        step = build(config, mesh, args.rules, rows=args.rows, seq_len=seq_len, tiles=args.tiles)
        t0 = time.perf_counter()
        compiled, stats = step.compile(mesh, args.rules)
        compile_s = time.perf_counter() - t0
        seconds = timed(compiled, random_inputs(step, config, mesh, args.rules), args.repeats, build is train_step)
        mfu = flops / seconds / (peak * (1 if jax.default_backend() == "cpu" else n))  # CPU devices share cores
        print(f"{name}: {seconds:.3f} s, {args.rows * seq_len / seconds:,.0f} tokens/s, "
              f"{flops / seconds / 1e12:.2f} TFLOP/s = MFU {mfu:.1%} (compiled in {compile_s:.1f} s; "
              f"per device: arguments {stats.argument_bytes / 2**30:.2f} GiB, temporaries "
              f"{stats.temp_bytes / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
