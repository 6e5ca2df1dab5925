"""The optimiser: AdamW, warm-up + cosine, global-norm clipping, freezing and learning-rate multipliers by
parameter-path rules, weight decay by parameter-path rules.

Parameters are nested dicts mirroring the module tree; a parameter's *path* is its keys joined by "/", e.g.
``vision/layers/attn/qkv/kernel`` or ``language_model/lm_head/kernel``. Layers are scanned, so every array under
a ``layers`` key carries a leading ``layers`` axis (one slice per layer).

Two ordered rule tables, both matched with ``re.search`` (anchor with ``^``/``$`` as needed), first match wins:

- ``OptimConfig.lr_rules``: ``(regex, multiplier)`` or ``(regex, multiplier, (start, stop))``. The multiplier
  scales the learning rate of the matching parameters; 0 freezes them; no match: 1. A rule with ``(start, stop)``
  (Python slice bounds, None allowed) selects only those layers of a stacked array: it is tried per layer, and the
  layers it does not select go on to the next rules. This is how ``unfreeze_vit_layers`` freezes some slices of the
  stacked ViT arrays and could express layer-wise learning-rate decay.
- ``OptimConfig.decay_rules``: ``(regex, decay: bool)``; no match: decay.

What an update does to a parameter, by its multipliers:

- all layers 0 (or a plain parameter with 0): *frozen*. It holds NO optimiser state (``optax.masked`` puts an
  ``optax.MaskedNode`` in place of its Adam moments), its gradient is left out of the clipping norm, and its update
  is ``-0.0`` everywhere, so ``optax.apply_updates`` leaves it bit-identical (x + (-0.0) == x for every x,
  including -0.0; weight decay does not reach it).
- some layers 0 (a stacked array partly frozen, e.g. ``unfreeze_vit_layers``): the array keeps full-size Adam
  moments (one optax leaf cannot hold part of a moment), but the gradients of its frozen slices are zeroed before
  the clipping norm (so they neither count nor build moments) and their updates are ``-0.0`` after the weight
  decay, so those slices stay bit-identical too.
- otherwise: AdamW with learning rate ``schedule(step) * multiplier`` (the multiplier also scales the decay
  term, as a torch param group with ``lr = base_lr * multiplier`` does).

Facts settled from the original (OpenGVLab/InternVL at 2410d1d, 2025-09-22; transformers as pinned there):

- Optimiser: ``internvl_chat/internvl/train/internvl_chat_finetune.py`` builds a plain ``transformers.Trainer``
  (the InternVL 1.0 ``trainer_monkey_patch.py`` with layer-wise lr decay survives only in ``internvl_g/``; it was
  removed from ``internvl_chat/`` with "Support packed dataset"). Every training script passes ``--deepspeed``
  with one of ``internvl_chat/zero_stage{1,2,3}_config*.json``, each holding an ``"optimizer"`` block: AdamW,
  ``betas [0.9, 0.999]``, ``eps 1e-8``, ``lr``/``weight_decay`` "auto", ``gradient_clipping`` "auto" (=
  ``max_grad_norm``, the TrainingArguments default 1.0: no script sets it). No ``"scheduler"`` block, so the HF
  scheduler runs: ``--lr_scheduler_type cosine`` = ``get_cosine_schedule_with_warmup`` (half a cosine to exactly
  0 at the last step, no minimum lr), ``--warmup_ratio 0.03`` (ceil(total * ratio) steps) or
  ``--warmup_steps 100`` (2.5 stages 1 and 1.5), ``--weight_decay 0.05`` (0.01 for 1B/2B/4B, 0 in some).
- Weight decay in those runs: with a DeepSpeed ``"optimizer"`` block, transformers' ``deepspeed_optim_sched``
  (``transformers/integrations/deepspeed.py``) hands DeepSpeed ``DummyOptim(params=model_parameters)``, one flat
  group of every ``requires_grad`` parameter, so DeepSpeed's AdamW decays ALL trainable parameters (biases, norms,
  position table, class token, LayerScale). ``Trainer.get_decay_parameter_names`` applies only without that
  block: in transformers 4.37.2 (``requirements/internvl_chat.txt``) it excludes names containing "bias" and
  parameters of ``ALL_LAYERNORM_LAYERS`` (nn.LayerNorm, plus LlamaRMSNorm appended by ``modeling_llama``; the
  repo's own ``InternRMSNorm`` and InternLM2 RMSNorm are never appended: no ``ALL_LAYERNORM_LAYERS`` in the repo);
  since huggingface/transformers#35927 (merged 2025-01-28, so 4.49+; the 3.5 scripts in
  ``internvl_chat_gpt_oss/requirements.txt`` pin 4.55, this venv has 5.24) it also excludes by name
  (``layernorm``, ``rmsnorm``, ``.norm.``, ``_norm.``), which on the original layout still misses InternViT-6B's
  ``norm1``/``norm2`` RMSNorm weights. No version excludes ``position_embedding``, ``class_embedding`` or
  ``ls1``/``ls2`` (InternViT's ``modeling_intern_vit.py``: plain ``nn.Parameter``s); ``no_weight_decay`` exists
  nowhere in the repo.
- So "as the original" has no single answer; ``DEFAULT_DECAY_RULES`` follows issue 14 (no decay for biases,
  norms, the position table) and settles the rest: the class token is an additive learned embedding of the same
  module as the position table and gets its treatment (the timm/BEiT/MAE ViT recipe InternViT descends from skips
  ``pos_embed`` and ``cls_token`` together); LayerScale ``ls1``/``ls2`` are per-channel gains like norm scales
  and are not decayed either (the 1-D rule of InternVL's own ViT trainers: ``len(param.shape) == 1`` in
  ``internvl_g/internvl/train/trainer_monkey_patch.py`` and ``classification/optimizer.py``; decaying them
  would pull the residual branches towards 0). Kernels, the patch kernel, the token table and the head decay.
  ``HF_TRAINER_DECAY_RULES`` is transformers' (>= 4.49) mask on the transformers-native model (biases and norms
  only); ``DECAY_ALL`` is what the released DeepSpeed runs did.
- Clipping: DeepSpeed (and ``torch.nn.utils.clip_grad_norm_`` without it) clips over the parameters that have
  gradients, i.e. the trainable ones only (frozen ones have ``requires_grad=False``), by the coefficient
  ``min(1, max_norm / (norm + 1e-6))``. Ours: the same formula over the trainable gradients (frozen leaves and
  frozen slices masked out first).
- AdamW: DeepSpeed's FusedAdam in ``adam_w_mode`` = ``torch.optim.AdamW``: decoupled decay ``p -= lr * wd * p``
  with the current lr, bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``; ``optax.scale_by_adam`` +
  ``add_decayed_weights`` + the lr is the same update.
- Schedule: the HF scheduler is stepped after each optimiser step, so update ``t`` (0-based) uses
  ``lr * lambda(t)``: the first update has lr 0 when there is a warm-up. optax calls the schedule with the count of
  updates so far, which is the same ``t``.
- Freezing (``internvl_chat_finetune.py``, in this order): ``freeze_backbone`` freezes ``vision_model``,
  ``freeze_llm`` the LLM, ``unfreeze_lm_head`` sets an attribute on the head module (no effect), ``freeze_mlp``
  freezes ``mlp1``, then ``unfreeze_vit_layers != 0`` re-enables ``vision_model.encoder.layers[k:]`` (the
  embeddings stay frozen; without ``freeze_backbone`` it changes nothing). See :func:`stage_rules`.

Gradient accumulation is the train step's; float32 master weights are simply the params' dtype.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ---------------------------------------------------------------------------------------------------------
# Rule tables
# ---------------------------------------------------------------------------------------------------------

# A path segment that names a norm: norm, norm1, norm2, input_norm, post_attn_norm, q_norm, k_norm, ...
_NORM = r"(^|/)[^/]*norm[^/]*/"

DEFAULT_DECAY_RULES: tuple[tuple[str, bool], ...] = (
    (r"bias$", False),  # every bias, the patch embedding's included (patch_bias)
    (_NORM, False),  # LayerNorm/RMSNorm scales and biases, qk-norms, the projector's LayerNorm
    (r"^vision/embeddings/pos_embed$", False),  # the ViT position table (issue 14)
    (r"^vision/embeddings/cls_token$", False),  # the class token: an additive embedding like the position table
    (r"^vision/layers/ls[12]$", False),  # LayerScale: per-channel gains
)
# transformers' (4.49+) ``Trainer.get_decay_parameter_names`` on the transformers-native
# InternVLForConditionalGeneration: biases and norms (checked against 5.24 in tests/test_optim.py)
HF_TRAINER_DECAY_RULES: tuple[tuple[str, bool], ...] = ((r"bias$", False), (_NORM, False))
# the released DeepSpeed runs: one param group, every trainable parameter decays
DECAY_ALL: tuple[tuple[str, bool], ...] = ()
DECAY_PRESETS = {"default": DEFAULT_DECAY_RULES, "hf_trainer": HF_TRAINER_DECAY_RULES, "all": DECAY_ALL}

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """Hyper-parameters of the optimiser (hashable: the rule tables are tuples).

    lr: peak learning rate. min_lr_ratio: the cosine ends at ``lr * min_lr_ratio`` (the original: 0).
    warmup_steps: linear warm-up from 0, in optimiser steps; 0 means ``ceil(total_steps * warmup_ratio)`` (HF's
    rule; 2.5 stages 1 and 1.5 use 100 steps, the other scripts a ratio of 0.03).
    weight_decay: decoupled (AdamW) decay, on the parameters ``decay_rules`` selects.
    b1, b2, eps: Adam's (the original's DeepSpeed config: 0.9, 0.999, 1e-8).
    max_grad_norm: global-norm clipping over the trainable gradients; 0 turns it off.
    schedule: "cosine" (warm-up, then half a cosine to the minimum at ``total_steps``, held after it) or
    "constant" (warm-up, then ``lr``).
    lr_rules, decay_rules: the path-rule tables described in the module docstring.
    """

    lr: float = 4e-5
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    schedule: str = "cosine"
    lr_rules: tuple = ()
    decay_rules: tuple = DEFAULT_DECAY_RULES

    def __post_init__(self):
        def check(ok: bool, what: str):
            if not ok:
                raise ValueError(f"train/optim.py OptimConfig: {what}")

        check(self.lr >= 0, f"lr must be >= 0, got {self.lr}")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        check(int(self.warmup_steps) == self.warmup_steps and self.warmup_steps >= 0,
              f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        check(0.0 <= self.warmup_ratio <= 1.0, f"warmup_ratio must lie in [0, 1], got {self.warmup_ratio}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, f"b1 and b2 must lie in [0, 1), got {self.b1}, {self.b2}")
        check(self.eps >= 0, f"eps must be >= 0, got {self.eps}")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _lr_rules(self.lr_rules)  # raise on a malformed table now, not at the first step
        _decay_rules(self.decay_rules)


class _LrRule(NamedTuple):
    pattern: re.Pattern
    multiplier: float
    layers: slice | None
    index: int  # position in the table, for messages
    bounds: tuple | None  # the (start, stop) as written, for messages


def _hashable(rules: tuple, name: str) -> None:
    try:
        hash(rules)
    except TypeError:
        raise ValueError(f"train/optim.py OptimConfig.{name} must hold tuples only (the config is hashable), "
                         f"got {rules!r}") from None


def _lr_rules(rules) -> tuple[_LrRule, ...]:
    if not isinstance(rules, tuple):  # checked before the cache, which needs a hashable table
        raise ValueError(f"train/optim.py OptimConfig.lr_rules must be a tuple of rules, got {type(rules).__name__}")
    _hashable(rules, "lr_rules")
    return _compile_lr_rules(rules)


@lru_cache(maxsize=64)
def _compile_lr_rules(rules: tuple) -> tuple[_LrRule, ...]:
    out = []
    for i, rule in enumerate(rules):
        where = f"train/optim.py OptimConfig.lr_rules[{i}] = {rule!r}"
        if not isinstance(rule, tuple) or len(rule) not in (2, 3):
            raise ValueError(f"{where}: expected (regex, multiplier) or (regex, multiplier, (start, stop))")
        regex, mult = rule[0], rule[1]
        try:
            pattern = re.compile(regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"{where}: bad regex: {e}") from None
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult >= 0:
            raise ValueError(f"{where}: the multiplier must be a number >= 0 (0 = frozen), got {mult!r}")
        layers = None
        if len(rule) == 3:
            bounds = rule[2]
            if (not isinstance(bounds, tuple) or len(bounds) != 2
                    or not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds)):
                raise ValueError(f"{where}: the layer selection must be (start, stop), ints or None, got {bounds!r}")
            layers = slice(*bounds)
        out.append(_LrRule(pattern, float(mult), layers, i, rule[2] if layers is not None else None))
    return tuple(out)


def _decay_rules(rules) -> tuple[tuple[re.Pattern, bool], ...]:
    if not isinstance(rules, tuple):
        raise ValueError(f"train/optim.py OptimConfig.decay_rules must be a tuple of rules, got {type(rules).__name__}")
    _hashable(rules, "decay_rules")
    return _compile_decay_rules(rules)


@lru_cache(maxsize=64)
def _compile_decay_rules(rules: tuple) -> tuple[tuple[re.Pattern, bool], ...]:
    out = []
    for i, rule in enumerate(rules):
        where = f"train/optim.py OptimConfig.decay_rules[{i}] = {rule!r}"
        if not isinstance(rule, tuple) or len(rule) != 2 or not isinstance(rule[1], bool):
            raise ValueError(f"{where}: expected (regex, decay: bool)")
        try:
            out.append((re.compile(rule[0]), rule[1]))
        except (re.error, TypeError) as e:
            raise ValueError(f"{where}: bad regex: {e}") from None
    return tuple(out)


def stage_rules(freeze_backbone: bool = False, freeze_mlp: bool = False, freeze_llm: bool = False,
                unfreeze_vit_layers: int = 0, unfreeze_lm_head: bool = False, *, tied_head: bool = False,
                extra: tuple = ()) -> tuple:
    """The ``lr_rules`` table for the original's freezing flags (``internvl_chat_finetune.py``).

    freeze_backbone / freeze_mlp / freeze_llm freeze ``vision/``, ``projector/``, ``language_model/``.
    unfreeze_vit_layers = k != 0 makes ``vision/layers`` slices ``[k:]`` trainable again (Python slicing: -k = the
    last k layers, a positive k = all but the first k); the ViT embeddings stay frozen, and without freeze_backbone
    it changes nothing (everything is trainable already), as in the original.
    unfreeze_lm_head (with freeze_llm) really trains the head, unlike the original, where it sets an attribute and
    has no effect. With a tied head (``tied_head``: ``TextConfig.tie_word_embeddings``) the head IS the token
    table, so the table ``language_model/embed_tokens`` is trained (as input embedding and head at once); untied,
    only ``language_model/lm_head`` is, and the token table stays frozen.
    extra: rules put first (they win over the flags').
    """
    if not isinstance(unfreeze_vit_layers, int) or isinstance(unfreeze_vit_layers, bool):
        raise ValueError(f"train/optim.py stage_rules: unfreeze_vit_layers must be an int, got {unfreeze_vit_layers!r}")
    rules = list(extra)
    if unfreeze_vit_layers != 0:
        rules.append((r"^vision/layers/", 1.0, (unfreeze_vit_layers, None)))
    if freeze_backbone:
        rules.append((r"^vision/", 0.0))
    if freeze_mlp:
        rules.append((r"^projector/", 0.0))
    if freeze_llm and unfreeze_lm_head:
        rules.append((r"^language_model/embed_tokens$" if tied_head else r"^language_model/lm_head/", 1.0))
    if freeze_llm:
        rules.append((r"^language_model/", 0.0))
    return tuple(rules)


# ---------------------------------------------------------------------------------------------------------
# Per-parameter tables
# ---------------------------------------------------------------------------------------------------------


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_path(path) -> str:
    """A ``jax.tree_util`` key path -> the "/"-joined parameter path (``vision/layers/fc1/kernel``)."""
    return "/".join(_key_name(k) for k in path)


def _is_box(x) -> bool:
    return hasattr(x, "unbox")  # flax's nn.Partitioned / nn.LogicallyPartitioned


def unboxed(params) -> Any:
    """``params`` with flax's logical-axis boxes removed (a box would add a ``value`` key to every path)."""
    return jax.tree.map(lambda x: x.unbox() if _is_box(x) else x, params, is_leaf=_is_box)


def paths(params) -> Any:
    """The tree of parameter paths (strings), same structure as ``params`` (boxes removed)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_path(p), unboxed(params))


def _multiplier(rules: tuple[_LrRule, ...], path: str, shape: tuple, used: set):
    """A parameter's multiplier: a float, or a float32 [layers] vector when layer rules give its slices
    different values (always broadcast on axis 0)."""
    layered = [r for r in rules if r.layers is not None and r.pattern.search(path)]
    if not layered:
        for r in rules:
            if r.pattern.search(path):
                used.add(r.index)
                return r.multiplier
        return 1.0
    if "layers" not in path.split("/") or not shape:
        raise ValueError(
            f"train/optim.py OptimConfig.lr_rules[{layered[0].index}] selects layers {layered[0].bounds} but "
            f"parameter {path!r} (shape {shape}) is not stacked on a layers axis (no 'layers' key in its path)")
    n = shape[0]
    out = np.full(n, np.nan)
    for r in rules:
        if not r.pattern.search(path):
            continue
        todo = np.isnan(out)
        if r.layers is not None:
            picked = np.zeros(n, bool)
            picked[np.arange(n)[r.layers]] = True
            todo &= picked
        if todo.any():
            used.add(r.index)
        out[todo] = r.multiplier
        if not np.isnan(out).any():
            break
    out[np.isnan(out)] = 1.0
    return float(out[0]) if np.all(out == out[0]) else out.astype(np.float32)


def lr_multipliers(cfg: OptimConfig, params) -> Any:
    """Per parameter: its learning-rate multiplier from ``cfg.lr_rules`` (0 = frozen), a python float, or a
    float32 numpy vector [layers] for a stacked array whose layers differ. params: arrays or ShapeDtypeStructs,
    boxed or not (the result is the unboxed structure, which optax's masks also accept on a boxed tree).

    Warns about rules that match no parameter (a typo, or a head rule on a tied model)."""
    rules = _lr_rules(cfg.lr_rules)
    used: set = set()
    out = jax.tree_util.tree_map_with_path(lambda p, x: _multiplier(rules, param_path(p), tuple(x.shape), used),
                                           unboxed(params))
    unused = [cfg.lr_rules[r.index] for r in rules if r.index not in used]
    if unused:
        warnings.warn(f"train/optim.py: OptimConfig.lr_rules {unused} match no parameter", stacklevel=2)
    return out


def _any_trainable(m) -> bool:
    return bool(np.max(m) > 0)


def trainable_mask(cfg: OptimConfig, params) -> Any:
    """Per parameter: True when any of it trains (it then holds Adam moments, full-size for a partly frozen
    stack), False when it is frozen (no optimiser state)."""
    return jax.tree.map(_any_trainable, lr_multipliers(cfg, params))


def trainable_count(cfg: OptimConfig, params) -> int:
    """Number of trainable scalars (frozen slices of a partly frozen stack not counted)."""
    def count(m, x):
        if np.ndim(m):  # a partly frozen stack: its trainable slices
            return int(np.sum(m > 0)) * int(np.prod(x.shape[1:]))
        return int(np.prod(x.shape)) if m > 0 else 0

    return sum(jax.tree.leaves(jax.tree.map(count, lr_multipliers(cfg, params), unboxed(params))))


def decay_mask(cfg: OptimConfig, params) -> Any:
    """Per parameter: whether weight decay applies (``cfg.decay_rules``, first match wins, default True).
    Frozen parameters are never decayed whatever this says."""
    rules = _decay_rules(cfg.decay_rules)

    def decays(path: str) -> bool:
        return next((d for pattern, d in rules if pattern.search(path)), True)

    return jax.tree.map(decays, paths(params))


# ---------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warm-up length: ``cfg.warmup_steps`` if > 0, else ``ceil(total_steps * cfg.warmup_ratio)`` (HF's rule)."""
    return int(cfg.warmup_steps) if cfg.warmup_steps > 0 else math.ceil(total_steps * cfg.warmup_ratio)


def schedule(cfg: OptimConfig, total_steps: int, multiplier: float = 1.0) -> optax.Schedule:
    """The learning rate of update ``count`` (0-based), times ``multiplier``: float32 [] -> float32 [].

    Linear warm-up ``count / max(1, W)`` for count < W, then for "cosine"
    ``0.5 * (1 + cos(pi * min(1, (count - W) / max(1, total - W))))``, rescaled to [min_lr_ratio, 1]: HF's
    ``get_cosine_schedule_with_warmup`` (num_cycles 0.5) on every step up to ``total_steps``. Past the end it holds
    the minimum (HF's formula would rise again; the original never steps past the end).
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"train/optim.py schedule: total_steps must be an int >= 1, got {total_steps!r}")
    w = warmup_steps(cfg, total_steps)
    peak = cfg.lr * multiplier
    floor = cfg.min_lr_ratio

    def fn(count):
        step = jnp.asarray(count, jnp.float32)
        warm = step / max(1, w)
        if cfg.schedule == "cosine":
            # 0.5 * (1 + cos(pi * progress)) written as sin^2(pi/2 * remaining), remaining = 1 - progress computed
            # from (total - step) directly: float32 keeps its relative precision to the last step, where
            # 1 + cos(...) would cancel
            remaining = jnp.clip((total_steps - step) / max(1, total_steps - w), 0.0, 1.0)
            after = jnp.sin(0.5 * jnp.pi * remaining) ** 2 * (1.0 - floor) + floor
        else:
            after = jnp.ones_like(step)
        return peak * jnp.where(step < w, warm, after)

    return fn


# ---------------------------------------------------------------------------------------------------------
# The transformation
# ---------------------------------------------------------------------------------------------------------


def _layer_mask(m: np.ndarray, x) -> jax.Array:
    """[layers] multipliers -> a bool mask broadcastable to ``x`` (True = trainable slice)."""
    return jnp.asarray(m > 0).reshape((-1,) + (1,) * (x.ndim - 1))


def _zero_frozen_grads(mults) -> optax.GradientTransformation:
    """Gradients of frozen parameters and frozen slices -> 0 (stateless), so the clipping norm and the moments
    see the trainable gradients only, as in the original, where frozen parameters have no gradient."""

    def one(g, m):
        if np.ndim(m):
            return jnp.where(_layer_mask(m, g), g, jnp.zeros((), g.dtype))
        return g if m > 0 else jnp.zeros_like(g)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(one, updates, mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale the gradients by ``min(1, max_norm / (norm + 1e-6))``, norm = the float32 global 2-norm over all of
    them: ``torch.nn.utils.clip_grad_norm_``'s and DeepSpeed's coefficient (optax's own lacks the 1e-6)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), updates))
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _scale_and_freeze(mults) -> optax.GradientTransformation:
    """Updates times each parameter's multiplier; frozen parameters and slices get -0.0 (bit-identical after
    ``optax.apply_updates``: x + (-0.0) == x for every x, -0.0 included, where +0.0 would turn -0.0 into +0.0)."""

    def one(u, m):
        if np.ndim(m):
            return jnp.where(_layer_mask(m, u), u * jnp.asarray(m, u.dtype).reshape(_layer_mask(m, u).shape),
                             jnp.asarray(-0.0, u.dtype))
        if m == 0:
            return jnp.full(u.shape, -0.0, u.dtype)
        return u if m == 1 else u * jnp.asarray(m, u.dtype)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(one, updates, mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: OptimConfig, params, total_steps: int) -> optax.GradientTransformation:
    """AdamW with clipping, warm-up + cosine, the decay mask and the lr rules (see the module docstring).

    params: the param tree (arrays or ShapeDtypeStructs; only paths and shapes are read). total_steps: optimiser
    steps of the run (the schedule's length). The state holds: an Adam count and the moments (mu, nu; the params'
    dtype and shape) of the trainable parameters only, and the schedule's count.

    Chain: frozen gradients -> 0; clip (trainable norm); Adam moments (masked to the trainable leaves); + wd * p
    on the decayed trainable leaves; * -schedule(t); * multiplier per parameter, frozen -> -0.0.
    """
    mults = lr_multipliers(cfg, params)
    trainable = jax.tree.map(_any_trainable, mults)
    decayed = jax.tree.map(lambda t, d: t and d, trainable, decay_mask(cfg, params))
    parts = [_zero_frozen_grads(mults)]
    if cfg.max_grad_norm > 0:
        parts.append(clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.masked(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), trainable))
    if cfg.weight_decay > 0 and any(jax.tree.leaves(decayed)):
        parts.append(optax.masked(optax.add_decayed_weights(cfg.weight_decay), decayed))
    parts.append(optax.scale_by_learning_rate(schedule(cfg, total_steps)))
    parts.append(_scale_and_freeze(mults))
    return optax.chain(*parts)


def trainable_grads(cfg: OptimConfig, params, grads) -> Any:
    """``grads`` with frozen parameters and slices zeroed: the tree whose global norm the clipping uses (the
    train step's ``grad_norm`` metric should be taken on it, which also lets XLA drop frozen weight gradients)."""
    return _zero_frozen_grads(lr_multipliers(cfg, params)).update(grads, optax.EmptyState())[0]


def opt_state_bytes(cfg: OptimConfig, abstract_params, total_steps: int = 1) -> int:
    """Bytes of the optimiser state for ``abstract_params`` (ShapeDtypeStructs or arrays), nothing allocated:
    2 moments per trainable parameter in its dtype, plus two int32 counts."""
    tx = build_optimizer(cfg, abstract_params, total_steps)
    state = jax.eval_shape(tx.init, abstract_params)
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
