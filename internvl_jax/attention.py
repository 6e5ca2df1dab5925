"""Attention backends that take segment ids instead of a dense mask.

``attend(q, k, v, q_segment_ids, kv_segment_ids, *, scale, causal, impl)`` is one softmax attention with grouped KV
heads and float32 scores/softmax, computed by one of:

- ``xla`` (also ``batched`` / ``per_kv_head``, the loop choices of :func:`internvl_jax.layers.attention`): the
  reference. Builds the dense bool mask [B, 1, L, S] from the segment ids and calls ``layers.attention``.
- ``dot_product``: ``jax.nn.dot_product_attention``, cuDNN's fused (flash) kernel on GPUs where it applies, its XLA
  implementation elsewhere. Takes the dense mask [B, 1, L, S] too (cuDNN turns it into an additive bias).
- ``blockwise``: pure JAX, any device, flash-style: query blocks (``lax.map``) times an online-softmax ``lax.scan``
  over KV blocks, masks built per block from the segment ids and indices, no [L, S] array of any kind; the scan
  body is rematerialised, so the backward pass keeps only the per-block carries.
- ``cpu_flash``: the native CPU kernel (:func:`internvl_jax.kernels.flash_attention`): FlashAttention-2's blocks in
  C++, forward and backward, skipping blocks that the causal mask or the segments leave empty; CPU traces only.
- ``adaptive`` (the CPU's ``auto``): ``cpu_flash`` where the CPU kernels are built; without them ``blockwise`` with
  blocks of :data:`ADAPTIVE_BLOCK` where whole blocks can be skipped (causal or packed, at least two blocks long),
  ``per_kv_head`` otherwise (:func:`adaptive_impl`).
- ``splash``: the Pallas TPU splash-attention kernel (block-sparse: with ``causal`` it skips the blocks above the
  diagonal); interpreted (slowly) on other backends, for tests.

Shapes: q [B, L, H, D]; k, v [B, S, K, D] with H a multiple of K (query head h uses KV head h // (H / K));
segment ids int32 [B, L] and [B, S]: 0 marks padding, packed samples carry different ids, a query attends to the
keys of its own (non-zero) segment, and with ``causal`` only to key index <= query index. ``None`` for both
segment ids means one segment and no padding (the ViT): no mask at all where the backend allows.
The output is [B, L, H, D] in q's dtype; rows of padding queries (segment 0) are zeros in every backend.
Every valid query must see at least one key (true for causal self-attention: it sees itself).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import kernels, layers
from .target import traced_platform

IMPLS = ("xla", "batched", "per_kv_head", "dot_product", "blockwise", "cpu_flash", "adaptive", "splash")
# Without the CPU kernels, measured on a 2-core CPU (float32 forward + backward, 4 query / 2 KV heads of 64, causal,
# packed rows of 150-500 tokens): per KV head vs blockwise-256 at L = 256: 32 / 31 ms (8 rows), 512: 58 / 42 (4),
# 1024: 130 / 45 (2), 4096: 1596 / 143 ms (1 row); blocks of 128 were slower from 1024 on. Without a mask (the ViT's
# 1025 tokens) blockwise skips nothing and is 1.6x slower than the dense loop. ``adaptive`` also rematerialises
# whole query blocks: inside the layers' scan JAX otherwise keeps every block's probabilities for the backward (a
# 2048-token row, 2 layers: 250 MiB of temporaries instead of 65, and no slower).
ADAPTIVE_BLOCK = 256


def adaptive_impl(length: int, causal: bool, segmented: bool, kernel: bool = False) -> str:
    """``adaptive``'s choice for a [length, length] attention: ``cpu_flash`` where the ``kernel`` is available
    (a CPU trace with the CPU kernels built); else ``blockwise`` (blocks of :data:`ADAPTIVE_BLOCK`, query blocks
    rematerialised) when a mask (``causal`` or packed ``segmented`` rows) can leave whole blocks empty, i.e. over at
    least two blocks; ``per_kv_head`` otherwise (one block, or nothing masked: the dense loop is faster)."""
    if kernel:
        return "cpu_flash"
    return "blockwise" if (causal or segmented) and length >= 2 * ADAPTIVE_BLOCK else "per_kv_head"


def cpu_kernel_available() -> bool:
    """Whether this trace may call the CPU attention kernel: it is for the CPU and the kernels are built."""
    return traced_platform() == "cpu" and kernels.cpu_kernels_enabled()


def segment_mask(q_segment_ids, kv_segment_ids, causal: bool):
    """Segment ids [B, L], [B, S] -> bool [B, 1, L, S]: same segment, key not padding, and (``causal``) key index
    <= query index."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
        l, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
        mask = mask & (jnp.arange(l)[:, None] >= jnp.arange(s)[None, :])[None]
    return mask[:, None]


