"""Resume (issue 14): a training run killed with SIGKILL, between two checkpoints or during a save, and rerun on
the same workdir continues with the loss sequence of an uninterrupted run with the same seed, bitwise, on the
same batches in the same order.

Every run is ``internvl-jax train demo workdir=... steps=... save_every=...`` in a subprocess, as users run it,
started through the probe at the end of this file (``python tests/test_train_resume.py train demo ...``): it
calls the same ``internvl_jax.cli.main`` after two patches that observe or stop the run and change nothing else:

- every batch the trainer takes (``train.inputs.Inputs.next``) is hashed (sha256 of each array's name, dtype,
  shape and bytes) into ``$PROBE_BATCHES``, one line per batch: the data order, read directly;
- with ``$PROBE_KILL_IN_SAVE=s``, the save of step ``s`` waits for the previous save to be on disk, starts
  orbax's asynchronous save, holds its commit (the rename of the temporary folder) and SIGKILLs the process as
  soon as the temporary folder exists: a kill in the middle of a save, made deterministic.

Comparison: every record of ``metrics.jsonl`` (a killed run's and its rerun's, which repeats the steps after the
checkpoint it resumed from) must equal the uninterrupted run's record of the same step in every field but the
wall-clock ones (loss, grad norm, lr, weight sum, tokens and the data's token fill, tile fill and sample count).
The JSON floats are compared with ``==``: ``json`` writes ``repr``, which round-trips, so equal is bitwise.
Drop path is on, so the steps also depend on the restored rng. The runs share a JAX compilation cache (the
uninterrupted run compiles; the others load the same executables), which halves the time of the file.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

STEPS, SAVE_EVERY = 10, 4  # checkpoints at 4, 8 and 10 (the last step is always saved)
KILLED_AFTER = 5  # the between-checkpoints kill: once metrics.jsonl shows step 5 (resumes from 4, repeats 5..)
KILLED_SAVE = 8  # the during-a-save kill: the save of step 8 (resumes from 4)
# the demo with fewer rows, no export, and the held-out loss (which the demo's setup hook always asks for) on
# a single batch: each run takes seconds of training and a JIT compile. Drop path on, so that every step draws
# from the state's rng (the demo trains without it, and its resume would not show the rng restored).
SETTINGS = ("data.rows=8", "data.eval_samples=1", "drop_path=0.1", "export=", "progress=false")
TIMING = ("seconds", "tokens_per_s", "mfu")  # wall-clock fields: the only ones allowed to differ
RUN_TIMEOUT = 300


# ------------------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------------------

def _command(workdir) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "train", "demo", f"workdir={workdir}", f"steps={STEPS}",
            f"save_every={SAVE_EVERY}", *SETTINGS]


def _env(workdir, name: str, cache, **extra) -> dict:
    """The subprocess's environment: batch digests to ``<workdir>/batches-<name>.txt``; a JAX compilation
    cache shared by the runs of this file (a resumed run compiles the same programs, so it loads them)."""
    env = {k: v for k, v in os.environ.items() if k != "PROBE_KILL_IN_SAVE"}
    env.update(PROBE_BATCHES=os.path.join(workdir, f"batches-{name}.txt"), JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
    return env


def run(workdir, name: str, cache, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(_command(workdir), env=_env(workdir, name, cache, **extra), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def start(workdir, name: str, cache) -> subprocess.Popen:
    with open(os.path.join(workdir, f"log-{name}.txt"), "w") as log:  # the child holds its own copy of the file
        return subprocess.Popen(_command(workdir), env=_env(workdir, name, cache), stdout=log,
                                stderr=subprocess.STDOUT)


def metrics(workdir) -> list[dict]:
    """The records of ``metrics.jsonl`` in file order (every line must be whole JSON, a killed run's too)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def batches(workdir, name: str) -> list[str]:
    with open(os.path.join(workdir, f"batches-{name}.txt")) as f:
        return f.read().split()


def checkpoint_steps(workdir) -> list[int]:
    """The finalised checkpoints: orbax renames ``<step><tmp suffix>`` to ``<step>`` when a save is complete."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def resumed_from(out: subprocess.CompletedProcess) -> int | None:
    for line in out.stderr.splitlines():
        if line.startswith("resumed from step "):
            return int(line.split()[3])
    return None


def assert_matches_reference(records: list[dict], reference: list[dict]):
    """Each record equals the uninterrupted run's record of its step, bitwise, timing fields aside."""
    by_step = {r["step"]: deterministic(r) for r in reference}
    for r in records:
        assert deterministic(r) == by_step[r["step"]], f"step {r['step']}: resumed {r} vs uninterrupted " \
                                                       f"{by_step[r['step']]}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """(metrics records, batch digests) of the uninterrupted run."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = run(workdir, "uninterrupted", cache)
    assert out.returncode == 0, out.stderr[-3000:]
    records = metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len(set(r["loss"] for r in records)) == STEPS  # the loss moves: a resume at the wrong step would show
    digests = batches(workdir, "uninterrupted")
    assert len(digests) == STEPS and len(set(digests)) == STEPS  # a new batch every step
    return records, digests


# ------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------

def test_a_run_killed_between_checkpoints_resumes_from_the_last_one_bitwise(reference, tmp_path, cache):
    ref_records, ref_batches = reference
    killed = start(tmp_path, "killed", cache)
    deadline = time.monotonic() + RUN_TIMEOUT
    # kill once step 5 is logged and checkpoint 4 is on disk (its save is asynchronous)
    while not (len(metrics(tmp_path)) >= KILLED_AFTER and SAVE_EVERY in checkpoint_steps(tmp_path)):
        assert killed.poll() is None, open(os.path.join(tmp_path, "log-killed.txt")).read()[-3000:]
        assert time.monotonic() < deadline, "the run to kill never reached step 5"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    before = metrics(tmp_path)
    # killed between the checkpoints of steps 4 and 8
    assert KILLED_AFTER <= len(before) < 2 * SAVE_EVERY and checkpoint_steps(tmp_path) == [SAVE_EVERY]

    out = run(tmp_path, "rerun", cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert resumed_from(out) == SAVE_EVERY
    records = metrics(tmp_path)
    # the rerun appended steps 5..10: it repeated the steps after checkpoint 4 that the killed run had done
    assert [r["step"] for r in records] == list(range(1, len(before) + 1)) + list(range(SAVE_EVERY + 1, STEPS + 1))
    assert_matches_reference(records, ref_records)
    # the batches: the killed run took the reference's first ones, the rerun the reference's from step 5
    killed_batches = batches(tmp_path, "killed")
    assert killed_batches == ref_batches[:len(killed_batches)]
    assert batches(tmp_path, "rerun") == ref_batches[SAVE_EVERY:]


def test_a_run_killed_during_a_save_resumes_from_the_previous_checkpoint_bitwise(reference, tmp_path, cache):
    ref_records, ref_batches = reference
    out = run(tmp_path, "killed", cache, PROBE_KILL_IN_SAVE=str(KILLED_SAVE))
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    from orbax.checkpoint.path import atomicity

    folder = os.path.join(tmp_path, "checkpoints")
    # the save of step 8 was under way (its temporary folder is there) and never completed
    assert glob.glob(os.path.join(folder, f"{KILLED_SAVE}{atomicity.TMP_DIR_SUFFIX}*"))
    assert checkpoint_steps(tmp_path) == [SAVE_EVERY]
    from train.checkpoint import Checkpoints

    manager = Checkpoints(str(tmp_path), save_every=SAVE_EVERY)
    assert manager.latest_step() == SAVE_EVERY  # the trainer's view: the previous checkpoint is the latest usable
    manager.close()
    before = metrics(tmp_path)
    assert [r["step"] for r in before] == list(range(1, KILLED_SAVE))  # killed before step 8 was logged

    out = run(tmp_path, "rerun", cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert resumed_from(out) == SAVE_EVERY
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, KILLED_SAVE)) + list(range(SAVE_EVERY + 1, STEPS + 1))
    assert_matches_reference(records, ref_records)
    # step 9's batch was taken before step 8's save began (the input runs while the device computes), and the
    # checkpoints still hold the position after each step's own batch: the rerun takes the reference's from step 5
    assert batches(tmp_path, "killed") == ref_batches[:KILLED_SAVE + 1]
    assert batches(tmp_path, "rerun") == ref_batches[SAVE_EVERY:]
    assert checkpoint_steps(tmp_path) == [2 * SAVE_EVERY, STEPS]  # keep=2 of the demo


def _folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def test_checkpoints_are_uncompressed_unless_asked_and_both_restore(tmp_path):
    """Checkpoints writes the state without orbax's zstd by default (checkpoint_compression=false) and with it when
    asked: the compressed folder of the same random float32 state is smaller, and each restores bit for bit into
    the abstract state's sharding with the data iterator's position."""
    import grain
    import jax
    import numpy as np

    from train.checkpoint import Checkpoints

    state = {"w": np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32), "step": np.int32(7)}
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0])), state)
    sizes = {}
    for compress in (False, True):
        workdir = tmp_path / str(compress)
        data = iter(grain.MapDataset.range(10).to_iter_dataset())
        next(data), next(data)
        manager = Checkpoints(str(workdir), save_every=1, compress=compress)
        manager.save(1, jax.device_put(state), data, {"run": "x"}, force=True)
        manager.close()
        sizes[compress] = _folder_bytes(workdir / "checkpoints")
        fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
        manager = Checkpoints(str(workdir), save_every=1)
        restored, meta = manager.restore(1, abstract, fresh)
        manager.close()
        np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
        assert int(restored["step"]) == 7 and meta == {"run": "x"} and next(fresh) == 2
    assert sizes[True] < 0.97 * sizes[False], sizes


