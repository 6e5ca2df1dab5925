"""The demo's data: a synthetic visual question-answering set, its word-level tokenizer and its tiny model.

Every image shows one to three flat shapes of one kind (circle, square or triangle) in distinct colours on a grey
background (the ImageNet mean, which normalises to ~0).
Images come in several sizes and aspect ratios (1:1, 3:2, 2:1, 3:1 and their portrait forms), so that the dynamic
tiling rule picks different grids for them with ``max_dynamic_patch`` = :data:`MAX_TILES` (1x1, 2x2, 2x1, 1x2,
3x1, 1x3), plus the thumbnail. Questions of four kinds, each answered by one word of :data:`ANSWERS`:

| kind     | question                                  | asked of             | answers                         |
|----------|-------------------------------------------|----------------------|---------------------------------|
| colour   | What colour is the shape?                 | one-shape images     | red green blue yellow purple    |
| shape    | Which shape is drawn?                     | every image          | circle square triangle          |
| count    | How many shapes are there?                | every image          | one two three                   |
| position | Is the shape on the left or the right?    | one-shape images     | left right (top bottom: "at the |
|          |                                           |                      | top or the bottom?")            |

No question names a colour, a shape or a count, so in a conversation of several turns no earlier turn gives away a
later answer (an earlier design asked "What shape is the red object?" after "What colour is the circle?": the
tiny model learnt to copy instead of to look). No question needs one object's attributes bound to another's
either: which colours, which kind, how many and where are each read from the image as a whole, which is what a
model this small learns from scratch in minutes.

A position question is only asked when the shape lies wholly in one half of the image, so every answer is
unambiguous. The set is written in the InternVL meta format (one meta JSON per split, a JSONL of conversations,
an image folder), and every sample is a pure function of (seed, split, index)::

    paths = write_demo_dataset("/tmp/demo", train=4000, heldout=200, seed=0)
    write_demo_tokenizer("/tmp/demo/tokenizer")
    config = demo_model_config()          # image_token_id and vocab_size come from the tokenizer

Besides ``image`` and ``conversations`` each JSONL record carries what was drawn (``scene``: the shapes with their
colour and pixel box) and the kind of each question (``kinds``); the InternVL reader ignores other keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from internvl_jax.config import InternVLConfig, TextConfig, VisionConfig
from internvl_jax.processing.templates import (
    IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, get_template, render,
)

# ----------------------------------------------------------------------------------------------
# What the images show and what is asked
# ----------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
# Far apart in RGB, so JPEG noise and resampling never move a pixel to another colour's neighbourhood.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
    "purple": (145, 55, 185),
}
BACKGROUND = (124, 116, 104)  # the ImageNet mean: background pixels normalise to ~0, so the shapes dominate the ViT input
COUNT_WORDS = ("one", "two", "three")
QUESTION_KINDS = ("colour", "shape", "count", "position")
ANSWERS = (*COLOURS, *SHAPES, *COUNT_WORDS, "left", "right", "top", "bottom")

# Aspect ratios (width : height). With tiles of TILE px and at most MAX_TILES tiles they give the grids 1x1 or
# 2x2 (1:1 below / above sqrt(2) tiles a side), 2x1 (3:2 and 2:1), 1x2, 3x1 and 1x3.
ASPECTS = ((1, 1), (3, 2), (2, 3), (2, 1), (1, 2), (3, 1), (1, 3))
TILE = 56  # the demo model's tile size (px)
MAX_TILES = 4  # max_dynamic_patch of the demo
SHORT_SIDE = (40, 100)  # the short side of an image, px (inclusive range)
# A shape's side as a fraction of the image's short side, by the number of shapes: large, so that a shape spans
# several 14 px patches of its tile and its outline, not a sub-patch detail, tells circle, square and triangle apart.
SHAPE_SIDES = {1: (0.6, 0.9), 2: (0.45, 0.65), 3: (0.4, 0.5)}
SHAPE_COUNTS = (1, 3)  # shapes per image: fewest, most

# What the generator writes for a given seed; bumped when that changes, so a workdir's older data is not mistaken
# for this version's (train.demo.setup). 2: one kind per image, questions that name no colour, shape or count.
DATA_VERSION = 2
_SPLITS = {"train": 0, "heldout": 1}  # a split's number in the per-sample random seed


@dataclass(frozen=True)
class DrawnShape:
    """One shape as drawn: its kind, colour name and pixel box (x0, y0, x1, y1), x1/y1 exclusive."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    """An image's content: its size and its shapes (at most one per colour)."""

    width: int
    height: int
    shapes: tuple[DrawnShape, ...]


