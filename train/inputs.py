"""A run's input, built from its :class:`~train.config.TrainConfig`: tokenizer and template (the checkpoint's, so
training and inference prepare samples identically), the meta files, the grain pipeline of ``train.data`` for
this process's rows, and the held-out pipeline; for InternVL 1.0's stages, image-text pairs
(:func:`build_caption_inputs`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator

import jax
import numpy as np

from internvl_jax.layers import as_dtype
from internvl_jax.processing import Processor, Tokenizer, get_template

from .config import ConfigError, TrainConfig
from .data.captions import CaptionPrepare, CaptionSettings, caption_batch_shapes, caption_pack_config, caption_rows
from .data.meta import read_meta
from .data.meta import records as meta_records
from .data.packing import SFT_ROWS, PackConfig
from .data.pairs import PAIR_ROWS, PairPrepare
from .data.pipeline import MetaPrepare, Source, make_pipeline, meta_sources
from .data.sample import SampleSettings


def processor_for(cfg: TrainConfig, config) -> tuple[Processor, str]:
    """(processor, folder of the tokenizer files): the ``init`` checkpoint's, or ``tokenizer`` + the model's
    template for a run from a preset."""
    folder = cfg.tokenizer or cfg.init
    if not folder:
        raise ConfigError("tokenizer is not set: a run from a preset needs tokenizer=FOLDER (tokenizer.json or "
                          "tokenizer.model with its config)")
    if cfg.init and not cfg.tokenizer:
        return Processor.from_pretrained(cfg.init), cfg.init
    tokenizer = Tokenizer.from_pretrained(folder)
    if tokenizer.img_context_id != config.image_token_id:
        raise ConfigError(f"tokenizer {folder}: <IMG_CONTEXT> is id {tokenizer.img_context_id}, the model's "
                          f"image_token_id is {config.image_token_id}")
    if not config.template:
        raise ConfigError("the model config names no chat template; set one in the model config")
    return Processor(tokenizer=tokenizer, config=config, template=get_template(config.template),
                     max_length=config.text.max_position_embeddings), folder


def _v2pe(text: str):
    if not text:
        return None
    if text == "random":
        return "random"
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"data.v2pe={text!r}: expected '' (off), 'random' or a stride such as 64") from None


@dataclass
class Inputs:
    """The training iterator (checkpointable: ``iterator``), the global batch's shapes and the held-out data.
    ``processor``: the run's Processor (InternVL 1.0's stages: its Tokenizer)."""

    iterator: object
    abstract_batch: dict
    processor: Processor | Tokenizer
    tokenizer_dir: str
    pixel_dtype: object
    eval_dataset: object | None

    @property
    def has_eval(self) -> bool:
        return self.eval_dataset is not None

    def _host(self, batch: dict) -> dict:
        """Float pixels in the compute dtype before they travel to the devices (half the bytes in bfloat16);
        uint8 levels (the SFT and preference rows) as they are, a quarter of float32's bytes."""
        pixels = batch["pixel_values"]
        if pixels.dtype == np.uint8:
            return batch
        return {**batch, "pixel_values": pixels.astype(self.pixel_dtype, copy=False)}

    def next(self) -> tuple[dict, dict]:
        """(this process's rows of the next batch, host stats: token_fill, tile_fill, samples, skipped by reason)."""
        batch, stats = next(self.iterator)
        return self._host(batch), {"token_fill": stats.batch.fill_tokens, "tile_fill": stats.batch.fill_tiles,
                                   "samples": stats.batch.samples, "skipped": dict(stats.batch.skipped)}

    def eval_batches(self) -> Iterator[dict]:
        """One pass over the held-out samples (no shuffle, no augmentation)."""
        for batch, _ in self.eval_dataset:
            yield self._host(batch)

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close:
            close()


@dataclass(frozen=True)
class _Plan:
    """What every pipeline of a run shares: processor, sample settings, packing, row format and prepare."""

    processor: Processor
    tokenizer_dir: str
    settings: SampleSettings
    pack: PackConfig
    rows: object
    mpo: bool

    def prepare(self, specs, settings, reference=None):
        return PairPrepare(specs, settings, reference) if self.mpo else MetaPrepare(specs, settings)


def _plan(cfg: TrainConfig, config) -> _Plan:
    d = cfg.data
    processor, tokenizer_dir = processor_for(cfg, config)
    v2pe = _v2pe(d.v2pe)
    settings = SampleSettings.from_config(
        config, processor.tokenizer, processor.template, system_message=processor.system_message,
        max_dynamic_patch=d.max_dynamic_patch or config.max_dynamic_patch, v2pe=v2pe,
        min_num_frames=d.min_num_frames, max_num_frames=d.max_num_frames)
    mpo = cfg.objective == "mpo"
    pack = PackConfig.for_model(config, processor.tokenizer, max_tokens=d.max_tokens, max_tiles=d.max_tiles,
                                loss_mode=d.loss_weighting, packing=d.packing, split=d.split_long,
                                v2pe=v2pe is not None, max_segments=cfg.mpo.max_pairs if mpo else 0)  # a pair: 1
    return _Plan(processor, tokenizer_dir, settings, pack, PAIR_ROWS if mpo else SFT_ROWS, mpo)


