"""`convert` and `export` outputs are atomic: a run killed (SIGKILL), terminated (SIGTERM), interrupted (Ctrl-C) or
failing (disk full) at any step leaves the destination absent, the complete old folder or the complete new one,
never a mix; catchable ends leave nothing else behind; the next run removes what a SIGKILL left.

How the kills land: each run is a subprocess (tests/killed_run.py) that sends itself the signal at a fixed step,
seen through wrappers of the filesystem calls that only that test process installs: the first progress update
(writing), just before the 1st, 2nd or 3rd rename beside the destination (the swap), and half-way through deleting
a folder there. The same step every time, whatever the machine's speed; a run that never reaches its step exits
normally and fails the test. The old copy is written as bfloat16 and the new one as float32, so a loaded
destination tells which one it is.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import convert.export
import convert.load
import convert.to_orbax
from convert.load import load_pretrained
from internvl_jax.cli import main
from reference import tiny_internvl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "killed_run.py")
OLD, NEW = ["--dtype", "bfloat16"], ["--dtype", "float32"]  # the same params as two distinguishable outputs


def _files(folder) -> set[str]:
    """The paths of all files under ``folder``, relative to it."""
    return {os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The source checkpoint, each command's old output (to overwrite), and what an old and a new output of each
    command hold: their params and file names."""
    root = tmp_path_factory.mktemp("atomic")
    src = root / "src"
    tiny_internvl("qwen2").save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    new = load_pretrained(str(src))[1]
    params = {"old": jax.tree_util.tree_map(lambda x: np.asarray(x.astype("bfloat16").astype("float32")), new),
              "new": new}
    outputs, files = {}, {}
    for command in ("convert", "export"):
        for name, options in (("old", OLD), ("new", NEW)):
            outputs[command, name] = root / f"{name}-{command}"
            assert main([command, str(src), str(outputs[command, name]), *options]) == 0
            files[command, name] = _files(outputs[command, name])
    return {"src": src, "outputs": outputs, "files": files, "params": params}


def _holds(dst, case, command) -> str:
    """What ``dst`` holds: "absent", or "old" or "new" when it has all the files of that output of ``command``,
    loads, and its params are that output's."""
    if not os.path.lexists(dst):
        return "absent"
    got = load_pretrained(str(dst))[1]
    for name, expected in case["params"].items():
        if all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, got, expected))):
            assert _files(dst) == case["files"][command, name], f"{dst} lacks files of the {name} output"
            return name
    raise AssertionError(f"{dst} loads but holds neither the old nor the new params")


def _setup(tmp_path, case, command, overwrite):
    """The destination (a copy of the old output when overwriting) in a folder of its own, and the run's argv."""
    dst = tmp_path / "out" / "dst"
    dst.parent.mkdir()
    if overwrite:
        shutil.copytree(case["outputs"][command, "old"], dst)
    return dst, [command, str(case["src"]), str(dst), *NEW, *(["--overwrite"] if overwrite else [])]


