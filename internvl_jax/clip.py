"""InternVL 1.0 as its users call it: image and text features, CLIP logits, zero-shot classification with prompt
ensembling, image-text retrieval, and captioning through QLLaMA.

Preprocessing follows the original's clip_benchmark transforms (PIL bicubic, ImageNet statistics): for
classification Resize(224) of the shorter side then CenterCrop(224); for retrieval Resize((224, 224)). Texts are
``"summarize:" + text``, tokenised with BOS and EOS, truncated to 80 tokens (EOS kept), right-padded with 0.

``mode``: ``InternVL-C`` (ViT + attention pooling) or ``InternVL-G`` (with the QLLaMA query features). Features
returned here are normalised; ``model`` / ``params`` come from :func:`internvl_jax.load_pretrained` on an
InternVL 1.0 checkpoint.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from .clip_model import MODES, InternVLCLIP, normalize
from .generate import _programs_for, cache_length, check_max_new_tokens, greedy_tokens, row_keys, token_logprobs
from .processing.images import load_image
from .processing.pixels import normalize as imagenet_normalize
from .qllama import init_cache as init_qllama_cache

TEXT_PREFIX = "summarize:"
MAX_TEXT_LENGTH = 80
TASKS = ("classification", "retrieval")


def preprocess(images: Sequence, task: str = "classification", size: int = 224) -> np.ndarray:
    """Paths or PIL images -> float32 [N, size, size, 3] (NHWC, ImageNet-normalised).

    classification: the shorter side resized to ``size`` (the longer one to int(size * long / short)), then the
    centre ``size`` x ``size`` crop; retrieval: resized to ``size`` x ``size``. Bicubic, as PIL does it."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    out = []
    for source in images:
        image = load_image(source)
        w, h = image.size
        if task == "retrieval":
            image = image.resize((size, size), Image.BICUBIC)
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(size * long / short)
            image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
            w, h = image.size
            left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        out.append(imagenet_normalize(np.asarray(image)))
    return np.stack(out)


