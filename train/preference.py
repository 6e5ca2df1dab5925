"""Preference losses of mixed preference optimisation (MPO), as TRL's ``DPOTrainer`` computes them.

InternVL2.5-MPO, 3 and 3.5 were tuned with ``0.8 * sigmoid + 0.2 * bco_pair + 1.0 * sft`` (reference section 7)
through TRL's ``DPOTrainer.dpo_loss``. The loss family here follows TRL 0.28, the last release that keeps the
BCO-pair reward shift the InternVL scripts ran with (trl 0.9.6 / 0.21):

- ``logits = (pc - pr) - (rc - rr)`` with p the policy's and r the reference's sequence log-probs of the chosen
  (c) and rejected (r) answers; rewards ``a = beta * (pc - rc)``, ``b = beta * (pr - rr)``;
- ``sigmoid`` -log sig(beta logits) (label smoothing e: ``(1 - e)``/``e`` mix), ``hinge`` relu(1 - beta logits),
  ``ipo`` (logits - 1/(2 beta))^2 on length-normalised log-probs, ``robust`` the conservative DPO,
  ``exo_pair`` the EXO-pref KL (e = 1e-3 when 0, as TRL), ``apo_zero`` 1 - sig(a) + sig(b),
  ``bco_pair`` -log sig(a - delta) - log sig(-(b - delta)) with ``delta`` the running mean of the per-update
  mean of [a; b] (:class:`Shift`, detached), ``sft`` the chosen answer's token-mean NLL;
- the loss is ``sum_k weight_k * mean over pairs of loss_k``.

Everything is a pure function of arrays: ``pair_losses`` gives per-pair terms [N] for N pairs; the train step
(``train.preference_step``) sums them over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.struct
import jax
import jax.numpy as jnp
from jax.nn import log_sigmoid

PAIR_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "apo_zero", "bco_pair")
LOSS_TYPES = PAIR_LOSSES + ("sft",)


@dataclass(frozen=True)
class MPOConfig:
    """The preference objective: loss types with their weights (TRL's ``loss_type`` / ``loss_weights``), beta and
    label smoothing, and where the reference log-probs come from: ``copy`` (a frozen copy of the starting policy,
    sharded like it, run in the same step) or ``file`` (a pre-pass writes them next to the data)."""

    loss_types: tuple[str, ...] = ("sigmoid", "bco_pair", "sft")
    loss_weights: tuple[float, ...] = (0.8, 0.2, 1.0)
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: str = "copy"  # copy | file
    ref_logps: str = ""  # reference=file: the pre-pass's file ("" = <meta>.ref_logps.npz next to the meta JSON)
    max_pairs: int = 4  # pairs per packed row (the static P of the batch)

    def __post_init__(self):
        unknown = [t for t in self.loss_types if t not in LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ValueError(f"unknown MPO loss type(s) {','.join(unknown) or '(none given)'}: expected some of "
                             f"{', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"MPO beta {self.beta}: expected > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"MPO label smoothing {self.label_smoothing}: expected in [0, 0.5)")
        if self.reference not in ("copy", "file"):
            raise ValueError(f"MPO reference {self.reference!r}: expected copy or file")
        if self.max_pairs < 1:
            raise ValueError(f"MPO max_pairs {self.max_pairs}: expected >= 1")

    def check(self) -> None:
        """What a single field's check cannot see (the command line sets the fields one at a time)."""
        if len(self.loss_weights) != len(self.loss_types):
            raise ValueError(f"mpo.loss_weights has {len(self.loss_weights)} values for {len(self.loss_types)} "
                             f"loss types ({','.join(self.loss_types)}); give one weight per loss type")

    @property
    def length_normalised(self) -> bool:
        """TRL divides every sequence log-prob by its completion length when ``ipo`` is among the losses."""
        return "ipo" in self.loss_types


@flax.struct.dataclass
class Shift:
    """BCO-pair's reward shift: TRL's ``RunningMoments`` mean, a cumulative (not exponential) mean of the
    per-update mean reward. mean float32 [] starts at 0; count float32 [] (updates so far; TRL starts at 1e-24
    and counts ranks, which gives the same mean for equal per-rank batches)."""

    mean: jax.Array
    count: jax.Array

    @classmethod
    def zero(cls) -> "Shift":
        return cls(mean=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))

    def update(self, value, valid=True) -> "Shift":
        """The shift after one update with the batch mean ``value`` (skipped where ``valid`` is False)."""
        count = self.count + 1.0
        mean = self.mean + (value - self.mean) / count
        return Shift(mean=jnp.where(valid, mean, self.mean), count=jnp.where(valid, count, self.count))


