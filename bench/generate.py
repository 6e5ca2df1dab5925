"""Generation benchmark: internvl-jax ``generate`` vs transformers ``generate`` on an InternVL2.5-1B-shaped model.

    python bench/generate.py                                   # float32 + bfloat16, batch 1 and 8, 128 new tokens
    python bench/generate.py --dtypes float32 --batches 1 --repeats 5
    python bench/generate.py --skip-transformers               # ours only (and the bandwidth probe)
    python bench/generate.py --dtypes bfloat16 --preset InternVL2_5-8B   # on a GPU (bench/gpu_check.sh runs it all)

Both sides get the same random weights: a ``transformers.InternVLForConditionalGeneration`` is built from the
preset's transformers-native config on torch's device (sdpa attention), and its state dict goes into ours with
``convert.load.from_state_dict`` (no file written) in each ``--dtypes`` entry, then converted once to the
generation layout (``internvl_jax.generate.unrolled_params``; ``generate`` would otherwise convert them on every
call). Every row of the batch is one prompt of one
448x448 tile: 8 text tokens, 256 IMG_CONTEXT tokens, 56 text tokens (320 tokens; ``--text-tokens`` changes the
64 text tokens). Decoding is greedy and runs exactly ``--new-tokens`` tokens on both sides (no end-of-sequence id;
transformers gets ``min_new_tokens = max_new_tokens``).

Runners: ours in each dtype; transformers in each ``--transformers-dtypes`` entry: by default float32 on a CPU
(the reference of every CPU goal; torch's bfloat16 decode on a CPU is several times slower than its float32 one,
so it costs minutes per round) and bfloat16 on a GPU (the reference of the GPU goals). Each runner is timed with 1 and
with N new tokens, so that

    prefill latency   = median time of generate(max_new_tokens=1)       (ViT + prefill + first token)
    decode tokens/s   = (N - 1) x batch / decode time of the N-token call

where the decode time is, for transformers, median t_N - median t_1, and for ours the decode loop's own time
(``generate(..., timings=)``): t_N - t_1 also carries the difference between two prefills, which on this CPU moves
the per-step figure by +-15% (the t_N - t_1 figure of ours is printed beside it).

One warm-up call of each (ours with 1 and N tokens, which compiles both programs; transformers with 1 and 2), then ``--repeats`` rounds that interleave every runner, since a shared
CPU changes speed from one minute to the next. On a 2-core CPU (float32 + bfloat16 + transformers float32) a round
takes about 1.5 min at batch 1 and 6 min at batch 8 (the batch-8 prefill alone is 25-45 s per call), so the default
run lasts about half an hour; ``--batches 1 --repeats 2`` takes about 5 minutes.

Memory bandwidth: a jitted ``jnp.sum`` over a float32 array far bigger than the caches (``--probe-gb``, default 2 GB
on a CPU, 8 GB on a GPU, where 2 GB take half a millisecond),
median of a few calls, measured just before and just after each runner's two timed calls in every round. Each
decode step has to read every LLM weight once (decoder layers, final norm, LM head, one embedding row per sequence;
the ViT and projector run in the prefill only), so each round's weight bytes / step time is compared with the mean
of the two probes around it, and the median of these per-round fractions is reported: this machine's bandwidth
drifts by 20-30% within minutes, so a probe taken at another moment would measure another machine. The KV cache
each step reads is reported beside it.

Goals on a CPU (each printed as met / NOT met):
  * float32, batch 1: ours reads weights at >= 90% of the measured bandwidth, and decodes no slower than transformers
  * bfloat16, batch 1: ours decodes >= 1.7x transformers' float32 tokens/s
  * batch 8: ours >= 1.2x transformers' tokens/s at batch 8 (same dtype)

Goals on a GPU (bfloat16 on both sides; ``GPU_GOALS``):
  * InternVL2.5-8B shapes, batch 1: ours >= 85% of the measured read bandwidth and >= 4x transformers
  * InternVL2.5-1B shapes, batch 1: ours >= 5x transformers
  * batch 8: ours >= 3x transformers
Ours compiles its decode programs with ``internvl_jax.generate.DECODE_COMPILER_OPTIONS`` (on a GPU, no Triton
GEMMs); ``--also-xla-defaults`` adds, per dtype, a runner "ours DTYPE xla-defaults" whose decode programs get XLA's
own defaults (``decode_compiler_options={}``), so that one process compares the two settings. The header prints
both and ``XLA_FLAGS`` (a flag named there wins over the table).

Device: JAX runs on its default device; torch on ``--torch-device`` (auto: CUDA when JAX runs on a GPU and torch
sees one, else the CPU with ``torch.set_num_threads(os.cpu_count())``). On a GPU both share the card:
``XLA_PYTHON_CLIENT_PREALLOCATE`` defaults to false here, so that JAX does not take 75% of it at start.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares a GPU with JAX

# GPU goals per preset (bfloat16, ours vs transformers at batch 1): the fraction of the read bandwidth, the speed-up
GPU_GOALS = {"InternVL2_5-8B": dict(bandwidth=0.85, speedup=4.0), "InternVL2_5-1B": dict(speedup=5.0)}
GPU_BATCH_SPEEDUP = 3.0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="InternVL2_5-1B", help="model shapes (internvl_jax.presets)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes of ours (float32, bfloat16)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (N)")
    p.add_argument("--text-tokens", type=int, default=64, help="ordinary text tokens of each prompt besides the image tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up of each runner)")
    p.add_argument("--skip-transformers", action="store_true", help="time ours only (goals against transformers are skipped)")
    p.add_argument("--transformers-dtypes", default=None,
                   help="comma-separated dtypes of transformers (default: float32 on a CPU, bfloat16 on a GPU)")
    p.add_argument("--torch-device", default="auto", help="torch's device: auto (cuda when JAX runs on a GPU), cpu, cuda")
    p.add_argument("--attention", default="auto",
                   help="ours' attention impl for the ViT and the prefill (internvl_jax.layers.ATTENTION_IMPLS; "
                        "auto: per KV head on a CPU, cuDNN through jax.nn.dot_product_attention on a GPU)")
    p.add_argument("--also-xla-defaults", action="store_true",
                   help="also time ours with XLA's default options for the decode programs (decode_compiler_options={})")
    p.add_argument("--probe-gb", type=float, default=None,
                   help="size of the float32 array of the bandwidth probe, GB (default: 2 on a CPU, 8 on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.transformers_dtypes is not None:
        args.transformers_dtypes = [d.strip() for d in args.transformers_dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes + (args.transformers_dtypes or []) if d not in ("float32", "bfloat16")]
    if bad:
        p.error(f"unknown dtype(s) {bad}; use float32 and/or bfloat16")
    from internvl_jax.layers import ATTENTION_IMPLS

    if args.attention not in ATTENTION_IMPLS:
        p.error(f"unknown --attention {args.attention!r}; use one of {', '.join(ATTENTION_IMPLS)}")
    if args.torch_device not in ("auto", "cpu", "cuda"):
        p.error(f"unknown --torch-device {args.torch_device!r}; use auto, cpu or cuda")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode time is t_N - t_1)")
    return args


# ----------------------------------------------------------------------------------------------
# Bytes per decode step
# ----------------------------------------------------------------------------------------------


def weight_bytes_per_step(params, batch: int) -> int:
    """Bytes of weights one decode step reads: every language-model parameter except the embedding table, of
    which only ``batch`` rows are gathered (a tied head reads the whole table as the LM head)."""
    import jax

    lm = params["language_model"]
    total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(lm))
    table = lm["embed_tokens"]
    rows = batch * table.shape[1] * table.dtype.itemsize
    return total if "lm_head" not in lm else total - table.size * table.dtype.itemsize + rows


def cache_bytes_per_step(config, batch: int, slots: int) -> int:
    """Bytes of the KV cache (k and v, all layers) ``slots`` cache positions of ``batch`` rows span."""
    import jax.numpy as jnp

    t = config.text
    return 2 * t.num_layers * batch * slots * t.num_kv_heads * t.head_dim * jnp.dtype(config.dtype).itemsize


# ----------------------------------------------------------------------------------------------
# Bandwidth probe
# ----------------------------------------------------------------------------------------------


class BandwidthProbe:
    """Read bandwidth right now, GB/s: median of ``tries`` jitted sums over a float32 array of ``gb`` GB.

    The array is allocated for each probe and freed after it, so that it does not hold memory during the runs.
    """

    def __init__(self, gb: float, tries: int = 3):
        import jax
        import jax.numpy as jnp

        self.n, self.tries = int(gb * 1e9) // 4, tries
        self.sum = jax.jit(jnp.sum)
        self.make = jax.jit(lambda: jnp.ones((self.n,), jnp.float32))
        self.readings: list[float] = []

    def __call__(self) -> float:
        x = self.make()
        self.sum(x).block_until_ready()  # compiles once; touches the pages
        times = []
        for _ in range(self.tries):
            t0 = time.perf_counter()
            self.sum(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        del x
        gbs = self.n * 4 / statistics.median(times) / 1e9
        self.readings.append(gbs)
        return gbs


# ----------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------


def prompt_batch(config, batch: int, text_tokens: int, seed: int):
    """ids int32 [B, L] (8 text tokens, one tile of IMG_CONTEXT tokens, the rest text) and float32 pixels
    [B, 1, H, W, 3] (normalised values)."""
    rng = np.random.default_rng(seed)
    img = config.tokens_per_tile
    ids = rng.integers(1, min(150000, config.text.vocab_size), (batch, img + text_tokens)).astype(np.int32)
    ids[ids == config.image_token_id] = 1
    start = min(8, text_tokens)
    ids[:, start : start + img] = config.image_token_id
    size = config.image_size
    pixels = rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32)
    return ids, pixels


def ours_runner(model, params, ids, pixels, jdtype, decode_options=None):
    """call(n) -> int [B, n] tokens, with ``internvl_jax.generate.generate`` (``decode_options``: its
    ``decode_compiler_options``); ``call.timings`` holds the last call's prefill and decode seconds."""
    import jax.numpy as jnp

    from internvl_jax.generate import generate

    pix, mask = jnp.asarray(pixels, jdtype), jnp.ones(pixels.shape[:2], bool)

    def call(n):
        return generate(model, params, input_ids=ids, pixel_values=pix, tile_mask=mask, max_new_tokens=n,
                        timings=call.timings, decode_compiler_options=decode_options)

    call.timings = {}
    return call


