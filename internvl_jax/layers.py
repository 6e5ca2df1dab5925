"""Building blocks shared by InternViT, the projector and the decoder.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) so that ``sharding/`` can place
the same params tree on any mesh from a rule table. Norms and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from . import kernels, lora as lora_rules

Axes = tuple[str | None, ...]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype) -> jnp.dtype:
    """``"bfloat16"`` or ``jnp.bfloat16`` -> ``jnp.bfloat16``."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[name_or_dtype]
    return jnp.dtype(name_or_dtype)


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def param_with_axes(init, axes: Axes):
    return nn.with_logical_partitioning(init, axes)


def constrain(x, axes: Axes):
    """Logical sharding constraint on an activation (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, axes)


def dot_out_in(x, kernel, dtype, out_dtype=None):
    """x [..., in] . kernel [out, in] -> [..., out] in ``out_dtype`` (default ``dtype``), inputs cast to ``dtype``.

    Products accumulate in float32: on XLA CPU a bfloat16-output matmul is several times slower than float32
    accumulation and a cast. Up to ``kernels.MAX_ROWS`` rows of x (decoding) go through
    :func:`internvl_jax.kernels.few_row_product`, which on the CPU reads the weights once at memory bandwidth;
    more rows take XLA's matmul, which reads a 2-D [out, in] kernel in place.
    """
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    rows = math.prod(x.shape[:-1])
    product = kernels.few_row_product if rows <= kernels.MAX_ROWS else kernels.xla_product
    y = product(x.reshape(rows, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[0])
    return y.astype(out_dtype or dtype)


class Dense(nn.Module):
    """y = x . kernel (+ bias), contracting the trailing ``len(in_axes)`` dims of x.

    kernel shape: in_shape + features, named ``in_axes + out_axes``; bias named ``out_axes``. With ``transposed``
    the kernel is one matrix [prod(features), prod(in_shape)] named (first out axis, first in axis), the decoding
    layout (:func:`dot_out_in`; XLA CPU copies a kernel of more than 2 dims into its canonical layout on every
    call, see ``internvl_jax.decoder.unrolled_params``). Products accumulate in float32.

    ``lora``: a LoRA rule table (:mod:`internvl_jax.lora`); when a rule matches this kernel's path, ``lora_a`` and
    ``lora_b`` (float32, whatever ``param_dtype``) are created beside it and the low-rank path is added to y. Its
    dropout is active only when a ``dropout`` rng is given to ``apply`` (training). A kernel in a shared-A group
    holds ``lora_b`` alone and adds ``shared . B``, ``shared`` being its group's intermediate (:func:`lora_groups`,
    formed by the parent module).
    """

    features: Sequence[int]
    in_axes: Axes
    out_axes: Axes
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None  # e.g. float32 logits from bfloat16 inputs
    transposed: bool = False
    lora: tuple = ()

    @nn.compact
    def __call__(self, x, shared=None):
        n_in = len(self.in_axes)
        lead, in_shape = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
        features = tuple(self.features)
        init = nn.initializers.normal(0.02)
        if self.transposed:
            shape = (math.prod(features), math.prod(in_shape))
            kernel = self.param("kernel", param_with_axes(init, (self.out_axes[0], self.in_axes[0])), shape,
                                self.param_dtype)
            y = dot_out_in(x.reshape(*lead, shape[1]), kernel, self.dtype, self.out_dtype).reshape(*lead, *features)
        else:
            kernel = self.param("kernel", param_with_axes(init, self.in_axes + self.out_axes), in_shape + features,
                                self.param_dtype)
            # one 2-D product [rows, in] . [in, out]: for a dot over several leading axes XLA CPU makes the kernel
            # gradient's operand by a transposing loop fusion, 2x slower for a whole MLP step (measured)
            x2 = x.reshape(math.prod(lead), math.prod(in_shape)).astype(self.dtype)
            k2 = kernel.reshape(math.prod(in_shape), math.prod(features)).astype(self.dtype)
            y = jnp.dot(x2, k2, preferred_element_type=jnp.float32).reshape(*lead, *features)
            y = y.astype(self.out_dtype or self.dtype)
        if self.lora:
            y = self._adapted(x, y, in_shape, features, shared)
        if self.use_bias:
            bias = self.param("bias", param_with_axes(nn.initializers.zeros, self.out_axes), features, self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y

    def _adapted(self, x, y, in_shape: tuple, features: tuple, shared=None):
        """y + scale * (dropout(x).A).B when a LoRA rule names this kernel (same params in both layouts); in a
        shared-A group, y + shared.B."""
        path = "/".join(self.scope.path)
        adapter = lora_rules.adapter_for(self.lora, path + "/kernel")
        if adapter is None:
            return y
        a_shape, a_axes, b_shape, b_axes = lora_rules.shapes_and_axes(in_shape, features, self.in_axes,
                                                                        self.out_axes, adapter)
        if adapter.group and shared is None:
            raise ValueError(f"LoRA rules put {path}/kernel in the shared-A group {adapter.group!r}, but its module "
                             "forms no group intermediate (groups hold kernels of one module that read the same "
                             "input: the decoder's attn q/k/v_proj, mlp gate/up_proj)")
        if not adapter.group:
            a = self.param("lora_a", param_with_axes(lora_rules.kaiming_a(math.prod(in_shape)), a_axes), a_shape,
                           jnp.float32)
        b = self.param("lora_b", param_with_axes(nn.initializers.zeros, b_axes), b_shape, jnp.float32)
        lead = x.shape[: x.ndim - len(in_shape)]
        if adapter.group:
            delta = lora_rules.up(shared, b, lead, False, self.dtype)
        else:
            delta = lora_rules.up(_lora_down(self, x, a, adapter, len(in_shape)), b, lead, adapter.split, self.dtype)
        return (y.astype(jnp.float32) + delta).astype(y.dtype)


def _lora_down(module: nn.Module, x, a, adapter, n_in: int):
    """:func:`~internvl_jax.lora.down` of x with the adapter's dropout when ``module`` has a ``dropout`` rng."""
    key = module.make_rng("dropout") if adapter.dropout > 0 and module.has_rng("dropout") else None
    return lora_rules.down(x, a, n_in, module.dtype, adapter.scale, key=key, rate=adapter.dropout)