def _check(q, k, v, q_segment_ids, kv_segment_ids):
    b, l, h, d = q.shape
    _, s, kv, _ = k.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: want q [B, L, H, D], k = v [B, S, K, D]")
    if h % kv:
        raise ValueError(f"{h} query heads are not a multiple of {kv} KV heads")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both segment ids or neither")
    if q_segment_ids is not None and (q_segment_ids.shape != (b, l) or kv_segment_ids.shape != (b, s)):
        raise ValueError(f"segment ids {q_segment_ids.shape}, {kv_segment_ids.shape}: want [{b}, {l}], [{b}, {s}]")


def _zero_padding_rows(out, q_segment_ids):
    if q_segment_ids is None:
        return out
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


def attend(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, scale: float, causal: bool, impl: str = "xla",
           head_axes: tuple[str, str] = ("heads", "kv_heads"), batch_valid=None, **options):
    """Softmax attention (grouped KV heads, float32 scores and softmax) with masks from segment ids.

    q: [B, L, H, D]; k, v: [B, S, K, D], H a multiple of K; q_segment_ids int [B, L], kv_segment_ids int [B, S]
    (0 = padding; both None = one segment, no padding); ``causal``: keys at index <= the query's only.
    ``impl``: one of :data:`IMPLS` (see the module docstring; ``cpu_flash`` in a trace for the CPU only).
    ``options`` go to the backend: ``block_q`` / ``block_kv`` (blockwise, splash), ``implementation``
    (dot_product), ``interpret`` (splash).
    ``head_axes``: the logical names of q's and k's head dimensions, for splitting the splash kernel over a mesh.
    ``batch_valid``: bool [B] or None, with no segment ids: False marks a row that is padding as a whole (a ViT's
    empty tile slot). ``cpu_flash`` skips such rows (their outputs and gradients are zeros); the other backends,
    for which a mask costs more than it saves, compute them as usual. Valid rows are the same either way.
    Returns [B, L, H, D] in q's dtype; padding query rows are zeros.
    """
    _check(q, k, v, q_segment_ids, kv_segment_ids)
    if impl == "adaptive":
        impl = adaptive_impl(min(q.shape[1], k.shape[1]), causal, q_segment_ids is not None,
                             kernel=cpu_kernel_available())
        blocks = dict(block_q=ADAPTIVE_BLOCK, block_kv=ADAPTIVE_BLOCK, remat_q_blocks=True)
        options = {**blocks, **options} if impl == "blockwise" else {
            key: value for key, value in options.items() if key not in blocks}
    if impl in ("xla", "batched", "per_kv_head"):
        fn = functools.partial(xla_attention, impl="auto" if impl == "xla" else impl)
    elif impl == "dot_product":
        fn = dot_product_attention
    elif impl == "blockwise":
        fn = blockwise_attention
    elif impl == "splash":
        return _per_shard(functools.partial(splash_attention, scale=scale, causal=causal, **options), head_axes,
                          q, k, v, q_segment_ids, kv_segment_ids)
    elif impl == "cpu_flash":
        if traced_platform() != "cpu":
            raise ValueError(f"attention impl 'cpu_flash' runs on the CPU only; this trace is for "
                             f"{traced_platform()!r} (use 'auto')")
        if batch_valid is not None and q_segment_ids is None:  # an empty row: one segment of padding (id 0)
            q_segment_ids = jnp.broadcast_to(batch_valid.astype(jnp.int32)[:, None], q.shape[:2])
            kv_segment_ids = jnp.broadcast_to(batch_valid.astype(jnp.int32)[:, None], k.shape[:2])
        return _per_shard(functools.partial(kernels.flash_attention, scale=scale, causal=causal), head_axes,
                          q, k, v, q_segment_ids, kv_segment_ids)
    else:
        raise ValueError(f"unknown attention impl {impl!r}; use one of {', '.join(IMPLS)}")
    return fn(q, k, v, q_segment_ids, kv_segment_ids, scale=scale, causal=causal, **options)


