"""The grain input pipeline: records -> shuffled, repeated, per-process shards -> prepared samples (worker
processes) -> packed rows -> batches, with an exactly checkpointable iterator.

Stages (the MaxText shape: a ``grain.MapDataset`` up to the per-sample map, then an ``IterDataset``)::

    MapDataset.source(records) per dataset
      -> concatenate + shuffle(seed) + repeat(epochs)             (no weights: the original's ConcatDataset)
         or per dataset shuffle + repeat, then MapDataset.mix(weights)      (weights: native pre-training mixes)
      -> random_map(prepare)   one seeded rng per element, from the element's global index
      -> [process_index::process_count]                            each process reads only its own elements
      -> to_iter_dataset -> mp_prefetch(workers)                   workers=0: in this process
      -> PackedBatchIterDataset: next-fit packing (train/data/packing.py) and [B, ...] batches, in this process

The shuffle is global and seeded, a new permutation every epoch (grain reseeds per epoch). The per-sample rng
depends only on (seed, global index), so it does not change with the number of processes, workers or restarts;
with no sample filtered out before packing (Skipped items travel to the packer), the stream a process packs is the
same for any ``workers`` count.

The iterator yields ``(batch, stats)``: ``batch`` is the contract's dict of numpy arrays with a leading [B]
(B = rows of this process per step; a last short batch of a finite run is padded with empty rows),
``stats`` a :class:`HostStats` (this batch's :class:`~train.data.packing.PackStats` and the running totals).

Checkpointing: the iterator is a ``grain.DatasetIterator``; ``get_state()`` is a small JSON-able dict (the parent
iterator's state *before* the packer's pending sample was read, the index of the pending event, the running
totals), ``set_state`` restores it exactly, and orbax saves it through grain's own handler::

    mngr = ocp.CheckpointManager(directory)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                            data=grain.checkpoint.CheckpointSave(iterator)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(iterator)))

(``grain.checkpoint.CheckpointHandler`` writes one ``process_<i>-of-<n>.json`` per process.)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from .packing import PREPARE_RAISED, SFT_ROWS, Drop, PackConfig, PackStats, RowFormat, StreamPacker, empty_stats


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset of the run: ``records`` is random access (``len`` and ``[i]``) and yields what ``prepare``
    takes (train/data/meta.py's ``Record``: a list of them, or :class:`RecordSource` over array_record / TFDS);
    ``weight``: its share in a mixture (all sources weighted, or none)."""

    name: str
    records: Any
    weight: float | None = None


class RecordSource:
    """A random-access data source of serialised lines (array_record / TFDS) seen as ``Record``s.

    Element i becomes ``make_record(dataset, line, text)``: ``text`` is the element itself (bytes or str) or its
    ``text_key`` field (a TFDS feature dict); ``line`` is its ``line_key`` field when present, else i + 1.
    ``make_record`` defaults to train/data/meta.py's ``Record``.
    """

    def __init__(self, source, dataset: str, *, text_key: str = "text", line_key: str = "line",
                 make_record: Callable | None = None):
        self.source, self.dataset, self.text_key, self.line_key = source, dataset, text_key, line_key
        self.make_record = make_record

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        element = self.source[index]
        line = index + 1
        if isinstance(element, dict):
            if self.text_key not in element:
                raise KeyError(f"RecordSource {self.dataset!r}: element {index} has fields {sorted(element)}, "
                               f"no text field {self.text_key!r}")
            line = int(element.get(self.line_key, line))
            element = element[self.text_key]
        text = element.decode("utf-8") if isinstance(element, (bytes, np.bytes_)) else str(element)
        make = self.make_record
        if make is None:
            from .meta import Record as make  # noqa: N813 - the data helper's record type
        return make(self.dataset, line, text)


def array_record_source(name: str, paths: str | Sequence[str], weight: float | None = None, **kwargs) -> Source:
    """A :class:`Source` over array_record files of one JSONL line per record (``grain.sources``)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return Source(name, RecordSource(grain.sources.ArrayRecordDataSource(paths), name, **kwargs), weight)


def tfds_source(name: str, tfds_name: str, split: str, *, data_dir: str | None = None,
                weight: float | None = None, **kwargs) -> Source:
    """A :class:`Source` over a prepared TFDS dataset in array_record form (``tfds.data_source``; works without
    TensorFlow): each example's ``text`` feature (``text_key``) is one JSONL line."""
    import tensorflow_datasets as tfds

    return Source(name, RecordSource(tfds.data_source(tfds_name, split=split, data_dir=data_dir), name, **kwargs),
                  weight)