@dataclass(frozen=True)
class DemoPaths:
    """Where :func:`write_demo_dataset` put things (absolute paths)."""

    folder: str
    meta: str  # meta JSON of the training split (dataset "demo_train")
    heldout_meta: str  # meta JSON of the held-out split (dataset "demo_heldout")
    train: str  # JSONL
    heldout: str  # JSONL
    images: str  # the image root of both splits (images/train/..., images/heldout/...)


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): an aspect of ASPECTS, the short side uniform in SHORT_SIDE, the long side +-4% jitter."""
    a, b = ASPECTS[rng.integers(len(ASPECTS))]
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    long = int(round(short * max(a, b) / min(a, b) * rng.uniform(0.96, 1.04)))
    return (long, short) if a >= b else (short, long)


def _place(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` square boxes inside the image, apart from each other by a gap of 1/8 of their side.

    Sides are drawn from the range :data:`SHAPE_SIDES` of the short side for that count; a failed attempt (the
    boxes do not fit after 200 tries) shrinks the range by 10% and starts again.
    """
    short = min(width, height)
    lo, hi = SHAPE_SIDES[count]
    while True:
        boxes = []
        for _ in range(200):
            side = max(8, int(short * rng.uniform(lo, hi)))
            x0 = int(rng.integers(0, width - side + 1))
            y0 = int(rng.integers(0, height - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            gap = side // 8
            if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
                   for b in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes
        lo, hi = lo * 0.9, hi * 0.9


def random_scene(rng: np.random.Generator, shapes: tuple[int, int] = SHAPE_COUNTS) -> Scene:
    """A scene: a random size (:func:`_image_size`), ``shapes`` = (fewest, most) shapes (default 1-3) of one kind,
    in distinct colours."""
    width, height = _image_size(rng)
    count = int(rng.integers(shapes[0], shapes[1] + 1))
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    names = list(COLOURS)
    return Scene(width, height, tuple(DrawnShape(kind, names[int(c)], box)
                                      for c, box in zip(colours, _place(rng, width, height, count))))


def draw_scene(scene: Scene) -> Image.Image:
    """The RGB image of a scene: filled shapes without outline; a triangle points up and fills its box's width."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s.shape!r}; known: {', '.join(SHAPES)}")
    return image


def _side(shape: DrawnShape, scene: Scene, axis: str) -> str | None:
    """'left'/'right' (axis 'x') or 'top'/'bottom' (axis 'y') when the shape lies wholly in that half, else None."""
    x0, y0, x1, y1 = shape.box
    lo, hi, extent, names = (x0, x1, scene.width, ("left", "right")) if axis == "x" else (y0, y1, scene.height, ("top", "bottom"))
    if 2 * hi <= extent:
        return names[0]
    if 2 * lo >= extent:
        return names[1]
    return None


def questions(scene: Scene, kind: str) -> list[tuple[str, str]]:
    """Every (question, answer) of that kind the scene answers unambiguously (possibly none): colour and position
    only of a one-shape scene, position only when the shape lies wholly in one half."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(QUESTION_KINDS)}")
    if kind == "shape":
        return [("Which shape is drawn?", scene.shapes[0].shape)]
    if kind == "count":
        return [("How many shapes are there?", COUNT_WORDS[len(scene.shapes) - 1])]
    if len(scene.shapes) > 1:
        return []
    (only,) = scene.shapes
    if kind == "colour":
        return [("What colour is the shape?", only.colour)]
    asked = (("x", "Is the shape on the left or the right?"), ("y", "Is the shape at the top or the bottom?"))
    return [(q, side) for axis, q in asked if (side := _side(only, scene, axis)) is not None]


def demo_sample(seed: int, split: str, index: int, *, kinds=QUESTION_KINDS, turns: int = 1,
                shapes: tuple[int, int] = SHAPE_COUNTS):
    """One sample, a pure function of (seed, split, index): (scene, [(kind, question, answer)] of at most ``turns``
    distinct questions). The first kind is drawn uniformly from ``kinds`` and scenes are drawn until one answers a
    question of that kind; later turns take further questions of any of ``kinds`` about the same scene, in random
    order, as many as it answers (a three-shape scene answers two: its shape and its count)."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    first = kinds[int(rng.integers(len(kinds)))]
    while True:
        scene = random_scene(rng, shapes)
        pool = {k: questions(scene, k) for k in kinds}
        if pool[first]:
            break
    q, a = pool[first][int(rng.integers(len(pool[first])))]
    asked = [(first, q, a)]
    rest = [(k, q2, a2) for k in kinds for q2, a2 in pool[k] if q2 != q]
    for i in rng.permutation(len(rest))[: turns - 1]:
        asked.append(rest[int(i)])
    return scene, asked


def _record(scene: Scene, asked, image: str, index: int) -> dict:
    conversations = []
    for turn, (_, q, a) in enumerate(asked):
        conversations += [
            {"from": "human", "value": ("<image>\n" if turn == 0 else "") + q},
            {"from": "gpt", "value": a},
        ]
    return {
        "id": index,
        "image": image,
        "width": scene.width,
        "height": scene.height,
        "conversations": conversations,
        "kinds": [k for k, _, _ in asked],
        "scene": [{"shape": s.shape, "colour": s.colour, "box": list(s.box)} for s in scene.shapes],
    }


def _scene_key(scene: Scene) -> tuple:
    return scene.width, scene.height, scene.shapes


def _write_split(folder: str, split: str, n: int, seed: int, kinds, turns: int, image_format: str, quality: int,
                 exclude: set, shapes: tuple[int, int] = SHAPE_COUNTS) -> tuple[str, set]:
    """Images under folder/images/<split>/ and folder/<split>.jsonl; returns (jsonl path, scene keys written)."""
    os.makedirs(os.path.join(folder, "images", split), exist_ok=True)
    path = os.path.join(folder, f"{split}.jsonl")
    keys, index, written = set(), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n:
            scene, asked = demo_sample(seed, split, index, kinds=kinds, turns=turns, shapes=shapes)
            index += 1
            if _scene_key(scene) in exclude:  # held-out images never repeat a training image
                continue
            keys.add(_scene_key(scene))
            name = f"{split}/{written:06d}.{image_format}"
            image = draw_scene(scene)
            target = os.path.join(folder, "images", name)
            if image_format == "jpg":
                image.save(target, "JPEG", quality=quality, subsampling=0)  # 4:4:4: small shapes keep crisp colour edges
            else:
                image.save(target, "PNG")
            f.write(json.dumps(_record(scene, asked, name, written)) + "\n")
            written += 1
    return path, keys


def _write_meta(path: str, name: str, images: str, annotation: str, length: int) -> None:
    meta = {name: {
        "root": images, "annotation": annotation, "data_augment": False, "max_dynamic_patch": MAX_TILES,
        "repeat_time": 1, "length": length,
    }}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def write_demo_dataset(folder: str, *, train: int = 4000, heldout: int = 200, seed: int = 0,
                       kinds=QUESTION_KINDS, turns: int = 1, image_format: str = "jpg", quality: int = 90,
                       shapes: tuple[int, int] = SHAPE_COUNTS) -> DemoPaths:
    """Write the demo set into ``folder`` (created; files of an earlier call are overwritten) and return its paths.

    train / heldout: number of images (= JSONL lines) per split. seed: the same seed writes identical files.
    kinds: question kinds asked (a subset of :data:`QUESTION_KINDS`). turns: the most questions per training image
    (the first carries ``<image>``; fewer where the scene answers fewer); held-out records always ask one.
    image_format: "jpg" (``quality``) or "png".
    shapes: (fewest, most) shapes per image, within :data:`SHAPE_COUNTS` (the default).
    The meta JSONs name absolute paths; both set ``max_dynamic_patch`` = :data:`MAX_TILES` and no augmentation.
    """
    unknown = [k for k in kinds if k not in QUESTION_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {QUESTION_KINDS}, got {tuple(kinds)}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if train < 0 or heldout < 0 or turns < 1:
        raise ValueError(f"need train >= 0, heldout >= 0 and turns >= 1, got {train}, {heldout}, {turns}")
    if not SHAPE_COUNTS[0] <= shapes[0] <= shapes[1] <= SHAPE_COUNTS[1]:
        raise ValueError(f"shapes must be (fewest, most) within {SHAPE_COUNTS}, got {tuple(shapes)}")
    folder = os.path.abspath(folder)
    images = os.path.join(folder, "images")
    kinds = tuple(kinds)
    train_path, train_keys = _write_split(folder, "train", train, seed, kinds, turns, image_format, quality, set(),
                                          shapes)
    heldout_path, _ = _write_split(folder, "heldout", heldout, seed, kinds, 1, image_format, quality, train_keys,
                                    shapes)
    paths = DemoPaths(folder, os.path.join(folder, "meta.json"), os.path.join(folder, "heldout_meta.json"),
                      train_path, heldout_path, images)
    _write_meta(paths.meta, "demo_train", images, train_path, train)
    _write_meta(paths.heldout_meta, "demo_heldout", images, heldout_path, heldout)
    return paths


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

TEMPLATE = "internvl2_5"
PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
# Special tokens first, so their ids are small and fixed: pad is 0 (the packer pads with 0). The grounding tokens
# are the rest of the nine InternVL adds to its tokenizers.
SPECIAL_TOKENS = (
    PAD_TOKEN, "<|im_start|>", "<|im_end|>", IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN,
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", UNK_TOKEN,
)
# GPT-2-like pieces without the byte mapping: a word with its leading space, punctuation with its leading space,
# or a run of whitespace. Decoding concatenates pieces (decoders.Fuse), so encode -> decode is the identity on
# every text made of known pieces.
PIECE_PATTERN = r" ?\w+| ?[^\s\w]+|\s+"


def _demo_texts() -> list[str]:
    """Every text the demo renders: each question and answer inside the template, with the system message."""
    template = get_template(TEMPLATE)
    corner = Scene(200, 200, (DrawnShape(SHAPES[0], ANSWERS[0], (0, 0, 10, 10)),))  # answers every question
    texts = [q for kind in QUESTION_KINDS for q, _ in questions(corner, kind)]
    messages = [{"role": "user", "content": "<image>\n" + texts[0]}, {"role": "assistant", "content": ANSWERS[0]}]
    texts.append(render(template, messages, add_generation_prompt=False))
    texts += [" ".join(ANSWERS), "\n".join(ANSWERS)]
    return texts


def _pieces(text: str) -> list[str]:
    special = "|".join(re.escape(t) for t in SPECIAL_TOKENS)
    chunks = re.split(f"(?:{special})", text)
    return [m.group(0) for chunk in chunks for m in re.finditer(PIECE_PATTERN, chunk)]


def build_demo_tokenizer(extra_texts=()):
    """The demo's ``tokenizers.Tokenizer``: word-level over the pieces of :func:`_demo_texts` (and of
    ``extra_texts``, for other synthetic tasks), special tokens first.

    Unknown pieces encode to ``<unk>``. No BOS is added (Qwen-like), so ``sft_labels`` adds none.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pieces = sorted({p for text in (*_demo_texts(), *extra_texts) for p in _pieces(text)})
    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *pieces))}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_demo_tokenizer(folder: str, extra_texts=()) -> str:
    """Write tokenizer.json + tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>, no BOS) into ``folder``,
    readable by ``internvl_jax.processing.Tokenizer.from_pretrained`` and transformers' fast tokenizer. Returns
    the folder. extra_texts: as for :func:`build_demo_tokenizer`."""
    os.makedirs(folder, exist_ok=True)
    build_demo_tokenizer(extra_texts).save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN, "add_bos_token": False, "model_max_length": 1024,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return folder


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def demo_model_config(**changes) -> InternVLConfig:
    """The demo's tiny InternVL: TILE px tiles of 14 px patches (4 tokens per tile after pixel shuffle), a
    2-layer ViT and a 2-layer Qwen2 decoder; vocabulary and IMG_CONTEXT id from :func:`build_demo_tokenizer`.
    ``changes``: InternVLConfig fields to replace."""
    tok = build_demo_tokenizer()
    vision = VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, image_size=TILE,
                          patch_size=14)
    text = TextConfig(
        family="qwen2", vocab_size=tok.get_vocab_size(), hidden_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, intermediate_size=256, max_position_embeddings=256, qkv_bias=True,
    )
    config = InternVLConfig(
        vision=vision, text=text, template=TEMPLATE, image_token_id=tok.token_to_id(IMG_CONTEXT_TOKEN),
        max_dynamic_patch=MAX_TILES,
    )
    return dataclasses.replace(config, **changes)