def _per_shard(fn, head_axes: tuple[str, str], q, k, v, q_segment_ids, kv_segment_ids):
    """``fn(q, k, v, q_segment_ids, kv_segment_ids)`` on each device's shard (``shard_map``) when a mesh and
    logical rules are active (``sharding.activate``): the partitioner cannot split a Pallas kernel or a custom
    call and would gather its inputs onto every device. Batch and heads are split as the rules say where the mesh
    axes divide them; the sequence stays whole."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or mesh.size == 1 or not rules:
        return fn(q, k, v, q_segment_ids, kv_segment_ids)
    q_axes = nn.logical_to_mesh_axes(("batch", None, head_axes[0], None), rules)
    kv_axes = nn.logical_to_mesh_axes(("batch", None, head_axes[1], None), rules)
    # a dimension its mesh axes do not divide stays whole on every device (the batch of 1 of an init, say); the
    # query and KV heads are split together or not at all, so that each shard keeps whole groups
    batch = _dividing(q_axes[0], q.shape[0], mesh)
    heads = (q_axes[2], kv_axes[2])
    if _dividing(heads[0], q.shape[2], mesh) is None or _dividing(heads[1], k.shape[2], mesh) is None:
        heads = (None, None)
    q_spec, kv_spec = P(batch, None, heads[0], None), P(batch, None, heads[1], None)
    if q_segment_ids is None:
        return jax.shard_map(lambda a, b, c: fn(a, b, c, None, None), mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                             out_specs=q_spec, check_vma=False)(q, k, v)
    seg_spec = P(batch, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def _dividing(axes, size: int, mesh):
    """``axes`` (a mesh axis name, a tuple of them, or None) if their sizes' product divides ``size``, else None."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes if size % math.prod(mesh.shape[name] for name in names) == 0 else None


def xla_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, scale: float, causal: bool,
                  impl: str = "auto"):
    """The reference: the dense mask [B, 1, L, S] and :func:`internvl_jax.layers.attention` (``impl``: its
    ``batched`` / ``per_kv_head`` loop, ``auto``: the dense loop of :func:`layers.resolve_attention_impl`'s choice)."""
    b, l, s = q.shape[0], q.shape[1], k.shape[1]
    if q_segment_ids is None:
        mask = jnp.tril(jnp.ones((l, s), bool))[None, None] if causal else None
    else:
        mask = segment_mask(q_segment_ids, kv_segment_ids, causal)
    out = layers.attention(q, k, v, mask, scale=scale, impl=layers.dense_impl(layers.resolve_attention_impl(impl)))
    return _zero_padding_rows(out, q_segment_ids)


def dot_product_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, scale: float, causal: bool,
                          implementation: str | None = None):
    """``jax.nn.dot_product_attention`` with the segment mask [B, 1, L, S] (its GQA is native: K < H heads).

    ``implementation``: ``"cudnn"`` (GPU only; bfloat16/float16, head dim <= 128...), ``"xla"``, or None: cuDNN
    on a GPU backend when it accepts the call, XLA otherwise. ``causal`` goes in as ``is_causal`` (cuDNN's own
    causal mask type) and the segment mask as ``mask`` (cuDNN adds it as a bias); jax 0.10's ``implementation=None``
    itself always means XLA, hence the explicit choice here.
    """
    mask = None if q_segment_ids is None else segment_mask(q_segment_ids, kv_segment_ids, causal=False)
    k, v = k.astype(q.dtype), v.astype(q.dtype)  # it wants one dtype
    call = functools.partial(jax.nn.dot_product_attention, q, k, v, mask=mask, scale=scale, is_causal=causal)
    if implementation is None:
        out = None
        if traced_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:  # cuDNN rejects some shapes (head dims, mask forms) at trace time; XLA takes everything
                out = call(implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError, TypeError):
                out = None
        if out is None:
            out = call(implementation="xla")
    else:
        out = call(implementation=implementation)
    return _zero_padding_rows(out.astype(q.dtype), q_segment_ids)