class SharedA(nn.Module):
    """The ``lora_a`` [*in_shape, r] of a shared-A group (one LoRA on a fused torch Linear, split over our kernels):
    x [..., *in_shape] -> scale * dropout(x).A, float32 [N, r] (N: x's leading axes flattened)."""

    adapter: "lora_rules.Adapter"
    in_axes: Axes
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - len(self.in_axes):]
        shape, axes = lora_rules.shapes_and_axes(in_shape, (), self.in_axes, (), self.adapter)[:2]
        a = self.param("lora_a", param_with_axes(lora_rules.kaiming_a(math.prod(in_shape)), axes), shape,
                       jnp.float32)
        return _lora_down(self, x, a, self.adapter, len(in_shape))


def lora_groups(module: nn.Module, x, members: Sequence[str], in_axes: Axes) -> dict:
    """The shared-A intermediates for ``module``'s Dense children ``members`` (names; all read ``x``):
    {member: float32 [N, r]} for each member that ``module.lora`` puts in a group (absent: its own adapter or none).
    Each group's :class:`SharedA` is a child of ``module`` named for the group; call from its compact method."""
    path = "/".join(module.scope.path)
    groups: dict[str, list] = {}
    for name in members:
        adapter = lora_rules.adapter_for(module.lora, f"{path}/{name}/kernel")
        if adapter is not None and adapter.group:
            groups.setdefault(adapter.group, []).append((name, adapter))
    out = {}
    for group, named in groups.items():
        if group in members:
            raise ValueError(f"LoRA shared-A group {group!r} of {path} has the name of one of its kernels")
        if len({a for _, a in named}) != 1:
            raise ValueError(f"LoRA shared-A group {group!r} of {path}: its kernels {[n for n, _ in named]} get "
                             f"different adapters {[a for _, a in named]}; one rank, alpha and dropout per group")
        shared = SharedA(named[0][1], in_axes, module.dtype, name=group)(x)
        out.update({name: shared for name, _ in named})
    return out


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis.

    RMSNorm normalises in float32, casts back to the compute dtype, then multiplies by the weight (the
    transformers/InternLM convention). LayerNorm computes entirely in float32 and casts at the end (as torch does).
    """

    kind: str  # "rms_norm" | "layer_norm"
    eps: float
    axis_name: str | None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        scale = self.param("scale", param_with_axes(nn.initializers.ones, (self.axis_name,)), (dim,), self.param_dtype)
        xf = x.astype(jnp.float32)
        if self.kind == "rms_norm":
            y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
            return scale.astype(self.dtype) * y.astype(self.dtype)
        if self.kind != "layer_norm":
            raise ValueError(f"unknown norm type {self.kind!r}")
        bias = self.param("bias", param_with_axes(nn.initializers.zeros, (self.axis_name,)), (dim,), self.param_dtype)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


DENSE_IMPLS = ("batched", "per_kv_head")  # :func:`attention` itself (a dense [B, 1, L, S] mask)
# internvl_jax.attention
ATTENTION_IMPLS = ("auto", *DENSE_IMPLS, "dot_product", "blockwise", "cpu_flash", "adaptive", "splash")
AUTO_ATTENTION = {"cpu": "adaptive", "tpu": "splash", "gpu": "dot_product"}


def resolve_attention_impl(impl: str) -> str:
    """``auto`` -> the backend's choice in ``AUTO_ATTENTION``: on the CPU ``adaptive`` (the CPU kernel, or without
    it blockwise where blocks can be skipped and per KV head otherwise: :func:`internvl_jax.attention.adaptive_impl`),
    Pallas splash on TPU,
    ``jax.nn.dot_product_attention`` (cuDNN flash) on GPU. Name the impl explicitly when compiling ahead of time
    for another platform."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; use one of {', '.join(ATTENTION_IMPLS)}")
    if impl == "auto":
        return AUTO_ATTENTION.get(jax.default_backend(), "batched")
    return impl


