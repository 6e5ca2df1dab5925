"""Two localhost processes x 4 CPU devices form one 8-device mesh with jax.distributed; each feeds only its own
rows, and the forward and the loss/gradient step give the single-process 8-device numbers."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import sharding
from internvl_jax.model import init_params
from sharding_case import CONFIG, MESH, PRESET, batch, param_shardings, step

TOL = 1e-5  # two processes vs one, float32, max abs diff
WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    out, port = tmp_path / "out.npz", str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    workers = [subprocess.Popen([sys.executable, WORKER, str(i), port, str(out)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)

    mesh = sharding.make_mesh(*MESH)
    params = sharding.place(init_params(CONFIG, jax.random.PRNGKey(0)), param_shardings(mesh))
    with sharding.activate(mesh, PRESET):
        (loss, logits), grads = jax.jit(step)(params, sharding.shard_batch(batch(), mesh, PRESET))
    expected = {"loss": loss, "logits": logits, "grads": grads}
    got = np.load(out)
    flat = jax.tree_util.tree_leaves_with_path(expected)
    assert sorted(got.files) == sorted(jax.tree_util.keystr(p) for p, _ in flat)
    for path, value in flat:
        np.testing.assert_allclose(got[jax.tree_util.keystr(path)], value, atol=TOL, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_initialize_needs_all_three_values(monkeypatch):
    from sharding.distributed import initialize

    monkeypatch.setenv("INTERNVL_COORDINATOR", "localhost:1234")
    with pytest.raises(ValueError, match="needs all of coordinator"):
        initialize()
    monkeypatch.delenv("INTERNVL_COORDINATOR")
    assert initialize() is False  # nothing configured: a single process stays alone
