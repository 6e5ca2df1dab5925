"""LoRA adapters chosen by parameter-path rules, run as a low-rank path inside each :class:`~internvl_jax.layers.Dense`.

A rule table (``InternVLConfig.lora``) says which kernels get an adapter, as the freezing and sharding tables do:
an ordered tuple of ``(regex, rank, alpha[, dropout[, split[, group]]])``, matched with ``re.search`` against a
kernel's path (``vision/layers/attn/qkv/kernel``; the unrolled decoder's ``layers_3`` is read as ``layers``, so one
table serves training and generation); the first match wins and rank 0 means "no adapter" (an exclusion written
before a broader rule).

A kernel ``W`` of shape ``in_shape + features`` with an adapter holds two more float32 params beside it:

- ``lora_a`` [*in_shape, r] and ``lora_b`` [r, *features]; the layer computes
  ``y = x.W + (alpha / r) * (dropout(x).A).B``, the order PEFT uses (``lora_B(lora_A(dropout(x))) * scaling``);
- with ``split`` (one adapter per index of the first output axis, e.g. the ViT's fused qkv kernel [C, 3, H, D] as
  the separate ``q_proj``/``k_proj``/``v_proj`` adapters PEFT puts on transformers' InternViT):
  ``lora_a`` [*in_shape, P, r], ``lora_b`` [P, r, *features[1:]];
- with ``group`` (a name: a shared-A group, the math of one LoRA on a fused torch Linear such as InternLM2's
  ``wqkv`` or Phi-3's ``qkv_proj`` / ``gate_up_proj`` whose rows our separate kernels hold): the kernels of one
  module that the rule's group holds (the decoder's attention q/k/v_proj, the MLP's gate/up_proj: they read the
  same input) share one ``lora_a`` [*in_shape, r] at ``<module>/<group>/lora_a`` and each keeps its own
  ``lora_b`` [r, *features], its rows of the fused B. The module applies dropout to x and forms the scaled
  ``dropout(x).A`` once; every member adds its ``(.).B``: ``y_part = x.W_part + scale * B_part(A x)``, and A's
  gradient is the sum over the parts, as on the fused Linear. Members must share rank, alpha and dropout.

``A`` starts as torch's ``kaiming_uniform_(a=sqrt(5))`` (uniform in +-1/sqrt(fan_in), PEFT's default) and ``B``
at zero, so a new adapter leaves the model's outputs unchanged. The adapters carry logical axes (the kernel's input
axes for ``A``, its output axes for ``B``, ``lora_rank`` unsplit), so every sharding preset places them as it places
their kernels; inside scanned layers they get the stacked ``layers`` axis like every other parameter.

The product never forms ``W + BA`` in the forward pass; :func:`merge` does that once, for export or for serving
merged weights.

Presets (``TARGETS``), the original's target sets (``use_backbone_lora`` / ``use_llm_lora``, alpha = 2r, dropout
0.05): ``vit`` = InternViT ``attn.qkv`` (one adapter on the fused kernel, as the original), ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``; ``vit_split`` = the same with q/k/v adapted separately (PEFT on the transformers-native
ViT); ``llm`` = the attention and MLP projections (q, k, v, o, gate, up, down), each its own adapter as the
original's ``q_proj`` ... ``down_proj`` targets on Qwen2 / Llama / Qwen3; given the model's ``family``,
:func:`preset_rules` puts the kernels of the family's fused torch modules (``FUSED``) in shared-A groups first,
since the original adapts those modules themselves: InternLM2's ``attention.wqkv`` (group ``wqkv``) and Phi-3's
``self_attn.qkv_proj`` / ``mlp.gate_up_proj`` (groups named so; PEFT's module names on transformers' Phi-3). So
``llm`` stays the original's set on every family, with its parameter count and training; without a family (a
table written before the model is known) every projection gets its own adapter. ``projector`` = ``mlp1``'s two
linears (not in the original's sets).
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
# per LLM family, the kernels that the original's fused torch modules hold: (kernel path regex, group name)
FUSED: dict[str, tuple[tuple[str, str], ...]] = {
    "internlm2": ((r"^language_model/layers/attn/[qkv]_proj/kernel$", "wqkv"),),
    "phi3": ((r"^language_model/layers/attn/[qkv]_proj/kernel$", "qkv_proj"),
             (r"^language_model/layers/mlp/(gate|up)_proj/kernel$", "gate_up_proj")),
}


@dataclass(frozen=True)
class Adapter:
    """One kernel's adapter: rank r, alpha (scale = alpha / r), dropout on the adapter's input, split, shared-A
    group ("" = its own A)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    split: bool = False
    group: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def preset_rules(targets, rank: int, alpha: float | None = None, dropout: float = 0.05,
                 family: str | None = None) -> tuple:
    """The rule table for named target sets (``"vit,llm"`` or ``("vit", "llm")``) at one rank; ``alpha`` defaults
    to 2 * rank (the original's). ``family`` (the LLM's, e.g. ``config.text.family``): ``llm`` puts the kernels of
    the family's fused torch modules (``FUSED``) in shared-A groups, as the original adapts them."""
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target set {unknown[0]!r}; use one of {', '.join(TARGETS)} (comma-separated)")
    alpha = 2.0 * rank if alpha is None else float(alpha)
    rules = []
    for n in names:
        if n == "llm":
            rules += [(regex, int(rank), alpha, float(dropout), False, group) for regex, group in FUSED.get(family, ())]
        rules += [(regex, int(rank), alpha, float(dropout), split) for regex, split in TARGETS[n]]
    return tuple(rules)


