"""The MPO train step: one function for the trainer, ``bench/mpo.py`` and ``internvl-jax plan``.

``make_preference_step(model, tx, mpo)`` gives ``step(state, batch, ref_params) -> (state, metrics)`` over
preference rows (train/data/pairs.py): the policy's sequence log-probs of every pair's chosen and rejected
answers, the reference's (``ref_params``, a frozen copy of the starting policy sharded like it, run in the same
step; or ``ref_params=None`` and the batch's ``ref_logps`` from a pre-pass), and the loss of
:func:`train.preference.objective` over the global batch. With ``accum_steps`` the rows are cut into
micro-batches as the SFT step does; BCO-pair's shift moves once per micro-batch (every loss evaluation, as TRL's),
in order, and lives in the state (:class:`PreferenceState`), so checkpoints and resumes carry it. Frozen
parameters, non-finite skipping and drop path are the SFT step's (``train.step``).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from internvl_jax.model import InternVL, abstract_params
from sharding.place import shardings
from sharding.rules import get_rules
from sharding.topology import Step

from .loss import IGNORE, token_losses
from .preference import MPOConfig, Shift, objective, sequence_logps
from .state import TrainState, abstract_state
from .step import (_micro_batches, abstract_batch, accumulated_grads, apply_gradients, batch_shardings, frozen_cut,
                   uses_dropout)

TERM_METRICS = ("chosen_reward", "rejected_reward", "margin", "accuracy", "shift", "nll", "pairs")


@flax.struct.dataclass
class PreferenceState(TrainState):
    """The train state plus BCO-pair's running reward shift."""

    shift: Shift = None

    @classmethod
    def create(cls, params, tx, rng) -> "PreferenceState":
        base = TrainState.create(params, tx, rng)
        return cls(**{f: getattr(base, f) for f in ("step", "params", "opt_state", "rng", "skipped")},
                   shift=Shift.zero())


def abstract_preference_state(boxed_params, tx) -> PreferenceState:
    """:func:`train.state.abstract_state` with the shift (replicated scalars)."""
    base = abstract_state(boxed_params, tx)
    shift = jax.eval_shape(Shift.zero)
    return PreferenceState(**{f: getattr(base, f) for f in ("step", "params", "opt_state", "rng", "skipped")},
                           shift=shift)


def abstract_preference_batch(config, rows: int, seq_len: int, tiles: int, pairs: int) -> dict:
    """A preference batch's shapes: the SFT batch's (:func:`train.step.abstract_batch`) plus image_index int32
    [rows, seq_len], pair_mask bool [rows, pairs] and ref_logps float32 [rows, pairs, 2]."""
    batch = abstract_batch(config, rows, seq_len, tiles, float_positions=config.v2pe_stride is not None)
    batch["image_index"] = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    batch["pair_mask"] = jax.ShapeDtypeStruct((rows, pairs), jnp.bool_)
    batch["ref_logps"] = jax.ShapeDtypeStruct((rows, pairs, 2), jnp.float32)
    return batch


def pair_logps(model: InternVL, params, batch: dict, pairs: int, rng=None, *, vocab_chunk: int | None = 1024):
    """(sequence log-probs float32 [B, P, 2], completion lengths [B, P, 2], chosen-answer NLL sum float32 []) of
    the preference rows ``batch`` under ``params``; ``rng`` (optional) drives drop path."""
    hidden = model.apply(
        {"params": params}, batch["input_ids"], batch.get("pixel_values"),
        batch.get("tile_mask"), batch.get("positions"), batch["segment_ids"], return_hidden=True,
        image_index=batch["image_index"], rngs=None if rng is None else {"dropout": rng})
    head = lambda h: model.apply({"params": params}, h, method=InternVL.head)  # noqa: E731
    ce = token_losses(head, hidden, batch["labels"], chunk=vocab_chunk)
    logps, lengths = sequence_logps(-ce, batch["segment_ids"], batch["labels"] != IGNORE, pairs)
    return logps, lengths, jnp.sum(batch["loss_weights"].astype(jnp.float32) * ce)


def reference_logps(model: InternVL, batch: dict, ref_params, pairs: int, *, vocab_chunk: int | None = 1024):
    """The reference's sequence log-probs [B, P, 2]: of ``ref_params`` (the frozen copy), or the batch's stored
    ``ref_logps`` when ``ref_params`` is None."""
    if ref_params is None:
        return batch["ref_logps"]
    return pair_logps(model, ref_params, batch, pairs, vocab_chunk=vocab_chunk)[0]


