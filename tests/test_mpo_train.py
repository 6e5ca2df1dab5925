"""MPO through the trainer (``internvl-jax train mpo_demo``, in subprocesses as users run it): the frozen-copy
reference and the reference log-probs from a pre-pass file give the same losses and shifts step by step (so the
copy never moved), and a run killed with SIGKILL during a save resumes bitwise, the BCO shift included.

The runs share one preference set (train/preference_demo.py, written once here) and a JAX compilation cache, and
go through test_train_resume's probe (batch digests, a kill in the middle of a save). Drop path is on, so the
steps also depend on the restored rng.
"""

import os
import subprocess
import sys

import pytest

from test_train_resume import assert_matches_reference, batches, checkpoint_steps, metrics, resumed_from

STEPS, SAVE_EVERY = 6, 3
KILLED_SAVE = 6  # the save of the last step is interrupted: the rerun resumes from step 3
TOL = 1e-5  # copy vs file: relative, float32 (the rows differ in padding, so sums run in another order)
# Preference accuracy counts the sign of each pair's reward margin. Before the policy has moved from its reference
# (the first steps, lr warming up) every margin is rounding noise (~1e-6, its sign arbitrary between the two runs),
# so accuracies are compared where the mean margin carries signal.
SIGNAL = 1e-4
RUN_TIMEOUT = 300
PROBE = os.path.join(os.path.dirname(__file__), "test_train_resume.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from train.demo_data import write_demo_tokenizer
    from train.preference_demo import write_preference_set

    folder = tmp_path_factory.mktemp("pairs")
    meta, heldout = write_preference_set(str(folder), train=120, heldout=16)
    return {"meta": meta, "heldout": heldout, "tokenizer": write_demo_tokenizer(str(folder / "tokenizer")),
            "cache": str(tmp_path_factory.mktemp("jax-cache"))}


def _run(data, workdir, name, *extra, **env):
    command = [sys.executable, PROBE, "train", "mpo_demo", f"workdir={workdir}", f"steps={STEPS}",
               f"save_every={SAVE_EVERY}", "setup=", f"data.meta={data['meta']}", f"data.eval_meta={data['heldout']}",
               f"tokenizer={data['tokenizer']}", "data.rows=8", "data.eval_samples=8", "drop_path=0.1",
               "progress=false", *extra]
    environ = {k: v for k, v in os.environ.items() if k != "PROBE_KILL_IN_SAVE"}
    environ.update(PROBE_BATCHES=os.path.join(workdir, f"batches-{name}.txt"), JAX_COMPILATION_CACHE_DIR=data["cache"],
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=RUN_TIMEOUT)


@pytest.fixture(scope="module")
def copy_run(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("copy")
    out = _run(data, workdir, "copy")
    assert out.returncode == 0, out.stderr[-3000:]
    records = metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return records, batches(workdir, "copy")


def test_reference_from_file_gives_the_losses_of_the_frozen_copy(data, copy_run, tmp_path):
    out = _run(data, tmp_path, "file", "mpo.reference=file", f"mpo.ref_logps={tmp_path / 'ref.npz'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 0: policy and stored reference log-probs agree" in out.stderr
    assert os.path.exists(tmp_path / "ref.npz")
    copy_records, copy_batches = copy_run
    assert len(batches(tmp_path, "file")) == len(copy_batches)  # the same rows, with ref_logps filled in
    for ours, theirs in zip(metrics(tmp_path), copy_records, strict=True):
        for key in ("loss", "loss/sigmoid", "loss/bco_pair", "nll", "chosen_reward", "rejected_reward", "margin"):
            scale = max(abs(theirs[key]), abs(theirs["loss"]))
            assert abs(ours[key] - theirs[key]) <= TOL * scale, (ours["step"], key, ours[key], theirs[key])
        assert abs(ours["shift"] - theirs["shift"]) <= TOL * 0.1, ours["step"]  # beta x |log-prob| ~ 0.1 x 1
        if abs(theirs["margin"]) > SIGNAL:
            assert ours["accuracy"] == theirs["accuracy"], ours["step"]
    assert sum(abs(r["margin"]) > SIGNAL for r in copy_records) >= 3
    # the policy moved away from the reference: the later rewards are not the first step's
    assert abs(copy_records[-1]["margin"]) > 10 * abs(copy_records[0]["margin"]) > 0
    assert copy_records[-1]["shift"] != 0


def test_an_mpo_run_killed_during_a_save_resumes_bitwise_shift_included(data, copy_run, tmp_path):
    ref_records, ref_batches = copy_run
    out = _run(data, tmp_path, "killed", PROBE_KILL_IN_SAVE=str(KILLED_SAVE))
    assert out.returncode == -9, out.stderr[-3000:]
    assert checkpoint_steps(tmp_path) == [SAVE_EVERY]
    out = _run(data, tmp_path, "rerun")
    assert out.returncode == 0, out.stderr[-3000:]
    assert resumed_from(out) == SAVE_EVERY
    records = metrics(tmp_path)
    # the killed run logged the steps before the interrupted save; the rerun repeats those after checkpoint 3
    assert [r["step"] for r in records] == list(range(1, KILLED_SAVE)) + list(range(SAVE_EVERY + 1, STEPS + 1))
    assert_matches_reference(records, ref_records)  # every field, shift and rewards included, bitwise
    assert batches(tmp_path, "rerun") == ref_batches[SAVE_EVERY:]
