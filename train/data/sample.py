"""One JSONL record -> one training Sample (token ids, labels, positions, tiles), or a Skipped record.

A record is a conversation::

    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                         {"from": "gpt", "value": "A cat."}]}

with ``image`` one path (single image), a list of paths (several images), ``video`` a path (a video file, or a
folder of frames), or neither (text-only). An optional first turn ``{"from": "system", "value": ...}`` replaces
the template's system message (the original's ``preprocess_internvl2_5`` reads it; here every template does).

What the original (OpenGVLab/InternVL ``internvl_chat/internvl/train/internvl_chat_finetune.py``,
``LazySupervisedDataset`` and ``internvl_chat/internvl/train/dataset.py``) does, and this module copies:

* Kind: ``image`` non-empty -> a list is several images, a string one image; else ``video`` non-empty -> video;
  else text-only (``"image": []`` or ``""`` counts as absent).
* One image: when the FIRST human turn holds no ``<image>``, ``<image>\\n`` is put in front of it. Several
  images: nothing is added (the data must hold one ``<image>`` per image; ``Image-1: <image>\\n...`` is the
  data's own convention); each image gets ``max(1, max_dynamic_patch // num_images)`` tiles.
* Video: ``<video>\\n`` is put in front of the first turn when it holds no ``<video>``, then ``<video>\\n``
  becomes ``Frame-1: <image>\\nFrame-2: <image>\\n...`` (training spells ``Frame-i``; inference ``Framei``).
  The frame count is drawn uniformly from ``min_num_frames..max_num_frames`` inclusive
  (``np.random.randint(min, max + 1)``), the frames by ``get_frame_indices`` (processing.video
  .training_frame_indices), one tile per frame (the frame resized to the tile, no thumbnail). A frame folder
  (files sorted by the number in ``_<n>.jpg``) gives all its frames when it has no more than the drawn count.
* ``<image>`` placeholders are expanded in the human turns, in order; the original asserts that as many
  were replaced as there are images. Here any mismatch (more or fewer) is Skipped, as is ``<image>`` in an
  answer (the original would leave surplus ones as literal text).
* JPEG augmentation (``data_augment``): ``build_transform(is_train=True)`` applies, to every tile
  independently, ``RandomChoice`` over JPEG qualities ``range(75, 101)`` (75..100 inclusive, uniform), PIL's
  ``save(format='JPEG', quality=q)`` with its defaults, then the resize to the tile size (a no-op for tiles)
  and the normalisation (here on the device, by the model: tiles leave the host as uint8 levels). A video frame
  goes through the same transform untiled: JPEG at its own size, then the resize.
* ``"supervise": "first_token"`` (a key of the record; default ``"all"``) keeps the loss on the first token of
  each answer only: a process-reward critic's ``+`` / ``-`` judgements (train.prm_data) without their stop tokens.
* Text-only samples carry one white dummy tile with ``image_flags`` 0 in the original; here zero tiles (the
  packer keeps the batch shapes static).

Bad records return :class:`Skipped` with a reason instead of raising (the original retries a random other
record). All randomness comes from the ``rng`` argument, drawn in this order: video frame count and frames,
JPEG qualities (tile order), V2PE strides (image order); a seeded Generator reproduces a sample exactly.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from internvl_jax.processing import (
    Template, Tokenizer, expand_image_tokens, load_image, pil_tiles, plan_tiles, sft_labels,
    training_frame_indices, v2pe_positions,
)
from internvl_jax.processing import video as _video
from internvl_jax.processing.templates import IGNORE_INDEX, IMAGE_PLACEHOLDER, SFT_TEMPLATES

from .meta import DatasetSpec, Record

__all__ = [
    "JPEG_QUALITIES", "V2PE_RANDOM", "SampleSettings", "Skipped", "jpeg_reencode", "prepare", "read_training_video",
]

VIDEO_PLACEHOLDER = "<video>"
JPEG_QUALITIES = range(75, 101)  # the original's `qualities = list(range(75, 101))`
V2PE_RANDOM = "random"  # SampleSettings.v2pe: a stride per image from processing.positions.TRAINING_STRIDES


@dataclass(frozen=True)
class Skipped:
    """A record that gave no sample: its dataset, its 1-based line, and why."""

    dataset: str
    line: int
    reason: str


@dataclass(frozen=True)
class SampleSettings:
    """What preparing a sample needs besides the record.

    tokens_per_tile / image_size: the model's (config.tokens_per_tile, config.image_size).
    system_message: None -> the template's default. max_dynamic_patch: the run's tile limit per record (a
    dataset's meta ``max_dynamic_patch`` overrides it). data_augment: master switch (off for evaluation); a
    dataset is augmented when this and its meta ``data_augment`` are both true. v2pe: None -> int32 positions
    0..n-1; a number -> V2PE positions with that stride; ``"random"`` -> a stride per image drawn from
    TRAINING_STRIDES (V2PE training). frame_sampling: the original's ``sampling_method`` ('rand' | 'middle').
    max_tokens_no_split: None, or the most tokens a sample may have when the packer does not split samples
    (longer ones are Skipped).
    """

    tokenizer: Tokenizer
    template: Template
    tokens_per_tile: int
    image_size: int
    system_message: str | None = None
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    data_augment: bool = True
    v2pe: float | str | None = None
    min_num_frames: int = 8
    max_num_frames: int = 32
    frame_sampling: str = "rand"
    max_tokens_no_split: int | None = None

    def __post_init__(self):
        if self.template.name not in SFT_TEMPLATES:
            raise ValueError(
                f"SampleSettings.template: no SFT label rule for {self.template.name!r}; "
                f"use one of {', '.join(SFT_TEMPLATES)}"
            )
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ValueError(
                f"SampleSettings: need 1 <= min_dynamic_patch <= max_dynamic_patch, got {self.min_dynamic_patch}, "
                f"{self.max_dynamic_patch}"
            )
        if not 1 <= self.min_num_frames <= self.max_num_frames:
            raise ValueError(
                f"SampleSettings: need 1 <= min_num_frames <= max_num_frames, got {self.min_num_frames}, "
                f"{self.max_num_frames}"
            )
        if self.frame_sampling not in ("rand", "middle"):
            raise ValueError(f"SampleSettings.frame_sampling must be 'rand' or 'middle', got {self.frame_sampling!r}")
        v = self.v2pe
        if not (v is None or v == V2PE_RANDOM or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)):
            raise ValueError(f"SampleSettings.v2pe must be None, a stride > 0 or {V2PE_RANDOM!r}, got {v!r}")
        if self.max_tokens_no_split is not None and self.max_tokens_no_split < 1:
            raise ValueError(f"SampleSettings.max_tokens_no_split must be None or >= 1, got {self.max_tokens_no_split}")

    @classmethod
    def from_config(cls, config, tokenizer: Tokenizer, template: Template, **overrides) -> "SampleSettings":
        """Tiling settings and tokens per tile from an InternVLConfig; any field overridable."""
        kwargs = dict(
            tokenizer=tokenizer, template=template, tokens_per_tile=config.tokens_per_tile,
            image_size=config.image_size, min_dynamic_patch=config.min_dynamic_patch,
            max_dynamic_patch=config.max_dynamic_patch, use_thumbnail=config.use_thumbnail,
        )
        return cls(**{**kwargs, **overrides})


class _Bad(Exception):
    """Raised inside preparation for a bad record; becomes a Skipped with this message."""


# --------------------------------------------------------------------------------------------- the record


def json_object(text: str, strings=(), what: str = "pair") -> dict:
    """A JSONL line -> its JSON object, each key of ``strings`` a string. Raises ``_Bad`` naming what is wrong
    (``what``: the record's name in that message)."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad(f"the line is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise _Bad(f"the line is JSON but not an object (a {type(item).__name__})")
    for key in strings:
        if not isinstance(item.get(key), str):
            raise _Bad(f"the {what} has no string {key!r} (found {type(item.get(key)).__name__})")
    return item


def _parse(record: Record) -> dict:
    try:
        record.text.encode("utf-8")  # surrogate escapes left by meta.records mark bytes that are not UTF-8
    except UnicodeEncodeError:
        raise _Bad("the line is not valid UTF-8") from None
    item = json_object(record.text)
    if "conversations" not in item:
        raise _Bad("the record has no 'conversations'")
    return item


def _turns(conversations) -> tuple[str | None, list[str]]:
    """(system message or None, turn texts human, gpt, human, gpt, ...) of a record's conversations."""
    if not isinstance(conversations, list) or not conversations:
        raise _Bad("'conversations' must be a non-empty list of turns")
    for k, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise _Bad(f"turn {k} of 'conversations' is not an object with a string 'from' and 'value'")
    system = None
    if conversations[0]["from"] == "system":
        system, conversations = conversations[0]["value"], conversations[1:]
    rule = "conversations must alternate human, gpt, ... (after an optional system turn) and end with gpt"
    if not conversations:
        raise _Bad(f"{rule}; there is only a system turn")
    first = int(system is not None)  # index of the turn in the record, for the message
    for k, turn in enumerate(conversations):
        if turn["from"] != ("human", "gpt")[k % 2]:
            raise _Bad(f"{rule}; turn {first + k} is from {turn['from']!r}, expected {('human', 'gpt')[k % 2]!r}")
    if len(conversations) % 2:
        raise _Bad(f"{rule}; the last turn is from 'human'")
    return system, [turn["value"] for turn in conversations]


def _media(item: dict) -> tuple[str, list[str] | str | None]:
    """("image", [path]) | ("images", [paths]) | ("video", path) | ("text", None), by the original's rule."""
    image, video = item.get("image"), item.get("video")
    if image not in (None, "", []):
        if isinstance(image, str):
            return "image", [image]
        if isinstance(image, list) and all(isinstance(p, str) and p for p in image):
            return "images", image
        raise _Bad(f"'image' must be a path or a list of paths, got {image!r}")
    if video not in (None, ""):
        if isinstance(video, str):
            return "video", video
        raise _Bad(f"'video' must be a path, got {video!r}")
    return "text", None


def _placeholder_counts(turns: list[str], expected: int, what: str) -> list[int]:
    """``<image>`` count per turn (answers must have none; the total must equal ``expected``)."""
    counts = [t.count(IMAGE_PLACEHOLDER) for t in turns]
    answers = [k for k in range(1, len(turns), 2) if counts[k]]
    if answers:
        raise _Bad(f"an answer (turn {answers[0]}) holds {IMAGE_PLACEHOLDER}; placeholders belong in human turns")
    if sum(counts) != expected:
        raise _Bad(f"the conversation has {sum(counts)} {IMAGE_PLACEHOLDER} placeholders but the record has {what}")
    return counts


# --------------------------------------------------------------------------------------------- pixels


def jpeg_reencode(image: np.ndarray, quality: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> the same shape, saved as JPEG at ``quality`` with PIL's defaults and decoded."""
    with io.BytesIO() as buf:
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            return np.asarray(im.convert("RGB"))


def _jpeg(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [k, H, W, 3]: each image re-encoded at its own quality drawn uniformly from JPEG_QUALITIES."""
    qualities = rng.integers(JPEG_QUALITIES.start, JPEG_QUALITIES.stop, size=len(images))
    return np.stack([jpeg_reencode(im, q) for im, q in zip(images, qualities)]) if len(images) else images


def _plans(images: list[Image.Image], per_image: int, settings: SampleSettings):
    """The TilePlan of each image under a limit of ``per_image`` tiles."""
    # the original's dynamic_preprocess falls back to one tile when min > max; min(..) keeps plan_tiles valid
    lo = min(settings.min_dynamic_patch, per_image)
    return [plan_tiles(im.width, im.height, min_tiles=lo, max_tiles=per_image, tile_size=settings.image_size,
                       use_thumbnail=settings.use_thumbnail) for im in images]


def _image_tiles(images: list[Image.Image], plans, settings: SampleSettings, augment: bool,
                 rng: np.random.Generator) -> np.ndarray:
    """uint8 [sum of tiles, S, S, 3]: each image's tiles in order (the original's PIL tiling, JPEG after tiling
    when augmenting); the model normalises them on the device."""
    tiles = []
    for im, plan in zip(images, plans):
        t = pil_tiles(im, plan, settings.image_size)
        tiles.append(_jpeg(t, rng) if augment else t)
    return np.concatenate(tiles)


def _frame_tiles(frames: np.ndarray, settings: SampleSettings, augment: bool, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames [t, H, W, 3] -> uint8 [t, S, S, 3]: one tile per frame (JPEG first when augmenting)."""
    if augment:
        frames = _jpeg(frames, rng)
    one = plan_tiles(frames.shape[2], frames.shape[1], dynamic=False, use_thumbnail=False)
    return np.concatenate([pil_tiles(Image.fromarray(f), one, settings.image_size) for f in frames])


# --------------------------------------------------------------------------------------------- video


def _frame_number(name: str) -> int:
    match = re.search(r"_(\d+).jpg$", name)  # the original's extract_frame_number (its unescaped dot included)
    return int(match.group(1)) if match else -1


def _folder_frames(path: str, num_frames: int, rng: np.random.Generator, sample: str) -> np.ndarray:
    """The original's read_frames_folder: files sorted by frame number; sampled only when there are more
    than ``num_frames``. Ties (names without a number) keep name order (the original: directory order)."""
    names = sorted(sorted(os.listdir(path)), key=_frame_number)
    if not names:
        raise OSError(f"the frame folder {path} is empty")
    chosen = range(len(names))
    if len(names) > num_frames:
        chosen = training_frame_indices(len(names), num_frames, rng, sample)
    return np.stack([np.asarray(load_image(os.path.join(path, names[i]))) for i in chosen])


def read_training_video(path: str, num_frames: int, rng: np.random.Generator, *, sample: str = "rand",
                        clip=None) -> np.ndarray:
    """uint8 RGB [num_frames, H, W, 3]: the frames the original training loader takes from a video file.

    The original (decord): ``vlen`` = the frame count, or with ``clip = (t0, t1)`` seconds ``int((t1 - t0) *
    fps)`` frames from frame ``int(t0 * fps)``; frames ``get_frame_indices(num_frames, vlen)``
    (:func:`training_frame_indices`, padded with the last frame when the video is short). Decoding reuses
    processing.video's PyAV readers (seeking to keyframes when the timestamps allow, as load_video does).
    A folder path reads a folder of frames (see the module docstring), which may give fewer frames.
    """
    if os.path.isdir(path):
        return _folder_frames(path, num_frames, rng, sample)
    container, stream = _video._open(path)
    try:
        fps = _video._video_fps(stream, path)
        stated = int(stream.frames or 0)
        pts, key = _video._packet_index(container, stream)
    finally:
        container.close()
    count = stated if stated > 0 else len(pts)
    if count < 1:
        raise ValueError(f"{path}: the video stream holds no frames")

    def pick(n: int) -> list[int]:
        if clip is None:
            return training_frame_indices(n, num_frames, rng, sample)
        t0, t1 = clip
        first, length = int(t0 * fps), int((t1 - t0) * fps)
        if length < 1 or first < 0 or first + length > n:
            raise ValueError(f"{path}: clip {list(clip)} at {fps:g} fps is outside the video's {n} frames")
        return [first + i for i in training_frame_indices(length, num_frames, rng, sample)]

    indices = pick(count)
    kept = None
    if len(pts) == count and None not in pts and len(set(pts)) == count:
        order = sorted(range(count), key=pts.__getitem__)
        try:
            kept = _video._decode_seeking(path, indices, [pts[i] for i in order], [key[i] for i in order])
        except _video._SeekFailed:
            kept = None
    if kept is None:
        kept, decoded = _video._decode_sequential(path, indices)
        if len(kept) < len(set(indices)) and 0 < decoded != count:  # the stated count was wrong
            indices = pick(decoded)
            kept, decoded = _video._decode_sequential(path, indices)
        if len(kept) < len(set(indices)):
            raise OSError(f"{path}: decoded only {decoded} frames, fewer than the selected frames need")
    return np.stack([kept[i] for i in indices])


# --------------------------------------------------------------------------------------------- prepare


def _load_images(paths: list[str], root: str) -> list[Image.Image]:
    images = []
    for p in paths:
        full = os.path.join(root, p)
        if not os.path.isfile(full):
            raise _Bad(f"image not found: {full}")
        try:
            images.append(load_image(full))
        except Exception as e:  # decoders of untrusted files raise many kinds; each one is a bad record
            raise _Bad(f"cannot read image {full}: {e}") from None
    return images


def _load_video(item: dict, root: str, settings: SampleSettings, rng: np.random.Generator) -> np.ndarray:
    full = os.path.join(root, item["video"])
    if not os.path.exists(full):
        raise _Bad(f"video not found: {full}")
    num_frames = int(rng.integers(settings.min_num_frames, settings.max_num_frames + 1))
    clip = item.get("clip")
    seconds = isinstance(clip, list) and len(clip) == 2 and all(isinstance(t, (int, float)) for t in clip)
    if clip is not None and not seconds:
        raise _Bad(f"'clip' must be [start_seconds, end_seconds], got {clip!r}")
    try:
        return read_training_video(full, num_frames, rng, sample=settings.frame_sampling, clip=clip)
    except Exception as e:  # corrupt containers and streams raise from PyAV, PIL or our checks
        raise _Bad(f"cannot read video {full}: {e}") from None


def _check_special_tokens(ids: np.ndarray, tokenizer: Tokenizer, num_tiles: list[int], tokens_per_tile: int) -> None:
    """The text must not bring image tokens of its own: they would take tiles from the real images."""
    found = {t: int((ids == tid).sum()) for t, tid in (
        ("<img>", tokenizer.img_start_id), ("</img>", tokenizer.img_end_id), ("<IMG_CONTEXT>", tokenizer.img_context_id)
    )}
    expected = {"<img>": len(num_tiles), "</img>": len(num_tiles), "<IMG_CONTEXT>": sum(num_tiles) * tokens_per_tile}
    for token, n in found.items():
        if n != expected[token]:
            raise _Bad(f"the text holds the image token {token} itself ({n} found, {expected[token]} from the images)")


def _supervised(labels: np.ndarray, supervise) -> np.ndarray:
    """The labels with the record's ``supervise`` rule applied: "all" as they are, "first_token" the first token of
    each supervised span only."""
    if supervise == "all":
        return labels
    if supervise != "first_token":
        raise _Bad(f"'supervise' is {supervise!r}: expected 'all' or 'first_token'")
    on = labels != IGNORE_INDEX
    first = on & ~np.concatenate([[False], on[:-1]])
    return np.where(first, labels, IGNORE_INDEX).astype(labels.dtype)


def _build(record: Record, spec: DatasetSpec, settings: SampleSettings, rng: np.random.Generator,
           item: dict | None = None, alternatives: tuple[str, ...] = ()) -> dict:
    """The Sample of ``record`` (or of ``item``, the record already parsed). ``alternatives``: other texts of the
    last answer, each tokenized with the same prompt, tiles and positions (a preference pair's rejected answer);
    the Sample then holds ``alternatives``, a list of (input_ids, labels, positions)."""
    item = _parse(record) if item is None else item
    system, turns = _turns(item["conversations"])
    kind, media = _media(item)
    max_tiles = spec.max_dynamic_patch or settings.max_dynamic_patch
    augment = settings.data_augment and spec.data_augment

    frames = None
    if kind == "image" and IMAGE_PLACEHOLDER not in turns[0]:
        turns[0] = IMAGE_PLACEHOLDER + "\n" + turns[0]
    if kind == "video":
        frames = _load_video(item, spec.root, settings, rng)
        if VIDEO_PLACEHOLDER not in turns[0]:
            turns[0] = VIDEO_PLACEHOLDER + "\n" + turns[0]
        frame_lines = "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(len(frames)))
        turns[0] = turns[0].replace(VIDEO_PLACEHOLDER + "\n", frame_lines + "\n")
    n_images = len(frames) if kind == "video" else len(media or ())
    what = {"image": "one image", "images": f"{n_images} image" + "s" * (n_images != 1),
            "video": f"{n_images} video frames", "text": "no image"}[kind]
    per_turn = _placeholder_counts(turns, n_images, what)

    images, plans = [], []
    num_tiles = [1] * n_images if kind == "video" else []  # tiles per placeholder, in order
    if kind in ("image", "images"):
        images = _load_images(media, spec.root)
        plans = _plans(images, max(1, max_tiles // len(media)) if kind == "images" else max_tiles, settings)
        num_tiles = [plan.num_tiles for plan in plans]

    messages, k = [], 0
    for i, text in enumerate(turns):
        text = expand_image_tokens(text, num_tiles[k : k + per_turn[i]], settings.tokens_per_tile)
        k += per_turn[i]
        messages.append({"role": ("user", "assistant")[i % 2], "content": text})
    system = settings.system_message if system is None else system

    def tokenize(messages):
        input_ids, labels = sft_labels(settings.template, messages, settings.tokenizer, system_message=system)
        labels = _supervised(labels, item.get("supervise", "all"))
        limit = settings.max_tokens_no_split
        if limit is not None and len(input_ids) > limit:
            raise _Bad(f"the sample has {len(input_ids)} tokens, more than the no-split limit of {limit}")
        _check_special_tokens(input_ids, settings.tokenizer, num_tiles, settings.tokens_per_tile)
        return input_ids, labels

    input_ids, labels = tokenize(messages)
    others = [tokenize(messages[:-1] + [{"role": "assistant", "content": text}]) for text in alternatives]

    if kind == "video":  # pixels after the length check: an over-long sample costs no resizing
        pixels = _frame_tiles(frames, settings, augment, rng)
    elif images:
        pixels = _image_tiles(images, plans, settings, augment, rng)
    else:
        pixels = np.zeros((0, settings.image_size, settings.image_size, 3), np.uint8)
    def positions_of(ids, state):
        if settings.v2pe is None:
            return np.arange(len(ids), dtype=np.int32)
        stride = None if settings.v2pe == V2PE_RANDOM else float(settings.v2pe)
        rng.bit_generator.state = state  # every alternative draws the strides of the first: the prompt is shared
        return v2pe_positions(ids, settings.tokenizer.img_context_id, stride,
                              tokens_per_tile=settings.tokens_per_tile, rng=rng)

    state = rng.bit_generator.state
    sample = {"input_ids": input_ids, "labels": labels, "positions": positions_of(input_ids, state),
              "pixel_values": pixels, "dataset": record.dataset, "line": record.line}
    if alternatives:
        sample["alternatives"] = [(ids, lab, positions_of(ids, state)) for ids, lab in others]
    return sample


def prepare(record: Record, spec: DatasetSpec, settings: SampleSettings, rng: np.random.Generator) -> dict | Skipped:
    """One record -> a Sample dict (train/data contract section 1), or Skipped(dataset, line, reason).

    Sample: ``input_ids`` int32 [n] and ``labels`` int32 [n] (processing.sft_labels of the conversation with
    each ``<image>`` expanded to its tiles; labels unshifted, IGNORE = -100 off the answers), ``positions``
    int32 [n] (0..n-1) or float32 [n] (V2PE), ``pixel_values`` uint8 [k, S, S, 3] (the tiles'
    levels in placeholder order, normalised by the model; k = 0 for text-only), ``dataset`` str and ``line`` int.
    """
    try:
        return _build(record, spec, settings, rng)
    except _Bad as e:
        return Skipped(record.dataset, record.line, str(e))