def tokenize(tokenizer, texts: Sequence[str], *, max_length: int = MAX_TEXT_LENGTH, prefix: str = TEXT_PREFIX) -> np.ndarray:
    """Texts -> int32 [N, max_length]: [BOS] + tokens of prefix + text + [EOS], truncated before the EOS so that
    it stays, right-padded with 0. ``tokenizer``: :class:`~internvl_jax.processing.tokenizer.Tokenizer` (or any
    object with ``encode(text, add_special_tokens=False)``, ``bos_id`` and ``eos_id``)."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: InternVL 1.0 pools its text features at the EOS")
    head = [] if bos is None else [bos]
    out = np.zeros((len(texts), max_length), np.int32)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(prefix + text, add_special_tokens=False)
        row = head + list(ids)[: max_length - len(head) - 1] + [eos]
        out[i, : len(row)] = row
    return out


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


@partial(jax.jit, static_argnums=(0, 3))
def _image_features(model, params, pixels, mode):
    return normalize(model.apply({"params": params}, pixels, mode, method=InternVLCLIP.image_features))


@partial(jax.jit, static_argnums=0)
def _text_features(model, params, input_ids):
    return normalize(model.apply({"params": params}, input_ids, method=InternVLCLIP.text_features))


def _batched(fn, x, batch_size: int):
    """fn over rows of x in batches of ``batch_size`` (the last one padded, so one compile), concatenated."""
    n = x.shape[0]
    outs = []
    for i in range(0, n, batch_size):
        chunk = x[i : i + batch_size]
        pad = batch_size - chunk.shape[0] if n > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(np.asarray(fn(chunk))[: batch_size - pad])
    return np.concatenate(outs)


def encode_image(model: InternVLCLIP, params, pixels, mode: str = "InternVL-C", *, batch_size: int = 64) -> np.ndarray:
    """pixels float [N, 224, 224, 3] (:func:`preprocess`) -> normalised image features float32 [N, D]."""
    _check_mode(mode)
    return _batched(lambda p: _image_features(model, params, jnp.asarray(p), mode), np.asarray(pixels), batch_size)


def encode_text(model: InternVLCLIP, params, input_ids, *, batch_size: int = 256) -> np.ndarray:
    """int [M, L] (:func:`tokenize`) -> normalised text features float32 [M, D]."""
    return _batched(lambda t: _text_features(model, params, jnp.asarray(t)), np.asarray(input_ids), batch_size)


def clip_logits(params, image_features, text_features) -> np.ndarray:
    """Normalised [N, D], [M, D] -> logits_per_image float32 [N, M] = exp(logit_scale) * cosine similarity."""
    scale = np.exp(np.float32(params["logit_scale"]))
    return scale * np.asarray(image_features, np.float32) @ np.asarray(text_features, np.float32).T


def zero_shot_weights(model: InternVLCLIP, params, tokenizer, class_names: Sequence[str],
                      templates: Sequence[str]) -> np.ndarray:
    """Prompt ensembling: per class, the mean of its normalised template features (``template.format(name)``),
    normalised again -> float32 [C, D]."""
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    texts = [t.format(name) for name in class_names for t in templates]
    feats = encode_text(model, params, tokenize(tokenizer, texts)).reshape(len(class_names), len(templates), -1)
    mean = feats.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zero_shot_classify(model: InternVLCLIP, params, tokenizer, images, class_names: Sequence[str],
                       templates: Sequence[str] = ("{}",), mode: str = "InternVL-C") -> tuple[np.ndarray, np.ndarray]:
    """Images (paths / PIL images, or preprocessed pixels [N, 224, 224, 3]) -> (predicted class index int [N],
    class probabilities float32 [N, C])."""
    pixels = images if isinstance(images, np.ndarray) else preprocess(images, "classification", model.config.image_size)
    weights = zero_shot_weights(model, params, tokenizer, class_names, templates)
    logits = clip_logits(params, encode_image(model, params, pixels, mode), weights)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    return logits.argmax(axis=-1), probs


def retrieve(model: InternVLCLIP, params, tokenizer, images, texts: Sequence[str], k: int = 5,
             mode: str = "InternVL-C") -> dict:
    """Image-text retrieval: ``text_to_image`` int [M, k] (per text, the best k images) and ``image_to_text``
    int [N, k], best first, with the similarity matrix ``logits_per_image`` [N, M]."""
    pixels = images if isinstance(images, np.ndarray) else preprocess(images, "retrieval", model.config.image_size)
    logits = clip_logits(params, encode_image(model, params, pixels, mode), encode_text(model, params,
                                                                                        tokenize(tokenizer, texts)))
    n, m = logits.shape
    if not 1 <= k <= min(n, m):
        raise ValueError(f"k must lie in 1..{min(n, m)} for {n} images and {m} texts, got {k}")
    top = lambda s: np.argsort(-s, axis=-1, kind="stable")[:, :k]  # noqa: E731
    return {"text_to_image": top(logits.T), "image_to_text": top(logits), "logits_per_image": logits}


@partial(jax.jit, static_argnums=(0, 4))
def _caption_prefill(model, params, pixels, prompt_ids, cache_length):
    """The ViT once, then [queries ; prompt] into a fresh QLLaMA cache: (first token int32 [B], its log-prob
    [B], cache)."""
    v = {"params": params}
    vit = model.apply(v, pixels, method=InternVLCLIP.vision_states)
    cache = init_qllama_cache(model.config, prompt_ids.shape[0], cache_length)
    logits, cache = model.apply(v, vit, prompt_ids, cache, method=InternVLCLIP.caption_prefill)
    token = greedy_tokens(logits[:, 0])
    return token, token_logprobs(logits[:, 0], token), cache


def caption(model: InternVLCLIP, params, pixels, prompt_ids, max_new_tokens: int = 20, *,
            eos_token_id=None, pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Greedy captioning through QLLaMA as the original's ``generate``: a prefill over [queries ; prompt] (queries
    bidirectional and cross-attending to the ViT, text causal) fills a KV cache, then each new token is one
    cached decode step of :mod:`internvl_jax.generate`'s on-device loop (no cross-attention in those steps).

    pixels [B, 224, 224, 3]; prompt_ids int [B, P] (BOS + prompt, no padding). Returns (new token ids int32
    [B, max_new_tokens], each token's log-probability float32 [B, max_new_tokens]). With ``eos_token_id`` (one id
    or several) a row is padded with ``pad_token_id`` after its EOS and the loop stops once every row ended;
    without it nothing stops early."""
    check_max_new_tokens(max_new_tokens)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    b, slot = prompt_ids.shape[0], model.config.num_query_token + prompt_ids.shape[1]
    token, first_lp, cache = _caption_prefill(model, params, jnp.asarray(pixels), prompt_ids,
                                              cache_length(slot, max_new_tokens))
    eos = jnp.asarray(np.atleast_1d(-1 if eos_token_id is None else eos_token_id), jnp.int32)
    loop = _programs_for(None)[1]
    ids, logprobs = loop(model, params, jnp.zeros((b,), jnp.int32), jnp.int32(slot), token,
                         jnp.full((b,), slot, jnp.int32), cache, row_keys(0, b), eos, jnp.int32(pad_token_id),
                         first_lp, max_new_tokens=int(max_new_tokens), sampling=(False, 1.0, 0, 1.0))
    return np.asarray(ids), np.asarray(logprobs)
