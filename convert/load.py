"""Checkpoint tensors <-> our params, through a layout's key-map table (``convert.keymaps``)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
import flax.linen as nn

from internvl_jax.config import (InternVLConfig, TextConfig, config_from_dict, load_config, parse_config_file,
                                 text_config_from_dict)
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


def _region(shape: tuple, index: tuple) -> tuple:
    """The shape of ``array[index]`` for an array of ``shape`` (nothing is allocated)."""
    return np.broadcast_to(np.zeros((), np.int8), shape)[index].shape


@dataclass
class Group:
    """The tensors of one key-map rule: the target ``paths`` they fill, and ``writes()``, which reads the source
    tensors one at a time and yields ``(path, index, array)`` (``array`` goes to ``target[index]``)."""

    paths: list[str]
    writes: Callable[[], Iterator[tuple[str, tuple, np.ndarray]]]


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == ml_dtypes.bfloat16  # numpy files bfloat16 under kind "V"


def _sources(rule: Rule, shapes: dict) -> Iterator[tuple[str, list, int | None]]:
    """(canonical key, parts, layer) of every source tensor of ``rule`` that the params in ``shapes`` need: one per
    part when the key names the part, one fused tensor for all of them otherwise; none for params the model lacks
    (a bias, a tied head)."""
    groups = [[p] for p in rule.parts] if "{part}" in rule.source else [list(rule.parts) or [None]]
    groups = [g for g in groups if all(rule.target.format(part=p) in shapes for p in g)]
    if not groups:
        return
    stacked = "{layer}" in rule.source
    depth = shapes[rule.target.format(part=groups[0][0])][0] if stacked else 0  # the leading axis is the layers
    for layer in range(depth) if stacked else [None]:
        for parts in groups:
            yield rule.source_key(layer, parts[0]), parts, layer


def _pieces(reader, key: str, rule: Rule, m, shapes: dict) -> list[tuple[str, tuple]]:
    """The (param path, index) pieces that checkpoint tensor ``key`` (matched by ``rule`` as ``m``) fills, after
    checking on its header alone that its layer exists, that its dtype is floating point (float16, bfloat16, float32
    and float64 are all cast to the params' dtype; an integer or boolean tensor is a broken file) and that its
    shape is exactly the one ``rule``'s transform takes to those pieces (a reshape would take a transposed matrix
    or a norm weight stored [8, 8] for [64] without a word). Raises :class:`CheckpointError` naming the file."""
    layer = rule.stack_index(m)
    paths = [rule.target.format(part=p) for p in _parts(rule, m)]
    if layer is not None and layer >= shapes[paths[0]][0]:
        raise CheckpointError(f"tensor {key} in {reader.where(key)} is for layer {m['layer']}, but the model has "
                              f"{shapes[paths[0]][0] * rule.layer_stride} layers (from the config)")
    dtype = np.dtype(reader.dtype(key))
    if not _is_float(dtype):
        raise CheckpointError(f"tensor {key} in {reader.where(key)} has dtype {dtype.name}, expected floating point "
                              "(float16, bfloat16, float32 or float64, cast on loading)")
    indices = [_index(rule, layer, p) for p in _parts(rule, m)]
    dests = [_region(shapes[path], index) for path, index in zip(paths, indices)]
    stored = [TRANSFORMS[rule.transform].source(d) for d in dests]
    # a fused source stacks its parts' rows (Phi-3 qkv_proj, InternLM2 wqkv): their rows add up, the rest is shared
    expected = (sum(s[0] for s in stored), *stored[0][1:]) if rule.rows else stored[0]
    shape = tuple(reader.shape(key))
    if shape != expected:
        raise CheckpointError(
            f"tensor {key} has shape {list(shape)}, which does not fit {' + '.join(paths)} (expected {list(expected)} "
            f"as stored, for {' + '.join(str(list(d)) for d in dests)} from the config; in {reader.where(key)})")
    return list(zip(paths, indices))


def plan_groups(reader: SafetensorsReader, layout: Layout, text: TextConfig, shapes: dict, dtype) -> list[Group]:
    """Match every checkpoint tensor to the params in ``shapes`` ("/"-joined path -> shape), rule by rule.

    Only the headers are read here: unexpected tensors, tensors of layers the model lacks, of a non-float dtype or
    of a shape other than the exact one their rule's transform needs, tensors that fill the same param twice and
    tensors the params need but the checkpoint lacks raise :class:`CheckpointError` (naming the keys and files)
    before any data moves. Each written array is cast to ``dtype`` on its own.
    """
    dtype = np.dtype(as_dtype(dtype))
    rules = [r for r in layout.rules if r.applies_to(text.family)]
    by_rule: dict[int, list] = {}
    unexpected = []
    filled: dict[tuple, str] = {}  # (rule index, canonical key) -> the checkpoint key that filled it
    for key in reader.keys():
        canon = layout.canonical(key)
        if canon in ("lm_head.weight", "output.weight") and text.tie_word_embeddings:
            continue  # a tied head is the embedding table (files omit it, a state dict repeats it)
        matches = [(i, m) for i, r in enumerate(rules) if (m := r.pattern.fullmatch(canon)) and r.stack_index(m) != -1]
        if not matches or any(rules[i].target.format(part=p) not in shapes for i, m in matches for p in _parts(rules[i], m)):
            unexpected.append(key)
            continue
        for i, m in matches:
            pieces = _pieces(reader, key, rules[i], m, shapes)
            if (i, canon) in filled:  # two spellings of one tensor (e.g. "model.vision_tower." and "vision_tower.")
                raise CheckpointError(f"tensors {filled[i, canon]} and {key} are the same parameter: keep one")
            filled[i, canon] = key
            by_rule.setdefault(i, []).append((key, m, pieces))
    if unexpected:
        keys = sorted(set(unexpected))
        raise CheckpointError(f"unexpected tensors in the checkpoint: {', '.join(keys[:10])} (in "
                              f"{', '.join(sorted({reader.where(k) for k in keys}))}: no parameter of the model takes "
                              "them)")
    missing = sorted({(layout.on_disk(src), ", ".join(rules[i].target.format(part=p) for p in parts))
                      for i, rule in enumerate(rules) for src, parts, _ in _sources(rule, shapes)
                      if (i, src) not in filled})
    if missing:
        raise CheckpointError(f"tensors missing from the checkpoint for: {', '.join(sorted({p for _, p in missing})[:10])} "
                              f"(no {', '.join(k for k, _ in missing[:10])} in {reader.source})")

    def group(rule: Rule, keys: list) -> Group:
        paths = sorted({path for _, _, pieces in keys for path, _ in pieces})

        def cut(m, pieces: list, tensor: np.ndarray) -> list:
            """The (path, index, array) pieces one source tensor fills."""
            out = []
            for part, (path, index) in zip(_parts(rule, m), pieces):
                src = tensor[rule.rows(text, part)] if rule.rows else tensor
                out.append((path, index, TRANSFORMS[rule.transform].load(src.astype(dtype, copy=False),
                                                                         _region(shapes[path], index))))
            return out

        def writes():
            # the rule's next tensor is read while this one is cut and transposed (one tensor of lookahead)
            with ThreadPoolExecutor(1) as pool:
                ahead = pool.submit(reader.get, keys[0][0])
                for n, (key, m, targets) in enumerate(keys):
                    tensor = ahead.result()
                    ahead = pool.submit(reader.get, keys[n + 1][0]) if n + 1 < len(keys) else None
                    pieces = cut(m, targets, tensor)
                    del tensor  # a transposed piece is a copy: the source can go before the pieces are used
                    while pieces:
                        yield pieces.pop(0)

        return Group(paths, writes)

    return [group(rules[i], keys) for i, keys in sorted(by_rule.items())]


def load_params(reader: SafetensorsReader, layout: Layout, text: TextConfig, shapes: dict, dtype,
                place: Callable[[str, np.ndarray], object]) -> dict:
    """Fill every parameter in ``shapes`` ("/"-joined path -> shape) from ``reader``, one rule at a time.

    Each finished parameter goes through ``place(path, host_array)`` (e.g. onto its devices) and its host buffer
    is released, so the host holds at most the parameters of one rule at once. Raises :class:`CheckpointError`
    naming the keys on unexpected or missing tensors and on shapes that do not fit the config. Returns the nested
    dict of placed arrays.
    """
    out = {}
    for group in plan_groups(reader, layout, text, shapes, dtype):
        buffers = {}
        for path, index, array in group.writes():
            if index == ():  # the whole param in one piece: no staging copy
                buffers[path] = array
            else:
                buffers.setdefault(path, np.empty(shapes[path], np.dtype(as_dtype(dtype))))[index] = array
        for path in group.paths:
            out[path] = place(path, buffers.pop(path))
    return traverse_util.unflatten_dict(out, sep="/")


def export_tensors(params: dict, config: InternVLConfig, layout: Layout) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, tensor) pairs of ``layout`` for our params, one tensor at a time, in table order."""
    flat = traverse_util.flatten_dict(params, sep="/")
    shapes = {p: np.shape(a) for p, a in flat.items()}
    for rule in (r for r in layout.rules if r.applies_to(config.text.family)):
        for key, parts, layer in _sources(rule, shapes):
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
            yield layout.on_disk(key), np.require(tensor, requirements="C")  # keeps a 0-d scalar 0-d


