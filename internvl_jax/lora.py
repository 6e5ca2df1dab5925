"""LoRA adapters chosen by parameter-path rules, run as a low-rank path inside each :class:`~internvl_jax.layers.Dense`.

A rule table (``InternVLConfig.lora``) says which kernels get an adapter, as the freezing and sharding tables do:
an ordered tuple of ``(regex, rank, alpha)``, ``(regex, rank, alpha, dropout)`` or ``(regex, rank, alpha, dropout,
split)``, matched with ``re.search`` against a kernel's path (``vision/layers/attn/qkv/kernel``; the unrolled
decoder's ``layers_3`` is read as ``layers``, so one table serves training and generation); the first match wins
and rank 0 means "no adapter" (an exclusion written before a broader rule).

A kernel ``W`` of shape ``in_shape + features`` with an adapter holds two more float32 params beside it:

- ``lora_a`` [*in_shape, r] and ``lora_b`` [r, *features]; the layer computes
  ``y = x.W + (alpha / r) * (dropout(x).A).B``, the order PEFT uses (``lora_B(lora_A(dropout(x))) * scaling``);
- with ``split`` (one adapter per index of the first output axis, e.g. the ViT's fused qkv kernel [C, 3, H, D] as
  the separate ``q_proj``/``k_proj``/``v_proj`` adapters PEFT puts on transformers' InternViT):
  ``lora_a`` [*in_shape, P, r], ``lora_b`` [P, r, *features[1:]].

``A`` starts as torch's ``kaiming_uniform_(a=sqrt(5))`` (uniform in +-1/sqrt(fan_in), PEFT's default) and ``B``
at zero, so a new adapter leaves the model's outputs unchanged. The adapters carry logical axes (the kernel's input
axes for ``A``, its output axes for ``B``, ``lora_rank`` unsplit), so every sharding preset places them as it places
their kernels; inside scanned layers they get the stacked ``layers`` axis like every other parameter.

The product never forms ``W + BA`` in the forward pass; :func:`merge` does that once, for export or for serving
merged weights.

Presets (``TARGETS``), the original's target sets (``use_backbone_lora`` / ``use_llm_lora``, alpha = 2r, dropout
0.05): ``vit`` = InternViT ``attn.qkv`` (one adapter on the fused kernel, as the original), ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``; ``vit_split`` = the same with q/k/v adapted separately (PEFT on the transformers-native
ViT); ``llm`` = the attention and MLP projections (q, k, v, o, gate, up, down; for InternLM2 the original adapts the
fused ``wqkv`` with one shared A, here q, k and v get one adapter each); ``projector`` = ``mlp1``'s two linears
(not in the original's sets).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

RANK_AXIS = "lora_rank"  # logical name of the rank dimension: never split (no rule names it)
PARAMS = ("lora_a", "lora_b")

_VIT_REST = r"^vision/layers/(attn/proj|fc1|fc2)/kernel$"
TARGETS: dict[str, tuple[tuple[str, bool], ...]] = {
    # (kernel path regex, split)
    "vit": ((r"^vision/layers/(attn/qkv|attn/proj|fc1|fc2)/kernel$", False),),
    "vit_split": ((r"^vision/layers/attn/qkv/kernel$", True), (_VIT_REST, False)),
    "llm": ((r"^language_model/layers/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$", False),),
    "projector": ((r"^projector/fc[12]/kernel$", False),),
}


@dataclass(frozen=True)
class Adapter:
    """One kernel's adapter: rank r, alpha (scale = alpha / r), dropout on the adapter's input, split."""

    rank: int
    alpha: float
    dropout: float = 0.0
    split: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def preset_rules(targets, rank: int, alpha: float | None = None, dropout: float = 0.05) -> tuple:
    """The rule table for named target sets (``"vit,llm"`` or ``("vit", "llm")``) at one rank; ``alpha`` defaults
    to 2 * rank (the original's)."""
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target set {unknown[0]!r}; use one of {', '.join(TARGETS)} (comma-separated)")
    alpha = 2.0 * rank if alpha is None else float(alpha)
    return tuple((regex, int(rank), alpha, float(dropout), split) for n in names for regex, split in TARGETS[n])


@lru_cache(maxsize=64)
def compile_rules(rules: tuple) -> tuple[tuple[re.Pattern, Adapter | None], ...]:
    """The table checked and compiled: ``(pattern, Adapter or None for rank 0)`` per rule. Raises ValueError naming
    the rule and what was expected."""
    if not isinstance(rules, tuple):
        raise ValueError(f"LoRA rules must be a tuple of rules, got {type(rules).__name__}")
    out = []
    for i, rule in enumerate(rules):
        where = f"LoRA rules[{i}] = {rule!r}"
        if not isinstance(rule, tuple) or not 3 <= len(rule) <= 5:
            raise ValueError(f"{where}: expected (regex, rank, alpha[, dropout[, split]])")
        regex, rank, alpha = rule[:3]
        dropout = rule[3] if len(rule) > 3 else 0.0
        split = rule[4] if len(rule) > 4 else False
        try:
            pattern = re.compile(regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"{where}: bad regex: {e}") from None
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"{where}: rank must be an int >= 0 (0 = no adapter), got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{where}: alpha must be a number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{where}: dropout must lie in [0, 1), got {dropout!r}")
        if not isinstance(split, bool):
            raise ValueError(f"{where}: split must be True or False, got {split!r}")
        out.append((pattern, Adapter(rank, float(alpha), float(dropout), split) if rank else None))
    return tuple(out)


