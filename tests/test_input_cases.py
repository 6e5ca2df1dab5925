"""Inputs that used to pass silently or with a half-told error: a truncated video, a follow-up turn with a new image
but no placeholder, a checkpoint whose tokenizer and config disagree on the IMG_CONTEXT id."""

import json

import av
import numpy as np
import pytest
from PIL import Image

from internvl_jax.config import ConfigError, to_hf_dict, to_original_dict
from internvl_jax.presets import get_preset
from internvl_jax.processing.processor import Processor
from internvl_jax.processing.video import frame_indices, load_video
from test_tokenizer import write_bpe_folder


def _truncated_video(path, frames=50, keep=0.5):
    """An mp4 whose header (written first: faststart) states ``frames`` frames, cut to ``keep`` of its bytes."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(frames):
            image = np.full((48, 64, 3), 16 + 4 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return str(path)


def test_a_truncated_video_warns_with_the_frames_found(tmp_path):
    path = _truncated_video(tmp_path / "cut.mp4")
    with pytest.warns(UserWarning, match=r"cut.mp4: the video states 50 frames but only (\d+) decode") as record:
        frames, indices = load_video(path, num_segments=8)
    found = int(str(record[0].message).split("only ")[1].split()[0])
    assert 0 < found < 50 and indices == frame_indices(found, 25, num_segments=8) and len(frames) == 8


@pytest.fixture
def folder(tmp_path):
    """A transformers-native config and a tokenizer that agree on the IMG_CONTEXT id."""
    tok = write_bpe_folder(tmp_path)
    config = get_preset("InternVL3-1B").replace(image_token_id=tok.token_to_id("<IMG_CONTEXT>"))
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(config)))
    return tmp_path


def test_a_follow_up_turn_with_a_new_image_asks_for_its_placeholder(folder):
    proc = Processor.from_pretrained(str(folder))
    image = Image.new("RGB", (448, 448))
    with pytest.raises(ValueError, match=r"a follow-up turn with 1 image\(s\) .* needs an <image> placeholder"):
        proc("and this one?", images=[image], history=[("hello", "hi")])
    out = proc("<image>\nand this one?", images=[image], history=[("hello", "hi")])  # as the message says
    assert int(out["tile_mask"].sum()) == 1


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_img_context_ids_that_disagree_name_both_and_their_sources(folder, layout):
    tokenizer_id = Processor.from_pretrained(str(folder)).tokenizer.img_context_id
    write, key = {"hf": (to_hf_dict, "image_token_id"), "original": (to_original_dict, "img_context_token_id")}[layout]
    (folder / "config.json").write_text(json.dumps(write(get_preset("InternVL3-1B").replace(image_token_id=7))))
    with pytest.raises(ConfigError) as error:
        Processor.from_pretrained(str(folder))
    assert f"config.json's {key} is 7, the tokenizer's <IMG_CONTEXT> is {tokenizer_id}" in str(error.value)
    assert str(folder) in str(error.value)
