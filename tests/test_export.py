"""Both checkpoint layouts in and out: transformers-native round trips, original-layout checkpoints re-fused
here from transformers models (ViT qkv, InternLM2 grouped wqkv, Phi-3 fused projections), and models in memory
(``from_state_dict``) loaded as their saved folders are."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from convert.export import export_checkpoint
from convert.load import from_state_dict, load_pretrained
from convert.safetensors_io import CheckpointError
from original_layout import CASES, original_checkpoint
from reference import TOL_LOGITS, image_batch, max_diff, tiny_internvl

TILES = [[2, 3], [1]]


def _logits_torch(model, ids, torch_pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch_pixels).logits.numpy()


def _equal_trees(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True), a, b)


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("text,tie", [("qwen2", False), ("llama", True), ("qwen3", False)])
def test_transformers_layout_round_trip(tmp_path, text, tie):
    from transformers import InternVLForConditionalGeneration

    ref = tiny_internvl(text, tie=tie)
    ref.save_pretrained(tmp_path / "src")
    model, params = load_pretrained(str(tmp_path / "src"))
    export_checkpoint(params, model.config, str(tmp_path / "out"), layout="hf", max_shard_bytes=200_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # several shards were written
    src, out = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert sorted(out) == sorted(src)
    for key in src:
        assert out[key].dtype == src[key].dtype and torch.equal(out[key], src[key]), key
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, torch_pixels, _, _ = image_batch(TILES, length=48, max_tiles=6)
    assert max_diff(_logits_torch(back, ids, torch_pixels), _logits_torch(ref, ids, torch_pixels)) <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_original_layout_loads_and_exports_byte_identical(tmp_path, case):
    src = tmp_path / "src"
    ref, tensors = original_checkpoint(case, src)

    model, params = load_pretrained(str(src))
    ids, torch_pixels, pixels, mask = image_batch(TILES, length=48, max_tiles=6)
    got = model.apply({"params": params}, jnp.asarray(ids), pixels, mask)
    assert max_diff(got, _logits_torch(ref, ids, torch_pixels)) <= TOL_LOGITS

    export_checkpoint(params, model.config, str(tmp_path / "out"), layout="original")
    out = _tensors(tmp_path / "out")
    assert sorted(out) == sorted(tensors)
    for key, t in tensors.items():
        assert torch.equal(out[key], t), key
    assert load_pretrained(str(tmp_path / "out"))[0].config.text == model.config.text


def test_export_refuses_an_existing_destination_and_leaves_nothing_half_written(tmp_path):
    ref = tiny_internvl("qwen2")
    ref.save_pretrained(tmp_path / "src")
    model, params = load_pretrained(str(tmp_path / "src"))
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export_checkpoint(params, model.config, str(tmp_path / "out"))
    params["language_model"]["norm"]["scale"] = "not an array"  # fails half-way through the tensors
    with pytest.raises(Exception):
        export_checkpoint(params, model.config, str(tmp_path / "new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("tdtype,dtype", [(torch.float32, jnp.float32), (torch.bfloat16, jnp.bfloat16),
                                          (torch.float32, jnp.bfloat16)])
def test_a_transformers_model_in_memory_loads_as_its_saved_folder(tmp_path, tdtype, dtype):
    ref = tiny_internvl("llama", tie=True).to(tdtype)
    ref.save_pretrained(tmp_path)
    model, params = load_pretrained(str(tmp_path), dtype=dtype)
    got_model, got = from_state_dict(ref.state_dict(), ref.config.to_dict(), dtype=dtype)
    assert got_model.config == model.config
    _equal_trees(got, params)
    assert from_state_dict(ref.state_dict(), ref.config, dtype=dtype)[0].config == model.config  # the config object
    with torch.no_grad():  # our params are copies: they do not follow the torch model's later changes
        for p in ref.parameters():
            p.add_(1.0)
    _equal_trees(got, params)


def test_an_original_state_dict_in_memory_loads_as_its_saved_folder(tmp_path):
    _, tensors = original_checkpoint("internlm2", tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    model, params = load_pretrained(str(tmp_path / "src"))
    got_model, got = from_state_dict(tensors, config)
    assert got_model.config == model.config
    _equal_trees(got, params)
    numpy_tensors = {k: v.numpy() for k, v in tensors.items()}  # numpy arrays are read as well
    _equal_trees(from_state_dict(numpy_tensors, config)[1], params)

    unnamed = {k: v for k, v in config.items() if k != "img_context_token_id"}
    with pytest.raises(CheckpointError, match="image_token_id="):
        from_state_dict(tensors, unnamed)
    assert from_state_dict(tensors, unnamed, image_token_id=7)[0].config.image_token_id == 7
    with pytest.raises(CheckpointError, match="missing from the checkpoint for: language_model/layers/attn/o_proj"):
        from_state_dict({k: v for k, v in tensors.items() if k != "language_model.model.layers.1.attention.wo.weight"},
                        config)
