"""InternVL 1.0 checkpoints through the converter: the original ``internvl_g`` layout -> orbax (``internvl-jax
convert``) -> our params -> the original layout again, bit-identical tensors and keys; a tied head as the config
says; the original's reload rules for the config; clear errors for tensors that do not fit."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.export import export_checkpoint
from convert.load import load_pretrained
from convert.safetensors_io import CheckpointError
from internvl_jax.cli import main
from internvl_jax.clip_config import ConfigError, clip_config_from_dict, load_clip_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "internvl1")


def _tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_round_trip_through_orbax_is_bit_identical(tmp_path):
    assert main(["convert", FIXTURE, str(tmp_path / "orbax")]) == 0
    model, params = load_pretrained(FIXTURE)
    model2, params2 = load_pretrained(str(tmp_path / "orbax"))
    assert model2.config == model.config
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params2, params)
    export_checkpoint(params2, model2.config, str(tmp_path / "out"), layout="internvl_g")
    _assert_same_tensors(_tensors(tmp_path / "out"), _tensors(FIXTURE))
    assert load_clip_config(str(tmp_path / "out")) == load_clip_config(FIXTURE)


def _tied_checkpoint(folder):
    """The fixture with QLLaMA's head tied, as LlamaConfig's default has it (no qllama.lm_head.weight stored)."""
    os.makedirs(folder)
    config = json.load(open(os.path.join(FIXTURE, "config.json")))
    del config["qllama_config"]["tie_word_embeddings"]
    config["tie_word_embeddings"] = False  # the original overrides the top level with qllama's flag
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    tensors = _tensors(FIXTURE)
    del tensors["qllama.lm_head.weight"]
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return tensors


def test_tied_head_follows_the_qllama_config(tmp_path):
    tensors = _tied_checkpoint(tmp_path / "tied")
    model, params = load_pretrained(str(tmp_path / "tied"))
    assert model.config.qllama.tie_word_embeddings and "lm_head" not in params["qllama"]
    export_checkpoint(params, model.config, str(tmp_path / "out"), layout="internvl_g")
    _assert_same_tensors(_tensors(tmp_path / "out"), tensors)
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert written["qllama_config"]["tie_word_embeddings"] is True and written["tie_word_embeddings"] is True


def test_config_follows_the_original_reload_rules():
    d = json.load(open(os.path.join(FIXTURE, "config.json")))
    d["qllama_config"].update(cross_attention_frequency=1, num_query_token=7, rope_theta=5e5)
    c = clip_config_from_dict(d)  # the top level wins (defaults 2 and 96), RoPE base fixed at 10000
    assert (c.cross_attention_frequency, c.num_query_token, c.qllama.rope.theta) == (2, 96, 10000.0)
    d["cross_attention_frequency"] = 1
    assert clip_config_from_dict(d).cross_attention_frequency == 1
    d["qllama_config"]["num_hidden_layers"] = 3
    d["cross_attention_frequency"] = 2
    with pytest.raises(ConfigError, match=r"num_hidden_layers \(3\) must be a multiple of cross_attention_frequency"):
        clip_config_from_dict(d)
    d["qllama_config"]["num_hidden_layers"] = "2"
    with pytest.raises(ConfigError, match="qllama_config.num_hidden_layers"):
        clip_config_from_dict(d)


def test_a_tensor_that_does_not_fit_names_itself(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "bad")
    tensors = _tensors(FIXTURE)
    tensors["qllama.model.layers.1.cross_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)  # an odd layer
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*qllama\.model\.layers\.1\.cross_attn\.q_proj"):
        load_pretrained(str(tmp_path / "bad"))
    del tensors["qllama.model.layers.1.cross_attn.q_proj.weight"]
    tensors["qllama.model.layers.0.cross_attn.k_proj.weight"] = np.zeros((64, 3200), np.float32)  # the 6B width
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"cross_attn\.k_proj\.weight has shape \[64, 3200\]"):
        load_pretrained(str(tmp_path / "bad"))


def test_export_refuses_a_layout_of_the_other_family():
    model, params = load_pretrained(FIXTURE)
    with pytest.raises(ValueError, match="use internvl_g"):
        export_checkpoint(params, model.config, "/nonexistent/out", layout="hf")


def test_loading_onto_a_mesh_places_each_tensor_in_its_sharding():
    import sharding

    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    _, params = load_pretrained(FIXTURE)
    _, placed = load_pretrained(FIXTURE, mesh=mesh, rules="fsdp")
    kernel = placed["qllama"]["blocks"]["layer_0"]["cross_attn"]["k_proj"]["kernel"]  # [blocks, vit_embed, ...]
    assert kernel.sharding.shard_shape(kernel.shape) == (1, 32 // mesh.size, 4, 16)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), placed, params)


def test_cli_export_writes_the_internvl_g_layout_and_refuses_the_others(tmp_path, capsys):
    assert main(["export", FIXTURE, str(tmp_path / "out"), "--layout", "internvl_g"]) == 0
    _assert_same_tensors(_tensors(tmp_path / "out"), _tensors(FIXTURE))
    capsys.readouterr()
    assert main(["export", FIXTURE, str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "internvl-jax export: error: layout 'hf' does not fit an InternVL 1.0 model: use internvl_g"
    assert not os.path.exists(tmp_path / "hf")
