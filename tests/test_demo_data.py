"""The demo's synthetic VQA set, tokenizer and model config (train/demo_data.py).

Answers are checked against the pixels of the written images, not against the generator's own record of the
scene: the colour at a shape's centre, the shape from how much of its box it fills, the count from the colours
present, the side from where the colour's pixels lie.
"""

import collections
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from internvl_jax.processing import Tokenizer, expand_image_tokens, get_template, plan_tiles, render, sft_labels
from internvl_jax.processing.templates import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from train.demo_data import (
    ANSWERS, BACKGROUND, COLOURS, COUNT_WORDS, MAX_TILES, QUESTION_KINDS, SHAPE_SIDES, SHAPES, SPECIAL_TOKENS, TEMPLATE,
    TILE, build_demo_tokenizer,
    demo_model_config, write_demo_dataset, write_demo_tokenizer,
)

META_KEYS = {"root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "length"}
# Share of its bounding box a shape fills: square, circle (pi / 4), triangle (1 / 2).
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
PALETTE = np.array([*COLOURS.values(), BACKGROUND], np.float32)
NAMES = [*COLOURS, "background"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    return write_demo_dataset(str(folder), train=300, heldout=100, seed=0)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_meta(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


NEAR = 60.0  # RGB distance: JPEG noise inside a shape stays well within it; edge blends lie farther from all


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 -> index into NAMES of the palette colour within NEAR, -1 where none is (edge blends)."""
    d = ((pixels[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return np.where(d.min(-1) < NEAR**2, d.argmin(-1), -1)


def read_pixels(demo, record) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB [H, W, 3], palette index [H, W]) of a record's image."""
    image = np.asarray(Image.open(os.path.join(demo.images, record["image"])).convert("RGB"))
    return image, nearest_colour(image)


def coverage(image: np.ndarray, box, colour: str) -> float:
    """Share of the box covered by the colour: each pixel's blend factor between background and colour."""
    x0, y0, x1, y1 = box
    ink = np.asarray(COLOURS[colour], np.float32) - np.asarray(BACKGROUND, np.float32)
    alpha = ((image[y0:y1, x0:x1].astype(np.float32) - BACKGROUND) @ ink) / (ink @ ink)
    return float(np.clip(alpha, 0.0, 1.0).mean())


def pixel_answer(kind: str, question: str, image: np.ndarray, labels: np.ndarray, record) -> str:
    """The answer of a question as read from the image (the record's boxes only say where to look)."""
    if kind == "count":
        present = [c for c in COLOURS if (labels == NAMES.index(c)).sum() >= 20]
        return ("one", "two", "three")[len(present) - 1]
    if kind == "shape":  # the share of its box each colour covers decides its shape: one kind for all of them
        fills = {coverage(image, s["box"], s["colour"]) for s in record["scene"]}
        kinds = {min(FILL, key=lambda k: abs(FILL[k] - fill)) for fill in fills}
        return kinds.pop() if len(kinds) == 1 else f"several kinds {kinds}"
    (only,) = record["scene"]  # colour and position are asked of one-shape images alone
    if kind == "colour":  # the colour at the centre of the shape's box
        x0, y0, x1, y1 = only["box"]
        return NAMES[labels[(y0 + y1) // 2, (x0 + x1) // 2]]
    ys, xs = np.nonzero(labels == NAMES.index(only["colour"]))
    coords, extent, sides = (xs, labels.shape[1], ("left", "right")) if "left" in question else (ys, labels.shape[0], ("top", "bottom"))
    return sides[0] if coords.max() < extent / 2 else sides[1] if coords.min() >= extent / 2 else "?"


def test_files_are_in_the_internvl_meta_format(demo):
    for meta_path, name, split, n in ((demo.meta, "demo_train", "train", 300), (demo.heldout_meta, "demo_heldout", "heldout", 100)):
        meta = read_meta(meta_path)
        assert list(meta) == [name] and set(meta[name]) == META_KEYS
        entry = meta[name]
        assert entry["max_dynamic_patch"] == MAX_TILES and entry["repeat_time"] == 1 and entry["length"] == n
        records = read_jsonl(entry["annotation"])
        assert len(records) == n
        for r in records:
            assert os.path.isfile(os.path.join(entry["root"], r["image"])) and r["image"].startswith(split + "/")
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert all(t["value"] in ANSWERS for t in turns[1::2])
            assert Image.open(os.path.join(entry["root"], r["image"])).size == (r["width"], r["height"])


def test_every_kind_and_every_answer_occurs(demo):
    records = read_jsonl(demo.train)
    kinds = collections.Counter(r["kinds"][0] for r in records)
    answers = {r["conversations"][1]["value"] for r in records}
    assert set(kinds) == set(QUESTION_KINDS) and min(kinds.values()) >= 300 // len(QUESTION_KINDS) // 2
    assert answers == set(ANSWERS)


def test_the_same_seed_writes_the_same_files_and_another_seed_does_not(demo, tmp_path):
    again = write_demo_dataset(str(tmp_path / "again"), train=300, heldout=100, seed=0)
    other = write_demo_dataset(str(tmp_path / "other"), train=300, heldout=100, seed=1)
    for split in ("train", "heldout"):
        a, b, c = (open(getattr(p, split), "rb").read() for p in (demo, again, other))
        assert a == b and a != c
    names = [r["image"] for r in read_jsonl(demo.train)]
    for name in names:
        assert open(os.path.join(demo.images, name), "rb").read() == open(os.path.join(again.images, name), "rb").read()
    meta = read_meta(demo.meta)["demo_train"]
    meta_again = read_meta(again.meta)["demo_train"]
    assert {k: v for k, v in meta.items() if k not in ("root", "annotation")} == \
        {k: v for k, v in meta_again.items() if k not in ("root", "annotation")}


def test_sizes_and_aspect_ratios_give_several_tile_grids(demo):
    grids = collections.Counter()
    for r in read_jsonl(demo.train):
        plan = plan_tiles(r["width"], r["height"], max_tiles=MAX_TILES, tile_size=TILE)
        grids[(plan.cols, plan.rows)] += 1
    assert {(1, 1), (2, 2), (2, 1), (1, 2), (3, 1), (1, 3)} <= set(grids)
    assert max(grids.values()) < 0.5 * sum(grids.values())  # no grid dominates


def test_shapes_are_as_large_as_shape_sides_allows(demo):
    """Sides within SHAPE_SIDES of the short side for their count (a crowded image may shrink them by 10% steps),
    and on average near the middle of the range: shapes span several patches of their tile."""
    ratios = collections.defaultdict(list)
    for r in read_jsonl(demo.train):
        short = min(r["width"], r["height"])
        for s in r["scene"]:
            x0, y0, x1, y1 = s["box"]
            assert x1 - x0 == y1 - y0 <= SHAPE_SIDES[len(r["scene"])][1] * short, r
            ratios[len(r["scene"])].append((x1 - x0) / short)
    for count, (lo, hi) in SHAPE_SIDES.items():
        assert lo * 0.9 <= np.mean(ratios[count]) <= hi, (count, np.mean(ratios[count]))


def test_answers_agree_with_the_pixels(demo):
    for path in (demo.train, demo.heldout):
        for r in read_jsonl(path):
            image, labels = read_pixels(demo, r)
            question, answer = r["conversations"][0]["value"].split("\n", 1)[1], r["conversations"][1]["value"]
            assert pixel_answer(r["kinds"][0], question, image, labels, r) == answer, (r["image"], question)


def test_later_turns_ask_other_questions_about_the_same_image(tmp_path):
    """Up to three distinct questions per training image (a scene of several shapes answers two: shape and count),
    each answered by the pixels."""
    paths = write_demo_dataset(str(tmp_path), train=60, heldout=10, seed=3, turns=3)
    lengths = collections.Counter()
    for r in read_jsonl(paths.train):
        turns = r["conversations"]
        questions = [t["value"].removeprefix("<image>\n") for t in turns[0::2]]
        assert len(questions) == len(set(questions)) == len(r["kinds"]) == (3 if len(r["scene"]) == 1 else 2)
        lengths[len(questions)] += 1
        image, labels = read_pixels(paths, r)
        for kind, q, a in zip(r["kinds"], questions, turns[1::2]):
            assert pixel_answer(kind, q, image, labels, r) == a["value"]
    assert set(lengths) == {2, 3}
    assert all(len(r["conversations"]) == 2 for r in read_jsonl(paths.heldout))


def test_no_question_names_a_colour_a_shape_or_a_count(demo):
    """So no turn of a conversation gives away the answer of another."""
    named = {*COLOURS, *SHAPES, *COUNT_WORDS}
    for r in read_jsonl(demo.train) + read_jsonl(demo.heldout):
        for turn in r["conversations"][0::2]:
            words = set(re.findall(r"\w+", turn["value"]))
            assert not words & named, turn["value"]


def test_shapes_bounds_the_number_of_shapes_per_image(tmp_path):
    paths = write_demo_dataset(str(tmp_path), train=40, heldout=10, seed=2, kinds=("colour",), shapes=(1, 1))
    for r in read_jsonl(paths.train) + read_jsonl(paths.heldout):
        assert len(r["scene"]) == 1, r
        image, labels = read_pixels(paths, r)
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        assert pixel_answer("colour", question, image, labels, r) == r["conversations"][1]["value"] == \
            r["scene"][0]["colour"]


def test_heldout_images_are_not_training_images(demo):
    def digests(path):
        return {hashlib.sha256(read_pixels(demo, r)[0].tobytes()).hexdigest() for r in read_jsonl(path)}

    train, heldout = digests(demo.train), digests(demo.heldout)
    assert len(heldout) == 100 and not train & heldout


@pytest.mark.parametrize("kwargs, word", [
    (dict(kinds=("colour", "size")), "kinds"), (dict(image_format="gif"), "image_format"), (dict(turns=0), "turns"),
    (dict(shapes=(0, 2)), "shapes"), (dict(shapes=(3, 2)), "shapes"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        write_demo_dataset(str(tmp_path), train=2, heldout=1, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(write_demo_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def conversation_texts(records, tokens_per_tile):
    """The training string of each record (template rendered, <image> expanded) and its messages."""
    template = get_template(TEMPLATE)
    for r in records:
        plan = plan_tiles(r["width"], r["height"], max_tiles=MAX_TILES, tile_size=TILE)
        messages = [
            {"role": "user" if t["from"] == "human" else "assistant",
             "content": expand_image_tokens(t["value"], [plan.num_tiles], tokens_per_tile) if i == 0 else t["value"]}
            for i, t in enumerate(r["conversations"])
        ]
        yield render(template, messages, add_generation_prompt=False), messages


def test_tokenizer_round_trips_every_demo_text_without_unknown_pieces(demo, tokenizer):
    config = demo_model_config()
    unk = tokenizer.token_to_id("<unk>")
    for text, _ in conversation_texts(read_jsonl(demo.train) + read_jsonl(demo.heldout), config.tokens_per_tile):
        ids = tokenizer.encode(text)
        assert unk not in ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_has_the_special_tokens_and_matches_the_model_config(tokenizer):
    config = demo_model_config()
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token) == [tokenizer.token_to_id(token)]
    assert tokenizer.img_context_id == config.image_token_id
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) == (
        tokenizer.token_to_id("<|im_end|>"), 0, None)
    assert not tokenizer.adds_bos
    assert build_demo_tokenizer().get_vocab_size() == config.text.vocab_size <= 256
    assert config.image_size == TILE and config.max_dynamic_patch == MAX_TILES and config.template == TEMPLATE


def test_each_answer_is_one_token_and_sft_labels_supervise_it_with_the_stop_token(demo, tokenizer):
    config = demo_model_config()
    for a in ANSWERS:
        assert len(tokenizer.encode(a)) == 1
    template = get_template(TEMPLATE)
    for text, messages in conversation_texts(read_jsonl(demo.train)[:20], config.tokens_per_tile):
        ids, labels = sft_labels(template, messages, tokenizer)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        supervised = tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=False)
        assert supervised == "".join(m["content"] + "<|im_end|>" for m in messages[1::2])
        assert (ids == tokenizer.token_to_id(IMG_CONTEXT_TOKEN)).sum() % config.tokens_per_tile == 0


STD_RTOL = 0.1  # a sample std of >= 4096 normal draws is within 10% of the true one (error ~1/sqrt(2n) = 1.1%)
