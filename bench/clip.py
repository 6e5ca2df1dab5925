"""InternVL 1.0 zero-shot feature extraction: internvl-jax vs PyTorch eager, and the contrastive stage's memory plan.

    python bench/clip.py                       # InternViT-6B-224 + QLLaMA widths, 2 + 2 layers, batch 2, CPU
    python bench/clip.py --vit-layers 48 --qllama-layers 32   # the full depth (an accelerator host)
    python bench/clip.py --skip-torch          # ours only; --skip-plan: no memory plan

1. Images/s of InternVL-G image features (ViT over 257 tokens, QLLaMA's 96 queries cross-attending to them,
   both attention poolers) with the InternVL-14B-224px widths (ViT 3200 / 25 heads / MLP 12800; QLLaMA 4096 /
   32 heads / MLP 11008) and ``--vit-layers`` / ``--qllama-layers`` layers, random weights, float32. The
   reference, in the same run and on the same weights: transformers' ``InternVLVisionModel`` (RMSNorm, qk-norm,
   LayerScale: the 1.0 ViT) for the ViT, which is most of the compute, and a transformers ``LlamaModel`` of
   QLLaMA's shape over the 96 query embeddings (it has no cross-attention, so the reference does less work than
   ours). Torch eager runs with ``torch.no_grad``; ours is one jitted program. Runs are interleaved after a
   warm-up; medians. Goal: ours >= 1.2x. Then the roofline: each side's FLOPs per image (XLA's cost analysis of
   the unrolled program; torch's FlopCounterMode), this host's float32 matmul ceiling (the best of jax and torch on 2048^3), each
   side's share of it, and the ratio ours would reach running at the ceiling: the highest any implementation of
   our FLOPs can show against this torch run.
2. The contrastive stage of InternVL-14B-224px on v5p-128 (fsdp rules over 64 chips, bf16 params with float32
   Adam moments as the trainer keeps them): the exact per-device bytes of params, gradients and optimiser state
   from the rule shardings (``sharding.plan.tree_bytes_per_device``), against the chip's HBM.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # bench/ files must not shadow the packages

import jax
import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit-layers", type=int, default=2, help="ViT layers (48 in InternViT-6B-224)")
    p.add_argument("--qllama-layers", type=int, default=2, help="QLLaMA layers (32; a multiple of 2)")
    p.add_argument("--batch", type=int, default=2, help="images per forward")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side (after one warm-up each)")
    p.add_argument("--skip-torch", action="store_true", help="time ours only")
    p.add_argument("--skip-plan", action="store_true", help="no v5p-128 memory plan")
    p.add_argument("--chips", default="v5p-128", help="the slice of the memory plan")
    args = p.parse_args()
    if args.qllama_layers % 2 or args.qllama_layers < 2:
        p.error(f"--qllama-layers must be a positive multiple of 2 (cross-attention every 2nd layer), got {args.qllama_layers}")
    return args


def bench_config(vit_layers: int, qllama_layers: int):
    from internvl_jax.presets import CLIP_PRESETS

    full = CLIP_PRESETS["InternVL-14B-224px"]
    # image features never read the token table: a small vocabulary keeps host memory down
    return full.replace(vision=dataclasses.replace(full.vision, num_layers=vit_layers),
                        qllama=dataclasses.replace(full.qllama, num_layers=qllama_layers, vocab_size=512))


def torch_models(config, params):
    """transformers' InternVL ViT and a Llama decoder of QLLaMA's shape, loaded with our random weights (the
    converter's own export tables give the tensors in each layout)."""
    import torch
    from transformers import InternVLVisionConfig, InternVLVisionModel, LlamaConfig, LlamaModel

    from convert.keymaps import HF, internvl_g_layout
    from convert.load import export_tensors
    from internvl_jax.config import InternVLConfig

    v, q = config.vision, config.qllama
    vit = InternVLVisionModel(InternVLVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size, norm_type="rms_norm",
        layer_norm_eps=v.norm_eps, use_qk_norm=True, attention_bias=False, use_mean_pooling=True,  # True: no final norm
        layer_scale_init_value=v.layer_scale_init, attn_implementation="sdpa")).eval()
    tensors = dict(export_tensors({"vision": params["vision"]}, InternVLConfig(vision=v), HF))
    vit.load_state_dict({k.removeprefix("vision_tower."): torch.from_numpy(np.asarray(t)) for k, t in tensors.items()},
                        strict=True)
    llama = LlamaModel(LlamaConfig(
        vocab_size=8, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
        num_key_value_heads=q.num_kv_heads, intermediate_size=q.intermediate_size, rms_norm_eps=q.norm_eps,
        attn_implementation="sdpa")).eval()
    layers = {k.removeprefix("qllama.model."): torch.from_numpy(np.asarray(t))
              for k, t in export_tensors(params, config, internvl_g_layout(config.cross_attention_frequency))
              if k.startswith("qllama.model.layers.") and ".cross_attn." not in k or k == "qllama.model.norm.weight"}
    missing, unexpected = llama.load_state_dict(layers, strict=False)
    assert not unexpected and missing == ["embed_tokens.weight"], (missing, unexpected)
    return vit, llama


