"""Best-of-N with a trained process-reward critic on the synthetic task of ``train/prm_task.py``: a tiny policy and a
tiny critic trained from scratch with the trainer, then held-out accuracy of one sample, best-of-N by the critic,
self-consistency and mean log-probability, all on the same candidates.

    python bench/best_of_n_task.py                    # the defaults below; about 10 minutes on 2 busy CPU cores
    python bench/best_of_n_task.py --workdir runs/prm  # keeps the runs (a rerun on the folder resumes / reuses them)

The critic starts from the trained policy (as VisualPRM from InternVL2.5) and is exported and reloaded through the
converter like any checkpoint. ``--short-system`` trains and scores the critic with a one-line system message
instead of VisualPRM's ~200-token prompt (rows ~4x shorter; the turns stay VisualPRM's). Not a CI test: training two
models takes minutes on this CPU, past the suite's budget; tests/test_best_of_n.py covers the API on random models.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="where the data and both runs go (default: a temporary folder)")
    p.add_argument("--policy-steps", type=int, default=150)
    p.add_argument("--critic-steps", type=int, default=500)
    p.add_argument("--critic-lr", type=float, default=1e-3)
    p.add_argument("--short-system", action="store_true")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts")
    p.add_argument("--n", type=int, default=8, help="candidates per prompt")
    args = p.parse_args()

    from convert.load import load_pretrained
    from internvl_jax.generate import unrolled_params
    from internvl_jax.processing.processor import Processor
    from train.prm_task import PRM_SYSTEM_PROMPT, SHORT_SYSTEM, evaluate, heldout_prompts, train_config, write_task_data
    from train.trainer import train

    logging.basicConfig(level=logging.WARNING)
    root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="best-of-n-task-"))
    system = SHORT_SYSTEM if args.short_system else PRM_SYSTEM_PROMPT
    paths = write_task_data(os.path.join(root, "data"), system_message=system)
    policy_export = os.path.join(root, "policy", "export")
    for role, steps in (("policy", args.policy_steps), ("critic", args.critic_steps)):
        t = time.perf_counter()
        cfg = train_config(role, os.path.join(root, role), paths, steps=steps,
                           init=policy_export if role == "critic" else "")
        if role == "critic":
            cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, lr=args.critic_lr))
        result = train(cfg)
        loss = f", last loss {result.metrics[-1]['loss']:.4f}" if result.metrics else " (already trained)"
        print(f"{role}: {steps} steps in {time.perf_counter() - t:.0f} s{loss}", flush=True)
    policy_model, policy_params = load_pretrained(policy_export)
    critic = load_pretrained(os.path.join(root, "critic", "export"))
    processor = Processor.from_pretrained(policy_export)
    t = time.perf_counter()
    acc = evaluate((policy_model, unrolled_params(policy_params, policy_model.config)), critic, processor,
                   heldout_prompts(args.prompts), n=args.n, system_message=system)
    print(f"held-out, {args.prompts} prompts, {args.n} candidates each ({time.perf_counter() - t:.0f} s):")
    print(f"  single sample        {acc['single']:.3f}")
    print(f"  best-of-{args.n} critic     {acc['critic']:.3f}   ({acc['critic'] - acc['single']:+.3f} vs single, "
          f"{acc['critic'] - acc['self_consistency']:+.3f} vs self-consistency)")
    print(f"  self-consistency     {acc['self_consistency']:.3f}")
    print(f"  mean log-prob        {acc['logprob']:.3f}")
    print(f"  any candidate right  {acc['any']:.3f}")
    print(f"workdir: {root}")


if __name__ == "__main__":
    main()
