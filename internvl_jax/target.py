"""The platform a trace is for: the default backend, or the one a :func:`target_platform` context names.

Kernels that exist on one platform only (Pallas splash on TPU, cuDNN attention on GPU, the native CPU decoding
kernels) are chosen by it while tracing: an ahead-of-time compile for a TPU slice from a CPU host needs the real
TPU kernel, and a trace for a GPU or TPU has no use for the CPU kernels' build.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

__all__ = ["target_platform", "traced_platform"]

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace for ``platform`` (``"tpu"``, ``"gpu"``, ``"cpu"``) whatever the default backend.
    ``sharding.activate`` enters it with its mesh's platform."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def traced_platform() -> str:
    """The platform of the innermost :func:`target_platform` context, else ``jax.default_backend()``."""
    return _PLATFORM.get() or jax.default_backend()
