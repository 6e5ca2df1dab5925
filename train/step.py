"""The train step: one function shared by the trainer, ``bench/step.py`` and ``internvl-jax plan``.

``make_train_step(model, tx, lr_fn)`` gives ``step(state, batch) -> (state, metrics)``:

- the loss is ``sum(loss_weights * CE) / sum(loss_weights)`` over the whole (global) batch, the original's
  ``loss_reduction_all_gather`` semantics; with ``accum_steps`` the rows are cut into micro-batches whose
  gradients are summed, each already divided by the global weight sum, so accumulation gives the same loss and
  gradients as one large batch;
- the logits are made ``vocab_chunk`` positions at a time (:func:`train.loss.weighted_loss_sum`);
- frozen parameters (``trainable`` False) are cut from the backward pass with ``stop_gradient`` (a frozen
  ViT costs no backward), and the optimizer holds no state for them (``train.optim``);
- a non-finite loss or gradient norm leaves params and optimizer state as they were (the step counter still
  advances and ``skipped`` counts it);
- drop path and LoRA dropout draw from the state's rng, split once per step and folded per micro-batch.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from internvl_jax import lora
from internvl_jax.layers import constrain
from internvl_jax.model import InternVL, abstract_params
from sharding.place import batch_spec, shardings
from sharding.rules import get_rules
from sharding.topology import Step

from .loss import weighted_loss_sum
from .state import TrainState, abstract_state

BATCH_KEYS = ("input_ids", "labels", "loss_weights", "positions", "segment_ids", "pixel_values", "tile_mask")


def abstract_batch(config, rows: int, seq_len: int, tiles: int, *, float_positions: bool = False) -> dict:
    """A training batch's shapes (design card): input_ids, labels, segment_ids int32 [rows, seq_len];
    loss_weights float32 [rows, seq_len]; positions int32 (float32 for V2PE) [rows, seq_len]; pixel_values
    uint8 [rows, tiles, S, S, 3] (the tiles' levels, as the pipeline sends them: the model normalises them) and
    tile_mask bool [rows, tiles] (no image keys when ``tiles`` is 0)."""
    s = config.image_size
    tokens = lambda dtype: jax.ShapeDtypeStruct((rows, seq_len), dtype)  # noqa: E731
    batch = {"input_ids": tokens(jnp.int32), "labels": tokens(jnp.int32), "loss_weights": tokens(jnp.float32),
             "positions": tokens(jnp.float32 if float_positions else jnp.int32), "segment_ids": tokens(jnp.int32)}
    if tiles:
        batch["pixel_values"] = jax.ShapeDtypeStruct((rows, tiles, s, s, 3), jnp.uint8)
        batch["tile_mask"] = jax.ShapeDtypeStruct((rows, tiles), jnp.bool_)
    return batch


def batch_shardings(batch, mesh, rules):
    """Every batch array split over the batch mesh axes on its leading dimension."""
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, batch_spec(len(x.shape), rules)), batch)


def _micro_batches(batch: dict, accum: int) -> dict:
    """[B, ...] -> [accum, B / accum, ...]: micro-batch i takes rows i, i + accum, ... so that every device keeps
    its own rows (the leading, sharded, dimension stays outermost before the split)."""
    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"{x.shape[0]} rows do not split into accum_steps={accum} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def loss_sum(model: InternVL, params, batch: dict, rng=None, *, vocab_chunk: int | None = 1024):
    """``sum(loss_weights * CE)`` of one (micro-)batch, float32 scalar; ``rng`` (optional) drives drop path."""
    hidden = model.apply(
        {"params": params}, batch["input_ids"], batch.get("pixel_values"),
        batch.get("tile_mask"), batch.get("positions"), batch.get("segment_ids"), return_hidden=True,
        rngs=None if rng is None else {"dropout": rng})
    head = lambda h: model.apply({"params": params}, h, method=InternVL.head)  # noqa: E731
    return weighted_loss_sum(head, hidden, batch["labels"], batch["loss_weights"], chunk=vocab_chunk)


def _select(ok, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def frozen_cut(params, trainable):
    """``params`` with the frozen leaves (``trainable`` False) behind ``stop_gradient`` (None: all train)."""
    if trainable is None:
        return params
    return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def accumulated_grads(loss_fn: Callable, params, micro: dict, accum_steps: int, carry=None):
    """Loss, gradients and aux summed over micro-batches, ``carry`` threaded through them in order.

    loss_fn(params, mb, i, carry) -> (loss float32 [], (carry, aux {name: float32 []})); micro: the batch split by
    :func:`_micro_batches` ([accum, rows / accum, ...]). Returns (loss, grads, carry, aux).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, (carry, aux)), grads = grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], micro), 0, carry)
        return loss, grads, carry, aux

    def body(acc, xs):
        loss, grads, carry, aux = acc
        mb, i = xs
        mb = {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in mb.items()}
        (l, (carry, a)), g = grad_fn(params, mb, i, carry)
        add = lambda x, y: jax.tree_util.tree_map(jnp.add, x, y)  # noqa: E731
        return (loss + l, add(grads, g), carry, add(aux, a)), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    aux0 = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(lambda: loss_fn(params, first, 0, carry)[1][1]))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (loss, grads, carry, aux), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros, carry, aux0),
                                                (micro, jnp.arange(accum_steps)))
    return loss, grads, carry, aux