def random_params(config, seed: int = 0) -> dict:
    """Random weights on the params' shapes, drawn on the host (no compiled init): norm scales 1, LayerScale
    0.1, the rest N(0, 0.02^2)."""
    from internvl_jax.clip_model import abstract_clip_params

    rng = np.random.default_rng(seed)

    def one(path, s):
        name = path[-1].key
        if name == "scale":
            return np.ones(s.shape, np.float32)
        if name in ("ls1", "ls2"):
            return np.full(s.shape, 0.1, np.float32)
        return (rng.standard_normal(s.shape, np.float32) * 0.02).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract_clip_params(config))


def timed(fn, sync) -> float:
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start


def main():
    args = parse_args()

    from internvl_jax.clip_model import InternVLCLIP

    config = bench_config(args.vit_layers, args.qllama_layers)
    model = InternVLCLIP(config)
    print(f"InternVL-G features: ViT {config.vision.hidden_size} x {config.vision.num_layers} layers, QLLaMA "
          f"{config.qllama.hidden_size} x {config.qllama.num_layers} layers, {config.num_query_token} queries, batch "
          f"{args.batch}, float32, {jax.devices()[0].platform}", flush=True)
    params = random_params(config)
    pixels = np.random.default_rng(0).normal(size=(args.batch, 224, 224, 3)).astype(np.float32)
    ours_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, "InternVL-G", method=InternVLCLIP.image_features))
    dev_params, dev_pixels = jax.device_put(params), jax.device_put(pixels)
    ours = lambda: ours_fn(dev_params, dev_pixels)  # noqa: E731
    jax.block_until_ready(ours())
    sides = {"ours": (ours, jax.block_until_ready)}
    if not args.skip_torch:
        import torch

        torch.set_num_threads(os.cpu_count())
        vit, llama = torch_models(config, params)
        queries = torch.from_numpy(np.repeat(np.asarray(params["query_tokens"]), args.batch, axis=0))
        px = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

        def theirs():
            with torch.no_grad():
                return vit(pixel_values=px).last_hidden_state, llama(inputs_embeds=queries).last_hidden_state

        theirs()
        sides["torch"] = (theirs, lambda out: out)
    times = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, (fn, sync) in sides.items():
            times[name].append(timed(fn, sync))
    rates = {name: args.batch / statistics.median(t) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name:>6}: {rate:8.2f} images/s (median of {args.repeats})")
    if "torch" in rates:
        print(f"ratio ours / torch eager: {rates['ours'] / rates['torch']:.2f}x (goal >= 1.2x)")
        roofline(config, theirs, rates, args.batch)
    if not args.skip_plan:
        memory_plan(args.chips)


def matmul_ceiling(n: int = 2048) -> float:
    """This host's float32 matmul rate (FLOP/s): the best of jax's and torch's on [n, n] x [n, n]."""
    import jax.numpy as jnp
    import torch

    a, t = jnp.ones((n, n), jnp.float32), torch.ones((n, n))
    dot = jax.jit(jnp.dot)
    best = 0.0
    for fn in (lambda: dot(a, a).block_until_ready(), lambda: t @ t):
        fn()
        best = max(best, 2 * n**3 / min(timed(fn, lambda out: out) for _ in range(5)))
    return best


