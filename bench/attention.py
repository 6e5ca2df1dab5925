"""Attention backends on this host: forward+backward wall time and XLA's temporary bytes (compiled memory analysis),
against PyTorch's ``scaled_dot_product_attention`` (its CPU flash kernel) in the same run.

    JAX_PLATFORMS=cpu python bench/attention.py --length 4096 --heads 8 --kv-heads 2 --head-dim 64
    JAX_PLATFORMS=cpu python bench/attention.py --batch 12 --length 1025 --heads 1 --kv-heads 1 --non-causal \
        --one-segment --impls per_kv_head,cpu_flash           # bench/trainer.py's ViT: 12 tiles of 1025 tokens
    JAX_PLATFORMS=cpu python bench/attention.py --batch 2 --length 2048 --heads 4 --kv-heads 2 --one-segment \
        --impls blockwise,cpu_flash                            # its LLM rows, as PyTorch runs them (causal)

Packed causal rows (two samples and right padding per row), float32, loss = sum(out * w); gradients w.r.t. q, k, v.
PyTorch gets the same inputs: with ``--one-segment`` its fused ``is_causal`` path (or no mask), otherwise the
boolean mask of the segments (its kernel then reads the mask; it cannot skip the blocks between samples).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.attention import attend


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--impls", default="per_kv_head,batched,dot_product,blockwise,cpu_flash")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--one-segment", action="store_true", help="no packing, no padding (as the ViT)")
    p.add_argument("--remat-q-blocks", action="store_true", help="blockwise: rematerialise whole query blocks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-torch", action="store_true")
    a = p.parse_args()

    b, l, h, kv, d = a.batch, a.length, a.heads, a.kv_heads, a.head_dim
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal((b, l, n, d)), jnp.float32) for n in (h, kv, kv, h))
    seg = np.zeros((b, l), np.int32)
    seg[:, : l * 5 // 8], seg[:, l * 5 // 8 : l * 15 // 16] = 1, 2
    if a.one_segment:
        seg[:] = 1
    seg = jnp.asarray(seg)
    print(f"{jax.devices()[0].device_kind}: B={b} L={l} H={h} K={kv} D={d} causal={not a.non_causal} "
          f"segments={'one' if a.one_segment else 'packed+padding'} float32")
    reference = None if a.skip_torch else torch_seconds(q, k, v, w, seg, not a.non_causal, a.one_segment, a.repeats)
    if reference is not None:
        print(f"{'torch sdpa':12s} fwd+bwd  {reference:8.3f} s")
    for impl in a.impls.split(","):
        opts = dict(block_q=a.block, block_kv=a.block) if impl in ("blockwise", "splash") else {}
        if impl == "blockwise":
            opts["remat_q_blocks"] = a.remat_q_blocks

        def loss(q, k, v, impl=impl, opts=opts):
            out = attend(q, k, v, seg, seg, scale=d**-0.5, causal=not a.non_causal, impl=impl, **opts)
            return jnp.sum(out * w)

        for name, fn in (("forward", loss), ("fwd+bwd", jax.value_and_grad(loss, argnums=(0, 1, 2)))):
            compiled = jax.jit(fn).lower(q, k, v).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            jax.block_until_ready(compiled(q, k, v))
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v))
                times.append(time.perf_counter() - t)
            ratio = ""
            if name == "fwd+bwd" and reference is not None:
                ratio = f"   {reference / statistics.median(times):.2f}x PyTorch's speed"
            print(f"{impl:12s} {name:8s} {statistics.median(times):8.3f} s   temp {temp / 2**20:9.1f} MiB{ratio}")


def torch_seconds(q, k, v, w, seg, causal: bool, one_segment: bool, repeats: int) -> float:
    """Median wall time of PyTorch's sdpa forward + backward (loss sum(out * w)) on the same inputs."""
    import torch

    h, kv = q.shape[2], k.shape[2]
    qt, kt, vt = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    wt = torch.tensor(np.asarray(w)).transpose(1, 2)
    mask = None
    if not one_segment:
        s = torch.tensor(np.asarray(seg))
        mask = (s[:, :, None] == s[:, None, :]) & (s[:, None, :] != 0)
        mask |= torch.eye(s.shape[1], dtype=torch.bool)[None]  # padding rows attend to themselves: no NaN rows
        if causal:
            mask &= torch.ones(s.shape[1], s.shape[1], dtype=torch.bool).tril()[None]
        mask = mask[:, None]

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, is_causal=causal and one_segment, enable_gqa=h != kv)
        (out * wt).sum().backward()

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


if __name__ == "__main__":
    main()