def apply_gradients(state: TrainState, grads, loss, tx: optax.GradientTransformation, rng, *,
                    grad_view: Callable | None = None, **changes):
    """(state after one optimizer update, grad norm, finite). A non-finite loss or gradient norm keeps params,
    optimizer state and ``changes`` (other state fields to set) as they were; the step counter still advances
    and ``skipped`` counts it."""
    grad_norm = optax.tree.norm(grad_view(grads) if grad_view else grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    kept = {k: _select(finite, v, getattr(state, k)) for k, v in changes.items()}
    new = state.replace(
        step=state.step + 1, params=_select(finite, params, state.params),
        opt_state=_select(finite, opt_state, state.opt_state), rng=rng,
        skipped=state.skipped + (~finite).astype(jnp.int32), **kept)
    return new, grad_norm, finite


def uses_dropout(config) -> bool:
    """Whether the model draws dropout masks when trained: ViT drop path, or a LoRA rule with dropout (the step
    then passes it a dropout rng)."""
    return config.vision.drop_path_rate > 0 or any(  # InternVL 1.0's config has no LoRA table
        adapter is not None and adapter.dropout > 0 for _, adapter in lora.compile_rules(getattr(config, "lora", ())))


def make_train_step(model: InternVL, tx: optax.GradientTransformation, lr_fn: Callable | None = None, *,
                    trainable=None, grad_view: Callable | None = None, accum_steps: int = 1,
                    vocab_chunk: int | None = 1024, dropout: bool = False) -> Callable:
    """``step(state: TrainState, batch) -> (state, metrics)`` (pure; jit it, donating the state).

    trainable: bool tree like the params (None: all); grad_view: grads -> the gradients the optimizer clips
    (``train.optim.trainable_grads``: frozen slices of partly frozen stacks zeroed), whose norm is reported;
    lr_fn: step -> learning rate, for the metrics;
    dropout: pass a dropout rng to the model (:func:`uses_dropout`: ViT drop path, LoRA dropout).
    metrics: float32 scalars ``loss``, ``grad_norm`` (of the trainable gradients, before clipping), ``lr``,
    ``weight_sum`` (global sum of the loss weights), ``tokens`` (supervised positions), ``finite`` (1.0 when the
    update was applied).
    """
    def step(state: TrainState, batch: dict):
        weight_sum = jnp.sum(batch["loss_weights"].astype(jnp.float32))
        denominator = jnp.maximum(weight_sum, 1e-12)
        rng, step_rng = jax.random.split(state.rng)

        def loss_fn(params, mb, i, carry):
            key = jax.random.fold_in(step_rng, i) if dropout else None
            return loss_sum(model, frozen_cut(params, trainable), mb, key, vocab_chunk=vocab_chunk) / denominator, \
                (carry, {})

        loss, grads, _, _ = accumulated_grads(loss_fn, state.params, _micro_batches(batch, accum_steps), accum_steps)
        new, grad_norm, finite = apply_gradients(state, grads, loss, tx, rng, grad_view=grad_view)
        metrics = {"loss": loss, "grad_norm": grad_norm, "weight_sum": weight_sum,
                   "tokens": jnp.sum(batch["labels"] != -100).astype(jnp.float32),
                   "finite": finite.astype(jnp.float32),
                   "lr": jnp.asarray(lr_fn(state.step) if lr_fn else 0.0, jnp.float32)}
        return new, metrics

    return step


def train_step_spec(config, mesh, rules, tx: optax.GradientTransformation, *, rows: int, seq_len: int, tiles: int,
                    lr_fn: Callable | None = None, trainable=None, grad_view: Callable | None = None,
                    accum_steps: int = 1, vocab_chunk: int | None = 1024) -> Step:
    """The train step with abstract arguments ``(state, batch)`` and their shardings (state donated), ready to
    compile for any mesh (``Step.compile``; TPU slices without a TPU through ``sharding.topology``)."""
    boxed = abstract_params(config, boxed=True)
    state = abstract_state(boxed, tx)
    batch = abstract_batch(config, rows, seq_len, tiles, float_positions=config.v2pe_stride is not None)
    fn = make_train_step(InternVL(config), tx, lr_fn, trainable=trainable, grad_view=grad_view,
                         accum_steps=accum_steps, vocab_chunk=vocab_chunk, dropout=uses_dropout(config))
    state_sh = shardings(state, mesh, rules)
    rep = NamedSharding(mesh, PartitionSpec())
    metrics_sh = {k: rep for k in ("loss", "grad_norm", "weight_sum", "tokens", "finite", "lr")}
    return Step(fn, (nn.unbox(state), batch), (state_sh, batch_shardings(batch, mesh, get_rules(rules))),
                (state_sh, metrics_sh), donate=(0,))
