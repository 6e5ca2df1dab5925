"""The named train configs (``train/configs/``) and the ``key=value`` override parser of ``train/config.py``.

Each stage preset must load, be headed by the command that runs it, carry the hyper-parameters of the original's
script (the table below, taken from OpenGVLab/InternVL at 2410d1d; see each preset's docstring for the script
paths), and freeze exactly its stage's parts of a real release parameter tree (InternVL2_5-8B, abstract: nothing
is allocated) through ``train.config.optim_config`` and ``train.optim``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
import pytest

from train import optim
from train.config import ConfigError, TrainConfig, apply_overrides, load_train_config, preset_names

PARTS = ("vision", "projector", "language_model")

# preset -> the top-level parts of the model that train (everything else frozen)
TRAINABLE = {
    "internvl1_2_stage1": {"vision", "projector"},  # ViT + MLP at 448
    "internvl1_2_stage2": {"projector", "language_model"},  # MLP + LLM
    "internvl2_5_stage1": {"projector"},  # MLP warm-up
    "internvl2_5_stage1_5": {"vision", "projector"},  # ViT incremental learning
    "internvl2_5_stage2": {"vision", "projector", "language_model"},  # full model
    "internvl3_pretrain": {"vision", "projector", "language_model"},  # native multimodal pre-training
    "internvl3_finetune": {"projector", "language_model"},  # second fine-tune
    "mpo": {"vision", "projector", "language_model"},  # InternVL2.5-8B-MPO: everything
    "internvl3_mpo": {"vision", "projector", "language_model"},  # InternVL3-8B's MPO
}

# the original's settings per preset: lr, (warmup_steps, warmup_ratio), weight decay, drop_path, global rows,
# row tokens, row tiles, packing, loss weighting. 1.2 stage 1 and 3.0 pre-training have no script, and unpacked
# runs have no tile budget in the original: there the values are the defaults their docstrings document.
SCRIPT = {
    "internvl1_2_stage1": (1e-5, (100, None), 0.05, 0.2, 2048, 2048, 1, False, "token"),
    "internvl1_2_stage2": (1e-5, (0, 0.03), 0.05, 0.0, 512, 2048, 1, False, "token"),
    "internvl2_5_stage1": (2e-4, (100, None), 0.05, 0.0, 512, 16384, 48, True, "square"),
    "internvl2_5_stage1_5": (1e-5, (100, None), 0.05, 0.1, 1024, 16384, 48, True, "square"),
    "internvl2_5_stage2": (4e-5, (0, 0.03), 0.05, 0.1, 512, 16384, 48, True, "square"),
    "internvl3_pretrain": (4e-5, (0, 0.03), 0.05, 0.1, 512, 16384, 48, True, "square"),
    "internvl3_finetune": (2e-5, (0, 0.03), 0.05, 0.0, 128, 16384, 13, False, "token"),
    # MPO: 256 pairs a step, one pair (two sequences of --max_seq_length) a row
    "mpo": (1e-6, (0, 0.03), 0.05, 0.1, 256, 2 * 8192, 13, True, "token"),
    "internvl3_mpo": (2e-7, (0, 0.03), 0.05, 0.1, 256, 2 * 12288, 13, True, "token"),
}

STAGE_PRESETS = sorted(TRAINABLE)


@pytest.fixture(scope="module")
def release():
    """(model config, abstract params) of InternVL2_5-8B: ShapeDtypeStructs only."""
    from internvl_jax.model import abstract_params
    from internvl_jax.presets import get_preset

    config = get_preset("InternVL2_5-8B")
    return config, abstract_params(config)


def _trainable_by_path(cfg: TrainConfig, config, params) -> dict[str, bool]:
    from train.config import optim_config

    mask = optim.trainable_mask(optim_config(cfg, config), params)
    return dict(zip(jax.tree.leaves(optim.paths(params)), jax.tree.leaves(mask)))


def _multipliers_by_path(cfg: TrainConfig, config, params) -> dict:
    from train.config import optim_config

    mults = optim.lr_multipliers(optim_config(cfg, config), params)
    return dict(zip(jax.tree.leaves(optim.paths(params)), jax.tree.leaves(mults)))


# ------------------------------------------------------------------------------------------------------------
# The presets
# ------------------------------------------------------------------------------------------------------------

def test_every_preset_has_a_stage_here():
    """A new preset in train/configs must get its expected split in TRAINABLE (the demos are the lead's)."""
    internvl1 = {n for n in preset_names() if n.startswith("internvl1_") and not n.startswith("internvl1_2")}
    assert set(preset_names()) - {"demo", "mpo_demo"} - internvl1 == set(TRAINABLE)  # InternVL 1.0: test_clip_train


@pytest.mark.parametrize("name", STAGE_PRESETS)
def test_preset_loads_named_and_headed_by_its_command(name):
    import importlib

    cfg = load_train_config(name)
    assert isinstance(cfg, TrainConfig)
    assert cfg.name == name
    doc = importlib.import_module(f"train.configs.{name}").__doc__
    assert doc.splitlines()[0].startswith(f"``internvl-jax train {name} "), doc.splitlines()[0]
    assert "OpenGVLab/InternVL at 2410d1d" in " ".join(doc.split())  # the source of its settings is stated


@pytest.mark.parametrize("name", STAGE_PRESETS)
def test_every_override_its_docstring_shows_is_accepted(name):
    """The command line and each ``key=value`` snippet of the docstring (model-size variants, options) are valid
    overrides of the preset: known keys, values of the right type."""
    import importlib

    doc = importlib.import_module(f"train.configs.{name}").__doc__
    command = doc.splitlines()[0].strip("`").split()
    assert command[:3] == ["internvl-jax", "train", name]
    snippets = [s for s in re.findall(r"``([a-z_][a-z_.0-9]*=[^`]*)``", doc) if "(" not in s]
    assert snippets, "the docstring shows no override"
    cfg = load_train_config(name)
    apply_overrides(cfg, command[3:])
    for snippet in snippets:
        apply_overrides(cfg, snippet.split())


@pytest.mark.parametrize("name", STAGE_PRESETS)
def test_preset_has_the_original_settings(name):
    cfg = load_train_config(name)
    lr, (warmup_steps, warmup_ratio), wd, drop_path, rows, tokens, tiles, packing, weighting = SCRIPT[name]
    assert cfg.optim.lr == lr
    assert cfg.optim.warmup_steps == warmup_steps
    if warmup_ratio is not None:
        assert cfg.optim.warmup_ratio == warmup_ratio
    assert cfg.optim.weight_decay == wd
    assert cfg.optim.schedule == "cosine" and cfg.optim.min_lr_ratio == 0.0
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps, cfg.optim.max_grad_norm) == (0.9, 0.999, 1e-8, 1.0)
    assert cfg.drop_path == drop_path
    assert cfg.image_size == 448
    assert (cfg.data.rows, cfg.data.max_tokens, cfg.data.max_tiles) == (rows, tokens, tiles)
    assert (cfg.data.packing, cfg.data.loss_weighting) == (packing, weighting)
    assert cfg.data.v2pe == ("random" if name == "internvl3_pretrain" else "")