def _shapes(tree) -> dict:
    return {p: s.shape for p, s in traverse_util.flatten_dict(tree, sep="/").items()}


def layout_of(config: dict) -> Layout:
    """The layout of a parsed config.json: the original one has ``llm_config``, the transformers one ``text_config``."""
    return LAYOUTS["original" if "llm_config" in config else "hf"]


def checkpoint_layout(path: str) -> Layout:
    """The layout of a checkpoint folder, from its own config.json."""
    with open(os.path.join(path, "config.json")) as f:
        return layout_of(json.load(f))


def checkpoint_model(path: str) -> tuple:
    """(config, layout, abstract params) of a safetensors checkpoint folder, from its own config.json: an
    InternVL chat model or InternVL 1.0 (``qllama_config``)."""
    from .clip_checkpoint import is_clip_checkpoint

    if is_clip_checkpoint(path):
        from internvl_jax.clip_config import load_clip_config
        from internvl_jax.clip_model import abstract_clip_params

        from .keymaps import internvl_g_layout

        config = load_clip_config(path)
        return config, internvl_g_layout(config.cross_attention_frequency), abstract_clip_params(config)
    config = load_config(path)
    return config, checkpoint_layout(path), abstract_params(config)


PARAMS_DIR = "params"  # the orbax checkpoint inside a folder written by ``internvl-jax convert``


