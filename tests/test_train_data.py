"""Training data: the InternVL meta format, repeat_time, the four sample kinds, bad records, JPEG augmentation,
positions, and parity with the inference Processor.

References are built independently in each test: hand-written line lists for repeat_time, processing.sft_labels
on hand-expanded messages for labels, the Processor for the prompt part, PyAV decoding of every frame for
videos, PIL JPEG round trips for the augmentation. Arrays that come from the same code path are compared
exactly; nothing here has a tolerance.
"""

import dataclasses
import json

import av
import numpy as np
import pytest
from PIL import Image
from test_tokenizer import write_bpe_folder
from test_video import FPS, N_FRAMES, _write_video

from internvl_jax.presets import get_preset
from internvl_jax.processing import (
    IGNORE_INDEX, Processor, Tokenizer, expand_image_tokens, get_template, normalize, pil_tiles, plan_tiles,
    sft_labels, training_frame_indices, v2pe_positions,
)
from train.data.meta import DatasetSpec, MetaError, Record, read_meta, records
from train.data.sample import JPEG_QUALITIES, SampleSettings, Skipped, jpeg_reencode, prepare

CONFIG = get_preset("tiny-qwen2")  # 28 px tiles, 1 token per tile, up to 12 tiles + thumbnail
S = CONFIG.image_size


def _photo(w, h, seed):
    """A smooth random image (a few low-frequency waves per channel), photo-like for JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    waves = [np.sin(2 * np.pi * (rng.uniform(0, 2) * x + rng.uniform(0, 2) * y + rng.uniform())) for _ in range(3)]
    return Image.fromarray(np.stack([127.5 + 100 * w_ for w_ in waves], -1).astype(np.uint8))


def _jsonl(path, items):
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def _turns(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A meta file with one dataset of each kind, plus the files the bad records point at."""
    d = tmp_path_factory.mktemp("data")
    (d / "images").mkdir()
    _photo(84, 28, 0).save(d / "images" / "wide.png")  # 3x1 grid + thumbnail
    _photo(28, 56, 1).save(d / "images" / "tall.png")  # 1x2 grid + thumbnail
    _photo(40, 40, 2).save(d / "images" / "square.png")
    (d / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _write_video(d / "images" / "clip.mp4", "mpeg4", {"qmin": "1", "qmax": "2"})
    (d / "images" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    _jsonl(d / "single.jsonl", [{"image": "wide.png", "conversations": _turns("what is in this photo", "two cats")}])
    _jsonl(d / "multi.jsonl", [{
        "image": ["wide.png", "tall.png"],
        "conversations": _turns("Image-1: <image>\nImage-2: <image>\ndescribe", "a red mat", "what is blue", "the dog"),
    }])
    _jsonl(d / "video.jsonl", [{"video": "clip.mp4", "conversations": _turns("<video>\nwhat happens", "the cat sat")}])
    _jsonl(d / "text.jsonl", [{"conversations": _turns("hello world", "hello")}])
    meta = {
        "single": {"root": "images", "annotation": "single.jsonl", "repeat_time": 1, "data_augment": False},
        "multi": {"root": "images", "annotation": "multi.jsonl", "max_dynamic_patch": 4},
        "video": {"root": "images", "annotation": "video.jsonl", "length": 1},
        "text": {"annotation": "text.jsonl", "weight": 2.5},
    }
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_bpe_folder(folder)
    return Tokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def settings(tokenizer):
    return SampleSettings.from_config(CONFIG, tokenizer, get_template("internvl2_5"))


@pytest.fixture(scope="module")
def specs(data):
    return {spec.name: spec for spec in read_meta(data / "meta.json")}


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def _one(spec, settings, seed=0):
    (record,) = records(spec)
    return prepare(record, spec, settings, np.random.default_rng(seed))


# --------------------------------------------------------------------------------------------- meta


def test_meta_resolves_paths_against_its_folder_and_fills_defaults(data, specs):
    assert list(specs) == ["single", "multi", "video", "text"]  # the file's order
    single, multi, video, text = specs.values()
    assert single.annotation == str(data / "single.jsonl") and single.root == str(data / "images")
    assert (single.repeat_time, single.data_augment, single.max_dynamic_patch) == (1.0, False, None)
    assert single.weight is None
    assert multi.max_dynamic_patch == 4 and video.length == 1 and text.weight == 2.5
    assert text.root == str(data)  # no root: the meta file's folder


@pytest.mark.parametrize("entry, key, expected", [
    ({"root": "."}, "annotation", "missing the required key"),
    ({"annotation": "nope.jsonl"}, "annotation", "file not found"),
    ({"annotation": "a.jsonl", "repeat_time": 0}, "repeat_time", "a number > 0"),
    ({"annotation": "a.jsonl", "repeat_time": "2"}, "repeat_time", "a number > 0"),
    ({"annotation": "a.jsonl", "repeat_time": 1.5}, "repeat_time", "whole number"),
    ({"annotation": "a.jsonl", "data_augment": "yes"}, "data_augment", "true or false"),
    ({"annotation": "a.jsonl", "max_dynamic_patch": 0}, "max_dynamic_patch", "an integer >= 1"),
    ({"annotation": "a.jsonl", "weight": -1}, "weight", "a number > 0"),
    ({"annotation": "a.jsonl", "repeat_times": 2}, "repeat_times", "unknown key"),
])
def test_meta_errors_name_the_file_the_dataset_and_the_key(tmp_path, entry, key, expected):
    _jsonl(tmp_path / "a.jsonl", [{"conversations": _turns("q", "a")}])
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"ds1": entry}))
    with pytest.raises(MetaError) as e:
        read_meta(path)
    assert str(path) in str(e.value) and "'ds1'" in str(e.value) and key in str(e.value) and expected in str(e.value)


