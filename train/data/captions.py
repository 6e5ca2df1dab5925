"""Image-text pairs, InternVL 1.0's training data, as batches of its contrastive and generative stages.

A dataset is named by an InternVL meta file (train/data/meta.py) like any other; each JSONL line is one pair::

    {"image": "images/0001.png", "caption": "a red circle"}

``image`` is relative to the dataset's ``root``. A pair is one row: the image preprocessed as
:func:`internvl_jax.clip.preprocess` does for classification (the shorter side resized, the centre crop, ImageNet
statistics) at the model's image size, ``pixel_values`` float32 [S, S, 3], and its caption tokenised as the
original's ``internvl_g`` dataset does, each text right-padded with 0 to ``max_length`` L (EOS kept):

| batch key (int32 [B, L])                 | text                                              | stage       |
|------------------------------------------|---------------------------------------------------|-------------|
| ``input_ids``                            | BOS "summarize:" + caption EOS                    | contrastive |
| ``summarize_input_ids`` / ``_mask``      | the same (ITC)                                    | generative  |
| ``positive_input_ids`` / ``_mask``       | BOS caption EOS (ITM)                             | generative  |
| ``negative_input_ids`` / ``_mask``       | another row's caption (ITM; below)                | generative  |
| ``input_ids`` / ``attention_mask``       | BOS "English caption:" caption EOS (ITG)          | generative  |
| ``labels``                               | those ids, IGNORE on padding and on the prefix but its last token | generative |

Masks are ``ids > 0``. The negative caption of a row: the original draws a random other pair of the dataset with
another image; here it is the next row of the same batch (cyclically) with another image and another caption, or
the empty text (BOS EOS, which the ITM loss ignores) when the batch has none. No augmentation (the original's
stage-2 fine-tuning crops at random and flips). Bad pairs are skipped and counted (not JSON, no string image or
caption, an empty caption, a missing image file).

Rows go through the pipeline of train/data/pipeline.py (shuffle, shards, the checkpointable iterator) with
:func:`caption_rows` as the row format, one pair per row.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial

import numpy as np

from internvl_jax.clip import MAX_TEXT_LENGTH, preprocess, tokenize
from train.loss import IGNORE

from .meta import Record
from .packing import MALFORMED, Drop, Packer, PackConfig, RowFormat, _is_skipped
from .sample import Skipped, _Bad, json_object

STAGES = ("contrastive", "generative")
ITG_PREFIX = "English caption:"  # the original's image-grounded generation prefix


@dataclasses.dataclass(frozen=True)
class CaptionSettings:
    """What preparing a pair needs: the tokenizer (``internvl_jax.processing.Tokenizer``: encode, bos_id, eos_id),
    the model's image size and the text length L."""

    tokenizer: object
    image_size: int
    max_length: int = MAX_TEXT_LENGTH


def parse_pair(text: str) -> tuple[str, str]:
    """A JSONL line -> (image path, caption). Raises ``_Bad`` naming what is wrong."""
    item = json_object(text, ("image", "caption"))
    if not item["caption"].strip():
        raise _Bad("the pair has an empty caption")
    return item["image"], item["caption"]


def itg_tokens(tokenizer, caption: str, max_length: int, prefix: str = ITG_PREFIX) -> tuple[np.ndarray, np.ndarray]:
    """The generation text: (ids int32 [L] = BOS + prefix + caption (truncated so EOS stays) + EOS, right-padded
    with 0; labels int32 [L]: the ids, IGNORE on padding and on the BOS + prefix positions but the last, as the
    original masks ``labels[:, :len(prefix ids) - 1]``). Prefix and caption are tokenised apart, as there."""
    head = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + list(
        tokenizer.encode(prefix, add_special_tokens=False))
    row = head + list(tokenizer.encode(caption, add_special_tokens=False))[: max_length - len(head) - 1]
    row.append(tokenizer.eos_id)
    ids = np.zeros(max_length, np.int32)
    ids[: len(row)] = row
    labels = np.where(ids > 0, ids, IGNORE).astype(np.int32)
    labels[: len(head) - 1] = IGNORE
    return ids, labels


def prepare_caption(record: Record, spec, settings: CaptionSettings, rng=None) -> dict | Skipped:
    """One pair -> a row dict (``pixel_values`` [S, S, 3]; int32 [L] ``summarize``, ``caption``, ``itg_ids``,
    ``itg_labels``; ``image``, ``dataset``, ``line``), or Skipped(dataset, line, reason). Deterministic (no
    augmentation), so ``rng`` is unused."""
    del rng
    try:
        image, caption = parse_pair(record.text)
        path = image if os.path.isabs(image) else os.path.join(spec.root, image)
        if not os.path.isfile(path):
            raise _Bad(f"image {path} does not exist")
    except _Bad as e:
        return Skipped(record.dataset, record.line, str(e))
    tok, length = settings.tokenizer, settings.max_length
    itg_ids, itg_labels = itg_tokens(tok, caption, length)
    return {"pixel_values": preprocess([path], "classification", settings.image_size)[0],
            "summarize": tokenize(tok, [caption], max_length=length)[0],
            "caption": tokenize(tok, [caption], max_length=length, prefix="")[0],
            "itg_ids": itg_ids, "itg_labels": itg_labels, "image": path, "dataset": record.dataset,
            "line": record.line}


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionPiece:
    """A prepared pair in a row (see :func:`prepare_caption`); ``tokens``: the summarize text's real tokens."""

    pixel_values: np.ndarray
    summarize: np.ndarray
    caption: np.ndarray
    itg_ids: np.ndarray
    itg_labels: np.ndarray
    image: str
    dataset: str
    line: int
    first: bool = True  # pairs are never split
    split: bool = False

    @property
    def tokens(self) -> int:
        return int(np.sum(self.summarize > 0))

    @property
    def tiles(self) -> int:
        return 1


