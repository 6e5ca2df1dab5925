"""A run's input, built from its :class:`~train.config.TrainConfig`: tokenizer and template (the checkpoint's, so
training and inference prepare samples identically), the meta files, the grain pipeline of ``train.data`` for
this process's rows, and the held-out pipeline."""

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
from .data.meta import read_meta
from .data.packing import PackConfig
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
    """The training iterator (checkpointable: ``iterator``), the global batch's shapes and the held-out data."""

    iterator: object
    abstract_batch: dict
    processor: Processor
    tokenizer_dir: str
    pixel_dtype: object
    eval_dataset: object | None

    @property
    def has_eval(self) -> bool:
        return self.eval_dataset is not None

    def _host(self, batch: dict) -> dict:
        """Pixels in the compute dtype before they travel to the devices (half the bytes in bfloat16)."""
        return {**batch, "pixel_values": batch["pixel_values"].astype(self.pixel_dtype, copy=False)}

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


def build_inputs(cfg: TrainConfig, config) -> Inputs:
    """The run's input for this process (``jax.process_index()`` of ``jax.process_count()``)."""
    d = cfg.data
    processes = jax.process_count()
    if d.rows % processes:
        raise ConfigError(f"data.rows={d.rows} does not split over {processes} processes")
    processor, tokenizer_dir = processor_for(cfg, config)
    v2pe = _v2pe(d.v2pe)
    settings = SampleSettings.from_config(
        config, processor.tokenizer, processor.template, system_message=processor.system_message,
        max_dynamic_patch=d.max_dynamic_patch or config.max_dynamic_patch, v2pe=v2pe,
        min_num_frames=d.min_num_frames, max_num_frames=d.max_num_frames)
    pack = PackConfig.for_model(config, processor.tokenizer, max_tokens=d.max_tokens, max_tiles=d.max_tiles,
                                loss_mode=d.loss_weighting, packing=d.packing, split=d.split_long,
                                v2pe=v2pe is not None)
    specs = read_meta(d.meta)
    pipeline = make_pipeline(meta_sources(specs), MetaPrepare(specs, settings), pack,
                             batch_size=d.rows // processes, seed=cfg.seed, workers=d.workers)
    eval_dataset = None
    if d.eval_meta and d.eval_samples > 0:
        eval_specs = read_meta(d.eval_meta)
        sources = [Source(s.name, s.records[: d.eval_samples]) for s in meta_sources(eval_specs)]
        eval_settings = dataclasses.replace(settings, data_augment=False)
        eval_dataset = make_pipeline(sources, MetaPrepare(eval_specs, eval_settings), pack,
                                     batch_size=d.rows // processes, seed=cfg.seed, shuffle=False, num_epochs=1)
    s = config.image_size
    rows, length = d.rows, d.max_tokens
    shapes = {"input_ids": ((rows, length), np.int32), "labels": ((rows, length), np.int32),
              "loss_weights": ((rows, length), np.float32), "positions": ((rows, length), pack.positions_dtype),
              "segment_ids": ((rows, length), np.int32), "pixel_values": ((rows, d.max_tiles, s, s, 3), config.dtype),
              "tile_mask": ((rows, d.max_tiles), np.bool_)}
    abstract = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
    os.makedirs(cfg.workdir, exist_ok=True)
    return Inputs(iter(pipeline), abstract, processor, tokenizer_dir, as_dtype(config.dtype), eval_dataset)