def _pad_to(x, length: int, axis: int, value=0):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, scale: float, causal: bool,
                        block_q: int = 512, block_kv: int = 512, skip_masked_blocks: bool = True,
                        remat_q_blocks: bool = False):
    """Memory-efficient attention in pure JAX (any device).

    Query blocks of ``block_q`` rows go through ``lax.map`` one at a time; for each, a ``lax.scan`` over KV blocks of
    ``block_kv`` keys keeps the running row max m, the running sum l of exp(score - m) and the running weighted sum
    of values, all float32 (online softmax), and rescales them by exp(m_old - m_new) when the max grows. Scores
    exist only as one [B, K, H/K, block_q, block_kv] block: the mask of a block comes from the segment ids and
    indices of its rows and keys. GQA: the H/K query heads of one KV head form one group against that head's keys
    (K is never repeated). With ``skip_masked_blocks``, blocks without any attended pair in the whole batch (above
    the causal diagonal, between packed samples, padding) skip the matmuls (``lax.cond``; when the batch axis is
    sharded its predicate is one all-reduce of a flag per step). The scan body is under ``jax.checkpoint``: the
    backward pass stores the carries of each step, not each block's probabilities, and recomputes those;
    ``remat_q_blocks`` also rematerialises each query block's whole scan.

    Block sizes are clipped to the lengths; q and k/v are padded to multiples of them with segment id 0.
    """
    b, l, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    block_q, block_kv = min(block_q, l), min(block_kv, s)
    nq, nk = -(-l // block_q), -(-s // block_kv)
    lp, sp = nq * block_q, nk * block_kv
    if q_segment_ids is None:  # one segment; only the padding added here is masked
        q_segment_ids = jnp.ones((b, l), jnp.int32)
        kv_segment_ids = jnp.ones((b, s), jnp.int32)
        zero_rows = False
    else:
        zero_rows = True
    qseg = _pad_to(q_segment_ids.astype(jnp.int32), lp, 1)
    kseg = _pad_to(kv_segment_ids.astype(jnp.int32), sp, 1)

    # blocks on the leading axis (what lax.map / lax.scan iterate over), heads grouped per KV head
    qb = _pad_to(q, lp, 1).reshape(b, nq, block_q, kv, g, d).transpose(1, 0, 3, 4, 2, 5)  # [nq, B, K, G, bq, D]
    kb = _pad_to(k, sp, 1).reshape(b, nk, block_kv, kv, d).transpose(1, 0, 3, 2, 4)  # [nk, B, K, bk, D]
    vb = _pad_to(v, sp, 1).reshape(b, nk, block_kv, kv, d).transpose(1, 0, 3, 2, 4)
    qsegb = qseg.reshape(b, nq, block_q).transpose(1, 0, 2)  # [nq, B, bq]
    ksegb = kseg.reshape(b, nk, block_kv).transpose(1, 0, 2)  # [nk, B, bk]

    def kv_step(carry, xs, *, qi, qblk, qseg_blk):
        m, lsum, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, D]
        ki, kblk, vblk, kseg_blk = xs
        mask = (qseg_blk[:, :, None] == kseg_blk[:, None, :]) & (kseg_blk[:, None, :] != 0)  # [B, bq, bk]
        if causal:
            rows = qi * block_q + jnp.arange(block_q)
            cols = ki * block_kv + jnp.arange(block_kv)
            mask = mask & (rows[:, None] >= cols[None, :])[None]
        mask = mask[:, None, None]  # [B, 1, 1, bq, bk]

        def update(carry):
            m, lsum, acc = carry
            # the group's heads and rows as one axis of G * bq rows: a product over two axes makes XLA CPU build
            # the key gradient's operand by a slow transposing loop (the reshapes are free)
            rows = qblk.reshape(b, kv, g * block_q, d)
            scores = jnp.einsum("bkrd,bksd->bkrs", rows, kblk, preferred_element_type=jnp.float32)
            scores = scores.reshape(b, kv, g, block_q, block_kv) * scale
            scores = jnp.where(mask, scores, -jnp.inf)
            # the max only keeps exp() in range; the result does not depend on it, so no gradient through it
            m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(scores, axis=-1)))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing attended yet: exp(-inf) = 0
            probs = jnp.exp(scores - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)  # 0 while m is -inf
            lsum = alpha * lsum + jnp.sum(probs, axis=-1)
            pv = jnp.einsum("bkrs,bksd->bkrd", probs.astype(vblk.dtype).reshape(b, kv, g * block_q, block_kv), vblk,
                            preferred_element_type=jnp.float32).reshape(b, kv, g, block_q, d)
            return m_new, lsum, alpha[..., None] * acc + pv

        if not skip_masked_blocks:
            return update(carry), None
        return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    def q_block(xs):
        qi, qblk, qseg_blk = xs
        init = (jnp.full((b, kv, g, block_q), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g, block_q), jnp.float32),
                jnp.zeros((b, kv, g, block_q, d), jnp.float32))
        step = jax.checkpoint(functools.partial(kv_step, qi=qi, qblk=qblk, qseg_blk=qseg_blk))
        _, lsum, acc = jax.lax.scan(step, init, (jnp.arange(nk), kb, vb, ksegb))[0]
        # rows that attended to nothing (padding) have lsum 0: output zeros, not 0/0
        return jnp.where(lsum[..., None] > 0, acc / jnp.where(lsum > 0, lsum, 1.0)[..., None], 0.0).astype(q.dtype)

    if remat_q_blocks:
        # the backward pass recomputes one query block's forward scan at a time, holding the carries of that
        # block's KV steps only, for one more forward's work (measured on CPU: ~15% less temporary memory at
        # L=16k, ~10% slower; off by default)
        q_block = jax.checkpoint(q_block)
    out = jax.lax.map(q_block, (jnp.arange(nq), qb, qsegb))  # [nq, B, K, G, bq, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, lp, h, d)[:, :l]
    return _zero_padding_rows(out, q_segment_ids) if zero_rows else out