def canonical_path(path: str) -> str:
    """``language_model/layers_3/attn/q_proj/kernel`` -> ``language_model/layers/attn/q_proj/kernel``: the unrolled
    decoder's layers are the stacked ones, so one rule table covers both layouts."""
    return re.sub(r"(^|/)layers_\d+(?=/)", r"\1layers", path)


def adapter_for(rules: tuple, kernel_path: str) -> Adapter | None:
    """The adapter the first matching rule gives the kernel at ``kernel_path`` (None: no match, or rank 0)."""
    path = canonical_path(kernel_path)
    for pattern, adapter in compile_rules(rules):
        if pattern.search(path):
            return adapter
    return None


def kaiming_a(fan_in: int):
    """``lora_a``'s init: torch ``kaiming_uniform_(a=sqrt(5))`` on a [r, fan_in] weight, i.e. uniform in
    +-1/sqrt(fan_in) (PEFT's default)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def shapes_and_axes(in_shape: tuple, features: tuple, in_axes: tuple, out_axes: tuple, adapter: Adapter):
    """(a_shape, a_axes, b_shape, b_axes) of a kernel ``in_shape + features`` named ``in_axes + out_axes``:
    A [*in, r] / B [r, *features]; split: A [*in, P, r] / B [P, r, *features[1:]] (P = features[0])."""
    r = adapter.rank
    if adapter.split:
        if len(features) < 2:
            raise ValueError(f"a split LoRA adapter needs a kernel with >= 2 output dims, got features {features}")
        return ((*in_shape, features[0], r), (*in_axes, out_axes[0], RANK_AXIS),
                (features[0], r, *features[1:]), (out_axes[0], RANK_AXIS, *out_axes[1:]))
    return (*in_shape, r), (*in_axes, RANK_AXIS), (r, *features), (RANK_AXIS, *out_axes)


def low_rank(x, a, b, n_in: int, split: bool, dtype, scale: float = 1.0):
    """The adapter's product: scale * x [..., *in] . A . B -> [..., *features] in float32.

    A, B as :func:`shapes_and_axes`; both cast to ``dtype`` (the compute dtype), products accumulate in float32.
    The [..., r] intermediate is all that is added to the activations (no [in, out] matrix is formed); the scale
    multiplies it, not the wider product. Both products run on 2-D views, every leading axis flattened into one
    token axis N and the kernel's input axes into one, so their gradients are plain matrix products as well: left
    N-d, B's gradient contracts two token axes, and XLA's CPU backend copies the output's cotangent transposed
    for it, which made the LoRA step slower than full fine-tuning (``bench/lora.py``: 1.12x -> 0.82x).
    """
    x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    lead = x.shape[:x.ndim - n_in]
    x2 = x.reshape(math.prod(lead), -1)  # [N, I]
    if not split:  # [N, r] . B [r, O]
        xa = jnp.dot(x2, a.reshape(x2.shape[1], -1), preferred_element_type=jnp.float32)
        y = jnp.dot((xa * scale).astype(dtype), b.reshape(b.shape[0], -1), preferred_element_type=jnp.float32)
        return y.reshape(*lead, *b.shape[1:])
    # split: [N, P, r] . B [P, r, K], P a batch dimension (each part its own adapter)
    p, r = a.shape[-2:]
    xa = jnp.dot(x2, a.reshape(x2.shape[1], p * r), preferred_element_type=jnp.float32).reshape(-1, p, r)
    y = jnp.einsum("npr,prk->npk", (xa * scale).astype(dtype), b.reshape(p, r, -1),
                   preferred_element_type=jnp.float32)
    return y.reshape(*lead, p, *b.shape[2:])


def delta_kernel(a, b, split: bool):
    """The dense update B.A as a kernel, float32: A [*in, r], B [r, *features] -> [*in, *features]
    (split: A [*in, P, r], B [P, r, *rest] -> [*in, P, *rest])."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    if split:
        return _split_delta(a, b)
    n_in = a.ndim - 1
    m = jnp.dot(a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1), precision=hp)
    return m.reshape(*a.shape[:n_in], *b.shape[1:])


