"""A synthetic preference set (MMPR format) from the demo's visual questions: each question with its correct
answer as ``chosen`` and a wrong answer of the same kind as ``rejected`` (another colour, shape, count or side),
drawn from the record's own seeded generator. The ``mpo_demo`` train config's setup hook writes it."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .config import TrainConfig

DATA = "data"  # under the workdir
TRAIN_IMAGES, HELDOUT_IMAGES = 1000, 64


def _wrong_answers(kind: str, answer: str) -> list[str]:
    from .demo_data import COLOURS, COUNT_WORDS, SHAPES

    if kind == "position":
        options = ("left", "right") if answer in ("left", "right") else ("top", "bottom")
    else:
        options = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNT_WORDS}[kind]
    return [o for o in options if o != answer]


def preference_records(annotation: str, seed: int) -> list[dict]:
    """The demo JSONL ``annotation`` (one question per record) as preference records with a wrong answer each."""
    out = []
    with open(annotation, encoding="utf-8") as f:
        for index, line in enumerate(f):
            record = json.loads(line)
            (kind, *_), (human, gpt) = record["kinds"], record["conversations"][:2]
            wrong = _wrong_answers(kind, gpt["value"])
            rng = np.random.default_rng([seed, 7, index])
            out.append({"image": record["image"], "question": human["value"], "chosen": gpt["value"],
                        "rejected": wrong[int(rng.integers(len(wrong)))], "kind": kind})
    return out


def write_preference_set(folder: str, *, train: int = TRAIN_IMAGES, heldout: int = HELDOUT_IMAGES,
                         seed: int = 0, kinds: tuple[str, ...] | None = None,
                         shapes: tuple[int, int] | None = None) -> tuple[str, str]:
    """The demo images and questions in ``folder`` (train.demo_data; ``kinds``: the question kinds asked, default
    all; ``shapes``: the (fewest, most) shapes per image, default the demo's) and their preference pairs; returns
    the (training, held-out) meta JSON paths of the pairs. The SFT form of the same questions stays in ``folder``
    (``meta.json``, ``heldout_meta.json``)."""
    from .demo_data import QUESTION_KINDS, SHAPE_COUNTS, write_demo_dataset

    paths = write_demo_dataset(folder, train=train, heldout=heldout, seed=seed, kinds=kinds or QUESTION_KINDS,
                               shapes=shapes or SHAPE_COUNTS)
    metas = []
    for split, meta in (("train", paths.meta), ("heldout", paths.heldout_meta)):
        with open(meta) as f:
            (name, entry), = json.load(f).items()
        pairs = os.path.join(folder, f"{split}_pairs.jsonl")
        with open(pairs, "w", encoding="utf-8") as f:
            for record in preference_records(entry["annotation"], seed):
                f.write(json.dumps(record) + "\n")
        path = os.path.join(folder, f"{split}_pairs_meta.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({f"{name}_pairs": {**entry, "annotation": pairs}}, f, indent=2)
        metas.append(path)
    return metas[0], metas[1]


def setup(cfg: TrainConfig) -> TrainConfig:
    """Write the preference set and the demo tokenizer under ``<workdir>/data`` once; return ``cfg`` reading them
    (a pure function of the seed, so a resumed run reads the same pairs)."""
    from .demo_data import write_demo_tokenizer

    folder = os.path.join(os.path.abspath(cfg.workdir), DATA)
    done = os.path.join(folder, "complete.json")
    sizes = {"train": TRAIN_IMAGES, "heldout": HELDOUT_IMAGES, "seed": cfg.seed}
    if not (os.path.exists(done) and json.load(open(done)) == sizes):
        write_preference_set(folder, seed=cfg.seed)
        write_demo_tokenizer(os.path.join(folder, "tokenizer"))
        with open(done, "w") as f:
            json.dump(sizes, f)
    data = dataclasses.replace(cfg.data, meta=os.path.join(folder, "train_pairs_meta.json"),
                               eval_meta=os.path.join(folder, "heldout_pairs_meta.json"))
    return cfg.replace(data=data, tokenizer=cfg.tokenizer or os.path.join(folder, "tokenizer"))
