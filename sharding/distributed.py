"""Multi-host start-up and process-0-only output.

On TPU VMs and SLURM/Kubernetes GPU clusters ``jax.distributed.initialize()`` finds the coordinator by itself;
elsewhere (several processes on one machine, bare VMs) it takes the coordinator address, process count and
index, here from arguments or the environment variables ``INTERNVL_COORDINATOR`` (host:port),
``INTERNVL_NUM_PROCESSES`` and ``INTERNVL_PROCESS_ID``.
"""

from __future__ import annotations

import logging
import os

import jax

ENV = ("INTERNVL_COORDINATOR", "INTERNVL_NUM_PROCESSES", "INTERNVL_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False, local_device_ids: list[int] | None = None) -> bool:
    """Join this process to the others; returns whether it did.

    Explicit values (arguments, else the ``INTERNVL_*`` environment variables) must come all three together.
    Without them, ``auto=True`` runs JAX's own cluster detection (TPU pods, SLURM, Open MPI, Kubernetes), and
    ``auto=False`` leaves a single process alone.
    """
    coordinator = coordinator or os.environ.get(ENV[0])
    if num_processes is None and ENV[1] in os.environ:
        num_processes = int(os.environ[ENV[1]])
    if process_id is None and ENV[2] in os.environ:
        process_id = int(os.environ[ENV[2]])
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("a multi-process run needs all of coordinator (host:port), num_processes and process_id "
                         f"(got {coordinator!r}, {num_processes!r}, {process_id!r}; environment: {', '.join(ENV)})")
    if coordinator is None and not auto:
        return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


def main_process_logger(name: str = "internvl_jax") -> logging.Logger:
    """A logger that prints on process 0 only (every process runs the same code; one copy of each line)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _MainProcessOnly) for f in logger.filters):
        logger.addFilter(_MainProcessOnly())
    return logger
