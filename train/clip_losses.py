"""InternVL 1.0 training objectives: the contrastive stage (InternVL-C) and the generative stage-2 losses.

Stage 1 (contrastive): symmetric InfoNCE between clip_projector(ViT) and the QLLaMA text features.

Stage 2 (generative, ``internvl_g``'s training forward): one QLLaMA pass over [ITM ; ITC ; ITG] rows of
[96 queries ; text], the images' ViT states repeated for each chunk (:meth:`InternVLCLIP.lm_hidden`):

* ITM (matching): the first B - B//2 rows take the negative captions, the last B//2 the positive ones; the
  matching logits are ``itm_head`` averaged over the query outputs, labels 0 / 1; rows whose mask sums to 2
  (an empty caption) are ignored;
* ITC (contrastive): clip_projector2(query outputs) against the summarize text's state at its last real token
  times text_projection, both normalised, :mod:`train.contrastive` (rows whose mask sums to 5 are ignored);
* ITG (generation): the LM head on the text positions, next-token CE against ``labels`` (-100 ignored).

``loss = loss_itm + loss_itc + loss_itg``. Batches: ``pixel_values`` [B, H, W, 3]; int [B, L]
``{positive,negative,summarize}_input_ids`` and ``_attention_mask``, ``input_ids``, ``attention_mask``, ``labels``.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from internvl_jax.clip_model import InternVLCLIP, eos_index, normalize

from .contrastive import clip_loss, cross_entropy

IGNORE = -100
EMPTY_ITM_TOKENS = 2  # the original's "empty text" rule for the matching captions (BOS + EOS)
EMPTY_ITC_TOKENS = 5  # and for the summarize texts ("summarize:" prefix + EOS)


def _masked_mean(values, ok):
    return jnp.sum(jnp.where(ok, values, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def _rngs(rng):
    """The ``rngs`` of a forward: ViT drop path draws from ``rng`` (None: no drop path)."""
    return None if rng is None else {"dropout": rng}


def contrastive_loss(model: InternVLCLIP, params, batch: dict, *, contrastive: Callable = clip_loss,
                     label_smoothing: float = 0.0, rng=None):
    """Stage 1: InfoNCE between InternVL-C image features and text features. batch: ``pixel_values``
    [B, H, W, 3], ``input_ids`` int [B, L] (right-padded, EOS last). ``contrastive(image, text, logit_scale,
    valid, label_smoothing=...)``: :func:`~train.contrastive.clip_loss` or a gathered variant; ``rng``: drop path
    in the ViT (None: none). float32 []."""
    v = {"params": params}
    image = model.apply(v, batch["pixel_values"], "InternVL-C", method=InternVLCLIP.image_features, rngs=_rngs(rng))
    text = model.apply(v, batch["input_ids"], method=InternVLCLIP.text_features)
    return contrastive(normalize(image), normalize(text), params["logit_scale"], None, label_smoothing=label_smoothing)


def stage2_outputs(model: InternVLCLIP, params, batch: dict, rng=None) -> dict:
    """The stage-2 forward's intermediate arrays: ``hidden`` [3B, Q + L, E], ``itm_logits`` [B, 2],
    ``image_itc`` [B, D] (unnormalised), ``text_itc`` [B, D], ``itg_logits`` [B, L, V], ``backbone`` [B, D].
    ``rng``: drop path in the ViT (None: none)."""
    v = {"params": params}
    b = batch["input_ids"].shape[0]
    neg = b - b // 2
    itm_ids = jnp.concatenate([batch["negative_input_ids"][:neg], batch["positive_input_ids"][neg:]])
    itm_mask = jnp.concatenate([batch["negative_attention_mask"][:neg], batch["positive_attention_mask"][neg:]])
    ids = jnp.concatenate([itm_ids, batch["summarize_input_ids"], batch["input_ids"]])
    mask = jnp.concatenate([itm_mask, batch["summarize_attention_mask"], batch["attention_mask"]])
    vit = model.apply(v, batch["pixel_values"], method=InternVLCLIP.vision_states, rngs=_rngs(rng))
    hidden = model.apply(v, vit, ids, mask, ("full", "separate", "prefix"), method=InternVLCLIP.lm_hidden)
    q = model.config.num_query_token
    itm, itc, itg = jnp.split(hidden, 3)
    last = jnp.take_along_axis(itc[:, q:], eos_index(batch["summarize_attention_mask"])[:, None, None], axis=1)[:, 0]
    pool2 = lambda x: model.apply(v, x, method=lambda m, t: m.clip_projector2(t))  # noqa: E731
    return {
        "hidden": hidden,
        "itm_logits": model.apply(v, itm[:, :q], method=InternVLCLIP.itm_logits),
        "image_itc": pool2(itc[:, :q]).astype(jnp.float32),
        "text_itc": last.astype(jnp.float32) @ params["text_projection"].astype(jnp.float32),
        "itg_logits": model.apply(v, itg[:, q:], method=lambda m, h: m.qllama.head(h)),
        "backbone": model.apply(v, vit, method=lambda m, t: m.clip_projector(t)),
    }


def stage2_losses(model: InternVLCLIP, params, batch: dict, *, contrastive: Callable = clip_loss, rng=None) -> dict:
    """Stage 2: {loss, loss_itm, loss_itc, loss_itg} float32 scalars (see the module docstring); ``rng``: drop
    path in the ViT."""
    out = stage2_outputs(model, params, batch, rng)
    b = batch["input_ids"].shape[0]
    neg = b - b // 2
    itm_tokens = jnp.concatenate([jnp.sum(batch["negative_attention_mask"][:neg], 1),
                                  jnp.sum(batch["positive_attention_mask"][neg:], 1)])
    itm_labels = (jnp.arange(b) >= neg).astype(jnp.int32)
    loss_itm = _masked_mean(cross_entropy(out["itm_logits"], itm_labels), itm_tokens != EMPTY_ITM_TOKENS)
    itc_valid = jnp.sum(batch["summarize_attention_mask"], 1) != EMPTY_ITC_TOKENS
    loss_itc = contrastive(normalize(out["image_itc"]), normalize(out["text_itc"]), params["logit_scale"], itc_valid,
                           label_smoothing=model.config.label_smoothing)
    labels = batch["labels"][:, 1:]
    ok = labels != IGNORE
    token_ce = cross_entropy(out["itg_logits"][:, :-1].reshape(-1, out["itg_logits"].shape[-1]),
                             jnp.where(ok, labels, 0).reshape(-1))
    loss_itg = _masked_mean(token_ce, ok.reshape(-1))
    return {"loss": loss_itm + loss_itc + loss_itg, "loss_itm": loss_itm, "loss_itc": loss_itc, "loss_itg": loss_itg}