@lru_cache(maxsize=64)
def compile_rules(rules: tuple) -> tuple[tuple[re.Pattern, Adapter | None], ...]:
    """The table checked and compiled: ``(pattern, Adapter or None for rank 0)`` per rule. Raises ValueError naming
    the rule and what was expected."""
    if not isinstance(rules, tuple):
        raise ValueError(f"LoRA rules must be a tuple of rules, got {type(rules).__name__}")
    out = []
    for i, rule in enumerate(rules):
        where = f"LoRA rules[{i}] = {rule!r}"
        if not isinstance(rule, tuple) or not 3 <= len(rule) <= 6:
            raise ValueError(f"{where}: expected (regex, rank, alpha[, dropout[, split[, group]]])")
        regex, rank, alpha = rule[:3]
        dropout = rule[3] if len(rule) > 3 else 0.0
        split = rule[4] if len(rule) > 4 else False
        group = rule[5] if len(rule) > 5 else ""
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
        if not isinstance(group, str) or not re.fullmatch(r"([A-Za-z_]\w*)?", group):
            raise ValueError(f"{where}: group must be a module name (letters, digits, _) or '', got {group!r}")
        if group and split:
            raise ValueError(f"{where}: a rule is either split or in a shared-A group, not both")
        out.append((pattern, Adapter(rank, float(alpha), float(dropout), split, group) if rank else None))
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