def preference_loss(model: InternVL, mpo: MPOConfig, params, batch: dict, ref_params, shift: Shift, *,
                    pairs_total, tokens_total, rng=None, vocab_chunk: int | None = 1024, update_shift: bool = True):
    """:func:`train.preference.objective` of one (micro-)batch of preference rows: (loss, shift, sums)."""
    logps, lengths, nll = pair_logps(model, params, batch, mpo.max_pairs, rng, vocab_chunk=vocab_chunk)
    ref = reference_logps(model, batch, ref_params, mpo.max_pairs, vocab_chunk=vocab_chunk)
    if mpo.length_normalised:
        logps, ref = logps / jnp.maximum(lengths, 1.0), ref / jnp.maximum(lengths, 1.0)
    loss, shift, sums = objective(mpo, logps.reshape(-1, 2), ref.reshape(-1, 2), batch["pair_mask"].reshape(-1),
                                  shift, nll, pairs_total=pairs_total, tokens_total=tokens_total,
                                  update_shift=update_shift)
    return loss, shift, jax.tree_util.tree_map(jax.lax.stop_gradient, sums)


def make_preference_step(model: InternVL, tx: optax.GradientTransformation, mpo: MPOConfig,
                         lr_fn: Callable | None = None, *, trainable=None, grad_view: Callable | None = None,
                         accum_steps: int = 1, vocab_chunk: int | None = 1024, dropout: bool = False) -> Callable:
    """``step(state: PreferenceState, batch, ref_params=None) -> (state, metrics)`` (pure; jit it, donating the
    state). ``ref_params`` None: the reference log-probs are the batch's ``ref_logps``.

    metrics (float32 scalars): ``loss``, ``loss/<type>`` (each pair term's mean over the pairs; ``nll`` is the
    sft term), ``chosen_reward``, ``rejected_reward``, ``margin`` (means), ``accuracy`` (margin > 0), ``shift``
    (after the step), ``nll`` (the chosen answers' token-mean NLL), ``pairs``, ``grad_norm``, ``lr``, ``finite``.
    """
    mpo.check()

    def step(state: PreferenceState, batch: dict, ref_params=None):
        pairs_total = jnp.sum(batch["pair_mask"].astype(jnp.float32))
        tokens_total = jnp.sum(batch["loss_weights"].astype(jnp.float32))
        rng, step_rng = jax.random.split(state.rng)

        def loss_fn(params, mb, i, shift):
            key = jax.random.fold_in(step_rng, i) if dropout else None
            loss, shift, sums = preference_loss(model, mpo, frozen_cut(params, trainable), mb, ref_params, shift,
                                                pairs_total=pairs_total, tokens_total=tokens_total, rng=key,
                                                vocab_chunk=vocab_chunk)
            return loss, (shift, sums)

        micro = _micro_batches(batch, accum_steps)
        loss, grads, shift, sums = accumulated_grads(loss_fn, state.params, micro, accum_steps, state.shift)
        new, grad_norm, finite = apply_gradients(state, grads, loss, tx, rng, grad_view=grad_view, shift=shift)
        per_pair = lambda x: x / jnp.maximum(pairs_total, 1.0)  # noqa: E731
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                   "lr": jnp.asarray(lr_fn(state.step) if lr_fn else 0.0, jnp.float32),
                   "chosen_reward": per_pair(sums["chosen_reward"]),
                   "rejected_reward": per_pair(sums["rejected_reward"]),
                   "margin": per_pair(sums["margin"]), "accuracy": per_pair(sums["correct"]),
                   "shift": new.shift.mean, "nll": sums["nll"] / jnp.maximum(tokens_total, 1.0), "pairs": pairs_total}
        metrics.update({f"loss/{t}": per_pair(sums[t]) for t in mpo.loss_types if t != "sft"})
        return new, metrics

    return step


def preference_step_spec(config, mesh, rules, tx: optax.GradientTransformation, mpo: MPOConfig, *, rows: int,
                         seq_len: int, tiles: int, lr_fn: Callable | None = None, trainable=None,
                         grad_view: Callable | None = None, accum_steps: int = 1,
                         vocab_chunk: int | None = 1024) -> Step:
    """The MPO step with abstract arguments ``(state, batch[, ref_params])`` and their shardings (state donated;
    the frozen reference sharded like the params when ``mpo.reference`` is copy), ready to compile for any mesh."""
    boxed = abstract_params(config, boxed=True)
    state = abstract_preference_state(boxed, tx)
    batch = abstract_preference_batch(config, rows, seq_len, tiles, mpo.max_pairs)
    fn = make_preference_step(InternVL(config), tx, mpo, lr_fn, trainable=trainable, grad_view=grad_view,
                              accum_steps=accum_steps, vocab_chunk=vocab_chunk,
                              dropout=uses_dropout(config))
    state_sh = shardings(state, mesh, rules)
    rep = NamedSharding(mesh, PartitionSpec())
    args, arg_sh = (nn.unbox(state), batch), (state_sh, batch_shardings(batch, mesh, get_rules(rules)))
    if mpo.reference == "copy":
        args, arg_sh = args + (nn.unbox(boxed),), arg_sh + (shardings(boxed, mesh, rules),)
    metric_names = ("loss", "grad_norm", "finite", "lr") + TERM_METRICS + tuple(
        f"loss/{t}" for t in mpo.loss_types if t != "sft")
    return Step(fn, args, arg_sh, (state_sh, {k: rep for k in metric_names}), donate=(0,))