SPLASH_ALIGN = 128  # the splash kernel's blocks are multiples of the TPU lane width


def _splash_block(requested: int, length: int) -> int:
    """The largest multiple of 128 that is <= ``requested`` and divides ``length`` (itself a multiple of 128)."""
    blk = max(SPLASH_ALIGN, min(requested, length) // SPLASH_ALIGN * SPLASH_ALIGN)
    while length % blk:
        blk -= SPLASH_ALIGN
    return blk


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lp: int, sp: int, causal: bool, block_q: int, block_kv: int, interpret: bool):
    # the kernel's static block-sparsity tables are numpy work over the mask: build each shape's kernel once
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    base = sa.CausalMask((lp, sp)) if causal else sa.FullMask((lp, sp))
    sizes = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                          block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                          block_q_dq=block_q, block_kv_dq=block_kv)
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([base] * heads), block_sizes=sizes,
                                            interpret=interpret)


def splash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, scale: float, causal: bool,
                     block_q: int = 512, block_kv: int = 512, interpret: bool | None = None):
    """The Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu.splash_attention``).

    GQA as one MQA kernel per KV head (its H/K query heads share that head's k and v; ``vmap`` over batch and KV
    heads), with a static ``CausalMask`` or ``FullMask`` and-ed in the kernel with ``SegmentIds``. The kernel does not
    scale, so q is pre-scaled. Lengths are padded to multiples of 128 with segment id 0 (padding keys then match
    only padding queries, whose rows are zeroed); block sizes are the largest multiples of 128 up to ``block_q`` /
    ``block_kv`` dividing the padded lengths. ``interpret``: run the kernel in the Pallas interpreter (default:
    unless the target is a TPU, see :func:`internvl_jax.target.target_platform`; slow, for tests).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, l, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    if interpret is None:
        interpret = traced_platform() != "tpu"
    lp, sp = -(-l // SPLASH_ALIGN) * SPLASH_ALIGN, -(-s // SPLASH_ALIGN) * SPLASH_ALIGN
    zero_rows = q_segment_ids is not None
    if q_segment_ids is None and (lp != l or sp != s):  # the padding needs segment ids to be masked
        q_segment_ids, kv_segment_ids = jnp.ones((b, l), jnp.int32), jnp.ones((b, s), jnp.int32)
    kernel = _splash_kernel(g, lp, sp, causal, _splash_block(block_q, lp), _splash_block(block_kv, sp),
                            bool(interpret))

    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)  # pre-scaled in float32, as the reference scales scores
    qt = _pad_to(qs, lp, 1).reshape(b, lp, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, Lp, D]
    kt = _pad_to(k.astype(q.dtype), sp, 1).transpose(0, 2, 1, 3)  # [B, K, Sp, D]
    vt = _pad_to(v.astype(q.dtype), sp, 1).transpose(0, 2, 1, 3)
    if q_segment_ids is None:
        out = jax.vmap(jax.vmap(kernel))(qt, kt, vt)
    else:
        seg = sa.SegmentIds(q=_pad_to(q_segment_ids.astype(jnp.int32), lp, 1),
                            kv=_pad_to(kv_segment_ids.astype(jnp.int32), sp, 1))
        per_head = jax.vmap(lambda qh, kh, vh, sg: kernel(qh, kh, vh, segment_ids=sg), in_axes=(0, 0, 0, None))
        out = jax.vmap(per_head)(qt, kt, vt, seg)  # [B, K, G, Lp, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, lp, h, d)[:, :l].astype(q.dtype)
    return _zero_padding_rows(out, q_segment_ids) if zero_rows else out