def our_flops(config, batch: int) -> float:
    """FLOPs of one image's InternVL-G features: XLA's cost analysis of the lowered program with every layer
    unrolled (a scan's body is counted once) and the XLA attention (a custom call counts nothing)."""
    from internvl_jax.clip_model import InternVLCLIP, abstract_clip_params

    counted = config.replace(attention_impl="batched",
                             scan_unroll=max(config.vision.num_layers, config.qllama.num_layers))
    model = InternVLCLIP(counted)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, "InternVL-G", method=InternVLCLIP.image_features))
    pixels = jax.ShapeDtypeStruct((batch, config.vision.image_size, config.vision.image_size, 3), np.float32)
    return fn.lower(abstract_clip_params(counted), pixels).cost_analysis()["flops"] / batch


def roofline(config, theirs, rates: dict, batch: int) -> None:
    """Each side's FLOPs per image (:func:`our_flops`; torch's FlopCounterMode, its matmuls), their rates against
    the host's matmul ceiling, and the highest ratio ours could reach there: the workload is matmul-bound, so the
    goal is reachable only where that bound clears it."""
    from torch.utils.flop_counter import FlopCounterMode

    ours = our_flops(config, batch)
    with FlopCounterMode(display=False) as counter:
        theirs()
    ref = counter.get_total_flops() / batch
    peak = matmul_ceiling()
    print(f"roofline: ours {ours / 1e9:.1f} GFLOP per image (QLLaMA's cross-attention and both poolers included), "
          f"torch {ref / 1e9:.1f}; this host's float32 matmul ceiling {peak / 1e9:.1f} GFLOP/s (best of jax, torch "
          f"on 2048^3): ours at {rates['ours'] * ours / peak:.0%} of it, torch at {rates['torch'] * ref / peak:.0%}; "
          f"ours at the ceiling would be {peak / ours / rates['torch']:.2f}x torch")


def memory_plan(chips: str) -> None:
    """Per-device bytes of the contrastive stage's params, gradients and Adam moments on ``chips`` (fsdp)."""
    import jax
    import jax.numpy as jnp

    from internvl_jax.clip_model import abstract_clip_params
    from internvl_jax.presets import CLIP_PRESETS
    from sharding.plan import parse_mesh, tree_bytes_per_device
    from sharding.rules import get_rules
    from sharding.topology import GiB, parse_slice
    from train.clip_train import optim_for
    from train.optim import OptimConfig, trainable_mask

    target = parse_slice(chips)
    config = CLIP_PRESETS["InternVL-14B-224px"].replace(dtype="bfloat16", param_dtype="bfloat16")
    boxed = abstract_clip_params(config, boxed=True)
    rules = get_rules("fsdp")
    sizes = parse_mesh(None, target.chips, boxed, rules)
    trainable = trainable_mask(optim_for("contrastive", OptimConfig()), abstract_clip_params(config))
    as_f32 = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda b: b.replace_boxed(jax.ShapeDtypeStruct(b.value.shape, jnp.float32)), tree,
        is_leaf=lambda x: hasattr(x, "replace_boxed"))
    trained = jax.tree_util.tree_map(lambda b, t: b if t else None, boxed, trainable,
                                     is_leaf=lambda x: hasattr(x, "replace_boxed"))
    params = tree_bytes_per_device(boxed, rules, sizes)
    grads = tree_bytes_per_device(trained, rules, sizes)
    moments = 2 * tree_bytes_per_device(as_f32(trained), rules, sizes)
    total = params + grads + moments
    print(f"\ncontrastive stage, InternVL-14B-224px on {chips} ({target.chips} chips, mesh {sizes}, fsdp rules; "
          f"bf16 params and gradients, float32 Adam moments; activations not included):")
    for name, b in (("params", params), ("gradients", grads), ("Adam moments", moments), ("total", total)):
        print(f"  {name:>12}: {b / GiB:7.2f} GiB per device")
    print(f"  chip HBM {target.chip.memory / GiB:.0f} GiB: {'fits' if total < target.chip.memory else 'does not fit'}")


if __name__ == "__main__":
    main()
