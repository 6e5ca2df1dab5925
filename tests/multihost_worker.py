"""One process of the localhost multi-host test: 4 CPU devices here, 8 in the joint mesh.

    python tests/multihost_worker.py PROCESS_ID PORT OUT.npz
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import sharding  # noqa: E402
from sharding.distributed import initialize, is_main_process  # noqa: E402
from sharding_case import CONFIG, MESH, PRESET, batch, param_shardings, step  # noqa: E402

process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
assert initialize(f"localhost:{port}", 2, process_id)
assert jax.device_count() == 8 and jax.local_device_count() == 4
mesh = sharding.make_mesh(*MESH)
from internvl_jax.model import init_params  # noqa: E402

params = sharding.place(init_params(CONFIG, jax.random.PRNGKey(0)), param_shardings(mesh))
rows = batch()
half = len(rows["input_ids"]) // 2
local = {k: v[process_id * half:(process_id + 1) * half] for k, v in rows.items()}  # this process's rows only
with sharding.activate(mesh, PRESET):
    (loss, logits), grads = jax.jit(step)(params, sharding.shard_batch(local, mesh, PRESET))
gathered = multihost_utils.process_allgather({"loss": loss, "logits": logits, "grads": grads}, tiled=True)
if is_main_process():
    flat = jax.tree_util.tree_leaves_with_path(gathered)
    np.savez(out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat})
