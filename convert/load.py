"""``load_pretrained``: a checkpoint folder -> (module, params), through a key-map table."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from internvl_jax.config import TextConfig, load_config, text_config_from_dict
from internvl_jax.decoder import Decoder
from internvl_jax.layers import as_dtype, dtype_name
from internvl_jax.model import InternVL, abstract_params

from .keymaps import HF, PARTS, TRANSFORMS, Layout, canonical_key
from .safetensors_io import CheckpointError, SafetensorsReader


def _match(layout: Layout, key: str):
    """All (rule, match) pairs of ``layout`` for one canonical key (a fused source feeds several rules)."""
    return [(r, m) for r in layout.rules if (m := re.fullmatch(r.pattern, key))]


def load_params(reader: SafetensorsReader, layout: Layout, text: TextConfig, shapes: dict, dtype) -> dict:
    """Fill every parameter in ``shapes`` ("/"-joined path -> shape) from ``reader``, one tensor at a time.

    Each tensor is cast to ``dtype`` on its own. Raises :class:`CheckpointError` naming the keys on unexpected
    or missing tensors and on shapes that do not fit the config. Returns a nested dict of numpy arrays.
    """
    dtype = np.dtype(as_dtype(dtype))
    buffers = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
    filled = dict.fromkeys(shapes, 0)
    unexpected = []
    for key in reader.keys():
        canon = canonical_key(layout, key)
        if canon == "lm_head.weight" and text.tie_word_embeddings:
            continue  # a tied head is the embedding table
        matches = _match(layout, canon)
        if not matches:
            unexpected.append(key)
            continue
        tensor = reader.get(key)
        for rule, m in matches:
            groups = m.groupdict()
            path = rule.target.format(part=groups.get("part"))
            if path not in buffers:
                unexpected.append(key)
                continue
            index = (int(groups["layer"]),) if "layer" in groups else ()
            if rule.part_axis is not None:
                index += (slice(None),) * rule.part_axis + (PARTS[groups["part"]],)
            dest = buffers[path][index]
            src = tensor[rule.rows(text)] if rule.rows else tensor
            if src.size != dest.size:
                raise CheckpointError(
                    f"tensor {key} has shape {list(tensor.shape)}, which does not fit {path} "
                    f"(expected {list(dest.shape)} from the config)"
                )
            buffers[path][index] = TRANSFORMS[rule.transform](np.asarray(src).astype(dtype), dest.shape)
            filled[path] += dest.size
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {', '.join(sorted(set(unexpected))[:10])}")
    missing = [p for p, n in filled.items() if n != buffers[p].size]
    if missing:
        raise CheckpointError(f"tensors missing from the checkpoint for: {', '.join(sorted(missing)[:10])}")
    return traverse_util.unflatten_dict(buffers, sep="/")


def _shapes(tree) -> dict:
    return {p: s.shape for p, s in traverse_util.flatten_dict(tree, sep="/").items()}


def _to_device(params):
    return jax.tree_util.tree_map(jnp.asarray, params)


def load_pretrained(path: str, dtype=jnp.float32) -> tuple[InternVL, dict]:
    """Load a transformers-native InternVL safetensors folder (single file or sharded with an index).

    ``dtype`` is both the params' and the compute dtype. Returns ``(model, params)``; call
    ``model.apply({"params": params}, input_ids=..., pixel_values=..., tile_mask=...)``.
    """
    name = dtype_name(as_dtype(dtype))
    config = load_config(path, dtype=name, param_dtype=name)
    with SafetensorsReader(path) as reader:
        params = load_params(reader, HF, config.text, _shapes(abstract_params(config)), name)
    return InternVL(config), _to_device(params)


def load_language_model(path: str, dtype=jnp.float32) -> tuple[Decoder, dict]:
    """Load a transformers causal LM folder (Qwen2/Qwen3/Llama/InternLM3/Phi3ForCausalLM) as our Decoder."""
    with open(os.path.join(path, "config.json")) as f:
        text = text_config_from_dict(json.load(f))
    d = as_dtype(dtype)
    decoder = Decoder(text, dtype=d, param_dtype=d)
    tree = jax.eval_shape(lambda: decoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    with SafetensorsReader(path) as reader:
        params = load_params(reader, HF, text, _shapes({"language_model": nn.unbox(tree)}), d)
    return decoder, _to_device(params["language_model"])