class CaptionPacker(Packer):
    """Prepared pairs (or Skipped) -> one :class:`CaptionPiece` or one :class:`Drop` each."""

    def expand(self, item) -> list:
        if _is_skipped(item):
            return [Drop(item.dataset, item.line, item.reason)]
        s = self.cfg.tile_size
        if np.shape(item["pixel_values"]) != (s, s, 3):
            return [Drop(item["dataset"], item["line"], MALFORMED, 0,
                         f"pixel_values {np.shape(item['pixel_values'])}, expected ({s}, {s}, 3)")]
        return [CaptionPiece(**item)]


def caption_pack_config(max_length: int, image_size: int) -> PackConfig:
    """One pair per row: L text positions, one image of ``image_size``."""
    return PackConfig(max_tokens=max_length, max_tiles=1, tile_size=image_size, img_context_id=-1, packing=False,
                      split=False)


def negative_index(pieces: list[CaptionPiece], i: int) -> int | None:
    """The row whose caption is row ``i``'s negative: the next one, cyclically, with another image and another
    caption; None when there is none."""
    n = len(pieces)
    for k in range(1, n):
        j = (i + k) % n
        if pieces[j].image != pieces[i].image and not np.array_equal(pieces[j].caption, pieces[i].caption):
            return j
    return None


def caption_batch_shapes(stage: str, rows: int, max_length: int, image_size: int) -> dict[str, tuple]:
    """Batch key -> (shape, dtype) of a stage's batch (the pixels in float32 here; the trainer sends them in the
    compute dtype)."""
    if stage not in STAGES:
        raise ValueError(f"unknown InternVL 1.0 stage {stage!r}; use one of {', '.join(STAGES)}")
    texts = ("input_ids",) if stage == "contrastive" else (
        "input_ids", "attention_mask", "labels", "summarize_input_ids", "summarize_attention_mask",
        "positive_input_ids", "positive_attention_mask", "negative_input_ids", "negative_attention_mask")
    shapes = {"pixel_values": ((rows, image_size, image_size, 3), np.float32)}
    shapes.update({k: ((rows, max_length), np.int32) for k in texts})
    return shapes


def build_caption_batch(rows: list[list[CaptionPiece]], cfg: PackConfig, batch_size: int, *, stage: str,
                        empty: np.ndarray) -> dict[str, np.ndarray]:
    """The pairs of ``batch_size`` rows -> the stage's batch (the module docstring's keys). ``empty``: the empty
    text's ids [L] (BOS EOS), the negative of a row without one. A caption batch is always full (the training
    stream repeats; contrastive rows cannot be padding)."""
    if len(rows) != batch_size:
        raise ValueError(f"build_caption_batch: {len(rows)} rows for a batch of {batch_size}: caption batches are "
                         "full (the training stream repeats)")
    pieces = [r[0] for r in rows]
    stack = lambda name: np.stack([getattr(p, name) for p in pieces])  # noqa: E731
    pixels = stack("pixel_values").astype(np.float32)
    if stage == "contrastive":
        return {"pixel_values": pixels, "input_ids": stack("summarize")}
    if stage != "generative":
        raise ValueError(f"unknown InternVL 1.0 stage {stage!r}; use one of {', '.join(STAGES)}")
    negatives = []
    for i in range(batch_size):
        j = negative_index(pieces, i)
        negatives.append(empty if j is None else pieces[j].caption)
    texts = {"input_ids": stack("itg_ids"), "summarize_input_ids": stack("summarize"),
             "positive_input_ids": stack("caption"), "negative_input_ids": np.stack(negatives)}
    batch = {"pixel_values": pixels, "labels": stack("itg_labels"), **texts}
    for name, ids in texts.items():
        batch[name.replace("input_ids", "attention_mask")] = (ids > 0).astype(np.int32)
    return batch


def caption_rows(stage: str, tokenizer, max_length: int) -> RowFormat:
    """The row format of a stage's pairs (:class:`~train.data.packing.RowFormat`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown InternVL 1.0 stage {stage!r}; use one of {', '.join(STAGES)}")
    empty = tokenize(tokenizer, [""], max_length=max_length, prefix="")[0]
    return RowFormat(CaptionPacker, partial(build_caption_batch, stage=stage, empty=empty))


class CaptionPrepare:
    """``prepare(record, rng)`` for image-text meta files (picklable, for worker processes)."""

    def __init__(self, specs, settings: CaptionSettings):
        self.specs = {s.name: s for s in specs}
        self.settings = settings

    def __call__(self, record, rng=None):
        return prepare_caption(record, self.specs[record.dataset], self.settings, rng)
