"""Processor: a checkpoint folder's template, tiling and tokenizer turned into the model's arrays."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

from internvl_jax.config import to_original_dict
from internvl_jax.model import InternVL, check_image_tokens, init_params
from internvl_jax.presets import get_preset
from internvl_jax.processing.processor import Processor
from test_tokenizer import write_bpe_folder
from test_video import _write_video


@pytest.fixture
def folder(tmp_path):
    tok = write_bpe_folder(tmp_path)
    config = to_original_dict(get_preset("InternVL2_5-1B").replace(image_token_id=tok.token_to_id("<IMG_CONTEXT>")))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _count(ids, proc):
    return int((ids == proc.tokenizer.img_context_id).sum())


def test_one_image_gets_its_tiles_and_the_templates_prompt(folder):
    proc = Processor.from_pretrained(str(folder))
    out = proc("describe the image", images=[Image.new("RGB", (800, 600), (200, 30, 30))])
    assert out["pixel_values"].shape == (1, 13, 448, 448, 3) and out["tile_mask"].all()  # 4x3 grid + thumbnail
    assert _count(out["input_ids"], proc) == 13 * 256
    text = proc.tokenizer.decode(out["input_ids"][0].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("describe the image<|im_end|>\n<|im_start|>assistant\n")
    assert "<img><IMG_CONTEXT>" in text and "</img>\ndescribe" in text


def test_resize_pil_is_the_originals_tiling_and_device_is_within_its_tolerance(folder):
    """The default (resize="pil") gives the original's PIL tiles normalised, bit for bit (what training gives);
    resize="device" the jitted path, within test_pixels' bound (2 levels); another value is refused."""
    from internvl_jax.processing import normalize, pil_tiles, plan_tiles
    from internvl_jax.samples import photo_like
    from test_pixels import MAX_DIFF

    image = Image.fromarray(photo_like(700, 500, seed=3))
    pil = Processor.from_pretrained(str(folder))("describe", images=[image])
    expected = normalize(pil_tiles(image, plan_tiles(700, 500)))
    np.testing.assert_array_equal(pil["pixel_values"][0, :len(expected)], expected)
    device = Processor.from_pretrained(str(folder), resize="device")("describe", images=[image])
    np.testing.assert_array_equal(device["input_ids"], pil["input_ids"])
    levels = np.abs(device["pixel_values"] - pil["pixel_values"]) * np.array([0.229, 0.224, 0.225])
    assert 0 < levels.max() <= MAX_DIFF + 1e-6
    with pytest.raises(ValueError, match=r"Processor resize='gpu': expected one of pil, device"):
        Processor.from_pretrained(str(folder), resize="gpu")


def test_several_images_share_the_tile_budget_and_are_labelled(folder):
    proc = Processor.from_pretrained(str(folder))
    images = [Image.new("RGB", (900, 300)), Image.new("RGB", (300, 300))]
    out = proc("compare", images=images)
    text = proc.tokenizer.decode(out["input_ids"][0].tolist(), skip_special_tokens=False)
    assert "Image-1: <img>" in text and "Image-2: <img>" in text
    n = int(out["tile_mask"].sum())
    assert n == 4 + 1 and _count(out["input_ids"], proc) == 256 * n  # 3x1 + thumbnail within 12 // 2; one tile
    assert out["pixel_values"].shape[1] == 8  # the tile bucket


def test_video_frames_one_tile_each(folder, tmp_path):
    path = tmp_path / "v.mp4"
    _write_video(path, "mpeg4")
    proc = Processor.from_pretrained(str(folder))
    out = proc("what happens", videos=[str(path)], num_segments=4)
    text = proc.tokenizer.decode(out["input_ids"][0].tolist(), skip_special_tokens=False)
    assert all(f"Frame{i}: <img>" in text for i in range(1, 5))
    assert int(out["tile_mask"].sum()) == 4 and _count(out["input_ids"], proc) == 4 * 256


def test_history_and_v2pe_positions(folder):
    proc = Processor.from_pretrained(str(folder), v2pe_stride=64)
    out = proc("and now?", images=[Image.new("RGB", (448, 448))], history=[("<image>\nhello", "hi")])
    text = proc.tokenizer.decode(out["input_ids"][0].tolist(), skip_special_tokens=False)
    assert "hello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>" in text
    pos = out["positions"][0]
    assert pos.shape == out["input_ids"][0].shape and np.all(np.diff(pos) > 0)
    assert pos[-1] < out["input_ids"].shape[1] - 1  # image tokens advanced by 1/4


def test_v2pe_follows_the_checkpoint_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["rope_scaling"] = {"type": "v2pe", "factor": 1.0}
    (folder / "config.json").write_text(json.dumps(config))
    out = Processor.from_pretrained(str(folder))("hi", images=[Image.new("RGB", (448, 448))])
    ids, pos = out["input_ids"][0], out["positions"][0]
    first = int(np.argmax(ids == Processor.from_pretrained(str(folder)).tokenizer.img_context_id))
    np.testing.assert_allclose(pos[first : first + 2] - pos[first - 1], [0.25, 0.5])  # stride 64 / 256 tokens


def test_clear_errors(folder):
    proc = Processor.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        proc("<image> what", images=[Image.new("RGB", (64, 64))] * 2)
    short = Processor.from_pretrained(str(folder), max_length=100)
    with pytest.raises(ValueError, match=r"more than the model's maximum of 100"):
        short("describe", images=[Image.new("RGB", (64, 64))])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "template": "nope"}))
    with pytest.raises(ValueError, match="nope"):
        Processor.from_pretrained(str(folder))


def test_processor_output_runs_in_a_model(folder):
    proc = Processor.from_pretrained(str(folder))
    out = proc("describe", images=[Image.new("RGB", (900, 450), (10, 200, 10))], max_tiles=2)
    tiny = get_preset("tiny-qwen2")
    config = tiny.replace(
        vision=dataclasses.replace(tiny.vision, image_size=448, num_layers=1),
        text=dataclasses.replace(tiny.text, vocab_size=512, max_position_embeddings=2048),
        image_token_id=proc.tokenizer.img_context_id,
    )
    check_image_tokens(out["input_ids"], out["tile_mask"], config.image_token_id, config.tokens_per_tile)
    logits = jax.jit(InternVL(config).apply)({"params": init_params(config, jax.random.PRNGKey(0))},
                                             out["input_ids"], out["pixel_values"], out["tile_mask"])
    assert logits.shape == (*out["input_ids"].shape, config.text.vocab_size) and np.isfinite(np.asarray(logits)).all()
