"""Forward-pass benchmark: internvl-jax vs transformers on an InternVL2.5-1B-shaped model.

    python bench/forward.py                      # float32, CPU, 1 tile + 64 text tokens, 5 timed runs each
    python bench/forward.py --dtype bfloat16     # GPU run: both sides in bf16, torch on cuda if available

Both sides get the same random weights: a ``transformers.InternVLForConditionalGeneration`` is built from the
preset's transformers-native config on torch's device in ``--dtype`` (sdpa attention), and its state dict goes
into ours with ``convert.load.from_state_dict`` (no file written). The input is one 448x448 tile (256 IMG_CONTEXT tokens) plus
``--text-tokens`` ordinary tokens, batch 1. Runs are interleaved (ours, theirs, ours, ...) after one warm-up
each, and medians are reported. FLOPs are counted analytically (2 x MACs of every matmul, attention scores and
values included, full square as both sides compute it) and compared with XLA's ``cost_analysis()``. The machine's
matmul rate is measured here with jitted ``jnp.dot`` and ``torch.mm`` (best of the two = "matmul peak"), probed
right before every timed forward because a shared CPU changes speed from one minute to the next; each run's
GFLOP/s is compared with its own probe. The goal: ours >= 85% of the matmul peak and never slower than
transformers.

Device: JAX runs on its default device (``jax.devices()[0]``); torch runs on cuda when available, else on the
CPU with ``torch.set_num_threads(os.cpu_count())``. Use ``--torch-device cpu`` to force the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="InternVL2_5-1B", help="model shapes (internvl_jax.presets)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params and compute dtype, both sides")
    p.add_argument("--text-tokens", type=int, default=64, help="ordinary text tokens besides the image tokens")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side (after one warm-up each)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="n of the n x n x n matmul probe for the machine's rate (default 2048 on CPU, 8192 on GPU)")
    p.add_argument("--torch-device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--attention", default="auto",
                   help="ours' attention impl (internvl_jax.layers.ATTENTION_IMPLS; auto: the backend's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from internvl_jax.layers import ATTENTION_IMPLS

    if args.attention not in ATTENTION_IMPLS:
        p.error(f"unknown --attention {args.attention!r}; use one of {', '.join(ATTENTION_IMPLS)}")
    return args


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def forward_flops(config, text_len: int, tiles: int) -> dict[str, float]:
    """2 x MACs of every matmul of one forward, by part, plus ``total``. Attention counts the full L x L square
    (both sides compute it; the causal mask is applied to the scores). ``xla_once`` is the same count with each
    scanned layer stack counted as one layer, which is what XLA's cost analysis reports for a while loop."""
    v, t = config.vision, config.text
    p = v.patch_size
    g = config.image_size // p
    s = g * g + 1  # patches + class token
    c, i = v.hidden_size, v.intermediate_size
    vit_layer = s * c * 3 * c + 2 * s * s * c + s * c * c + 2 * s * c * i  # qkv, scores+values, proj, fc1+fc2
    patch = g * g * p * p * 3 * c
    vit = tiles * (patch + v.num_layers * vit_layer)  # patch embed + layers (all layers run)
    n = config.tokens_per_tile
    c4 = int(c / config.downsample_ratio**2)
    e = t.hidden_size
    proj = tiles * n * (c4 * e + e * e)
    l, hd = text_len, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    llm_layer = l * e * (q + 2 * kv) + 2 * l * l * q + l * q * e + 3 * l * e * t.intermediate_size
    llm = t.num_layers * llm_layer
    head = l * e * t.vocab_size
    parts = {"vit": 2 * vit, "projector": 2 * proj, "llm layers": 2 * llm, "lm_head": 2 * head}
    parts["total"] = sum(parts.values())
    parts["xla_once"] = 2 * (tiles * (patch + vit_layer) + proj + llm_layer + head)
    return parts


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


def timed(fn, sync):
    """(seconds, result) of one call, synchronised with ``sync(result)``."""
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - t0, out