def test_a_save_takes_the_meta_as_it_is_when_called(tmp_path):
    """orbax dumps a checkpoint's JSON meta in a background thread, once the step's folder exists, while the trainer
    moves on and its skip counters grow: Checkpoints.save hands orbax a copy made when it is called."""
    from train.checkpoint import Checkpoints

    checkpoints = Checkpoints(str(tmp_path), save_every=1)
    given = []
    manager, checkpoints.manager = checkpoints.manager, type("Recorder", (), {
        "save": staticmethod(lambda step, args, force: given.append(args["meta"].item) or True)})
    meta = {"host": {"skipped_samples": {"missing image": 1}}}
    assert checkpoints.save(1, {}, None, meta, force=True)
    meta["host"]["skipped_samples"]["missing image"] += 1
    manager.close()
    assert given == [{"host": {"skipped_samples": {"missing image": 1}}}]


# ------------------------------------------------------------------------------------------------------------
# The probe (this file run as a script): the CLI with the batch digests and the kill during a save
# ------------------------------------------------------------------------------------------------------------

def _digest(batch: dict) -> str:
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for name in sorted(batch):
        a = np.ascontiguousarray(batch[name])
        h.update(f"{name} {a.dtype} {a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _probe(argv: list[str]) -> int:
    import asyncio
    import logging

    # the CLI's logging setup, done before importing orbax (which installs a WARNING root handler, so that the
    # CLI's own basicConfig would be a no-op and "resumed from step N" would not reach stderr)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from orbax.checkpoint.path import atomicity

    import train.checkpoint
    import train.inputs
    from internvl_jax import cli

    digests = open(os.environ["PROBE_BATCHES"], "a")
    take = train.inputs.Inputs.next

    def next_recorded(self):
        batch, stats = take(self)
        digests.write(_digest(batch) + "\n")
        digests.flush()
        return batch, stats

    train.inputs.Inputs.next = next_recorded
    kill_step = int(os.environ.get("PROBE_KILL_IN_SAVE", "0"))
    save = train.checkpoint.Checkpoints.save

    def save_then_die(self, step, *args, **kwargs):
        if step != kill_step:
            return save(self, step, *args, **kwargs)
        self.wait()  # the previous checkpoint is complete: the kill interrupts this save alone

        async def held(_):  # the commit never comes
            await asyncio.Event().wait()

        atomicity.AtomicRenameTemporaryPath.finalize = held
        atomicity.CommitFileTemporaryPath.finalize = held
        if not save(self, step, *args, **kwargs):
            raise RuntimeError(f"probe: the save of step {step} did not start")
        pattern = os.path.join(self.directory, f"{step}{atomicity.TMP_DIR_SUFFIX}*")
        deadline = time.monotonic() + 60
        while not glob.glob(pattern):
            if time.monotonic() > deadline:
                raise RuntimeError(f"probe: no temporary folder {pattern} after 60 s")
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGKILL)

    train.checkpoint.Checkpoints.save = save_then_die
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(_probe(sys.argv[1:]))
