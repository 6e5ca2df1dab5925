"""InternVL2.5-8B bfloat16 train step with FSDP, compiled for a TPU v5p-64 slice (32 chips, 4x4x2) on this CPU host.

    JAX_PLATFORMS=cpu python bench/plan_8b.py                     # v5p-64, fsdp, 2048 tokens, remat full
    JAX_PLATFORMS=cpu python bench/plan_8b.py --chips v5p:2x2x1 --rules fsdp_tp --mesh 1,2,2

Prints :func:`sharding.plan.plan`'s report: the estimate, the compiled step's per-device memory (arguments,
outputs, temporaries; params and optimizer state donated), the ratio of compiled to estimated bytes, FLOPs and
the compile time. Needs libtpu (``pip install 'jax[tpu]'``); takes about 3 minutes on 2 CPU cores. The goal:
the compiled per-device memory fits the 95 GiB of a v5p chip.
"""

from __future__ import annotations

import argparse
import time

from sharding.plan import plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="InternVL2_5-8B")
    p.add_argument("--chips", default="v5p-64")
    p.add_argument("--rules", default="fsdp")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: the most sharded)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--remat", default="full")
    p.add_argument("--step-time", type=float, default=None, help="seconds per step, for the MFU it needs")
    args = p.parse_args()
    t0 = time.perf_counter()
    result = plan(args.preset, chips=args.chips, mesh=args.mesh, rules=args.rules, seq_len=args.seq_len,
                  remat=args.remat, step_time=args.step_time)
    print("\n".join(result.lines()))
    print(f"wall time {time.perf_counter() - t0:.0f} s (estimate, trace, compile)")


if __name__ == "__main__":
    main()