def one_pass(cfg: TrainConfig, config, meta: str):
    """(every record of ``meta`` once, in file order, as a pipeline of (batch, stats) with
    ``cfg.data.rows`` rows; the meta's dataset specs; the number of records): the reference pre-pass's input
    (one process)."""
    plan = _plan(cfg, config)
    specs = read_meta(meta)
    # each line once: a repeat_time above 1 repeats lines whose reference log-probs are the same
    sources = [Source(s.name, meta_records(dataclasses.replace(s, repeat_time=min(s.repeat_time, 1.0))))
               for s in specs]
    pipeline = make_pipeline(sources, plan.prepare(specs, plan.settings), plan.pack, batch_size=cfg.data.rows,
                             seed=cfg.seed, shuffle=False, num_epochs=1, rows=plan.rows, process_index=0,
                             process_count=1)
    return pipeline, specs, sum(len(s.records) for s in sources)


def build_inputs(cfg: TrainConfig, config, reference: dict | None = None,
                 eval_reference: dict | None = None) -> Inputs:
    """The run's input for this process (``jax.process_index()`` of ``jax.process_count()``): SFT rows, or with
    ``objective=mpo`` preference rows (train/data/pairs.py), their ``ref_logps`` from ``reference`` (and
    ``eval_reference`` for the held-out pairs: {(dataset, line): (chosen, rejected)}) when given."""
    d = cfg.data
    processes = jax.process_count()
    if d.rows % processes:
        raise ConfigError(f"data.rows={d.rows} does not split over {processes} processes")
    plan = _plan(cfg, config)
    processor, tokenizer_dir, settings, pack = plan.processor, plan.tokenizer_dir, plan.settings, plan.pack
    specs = read_meta(d.meta)
    pipeline = make_pipeline(meta_sources(specs), plan.prepare(specs, settings, reference), pack,
                             batch_size=d.rows // processes, seed=cfg.seed, workers=d.workers, rows=plan.rows)
    eval_dataset = None
    if d.eval_meta and d.eval_samples > 0:
        eval_specs = read_meta(d.eval_meta)
        sources = [Source(s.name, s.records[: d.eval_samples]) for s in meta_sources(eval_specs)]
        eval_settings = dataclasses.replace(settings, data_augment=False)
        eval_dataset = make_pipeline(sources, plan.prepare(eval_specs, eval_settings, eval_reference), pack,
                                     batch_size=d.rows // processes, seed=cfg.seed, shuffle=False, num_epochs=1,
                                     rows=plan.rows)
    s = config.image_size
    rows, length = d.rows, d.max_tokens
    shapes = {"input_ids": ((rows, length), np.int32), "labels": ((rows, length), np.int32),
              "loss_weights": ((rows, length), np.float32), "positions": ((rows, length), pack.positions_dtype),
              "segment_ids": ((rows, length), np.int32), "pixel_values": ((rows, d.max_tiles, s, s, 3), np.uint8),
              "tile_mask": ((rows, d.max_tiles), np.bool_)}
    if plan.mpo:
        p = cfg.mpo.max_pairs
        shapes.update(image_index=((rows, length), np.int32), pair_mask=((rows, p), np.bool_),
                      ref_logps=((rows, p, 2), np.float32))
    abstract = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
    os.makedirs(cfg.workdir, exist_ok=True)
    return Inputs(iter(pipeline), abstract, processor, tokenizer_dir, as_dtype(config.dtype), eval_dataset)


def build_caption_inputs(cfg: TrainConfig, config) -> Inputs:
    """The input of an InternVL 1.0 stage (``cfg.objective``) for this process: the image-text pairs of
    ``cfg.data.meta`` (train/data/captions.py), ``data.max_tokens`` text positions per caption, tokenised by the
    ``tokenizer`` folder's or the ``init`` checkpoint's tokenizer (InternVL 1.0 ships LLaMA's)."""
    d = cfg.data
    processes = jax.process_count()
    if d.rows % processes:
        raise ConfigError(f"data.rows={d.rows} does not split over {processes} processes")
    folder = cfg.tokenizer or cfg.init
    if not folder:
        raise ConfigError("tokenizer is not set: a run from a preset needs tokenizer=FOLDER (tokenizer.json or "
                          "tokenizer.model with its config)")
    tokenizer = Tokenizer.from_pretrained(folder)
    if tokenizer.eos_id is None:
        raise ConfigError(f"tokenizer {folder}: no EOS token; InternVL 1.0 pools its text features at the EOS")
    specs = read_meta(d.meta)
    size = config.image_size
    pipeline = make_pipeline(meta_sources(specs), CaptionPrepare(specs, CaptionSettings(tokenizer, size, d.max_tokens)),
                             caption_pack_config(d.max_tokens, size), batch_size=d.rows // processes, seed=cfg.seed,
                             workers=d.workers, rows=caption_rows(cfg.objective, tokenizer, d.max_tokens))
    shapes = caption_batch_shapes(cfg.objective, d.rows, d.max_tokens, size)
    shapes["pixel_values"] = (shapes["pixel_values"][0], config.dtype)
    abstract = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
    os.makedirs(cfg.workdir, exist_ok=True)
    return Inputs(iter(pipeline), abstract, tokenizer, folder, as_dtype(config.dtype), None)
