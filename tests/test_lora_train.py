"""LoRA through the trainer: ``train demo lora.rank=4 ...`` (the demo's data and tiny model, 8 CPU devices, FSDP) on
the two LLM families whose fused torch modules the ``llm`` preset adapts as shared-A groups: InternLM2 (``wqkv``)
and Phi-3 (``qkv_proj``, ``gate_up_proj``); the ViT's adapters (the ``vit`` preset) are the ungrouped case.

One run of 3 steps per family (checkpoints at 2 and 3, merged hf export and the PEFT adapter at the end). Checked:
the fused modules' kernels share one ``lora_a`` per group (GROUPS) and hold ``lora_b`` alone; every adapter leaf
moved from its initial value; the base (every non-trainable param) bit-identical to the initial one; an optimizer
state of Adam's two moments for the trainable params only (counted: the adapters and the projector, which the
original's LoRA stages train fully); checkpoints holding the trainable params only plus the base's identity; the
merged export equal to ``lora.merge`` of the final params (within TOL_MERGED: the run merges on 8 sharded devices,
the test on the host); the PEFT adapter loading back as the same adapters, groups included, written in the module
names of the family's ``lora.adapter_layout`` (LAYOUT: InternLM2 transformers-native, Phi-3 the original
InternVLChatModel's).

Then (InternLM2) the checkpoint of step 3 removed and the run started again on the same workdir: it resumes from
step 2 and must give step 3's loss bitwise; a checkpoint of another base refuses to resume.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from convert.load import load_pretrained
from convert.peft import MODULE_PREFIXES, load_adapter
from internvl_jax import lora
from train import optim
from train.config import ConfigError, apply_overrides, load_train_config, optim_config, prepare
from train.demo_data import demo_model_config
from train import trainer
from train.trainer import _with_adapters, train

TOL_MERGED = 1e-6  # merged kernels: ours on 8 sharded devices (the run) vs on the host (the test), max abs
SETTINGS = ("steps=3", "save_every=2", "lora.rank=4", "data.rows=8", "data.eval_samples=1", "export=hf",
            "progress=false")
# per family, the original's fused torch Linears: shared-A group (under language_model/layers) -> its members
GROUPS = {
    "internlm2": {"attn/wqkv": ("q_proj", "k_proj", "v_proj")},
    "phi3": {"attn/qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp/gate_up_proj": ("gate_proj", "up_proj")},
}
LAYOUT = {"internlm2": "hf", "phi3": "original"}  # the PEFT adapter's module names (lora.adapter_layout) per run


def _config(workdir, family):
    """The demo run with its tiny model's decoder of ``family`` (no biases, as both families' releases)."""
    model = demo_model_config()
    model = model.replace(text=dataclasses.replace(model.text, family=family, qkv_bias=False))
    cfg = apply_overrides(load_train_config("demo"),
                          [f"workdir={workdir}", *SETTINGS, f"lora.adapter_layout={LAYOUT[family]}"])
    return prepare(cfg.replace(model=model))


def _paths(tree) -> dict:
    return {optim.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """family -> (workdir, the run's result, the params it started from on the host: base and fresh adapters), each
    family's run made once. The starting params are what the trainer's ``_with_adapters`` returned, copied as the
    run made them (the state's creation donates them)."""
    runs = {}

    def get(family):
        if family not in runs:
            workdir = tmp_path_factory.mktemp(f"lora_{family}")
            start = []

            def spy(*args):
                config, params = _with_adapters(*args)
                start.append(jax.device_get(params))
                return config, params

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(trainer, "_with_adapters", spy)
                run = trainer.train(_config(workdir, family))
            runs[family] = workdir, run, _paths(start[0])
        return runs[family]

    return get


@pytest.mark.parametrize("family", sorted(GROUPS))
def test_lora_run_trains_adapters_only(first_run, family):
    workdir, run, initial = first_run(family)
    cfg, state, config = _config(workdir, family), run.state, run.model.config
    assert config.lora and {r[1] for r in config.lora} == {4}
    final = _paths(jax.device_get(state.params))
    # the fused modules: one A per group [layers, E, r], its members B only
    layers = "language_model/layers/"
    for group, members in GROUPS[family].items():
        module = group.rsplit("/", 1)[0]
        assert final[f"{layers}{group}/lora_a"].shape == (config.text.num_layers, config.text.hidden_size, 4), group
        for m in members:
            assert f"{layers}{module}/{m}/lora_b" in final and f"{layers}{module}/{m}/lora_a" not in final, m
    grouped = {f"{layers}{g.rsplit('/', 1)[0]}/{m}" for g, ms in GROUPS[family].items() for m in ms}
    assert {p.rsplit("/", 1)[0] for p in final if p.startswith(layers) and p.endswith("/lora_a")} == (
        {f"{layers}{g}" for g in GROUPS[family]} | {f"{layers}attn/o_proj", f"{layers}mlp/down_proj"}
        | {f"{layers}mlp/{n}_proj" for n in ("gate", "up") if f"{layers}mlp/{n}_proj" not in grouped})
    ocfg = optim_config(cfg, config)
    train_paths = {p for p, t in _paths(optim.trainable_mask(ocfg, state.params)).items() if t}
    assert {p for p in train_paths if not lora.is_adapter_path(p)} <= {p for p in final if p.startswith("projector/")}
    assert {p for p in final if lora.is_adapter_path(p)} <= train_paths
    # from the params the run started from: every adapter leaf moved, the base bit-identical
    assert initial.keys() == final.keys()
    for name, x in initial.items():
        if lora.is_adapter_path(name):
            assert not np.array_equal(final[name], x), f"{name} did not train"
        elif name not in train_paths:
            np.testing.assert_array_equal(final[name], x, err_msg=name)
    # optimizer state: the two moments of the trainable params, and two counts
    n_train = sum(int(np.prod(np.shape(final[p]))) for p in train_paths)
    assert lora.count(state.opt_state) == 2 * n_train + 2
    assert n_train < lora.count(state.params) / 2
    # the checkpoint: trainable params only, and the base's identity
    saved = ocp.StandardCheckpointer().metadata(str(workdir / "checkpoints" / "3" / "state")).item_metadata
    assert set(_paths(saved["params"])) == train_paths
    meta = json.loads((workdir / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert set(meta["base"]) == {"model", "seed"} and meta["base"]["seed"] == cfg.seed
    # exports: merged safetensors, and the PEFT adapter (groups loading back as groups)
    merged = _paths(lora.merge(jax.device_get(state.params), config.lora))
    exported = _paths(load_pretrained(str(workdir / "export"))[1])
    assert exported.keys() == merged.keys()
    for name, x in merged.items():
        np.testing.assert_allclose(np.asarray(exported[name]), np.asarray(x), rtol=0, atol=TOL_MERGED, err_msg=name)
    names = json.loads((workdir / "adapter" / "adapter_config.json").read_text())["target_modules"]
    for layout, prefixes in MODULE_PREFIXES.items():  # its layout's module names, none of the other's
        named = [n for n in names if n.startswith(tuple(theirs for _, theirs in prefixes))]
        assert named == (names if layout == LAYOUT[family] else []), layout
    _, adapters = load_adapter(str(workdir / "adapter"), config.replace(lora=()))
    ours = {p: x for p, x in final.items() if lora.is_adapter_path(p)}
    loaded = _paths(adapters)
    assert loaded.keys() == ours.keys()
    for name, x in ours.items():
        np.testing.assert_array_equal(loaded[name], x, err_msg=name)


def test_lora_resume_bitwise_on_its_base(first_run):
    workdir, first, _ = first_run("internlm2")
    shutil.rmtree(workdir / "checkpoints" / "3")
    meta_file = workdir / "checkpoints" / "2" / "meta" / "metadata"
    written = meta_file.read_text()
    other = json.loads(written)
    other["base"]["seed"] += 1  # as if step 2 had been trained on another base
    meta_file.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="were trained on the base"):
        train(_config(workdir, "internlm2"))
    meta_file.write_text(written)
    second = train(_config(workdir, "internlm2"))
    assert second.resumed_from == 2
    assert second.metrics[-1]["step"] == 3 and second.metrics[-1]["loss"] == first.metrics[-1]["loss"]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3, 3]