def test_meta_rejects_duplicate_names_and_non_objects(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"a": {"annotation": "x.jsonl"}, "a": {"annotation": "y.jsonl"}}')
    with pytest.raises(MetaError, match="'a' appears twice"):
        read_meta(path)
    path.write_text("[1, 2]")
    with pytest.raises(MetaError, match="expected an object"):
        read_meta(path)


# --------------------------------------------------------------------------------------------- repeat_time


@pytest.mark.parametrize("repeat_time, expected_lines", [
    # the original: lines[:int(len(lines) * repeat_time)] over all 10 file lines (line 4 blank), then blank
    # lines fail when drawn; here they are dropped after the prefix
    (1, [1, 2, 3, 5, 6, 7, 8, 9, 10]),
    (0.35, [1, 2, 3]),  # int(3.5) = 3
    (0.5, [1, 2, 3, 5]),  # 5 file lines, one blank
    (0.05, []),  # int(0.5) = 0
    (2, [1, 2, 3, 5, 6, 7, 8, 9, 10] * 2),  # the whole file again, in order
])
def test_repeat_time_subsamples_a_prefix_and_repeats_whole_files(tmp_path, repeat_time, expected_lines):
    lines = [f'{{"n": {i}}}' if i != 4 else "  " for i in range(1, 11)]
    path = _jsonl(tmp_path / "d.jsonl", lines)
    spec = DatasetSpec("d", str(path), str(tmp_path), repeat_time=repeat_time)
    got = records(spec)
    assert [r.line for r in got] == expected_lines
    assert all(r.dataset == "d" and json.loads(r.text) == {"n": r.line} for r in got)


# --------------------------------------------------------------------------------------------- the four kinds


def test_all_four_kinds_from_the_meta_file(specs, settings, tokenizer):
    out = {name: _one(spec, settings) for name, spec in specs.items()}
    expected_tiles = {
        "single": 3 + 1,  # 84x28 -> 3x1 grid + thumbnail
        "multi": (2 + 1) + (2 + 1),  # meta max_dynamic_patch 4 -> 2 per image: 2x1 and 1x2, + thumbnails
        "text": 0,
    }
    n_frames = out["video"]["pixel_values"].shape[0]
    assert settings.min_num_frames <= n_frames <= settings.max_num_frames
    expected_tiles["video"] = n_frames  # one tile per frame
    for name, sample in out.items():
        assert not isinstance(sample, Skipped), sample
        ids, k = sample["input_ids"], expected_tiles[name]
        assert sample["pixel_values"].shape == (k, S, S, 3) and sample["pixel_values"].dtype == np.uint8
        assert ids.dtype == sample["labels"].dtype == np.int32 and ids.shape == sample["labels"].shape
        assert int((ids == tokenizer.img_context_id).sum()) == k * CONFIG.tokens_per_tile
        assert (sample["dataset"], sample["line"]) == (name, 1)
    text = {name: _decode(tokenizer, s["input_ids"]) for name, s in out.items()}
    assert "<|im_start|>user\n<img>" in text["single"]  # one image and no placeholder: <image>\n in front
    assert "Image-1: <img>" in text["multi"] and "</img>\nImage-2: <img>" in text["multi"]
    frames = "\n".join(f"Frame-{i}: <img><IMG_CONTEXT></img>" for i in range(1, n_frames + 1))
    assert f"<|im_start|>user\n{frames}\nwhat happens<|im_end|>" in text["video"]
    assert "<img>" not in text["text"]


