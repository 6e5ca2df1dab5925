"""Best-of-N with a trained process-reward critic on the synthetic task of ``train/prm_task.py``: a tiny policy and a
tiny critic trained from scratch with the trainer, then held-out accuracy of one sample, best-of-N by the critic,
self-consistency and mean log-probability, all on the same candidates.

    python bench/best_of_n_task.py                    # the defaults below; about 10 minutes on 2 busy CPU cores
    python bench/best_of_n_task.py --workdir runs/prm  # keeps the runs (a rerun on the folder resumes / reuses them)
    python bench/best_of_n_task.py --narrow --short-system --policy-steps 120 --policy-lr 1e-2 \\
        --critic-steps 100 --critic-lr 3e-3 --critic-rows 4 --prompts 48   # the CI setting, about a minute

The critic starts from the trained policy (as VisualPRM from InternVL2.5) and is exported and reloaded through the
converter like any checkpoint. ``--short-system`` trains and scores the critic with a one-line system message
instead of VisualPRM's ~200-token prompt (rows ~4x shorter; the turns stay VisualPRM's); ``--narrow`` trains a
decoder of hidden size 64 instead of the demo's 128. The held-out prompts are questions no training sample asks.
tests/test_best_of_n_task.py runs the CI setting above and asserts the critic's margin; the accuracies also go to
``<workdir>/accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--workdir", default=None, help="where the data and both runs go (default: a temporary folder)")
    p.add_argument("--policy-steps", type=int, default=150, help="the policy's training steps (from scratch)")
    p.add_argument("--policy-lr", type=float, default=3e-3, help="the policy's peak learning rate")
    p.add_argument("--critic-steps", type=int, default=500, help="the critic's steps (from the policy)")
    p.add_argument("--critic-lr", type=float, default=1e-3, help="the critic's peak learning rate")
    p.add_argument("--critic-rows", type=int, default=8, help="packed rows in a critic step")
    p.add_argument("--short-system", action="store_true", help="the critic's one-line system message")
    p.add_argument("--narrow", action="store_true", help="a decoder of hidden size 64 (2 heads) for both models")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts (at most 79)")
    p.add_argument("--n", type=int, default=8, help="candidates per prompt")
    p.add_argument("--seed", type=int, default=0, help="of the data, both runs and the sampling")
    args = p.parse_args()

    from train.prm_task import NARROW, PRM_SYSTEM_PROMPT, SHORT_SYSTEM, task_model_config, train_and_evaluate

    logging.basicConfig(level=logging.WARNING)
    root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="best-of-n-task-"))
    acc = train_and_evaluate(
        root, policy_steps=args.policy_steps, policy_lr=args.policy_lr, critic_steps=args.critic_steps,
        critic_lr=args.critic_lr, critic_rows=args.critic_rows,
        system_message=SHORT_SYSTEM if args.short_system else PRM_SYSTEM_PROMPT,
        model=task_model_config(**NARROW) if args.narrow else None, prompts=args.prompts, n=args.n,
        seed=args.seed, on_line=lambda line: print(line, flush=True))
    with open(os.path.join(root, "accuracy.json"), "w") as f:
        json.dump({"settings": vars(args), "accuracy": acc}, f, indent=1)
    print(f"held-out, {args.prompts} prompts, {args.n} candidates each:")
    print(f"  single sample        {acc['single']:.3f}")
    print(f"  best-of-{args.n} critic     {acc['critic']:.3f}   ({acc['critic'] - acc['single']:+.3f} vs single, "
          f"{acc['critic'] - acc['self_consistency']:+.3f} vs self-consistency)")
    print(f"  self-consistency     {acc['self_consistency']:.3f}")
    print(f"  mean log-prob        {acc['logprob']:.3f}")
    print(f"  any candidate right  {acc['any']:.3f}")
    print(f"workdir: {root}")


if __name__ == "__main__":
    main()
