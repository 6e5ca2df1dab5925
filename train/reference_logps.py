"""Reference log-probs from a file: a pre-pass over the preference data with the starting policy, so an MPO run
keeps no second model in memory (``mpo.reference=file``).

The pre-pass reads every record of the meta once (train/inputs.py ``one_pass``), computes each pair's chosen and
rejected sequence log-probs with the run's own preparation, packing and model (``pair_logps``, no drop path), and
writes ``{dataset, line, logps [N, 2], identity}`` as one ``.npz`` (staged, then renamed). The run reads it into a
``{(dataset, line): (chosen, rejected)}`` table that the pairs' preparation attaches to each pair
(``ref_logps`` of the batch). The identity (the starting checkpoint or preset and seed, the meta and annotation
files, the preparation settings) is checked on reading: a file made for other data or another model is refused.

Exact when preparation is deterministic: a dataset with ``data_augment`` (random JPEG qualities) or random video
frames gives the policy other pixels than the reference saw (TRL's precomputed log-probs share this), and the
pre-pass warns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import numpy as np

import sharding

log = logging.getLogger("internvl_jax.train")


def reference_path(cfg, meta: str) -> str:
    """The reference file of ``meta``: ``<meta without .json>.ref_logps.npz`` next to it (for the training meta,
    ``mpo.ref_logps`` when set)."""
    if meta == cfg.data.meta and cfg.mpo.ref_logps:
        return cfg.mpo.ref_logps
    return os.path.splitext(meta)[0] + ".ref_logps.npz"


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reference_identity(cfg, base: dict, meta: str, specs) -> dict:
    """What the stored log-probs depend on: the starting model (``base``, trainer.base_identity), the meta and
    annotation files' digests, and the settings of preparation, packing and compute."""
    d = cfg.data
    return {"base": base, "meta": _file_digest(meta),
            "annotations": {s.name: _file_digest(s.annotation) for s in specs},
            "settings": {"max_dynamic_patch": d.max_dynamic_patch, "image_size": cfg.image_size, "v2pe": d.v2pe,
                         "max_tokens": d.max_tokens, "max_tiles": d.max_tiles, "dtype": cfg.dtype}}


def compute_reference(model, params, batches, mesh, rules, *, pairs: int, vocab_chunk, total: int | None = None,
                      progress: bool = True):
    """{(dataset, line): float32 [2]} over ``batches`` (a ``one_pass`` pipeline): each pair's chosen and rejected
    sequence log-probs under ``params``; a progress bar over the pairs."""
    from tqdm import tqdm

    from .preference_step import pair_logps

    fn = jax.jit(lambda p, b: pair_logps(model, p, b, pairs, vocab_chunk=vocab_chunk)[0])
    table = {}
    with sharding.activate(mesh, rules), tqdm(total=total, desc="reference log-probs", unit="pair",
                                              dynamic_ncols=True, disable=not progress) as bar:
        for batch, stats in batches:
            logps = np.asarray(jax.device_get(fn(params, sharding.shard_batch(batch, mesh, rules))))
            where = np.argwhere(batch["pair_mask"])  # row-major: the packer's order of members
            for (b, j), key in zip(where, stats.batch.members, strict=True):
                table[key] = logps[b, j]
            bar.update(len(where))
    return table


def write_reference(path: str, table: dict, identity: dict) -> None:
    """The table as ``path`` (.npz), written under a temporary name and renamed."""
    keys = sorted(table)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, dataset=np.asarray([k[0] for k in keys]), line=np.asarray([k[1] for k in keys], np.int64),
             logps=np.asarray([table[k] for k in keys], np.float32).reshape(-1, 2),
             identity=np.asarray(json.dumps(identity, sort_keys=True)))
    os.replace(tmp, path)


def read_reference(path: str, identity: dict) -> dict:
    """The table of ``path``; a ValueError naming the file when it was made for another model, data or settings."""
    with np.load(path) as f:
        stored = json.loads(str(f["identity"]))
        if stored != identity:
            differ = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
            raise ValueError(f"{path}: the reference log-probs were made for another {', '.join(differ)} than this "
                             "run's; delete the file to recompute it, or set mpo.ref_logps to another path")
        return {(str(d), int(n)): v for d, n, v in zip(f["dataset"], f["line"], f["logps"])}


def reference_table(cfg, model, params, mesh, base: dict, meta: str) -> dict:
    """The reference table of the pairs of ``meta``: read from :func:`reference_path`, computed and written first
    when missing."""
    from .config import ConfigError
    from .inputs import one_pass

    path = reference_path(cfg, meta)
    pipeline, specs, n_records = one_pass(cfg, model.config, meta)
    identity = reference_identity(cfg, base, meta, specs)
    if not os.path.exists(path):
        if jax.process_count() > 1:
            raise ConfigError(f"mpo.reference=file: {path} does not exist; make it with a one-process run first "
                              "(the pre-pass runs on one host), then start the multi-host run")
        augmented = [s.name for s in specs if s.data_augment]
        if augmented:
            log.warning("reference log-probs from a file: dataset(s) %s augment their images (data_augment), so the "
                        "policy will see other JPEG draws than the reference saw", ", ".join(augmented))
        start = time.perf_counter()
        table = compute_reference(model, params, iter(pipeline), mesh, cfg.rules, pairs=cfg.mpo.max_pairs,
                                  vocab_chunk=cfg.vocab_chunk or None, total=n_records, progress=cfg.progress)
        write_reference(path, table, identity)
        log.info("reference log-probs of %d pairs written to %s in %.0f s", len(table), path,
                 time.perf_counter() - start)
    try:
        return read_reference(path, identity)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_reference(model, params, batch, mesh, rules, pairs: int, vocab_chunk, *, tolerance: float = 1e-3) -> float:
    """Step 0: the policy's log-probs of the first batch (no drop path) against the stored reference's, which
    must agree (the policy starts as the reference). Logs a warning when they differ by more than ``tolerance``
    relative; returns the largest relative difference."""
    from .preference_step import pair_logps

    fn = jax.jit(lambda p, b: pair_logps(model, p, b, pairs, vocab_chunk=vocab_chunk)[0])
    with sharding.activate(mesh, rules):
        policy = np.asarray(jax.device_get(fn(params, sharding.shard_batch(batch, mesh, rules))))
    mask = batch["pair_mask"]
    ref = batch["ref_logps"][mask]
    worst = float(np.max(np.abs(policy[mask] - ref) / np.maximum(np.abs(ref), 1.0), initial=0.0))
    if worst > tolerance:
        log.warning("step 0: the policy and the stored reference disagree (largest relative difference of a sequence "
                    "log-prob %.2e, expected ~0: the policy starts as the reference); the reference file was made "
                    "with another checkpoint or other data settings", worst)
    else:
        log.info("step 0: policy and stored reference log-probs agree (largest relative difference %.1e)", worst)
    return worst