def _device_put(path: str, array: np.ndarray):
    return jnp.asarray(array)


def _placement(boxed: dict, mesh, rules):
    """(shardings or None, place(path, host array)): onto the default device, or with a ``mesh`` each
    addressable device copying its own slice of the host array into the sharding ``rules`` give it."""
    if mesh is None:
        return None, _device_put
    import sharding

    shardings = sharding.shardings(boxed, mesh, rules)
    flat = traverse_util.flatten_dict(shardings, sep="/")

    def place(p, array):
        return jax.make_array_from_callback(array.shape, flat[p], lambda index: array[index])

    return shardings, place


def _read(reader, layout: Layout, config: InternVLConfig, mesh, rules) -> dict:
    boxed = abstract_params(config, boxed=True)
    _, place = _placement(boxed, mesh, rules)
    return load_params(reader, layout, config.text, _shapes(nn.unbox(boxed)), config.param_dtype, place)


def source_dtype(reader: SafetensorsReader) -> str:
    """The dtype name of the checkpoint's floating-point tensors (the first one found)."""
    for key in reader.keys():
        dtype = np.dtype(reader.dtype(key))
        if dtype.kind == "f" or dtype.name == "bfloat16":
            return dtype.name
    return "float32"


def checkpoint_dtype(path: str) -> str:
    """The dtype name the params of a checkpoint folder are stored in: its safetensors' floating-point dtype, or
    the dtype of the params of a ``convert`` (orbax) folder. What ``export`` keeps by default, so that a round trip
    without ``--dtype`` loses nothing."""
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        from .orbax_io import stored_dtype

        return stored_dtype(os.path.join(path, PARAMS_DIR))
    with SafetensorsReader(path) as reader:
        return source_dtype(reader)


