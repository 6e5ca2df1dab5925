"""A process reward model (PRM) in the VisualPRM format: step scores of candidate answers from an InternVL critic.

VisualPRM (Wang et al. 2025, arXiv 2503.10291) is an InternVL model fine-tuned to judge a solution step by step.
Its conversation, as the original's data pipeline writes it (OpenGVLab/InternVL,
``internvl_chat/tools/reasoning_data_pipeline/visualprm_data_pipeline_postprocess.py``, ``item2conv_prm`` and
``item2conv_orm``; the system prompt from ``.../utils/constants.py``, ``PRM_SYSTEM_PROMPT``):

* the system message :data:`PRM_SYSTEM_PROMPT`;
* the first user turn ``"### Question:\\n{question}\\n\\n### Solution Process:\\n{step 1}"`` (the image placeholder in
  front, as for any first turn with an image), each later step a user turn of its own;
* after each step an assistant turn holding the judgement, ``+`` (correct so far) or ``-``;
* steps are the answer cut at blank lines (``"\\n\\n"``).

The outcome-reward form (``mode="outcome"``) puts the whole answer after ``### Solution Process:`` in one user turn,
judged once.

Scoring puts ``+`` in every judgement turn and runs each candidate's conversation once, all candidates in one
batched forward: the part they share (system prompt, question, image tiles through the vision tower) runs once
into a KV cache repeated to every candidate's row, then all their steps run in one batch on top of it. The step
score is P(+) against P(-) at the position that predicts each judgement token, ``sigmoid(logit(+) - logit(-))``,
which is the original's softmax over the two tokens. The token layout is
:func:`internvl_jax.processing.sft_labels`' (the judgement positions are the first supervised token of each
assistant turn), the same that critic training (``train.prm_data``) supervises.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .generate import init_cache, unrolled_params
from .processing.positions import v2pe_positions
from .processing.processor import Processor, bucketed_tiles
from .processing.templates import IMAGE_PLACEHOLDER, SFT_TEMPLATES, IGNORE_INDEX, expand_image_tokens, sft_labels

__all__ = ["AGGREGATES", "MODES", "PRM_SYSTEM_PROMPT", "CriticInputs", "aggregate", "critic_inputs",
           "judgement_messages", "judgement_positions", "judgement_token_ids", "pack_rows", "score_answers",
           "split_steps", "step_scores"]

# VisualPRM's system prompt, verbatim: a checkpoint trained with it expects exactly these words.
PRM_SYSTEM_PROMPT = """
You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will provide a problem statement followed by the first step of the solution process. For each subsequent turn, I will give you a new step in the solution. Your role is to assess whether the solution process is correct up to the current step.

- In the **first round**, I will input the problem and the first step of the solution process.
- In **each subsequent round**, I will provide the next step in the solution.

For each step, you should:

- Respond with **"+"** if you believe the solution process is correct up to this step.
- Respond with **"-"** if you detect any issues or errors in the process up to this step.

Please note:
- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or justifications.