class MatmulProbe:
    """The machine's matmul rate right now: best of a few n x n x n jnp.dot and torch.mm calls, in GFLOP/s.

    Shared CPUs change speed under us (on this kind of VM the rate can double or halve within seconds), so
    the benchmark probes it just before every timed forward and compares each run with its own probe.
    """

    def __init__(self, n, jdtype, tdtype, tdevice, tries=3):
        import jax
        import jax.numpy as jnp
        import torch

        self.flops, self.tries = 2.0 * n**3, tries
        a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(jdtype)
        b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32).astype(jdtype)
        dot = jax.jit(jnp.dot)
        self.jax_call = lambda: dot(a, b)
        ta = torch.randn(n, n, device=tdevice).to(tdtype)
        tb = torch.randn(n, n, device=tdevice).to(tdtype)
        self.torch_call = lambda: torch.mm(ta, tb)
        self.tsync = (lambda o: torch.cuda.synchronize()) if tdevice.type == "cuda" else (lambda o: None)
        self()  # warm-up (compiles the dot)

    def __call__(self) -> tuple[float, float]:
        """(jnp.dot GFLOP/s, torch.mm GFLOP/s), each the best of ``tries`` calls."""
        jt = min(timed(self.jax_call, lambda o: o.block_until_ready())[0] for _ in range(self.tries))
        tt = min(timed(self.torch_call, self.tsync)[0] for _ in range(self.tries))
        return self.flops / jt / 1e9, self.flops / tt / 1e9


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from convert.load import from_state_dict
    from internvl_jax.config import to_hf_dict
    from internvl_jax.model import InternVL
    from internvl_jax.presets import get_preset

    cores = os.cpu_count()
    torch.set_num_threads(cores)
    tdevice = torch.device(args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    print(f"jax {jax.__version__} on {jax.devices()[0]} | torch {torch.__version__} on {tdevice} "
          f"({torch.get_num_threads()} threads) | transformers {transformers.__version__} | {cores} cores | {args.dtype}")

    preset = get_preset(args.preset)
    tiles = 1
    img_tokens = preset.tokens_per_tile * tiles
    length = img_tokens + args.text_tokens

    # --- identical random weights on both sides -----------------------------------------------
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device(tdevice):
        ref = transformers.InternVLForConditionalGeneration._from_config(
            transformers.InternVLConfig(**to_hf_dict(preset)), attn_implementation="sdpa", dtype=tdtype).eval()
    model, params = from_state_dict(ref.state_dict(), ref.config, dtype=jdtype)
    model = InternVL(model.config.replace(attention_impl=args.attention))
    cfg = model.config
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"model: {args.preset} shapes, {n_params / 1e6:.1f}M params, built + handed to ours in "
          f"{time.perf_counter() - t0:.1f} s")

    # --- input: one tile, IMG_CONTEXT tokens after a short prefix, the rest text ----------------
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, min(150000, cfg.text.vocab_size), (1, length)).astype(np.int32)
    ids[ids == cfg.image_token_id] = 0
    start = min(8, args.text_tokens)
    ids[0, start : start + img_tokens] = cfg.image_token_id
    size = cfg.image_size
    pixels = rng.standard_normal((1, tiles, size, size, 3)).astype(np.float32)  # normalised pixels
    print(f"input: batch 1, L = {length} ({img_tokens} IMG_CONTEXT id {cfg.image_token_id} + {args.text_tokens} text), "
          f"{tiles} tile {size}x{size}")

    j_ids, j_pix, j_mask = jnp.asarray(ids), jnp.asarray(pixels, jdtype), jnp.ones((1, tiles), bool)
    t_ids = torch.tensor(ids, dtype=torch.long, device=tdevice)
    t_pix = torch.tensor(pixels[0].transpose(0, 3, 1, 2), device=tdevice, dtype=tdtype)  # [N, 3, H, W]

    # --- ours: compile -----------------------------------------------------------------------------
    fwd = jax.jit(lambda p, i, pv, m: model.apply({"params": p}, i, pv, m))
    t0 = time.perf_counter()
    lowered = fwd.lower(params, j_ids, j_pix, j_mask)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()  # also fills jit's cache: the first call below does not compile again
    t_compile = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    def ours():
        return fwd(params, j_ids, j_pix, j_mask)

    def theirs():
        with torch.no_grad():
            return ref(input_ids=t_ids, pixel_values=t_pix, use_cache=False).logits

    jsync = lambda o: o.block_until_ready()  # noqa: E731
    tsync = (lambda o: torch.cuda.synchronize()) if tdevice.type == "cuda" else (lambda o: None)

    # --- interleaved timing, each run next to its own matmul probe ------------------------------------
    mm_size = args.matmul_size or (2048 if tdevice.type == "cpu" else 8192)
    probe = MatmulProbe(mm_size, jdtype, tdtype, tdevice)
    flops = forward_flops(cfg, length, tiles)
    first, _ = timed(ours, jsync)  # warm-up (the executable is already compiled)
    _, theirs_out = timed(theirs, tsync)  # warm-up
    runs = {"ours": [], "transformers": []}  # (seconds, jnp.dot GFLOP/s, torch.mm GFLOP/s) per run
    for _ in range(args.repeats):
        for name, fn, sync in (("ours", ours, jsync), ("transformers", theirs, tsync)):
            mm_j, mm_t = probe()
            dt, out = timed(fn, sync)
            runs[name].append((dt, mm_j, mm_t))
            if name == "ours":
                ours_out = out
            else:
                theirs_out = out

    def summary(name):
        """median seconds, median fraction of the adjacent best matmul rate, of the adjacent jnp.dot rate."""
        rs = runs[name]
        rate = [flops["total"] / dt / 1e9 for dt, _, _ in rs]
        return (statistics.median(dt for dt, _, _ in rs),
                statistics.median(r / max(j, t) for r, (_, j, t) in zip(rate, rs)),
                statistics.median(r / j for r, (_, j, _) in zip(rate, rs)))

    ours_s, ours_frac, ours_frac_j = summary("ours")
    theirs_s, theirs_frac, theirs_frac_j = summary("transformers")
    all_runs = runs["ours"] + runs["transformers"]
    mm_j = statistics.median(j for _, j, _ in all_runs)
    mm_t = statistics.median(t for _, _, t in all_runs)
    peak = statistics.median(max(j, t) for _, j, t in all_runs)

    # --- agreement ------------------------------------------------------------------------------------
    a = np.asarray(ours_out, np.float64)
    b = theirs_out.float().cpu().numpy().astype(np.float64)
    diff = float(np.max(np.abs(a - b)))
    same_argmax = float(np.mean(a.argmax(-1) == b.argmax(-1)))

    # --- report ----------------------------------------------------------------------------------------
    ours_rate, theirs_rate = flops["total"] / ours_s / 1e9, flops["total"] / theirs_s / 1e9
    parts = ", ".join(f"{k} {flops[k] / 1e9:.1f}" for k in ("vit", "projector", "llm layers", "lm_head"))
    print()
    print(f"flops (analytic, 2 x MACs): {flops['total'] / 1e9:.1f} GFLOP ({parts})")
    print(f"flops (XLA cost_analysis): {xla_flops / 1e9:.1f} GFLOP; XLA counts each scanned layer stack once, "
          f"and the analytic count done that way is {flops['xla_once'] / 1e9:.1f} GFLOP")
    print(f"matmul rate ({mm_size}^3 {args.dtype}, median of the probes next to each run): jnp.dot {mm_j:.1f} GFLOP/s, "
          f"torch.mm {mm_t:.1f} GFLOP/s, best {peak:.1f} GFLOP/s")
    print(f"logits max abs diff: {diff:.3e} (max |logit| {np.max(np.abs(b)):.3f}, argmax agreement {same_argmax:.1%})")
    for name in runs:
        print(f"{name} runs: " + ", ".join(f"{dt:.3f} s (probe {max(j, t):.0f})" for dt, j, t in runs[name]))
    print(f"ours: {ours_s:.3f} s")
    print(f"transformers: {theirs_s:.3f} s")
    print(f"speedup: {theirs_s / ours_s:.2f}x (transformers time / ours)")
    print(f"compile time: {t_lower + t_compile:.1f} s (trace+lower {t_lower:.1f} s, XLA compile {t_compile:.1f} s); "
          f"first call afterwards {first:.2f} s")
    print(f"ours GFLOP/s: {ours_rate:.1f} ({ours_frac:.0%} of matmul peak, {ours_frac_j:.0%} of jnp.dot)")
    print(f"transformers GFLOP/s: {theirs_rate:.1f} ({theirs_frac:.0%} of matmul peak, {theirs_frac_j:.0%} of jnp.dot)")
    met = ours_frac >= 0.85 and ours_s <= theirs_s
    print(f"goal (ours >= 85% of matmul peak and not slower than transformers): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