@pytest.mark.parametrize("name", STAGE_PRESETS)
def test_preset_freezes_exactly_its_stage(name, release):
    config, params = release
    got = _trainable_by_path(load_train_config(name), config, params)
    want = {path: path.split("/")[0] in TRAINABLE[name] for path in got}
    assert got == want
    assert {path.split("/")[0] for path in got} == set(PARTS)  # the tree has the three parts the table names


def test_stage1_5_warmup_is_100_steps_and_stage2_warmup_a_ratio():
    """HF's rule: warmup_steps wins when set, else ceil(total * warmup_ratio)."""
    assert optim.warmup_steps(load_train_config("internvl2_5_stage1_5").optim, 5500) == 100
    assert optim.warmup_steps(load_train_config("internvl2_5_stage2").optim, 5500) == math.ceil(5500 * 0.03)


# ------------------------------------------------------------------------------------------------------------
# Overrides on a preset, checked on the real tree
# ------------------------------------------------------------------------------------------------------------

def test_overrides_set_the_named_keys_only():
    base = load_train_config("internvl2_5_stage1")
    cfg = apply_overrides(base, ["optim.lr=1e-5", "freeze.unfreeze_vit_layers=-2"])
    assert cfg.optim.lr == 1e-5 and cfg.freeze.unfreeze_vit_layers == -2
    assert cfg == base.replace(optim=dataclasses.replace(base.optim, lr=1e-5),
                               freeze=dataclasses.replace(base.freeze, unfreeze_vit_layers=-2))
    assert base.optim.lr == 2e-4 and base.freeze.unfreeze_vit_layers == 0  # the preset itself is unchanged