def pair_losses(cfg: MPOConfig, policy, reference, delta) -> dict:
    """Per-pair losses of the pair terms of ``cfg.loss_types`` (``sft`` excluded; it is a token mean).

    policy, reference: float32 [N, 2] sequence log-probs (chosen, rejected); delta: float32 [] the BCO shift
    (already updated with this batch). Returns {loss type: [N]}.
    """
    beta, eps = cfg.beta, cfg.label_smoothing
    chosen_ratio = policy[:, 0] - reference[:, 0]
    rejected_ratio = policy[:, 1] - reference[:, 1]
    logits = chosen_ratio - rejected_ratio
    z = beta * logits
    terms = {
        "sigmoid": lambda: -log_sigmoid(z) * (1 - eps) - log_sigmoid(-z) * eps,
        "hinge": lambda: jax.nn.relu(1 - z),
        "ipo": lambda: (logits - 1 / (2 * beta)) ** 2,
        "robust": lambda: (-log_sigmoid(z) * (1 - eps) + log_sigmoid(-z) * eps) / (1 - 2 * eps),
        "exo_pair": lambda: _exo_pair(z, eps or 1e-3),
        "apo_zero": lambda: (1 - jax.nn.sigmoid(beta * chosen_ratio)) + jax.nn.sigmoid(beta * rejected_ratio),
        "bco_pair": lambda: (-log_sigmoid(beta * chosen_ratio - delta) - log_sigmoid(-(beta * rejected_ratio - delta))),
    }
    return {t: terms[t]() for t in cfg.loss_types if t != "sft"}


def _exo_pair(z, eps):
    """EXO-pref (arXiv 2402.00856, eq. 16) for two answers: KL(softmax policy || [1 - eps, eps])."""
    return (jax.nn.sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (log_sigmoid(-z) - jnp.log(eps)))


def rewards(cfg: MPOConfig, policy, reference):
    """(chosen, rejected) rewards ``beta * (policy - reference)``, float32 [N] each."""
    r = cfg.beta * (policy - reference)
    return r[:, 0], r[:, 1]


def sequence_logps(token_logps, segment_ids, completion, max_pairs: int, *, normalise: bool = False):
    """Per-pair sequence log-probs of packed preference rows.

    token_logps float32 [B, L] (log-prob of each position's label); segment_ids int [B, L] (pair j of a row:
    chosen segment 2j + 1, rejected 2j + 2; 0 padding); completion bool [B, L] (positions whose label is an
    answer token). Returns (logps float32 [B, P, 2], lengths float32 [B, P, 2]: completion tokens), P =
    ``max_pairs``; ``normalise``: logps divided by their lengths (TRL's ``ipo``).
    """
    b = token_logps.shape[0]
    slot = jax.nn.one_hot(segment_ids - 1, 2 * max_pairs, dtype=jnp.float32)  # [B, L, 2P]; padding: all zero
    mask = completion.astype(jnp.float32)[..., None] * slot
    logps = jnp.einsum("bls,bl->bs", mask, token_logps.astype(jnp.float32)).reshape(b, max_pairs, 2)
    lengths = jnp.sum(mask, axis=1).reshape(b, max_pairs, 2)
    if normalise:
        logps = logps / jnp.maximum(lengths, 1.0)
    return logps, lengths


def objective(cfg: MPOConfig, policy, reference, pair_mask, shift: Shift, nll_sum, *, pairs_total, tokens_total,
              update_shift: bool = True):
    """The MPO loss of one (micro-)batch, normalised by global counts so that micro-batches add up.

    policy, reference: float32 [N, 2] sequence log-probs (``reference`` is not differentiated); pair_mask: bool
    [N] (real pairs); shift: the BCO shift before this batch; nll_sum: float32 [] sum of the chosen answers'
    token NLLs; pairs_total / tokens_total: the global batch's real pairs and chosen answer tokens (the
    denominators of the pair means and of the SFT token mean).

    Returns (loss float32 [], shift after this batch, sums {name: float32 []}: each term's weighted-free sum over
    pairs, the chosen / rejected reward sums, margin sum and correct-preference count, for the step's metrics).
    The shift moves on every call with a real pair, before the loss uses it (TRL's order); with ``update_shift``
    False (evaluation) it stays where it is.
    """
    reference = jax.lax.stop_gradient(reference)
    mask = pair_mask.astype(jnp.float32)
    n = jnp.sum(mask)
    chosen, rejected = rewards(cfg, policy, reference)
    batch_mean = jax.lax.stop_gradient((jnp.sum(chosen * mask) + jnp.sum(rejected * mask)) / jnp.maximum(2 * n, 1.0))
    if update_shift and "bco_pair" in cfg.loss_types:
        shift = shift.update(batch_mean, n > 0)
    terms = pair_losses(cfg, policy, reference, shift.mean)
    weights = dict(zip(cfg.loss_types, cfg.loss_weights, strict=True))
    pairs = jnp.maximum(pairs_total, 1.0)
    sums = {t: jnp.sum(jnp.where(pair_mask, v, 0.0)) for t, v in terms.items()}
    loss = sum(weights[t] * v for t, v in sums.items()) / pairs
    if "sft" in cfg.loss_types:
        loss = loss + weights["sft"] * nll_sum / jnp.maximum(tokens_total, 1.0)
    margin = chosen - rejected
    sums.update(chosen_reward=jnp.sum(chosen * mask), rejected_reward=jnp.sum(rejected * mask),
                margin=jnp.sum(margin * mask), correct=jnp.sum((margin > 0) * mask), nll=nll_sum)
    return loss, shift, sums