def transformers_runner(ref, ids, pixels):
    """call(n) -> int [B, n] tokens, with transformers' ``generate`` (greedy, exactly n tokens) on ``ref``'s device
    and in its dtype; the tokens come back to the host, which waits for the device."""
    import torch

    device, dtype = ref.device, ref.dtype
    t_ids = torch.tensor(ids, dtype=torch.long, device=device)
    t_mask = torch.ones_like(t_ids)
    t_pix = torch.tensor(pixels.reshape(-1, *pixels.shape[2:]).transpose(0, 3, 1, 2)).to(device, dtype)  # [B*T, 3, H, W]

    def call(n):
        with torch.no_grad():
            out = ref.generate(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pix, max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, t_ids.shape[1]:].cpu().numpy()

    return call


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from convert.load import from_state_dict
    from internvl_jax.config import to_hf_dict
    from internvl_jax.generate import cache_length, platform_decode_options, unrolled_params
    from internvl_jax.model import InternVL
    from internvl_jax.presets import get_preset

    cores = os.cpu_count()
    torch.set_num_threads(cores)
    gpu = jax.default_backend() == "gpu"
    tdevice = args.torch_device
    if tdevice == "auto":
        tdevice = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    tdtypes = [] if args.skip_transformers else (args.transformers_dtypes or ["bfloat16" if gpu else "float32"])
    probe_gb = args.probe_gb or (8.0 if gpu else 2.0)
    jdtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    n_new = args.new_tokens
    print(f"jax {jax.__version__} on {jax.devices()[0]} | torch {torch.__version__} on {tdevice} "
          f"({torch.get_num_threads()} threads) | transformers {transformers.__version__} | {cores} cores")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; ours' decode programs compile with "
          f"{platform_decode_options(jax.default_backend())}" + (" and XLA's defaults {}" if args.also_xla_defaults else ""))
    if tdevice == "cuda":
        print(f"torch's GPU: {torch.cuda.get_device_name()}")
    if jax.default_backend() == "cpu":
        from internvl_jax.kernels import cpu_kernels_enabled

        print(f"CPU decoding kernels (internvl_jax.kernels): {'on' if cpu_kernels_enabled() else 'OFF, XLA instead'}")

    # --- identical random weights on both sides -----------------------------------------------
    t0 = time.perf_counter()
    preset = get_preset(args.preset)
    torch.manual_seed(args.seed)
    # built once, in float32 when some runner needs it (the other dtypes are roundings of it)
    base = torch.float32 if "float32" in args.dtypes + tdtypes else torch.bfloat16
    with torch.device(tdevice):
        ref = transformers.InternVLForConditionalGeneration._from_config(
            transformers.InternVLConfig(**to_hf_dict(preset)), attn_implementation="sdpa", dtype=base).eval()
    ours = {}  # dtype -> (model, params)
    for name in args.dtypes:
        model, params = from_state_dict(ref.state_dict(), ref.config, dtype=jdtypes[name])
        model = InternVL(model.config.replace(attention_impl=args.attention))
        ours[name] = model, unrolled_params(params, model.config)  # converted once, as a server would
        del params
    refs = {d: ref if getattr(torch, d) == base else copy.deepcopy(ref).to(getattr(torch, d)) for d in tdtypes}
    del ref
    cfg = next(iter(ours.values()))[0].config
    print(f"model: {args.preset} shapes, built + handed to ours ({', '.join(ours)}) in {time.perf_counter() - t0:.1f} s")
    print(f"prompt: {cfg.tokens_per_tile} IMG_CONTEXT (one {cfg.image_size}x{cfg.image_size} tile) + {args.text_tokens} "
          f"text tokens per row; {n_new} new tokens, greedy; {args.repeats} timed rounds")

    probe = BandwidthProbe(probe_gb)
    results = {}  # (runner name, batch) -> dict

    for batch in args.batches:
        ids, pixels = prompt_batch(cfg, batch, args.text_tokens, args.seed)
        runners = {f"ours {d}": ours_runner(m, p, ids, pixels, jdtypes[d]) for d, (m, p) in ours.items()}
        if args.also_xla_defaults:
            runners.update({f"ours {d} xla-defaults": ours_runner(m, p, ids, pixels, jdtypes[d], {})
                            for d, (m, p) in ours.items()})
        runners.update({f"transformers {d}": transformers_runner(r, ids, pixels) for d, r in refs.items()})
        print(f"\n=== batch {batch} ===")
        times = {name: {1: [], n_new: []} for name in runners}
        tokens = {}
        for name, call in runners.items():  # warm-up (ours compiles both programs here)
            n_warm = n_new if name.startswith("ours") else 2
            w1, _ = timed(lambda: call(1))
            wn, _ = timed(lambda: call(n_warm))
            print(f"warm-up {name}: {w1:.1f} s (1 token), {wn:.1f} s ({n_warm} tokens)")
        loop_steps = {name: [] for name in runners}  # ours: the decode loop's own time per step, per round
        probes = {name: [] for name in runners}  # per round: the mean of the probes just before and after
        for r in range(args.repeats):
            for name, call in runners.items():
                before = probe()
                for n in (1, n_new):
                    dt, out = timed(lambda: call(n))
                    times[name][n].append(dt)
                    if n == n_new and name.startswith("ours"):
                        loop_steps[name].append(call.timings["decode_s"] / (n_new - 1))
                    if n == n_new:
                        tokens[name] = out
                    assert out.shape == (batch, n), (name, out.shape)
                probes[name].append((before + probe()) / 2)
            line = ", ".join(f"{name} {times[name][1][-1]:.2f}/{times[name][n_new][-1]:.2f} s "
                             f"({probes[name][-1]:.1f} GB/s)" for name in runners)
            print(f"round {r + 1}: t_1/t_{n_new} (bandwidth around them): {line}")
        bandwidth = statistics.median(x for name in runners for x in probes[name])

        slots = cache_length(ids.shape[1], n_new)  # ours' cache slots
        for name in runners:
            t1, tn = statistics.median(times[name][1]), statistics.median(times[name][n_new])
            difference = (tn - t1) / (n_new - 1)  # the t_N - t_1 estimate of a step
            # per round, each compared below with the bandwidth measured around it (the machine's speed drifts)
            steps = loop_steps[name] or [(b - a) / (n_new - 1) for a, b in zip(times[name][1], times[name][n_new])]
            step = statistics.median(loop_steps[name]) if loop_steps[name] else difference
            res = dict(prefill=t1, total=tn, step=step, difference=difference, tok_s=batch / step, steps=steps,
                       probes=probes[name], bandwidth=statistics.median(probes[name]))
            if name.startswith("ours"):
                params = ours[name.split()[1]][1]
                res["weight_bytes"] = weight_bytes_per_step(params, batch)
                res["cache_bytes"] = cache_bytes_per_step(ours[name.split()[1]][0].config, batch, slots)
            else:
                d = name.split()[1]
                res["weight_bytes"] = weight_bytes_per_step(ours[d][1], batch) if d in ours else None
            results[name, batch] = res

        print(f"bandwidth (median of the probes): {bandwidth:.1f} GB/s")
        for name in runners:
            res = results[name, batch]
            frac = ""
            if res["weight_bytes"]:
                rate = res["weight_bytes"] / res["step"] / 1e9
                res["bw_frac"] = statistics.median(res["weight_bytes"] / st / 1e9 / bw
                                                   for st, bw in zip(res["steps"], res["probes"]))
                frac = (f" | weights {res['weight_bytes'] / 1e9:.2f} GB/step -> {rate:.1f} GB/s; per round "
                        f"{res['bw_frac']:.0%} of the bandwidth around it (median)")
                if "cache_bytes" in res:
                    frac += f" (+ KV cache {res['cache_bytes'] / 1e6:.0f} MB/step, {slots} slots)"
            how = (f"decode loop {res['step'] * 1e3:.1f} ms/step; t_N - t_1 gives {res['difference'] * 1e3:.1f}"
                   if loop_steps[name] else f"t_N - t_1: {res['step'] * 1e3:.1f} ms/step")
            print(f"{name:>26}: prefill {res['prefill'] * 1e3:7.0f} ms | decode {res['tok_s']:6.1f} tokens/s "
                  f"({how}){frac}")
        for d in ours:
            if f"transformers {d}" in tokens:
                a, b = tokens[f"ours {d}"], tokens[f"transformers {d}"]
                first = [int(np.argmax(x != y)) if (x != y).any() else len(x) for x, y in zip(a, b)]
                print(f"tokens ours vs transformers ({d}): {np.mean(a == b):.1%} equal; first difference per row "
                      f"at {first} (of {n_new})")

    # --- goals ---------------------------------------------------------------------------------------
    print("\n=== goals ===")
    print(f"bandwidth probe readings: {', '.join(f'{x:.1f}' for x in probe.readings)} GB/s")
    (gpu_goals if gpu else cpu_goals)(results, args)
    if args.also_xla_defaults:
        compare_decode_options(results)


