"""``chat`` and ``batch_chat`` with the original ``InternVLChatModel`` semantics.

History is a list of (question, answer) pairs; ``<image>`` placeholders are put in front of the first question
when it has none, and the history keeps them, so every turn passes the conversation's images again (as the
original); generation stops at the template's separator token (``<|im_end|>``, ``<|end|>``; NOT the
config's eos id); the answer is the new tokens decoded without special tokens, cut at the separator.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .generate import GenerationArgumentError, check_max_new_tokens, check_sampling, generate, generate_stream
from .processing.processor import Processor, tile_bucket

HF_STOP = "<|im_end|>"  # the transformers-native chat template ends turns with it


def stop_token(processor: Processor) -> tuple[str, int]:
    """(text, id) of the token that ends an answer: the template's separator, or transformers' ``<|im_end|>``."""
    text = processor.template.stop_token if processor.template is not None else HF_STOP
    return text, processor.tokenizer.token_to_id(text)


def answer_text(processor: Processor, tokens, stop_text: str, stop_id: int) -> str:
    """The answer of generated ``tokens``: decoded without special tokens up to the stop token, stripped."""
    tokens = list(tokens)
    if stop_id in tokens:
        tokens = tokens[: tokens.index(stop_id)]
    return processor.tokenizer.decode(tokens, skip_special_tokens=True).split(stop_text)[0].strip()


GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")


def _gen_kwargs(config: dict | None, model) -> dict:
    """``generate``'s keyword arguments from a ``generation_config``, checked before the images are processed (an
    unknown key would otherwise be a TypeError inside ``generate``)."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(GENERATION_KEYS))
    if unknown:
        raise GenerationArgumentError(f"generation_config has unknown key(s) {', '.join(map(repr, unknown))}: "
                                      f"expected some of {', '.join(GENERATION_KEYS)}")
    config.setdefault("max_new_tokens", 1024)  # the original README's default
    check_max_new_tokens(config["max_new_tokens"])
    check_sampling(config.get("do_sample", False), config.get("temperature", 1.0), config.get("top_k", 0),
                   config.get("top_p", 1.0), model.config.text.vocab_size)
    return config


def chat(model, params, processor: Processor, question: str, *, images=(), videos=(), history=None,
         generation_config: dict | None = None, return_history: bool = False, max_tiles: int | None = None,
         on_text: Callable[[str], None] | None = None):
    """One turn: the answer (and the updated history with ``return_history``).

    generation_config: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``.
    max_tiles: tile budget per image (default: the checkpoint's). on_text: called with each new piece of the
    answer as it is generated (streaming).
    """
    history = list(history or [])
    generation = _gen_kwargs(generation_config, model)
    batch = processor(question, images=images, videos=videos, history=history, max_tiles=max_tiles,
                      return_question=True)
    stop_text, stop_id = stop_token(processor)
    inputs = dict(input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                  tile_mask=batch.get("tile_mask"), positions=batch.get("positions"), eos_token_id=stop_id)
    if on_text is None:
        tokens = generate(model, params, **inputs, pad_token_id=stop_id, **generation)[0]
        answer = answer_text(processor, tokens, stop_text, stop_id)
    else:
        tokens, shown = [], ""
        for step in generate_stream(model, params, **inputs, **generation):
            tokens.append(int(step[0]))
            text = answer_text(processor, tokens, stop_text, stop_id)
            if text.startswith(shown) and len(text) > len(shown):
                on_text(text[len(shown):])
                shown = text
        answer = answer_text(processor, tokens, stop_text, stop_id)
    history.append((batch["question"], answer))  # with its placeholders: later turns pass the images again
    return (answer, history) if return_history else answer


def batch_chat(model, params, processor: Processor, questions: list[str], *, images=None,
               generation_config: dict | None = None) -> list[str]:
    """Several independent questions (no history), each with its own images, answered in one batch
    (left padding, as the original). images: one list of images per question, or None."""
    images = images or [[] for _ in questions]
    if len(images) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(images)} image lists")
    generation = _gen_kwargs(generation_config, model)
    samples = [processor(q, images=im) for q, im in zip(questions, images)]
    length = max(s["input_ids"].shape[1] for s in samples)
    tiles = max((s["tile_mask"].sum() for s in samples if "tile_mask" in s), default=0)
    ids = np.zeros((len(samples), length), np.int32)
    mask = np.zeros_like(ids)
    positions = np.zeros((len(samples), length), np.float32) if processor.v2pe_stride is not None else None
    pixels = tile_mask = None
    if tiles:
        t = tile_bucket(int(tiles))
        size = processor.config.image_size
        pixels = np.zeros((len(samples), t, size, size, 3), np.float32)
        tile_mask = np.zeros((len(samples), t), bool)
    for b, s in enumerate(samples):
        n = s["input_ids"].shape[1]
        ids[b, length - n:], mask[b, length - n:] = s["input_ids"][0], 1
        if positions is not None:
            positions[b, length - n:] = s["positions"][0]
        if "tile_mask" in s:
            k = int(s["tile_mask"].sum())
            pixels[b, :k], tile_mask[b, :k] = s["pixel_values"][0, :k], True
    stop_text, stop_id = stop_token(processor)
    out = generate(model, params, input_ids=ids, attention_mask=mask, pixel_values=pixels, tile_mask=tile_mask,
                   positions=positions, eos_token_id=stop_id, pad_token_id=stop_id, **generation)
    return [answer_text(processor, row, stop_text, stop_id) for row in out]
