"""Preference pairs (MMPR format) -> packed rows where each pair's two sequences share one set of tiles.

A record is one JSONL line::

    {"image": "a.jpg", "question": "<image>\\nHow many?", "chosen": "Three.", "rejected": "Two."}

``image`` a path, a list of paths, or absent (text-only); the question is prepared exactly as the first human
turn of an SFT record (train/data/sample.py: ``<image>`` placement, tiling, templates, JPEG augmentation), and
each answer becomes one sequence: prompt + answer, labels on the answer only. The tiles are made once per pair.

A preference row holds up to P pairs (``PackConfig.max_segments`` = P pieces), each pair whole (never split,
never across rows): pair j's chosen sequence is segment 2j + 1, its rejected one segment 2j + 2. Besides the
SFT row keys (:data:`~train.data.packing.ROW_KEYS`) a row has

- ``image_index`` int32 [L]: which image token of the row's tiles each IMG_CONTEXT position takes (the rejected
  sequence reads its pair's tiles again: the vision tower runs once per pair);
- ``pair_mask`` bool [P] (real pairs) and ``ref_logps`` float32 [P, 2] (the reference's chosen / rejected
  sequence log-probs when they come from a pre-pass file; 0 otherwise);
- ``loss_weights`` 1 on the chosen answers' tokens (the SFT term's token mean), 0 elsewhere.

Bad pairs are counted and skipped with a warning (once per line): not JSON, a missing or non-string field, an
empty answer, identical answers, a missing image (sample.py's reasons), a pair longer than a row or with more
tiles than a row holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from train.loss import IGNORE

from .meta import Record
from .packing import (
    MALFORMED, TOO_MANY_TILES, Drop, Packer, PackConfig, RowFormat, _is_skipped, empty_rows, shift_labels, tile_levels,
)
from .sample import SampleSettings, Skipped, _Bad, _build, json_object

PAIR_TOO_LONG = "pair longer than the token budget (pairs are never split)"
NO_REFERENCE = "no reference log-probs for the pair in the reference file"
PAIR_KEYS = ("question", "chosen", "rejected")


def pair_conversation(text: str) -> tuple[dict, str]:
    """A preference line -> (an SFT record item with the chosen answer, the rejected answer). Raises ``_Bad``."""
    item = json_object(text, PAIR_KEYS)
    if not item["chosen"].strip() or not item["rejected"].strip():
        raise _Bad("the pair has an empty answer (" + ", ".join(k for k in ("chosen", "rejected")
                                                                 if not item[k].strip()) + ")")
    if item["chosen"] == item["rejected"]:
        raise _Bad("the chosen and rejected answers are identical")
    media = {k: item[k] for k in ("image", "video") if k in item}
    conversation = [{"from": "human", "value": item["question"]}, {"from": "gpt", "value": item["chosen"]}]
    return {**media, "conversations": conversation}, item["rejected"]


def prepare_pair(record: Record, spec, settings: SampleSettings, rng: np.random.Generator,
                 reference: dict | None = None) -> dict | Skipped:
    """One preference record -> a pair dict, or Skipped(dataset, line, reason).

    Pair: ``chosen`` and ``rejected``, each (input_ids int32 [n], labels int32 [n] unshifted, positions [n]);
    ``pixel_values`` uint8 [k, S, S, 3] shared; ``dataset``, ``line``; ``ref`` float32 [2] from ``reference``
    ({(dataset, line): (chosen, rejected) log-probs}) or None.
    """
    try:
        item, rejected = pair_conversation(record.text)
        sample = _build(record, spec, settings, rng, item=item, alternatives=(rejected,))
    except _Bad as e:
        return Skipped(record.dataset, record.line, str(e))
    ref = None
    if reference is not None:
        ref = reference.get((record.dataset, record.line))
        if ref is None:
            return Skipped(record.dataset, record.line, NO_REFERENCE)
        ref = np.asarray(ref, np.float32)
    return {"chosen": (sample["input_ids"], sample["labels"], sample["positions"]),
            "rejected": sample["alternatives"][0], "pixel_values": sample["pixel_values"],
            "dataset": record.dataset, "line": record.line, "ref": ref}


@dataclasses.dataclass(frozen=True, eq=False)
class PairPiece:
    """A pair ready to enter a row: each half (input_ids, labels shifted, positions) [n]; tiles [k, S, S, 3]."""

    chosen: tuple
    rejected: tuple
    pixel_values: np.ndarray
    dataset: str
    line: int
    ref: np.ndarray | None
    first: bool = True  # pairs are never split
    split: bool = False

    @property
    def tokens(self) -> int:
        return len(self.chosen[0]) + len(self.rejected[0])

    @property
    def tiles(self) -> int:
        return len(self.pixel_values)


class PairPacker(Packer):
    """Pairs (or Skipped) -> one :class:`PairPiece` or one :class:`Drop` each."""

    def expand(self, item) -> list:
        if _is_skipped(item):
            return [Drop(item.dataset, item.line, item.reason)]
        cfg = self.cfg
        dataset, line = str(item.get("dataset", "?")), int(item.get("line", 0))
        halves = []
        for name in ("chosen", "rejected"):
            ids, labels, positions = item[name]
            ids = np.asarray(ids, np.int32)
            halves.append((ids, shift_labels(labels), np.asarray(positions).astype(cfg.positions_dtype)))
        pixels = tile_levels(item["pixel_values"], dataset, line)
        for ids, _, _ in halves:
            if int((ids == cfg.img_context_id).sum()) != len(pixels) * cfg.tokens_per_tile:
                return [Drop(dataset, line, MALFORMED, 0, f"{int((ids == cfg.img_context_id).sum())} IMG_CONTEXT "
                             f"tokens for {len(pixels)} tiles of {cfg.tokens_per_tile}")]
        piece = PairPiece(halves[0], halves[1], pixels, dataset, line, item.get("ref"))
        if piece.tokens > cfg.max_tokens:
            return [Drop(dataset, line, PAIR_TOO_LONG, piece.tokens, f"{piece.tokens} tokens > {cfg.max_tokens}")]
        if piece.tiles > cfg.max_tiles:
            return [Drop(dataset, line, TOO_MANY_TILES, piece.tokens, f"{piece.tiles} tiles > {cfg.max_tiles}")]
        return [piece]


def empty_pair_rows(rows: int, cfg: PackConfig) -> dict[str, np.ndarray]:
    """Padding preference rows: the SFT row arrays plus image_index [rows, L], pair_mask [rows, P] and
    ref_logps [rows, P, 2]."""
    batch = empty_rows(rows, cfg)
    batch["image_index"] = np.zeros((rows, cfg.max_tokens), np.int32)
    batch["pair_mask"] = np.zeros((rows, cfg.max_segments), bool)
    batch["ref_logps"] = np.zeros((rows, cfg.max_segments, 2), np.float32)
    return batch


def write_pair_row(row: dict[str, np.ndarray], pieces: list[PairPiece], cfg: PackConfig) -> None:
    """Writes pairs (fitting the budgets) into one padding row (the module docstring's arrays) in place."""
    if len(pieces) > cfg.max_segments or sum(p.tokens for p in pieces) > cfg.max_tokens or \
            sum(p.tiles for p in pieces) > cfg.max_tiles:
        raise ValueError(f"write_pair_row: {len(pieces)} pairs do not fit P = {cfg.max_segments}, "
                         f"L = {cfg.max_tokens}, T = {cfg.max_tiles}")
    at, tile = 0, 0
    for j, p in enumerate(pieces):
        for half, (ids, labels, positions) in enumerate((p.chosen, p.rejected)):
            sl = slice(at, at + len(ids))
            row["input_ids"][sl], row["labels"][sl], row["positions"][sl] = ids, labels, positions
            row["segment_ids"][sl] = 2 * j + 1 + half
            if half == 0:
                row["loss_weights"][sl] = labels != IGNORE
            is_image = ids == cfg.img_context_id
            row["image_index"][sl][is_image] = tile * cfg.tokens_per_tile + np.arange(int(is_image.sum()))
            at += len(ids)
        row["pixel_values"][tile:tile + p.tiles] = p.pixel_values
        tile += p.tiles
        row["pair_mask"][j] = True
        if p.ref is not None:
            row["ref_logps"][j] = p.ref
    row["tile_mask"][:tile] = True


def build_pair_batch(rows: list[list[PairPiece]], cfg: PackConfig, batch_size: int) -> dict[str, np.ndarray]:
    """The pairs of up to ``batch_size`` rows -> a preference batch [B, ...] (padding rows after them)."""
    batch = empty_pair_rows(batch_size, cfg)
    for b, pieces in enumerate(rows):
        write_pair_row({k: v[b] for k, v in batch.items()}, pieces, cfg)
    return batch


PAIR_ROWS = RowFormat(PairPacker, build_pair_batch)


class PairPrepare:
    """``prepare(record, rng)`` for preference meta files (picklable, for worker processes): :func:`prepare_pair`
    with the record's own ``DatasetSpec``, the run's settings and the reference table (or None)."""

    def __init__(self, specs, settings, reference: dict | None = None):
        self.specs = {s.name: s for s in specs}
        self.settings, self.reference = settings, reference

    def __call__(self, record, rng: np.random.Generator):
        return prepare_pair(record, self.specs[record.dataset], self.settings, rng, self.reference)