def test_labels_are_sft_labels_of_the_expanded_conversation(specs, settings, tokenizer):
    sample = _one(specs["multi"], settings)
    template = get_template("internvl2_5")
    first = expand_image_tokens("Image-1: <image>\nImage-2: <image>\ndescribe", [3, 3], 1)
    messages = [{"role": r, "content": c} for r, c in
                zip(["user", "assistant"] * 2, [first, "a red mat", "what is blue", "the dog"])]
    ids, labels = sft_labels(template, messages, tokenizer)
    np.testing.assert_array_equal(sample["input_ids"], ids)
    np.testing.assert_array_equal(sample["labels"], labels)
    supervised = _decode(tokenizer, sample["input_ids"][sample["labels"] != IGNORE_INDEX])
    assert supervised == "a red mat<|im_end|>the dog<|im_end|>"


def test_a_system_turn_replaces_the_system_message(settings, tokenizer, tmp_path):
    spec = DatasetSpec("d", str(tmp_path / "d.jsonl"), str(tmp_path))
    line = json.dumps({"conversations": [{"from": "system", "value": "be brief"}] + _turns("hello", "hi")})
    sample = prepare(Record("d", 1, line), spec, settings, np.random.default_rng(0))
    assert _decode(tokenizer, sample["input_ids"]).startswith("<|im_start|>system\nbe brief<|im_end|>\n")


@pytest.mark.parametrize("name, v2pe", [("single", None), ("multi", 64.0)])
def test_prompt_part_and_tiles_equal_the_processors(specs, settings, tokenizer, data, name, v2pe):
    """The inference Processor on the record's first question gives the first len(prompt) ids of the sample,
    the same V2PE positions there, and bit-identical tiles (the sample's uint8 levels, normalised as the
    Processor normalises)."""
    spec = specs[name]
    item = json.loads(records(spec)[0].text)
    paths = [item["image"]] if isinstance(item["image"], str) else item["image"]
    config = CONFIG.replace(image_token_id=tokenizer.img_context_id)  # as Processor.from_pretrained does
    proc = Processor(tokenizer, config, get_template("internvl2_5"), v2pe_stride=v2pe)
    ref = proc(item["conversations"][0]["value"], images=[data / "images" / p for p in paths],
               max_tiles=spec.max_dynamic_patch)
    sample = _one(spec, SampleSettings.from_config(CONFIG, tokenizer, get_template("internvl2_5"), v2pe=v2pe))
    m, k = ref["input_ids"].shape[1], int(ref["tile_mask"].sum())
    np.testing.assert_array_equal(sample["input_ids"][:m], ref["input_ids"][0])
    np.testing.assert_array_equal(normalize(sample["pixel_values"]), ref["pixel_values"][0, :k])
    assert (sample["labels"][:m] == IGNORE_INDEX).all() and sample["labels"][m] != IGNORE_INDEX
    if v2pe is not None:
        np.testing.assert_array_equal(sample["positions"][:m], ref["positions"][0])


