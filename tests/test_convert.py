"""`internvl-jax convert`: safetensors (either layout) -> orbax, read back by load_pretrained; every bad input gives
a one-line error naming the problem and leaves nothing behind; loading onto an FSDP mesh places each tensor in
its rule's sharding."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import sharding
from convert.load import load_pretrained
from internvl_jax.cli import main
from internvl_jax.model import abstract_params
from original_layout import original_checkpoint
from reference import image_batch, max_diff, tiny_internvl

TILES = [[2, 3], [1]]


def _hf_checkpoint(folder):
    tiny_internvl("qwen2").save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")  # a side file that must travel with the params
    return folder


def _equal_trees(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("case", ["hf-qwen2", "original-internlm2"])
def test_convert_then_load_gives_the_same_params(tmp_path, case):
    src = tmp_path / "src"
    if case == "hf-qwen2":
        _hf_checkpoint(src)
    else:
        original_checkpoint("internlm2", src)
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 0
    assert os.path.isdir(tmp_path / "dst" / "params")
    assert json.loads((tmp_path / "dst" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    if case == "hf-qwen2":
        assert (tmp_path / "dst" / "tokenizer_config.json").exists()
    model, params = load_pretrained(str(src))
    model2, params2 = load_pretrained(str(tmp_path / "dst"))
    assert model2.config == model.config
    _equal_trees(params2, params)
    ids, _, pixels, mask = image_batch(TILES, length=48, max_tiles=6)
    np.testing.assert_array_equal(model2.apply({"params": params2}, ids, pixels, mask),
                                  model.apply({"params": params}, ids, pixels, mask))


def test_convert_dtype_casts_each_tensor(tmp_path):
    src = _hf_checkpoint(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "dst"), "--dtype", "bfloat16"]) == 0
    _, stored = load_pretrained(str(tmp_path / "dst"), dtype=jnp.bfloat16)
    _, expected = load_pretrained(str(src), dtype=jnp.bfloat16)
    _equal_trees(stored, expected)


def _run_convert(capsys, *args):
    code = main(["convert", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return code, err


def _no_leftovers(parent, *expected):
    assert sorted(p.name for p in parent.iterdir()) == sorted(expected)


def _edit_tensors(src, edit):
    from safetensors.numpy import load_file

    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")


def _break(kind, src):
    """Damage a good transformers-layout checkpoint in one way; returns the message the error must contain."""
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    if kind == "missing tensor":
        _edit_tensors(src, lambda t: t.pop(key))
        return "tensors missing from the checkpoint for: language_model/layers/mlp/up_proj/kernel"
    if kind == "unexpected tensor":
        _edit_tensors(src, lambda t: t.update({"language_model.model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
        return "unexpected tensors in the checkpoint: language_model.model.layers.0.mlp.extra.weight"
    if kind == "shape mismatch":
        _edit_tensors(src, lambda t: t.update({key: np.zeros((128, 60), np.float32)}))
        return f"tensor {key} has shape [128, 60], which does not fit language_model/layers/mlp/up_proj/kernel (expected [128, 64] as stored, for [64, 128] from the config"
    if kind == "unsupported architecture":
        config = json.loads((src / "config.json").read_text())
        config["text_config"]["model_type"] = "mixtral"
        config["text_config"]["architectures"] = ["MixtralForCausalLM"]
        (src / "config.json").write_text(json.dumps(config))
        return "unsupported LLM architecture ['MixtralForCausalLM']"
    if kind == "corrupt header":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
        return "corrupt safetensors header"
    if kind == "truncated file":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
        return "corrupt or truncated file"
    if kind == "index names a missing shard":
        os.rename(src / "model.safetensors", src / "model-00001-of-00002.safetensors")
        weight_map = {"language_model.model.norm.weight": "model-00002-of-00002.safetensors"}
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return "model.safetensors.index.json names missing shard(s): model-00002-of-00002.safetensors"
    raise AssertionError(kind)


ERRORS = ["missing tensor", "unexpected tensor", "shape mismatch", "unsupported architecture", "corrupt header",
          "truncated file", "index names a missing shard"]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return _hf_checkpoint(tmp_path_factory.mktemp("good") / "src")


@pytest.mark.parametrize("kind", ERRORS)
def test_bad_checkpoint_gives_one_line_error_and_no_output(tmp_path, capsys, good_checkpoint, kind):
    src = tmp_path / "src"
    shutil.copytree(good_checkpoint, src)
    expected = _break(kind, src)
    code, err = _run_convert(capsys, src, tmp_path / "dst")
    assert code == 2
    assert err.startswith("internvl-jax convert: error: ") and "\n" not in err, err
    assert expected in err, err
    _no_leftovers(tmp_path, "src")


def test_existing_destination_needs_overwrite(tmp_path, capsys, good_checkpoint):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_text("x")
    code, err = _run_convert(capsys, good_checkpoint, tmp_path / "dst")
    assert code == 2 and f"destination {tmp_path / 'dst'} already exists (pass --overwrite to replace it)" in err
    assert os.listdir(tmp_path / "dst") == ["keep"]
    assert _run_convert(capsys, good_checkpoint, tmp_path / "dst", "--overwrite")[0] == 0
    assert "params" in os.listdir(tmp_path / "dst")
    _no_leftovers(tmp_path, "dst")


@pytest.mark.parametrize("source", ["safetensors", "orbax"])
def test_loading_onto_an_fsdp_mesh_places_every_tensor_by_the_rules(tmp_path, good_checkpoint, source):
    path = good_checkpoint
    if source == "orbax":
        path = tmp_path / "dst"
        assert main(["convert", str(good_checkpoint), str(path)]) == 0
    mesh = sharding.make_mesh(1, 8, 1)
    model, params = load_pretrained(str(path), mesh=mesh, rules="fsdp")
    expected = sharding.shardings(abstract_params(model.config, boxed=True), mesh, "fsdp")
    jax.tree_util.tree_map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"), params, expected)
    kernel = params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (2, 64 // 8, 128)
    _, plain = load_pretrained(str(good_checkpoint))
    _equal_trees(params, plain)
    ids, _, pixels, mask = image_batch(TILES, length=48, max_tiles=6)
    ids, pixels, mask = (np.concatenate([x] * 4) for x in (ids, pixels, mask))  # 8 rows, one per device
    batch = sharding.shard_batch({"ids": ids, "pixels": pixels, "mask": mask}, mesh, "fsdp")
    with sharding.activate(mesh, "fsdp"):
        sharded = jax.jit(lambda p, b: model.apply({"params": p}, b["ids"], b["pixels"], b["mask"]))(params, batch)
    assert max_diff(sharded, model.apply({"params": plain}, ids, pixels, mask)) <= 1e-5


def test_export_from_a_converted_folder_round_trips_with_side_files(tmp_path, good_checkpoint):
    from safetensors.numpy import load_file

    assert main(["convert", str(good_checkpoint), str(tmp_path / "orbax")]) == 0
    assert main(["export", str(tmp_path / "orbax"), str(tmp_path / "out"), "--layout", "hf", "--dtype", "float32"]) == 0
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    source, exported = load_file(good_checkpoint / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(exported) == sorted(source)
    for key in source:
        np.testing.assert_array_equal(exported[key], source[key], err_msg=key)