Your task is to verify the accuracy and correctness of each step in the given solution process.
""".strip()

GOOD, BAD = "+", "-"
STEP_SEPARATOR = "\n\n"
MODES = ("process", "outcome")
AGGREGATES = ("mean", "min", "last")


def split_steps(answer: str) -> list[str]:
    """The steps of an answer: its pieces between blank lines (``"\\n\\n"``), stripped, empty ones dropped; an
    answer without text is one empty step (so that it is still judged)."""
    steps = [s.strip() for s in answer.split(STEP_SEPARATOR)]
    return [s for s in steps if s] or [""]


def judgement_messages(question: str, steps: list[str], labels=None, *, mode: str = "process",
                       image: bool = False) -> list[dict]:
    """The critic's user/assistant turns for one answer (the system message apart): see the module docstring.
    labels: one ``+`` / ``-`` (or bool) per judgement (process: per step; outcome: one), default all ``+``
    (the placeholder scoring reads P(+) at). image: put ``<image>\\n`` in front of the first turn."""
    if mode not in MODES:
        raise ValueError(f"critic mode {mode!r}: expected one of {', '.join(MODES)}")
    turns = [STEP_SEPARATOR.join(steps)] if mode == "outcome" else list(steps)
    labels = [GOOD] * len(turns) if labels is None else [
        (GOOD if v else BAD) if isinstance(v, (bool, np.bool_)) else v for v in labels]
    if len(labels) != len(turns) or any(v not in (GOOD, BAD) for v in labels):
        raise ValueError(f"expected {len(turns)} judgement(s) of '+' or '-' ({mode} mode, {len(steps)} steps), got "
                         f"{labels!r}")
    messages = []
    for k, (turn, label) in enumerate(zip(turns, labels)):
        if k == 0:
            turn = f"### Question:\n{question}\n\n### Solution Process:\n{turn}"
            if image and IMAGE_PLACEHOLDER not in question:
                turn = f"{IMAGE_PLACEHOLDER}\n{turn}"
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": label}]
    return messages


def judgement_token_ids(processor: Processor) -> tuple[int, int]:
    """(id of ``+``, id of ``-``) as they are tokenized at the start of an assistant turn; each must be one token."""
    ids = []
    for text in (GOOD, BAD):
        piece = processor.tokenizer.encode(text, add_special_tokens=False)
        if len(piece) != 1:
            raise ValueError(f"the critic's tokenizer encodes {text!r} as {len(piece)} tokens {piece}: expected one "
                             "token per judgement")
        ids.append(int(piece[0]))
    if ids[0] == ids[1]:
        raise ValueError(f"the critic's tokenizer gives '+' and '-' the same id {ids[0]} (unknown tokens?)")
    return ids[0], ids[1]


def judgement_positions(labels: np.ndarray) -> np.ndarray:
    """Positions whose logits predict a judgement: the token before the first supervised token of each assistant
    turn. labels: int [L] of :func:`sft_labels` (IGNORE_INDEX off the answers). Returns int [J]."""
    supervised = labels != IGNORE_INDEX
    starts = np.nonzero(supervised & ~np.concatenate([[False], supervised[:-1]]))[0]
    return starts - 1


@dataclass
class CriticInputs:
    """One batch of candidate conversations for :func:`step_scores`, split where they part: the tokens every
    candidate shares (system prompt, question, image: the prefix, run once) and each candidate's own rest.

    prefix_ids int32 [1, P] (left-padded from slot ``prefix_start``), prefix_positions [1, P]; suffix_ids int32
    [C, S] (right-padded), suffix_positions [C, S] (int32, or float32 V2PE); judge_index int32 [C, J]: the suffix
    positions predicting each judgement (padded with 0), judge_mask bool [C, J]; pixel_values float32
    [1, T, H, W, 3] / tile_mask bool [1, T]: the prefix's images (or None).
    """

    prefix_ids: np.ndarray
    prefix_positions: np.ndarray
    prefix_start: int
    suffix_ids: np.ndarray
    suffix_positions: np.ndarray
    judge_index: np.ndarray
    judge_mask: np.ndarray
    pixel_values: np.ndarray | None = None
    tile_mask: np.ndarray | None = None


def _bucket(n: int, step: int = 64) -> int:
    return max(step, -(-n // step) * step)


def pack_rows(rows: list[np.ndarray], judges: list[np.ndarray], positions: list[np.ndarray], pixel_values=None,
              tile_mask=None, *, image_token_id: int = -1) -> CriticInputs:
    """Token rows (int [L_c] each), their judgement positions and positions -> :class:`CriticInputs`: the prefix
    is their longest common run of tokens (and positions), cut before the first judgement position of any row;
    lengths and the judgement count are bucketed (multiples of 64 and 4), so a few programs serve any batch."""
    shortest = min(len(r) for r in rows)
    first = np.stack([r[:shortest] for r in rows])
    same = (first == first[0]).all(axis=0) & (np.stack([p[:shortest] for p in positions]) == positions[0][:shortest]).all(axis=0)
    common = int(np.argmin(same)) if not same.all() else shortest
    cut = max(1, min(common, min(int(j.min()) for j in judges)))
    if any((r[cut:] == image_token_id).any() for r in rows):
        raise ValueError("image tokens after the candidates' common prefix: the images must come in the question")
    p_len, s_len = _bucket(cut), _bucket(max(len(r) for r in rows) - cut)
    count = -(-max(len(j) for j in judges) // 4) * 4
    dtype = positions[0].dtype
    prefix_ids = np.zeros((1, p_len), np.int32)
    prefix_ids[0, p_len - cut:] = rows[0][:cut]
    prefix_positions = np.zeros((1, p_len), dtype)
    prefix_positions[0, p_len - cut:] = positions[0][:cut]
    prefix_positions[0, :p_len - cut] = positions[0][0]  # padding: the first real position (never above the rest)
    suffix_ids = np.zeros((len(rows), s_len), np.int32)
    suffix_positions = np.zeros((len(rows), s_len), dtype)
    index = np.zeros((len(rows), count), np.int32)
    mask = np.zeros((len(rows), count), bool)
    for b, (row, judge, pos) in enumerate(zip(rows, judges, positions)):
        n = len(row) - cut
        suffix_ids[b, :n] = row[cut:]
        suffix_positions[b, :n] = pos[cut:]
        suffix_positions[b, n:] = pos[-1] + 1 + np.arange(s_len - n)  # after the row: causal, read by nothing
        index[b, :len(judge)], mask[b, :len(judge)] = judge - cut, True
    return CriticInputs(prefix_ids, prefix_positions, p_len - cut, suffix_ids, suffix_positions, index, mask,
                        pixel_values, tile_mask)


def critic_inputs(processor: Processor, question: str, answers: list[list[str]], images=(), *,
                  mode: str = "process", system_message: str = PRM_SYSTEM_PROMPT,
                  max_tiles: int | None = None) -> CriticInputs:
    """Candidates (each a list of steps; their counts may differ) -> one :class:`CriticInputs`."""
    if processor.template is None or processor.template.name not in SFT_TEMPLATES:
        name = None if processor.template is None else processor.template.name
        raise ValueError(f"the critic needs a checkpoint with one of the chat templates {', '.join(SFT_TEMPLATES)}; "
                         f"it has {name or 'the transformers-native prompt format'}")
    if not answers:
        raise ValueError("no candidate answers to score")
    if len(images) > 1 and question.count(IMAGE_PLACEHOLDER) != len(images):
        raise ValueError(f"{len(images)} images need one {IMAGE_PLACEHOLDER} each in the question, found "
                         f"{question.count(IMAGE_PLACEHOLDER)}")
    c = processor.config
    tiles = processor.image_tiles(images, max_tiles) if images else []
    rows, judges, positions = [], [], []
    for steps in answers:
        messages = judgement_messages(question, steps, mode=mode, image=bool(images))
        messages[0]["content"] = expand_image_tokens(messages[0]["content"], [len(t) for t in tiles],
                                                     c.tokens_per_tile)
        ids, labels = sft_labels(processor.template, messages, processor.tokenizer, system_message=system_message)
        if processor.max_length is not None and len(ids) > processor.max_length:
            raise ValueError(f"a candidate's critic conversation is {len(ids)} tokens, more than the critic's "
                             f"maximum of {processor.max_length}")
        rows.append(ids)
        judges.append(judgement_positions(labels))
        positions.append(np.arange(len(ids), dtype=np.int32) if processor.v2pe_stride is None else v2pe_positions(
            ids, c.image_token_id, processor.v2pe_stride, tokens_per_tile=c.tokens_per_tile))
    pixels, tile_mask = bucketed_tiles(tiles) if tiles else (None, None)
    return pack_rows(rows, judges, positions, pixels, tile_mask, image_token_id=c.image_token_id)


@partial(jax.jit, static_argnames=("model", "prefix_start"))
def _judgement_logits(model, params, prefix_ids, prefix_positions, suffix_ids, suffix_positions, judge_index,
                      pixel_values, tile_mask, token_ids, *, prefix_start):
    """float32 [C, J, 2]: the logits of (+, -) at the judgement positions. The prefix (and its image tiles) runs
    once into a KV cache, which is repeated to the C rows; their suffixes then run in one batch on top of it."""
    p, (c, s) = prefix_ids.shape[1], suffix_ids.shape
    cache = init_cache(model.config, 1, p + s)
    start = jnp.full((1,), prefix_start, jnp.int32)
    _, cache = model.apply({"params": params}, prefix_ids, pixel_values, tile_mask, positions=prefix_positions,
                           cache=cache, cache_index=0, cache_start=start, last_only=True)
    cache = jax.tree.map(lambda x: jnp.repeat(x, c, axis=0), cache)
    hidden = model.apply({"params": params}, suffix_ids, positions=suffix_positions, cache=cache, cache_index=p,
                         cache_start=jnp.repeat(start, c), return_hidden=True)
    picked = jnp.take_along_axis(hidden, judge_index[..., None], axis=1)  # [C, J, E]
    return model.apply({"params": params}, picked, method="head")[..., token_ids]


def step_scores(model, params, batch: CriticInputs, token_ids: tuple[int, int]) -> np.ndarray:
    """float32 [C, J]: P(+) against P(-) at each judgement (NaN where ``judge_mask`` is False). token_ids: the
    ids of ``+`` and ``-`` (:func:`judgement_token_ids`). params: best in the generation layout
    (:func:`internvl_jax.generate.unrolled_params`, converted once; the KV cache runs in it); params as stored are
    converted on every call."""
    model, params = model.clone(unrolled=True), unrolled_params(params, model.config)
    logits = _judgement_logits(model, params, jnp.asarray(batch.prefix_ids), jnp.asarray(batch.prefix_positions),
                               jnp.asarray(batch.suffix_ids), jnp.asarray(batch.suffix_positions),
                               jnp.asarray(batch.judge_index), batch.pixel_values, batch.tile_mask,
                               jnp.asarray(token_ids, jnp.int32), prefix_start=int(batch.prefix_start))
    score = np.asarray(jax.nn.sigmoid(logits[..., 0] - logits[..., 1]))
    return np.where(batch.judge_mask, score, np.nan)


def aggregate(scores: np.ndarray, how: str = "mean") -> np.ndarray:
    """Answer scores [C] from step scores [C, J] (NaN = no step): their mean, min or last valid value."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate {how!r}: expected one of {', '.join(AGGREGATES)}")
    if how == "mean":
        return np.nanmean(scores, axis=1)
    if how == "min":
        return np.nanmin(scores, axis=1)
    last = (~np.isnan(scores)).sum(axis=1) - 1
    return scores[np.arange(len(scores)), last]


def score_answers(model, params, processor: Processor, question: str, answers: list[str], images=(), *,
                  mode: str = "process", how: str = "mean", system_message: str = PRM_SYSTEM_PROMPT,
                  max_tiles: int | None = None) -> tuple[list[list[float]], np.ndarray]:
    """Score candidate answers (strings; steps cut by :func:`split_steps`) in one batched critic forward.
    Returns (the judgement scores of each answer: one per step, or one in outcome mode; answer scores [C])."""
    steps = [split_steps(a) for a in answers]
    batch = critic_inputs(processor, question, steps, images, mode=mode, system_message=system_message,
                          max_tiles=max_tiles)
    scores = step_scores(model, params, batch, judgement_token_ids(processor))
    per_answer = [[float(v) for v in row[m]] for row, m in zip(scores, batch.judge_mask)]
    return per_answer, aggregate(scores, how)
