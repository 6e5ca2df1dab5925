"""Test-time scaling pays on a task the models learn: a tiny policy and a tiny process-reward critic, both trained
with the trainer on the synthetic step-by-step task of train/prm_task.py (the critic from the exported policy, both
reloaded through the converter), then best-of-8 by the critic against one sample and against self-consistency on
the same candidates, for held-out questions that no training sample asks.

CI runs bench/best_of_n_task.py as users run it (a subprocess: the trainer's one-device mesh, not the suite's 8
simulated devices) in a shortened setting: the narrow decoder, fewer steps at higher learning rates, the critic's
one-line system message, 48 held-out prompts. Measured with this setting (accuracy on the 48 prompts; seed 0 is
the test's):

    seed   single   best-of-8 critic   self-consistency   mean log-prob
    0      0.438    0.979              0.354              0.958
    1      0.354    0.625              0.354              0.417
    2      0.396    0.979              0.271              0.250
    3      0.354    0.896              0.229              0.021
    4      0.354    0.958              0.458              0.917

The critic's gain over one sample is +0.27 to +0.60 there, and over self-consistency +0.27 to +0.71 (the policy's
wrong answers agree with each other, so a vote picks them). ``MARGIN`` asks for about half the smallest measured
gain: a clear one (8 of the 48 prompts), with room for another platform's rounding to change some samples. With
80 policy steps instead of 120 one seed in four failed (its policy's final count often disagreed with the colours
it listed), hence 120. On the 11-12 two-colour prompts alone, where the wrong answers' count (three) is the right
one for other questions, the critic chose a right answer for 0.91-1.00 of them against 0.33-0.45 for one sample.
The critics lean on position too (later steps score lower, so the mean prefers the shorter answer, and an inserted
colour makes a wrong answer one step longer): the weakest, seed 1's, barely tells steps apart otherwise."""

import json
import os
import subprocess
import sys

MARGIN = 0.15  # accuracy points of best-of-8 by the critic above one sample
STEPS = {"policy": 120, "critic": 100}
SETTING = ["--narrow", "--short-system", "--policy-steps", str(STEPS["policy"]), "--policy-lr", "1e-2",
           "--critic-steps", str(STEPS["critic"]), "--critic-lr", "3e-3", "--critic-rows", "4", "--prompts", "48",
           "--n", "8", "--seed", "0"]
BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "best_of_n_task.py")


def test_best_of_8_by_a_trained_critic_beats_one_sample_and_self_consistency(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the task's runs ask
    out = subprocess.run([sys.executable, BENCH, "--workdir", str(tmp_path), *SETTING], capture_output=True,
                         text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for role, steps in STEPS.items():  # both trained by the trainer, one metrics line a step
        assert len((tmp_path / role / "metrics.jsonl").read_text().splitlines()) == steps, role
    acc = json.loads((tmp_path / "accuracy.json").read_text())["accuracy"]
    assert acc["critic"] >= acc["single"] + MARGIN, out.stdout
    assert acc["critic"] > acc["self_consistency"], out.stdout