def _all_frames(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _frame_tiles(frames):
    one = plan_tiles(frames.shape[2], frames.shape[1], dynamic=False, use_thumbnail=False)
    return np.concatenate([pil_tiles(Image.fromarray(f), one, S) for f in frames])


@pytest.mark.parametrize("clip", [None, [0.4, 1.2]])
def test_video_frames_are_the_training_draw(data, settings, tmp_path, clip):
    """Frame count uniform in 8..32, then training_frame_indices, from the same Generator; with a clip of
    (t0, t1) s, int((t1 - t0) * fps) frames from int(t0 * fps), as the original's decord reader."""
    seed = 3
    rng = np.random.default_rng(seed)
    t = int(rng.integers(8, 33))
    first, length = (0, N_FRAMES) if clip is None else (int(clip[0] * FPS), int((clip[1] - clip[0]) * FPS))
    indices = [first + i for i in training_frame_indices(length, t, rng)]
    spec = DatasetSpec("v", str(tmp_path / "v.jsonl"), str(data / "images"))
    line = json.dumps({"video": "clip.mp4", "clip": clip, "conversations": _turns("what happens", "it moves")})
    sample = prepare(Record("v", 1, line), spec, settings, np.random.default_rng(seed))
    expected = _frame_tiles(_all_frames(data / "images" / "clip.mp4")[indices])
    np.testing.assert_array_equal(sample["pixel_values"], expected)


def test_a_frame_folder_gives_its_frames_in_number_order(settings, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    levels = {n: 20 * n for n in (1, 2, 10)}  # frame_10 sorts after frame_2 by number, before it by name
    for n, level in levels.items():
        Image.new("RGB", (30, 20), (level,) * 3).save(folder / f"frame_{n}.jpg", quality=100)
    spec = DatasetSpec("v", str(tmp_path / "v.jsonl"), str(tmp_path))
    line = json.dumps({"video": "frames", "conversations": _turns("what", "grey")})
    sample = prepare(Record("v", 1, line), spec, settings, np.random.default_rng(0))  # 8+ frames drawn, 3 exist
    grey = sample["pixel_values"][..., 0].mean(axis=(1, 2))
    np.testing.assert_allclose(grey, [20, 40, 200], atol=2)  # JPEG of a flat grey: within 2 levels


# --------------------------------------------------------------------------------------------- augmentation


def test_jpeg_augmentation_per_tile_reproducible_and_bounded(specs, settings, data):
    spec = specs["single"]
    plain = _one(spec, settings, seed=1)["pixel_values"]
    augmented_spec = dataclasses.replace(spec, data_augment=True)
    a, b, c = (_one(augmented_spec, settings, seed=s)["pixel_values"] for s in (1, 1, 2))
    # reference: each uint8 tile through PIL JPEG at its own quality, qualities drawn 75..100 inclusive
    assert JPEG_QUALITIES == range(75, 101)
    uint8 = pil_tiles(Image.open(data / "images" / "wide.png"), plan_tiles(84, 28, tile_size=S), S)
    qualities = np.random.default_rng(1).integers(75, 101, size=len(uint8))
    np.testing.assert_array_equal(a, np.stack([jpeg_reencode(t, q) for t, q in zip(uint8, qualities)]))
    np.testing.assert_array_equal(a, b)  # the seed reproduces it
    assert not np.array_equal(a, c) and not np.array_equal(a, plain)
    # JPEG at quality >= 75 moves a smooth image by a few levels on average (1.9 here); tiles stay in range
    levels = np.abs(a.astype(np.int16) - plain)
    assert a.dtype == np.uint8 and 0 < levels.mean() < 4
    off = _one(augmented_spec, dataclasses.replace(settings, data_augment=False), seed=1)
    np.testing.assert_array_equal(off["pixel_values"], plain)  # the master switch (evaluation)


def test_video_frames_are_jpeg_encoded_before_the_resize(data, settings, tmp_path):
    seed = 5
    rng = np.random.default_rng(seed)
    t = int(rng.integers(8, 33))
    indices = training_frame_indices(N_FRAMES, t, rng)
    frames = _all_frames(data / "images" / "clip.mp4")[indices]
    qualities = rng.integers(75, 101, size=t)
    expected = _frame_tiles(np.stack([jpeg_reencode(f, q) for f, q in zip(frames, qualities)]))
    spec = DatasetSpec("v", str(tmp_path / "v.jsonl"), str(data / "images"), data_augment=True)
    line = json.dumps({"video": "clip.mp4", "conversations": _turns("what happens", "it moves")})
    sample = prepare(Record("v", 1, line), spec, settings, np.random.default_rng(seed))
    np.testing.assert_array_equal(sample["pixel_values"], expected)


# --------------------------------------------------------------------------------------------- positions


def test_positions_integer_fixed_v2pe_and_random_v2pe(specs, settings, tokenizer):
    spec = specs["multi"]
    plain = _one(spec, settings)
    ids = plain["input_ids"]
    assert plain["positions"].dtype == np.int32
    np.testing.assert_array_equal(plain["positions"], np.arange(len(ids)))
    ctx = tokenizer.img_context_id
    fixed = _one(spec, dataclasses.replace(settings, v2pe=16.0))["positions"]
    assert fixed.dtype == np.float32
    np.testing.assert_array_equal(fixed, v2pe_positions(ids, ctx, 16.0, tokens_per_tile=1))
    random_settings = dataclasses.replace(settings, v2pe="random")
    drawn = _one(spec, random_settings, seed=7)["positions"]
    expected = v2pe_positions(ids, ctx, None, tokens_per_tile=1, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(drawn, expected)


# --------------------------------------------------------------------------------------------- bad records


BAD = {
    "not JSON": ('{"conversations": [', "not JSON"),
    "not an object": ("[1, 2]", "not an object"),
    "no conversations": ({"image": "wide.png"}, "no 'conversations'"),
    "not alternating": ({"conversations": _turns("q", "a")[:1] * 2}, "turn 1 is from 'human', expected 'gpt'"),
    "gpt first": ({"conversations": _turns("q", "a")[::-1]}, "turn 0 is from 'gpt', expected 'human'"),
    "no answer": ({"conversations": _turns("q", "a", "q2")}, "the last turn is from 'human'"),
    "missing image": ({"image": "gone.png", "conversations": _turns("q", "a")}, "image not found"),
    "unreadable image": ({"image": "broken.png", "conversations": _turns("q", "a")}, "cannot read image"),
    "missing video": ({"video": "gone.mp4", "conversations": _turns("q", "a")}, "video not found"),
    "corrupt video": ({"video": "broken.mp4", "conversations": _turns("q", "a")}, "cannot read video"),
    "fewer placeholders": (
        {"image": ["wide.png", "tall.png"], "conversations": _turns("<image>\nq", "a")},
        "1 <image> placeholders but the record has 2 images",
    ),
    "more placeholders": (
        {"image": "wide.png", "conversations": _turns("<image>\n<image>\nq", "a")}, "2 <image> placeholders",
    ),
    "placeholder in a text-only record": ({"conversations": _turns("<image>\nq", "a")}, "the record has no image"),
    "placeholder in an answer": ({"image": "wide.png", "conversations": _turns("q", "<image>")}, "an answer"),
    "own image tokens": ({"conversations": _turns("<IMG_CONTEXT> q", "a")}, "image token <IMG_CONTEXT>"),
    "bad image field": ({"image": 3, "conversations": _turns("q", "a")}, "'image' must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_are_skipped_with_their_reason(data, settings, case):
    item, reason = BAD[case]
    spec = DatasetSpec("bad", str(data / "single.jsonl"), str(data / "images"))
    text = item if isinstance(item, str) else json.dumps(item)
    out = prepare(Record("bad", 17, text), spec, settings, np.random.default_rng(0))
    assert isinstance(out, Skipped) and (out.dataset, out.line) == ("bad", 17) and reason in out.reason, out


def test_an_over_long_sample_is_skipped_under_a_no_split_limit(specs, settings):
    full = _one(specs["single"], settings)
    n = len(full["input_ids"])
    at_limit = dataclasses.replace(settings, max_tokens_no_split=n)
    assert not isinstance(_one(specs["single"], at_limit), Skipped)
    below = dataclasses.replace(settings, max_tokens_no_split=n - 1)
    out = _one(specs["single"], below)
    assert isinstance(out, Skipped) and f"{n} tokens, more than the no-split limit of {n - 1}" in out.reason


def test_bytes_that_are_not_utf8_become_a_skipped_record(tmp_path, settings):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"conversations": _turns("q", "a")}).encode() + b"\n" + b'{"x": "\xff"}\n')
    spec = DatasetSpec("d", str(path), str(tmp_path))
    good, bad = (prepare(r, spec, settings, np.random.default_rng(0)) for r in records(spec))
    assert not isinstance(good, Skipped)
    assert isinstance(bad, Skipped) and bad.line == 2 and "UTF-8" in bad.reason