def compare_decode_options(results: dict):
    """Per dtype and batch: ours with the platform's decode options against ours with XLA's defaults."""
    for (name, batch), res in results.items():
        other = results.get((f"{name} xla-defaults", batch))
        if name.startswith("ours") and other:
            print(f"decode options, {name.split()[1]} batch {batch}: platform's {res['tok_s']:.1f} tokens/s "
                  f"({res['bw_frac']:.0%} of bandwidth) vs XLA defaults {other['tok_s']:.1f} ({other['bw_frac']:.0%}) "
                  f"= {res['tok_s'] / other['tok_s']:.2f}x")


def goal(text, met):
    print(f"goal: {text}: {'met' if met else 'NOT met'}")


def cpu_goals(results: dict, args):
    o, t = results.get(("ours float32", 1)), results.get(("transformers float32", 1))
    if o:
        detail = f"ours {o['bw_frac']:.0%} of {o['bandwidth']:.1f} GB/s, {o['tok_s']:.1f} tokens/s"
        if t:
            detail += f" vs transformers {t['tok_s']:.1f} tokens/s ({t.get('bw_frac', float('nan')):.0%} of bandwidth)"
        goal(f"float32 batch 1 >= 90% of bandwidth and not slower than transformers ({detail})",
             o["bw_frac"] >= 0.9 and (t is None or o["tok_s"] >= t["tok_s"]))
    o = results.get(("ours bfloat16", 1))
    if o and t:
        goal(f"bfloat16 batch 1 >= 1.7x transformers float32 (ours {o['tok_s']:.1f} tokens/s = "
             f"{o['tok_s'] / t['tok_s']:.2f}x of {t['tok_s']:.1f}; ours {o['bw_frac']:.0%} of bandwidth)",
             o["tok_s"] >= 1.7 * t["tok_s"])
        tb = results.get(("transformers bfloat16", 1))
        if tb:
            print(f"      (transformers bfloat16 batch 1: {tb['tok_s']:.1f} tokens/s; ours is {o['tok_s'] / tb['tok_s']:.2f}x)")
    for batch in (b for b in args.batches if b != 1):
        for d in ("float32", "bfloat16"):
            o, t = results.get((f"ours {d}", batch)), results.get((f"transformers {d}", batch))
            if o and t:
                goal(f"{d} batch {batch} >= 1.2x transformers {d} (ours {o['tok_s']:.1f} vs {t['tok_s']:.1f} tokens/s "
                     f"= {o['tok_s'] / t['tok_s']:.2f}x)", o["tok_s"] >= 1.2 * t["tok_s"])
        o, t = results.get(("ours bfloat16", batch)), results.get(("transformers float32", batch))
        if o and t:
            print(f"      (bfloat16 batch {batch} vs transformers float32: {o['tok_s'] / t['tok_s']:.2f}x)")


