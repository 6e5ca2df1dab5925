"""Packing prepared samples into static-shaped rows (pure numpy, host side).

A *Sample* (train/data/sample.py) is one conversation, unpadded: ``input_ids`` / ``labels`` (not shifted) /
``positions`` [n], ``pixel_values`` uint8 [k, S, S, 3] (levels: the model normalises them), plus ``dataset`` and
``line``. A *row* holds several samples under a token budget L and a tile budget T (the static shapes of one
compiled step):

- ``input_ids`` int32 [L] (pad ``pad_id``), ``labels`` int32 [L], shifted per sample (labels[i] is the target of
  position i; IGNORE at each sample's last token and on padding), ``loss_weights`` float32 [L],
- ``positions`` [L] int32 (float32 with V2PE) as the sample gives them (they restart per sample; padding 0),
- ``segment_ids`` int32 [L] (1..k per sub-sample, 0 = padding), ``pixel_values`` uint8 [T, S, S, 3] (the
  sub-samples' tiles in order, zero padding) and ``tile_mask`` bool [T].

The packer is greedy and deterministic (next-fit): samples enter the current row in stream order while both
budgets hold; the first that does not fit starts the next row. An image span (``<img>``, its IMG_CONTEXT tokens,
``</img>``) is never split, so the IMG_CONTEXT tokens of a row are filled in order from that row's tiles.

A sample longer than L follows the original's rule (OpenGVLab/InternVL
``internvl_chat/internvl/train/dataset_packed.py``, ``PackedDataset.split_buffer`` and ``update_buffer_list``):

- The cut goes at L tokens. If the token at the cut belongs to an image span (``<img>``, IMG_CONTEXT or
  ``</img>``), the cut moves back to that span's ``<img>``, and the right-hand piece starts there. If the cut is
  in text, the right-hand piece starts at the next ``<img>`` after the cut: the text between the cut and that
  image is dropped, and when no image follows, the whole rest of the sample is dropped. Cutting repeats on the
  right-hand piece while it is longer than L.
- Of a split sample, a piece is kept only if it has at least one tile and more than 1/256 of its positions are
  supervised (``check_valid``). So an over-long *text-only* sample is dropped entirely.
- A piece (or an unsplit sample) with more tiles than T is dropped (the original logs an error and skips it);
  there is no splitting by tiles.
- Pieces keep their original positions (the right-hand piece does not restart at 0), labels are shifted over
  the whole sample before cutting, and each piece is its own sub-sample for the loss weights and segment ids.
- Where the original would loop forever (one image span alone longer than L), the rest of the sample is dropped.

With ``split=False`` an over-long sample is skipped instead. Skipped samples and dropped pieces never raise:
they are counted by reason in :class:`PackStats` and logged once per (dataset, line, reason).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from train.loss import IGNORE

log = logging.getLogger(__name__)

LOSS_MODES = ("token", "sample", "square")
ROW_KEYS = ("input_ids", "labels", "loss_weights", "positions", "segment_ids", "pixel_values", "tile_mask")

# skip / drop reasons of the packer itself (prepare's own reasons come through as they are)
TOO_LONG = "longer than the token budget (splitting is off)"
TOO_MANY_TILES = "more tiles than the tile budget"
IMAGE_TOO_LONG = "an image span longer than the token budget"
PIECE_NO_IMAGE = "split piece without an image (dropped, as the original)"
PIECE_FEW_LABELS = "split piece with too few supervised tokens (dropped, as the original)"
TEXT_AFTER_CUT = "text between a cut and the next image (dropped, as the original)"
EMPTY = "empty sample"
MALFORMED = "malformed sample"
PREPARE_RAISED = "prepare raised"


# ----------------------------------------------------------------------------------------------
# Labels and loss weights
# ----------------------------------------------------------------------------------------------

def shift_labels(labels) -> np.ndarray:
    """int [n] unshifted labels of one sample -> int32 [n] aligned ones: out[i] = labels[i + 1], IGNORE last."""
    labels = np.asarray(labels, np.int32)
    out = np.full_like(labels, IGNORE)
    out[:-1] = labels[1:]
    return out


def len2weight(x, mode: str) -> np.ndarray:
    """Weight of each supervised token of a sub-sample with ``x`` supervised tokens (float32, x of any shape).

    "token" -> 1, "sample" -> 1 / x, "square" -> 1 / sqrt(x); 0 when x == 0 (the original's ``len2weight``).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"loss weight mode {mode!r} is not one of {', '.join(LOSS_MODES)}")
    x = np.asarray(x, np.float64)
    safe = np.maximum(x, 1.0)
    w = {"token": np.ones_like(x), "sample": 1.0 / safe, "square": 1.0 / np.sqrt(safe)}[mode]
    return np.where(x == 0, 0.0, w).astype(np.float32)


def loss_weights(labels_shifted, mode: str, segment_ids=None) -> np.ndarray:
    """float32 [n] per-position weights w(x) of shifted labels [n]; 0 where the label is IGNORE.

    x = supervised positions of the position's sub-sample: the whole array, or each segment id of
    ``segment_ids`` int [n] (a packed row; padding has IGNORE labels, so weight 0).
    """
    labels = np.asarray(labels_shifted)
    valid = labels != IGNORE
    if segment_ids is None:
        return np.where(valid, len2weight(valid.sum(), mode), 0.0).astype(np.float32)
    seg = np.asarray(segment_ids)
    counts = np.bincount(seg[valid], minlength=int(seg.max(initial=0)) + 1)
    return np.where(valid, len2weight(counts[seg], mode), 0.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Configuration, events and statistics
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PackConfig:
    """Budgets and token ids of the packer.

    max_tokens: L; max_tiles: T (may be 0 for text-only runs); tile_size: S (tiles are [S, S, 3]);
    img_context_id: the IMG_CONTEXT id; img_start_id / img_end_id: ``<img>`` / ``</img>`` (None: the span is the
    IMG_CONTEXT run alone); tokens_per_tile: IMG_CONTEXT tokens per tile; loss_mode: token | sample | square;
    packing: False puts one sample per row (plain SFT; rows never mix samples); split: the original's rule for
    over-long samples (False: skip them); v2pe: float32 positions; min_supervised_ratio: ``check_valid``'s bound
    for split pieces; max_segments: pieces per row at most (0: any number).
    """

    max_tokens: int
    max_tiles: int
    tile_size: int
    img_context_id: int
    img_start_id: int | None = None
    img_end_id: int | None = None
    tokens_per_tile: int = 256
    loss_mode: str = "square"
    packing: bool = True
    split: bool = True
    v2pe: bool = False
    min_supervised_ratio: float = 1 / 256
    pad_id: int = 0
    max_segments: int = 0  # pieces per row at most (0: no bound; preference rows: the static pairs per row)

    def __post_init__(self):
        if self.max_tokens < 1 or self.max_tiles < 0 or self.tile_size < 1 or self.tokens_per_tile < 1:
            raise ValueError(
                f"PackConfig needs max_tokens >= 1, max_tiles >= 0, tile_size >= 1 and tokens_per_tile >= 1; got "
                f"max_tokens={self.max_tokens}, max_tiles={self.max_tiles}, tile_size={self.tile_size}, "
                f"tokens_per_tile={self.tokens_per_tile}")
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"PackConfig.loss_mode={self.loss_mode!r} is not one of {', '.join(LOSS_MODES)}")

    @classmethod
    def for_model(cls, config, tokenizer=None, **kwargs) -> PackConfig:
        """Tile size, tokens per tile and image ids from an ``InternVLConfig`` (and a ``Tokenizer`` for the
        ``<img>`` / ``</img>`` ids); budgets and switches as keyword arguments."""
        ids = {"img_context_id": config.image_token_id}
        if tokenizer is not None:
            ids.update(img_context_id=tokenizer.img_context_id, img_start_id=tokenizer.img_start_id,
                       img_end_id=tokenizer.img_end_id)
        return cls(tile_size=config.image_size, tokens_per_tile=config.tokens_per_tile, **{**ids, **kwargs})

    @property
    def positions_dtype(self):
        return np.float32 if self.v2pe else np.int32


@dataclasses.dataclass(frozen=True, eq=False)
class Piece:
    """A sample, or one piece of a split sample, ready to enter a row. Arrays [n] / [k, S, S, 3]; labels shifted."""

    input_ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    pixel_values: np.ndarray
    dataset: str
    line: int
    first: bool  # the first kept piece of its sample (so the sample counts once)
    split: bool  # cut from an over-long sample

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @property
    def tiles(self) -> int:
        return len(self.pixel_values)


@dataclasses.dataclass(frozen=True)
class Drop:
    """A skipped sample or a dropped piece: counted by ``reason``; ``tokens`` lost; ``detail`` only for the log.

    Same fields as train/data/sample.py's ``Skipped`` (dataset, line, reason), which the packer also accepts.
    """

    dataset: str
    line: int
    reason: str
    tokens: int = 0
    detail: str = ""


@dataclasses.dataclass
class PackStats:
    """Counts over some rows (one row, a batch, or a whole run).

    rows: rows produced (padding rows of a last, short batch included); tokens / tiles: non-padding tokens and
    real tiles placed; token_capacity / tile_capacity: rows x L and rows x T; samples: input samples with a piece
    in these rows; segments: sub-samples placed; split_pieces: placed pieces cut from over-long samples;
    dropped_tokens: tokens of samples and pieces that went into no row; skipped: {reason: count} of skipped
    samples and dropped pieces; members: (dataset, line) of each placed sub-sample in order (per batch only, not
    kept in running totals nor in the iterator state).
    """

    rows: int = 0
    tokens: int = 0
    tiles: int = 0
    token_capacity: int = 0
    tile_capacity: int = 0
    samples: int = 0
    segments: int = 0
    split_pieces: int = 0
    dropped_tokens: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    members: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    _COUNTS = ("rows", "tokens", "tiles", "token_capacity", "tile_capacity", "samples", "segments", "split_pieces",
               "dropped_tokens")

    @property
    def fill_tokens(self) -> float:
        """Tokens used / (rows x L)."""
        return self.tokens / self.token_capacity if self.token_capacity else 0.0

    @property
    def fill_tiles(self) -> float:
        """Tiles used / (rows x T) (0 when T = 0)."""
        return self.tiles / self.tile_capacity if self.tile_capacity else 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add(self, other: PackStats, *, members: bool = True) -> PackStats:
        """Adds ``other``'s counts into this one (in place) and returns it."""
        for name in self._COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        if members:
            self.members.extend(other.members)
        return self

    def metrics(self) -> dict[str, float]:
        """Flat float metrics: fill rates, counts, and ``skipped/<reason>`` per reason."""
        out = {"fill_tokens": self.fill_tokens, "fill_tiles": self.fill_tiles, "samples": float(self.samples),
               "segments": float(self.segments), "split_pieces": float(self.split_pieces),
               "dropped_tokens": float(self.dropped_tokens), "skipped": float(self.skipped_total)}
        out.update({f"skipped/{reason}": float(n) for reason, n in sorted(self.skipped.items())})
        return out

    def to_state(self) -> dict[str, Any]:
        """JSON-able counts (no members), for the iterator state."""
        return {**{name: int(getattr(self, name)) for name in self._COUNTS}, "skipped": dict(self.skipped)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PackStats:
        return cls(**{name: int(state[name]) for name in cls._COUNTS}, skipped=dict(state["skipped"]))


# ----------------------------------------------------------------------------------------------
# One sample -> pieces and drops
# ----------------------------------------------------------------------------------------------

def image_spans(input_ids, cfg: PackConfig) -> list[tuple[int, int]]:
    """[(start, end)) of every image span of a sample: a run of IMG_CONTEXT ids with the ``<img>`` just before
    and the ``</img>`` just after it when those ids are configured and present."""
    ids = np.asarray(input_ids)
    is_ctx = np.concatenate([[False], ids == cfg.img_context_id, [False]])
    edges = np.flatnonzero(is_ctx[1:] != is_ctx[:-1])
    spans = []
    for s, e in zip(edges[::2].tolist(), edges[1::2].tolist()):
        if cfg.img_start_id is not None and s > 0 and ids[s - 1] == cfg.img_start_id:
            s -= 1
        if cfg.img_end_id is not None and e < len(ids) and ids[e] == cfg.img_end_id:
            e += 1
        spans.append((s, e))
    return spans


def split_ranges(n: int, spans: list[tuple[int, int]], max_tokens: int) -> list[tuple[str, int, int]]:
    """The original's cuts of a sample of ``n`` tokens with image ``spans`` [(start, end)) under ``max_tokens``.

    Returns (kind, start, end) ranges in order: "piece" (kept if valid), "text" (text after a cut dropped as the
    original does), "image" (the rest, starting with one image span longer than the budget). A sample that fits
    gives [("piece", 0, n)].
    """
    out, start = [], 0
    while n - start > max_tokens:
        cut = start + max_tokens
        inside = next((s for s, e in spans if s <= cut < e), None)
        if inside is not None:  # the cut would enter an image: cut before its <img>
            if inside == start:  # that image alone exceeds the budget (the original would loop forever)
                out.append(("image", start, n))
                return out
            out.append(("piece", start, inside))
            start = inside
            continue
        out.append(("piece", start, cut))
        following = next((s for s, _ in spans if s > cut), None)
        if following is None:
            out.append(("text", cut, n))
            return out
        if following > cut:
            out.append(("text", cut, following))
        start = following
    out.append(("piece", start, n))
    return out


def _is_skipped(item) -> bool:
    return not isinstance(item, dict) and all(hasattr(item, a) for a in ("dataset", "line", "reason"))


def tile_levels(pixels, dataset: str, line: int) -> np.ndarray:
    """A sample's ``pixel_values`` as uint8 [k, S, S, 3]; a TypeError for another dtype (rows carry the tiles'
    levels, a quarter of float32's bytes to the devices, and the model normalises them)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"packing: sample {dataset}:{line} has {pixels.dtype} pixel_values; rows carry uint8 levels "
                        "(the model normalises them on the device)")
    return pixels


def _check_sample(sample: dict, cfg: PackConfig) -> str | None:
    """Why a Sample dict breaks the contract (train/data/sample.py), or None."""
    missing = [k for k in ("input_ids", "labels", "positions", "pixel_values") if k not in sample]
    if missing:
        return f"missing keys {missing} (has {sorted(sample)})"
    n = np.shape(sample["input_ids"])
    if len(n) != 1 or np.shape(sample["labels"]) != n or np.shape(sample["positions"]) != n:
        return (f"input_ids {np.shape(sample['input_ids'])}, labels {np.shape(sample['labels'])} and positions "
                f"{np.shape(sample['positions'])} must be equal 1-D shapes")
    pv = np.shape(sample["pixel_values"])
    if len(pv) != 4 or pv[1:] != (cfg.tile_size, cfg.tile_size, 3):
        return f"pixel_values has shape {pv}, expected [k, {cfg.tile_size}, {cfg.tile_size}, 3]"
    return None


class Packer:
    """Turns Samples (or Skipped) into :class:`Piece` and :class:`Drop` events, and counts/logs drops once."""

    def __init__(self, cfg: PackConfig):
        self.cfg = cfg
        self._warned: set[tuple[str, int, str]] = set()

    def expand(self, item) -> list[Piece | Drop]:
        """One prepared item -> its events in order (see the module docstring for the rules)."""
        if _is_skipped(item):
            return [Drop(item.dataset, item.line, item.reason, getattr(item, "tokens", 0),
                         getattr(item, "detail", ""))]
        dataset = str(item.get("dataset", "?")) if isinstance(item, dict) else "?"
        line = int(item.get("line", 0)) if isinstance(item, dict) else 0
        if not isinstance(item, dict):
            return [Drop(dataset, line, MALFORMED, 0, f"not a Sample dict nor Skipped: {type(item).__name__}")]
        problem = _check_sample(item, self.cfg)
        if problem:
            return [Drop(dataset, line, MALFORMED, 0, problem)]
        cfg = self.cfg
        ids = np.asarray(item["input_ids"], np.int32)
        n = len(ids)
        if n == 0:
            return [Drop(dataset, line, EMPTY)]
        positions = np.asarray(item["positions"])
        if positions.dtype.kind == "f" and not cfg.v2pe:
            raise TypeError(f"packing: sample {dataset}:{line} has float positions (V2PE) but PackConfig.v2pe is "
                            "False; set v2pe=True so rows carry float32 positions")
        positions = positions.astype(cfg.positions_dtype)
        raw_labels = np.asarray(item["labels"])
        labels = shift_labels(raw_labels)
        pixels = tile_levels(item["pixel_values"], dataset, line)
        spans = image_spans(ids, cfg)
        # tiles before each token index: IMG_CONTEXT tokens fill the tiles in order
        ctx_before = np.concatenate([[0], np.cumsum(ids == cfg.img_context_id)])
        if ctx_before[-1] != len(pixels) * cfg.tokens_per_tile or any(
                ctx_before[e] % cfg.tokens_per_tile for _, e in spans):
            return [Drop(dataset, line, MALFORMED, n,
                         f"{int(ctx_before[-1])} IMG_CONTEXT tokens in spans {spans} do not make whole tiles of "
                         f"{cfg.tokens_per_tile} tokens for {len(pixels)} tiles")]
        if n > cfg.max_tokens and not cfg.split:
            return [Drop(dataset, line, TOO_LONG, n, f"{n} tokens > {cfg.max_tokens}")]
        ranges = split_ranges(n, spans, cfg.max_tokens)
        split = len(ranges) > 1
        events: list[Piece | Drop] = []
        first = True
        for kind, s, e in ranges:
            if kind == "text":
                events.append(Drop(dataset, line, TEXT_AFTER_CUT, e - s, f"tokens [{s}, {e}) of {n}"))
                continue
            if kind == "image":
                events.append(Drop(dataset, line, IMAGE_TOO_LONG, e - s, f"tokens [{s}, {e}) of {n}"))
                continue
            t0, t1 = ctx_before[s] // cfg.tokens_per_tile, ctx_before[e] // cfg.tokens_per_tile
            supervised = int((raw_labels[s:e] != IGNORE).sum())  # check_valid reads the unshifted labels
            reason = None
            if split and t1 == t0:
                reason = PIECE_NO_IMAGE
            elif split and not supervised / (e - s) > cfg.min_supervised_ratio:
                reason = PIECE_FEW_LABELS
            elif t1 - t0 > cfg.max_tiles:
                reason = TOO_MANY_TILES
            if reason is not None:
                events.append(Drop(dataset, line, reason, e - s,
                                   f"tokens [{s}, {e}) of {n}, {t1 - t0} tiles (T = {cfg.max_tiles})"))
                continue
            events.append(Piece(ids[s:e], labels[s:e], positions[s:e], pixels[t0:t1], dataset, line, first, split))
            first = False
        return events

    def note(self, drop: Drop) -> None:
        """Logs a drop once per (dataset, line, reason)."""
        key = (drop.dataset, drop.line, drop.reason)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("skipped %s line %d: %s%s", drop.dataset, drop.line, drop.reason,
                        f" ({drop.detail})" if drop.detail else "")


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------

def empty_rows(rows: int, cfg: PackConfig) -> dict[str, np.ndarray]:
    """``rows`` padding rows: each array of the module docstring with a leading [rows] (zeros are allocated
    lazily by the OS, so the big pixel array costs only the tiles written into it)."""
    L, T, S = cfg.max_tokens, cfg.max_tiles, cfg.tile_size
    return {
        "input_ids": np.full((rows, L), cfg.pad_id, np.int32),
        "labels": np.full((rows, L), IGNORE, np.int32),
        "loss_weights": np.zeros((rows, L), np.float32),
        "positions": np.zeros((rows, L), cfg.positions_dtype),
        "segment_ids": np.zeros((rows, L), np.int32),
        "pixel_values": np.zeros((rows, T, S, S, 3), np.uint8),
        "tile_mask": np.zeros((rows, T), bool),
    }


def write_row(row: dict[str, np.ndarray], pieces: list[Piece], cfg: PackConfig) -> None:
    """Writes pieces (fitting both budgets) into one padding row (arrays [L] / [T, S, S, 3] / [T]) in place."""
    n, t = sum(p.tokens for p in pieces), sum(p.tiles for p in pieces)
    if n > cfg.max_tokens or t > cfg.max_tiles:
        raise ValueError(f"write_row: {len(pieces)} pieces hold {n} tokens and {t} tiles, over the budgets "
                         f"L = {cfg.max_tokens}, T = {cfg.max_tiles}")
    at, tile = 0, 0
    for seg, p in enumerate(pieces, start=1):
        sl = slice(at, at + p.tokens)
        row["input_ids"][sl] = p.input_ids
        row["labels"][sl] = p.labels
        row["loss_weights"][sl] = loss_weights(p.labels, cfg.loss_mode)
        row["positions"][sl] = p.positions
        row["segment_ids"][sl] = seg
        row["pixel_values"][tile:tile + p.tiles] = p.pixel_values
        at, tile = at + p.tokens, tile + p.tiles
    row["tile_mask"][:tile] = True


def build_row(pieces: list[Piece], cfg: PackConfig) -> dict[str, np.ndarray]:
    """Pieces (fitting both budgets) -> one padded row (the module docstring's arrays)."""
    row = {k: v[0] for k, v in empty_rows(1, cfg).items()}
    write_row(row, pieces, cfg)
    return row


def build_batch(rows: list[list[Piece]], cfg: PackConfig, batch_size: int) -> dict[str, np.ndarray]:
    """The pieces of up to ``batch_size`` rows -> a batch [B, ...], written in place (rows past the given ones
    are padding)."""
    if len(rows) > batch_size:
        raise ValueError(f"build_batch: {len(rows)} rows for a batch of {batch_size}")
    batch = empty_rows(batch_size, cfg)
    for b, pieces in enumerate(rows):
        write_row({k: v[b] for k, v in batch.items()}, pieces, cfg)
    return batch


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """What rows hold: ``packer(cfg)`` turns prepared items into events (a :class:`Packer`), ``build_batch(rows,
    cfg, batch_size)`` writes the pieces of the rows into a batch. SFT samples by default (:data:`SFT_ROWS`);
    preference pairs in ``train/data/pairs.py``."""

    packer: Callable[[PackConfig], Packer]
    build_batch: Callable[[list, PackConfig, int], dict]


SFT_ROWS = RowFormat(Packer, build_batch)


class StreamPacker:
    """Next-fit packing of a pulled stream, resumable from a small cursor.

    ``next_item()`` returns the next prepared item (raises StopIteration at the end); ``source_state()``, if
    given, returns the source's state *before* the next item is read. The cursor (:meth:`cursor`) is the source
    state before the pending item was read plus the index of the pending event among that item's events:
    restoring the source to it and calling :meth:`restore` with the index resumes exactly (the item is read and
    expanded again, deterministically).
    """

    def __init__(self, cfg: PackConfig, next_item: Callable[[], Any],
                 source_state: Callable[[], Any] | None = None, packer: Packer | None = None):
        self.cfg = cfg
        self.packer = packer or Packer(cfg)
        self._next_item = next_item
        self._source_state = source_state
        self._events: list | None = None
        self._k = 0
        self._resume = 0
        self._state_before = None
        self.leftover = PackStats()  # drops read after the last row of an ended stream

    def _peek(self):
        while self._events is None or self._k >= len(self._events):
            self._state_before = self._source_state() if self._source_state else None
            self._events = None
            item = self._next_item()  # StopIteration ends the stream
            self._events = self.packer.expand(item)
            self._k, self._resume = self._resume, 0
        return self._events[self._k]

    def cursor(self) -> tuple[Any, int]:
        """(source state before the pending item, pending event index); between rows only."""
        if self._events is None or self._k >= len(self._events):
            return (self._source_state() if self._source_state else None), self._resume
        return self._state_before, self._k

    def restore(self, event_index: int) -> None:
        """Forget buffered events; the next item read (the source already restored) resumes at ``event_index``."""
        self._events, self._k, self._resume = None, 0, int(event_index)

    def next_row(self) -> tuple[dict[str, np.ndarray], PackStats]:
        """The next row and its stats; StopIteration when the stream ends with no row left."""
        pieces, stats = self.next_pieces()
        return build_row(pieces, self.cfg), stats

    def next_pieces(self) -> tuple[list[Piece], PackStats]:
        """The pieces of the next row and its stats (see :meth:`next_row`)."""
        cfg = self.cfg
        pieces: list[Piece] = []
        stats = PackStats()
        tokens = tiles = 0
        while True:
            try:
                event = self._peek()
            except StopIteration:
                if not pieces:  # the stream ended: drops seen since the last row wait in `leftover`
                    self.leftover = stats
                    raise
                break
            if isinstance(event, Drop):
                self.packer.note(event)
                stats.skipped[event.reason] = stats.skipped.get(event.reason, 0) + 1
                stats.dropped_tokens += event.tokens
                self._k += 1
                continue
            fits = (tokens + event.tokens <= cfg.max_tokens and tiles + event.tiles <= cfg.max_tiles
                    and not (cfg.max_segments and len(pieces) >= cfg.max_segments)
                    if cfg.packing else not pieces)
            if not fits:
                break
            pieces.append(event)
            tokens, tiles = tokens + event.tokens, tiles + event.tiles
            stats.samples += event.first
            stats.split_pieces += event.split
            stats.members.append((event.dataset, event.line))
            self._k += 1
        stats.rows, stats.segments, stats.tokens, stats.tiles = 1, len(pieces), tokens, tiles
        stats.token_capacity, stats.tile_capacity = cfg.max_tokens, cfg.max_tiles
        return pieces, stats


def pack(items: Iterable, cfg: PackConfig, totals: PackStats | None = None
         ) -> Iterator[tuple[dict[str, np.ndarray], PackStats]]:
    """Packs a stream of Samples / Skipped into (row, row stats), greedily in stream order.

    ``totals``, if given, accumulates every row's counts (members too) and, at the end of a finite stream, the
    drops read after its last row.
    """
    it = iter(items)
    packer = StreamPacker(cfg, it.__next__)
    while True:
        try:
            row, stats = packer.next_row()
        except StopIteration:
            if totals is not None:
                totals.add(packer.leftover)
            return
        if totals is not None:
            totals.add(stats)
        yield row, stats


def empty_stats(rows: int, cfg: PackConfig) -> PackStats:
    """Stats of ``rows`` padding rows (they count in the capacity, so fill rates stay honest)."""
    return PackStats(rows=rows, token_capacity=rows * cfg.max_tokens, tile_capacity=rows * cfg.max_tiles)
