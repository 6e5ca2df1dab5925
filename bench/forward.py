"""Forward-pass benchmark: internvl-jax vs transformers on an InternVL2.5-1B-shaped model.

    python bench/forward.py                      # float32, CPU, 1 tile + 64 text tokens, 5 timed runs each
    python bench/forward.py --dtype bfloat16     # GPU run: both sides in bf16, torch on cuda if available

Both sides get the same random weights: a ``transformers.InternVLForConditionalGeneration`` is built from the
preset's transformers-native config, saved with ``save_pretrained`` to a temporary folder, and loaded into ours
with ``convert.load.load_pretrained``. The input is one 448x448 tile (256 IMG_CONTEXT tokens) plus
``--text-tokens`` ordinary tokens, batch 1. Runs are interleaved (ours, theirs, ours, ...) after one warm-up
each, and medians are reported. FLOPs are counted analytically (2 x MACs of every matmul, attention scores and
values included, full square as both sides compute it) and compared with XLA's ``cost_analysis()``. The machine's
matmul rate is measured here with jitted ``jnp.dot`` and ``torch.mm``; the goal is ours >= 85% of it and never
slower than transformers.

Device: JAX runs on its default device (``jax.devices()[0]``); torch runs on cuda when available, else on the
CPU with ``torch.set_num_threads(os.cpu_count())``. Use ``--torch-device cpu`` to force the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="InternVL2_5-1B", help="model shapes (internvl_jax.presets)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params and compute dtype, both sides")
    p.add_argument("--text-tokens", type=int, default=64, help="ordinary text tokens besides the image tokens")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side (after one warm-up each)")
    p.add_argument("--matmul-size", type=int, default=2048, help="square matmul used to measure the machine's rate")
    p.add_argument("--torch-device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def forward_flops(config, text_len: int, tiles: int) -> dict[str, float]:
    """2 x MACs of every matmul of one forward, by part. Attention counts the full L x L square (both sides
    compute it; causal masking is applied after the scores)."""
    v, t = config.vision, config.text
    p = v.patch_size
    g = config.image_size // p
    s = g * g + 1  # patches + class token
    c, i = v.hidden_size, v.intermediate_size
    vit_layer = s * c * 3 * c + 2 * s * s * c + s * c * c + 2 * s * c * i  # qkv, scores+values, proj, fc1+fc2
    vit = tiles * (g * g * p * p * 3 * c + v.num_layers * vit_layer)  # patch embed + layers (all layers run)
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
    return parts


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


def timed(fn, sync):
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - t0, out


def matmul_rates(n: int, jdtype, tdtype, tdevice, repeats: int = 7) -> tuple[float, float]:
    """Median GFLOP/s of jitted jnp.dot and torch.mm on n x n x n."""
    import jax
    import jax.numpy as jnp
    import torch

    flops = 2.0 * n**3
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(jdtype)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32).astype(jdtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    jt = [timed(lambda: dot(a, b), lambda o: o.block_until_ready())[0] for _ in range(repeats)]
    ta = torch.randn(n, n, dtype=tdtype, device=tdevice)
    tb = torch.randn(n, n, dtype=tdtype, device=tdevice)
    tsync = (lambda o: torch.cuda.synchronize()) if tdevice.type == "cuda" else (lambda o: None)
    torch.mm(ta, tb)
    tsync(None)
    tt = [timed(lambda: torch.mm(ta, tb), tsync)[0] for _ in range(repeats)]
    return flops / statistics.median(jt) / 1e9, flops / statistics.median(tt) / 1e9


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from convert.load import load_pretrained
    from internvl_jax.config import to_hf_dict
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
    ref = transformers.InternVLForConditionalGeneration(transformers.InternVLConfig(**to_hf_dict(preset)))
    ref = ref.float().eval()
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        model, params = load_pretrained(folder, dtype=jdtype)
    ref = ref.to(device=tdevice, dtype=tdtype)
    cfg = model.config
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"model: {args.preset} shapes, {n_params / 1e6:.1f}M params, built+saved+loaded in {time.perf_counter() - t0:.1f} s")

    # --- input: one tile, IMG_CONTEXT tokens after a short prefix, the rest text ----------------
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, 150000, (1, length)).astype(np.int32)
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

    # --- ours: compile ---------------------------------------------------------------------------
    fwd = jax.jit(lambda p, i, pv, m: model.apply({"params": p}, i, pv, m))
    t0 = time.perf_counter()
    lowered = fwd.lower(params, j_ids, j_pix, j_mask)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
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

    first, _ = timed(ours, jsync)  # first call through jit: trace + compile (cache miss on the lambda) + run
    _, theirs_out = timed(theirs, tsync)  # warm-up
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):
        dt, ours_out = timed(ours, jsync)
        ours_t.append(dt)
        dt, theirs_out = timed(theirs, tsync)
        theirs_t.append(dt)
    ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)

    # --- agreement ---------------------------------------------------------------------------------
    a = np.asarray(ours_out, np.float64)
    b = theirs_out.float().cpu().numpy().astype(np.float64)
    diff = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    same_argmax = float(np.mean(a.argmax(-1) == b.argmax(-1)))

    # --- FLOPs and the machine's matmul rate -------------------------------------------------------
    flops = forward_flops(cfg, length, tiles)
    mm_jax, mm_torch = matmul_rates(args.matmul_size, jdtype, tdtype, tdevice)
    peak = max(mm_jax, mm_torch)
    ours_rate, theirs_rate = flops["total"] / ours_s / 1e9, flops["total"] / theirs_s / 1e9

    print()
    print("flops (analytic, 2 x MACs): " + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items()))
    print(f"flops (XLA cost_analysis): {xla_flops / 1e9:.1f} G ({xla_flops / flops['total']:.2f}x analytic; "
          "XLA counts a scanned layer's while-loop body once, not x trip count)")
    print(f"matmul rate {args.matmul_size}^3 {args.dtype}: jnp.dot {mm_jax:.1f} GFLOP/s, torch.mm {mm_torch:.1f} GFLOP/s "
          f"-> peak {peak:.1f} GFLOP/s")
    print(f"logits max abs diff: {diff:.3e} (max |logit| {scale:.3f}, argmax agreement {same_argmax:.1%})")
    print(f"ours runs: {', '.join(f'{x:.3f}' for x in ours_t)} s")
    print(f"transformers runs: {', '.join(f'{x:.3f}' for x in theirs_t)} s")
    print(f"ours: {ours_s:.3f} s")
    print(f"transformers: {theirs_s:.3f} s")
    print(f"speedup: {theirs_s / ours_s:.2f}x (transformers / ours)")
    print(f"compile time: {t_compile:.1f} s (lower {t_lower:.1f} s; first jit call {first:.1f} s, "
          f"minus a steady call {first - ours_s:.1f} s)")
    print(f"ours GFLOP/s: {ours_rate:.1f} ({ours_rate / peak:.0%} of matmul peak {peak:.1f})")
    print(f"transformers GFLOP/s: {theirs_rate:.1f} ({theirs_rate / peak:.0%} of matmul peak {peak:.1f})")
    goal = ours_rate >= 0.85 * peak and ours_s <= theirs_s
    print(f"goal (>= 85% of matmul peak and not slower than transformers): {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