def test_unfreeze_vit_layers_trains_the_last_layers_only(release):
    """Stage 1 (frozen ViT) with unfreeze_vit_layers=-2: the last 2 of the 24 ViT layers train, the embeddings stay
    frozen (the original re-enables vision_model.encoder.layers[-2:] only)."""
    config, params = release
    n = config.vision.num_layers
    cfg = apply_overrides(load_train_config("internvl2_5_stage1"), ["freeze.unfreeze_vit_layers=-2"])
    mults = _multipliers_by_path(cfg, config, params)
    want_layers = np.array([0.0] * (n - 2) + [1.0] * 2, np.float32)
    for path, m in mults.items():
        if path.startswith("vision/layers/"):
            np.testing.assert_array_equal(m, want_layers, err_msg=path)
        elif path.startswith(("vision/", "language_model/")):
            assert m == 0.0, path
        else:
            assert m == 1.0, path


def test_unfreeze_lm_head_really_trains_the_head(release):
    """A frozen LLM with unfreeze_lm_head: the (untied) head trains, the token table and the layers do not."""
    config, params = release
    assert not config.text.tie_word_embeddings
    cfg = apply_overrides(load_train_config("internvl2_5_stage1"), ["freeze.unfreeze_lm_head=true"])
    got = _trainable_by_path(cfg, config, params)
    want = {p: p.startswith("projector/") or p.startswith("language_model/lm_head/") for p in got}
    assert got == want


# ------------------------------------------------------------------------------------------------------------
# The override parser (train/config.py)
# ------------------------------------------------------------------------------------------------------------

BASE = TrainConfig()


@pytest.mark.parametrize("override, read, value", [
    ("steps=20", lambda c: c.steps, 20),  # int
    ("seed=-3", lambda c: c.seed, -3),
    ("optim.lr=3e-4", lambda c: c.optim.lr, 3e-4),  # float, nested group
    ("optim.lr=1", lambda c: c.optim.lr, 1.0),  # an integer literal is a float for a float field
    ("drop_path=0.4", lambda c: c.drop_path, 0.4),
    ("data.packing=false", lambda c: c.data.packing, False),  # bool
    ("data.packing=0", lambda c: c.data.packing, False),
    ("progress=off", lambda c: c.progress, False),
    ("freeze.freeze_llm=true", lambda c: c.freeze.freeze_llm, True),
    ("freeze.unfreeze_lm_head=YES", lambda c: c.freeze.unfreeze_lm_head, True),
    ("data.meta=/data/meta.json", lambda c: c.data.meta, "/data/meta.json"),  # str
    ("data.v2pe=", lambda c: c.data.v2pe, ""),  # an empty str
    ("data.v2pe=random", lambda c: c.data.v2pe, "random"),
    ("data.loss_weighting=sample", lambda c: c.data.loss_weighting, "sample"),
])
def test_override_parses_the_field_type(override, read, value):
    got = read(apply_overrides(BASE, [override]))
    assert got == value and type(got) is type(value)


def test_rule_tables_come_from_the_command_line_as_python_literals():
    cfg = apply_overrides(BASE, ["optim.lr_rules=[['^vision/', 0.0], ['^projector/', 10.0, [0, None]]]",
                                 "optim.decay_rules=(('bias$', False),)"])
    assert cfg.optim.lr_rules == (("^vision/", 0.0), ("^projector/", 10.0, (0, None)))
    assert cfg.optim.decay_rules == (("bias$", False),)
    assert apply_overrides(cfg, ["optim.lr_rules=()"]).optim.lr_rules == ()


def test_overrides_apply_in_order():
    assert apply_overrides(BASE, ["steps=5", "steps=7"]).steps == 7