def _mix32(x):
    """A bijective avalanche hash of uint32 words (Wellons' ``lowbias32``: xor-shift, multiply, twice): every output
    bit depends on every input bit, in a few elementwise integer ops that vectorise on every backend."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(key, rate: float, shape: tuple) -> tuple[float, jax.Array]:
    """(keep probability, bool keep mask of ``shape``) for dropout at ``rate``: a counter-based hash keyed from ``key``.

    Threefry (``jax.random.bernoulli``) costs ~100 integer ops per 32-bit word, and on CPU the masks of the LoRA step
    cost more than the adapters' matmuls. Here two uint32 words are drawn from ``key``; each row (the leading axes
    flattened) and each column (the last axis) is hashed with one of them, and an entry is the hash of its row's and
    its column's hashes xored: two hashes per entry. Hashing both sides keeps rows apart (with a plain column
    counter, two rows whose hashes differ in low bits alone would hold the same words permuted). The words depend
    only on the global indices, so a sharded mask equals the unsharded one. An entry is kept when its word is >=
    round(rate * 2**32); the keep probability returned is that exact fraction, so inverted scaling stays unbiased.
    """
    k = jax.random.bits(key, (2,), jnp.uint32)
    lead = (*shape[:-1], 1)
    strides = np.cumprod((1, *shape[-2:0:-1]))[::-1]  # the row-major stride of each leading axis
    rows = sum(jax.lax.broadcasted_iota(jnp.uint32, lead, a) * jnp.uint32(s) for a, s in enumerate(strides))
    cols = jax.lax.broadcasted_iota(jnp.uint32, (1,) * (len(shape) - 1) + shape[-1:], len(shape) - 1)
    words = _mix32(_mix32(rows ^ k[0]) ^ _mix32(cols ^ k[1]))
    drop = min(round(rate * 2**32), 2**32 - 1)
    return 1.0 - drop / 2**32, words >= jnp.uint32(drop)


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


def down(x, a, n_in: int, dtype, scale: float = 1.0, *, key=None, rate: float = 0.0):
    """scale * dropout(x) [..., *in] . A [*in, cols] -> float32 [N, cols] (N: x's leading axes flattened; cols = r, or
    P * r for a split A): the rank-r intermediate, which a shared-A group forms once for all its members. The
    adapter's product is ``up(down(x, a, n_in, dtype, scale), b, lead, split, dtype)``. Dropout (inverted, the mask of
    :func:`dropout_keep`) acts when ``key`` is given and ``rate`` > 0.

    A, B as :func:`shapes_and_axes`; both cast to ``dtype`` (the compute dtype), products accumulate in float32.
    The [N, r] intermediate is all that is added to the activations (no [in, out] matrix is formed); the scale
    multiplies it, not the wider product. Both products run on 2-D views (leading axes flattened into one token
    axis N, the kernel's input axes into one), so their gradients are plain matrix products too: left N-d, B's
    gradient contracts two token axes, and XLA's CPU backend copies the output's cotangent transposed for it,
    which made the LoRA step slower than full fine-tuning (``bench/lora.py``: 1.12x -> 0.82x).

    With dropout the dropped x is recomputed in the backward pass (the mask is a cheap hash of the indices) instead of
    being kept: each adapted kernel would otherwise store its own [N, *in] copy of x (q, k and v three of them).
    """
    def product(x, a, key):
        if key is not None:
            keep, mask = dropout_keep(key, rate, x.shape)
            x = jnp.where(mask, x / keep, 0).astype(x.dtype)
        x = x.astype(dtype)
        x2 = x.reshape(math.prod(x.shape[:x.ndim - n_in]), -1)  # [N, I]
        return jnp.dot(x2, a.astype(dtype).reshape(x2.shape[1], -1), preferred_element_type=jnp.float32) * scale

    if key is None or rate == 0:
        return product(x, a, None)
    return jax.checkpoint(product)(x, a, key)


def up(xa, b, lead: tuple, split: bool, dtype):
    """The intermediate [N, r] (split: [N, P * r]) . B [r, *features] (split: [P, r, *rest]) -> float32
    [*lead, *features] (N = prod(lead))."""
    xa, b = xa.astype(dtype), b.astype(dtype)
    if not split:  # [N, r] . B [r, O]
        y = jnp.dot(xa, b.reshape(b.shape[0], -1), preferred_element_type=jnp.float32)
        return y.reshape(*lead, *b.shape[1:])
    # split: [N, P, r] . B [P, r, K], P a batch dimension (each part its own adapter)
    p, r = b.shape[:2]
    y = jnp.einsum("npr,prk->npk", xa.reshape(-1, p, r), b.reshape(p, r, -1), preferred_element_type=jnp.float32)
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
    kernel's dtype) and the ``lora_a``/``lora_b`` leaves (and shared-A group nodes) removed: the plain model's
    params, for export or merged serving. ``rules``: the table the adapters were made with (it gives each one's
    scale, split and group)."""
    out, groups = {}, set()
    for key, value in params.items():
        path = f"{_path}/{key}" if _path else key
        if isinstance(value, dict) and "lora_b" in value:
            adapter = adapter_for(rules, f"{path}/kernel")
            if adapter is None:
                raise ValueError(f"{path} holds LoRA params but no LoRA rule gives its kernel an adapter")
            a = shared_a(params, adapter.group, _path, key) if adapter.group else value["lora_a"]
            groups.add(adapter.group)
            def fn(w, a, b, scale=adapter.scale, split=adapter.split):
                return (w.astype(jnp.float32) + scale * delta_kernel(a, b, split)).astype(w.dtype)
            if _is_stacked(path):
                fn = jax.vmap(fn)
            rest = {k: v for k, v in value.items() if k not in PARAMS}
            out[key] = {**rest, "kernel": jax.jit(fn)(value["kernel"], a, value["lora_b"])}
        elif isinstance(value, dict):
            out[key] = merge(value, rules, _path=path)
        else:
            out[key] = value
    for group in groups - {""}:
        del out[group]
    left = [p for p in _leaf_paths(out, _path) if is_adapter_path(p)] if not _path else []
    if left:
        raise ValueError(f"{left[0]}: a LoRA param that no rule's kernel uses (a shared-A group without members?)")
    return out


def shared_a(siblings: dict, group: str, parent: str, member: str):
    """The ``lora_a`` of shared-A group ``group`` among ``siblings`` (the params of module ``parent``), for its
    member ``member``; a clear error when it is missing."""
    node = siblings.get(group)
    if not isinstance(node, dict) or "lora_a" not in node:
        raise ValueError(f"{parent}/{member} is in the LoRA shared-A group {group!r}, but {parent}/{group}/lora_a "
                         f"is missing (found {sorted(siblings)})")
    return node["lora_a"]


def _leaf_paths(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        yield from (_leaf_paths(value, path) if isinstance(value, dict) else (path,))


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
