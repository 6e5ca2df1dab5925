"""LoRA through the trainer: ``train demo lora.rank=4 ...`` (the demo's tiny model and data, 8 CPU devices, FSDP).

One run of 3 steps (checkpoints at 2 and 3, merged hf export and the PEFT adapter at the end), then the checkpoint
of step 3 removed and the run started again on the same workdir: it resumes from step 2 and must give step 3's
loss bitwise. Checked: the base (every non-trainable param) bit-identical to the initial one, an optimizer state
of Adam's two moments for the trainable params only (counted), checkpoints holding the trainable params only plus
the base's identity (a checkpoint of another base refuses to resume), the merged export equal to ``lora.merge`` of the final
params (within TOL_MERGED: the run merges on 8 sharded devices, the test on the host), the PEFT adapter loading back as the same adapters.
"""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from convert.load import load_pretrained
from convert.peft import load_adapter
from internvl_jax import lora
from train import optim
from train.config import ConfigError, apply_overrides, load_train_config, optim_config, prepare
from train.trainer import _initial_params, _mesh, train

TOL_MERGED = 1e-6  # merged kernels: ours on 8 sharded devices (the run) vs on the host (the test), max abs
SETTINGS = ("steps=3", "save_every=2", "lora.rank=4", "data.rows=8", "data.eval_samples=1", "export=hf",
            "progress=false")


def _config(workdir, *extra):
    return prepare(apply_overrides(load_train_config("demo"), [f"workdir={workdir}", *SETTINGS, *extra]))


def test_lora_run_checkpoints_resume_export(tmp_path):
    cfg = _config(tmp_path)
    first = train(cfg)
    state, config = first.state, first.model.config
    assert config.lora and {r[1] for r in config.lora} == {4}
    ocfg = optim_config(cfg, config)
    trainable = optim.trainable_mask(ocfg, state.params)
    train_paths = {optim.param_path(p) for p, t in jax.tree_util.tree_flatten_with_path(trainable)[0] if t}
    assert {p for p in train_paths if not lora.is_adapter_path(p)} <= {p for p in train_paths
                                                                       if p.startswith("projector/")}
    # the base: bit-identical to the one the run started from
    _, initial = _initial_params(cfg, _mesh(cfg))
    for path, x in jax.tree_util.tree_flatten_with_path(initial)[0]:
        name = optim.param_path(path)
        if name not in train_paths:
            now = state.params
            for k in path:
                now = now[k.key]
            np.testing.assert_array_equal(np.asarray(now), np.asarray(x), err_msg=name)
    # optimizer state: the two moments of the trainable params, and two counts
    n_train = sum(int(np.prod(np.shape(x))) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
                  if optim.param_path(p) in train_paths)
    assert lora.count(state.opt_state) == 2 * n_train + 2
    assert n_train < lora.count(state.params) / 2
    # the checkpoint: trainable params only, and the base's identity
    saved = ocp.StandardCheckpointer().metadata(str(tmp_path / "checkpoints" / "3" / "state")).item_metadata
    saved_paths = {optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved["params"])[0]}
    assert saved_paths == train_paths
    meta = json.loads((tmp_path / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert set(meta["base"]) == {"model", "seed"} and meta["base"]["seed"] == cfg.seed
    # exports: merged safetensors, and the PEFT adapter
    merged = lora.merge(jax.device_get(state.params), config.lora)
    exported = load_pretrained(str(tmp_path / "export"))[1]
    for path, x in jax.tree_util.tree_flatten_with_path(merged)[0]:
        got = exported
        for k in path:
            got = got[k.key]
        np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=0, atol=TOL_MERGED,
                                   err_msg=optim.param_path(path))
    _, adapters = load_adapter(str(tmp_path / "adapter"), config.replace(lora=()))
    for path, x in jax.tree_util.tree_flatten_with_path(lora.adapters_of(jax.device_get(state.params)))[0]:
        got = adapters
        for k in path:
            got = got[k.key]
        np.testing.assert_array_equal(got, np.asarray(x))

    # resume from step 2: step 3 again, bitwise
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    written = meta_file.read_text()
    other = json.loads(written)
    other["base"]["seed"] += 1  # as if step 2 had been trained on another base
    meta_file.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="were trained on the base"):
        train(_config(tmp_path))
    meta_file.write_text(written)
    second = train(_config(tmp_path))
    assert second.resumed_from == 2
    assert second.metrics[-1]["step"] == 3 and second.metrics[-1]["loss"] == first.metrics[-1]["loss"]
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3, 3]