@pytest.mark.parametrize("override, named", [
    ("stepz=1", "'stepz'"),  # unknown key
    ("optim.lrr=1e-4", "'optim.lrr'"),  # unknown nested key
    ("data.nope.deeper=1", "'data.nope.deeper'"),
    ("steps.inner=1", "'steps.inner'"),  # a plain field is not a group
    ("optim=1e-4", "optim"),  # a group is not a value
    ("steps=1.5", "steps=1.5"),  # a float for an int
    ("steps=ten", "steps=ten"),
    ("optim.lr=fast", "optim.lr=fast"),  # not a float
    ("data.packing=maybe", "data.packing=maybe"),  # not a bool
    ("optim.lr_rules=x", "optim.lr_rules"),  # not a literal
    ("optim.lr_rules=3", "optim.lr_rules"),  # a literal, not a table
    ("optim.lr_rules=(('[', 1.0),)", "optim.lr_rules"),  # OptimConfig's own check: a bad regex
    ("optim.decay_rules=(('^vision/', 'no'),)", "optim.decay_rules"),  # decay must be a bool
    ("steps", "'steps'"),  # no '='
    ("=3", "'=3'"),  # no key
])
def test_bad_override_raises_naming_it(override, named):
    with pytest.raises(ConfigError) as err:
        apply_overrides(BASE, [override])
    assert named in str(err.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        apply_overrides(BASE, ["optim.lrr=1e-4"])


def test_unknown_preset_and_bad_file_raise(tmp_path):
    with pytest.raises(ConfigError, match="internvl2_5_stage3"):
        load_train_config("internvl2_5_stage3")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="CONFIG"):
        load_train_config(str(empty))
    own = tmp_path / "mine.py"
    own.write_text("from train.config import TrainConfig\nCONFIG = TrainConfig(name='mine', steps=3)\n")
    assert load_train_config(str(own)) == TrainConfig(name="mine", steps=3)


MESH_8 = {"data": 1, "fsdp": 8, "tensor": 1}
MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("rows, accum, sizes, rules, shards", [
    (12, 1, MESH_8, "fsdp", 8),  # 12 rows over 8 devices
    (8, 2, MESH_8, "fsdp", 8),  # 8 rows, but micro-batches of 4
    (12, 3, MESH_222, "dp", 8),  # dp splits the batch over tensor too
    (6, 1, MESH_222, "fsdp_tp", 4),  # fsdp_tp: over data x fsdp only
])
def test_rows_that_do_not_split_over_the_batch_shards_raise(rows, accum, sizes, rules, shards):
    from train.config import check_batch_split

    cfg = apply_overrides(BASE, [f"data.rows={rows}", f"accum_steps={accum}", f"rules={rules}"])
    with pytest.raises(ConfigError) as err:
        check_batch_split(cfg, sizes)
    message = str(err.value)
    assert f"data.rows={rows}" in message and f"{shards} batch shards" in message and cfg.mesh in message
    assert f"expected data.rows a multiple of {shards * accum}" in message
    check_batch_split(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, rows=shards * accum)), sizes)


def test_adapter_layout_is_hf_or_original_and_original_refuses_split_vit_adapters(tmp_path):
    """The PEFT adapter's module names (``lora.adapter_layout``): an unknown layout, and ``vit_split`` (q/k/v
    adapted apart) with the original layout, whose ``attn.qkv`` PEFT adapts whole, fail before anything loads."""
    from train.config import validate

    (tmp_path / "meta.json").write_text("{}")
    base = apply_overrides(load_train_config("internvl2_5_stage2"),
                           [f"workdir={tmp_path}", f"init={tmp_path}", f"data.meta={tmp_path / 'meta.json'}"])
    with pytest.raises(ConfigError, match=r"lora.adapter_layout='peft': expected hf or original"):
        validate(apply_overrides(base, ["lora.rank=4", "lora.adapter_layout=peft"]))
    with pytest.raises(ConfigError, match=r"lora.adapter_layout=original with lora.targets=vit_split,llm"):
        validate(apply_overrides(base, ["lora.rank=4", "lora.targets=vit_split,llm", "lora.adapter_layout=original"]))
    for fine in (["lora.targets=vit_split,llm"], ["lora.targets=vit,llm", "lora.adapter_layout=original"]):
        validate(apply_overrides(base, ["lora.rank=4", *fine]))