class SafePrepare:
    """``prepare(record, rng)`` that never raises: an exception becomes a skipped item (the packer counts it)."""

    def __init__(self, prepare: Callable):
        self.prepare = prepare

    def __call__(self, record, rng: np.random.Generator):
        try:
            return self.prepare(record, rng)
        except Exception as e:  # noqa: BLE001 - a bad sample must not stop a long run
            return Drop(str(getattr(record, "dataset", "?")), int(getattr(record, "line", 0)),
                        f"{PREPARE_RAISED} {type(e).__name__}", 0, str(e)[:500])


def _seed(seed: int, tag: int) -> int:
    """A derived uint32 seed, stable across runs and platforms."""
    return int(np.random.SeedSequence([seed, tag]).generate_state(1)[0])


def record_dataset(sources: Sequence[Source], *, seed: int = 0, shuffle: bool = True,
                   num_epochs: int | None = None) -> grain.MapDataset:
    """The global record stream (all processes): shuffled per epoch and repeated, or mixed by weight.

    num_epochs: None repeats forever (a mixture is always infinite and takes None).
    """
    if not sources:
        raise ValueError("record_dataset: no sources given")
    weighted = [s.weight is not None for s in sources]
    for s in sources:
        if len(s.records) == 0:
            raise ValueError(f"record_dataset: source {s.name!r} has no records")
    if any(weighted) and not all(weighted):
        raise ValueError("record_dataset: either every source has a weight (a mixture) or none does; got "
                         + ", ".join(f"{s.name}={s.weight}" for s in sources))
    if all(weighted):
        if num_epochs is not None:
            raise ValueError(f"record_dataset: a weighted mixture is an infinite stream; num_epochs={num_epochs} "
                             "applies to unweighted (concatenated) sources only")
        parts = []
        for i, s in enumerate(sources):
            ds = grain.MapDataset.source(s.records)
            parts.append((ds.shuffle(seed=_seed(seed, 1 + i)) if shuffle else ds).repeat(None))
        return grain.MapDataset.mix(parts, [float(s.weight) for s in sources])
    ds = grain.MapDataset.concatenate([grain.MapDataset.source(s.records) for s in sources])
    if shuffle:
        ds = ds.shuffle(seed=_seed(seed, 0))
    return ds.repeat(num_epochs)


def sample_dataset(sources: Sequence[Source], prepare: Callable, *, seed: int = 0, shuffle: bool = True,
                   num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> grain.MapDataset:
    """This process's prepared items (Sample dicts or skips): the global stream, ``prepare`` with one seeded rng
    per global element, then every ``process_count``-th element from ``process_index`` (default: jax's)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"sample_dataset: process_index={process_index} is not in [0, {process_count})")
    ds = record_dataset(sources, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    ds = ds.random_map(SafePrepare(prepare), seed=_seed(seed, 1000))
    return ds[process_index::process_count]


@dataclasses.dataclass
class HostStats:
    """Host statistics next to a batch: ``batch`` for this batch (members included), ``totals`` running over
    the run (restored with the iterator state; no members)."""

    batch: PackStats
    totals: PackStats

    def metrics(self) -> dict[str, float]:
        """This batch's metrics plus ``total_skipped`` and ``total_skipped/<reason>``."""
        out = self.batch.metrics()
        out["total_skipped"] = float(self.totals.skipped_total)
        out.update({f"total_skipped/{r}": float(n) for r, n in sorted(self.totals.skipped.items())})
        return out


class PackedBatchIterDataset(grain.IterDataset):
    """Packs a stream of prepared items into rows and stacks ``batch_size`` rows: elements (batch, HostStats)."""

    def __init__(self, parent: grain.IterDataset, cfg: PackConfig, batch_size: int, rows: RowFormat = SFT_ROWS):
        super().__init__(parent)
        if batch_size < 1:
            raise ValueError(f"PackedBatchIterDataset: batch_size must be >= 1, got {batch_size}")
        self.cfg, self.batch_size, self.rows = cfg, batch_size, rows

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self.cfg, self.batch_size, self.rows)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset(L={self.cfg.max_tokens}, T={self.cfg.max_tiles}, B={self.batch_size})"


