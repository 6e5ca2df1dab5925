"""InternVL 1.0 checkpoints (the original ``InternVLModel``, ``internvl_g`` layout) <-> :class:`InternVLCLIP` params.

The same machinery as the chat models: the key-map table (:func:`convert.keymaps.internvl_g_layout`), the
checked, rule-by-rule loader of :mod:`convert.load`, orbax folders written by ``internvl-jax convert``.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp

from internvl_jax.clip_config import CLIPConfig, clip_config_from_dict, is_clip_config, load_clip_config
from internvl_jax.clip_model import InternVLCLIP, abstract_clip_params
from internvl_jax.layers import as_dtype, dtype_name

from .keymaps import internvl_g_layout
from .load import PARAMS_DIR, StateDictReader, _placement, _shapes, load_params
from .safetensors_io import SafetensorsReader


def is_clip_checkpoint(path: str) -> bool:
    """Whether the folder's config.json is InternVL 1.0's (a ``qllama_config``); False when there is none."""
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        return False
    try:
        with open(f, encoding="utf-8") as fh:
            return is_clip_config(json.load(fh))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # the chat loader names the problem


def _read(reader, config: CLIPConfig, mesh, rules) -> dict:
    boxed = abstract_clip_params(config, boxed=True)
    _, place = _placement(boxed, mesh, rules)
    return load_params(reader, internvl_g_layout(config.cross_attention_frequency), config.text,
                       _shapes(nn.unbox(boxed)), config.param_dtype, place)


def load_clip_pretrained(path: str, dtype=jnp.float32, mesh=None, rules="fsdp") -> tuple[InternVLCLIP, dict]:
    """An InternVL 1.0 folder (safetensors in the original layout, or a ``convert`` orbax folder) -> (model,
    params); ``dtype`` is the params' and the compute dtype; with a ``mesh`` each tensor goes to its sharding."""
    name = dtype_name(as_dtype(dtype))
    config = load_clip_config(path, dtype=name, param_dtype=name)
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        from .orbax_io import restore

        boxed = abstract_clip_params(config, boxed=True)
        shardings, _ = _placement(boxed, mesh, rules)
        return InternVLCLIP(config), restore(os.path.join(path, PARAMS_DIR), nn.unbox(boxed), shardings)
    with SafetensorsReader(path) as reader:
        return InternVLCLIP(config), _read(reader, config, mesh, rules)


def clip_from_state_dict(state_dict: Mapping, config, dtype=jnp.float32, mesh=None,
                         rules="fsdp") -> tuple[InternVLCLIP, dict]:
    """(model, params) from the original ``InternVLModel``'s state dict in memory; ``config``: its parsed
    config.json or config object."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    name = dtype_name(as_dtype(dtype))
    cfg = clip_config_from_dict(config, dtype=name, param_dtype=name)
    return InternVLCLIP(cfg), _read(StateDictReader(state_dict), cfg, mesh, rules)