def _run_until(sig, point, argv):
    """Run ``internvl-jax argv`` in a subprocess that sends itself ``sig`` at ``point`` (tests/killed_run.py)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, RUNNER, sig.name, point, *argv], env=env, capture_output=True, text=True,
                          timeout=300)


# (overwrite, where the run is killed, what the destination holds right after)
STEPS = [(False, "writing", "absent"), (False, "rename-1", "absent"),
         (True, "writing", "old"), (True, "rename-1", "old"),  # before the old copy moves aside
         (True, "rename-2", "absent"),  # the old copy aside, the new one not yet in
         (True, "rename-3", "new"),  # the new one in, the old copy not yet deleted
         (True, "deleting", "new")]  # half-way through deleting the old copy
# export shares the swap with convert: its own writing, and one kill in each state of the swap
KILLS = [("convert", *step) for step in STEPS] + [("export", *STEPS[i]) for i in (0, 2, 4, 6)]


@pytest.mark.parametrize("command,overwrite,point,holds", KILLS)
def test_a_killed_run_leaves_the_old_or_new_output_and_the_next_run_clears_up(tmp_path, case, command, overwrite,
                                                                              point, holds):
    dst, argv = _setup(tmp_path, case, command, overwrite)
    run = _run_until(signal.SIGKILL, point, argv)
    assert run.returncode == -signal.SIGKILL, f"not killed at {point}:\n{run.stderr[-3000:]}"
    assert _holds(dst, case, command) == holds
    if overwrite and holds == "absent":  # a run that refuses to overwrite still puts the old copy back
        assert main(argv[:-1]) == 2
        assert _holds(dst, case, command) == "old"
        assert os.listdir(dst.parent) == ["dst"]
    assert main(argv) == 0
    assert _holds(dst, case, command) == "new"
    assert os.listdir(dst.parent) == ["dst"]


# (command, signal, where it arrives, what the destination holds after the run's own cleanup)
SIGNALS = [("convert", signal.SIGTERM, "writing", "old"), ("convert", signal.SIGINT, "writing", "old"),
           ("convert", signal.SIGTERM, "rename-2", "new"),  # held through the swap: the new one goes in, then it stops
           ("export", signal.SIGTERM, "writing", "old")]


@pytest.mark.parametrize("command,sig,point,holds", SIGNALS)
def test_sigterm_and_ctrl_c_clean_up_and_say_so_in_one_line(tmp_path, case, command, sig, point, holds):
    dst, argv = _setup(tmp_path, case, command, overwrite=True)
    run = _run_until(sig, point, argv)
    assert run.returncode == 128 + sig, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"internvl-jax {command}: ") and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert _holds(dst, case, command) == holds
    assert os.listdir(dst.parent) == ["dst"]


def _then_disk_full(write):
    """``write`` that writes all it was given, then finds the disk full (at the next file)."""
    def full(*args, **kwargs):
        write(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")
    return full


@pytest.mark.parametrize("command,module,writer", [("convert", convert.to_orbax, "save_streamed"),
                                                   ("export", convert.export, "write_safetensors")])
def test_a_full_disk_leaves_the_old_output_and_nothing_else(tmp_path, capsys, monkeypatch, case, command, module,
                                                             writer):
    dst, argv = _setup(tmp_path, case, command, overwrite=True)
    monkeypatch.setattr(module, writer, _then_disk_full(getattr(module, writer)))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"internvl-jax {command}: error: [Errno {errno.ENOSPC}] No space left on device"
    assert _holds(dst, case, command) == "old"
    assert os.listdir(dst.parent) == ["dst"]


def _not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "dst", "is not a folder"


def _read_only(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro" / "dst", "is not writable"


def _existing(tmp_path):
    (tmp_path / "dst").mkdir()
    return tmp_path / "dst", "already exists (pass --overwrite to replace it)"


@pytest.mark.parametrize("command,module,reader", [("convert", convert.to_orbax, "checkpoint_model"),
                                                   ("export", convert.load, "load_pretrained")])
@pytest.mark.parametrize("bad", [_existing, _not_a_folder, _read_only])
def test_a_bad_destination_fails_before_the_source_is_read(tmp_path, capsys, monkeypatch, case, command, module,
                                                           reader, bad):
    dst, message = bad(tmp_path)
    monkeypatch.setattr(module, reader, lambda *a, **k: pytest.fail("the source was read"))
    assert main([command, str(case["src"]), str(dst)]) == 2
    assert message in capsys.readouterr().err


def test_a_live_runs_staging_is_left_alone_and_named(tmp_path, caplog, case):
    live = tmp_path / f".dst.staging-{os.getppid()}-0a1b2c3d"  # the pytest runner's parent: alive, not us
    live.mkdir()
    assert main(["convert", str(case["src"]), str(tmp_path / "dst")]) == 0
    assert live.is_dir() and f"left {live} alone" in caplog.text