def load_pretrained(path: str, dtype=jnp.float32, mesh=None, rules="fsdp") -> tuple[InternVL, dict]:
    """Load an InternVL checkpoint folder: safetensors in either layout (single file or sharded with an index), or
    the orbax folder that ``internvl-jax convert`` writes.

    ``dtype`` is both the params' and the compute dtype. With a ``mesh``, every tensor goes straight into the
    sharding that ``rules`` (a preset of :mod:`sharding.rules` or a rule table) gives it, and each device receives
    only its slice; the host holds at most one key-map rule's tensors at a time (safetensors) or nothing (orbax,
    read by each device). Returns ``(model, params)``; call
    ``model.apply({"params": params}, input_ids=..., pixel_values=..., tile_mask=...)``.
    """
    from .clip_checkpoint import is_clip_checkpoint, load_clip_pretrained

    if is_clip_checkpoint(path):  # InternVL 1.0 (InternVL-C / InternVL-G): its own model class
        return load_clip_pretrained(path, dtype, mesh, rules)
    name = dtype_name(as_dtype(dtype))
    config = load_config(path, dtype=name, param_dtype=name)
    if config.image_token_id < 0:  # original configs leave it to the tokenizer, as chat() does
        from internvl_jax.processing.tokenizer import Tokenizer

        config = config.replace(image_token_id=Tokenizer.from_pretrained(path).img_context_id)
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        from .orbax_io import restore

        boxed = abstract_params(config, boxed=True)
        shardings, _ = _placement(boxed, mesh, rules)
        return InternVL(config), restore(os.path.join(path, PARAMS_DIR), nn.unbox(boxed), shardings)
    with SafetensorsReader(path) as reader:
        return InternVL(config), _read(reader, checkpoint_layout(path), config, mesh, rules)


class StateDictReader:
    """:class:`SafetensorsReader`'s reading interface over tensors in memory: a ``{name: tensor}`` mapping of
    torch tensors (any device; bfloat16 arrives as ml_dtypes' bfloat16) or numpy arrays."""

    def __init__(self, tensors: Mapping):
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        # torch names its dtypes as numpy (and ml_dtypes, for bfloat16) does, behind "torch."
        return np.dtype(str(self._tensors[name].dtype).removeprefix("torch."))

    source = "the state dict"

    def where(self, name: str) -> str:
        return self.source

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if not hasattr(t, "detach"):
            return np.asarray(t)
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: the same bits, reinterpreted
            import torch

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def from_state_dict(state_dict: Mapping, config, dtype=jnp.float32, mesh=None, rules="fsdp",
                    image_token_id: int | None = None) -> tuple[InternVL, dict]:
    """Our ``(model, params)`` from a PyTorch model in memory, with no file written: ``state_dict`` in either
    layout (``transformers.InternVLForConditionalGeneration(...).state_dict()``, or the original
    ``InternVLChatModel``'s) and ``config`` its parsed config.json or the model's config object (``model.config``).

    Checked and placed as :func:`load_pretrained` does (``dtype``, ``mesh``, ``rules`` alike). Original configs do
    not name the IMG_CONTEXT token id, which then comes from ``image_token_id`` (the tokenizer's).
    """
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        config = config.to_dict()
    name = dtype_name(as_dtype(dtype))
    cfg = config_from_dict(config, dtype=name, param_dtype=name)
    if image_token_id is not None:
        cfg = cfg.replace(image_token_id=int(image_token_id))
    if cfg.image_token_id < 0:
        raise CheckpointError("the config does not name the IMG_CONTEXT token id: pass image_token_id= "
                              "(the tokenizer's id of <IMG_CONTEXT>)")
    return InternVL(cfg), _read(StateDictReader(state_dict), layout_of(config), cfg, mesh, rules)


def load_language_model(path: str, dtype=jnp.float32) -> tuple[Decoder, dict]:
    """Load a transformers causal LM folder (Qwen2/Qwen3/Llama/InternLM3/Phi3ForCausalLM) as our Decoder."""
    text = parse_config_file(path, text_config_from_dict)
    d = as_dtype(dtype)
    decoder = Decoder(text, dtype=d, param_dtype=d)
    tree = jax.eval_shape(lambda: decoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    with SafetensorsReader(path) as reader:
        params = load_params(reader, HF, text, _shapes({"language_model": nn.unbox(tree)}), d, _device_put)
    return decoder, params["language_model"]