def gpu_goals(results: dict, args):
    """bfloat16 on both sides; the batch-1 goals of ``GPU_GOALS[args.preset]`` (other presets: figures only)."""
    want = GPU_GOALS.get(args.preset, {})
    o, t = results.get(("ours bfloat16", 1)), results.get(("transformers bfloat16", 1))
    if o:
        parts, met = [f"ours {o['tok_s']:.1f} tokens/s, {o['bw_frac']:.0%} of {o['bandwidth']:.0f} GB/s"], True
        if "bandwidth" in want:
            parts.append(f">= {want['bandwidth']:.0%} of bandwidth")
            met &= o["bw_frac"] >= want["bandwidth"]
        if t:
            parts.append(f"{o['tok_s'] / t['tok_s']:.2f}x transformers' {t['tok_s']:.1f} tokens/s")
            if "speedup" in want:
                parts.append(f"goal >= {want['speedup']:g}x")
                met &= o["tok_s"] >= want["speedup"] * t["tok_s"]
        text = f"{args.preset} bfloat16 batch 1 ({'; '.join(parts)})"
        if "bandwidth" in want or (t and "speedup" in want):
            goal(text, met)
        else:
            print(f"figures: {text}")
    for batch in (b for b in args.batches if b != 1):
        o, t = results.get(("ours bfloat16", batch)), results.get(("transformers bfloat16", batch))
        if o and t:
            goal(f"bfloat16 batch {batch} >= {GPU_BATCH_SPEEDUP:g}x transformers (ours {o['tok_s']:.1f} vs "
                 f"{t['tok_s']:.1f} tokens/s = {o['tok_s'] / t['tok_s']:.2f}x)", o["tok_s"] >= GPU_BATCH_SPEEDUP * t["tok_s"])
        elif o:
            print(f"figures: bfloat16 batch {batch}: ours {o['tok_s']:.1f} tokens/s, {o['bw_frac']:.0%} of bandwidth")


if __name__ == "__main__":
    main()
