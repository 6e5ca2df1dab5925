"""Checkpoint tensors <-> our params, through a layout's key-map table (``convert.keymaps``)."""

from __future__ import annotations

import json
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from internvl_jax.config import InternVLConfig, TextConfig, load_config, text_config_from_dict
from internvl_jax.decoder import Decoder
from internvl_jax.layers import as_dtype, dtype_name
from internvl_jax.model import InternVL, abstract_params

from .keymaps import HF, LAYOUTS, TRANSFORMS, Layout, Rule
from .safetensors_io import CheckpointError, SafetensorsReader


def _parts(rule: Rule, match) -> list:
    """The parts one source tensor feeds: the matched one, all of a fused source's, or none."""
    if "{part}" in rule.source:
        return [match["part"]]
    return list(rule.parts) or [None]


def _index(rule: Rule, layer, part) -> tuple:
    index = () if layer is None else (int(layer),)
    if rule.part_axis is not None:
        index += (slice(None),) * rule.part_axis + (rule.parts.index(part),)
    return index


def load_params(reader: SafetensorsReader, layout: Layout, text: TextConfig, shapes: dict, dtype) -> dict:
    """Fill every parameter in ``shapes`` ("/"-joined path -> shape) from ``reader``, one tensor at a time.

    Each tensor is cast to ``dtype`` on its own. Raises :class:`CheckpointError` naming the keys on unexpected
    or missing tensors and on shapes that do not fit the config. Returns a nested dict of numpy arrays.
    """
    dtype = np.dtype(as_dtype(dtype))
    rules = [r for r in layout.rules if r.applies_to(text.family)]
    buffers = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
    filled = dict.fromkeys(shapes, 0)
    unexpected = []
    for key in reader.keys():
        canon = layout.canonical(key)
        matches = [(r, m) for r in rules if (m := r.pattern.fullmatch(canon))]
        if not matches and canon in ("lm_head.weight", "output.weight") and text.tie_word_embeddings:
            continue  # a tied head is the embedding table
        targets = [(r, m, p, r.target.format(part=p)) for r, m in matches for p in _parts(r, m)]
        if not targets or any(path not in buffers for *_, path in targets):
            unexpected.append(key)
            continue
        tensor = reader.get(key)
        for rule, m, part, path in targets:
            index = _index(rule, m.groupdict().get("layer"), part)
            dest = buffers[path][index]
            src = tensor[rule.rows(text, part)] if rule.rows else tensor
            if src.size != dest.size:
                raise CheckpointError(
                    f"tensor {key} has shape {list(tensor.shape)}, which does not fit {path} "
                    f"(expected {list(dest.shape)} from the config)"
                )
            buffers[path][index] = TRANSFORMS[rule.transform].load(np.asarray(src).astype(dtype), dest.shape)
            filled[path] += dest.size
    if unexpected:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {', '.join(sorted(set(unexpected))[:10])}")
    missing = [p for p, n in filled.items() if n != buffers[p].size]
    if missing:
        raise CheckpointError(f"tensors missing from the checkpoint for: {', '.join(sorted(missing)[:10])}")
    return traverse_util.unflatten_dict(buffers, sep="/")


def export_tensors(params: dict, config: InternVLConfig, layout: Layout) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, tensor) pairs of ``layout`` for our params, one tensor at a time, in table order."""
    flat = traverse_util.flatten_dict(params, sep="/")
    depth = {"vision": config.vision.num_layers, "language_model": config.text.num_layers}
    for rule in (r for r in layout.rules if r.applies_to(config.text.family)):
        layers = range(depth[rule.target.split("/")[0]]) if "{layer}" in rule.source else [None]
        for layer in layers:
            if "{part}" in rule.source:
                groups = [(rule.source.format(layer=layer, part=p), [p]) for p in rule.parts]
            else:
                groups = [(rule.source.format(layer=layer, part=None), list(rule.parts) or [None])]
            for key, parts in groups:
                if any(rule.target.format(part=p) not in flat for p in parts):
                    continue  # the model has no such parameter (a bias it lacks, a tied head)
                pieces = [
                    TRANSFORMS[rule.transform].save(np.asarray(flat[rule.target.format(part=p)][_index(rule, layer, p)]))
                    for p in parts
                ]
                if rule.rows:
                    rows = [rule.rows(config.text, p) for p in parts]
                    total = sum(len(range(r.stop)[r]) if isinstance(r, slice) else len(r) for r in rows)
                    tensor = np.empty((total, *pieces[0].shape[1:]), pieces[0].dtype)
                    for r, piece in zip(rows, pieces):
                        tensor[r] = piece
                else:
                    (tensor,) = pieces
                yield layout.on_disk(key), np.ascontiguousarray(tensor)


def _shapes(tree) -> dict:
    return {p: s.shape for p, s in traverse_util.flatten_dict(tree, sep="/").items()}


def _to_device(params):
    return jax.tree_util.tree_map(jnp.asarray, params)


def checkpoint_layout(path: str) -> Layout:
    """The layout of a checkpoint folder, from its own config.json."""
    with open(os.path.join(path, "config.json")) as f:
        return LAYOUTS["original" if "llm_config" in json.load(f) else "hf"]


def load_pretrained(path: str, dtype=jnp.float32) -> tuple[InternVL, dict]:
    """Load an InternVL safetensors folder in either layout (single file or sharded with an index).

    ``dtype`` is both the params' and the compute dtype. Returns ``(model, params)``; call
    ``model.apply({"params": params}, input_ids=..., pixel_values=..., tile_mask=...)``.
    """
    name = dtype_name(as_dtype(dtype))
    config = load_config(path, dtype=name, param_dtype=name)
    if config.image_token_id < 0:  # original configs leave it to the tokenizer, as chat() does
        from internvl_jax.processing.tokenizer import Tokenizer

        config = config.replace(image_token_id=Tokenizer.from_pretrained(path).img_context_id)
    with SafetensorsReader(path) as reader:
        params = load_params(reader, checkpoint_layout(path), config.text, _shapes(abstract_params(config)), name)
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
