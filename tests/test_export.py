"""Both checkpoint layouts in and out: transformers-native round trips and original-layout checkpoints re-fused
here from transformers models (ViT qkv, InternLM2 grouped wqkv, Phi-3 fused projections)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from convert.export import export_checkpoint
from convert.load import load_pretrained
from convert.safetensors_io import CheckpointError
from original_layout import CASES, original_checkpoint
from reference import TOL_LOGITS, image_batch, max_diff, tiny_internvl

TILES = [[2, 3], [1]]


def _logits_torch(model, ids, torch_pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch_pixels).logits.numpy()


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
