"""The sharded training step the sharding tests share: tiny-qwen2, 8 rows with 2 image tiles each, cross entropy."""

import jax
import numpy as np

import sharding
from internvl_jax.model import InternVL, abstract_params
from internvl_jax.presets import get_preset
from train.loss import cross_entropy

CONFIG = get_preset("tiny-qwen2")
PRESET, MESH = "fsdp_tp", (2, 2, 2)  # the multi-host case


def batch(rows=8, length=16, tiles=2):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, (rows, length)).astype(np.int32)
    ids[:, 1:1 + tiles] = CONFIG.image_token_id  # one token per tiny tile
    labels = np.where(np.arange(length) > tiles + 1, np.roll(ids, -1, axis=1), -100).astype(np.int32)
    pixels = rng.standard_normal((rows, tiles, CONFIG.image_size, CONFIG.image_size, 3)).astype(np.float32)
    return {"input_ids": ids, "pixel_values": pixels, "tile_mask": np.ones((rows, tiles), bool), "labels": labels}


def _loss(params, rows):
    logits = InternVL(CONFIG).apply({"params": params}, rows["input_ids"], rows["pixel_values"], rows["tile_mask"])
    return cross_entropy(logits, rows["labels"]), logits


step = jax.value_and_grad(_loss, has_aux=True)  # ((loss, logits), grads)


def param_shardings(mesh, preset=PRESET):
    return sharding.shardings(abstract_params(CONFIG, boxed=True), mesh, preset)
