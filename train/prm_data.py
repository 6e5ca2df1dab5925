"""Step-labelled data -> critic training conversations (the VisualPRM format of :mod:`internvl_jax.critic`).

One JSONL line per judged answer, the layout of the original's VisualPRM data pipeline (OpenGVLab/InternVL
``internvl_chat/tools/reasoning_data_pipeline/visualprm_data_pipeline_postprocess.py`` reads these keys)::

    {"image": "a.jpg", "question": "How many shapes are there?",
     "steps_with_score": [{"step": "There is a red circle.", "score": 0.75}, {"step": "Final answer: one", "score": 0.0}]}

A step is ``+`` when its Monte-Carlo ``score`` is above ``threshold`` (the original's ``--mc-threshold``, default
0), or it gives its label directly as ``"label": "+"`` / ``"-"``. ``image`` may be absent (text-only), a path
or a list of paths. ``early_stop`` ends the conversation at the first ``-`` step (the original's ``--early-stop``);
``mode="outcome"`` gives one judgement of the whole answer, by its last step's label (``item2conv_orm``).

The output lines are InternVL conversations (system turn first) with ``"supervise": "first_token"``, so the
trainer's loss falls on the judgement tokens only (train.data.sample).
"""

from __future__ import annotations

import json
import os

from internvl_jax.critic import BAD, GOOD, MODES, PRM_SYSTEM_PROMPT, judgement_messages

__all__ = ["PRMDataError", "prm_conversation", "write_prm_dataset"]


class PRMDataError(ValueError):
    """A step-labelled record that cannot be converted; the message names the file, the line and the key."""


def _labels(steps, threshold: float, where: str) -> tuple[list[str], list[str]]:
    if not isinstance(steps, list) or not steps:
        raise PRMDataError(f"{where}: 'steps_with_score' must be a non-empty list of steps")
    texts, labels = [], []
    for k, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("step"), str):
            raise PRMDataError(f"{where}: steps_with_score[{k}] must be an object with a string 'step'")
        if "label" in step:
            if step["label"] not in (GOOD, BAD):
                raise PRMDataError(f"{where}: steps_with_score[{k}].label is {step['label']!r}: expected '+' or '-'")
            label = step["label"]
        elif isinstance(step.get("score"), (int, float)) and not isinstance(step.get("score"), bool):
            label = GOOD if step["score"] > threshold else BAD
        else:
            raise PRMDataError(f"{where}: steps_with_score[{k}] has neither a number 'score' nor a 'label'")
        texts.append(step["step"])
        labels.append(label)
    return texts, labels


def prm_conversation(item: dict, *, mode: str = "process", threshold: float = 0.0, early_stop: bool = False,
                     system_message: str = PRM_SYSTEM_PROMPT, where: str = "record") -> dict:
    """One step-labelled record -> one training conversation record (see the module docstring). ``where`` names
    the record in errors (file:line)."""
    if not isinstance(item, dict):
        raise PRMDataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        raise PRMDataError(f"{where}: 'question' must be a non-empty string")
    steps, labels = _labels(item.get("steps_with_score"), threshold, where)
    if early_stop and BAD in labels:
        cut = labels.index(BAD) + 1
        steps, labels = steps[:cut], labels[:cut]
    if mode == "outcome":
        labels = labels[-1:]
    elif mode not in MODES:
        raise PRMDataError(f"{where}: mode {mode!r}: expected one of {', '.join(MODES)}")
    record = {"conversations": [{"from": "system", "value": system_message}], "supervise": "first_token"}
    for m in judgement_messages(question, steps, labels, mode=mode):  # the image placeholder: the reader's rule
        record["conversations"].append({"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]})
    if item.get("image") not in (None, "", []):
        record["image"] = item["image"]
    return record


def write_prm_dataset(source, folder: str, name: str = "prm", *, root: str | None = None, **options) -> str:
    """Convert step-labelled records (a JSONL path, or a list of dicts) into ``folder/<name>.jsonl`` and a meta JSON
    ``folder/<name>_meta.json`` naming it (image paths relative to ``root``, default the source's folder); returns
    the meta path. options: those of :func:`prm_conversation`."""
    os.makedirs(folder, exist_ok=True)
    if isinstance(source, str):
        with open(source, encoding="utf-8") as f:
            lines = [(f"{source}:{i + 1}", line) for i, line in enumerate(f) if line.strip()]
        items = []
        for where, line in lines:
            try:
                items.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise PRMDataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        root = root or os.path.dirname(os.path.abspath(source))
    else:
        items = [(f"record {i}", item) for i, item in enumerate(source)]
        root = root or folder
    annotation = os.path.join(os.path.abspath(folder), f"{name}.jsonl")
    with open(annotation, "w", encoding="utf-8") as f:
        for where, item in items:
            f.write(json.dumps(prm_conversation(item, where=where, **options)) + "\n")
    meta = os.path.join(os.path.abspath(folder), f"{name}_meta.json")
    with open(meta, "w", encoding="utf-8") as f:
        json.dump({name: {"root": os.path.abspath(root), "annotation": annotation, "length": len(items)}}, f, indent=2)
    return meta
