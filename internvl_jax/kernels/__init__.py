"""Native CPU kernels behind XLA FFI custom calls, compiled on first use with the host's C++ compiler.

* ``few_row_product(x, w)``: x [M, K] . w [N, K]^T -> float32 [M, N] for the few rows of a decode step. On the
  CPU it reads float32 or bfloat16 weights once at memory bandwidth (XLA CPU widens a bfloat16 matrix into a
  fresh float32 copy before each product); elsewhere, or where no compiler is found, an XLA ``dot_general``.
* ``decode_attention(q, k, v, mask, scale=)``: one query token per row over a KV cache. On the CPU it reads the
  cache once (XLA CPU transposes every layer's keys on every step); elsewhere an XLA multiply-and-sum.

* ``flash_attention(q, k, v, q_segment_ids, kv_segment_ids, scale=, causal=)``: softmax attention for training,
  forward and backward, in blocks that stay in cache (XLA CPU makes a pass over the whole score array per
  operation). CPU only: :mod:`internvl_jax.attention` calls it where the trace is for the CPU and the kernels are
  built.

The first two are in ``cpu_decode.cc``, the third in ``cpu_attention.cc`` (both use ``parallel.h``). The same
float32 products and sums as XLA's; only their order differs.

The library is built once per source, compiler, jaxlib and CPU (``-march=native``) into
``$INTERNVL_JAX_CACHE`` (default ``~/.cache/internvl_jax``)/kernels, under a temporary name renamed at the end,
so that concurrent processes never load a half-written file. ``INTERNVL_JAX_CPU_KERNELS=0`` turns the kernels
off; ``CXX`` names the compiler (default ``c++``). A failed build warns once and falls back to XLA.

JAX traces a platform-dependent function's CPU branch whatever the platform it compiles for; the kernels are
built and called only in a trace for the CPU (:func:`internvl_jax.target.traced_platform`: the default backend, or
``target_platform("cpu")``), so that GPU and TPU hosts never build them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..target import traced_platform

__all__ = ["MAX_ROWS", "cpu_kernels_enabled", "decode_attention", "few_row_product", "flash_attention",
           "xla_decode_attention", "xla_product"]

MAX_ROWS = 16  # rows of x up to which few_row_product is used (decoding; prefill rows take XLA's matmul)
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_decode.cc", "cpu_attention.cc"))
_HEADERS = (Path(__file__).with_name("parallel.h"),)  # included by the sources: part of the library's key
_TARGETS = {"internvl_matvec": "InternvlMatvec", "internvl_cache_attention": "InternvlCacheAttention",
            "internvl_flash_forward": "InternvlFlashForward", "internvl_flash_backward": "InternvlFlashBackward"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _cache_dir() -> Path:
    root = os.environ.get("INTERNVL_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "internvl_jax")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _library_path(compiler: str) -> Path:
    """Where the library built by ``compiler`` for these sources, jaxlib and CPU lives."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    sources = [src.read_text() for src in _SOURCES + _HEADERS]
    parts = [*sources, version, " ".join(_FLAGS), jax.__version__, _cpu_signature()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return _cache_dir() / f"cpu_kernels-{key}.so"


def _build() -> Path:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} is not on PATH; set CXX)")
    path = _library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def cpu_kernels_enabled() -> bool:
    """Whether the CPU kernels are built and registered (building them on the first call)."""
    if os.environ.get("INTERNVL_JAX_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.CDLL(str(_build()))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"internvl_jax: the CPU kernels are not available, using XLA ({err})",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def xla_product(x, w):
    """x [M, K] . w [N, K]^T -> float32 [M, N] as one XLA ``dot_general`` (w read in place)."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _cpu_product(x, w):
    if w.dtype in (jnp.float32, jnp.bfloat16) and cpu_kernels_enabled():
        out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
        return jax.ffi.ffi_call("internvl_matvec", out)(x.astype(jnp.float32), w)
    if x.shape[0] == 1 and w.dtype != jnp.float32:
        # without the kernel, one 16-bit row: XLA's matrix-vector product would widen the whole matrix first
        # (~10x slower than this fused multiply-and-sum). The barrier ties w to x, so that in a decode loop XLA
        # neither hoists the widening (a float32 copy of the weights) nor fuses consecutive products.
        x, w = jax.lax.optimization_barrier((x, w))
        return jnp.sum(w.astype(jnp.float32) * x.astype(jnp.float32), axis=-1)[None]
    return xla_product(x, w)


@jax.custom_vjp
def few_row_product(x, w):
    """x [M, K] . w [N, K]^T -> float32 [M, N], x and w of one dtype; the CPU kernel on the CPU (see module)."""
    # the branch is chosen here, not inside it: JAX caches a branch's trace by its function
    cpu = _cpu_product if traced_platform() == "cpu" else xla_product
    return jax.lax.platform_dependent(x, w, cpu=cpu, default=xla_product)


def _forward(x, w):
    return few_row_product(x, w), (x, w)


def _backward(res, g):
    x, w = res
    dx = jax.lax.dot_general(g, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(g, x, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


few_row_product.defvjp(_forward, _backward)


def xla_decode_attention(q, k, v, mask, *, scale: float):
    """Attention of one query token per row over a KV cache, as an XLA multiply-and-sum: the form off the CPU and
    the CPU fallback (in XLA CPU's decode loop a batched matmul made it copy every cache buffer each step).

    q: [B, 1, H, D]; k, v: [B, K, S, D] with H a multiple of K; mask: bool [B, S] (True = attend).
    Scores and softmax in float32. Returns [B, 1, H, D] in q's dtype.
    """
    b, _, h, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv, 1, d).astype(jnp.float32)  # [B, K, G, 1, D]
    scores = jnp.sum(qg * k[:, :, None].astype(jnp.float32), axis=-1) * scale  # [B, K, G, S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=-2)  # [B, K, G, D]
    return out.reshape(b, 1, h, d).astype(q.dtype)


def _cpu_decode_attention(q, k, v, mask, *, scale: float):
    if k.dtype == v.dtype and k.dtype in (jnp.float32, jnp.bfloat16) and cpu_kernels_enabled():
        b, _, h, d = q.shape
        out = jax.ShapeDtypeStruct((b, h, d), jnp.float32)
        got = jax.ffi.ffi_call("internvl_cache_attention", out)(q.reshape(b, h, d).astype(jnp.float32), k, v,
                                                                 mask.astype(bool), scale=np.float32(scale))
        return got.reshape(q.shape).astype(q.dtype)
    return xla_decode_attention(q, k, v, mask, scale=scale)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _decode_attention(q, k, v, mask, scale):
    cpu = _cpu_decode_attention if traced_platform() == "cpu" else xla_decode_attention
    return jax.lax.platform_dependent(q, k, v, mask, cpu=partial(cpu, scale=scale),
                                      default=partial(xla_decode_attention, scale=scale))


def _attention_forward(q, k, v, mask, scale):
    return _decode_attention(q, k, v, mask, scale), (q, k, v, mask)


def _attention_backward(scale, res, g):
    q, k, v, mask = res
    _, pullback = jax.vjp(lambda q, k, v: xla_decode_attention(q, k, v, mask, scale=scale), q, k, v)
    return (*pullback(g), None)


_decode_attention.defvjp(_attention_forward, _attention_backward)


def decode_attention(q, k, v, mask, *, scale: float):
    """Attention of one query token per row over a KV cache (the kernel on the CPU; see module).

    q: [B, 1, H, D]; k, v: [B, K, S, D] with H a multiple of K (query head h reads kv head h // (H // K));
    mask: bool [B, S] (True = attend; a row with no True slot averages every slot). Scores and softmax in
    float32. Returns [B, 1, H, D] in q's dtype.
    """
    return _decode_attention(q, k, v, mask, float(scale))


def _flash_forward_call(q, k, v, q_segment_ids, kv_segment_ids, scale: float, causal: bool):
    b, l, h, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, l), jnp.float32))
    return jax.ffi.ffi_call("internvl_flash_forward", out, vmap_method="sequential")(
        q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=np.float32(scale))


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, q_segment_ids, kv_segment_ids, scale, causal):
    return _flash_forward_call(q, k, v, q_segment_ids, kv_segment_ids, scale, causal)[0]


def _flash_forward(q, k, v, q_segment_ids, kv_segment_ids, scale, causal):
    out, lse = _flash_forward_call(q, k, v, q_segment_ids, kv_segment_ids, scale, causal)
    return out, (q, k, v, q_segment_ids, kv_segment_ids, out, lse)


def _flash_backward(scale, causal, res, g):
    q, k, v, q_segment_ids, kv_segment_ids, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call("internvl_flash_backward", shapes, vmap_method="sequential")(
        q, k, v, q_segment_ids, kv_segment_ids, out, lse, g, causal=causal, scale=np.float32(scale))
    return dq, dk, dv, None, None


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, scale: float, causal: bool):
    """Softmax attention by the CPU kernel (forward and backward), float32 inside; call it only in a trace for
    the CPU with :func:`cpu_kernels_enabled` true.

    q: [B, L, H, D]; k, v: [B, S, K, D] with H a multiple of K; segment ids int [B, L] and [B, S] (0 = padding;
    both None: one segment); ``causal``: keys at index <= the query's only. Returns [B, L, H, D] in q's dtype;
    rows that attend to nothing (padding) are zeros.
    """
    if not cpu_kernels_enabled():
        raise RuntimeError("flash_attention: the CPU kernels are not available (see the warning above)")
    if q_segment_ids is None:
        q_segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        kv_segment_ids = jnp.ones(k.shape[:2], jnp.int32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    out = _flash(f32(q), f32(k), f32(v), q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
                 float(scale), bool(causal))
    return out.astype(q.dtype)