def _split_delta(a, b):
    """Split form of :func:`delta_kernel`: A [*in, P, r], B [P, r, *rest] -> [*in, P, *rest]."""
    n_in, p, r = a.ndim - 2, a.shape[-2], a.shape[-1]
    a2 = a.reshape(-1, p, r)  # [I, P, r]
    b2 = b.reshape(p, r, -1)  # [P, r, K]
    m = jnp.einsum("ipr,prk->ipk", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return m.reshape(*a.shape[:n_in], p, *b.shape[2:])


# ---------------------------------------------------------------------------------------------------------
# Param trees
# ---------------------------------------------------------------------------------------------------------


def _is_stacked(path: str) -> bool:
    """Arrays under a ``layers`` key carry a leading stacked-layers axis (the scanned layout)."""
    return "layers" in path.split("/")


def merge(params: dict, rules: tuple, *, _path: str = "") -> dict:
    """``params`` with every adapter folded into its kernel (``W + scale * B.A``, computed in float32, stored in the
    kernel's dtype) and the ``lora_a``/``lora_b`` leaves removed: the plain model's params, for export or merged
    serving. ``rules``: the table the adapters were made with (it gives each one's scale and split)."""
    out = {}
    for key, value in params.items():
        path = f"{_path}/{key}" if _path else key
        if isinstance(value, dict):
            if "lora_a" in value:
                adapter = adapter_for(rules, f"{path}/kernel")
                if adapter is None:
                    raise ValueError(f"{path} holds LoRA params but no LoRA rule gives its kernel an adapter")
                fn = lambda w, a, b: (w.astype(jnp.float32) + adapter.scale * delta_kernel(a, b, adapter.split)  # noqa: E731
                                      ).astype(w.dtype)
                if _is_stacked(path):
                    fn = jax.vmap(fn)
                value = {k: v for k, v in value.items() if k not in PARAMS}
                out[key] = {**value, "kernel": jax.jit(fn)(params[key]["kernel"], params[key]["lora_a"],
                                                           params[key]["lora_b"])}
            else:
                out[key] = merge(value, rules, _path=path)
        else:
            out[key] = value
    return out


def is_adapter_path(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in PARAMS


def partition(params: dict, keep, *, _path: str = "") -> tuple[dict, dict]:
    """Split a nested dict by ``keep(path) -> bool`` into (kept, rest); empty sub-dicts are dropped."""
    kept, rest = {}, {}
    for key, value in params.items():
        path = f"{_path}/{key}" if _path else key
        if isinstance(value, dict):
            k, r = partition(value, keep, _path=path)
            if k:
                kept[key] = k
            if r:
                rest[key] = r
        elif keep(path):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def adapters_of(params: dict) -> dict:
    """Only the ``lora_a``/``lora_b`` leaves of ``params`` (same nesting)."""
    return partition(params, is_adapter_path)[0]


def combine(a: dict, b: dict) -> dict:
    """Two nested dicts with disjoint leaves as one (the inverse of :func:`partition`)."""
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = combine(out[key], value)
        elif key in out:
            raise ValueError(f"combine: both trees hold {key!r}")
        else:
            out[key] = value
    return out


def count(tree) -> int:
    """Number of scalars of a tree of arrays."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))
