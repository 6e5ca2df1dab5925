"""The embedded main job (``internvl-jax demo``): synthetic visual question answering, trained from scratch.

1. :func:`setup` (the ``demo`` train config's setup hook) writes the demo set of :mod:`train.demo_data` (images of
   several sizes and aspect ratios, in the InternVL meta format) and its tokenizer into ``<workdir>/data``, once;
   a rerun on the same workdir finds them and resumes the training.
2. The trainer trains the tiny InternVL of :func:`train.demo_data.demo_model_config` on 8 simulated CPU devices
   with FSDP (``train/configs/demo.py``), checkpoints it and exports it (original layout) to ``<workdir>/export``.
3. :func:`heldout_accuracy` answers every held-out question by greedy generation (exact match of the answer word).
4. The exported checkpoint is loaded back (``load_pretrained``) and answers a few held-out questions through
   ``internvl_jax.chat``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from .config import ConfigError, TrainConfig

DATA = "data"  # under the workdir
TRAIN_IMAGES, HELDOUT_IMAGES = 4000, 200
TURNS = 3  # the most questions per training image: up to three answers for one image encoding


def setup(cfg: TrainConfig) -> TrainConfig:
    """Write the demo data and tokenizer under ``<workdir>/data`` unless a complete copy is there; return ``cfg``
    pointing at them. The files are a pure function of the seed, so a resumed run reads the same data."""
    from .demo_data import DATA_VERSION, SHAPE_SIDES, write_demo_dataset, write_demo_tokenizer

    folder = os.path.join(os.path.abspath(cfg.workdir), DATA)
    done = os.path.join(folder, "complete.json")
    sizes = {"version": DATA_VERSION, "train": TRAIN_IMAGES, "heldout": HELDOUT_IMAGES, "turns": TURNS,
             "seed": cfg.seed, "shape_sides": [list(SHAPE_SIDES[n]) for n in sorted(SHAPE_SIDES)]}  # decides the files
    written = json.load(open(done)) if os.path.exists(done) else None
    checkpoints = os.path.join(os.path.abspath(cfg.workdir), "checkpoints")
    if written not in (None, sizes) and os.path.isdir(checkpoints) and os.listdir(checkpoints):
        # rewriting the data under a run's checkpoints would resume that run on other samples
        raise ConfigError(f"{done}: this workdir's demo data was written with {written}, this version writes {sizes}, "
                          f"and {checkpoints} holds a run trained on the old data; use a new workdir")
    if written != sizes:
        paths = write_demo_dataset(folder, train=TRAIN_IMAGES, heldout=HELDOUT_IMAGES, turns=TURNS, seed=cfg.seed)
        write_demo_tokenizer(os.path.join(folder, "tokenizer"))
        with open(done, "w") as f:
            json.dump(sizes, f)
        meta, heldout = paths.meta, paths.heldout_meta
    else:
        meta, heldout = os.path.join(folder, "meta.json"), os.path.join(folder, "heldout_meta.json")
    data = dataclasses.replace(cfg.data, meta=meta, eval_meta=heldout)
    return cfg.replace(data=data, tokenizer=os.path.join(folder, "tokenizer"))


def heldout_records(cfg: TrainConfig, limit: int | None = None) -> list[dict]:
    """The held-out JSONL records (image path made absolute), at most ``limit``."""
    from .data.meta import read_meta

    (spec,) = read_meta(cfg.data.eval_meta)
    out = []
    with open(spec.annotation) as f:
        for line in f:
            record = json.loads(line)
            record["image"] = os.path.join(spec.root, record["image"])
            out.append(record)
            if limit and len(out) == limit:
                break
    return out


def heldout_accuracy(model, params, processor, records: list[dict], *, batch: int = 32) -> tuple[float, dict]:
    """(exact-match accuracy, {question kind: accuracy}) of greedy answers to the records' first question."""
    from internvl_jax.chat import batch_chat
    from internvl_jax.processing import load_image

    hits, per_kind = 0, collections.defaultdict(lambda: [0, 0])
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        questions = [r["conversations"][0]["value"] for r in chunk]
        images = [[load_image(r["image"])] for r in chunk]
        answers = batch_chat(model, params, processor, questions, images=images,
                             generation_config={"max_new_tokens": 4})
        for r, a in zip(chunk, answers):
            ok = a == r["conversations"][1]["value"]
            hits += ok
            kind = r.get("kinds", ["all"])[0]
            per_kind[kind][0] += ok
            per_kind[kind][1] += 1
    return hits / max(len(records), 1), {k: h / n for k, (h, n) in sorted(per_kind.items())}
