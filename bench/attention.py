"""Attention backends on this host: forward+backward wall time and XLA's temporary bytes (compiled memory analysis).

    JAX_PLATFORMS=cpu python bench/attention.py --length 4096 --heads 8 --kv-heads 2 --head-dim 64

Packed causal rows (two samples and right padding per row), float32, loss = sum(out * w); gradients w.r.t. q, k, v.
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
    p.add_argument("--impls", default="per_kv_head,batched,dot_product,blockwise")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--one-segment", action="store_true", help="no packing, no padding (as the ViT)")
    p.add_argument("--remat-q-blocks", action="store_true", help="blockwise: rematerialise whole query blocks")
    p.add_argument("--repeats", type=int, default=3)
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
            print(f"{impl:12s} {name:8s} {statistics.median(times):8.3f} s   temp {temp / 2**20:9.1f} MiB")


if __name__ == "__main__":
    main()