def dense_impl(impl: str) -> str:
    """The :func:`attention` loop for a call that needs a dense mask (cache prefill, QLLaMA's masks) under the
    configured ``impl``: itself if dense, per KV head for ``adaptive`` and ``cpu_flash`` (the CPU's dense choice),
    batched otherwise."""
    if impl in DENSE_IMPLS:
        return impl
    return "per_kv_head" if impl in ("adaptive", "cpu_flash") else "batched"


def attention(q, k, v, mask, *, scale: float, impl: str = "batched"):
    """Softmax attention with grouped KV heads, float32 scores and softmax.

    q: [B, L, H, D]; k, v: [B, S, K, D] with H a multiple of K (query head h uses KV head h // (H/K));
    mask: bool [B, 1, L, S] (True = attend) or None. Returns [B, L, H, D] in q's dtype.
    ``impl``: ``batched`` computes all KV heads at once; ``per_kv_head`` loops over them (``lax.map``).
    """
    b, l, h, d = q.shape
    kv = k.shape[2]
    qt = q.reshape(b, l, kv, h // kv, d).transpose(2, 0, 3, 1, 4)  # [K, B, G, L, D]
    kt, vt = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)  # [K, B, S, D]

    def one_kv_head(args):
        qh, kh, vh = args
        scores = jnp.einsum("bgld,bsd->bgls", qh, kh, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            # a finite minimum keeps fully masked (padding) rows NaN-free
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
        return jnp.einsum("bgls,bsd->bgld", probs, vh)

    if impl == "per_kv_head":
        out = jax.lax.map(one_kv_head, (qt, kt, vt))
    elif impl == "batched":
        out = jax.vmap(one_kv_head)((qt, kt, vt))
    else:
        raise ValueError(f"unknown attention impl {impl!r}")
    return out.transpose(1, 3, 0, 2, 4).reshape(b, l, h, d)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan_layers(layer_cls, *, length: int, remat: str, in_axes, unroll: int = 1):
    """A scanned stack of ``layer_cls`` (params stacked on a leading ``layers`` axis), optionally rematerialised.

    ``remat`` names a policy in ``REMAT_POLICIES``. ``in_axes`` as for ``nn.scan`` (excluding the carry).
    ``unroll``: layers per loop iteration (``lax.scan``'s unroll; the params keep their stacked layout). From
    ``length`` on there is no loop at all, and the backward pass no longer writes each layer's activations into
    stacked buffers (zero-filled, then updated slice by slice): on a CPU a 2-layer stack trains ~7% faster; each
    layer is then compiled apart.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; use one of {', '.join(REMAT_POLICIES)}")
    if unroll < 1:
        raise ValueError(f"scan unroll must be at least 1, got {unroll}")
    if remat != "none":
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
        unroll=min(unroll, length),
    )