class PackedBatchIterator(grain.DatasetIterator):
    """See :class:`PackedBatchIterDataset`. State: {"parent", "event", "exhausted", "totals"} (JSON-able)."""

    def __init__(self, parent: grain.DatasetIterator, cfg: PackConfig, batch_size: int, rows: RowFormat = SFT_ROWS):
        super().__init__(parent)
        self.cfg, self.batch_size, self.rows = cfg, batch_size, rows
        self._packer = StreamPacker(cfg, parent.__next__, lambda: copy.deepcopy(parent.get_state()), rows.packer(cfg))
        self._totals = PackStats()
        self._exhausted = False

    def __next__(self):
        if self._exhausted:
            raise StopIteration
        rows, stats = [], PackStats()
        while len(rows) < self.batch_size:
            try:
                pieces, row_stats = self._packer.next_pieces()
            except StopIteration:
                stats.add(self._packer.leftover)
                self._exhausted = True
                break
            rows.append(pieces)
            stats.add(row_stats)
        if not rows:
            self._totals.add(stats, members=False)
            raise StopIteration
        # a short last batch keeps the static [B, ...] shape with empty rows (counted in the capacity)
        stats.add(empty_stats(self.batch_size - len(rows), self.cfg))
        self._totals.add(stats, members=False)
        totals = PackStats.from_state(self._totals.to_state())  # a copy: later batches do not change it
        return self.rows.build_batch(rows, self.cfg, self.batch_size), HostStats(stats, totals)

    def get_state(self) -> dict[str, Any]:
        parent_state, event = self._packer.cursor()
        return {"parent": parent_state, "event": int(event), "exhausted": bool(self._exhausted),
                "totals": self._totals.to_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = {"parent", "event", "exhausted", "totals"} - set(state)
        if missing:
            raise ValueError(f"PackedBatchIterator.set_state: the state lacks {sorted(missing)} (has {sorted(state)})")
        self._parent.set_state(state["parent"])
        self._packer.restore(state["event"])
        self._exhausted = bool(state["exhausted"])
        self._totals = PackStats.from_state(state["totals"])

    def __str__(self) -> str:
        return f"PackedBatchIterator(L={self.cfg.max_tokens}, T={self.cfg.max_tiles}, B={self.batch_size})"


def make_pipeline(sources: Sequence[Source], prepare: Callable, pack: PackConfig, *, batch_size: int,
                  seed: int = 0, shuffle: bool = True, num_epochs: int | None = None, workers: int = 0,
                  worker_buffer: int = 2, read_threads: int = 2, read_buffer: int = 8, prefetch_batches: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  rows: RowFormat = SFT_ROWS) -> grain.IterDataset:
    """The whole input pipeline of one process; ``iter()`` of it is the checkpointable iterator.

    sources: the run's datasets (:class:`Source`); prepare(record, rng) -> Sample dict or Skipped (picklable when
    workers > 0, e.g. a ``functools.partial`` of a module-level function); pack: budgets and packing switches;
    batch_size: rows of this process per step. workers: decoding processes (grain ``mp_prefetch``; 0 = in this
    process), each holding ``worker_buffer`` prepared samples; read_threads / read_buffer: grain ReadOptions of
    each reading process; prefetch_batches: batches built ahead in a background thread (0 = none).
    process_index / process_count: this process's shard (default: jax.process_index() / jax.process_count()).
    rows: what rows hold (SFT samples; ``train.data.pairs.PAIR_ROWS`` for preference pairs).
    """
    if workers < 0:
        raise ValueError(f"make_pipeline: workers must be >= 0, got {workers}")
    samples = sample_dataset(sources, prepare, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                             process_index=process_index, process_count=process_count)
    ds = samples.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer))
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag when starting workers outside absl.app
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer))
    ds = PackedBatchIterDataset(ds, pack, batch_size, rows)
    if prefetch_batches:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
    return ds


def meta_sources(specs) -> list[Source]:
    """Sources of meta-file datasets (train/data/meta.py ``DatasetSpec``s), their records as ``meta.records``
    selects them (repeat_time applied). If any dataset has a ``weight``, the run is a mixture and a dataset
    without one weighs 1.0; with none, the datasets are concatenated."""
    from .meta import records

    weighted = any(s.weight is not None for s in specs)
    return [Source(s.name, records(s), (1.0 if s.weight is None else s.weight) if weighted else None) for s in specs]


class MetaPrepare:
    """``prepare(record, rng)`` for meta-file records: train/data/sample.py's ``prepare`` with the record's own
    ``DatasetSpec`` and the run's ``SampleSettings`` (picklable, so it runs in worker processes)."""

    def __init__(self, specs, settings):
        self.specs = {s.name: s for s in specs}
        self.settings = settings

    def __call__(self, record, rng: np.random.Generator):
        from .sample import prepare

        return prepare(record, self.specs[record.dataset], self.settings, rng)
