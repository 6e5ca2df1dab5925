"""InternVL 1.0's two pre-training stages (:class:`~internvl_jax.clip_model.InternVLCLIP`) as objectives of the
trainer: ``internvl-jax train CONFIG objective=contrastive|generative``.

| stage        | loss                                       | trained by default (path rules, ``train.optim``)         |
|--------------|--------------------------------------------|-----------------------------------------------------------|
| contrastive  | InfoNCE(clip_projector(ViT), text)         | ViT, QLLaMA's LLM weights, clip_projector, text_projection, logit_scale |
| generative   | ITM + ITC + ITG (:mod:`train.clip_losses`) | query tokens, QLLaMA's cross-attention, clip_projector2, itm_head, logit_scale |

The stage-2 split is the original's (its module comments: ViT, QLLaMA, clip_projector and text_projection frozen).
:data:`STAGE_RULES` come last in the run's ``lr_rules`` (:func:`optim_for`): the config's own rules and its
freezing flags (``freeze.freeze_backbone``: the ViT frozen; ``freeze.unfreeze_vit_layers``) win over them.
On the mesh, the contrastive terms score each shard's rows against the features all-gathered from every shard
(:func:`~train.contrastive.gathered_clip_loss`), so the loss is the one of the global batch. The optimiser,
freezing, clipping and the non-finite guard are the trainer's (``train.optim``, :func:`train.step.apply_gradients`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from internvl_jax.clip_model import InternVLCLIP
from sharding.place import batch_spec

from .clip_losses import contrastive_loss, stage2_losses
from .contrastive import gathered_clip_loss
from .optim import OptimConfig
from .state import TrainState
from .step import apply_gradients, frozen_cut

_STAGE2_ONLY = ((r"cross_attn/", 0.0), (r"^query_tokens$", 0.0), (r"^clip_projector2/", 0.0), (r"^itm_head/", 0.0))
STAGE_RULES: dict[str, tuple] = {
    "contrastive": _STAGE2_ONLY,
    "generative": ((r"cross_attn/", 1.0), (r"^qllama/", 0.0), (r"^vision/", 0.0), (r"^clip_projector/", 0.0),
                   (r"^text_projection$", 0.0)),
}


def _check(stage: str) -> None:
    if stage not in STAGE_RULES:
        raise ValueError(f"unknown InternVL 1.0 stage {stage!r}; use one of {', '.join(STAGE_RULES)}")


def stage_loss(stage: str) -> Callable:
    """The loss of a stage: ``loss(model, params, batch, contrastive=..., rng=...) -> (loss, {part: value})``."""
    _check(stage)
    if stage == "contrastive":
        def contrastive(model, params, batch, contrastive, rng):
            loss = contrastive_loss(model, params, batch, contrastive=contrastive, rng=rng)
            return loss, {"loss_itc": loss}
        return contrastive

    def generative(model, params, batch, contrastive, rng):
        out = stage2_losses(model, params, batch, contrastive=contrastive, rng=rng)
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}
    return generative


def optim_for(stage: str, optim: OptimConfig) -> OptimConfig:
    """``optim`` with the stage's rules after its own lr rules (which win)."""
    _check(stage)
    return dataclasses.replace(optim, lr_rules=tuple(optim.lr_rules) + STAGE_RULES[stage])


def make_clip_step(model: InternVLCLIP, tx, stage: str, lr_fn: Callable | None = None, *, trainable=None,
                   grad_view: Callable | None = None, mesh=None, rules="fsdp", dropout: bool = False) -> Callable:
    """``step(state, batch) -> (state, metrics)`` (pure; jit it, donating the state), the trainer's step for an
    InternVL 1.0 stage. trainable / grad_view / lr_fn as for :func:`train.step.make_train_step`; ``mesh``: the
    contrastive terms gather the features over its batch axes (None: one program); dropout: ViT drop path from
    the state's rng. metrics: float32 ``loss``, the stage's parts (``loss_itc``; ``loss_itm``, ``loss_itg``),
    ``grad_norm``, ``lr``, ``finite``, ``logit_scale`` (exp of the raw parameter)."""
    loss_of = stage_loss(stage)
    if mesh is None:
        from .contrastive import clip_loss as contrastive
    else:
        axes = batch_spec(1, rules)[0]
        contrastive = partial(gathered_clip_loss, mesh=mesh, batch_axes=(axes,) if isinstance(axes, str) else axes)

    def step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)

        def loss_fn(p):
            return loss_of(model, frozen_cut(p, trainable), batch, contrastive, step_rng if dropout else None)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new, grad_norm, finite = apply_gradients(state, grads, loss, tx, rng, grad_view=grad_view)
        return new, {"loss": loss, **parts, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                     "lr": jnp.asarray(lr_fn(state.step) if lr_fn else 0.0, jnp.float32),
                     "logit_scale": jnp.exp(new.params["logit_scale"])}

    return step
