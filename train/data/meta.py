"""The InternVL meta format: a JSON file naming the datasets of a run, and the JSONL lines of each.

A meta file maps a dataset name to its settings::

    {
      "shapes_vqa": {"root": "images/", "annotation": "shapes.jsonl", "repeat_time": 1, "data_augment": true,
                     "max_dynamic_patch": 6, "length": 1000},
      "text_chat":  {"annotation": "chat.jsonl", "repeat_time": 0.5, "weight": 2.0}
    }

Keys (the original's, plus ``weight``):

* ``annotation`` (required): the JSONL file, one conversation per line.
* ``root``: the folder image and video paths of that dataset are relative to (default: the meta file's folder).
* ``repeat_time`` (number > 0, default 1): fractions subsample, integers above 1 repeat (see :func:`records`).
* ``data_augment`` (bool, default False): JPEG re-encoding of every tile (train.data.sample).
* ``max_dynamic_patch`` (int >= 1): overrides the run's tile limit for this dataset.
* ``length`` (int >= 0): the line count the original's meta files record; informational, not checked.
* ``weight`` (number > 0): sampling weight of the dataset in a mixture (None: the pipeline's default).

Relative ``root`` / ``annotation`` paths resolve against the meta file's folder (the original resolves them
against the working directory of the training script; absolute paths mean the same in both). Unknown keys are
an error (a misspelt ``repeat_times`` would otherwise be silently ignored).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

__all__ = ["DatasetSpec", "MetaError", "Record", "read_meta", "records"]


class MetaError(ValueError):
    """A meta file that cannot be used; the message names the file, the dataset and the key."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a meta file, paths absolute."""

    name: str
    annotation: str
    root: str
    repeat_time: float = 1.0
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    length: int | None = None
    weight: float | None = None
    meta_path: str | None = None  # the meta file it came from, for messages


@dataclass(frozen=True)
class Record:
    """One non-blank JSONL line of a dataset, unparsed: ``line`` is 1-based in the annotation file."""

    dataset: str
    line: int
    text: str


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# key -> (check, what a valid value is); `annotation` is handled apart (required, must exist)
_OPTIONAL_KEYS = {
    "root": (lambda v: isinstance(v, str), "a string (a folder path)"),
    "repeat_time": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a number > 0"),
    "data_augment": (lambda v: isinstance(v, bool), "true or false"),
    "max_dynamic_patch": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "length": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "weight": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a number > 0"),
}
_KNOWN_KEYS = ("annotation", *_OPTIONAL_KEYS)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise MetaError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _check_repeat_time(where: str, repeat_time) -> None:
    """The original finetune script asserts that a repeat_time above 1 is an int (1.5 fails there)."""
    if repeat_time > 1 and repeat_time != int(repeat_time):
        raise MetaError(
            f"{where}: 'repeat_time' is {repeat_time!r}; above 1 it must be a whole number (the original "
            "finetune script rejects fractional repeats; write e.g. 2, or a fraction below 1 to subsample)"
        )


def _spec(meta_path: str, name: str, entry) -> DatasetSpec:
    where = f"{meta_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise MetaError(f"{where}: expected an object of settings, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_KNOWN_KEYS))
    if unknown:
        raise MetaError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(_KNOWN_KEYS)}")
    for key, (ok, expected) in _OPTIONAL_KEYS.items():
        if key in entry and not ok(entry[key]):
            raise MetaError(f"{where}: {key!r} must be {expected}, got {entry[key]!r}")
    if "annotation" not in entry:
        raise MetaError(f"{where}: missing the required key 'annotation' (the JSONL file)")
    if not isinstance(entry["annotation"], str) or not entry["annotation"]:
        raise MetaError(f"{where}: 'annotation' must be a file path, got {entry['annotation']!r}")
    base = os.path.dirname(os.path.abspath(meta_path))
    annotation = os.path.normpath(os.path.join(base, entry["annotation"]))
    if not os.path.isfile(annotation):
        raise MetaError(f"{where}: 'annotation' file not found: {annotation}")
    repeat_time = entry.get("repeat_time", 1)
    _check_repeat_time(where, repeat_time)
    return DatasetSpec(
        name=name,
        annotation=annotation,
        root=os.path.normpath(os.path.join(base, entry.get("root", ""))),
        repeat_time=float(repeat_time),
        data_augment=entry.get("data_augment", False),
        max_dynamic_patch=entry.get("max_dynamic_patch"),
        length=entry.get("length"),
        weight=None if entry.get("weight") is None else float(entry["weight"]),
        meta_path=os.path.abspath(meta_path),
    )


def read_meta(path: str | os.PathLike) -> list[DatasetSpec]:
    """The datasets of a meta JSON file, in the file's order. Raises :class:`MetaError` naming the problem."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f, object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        raise MetaError(f"meta file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise MetaError(f"{path}: not valid JSON: {e}") from None
    except MetaError as e:
        raise MetaError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise MetaError(f"{path}: expected an object mapping dataset names to settings, got {type(raw).__name__}")
    if not raw:
        raise MetaError(f"{path}: names no datasets")
    return [_spec(path, name, entry) for name, entry in raw.items()]


def records(spec: DatasetSpec) -> list[Record]:
    """The lines of a dataset's JSONL file as the original ``LazySupervisedDataset.__init__`` selects them.

    The original (``internvl_chat/internvl/train/internvl_chat_finetune.py``) reads ``f.readlines()`` and then:

    * ``repeat_time < 1``: keeps the PREFIX ``lines[:int(len(lines) * repeat_time)]`` (not a random subset;
      ``int`` truncates, in float64, so 0.3 of 10 lines keeps 3 and 0.29 of 100 keeps 28);
    * ``repeat_time > 1``: ``assert isinstance(repeat_time, int)``, then ``lines * repeat_time``: the whole
      file again and again, in order (a fractional value above 1 fails; :func:`read_meta` rejects it with a
      message, and takes 2.0 as 2, which the original's ``isinstance`` check would refuse.
      ``internvl_chat_pretrain.py`` and the gpt-oss finetune script truncate it with ``int`` instead);
    * ``repeat_time == 1``: every line.

    Its packed mode then shuffles the list with ``default_rng(seed=dataset index)``; here the order is the
    file's and the pipeline shuffles. Blank lines: the original keeps them (they count in ``len`` for the
    prefix, and fail at ``json.loads`` when drawn, the sample then being replaced by a random other one). Here
    the prefix is taken over the same count of lines, blank ones included, so the same non-blank lines are
    selected, and blank lines are then dropped silently. Lines keep their text unparsed (a line that is not
    JSON becomes a Skipped sample at preparation); bytes that are not UTF-8 are kept as surrogate escapes.
    """
    with open(spec.annotation, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.readlines()  # universal newlines, as the original's text-mode readlines
    if spec.repeat_time < 1:
        lines = lines[: int(len(lines) * spec.repeat_time)]
    numbered = [Record(spec.name, i + 1, text.rstrip("\r\n")) for i, text in enumerate(lines) if text.strip()]
    if spec.repeat_time > 1:
        numbered = numbered * int(spec.repeat_time)
    return numbered
