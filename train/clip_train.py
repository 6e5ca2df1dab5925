"""Training InternVL 1.0 (:class:`~internvl_jax.clip_model.InternVLCLIP`): its two pre-training stages as presets.

| stage        | loss                                       | trainable (path rules, ``train.optim`` lr_rules)         |
|--------------|--------------------------------------------|-----------------------------------------------------------|
| contrastive  | InfoNCE(clip_projector(ViT), text)         | ViT, QLLaMA's LLM weights, clip_projector, text_projection, logit_scale (``freeze_vit``: not the ViT) |
| generative   | ITM + ITC + ITG (:mod:`train.clip_losses`) | query tokens, QLLaMA's cross-attention, clip_projector2, itm_head, logit_scale |

The stage-2 split is the original's (its module comments: ViT, QLLaMA, clip_projector and text_projection frozen).
On a ``mesh`` the params go to the sharding the rules give them, the batch is split over the batch axes, and the
contrastive terms score each shard's rows against the features all-gathered from every shard
(:func:`~train.contrastive.gathered_clip_loss`). The optimiser, freezing, clipping and the non-finite guard are
the trainer's own (``train.optim``, :func:`train.step.apply_gradients`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvl_jax.clip_model import InternVLCLIP, abstract_clip_params
from sharding.place import activate, batch_spec, shard_batch, shardings

from .clip_losses import contrastive_loss, stage2_losses
from .contrastive import clip_loss, gathered_clip_loss
from .optim import OptimConfig, build_optimizer, trainable_grads, trainable_mask
from .state import TrainState
from .step import apply_gradients, frozen_cut

_STAGE2_ONLY = ((r"cross_attn/", 0.0), (r"^query_tokens$", 0.0), (r"^clip_projector2/", 0.0), (r"^itm_head/", 0.0))
STAGE_RULES: dict[str, tuple] = {
    "contrastive": _STAGE2_ONLY,
    "contrastive_frozen_vit": _STAGE2_ONLY + ((r"^vision/", 0.0),),
    "generative": ((r"cross_attn/", 1.0), (r"^qllama/", 0.0), (r"^vision/", 0.0), (r"^clip_projector/", 0.0),
                   (r"^text_projection$", 0.0)),
}


def stage_loss(stage: str) -> Callable:
    """The loss of a stage: ``loss(model, params, batch, contrastive=...) -> (loss, metrics)``."""
    if stage.startswith("contrastive"):
        return lambda model, params, batch, contrastive: (lambda l: (l, {"loss_itc": l}))(
            contrastive_loss(model, params, batch, contrastive=contrastive))
    if stage == "generative":
        def generative(model, params, batch, contrastive):
            out = stage2_losses(model, params, batch, contrastive=contrastive)
            return out["loss"], {k: v for k, v in out.items() if k != "loss"}
        return generative
    raise ValueError(f"unknown InternVL 1.0 stage {stage!r}; use one of {', '.join(STAGE_RULES)}")


def optim_for(stage: str, optim: OptimConfig) -> OptimConfig:
    """``optim`` with the stage's freezing rules in front of its own lr rules."""
    if stage not in STAGE_RULES:
        raise ValueError(f"unknown InternVL 1.0 stage {stage!r}; use one of {', '.join(STAGE_RULES)}")
    return dataclasses.replace(optim, lr_rules=tuple(optim.lr_rules) + STAGE_RULES[stage])


def make_clip_step(model: InternVLCLIP, tx, optim: OptimConfig, stage: str, params, mesh=None, rules="fsdp"):
    """``step(state, batch) -> (state, metrics)`` (pure; jit it). metrics: ``loss``, the stage's parts,
    ``grad_norm`` (trainable gradients), ``logit_scale`` (exp of the raw parameter), ``finite``."""
    loss_of = stage_loss(stage)
    trainable = trainable_mask(optim, params)
    if mesh is None:
        contrastive = clip_loss
    else:
        axes = batch_spec(1, rules)[0]
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        contrastive = partial(gathered_clip_loss, mesh=mesh, batch_axes=axes)

    def step(state: TrainState, batch: dict):
        def loss_fn(p):
            return loss_of(model, frozen_cut(p, trainable), batch, contrastive)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, grad_norm, finite = apply_gradients(state, grads, loss, tx, state.rng,
                                                   grad_view=lambda g: trainable_grads(optim, state.params, g))
        return state, {"loss": loss, **parts, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                       "logit_scale": jnp.exp(state.params["logit_scale"])}

    return step


def train_clip(model: InternVLCLIP, params, batches: Iterable[dict], *, stage: str = "contrastive", steps: int,
               optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.05), mesh=None,
               rules="fsdp", on_step: Callable | None = None, seed: int = 0):
    """Train ``steps`` optimiser steps of ``stage`` on host batches (dicts of numpy arrays: ``pixel_values``
    [B, H, W, 3] and ``input_ids`` [B, L] for the contrastive stage; the stage-2 keys of :mod:`train.clip_losses`
    for the generative one). Returns (params, list of per-step metric dicts of floats). ``on_step(step, metrics)``
    is called after each step (progress)."""
    optim = optim_for(stage, optim)
    tx = build_optimizer(optim, params, steps)
    step = make_clip_step(model, tx, optim, stage, params, mesh, rules)
    if mesh is None:
        place = lambda b: b  # noqa: E731
    else:  # the optimiser moments follow the params' shardings (zeros_like keeps them)
        params = jax.device_put(params, shardings(abstract_clip_params(model.config, boxed=True), mesh, rules))
        place = lambda b: shard_batch(b, mesh, rules)  # noqa: E731
    state = TrainState.create(params, tx, jax.random.PRNGKey(seed))
    run = jax.jit(step, donate_argnums=0)
    history = []
    batches = iter(batches)
    for i in range(steps):
        batch = place(next(batches))
        if mesh is None:
            state, metrics = run(state, batch)
        else:
            with activate(mesh, rules):
                state, metrics = run(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        history.append(metrics)
        if on_step is not None:
            on_step(i + 1, metrics)
    return nn.unbox(state.params), history
