"""LoRA adapters in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``, with PEFT's key
names (``base_model.model.`` + the torch module's name + ``.lora_A.weight`` / ``.lora_B.weight``) for one of two
torch models, the ``layout``:

- ``hf`` (the default): the transformers-native ``InternVLForConditionalGeneration``, its in-memory module names
  (``model.language_model.layers.0.self_attn.q_proj``; InternLM2 as Llama);
- ``original``: the original OpenGVLab ``InternVLChatModel`` wrapped whole by PEFT, its module names as its
  state-dict keys (``vision_model.encoder.layers.0.attn.qkv``, ``mlp1.1``,
  ``language_model.model.layers.0.attention.wqkv`` for InternLM2).

Which PEFT module feeds which of our kernels comes from the layout's checkpoint key map (``convert.keymaps``):
every rule that maps a torch ``*.weight`` onto one of our ``*/kernel`` with the ``linear`` (one input dim) or
``linear2`` (two input dims: o_proj, the ViT's projection) transform names a ``torch.nn.Linear`` that PEFT can
adapt; a rule with parts (the transformers ViT's q/k/v into our fused qkv) names one module per part. Loading
finds the layout from the file's module names.

Shapes: PEFT ``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]; ours ``lora_a`` [*in, r], ``lora_b``
[r, *features] (see :mod:`internvl_jax.lora`), stacked on a leading layers axis inside ``layers``.

- Saving a fused adapter on the ViT's qkv (the original's ``attn.qkv`` target) writes q_proj, k_proj and v_proj
  with the same ``lora_A`` and their rows of ``lora_B``: exactly the same model.
- A fused torch Linear whose rows our separate kernels hold (Phi-3's ``qkv_proj`` -> q/k/v_proj, ``gate_up_proj``
  -> gate/up_proj, the original layout's InternLM2 ``wqkv``: the key maps' row rules) is a shared-A group here
  (:mod:`internvl_jax.lora`): its ``lora_A`` is the group's ``lora_a``, its ``lora_B`` rows are the members'
  ``lora_b`` (rows of a kernel outside the group are saved as zeros). A kernel of such a Linear with an adapter of
  its own has no PEFT form: a clear error; so has a ``split`` adapter on a kernel one torch Linear holds whole
  (``vit_split`` on the original layout's ``attn.qkv``).
- A shared-A group over kernels that are separate torch Linears (InternLM2's ``wqkv`` group on the
  transformers-native Llama names) is saved as those modules, each with the group's ``lora_A``: the same model.
- Loading: a fused kernel whose part adapters share one ``lora_A`` everywhere becomes one fused adapter; otherwise
  a ``split`` adapter (one per part). Separate modules that the family's fused groups (``lora.FUSED``) name and that
  share one ``lora_A`` (and alpha) in every layer load as that group. A part or layer the file lacks gets zero A and
  B (no change). PEFT's ``use_rslora`` (scale alpha/sqrt(r)) becomes alpha * sqrt(r) here. DoRA,
  ``fan_in_fan_out`` and LoRA biases are refused with a clear error.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

from internvl_jax import lora
from internvl_jax.config import InternVLConfig
from internvl_jax.model import abstract_params

from .keymaps import LAYOUTS, ORIGINAL
from .safetensors_io import CheckpointError
from .staging import staged_folder

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# per layout: canonical key prefixes (convert.keymaps) -> the torch module names PEFT writes (transformers' in-memory
# names, which its save_pretrained renames; the original model's names are its state-dict keys)
MODULE_PREFIXES = {
    "hf": (("vision.", "model.vision_tower."), ("projector.", "model.multi_modal_projector."),
           ("llm.", "model.language_model."), ("lm_head.", "lm_head.")),
    "original": tuple((canonical, theirs) for theirs, canonical in ORIGINAL.prefixes),
}
N_IN = {"linear": 1, "linear2": 2}  # input dims of our kernel for the key maps' linear transforms


@dataclass(frozen=True)
class Module:
    """One torch Linear PEFT can adapt: its in-memory name template (``{layer}`` for stacked kernels), our kernel
    path, the part index on the kernel's first output axis (None: the whole kernel), our kernel's input dims; for a
    fused torch Linear (one entry per kernel it feeds), the key map's ``rows(text_config, row_part)``: its rows
    that ``kernel`` holds."""

    name: str
    kernel: str
    part: int | None
    n_in: int
    rows: Callable | None = None
    row_part: str = ""

    def row_index(self, text) -> np.ndarray:
        """The fused weight's rows of ``kernel`` (int [n]) for the TextConfig ``text``."""
        rows = self.rows(text, self.row_part)
        return np.arange(rows.start, rows.stop) if isinstance(rows, slice) else np.asarray(rows)

    @property
    def group(self) -> str:
        """A fused torch Linear's shared-A group name here: the module's own name (``qkv_proj``)."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.name

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.name).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$")


def _module_name(canonical: str, layout: str) -> str:
    """The torch module name in ``layout`` of the canonical module key ``canonical`` (``llm.layers.{layer}.mlp``)."""
    for ours, theirs in MODULE_PREFIXES[layout]:
        if (canonical + ".").startswith(ours):  # "lm_head" itself too
            return (theirs + canonical[len(ours):]) if len(canonical) >= len(ours) else theirs.rstrip(".")
    raise ValueError(f"no {layout} module name for key {canonical!r}")


def _check_layout(layout: str) -> None:
    if layout not in MODULE_PREFIXES:
        raise ValueError(f"unknown PEFT layout {layout!r}; use one of {', '.join(MODULE_PREFIXES)}")


def modules(family: str, layout: str = "hf") -> list[Module]:
    """The adaptable torch Linears, in ``layout``'s module names, of the model with an LLM of ``family``."""
    _check_layout(layout)
    out = []
    for rule in LAYOUTS[layout].rules:
        if (not rule.source.endswith(".weight") or not rule.target.endswith("/kernel") or rule.transform not in N_IN
                or not rule.applies_to(family)):
            continue
        base = rule.source[: -len(".weight")]
        for i, part in enumerate(rule.parts or (None,)):
            if rule.rows is not None:  # one fused Linear, its rows in our separate kernels
                out.append(Module(_module_name(base, layout), rule.target.replace("{part}", part), None,
                                  N_IN[rule.transform], rule.rows, part))
                continue
            name = _module_name(base.replace("{part}", part) if part else base, layout)
            if "{part}" in rule.target:
                out.append(Module(name, rule.target.replace("{part}", part), None, N_IN[rule.transform]))
            else:
                out.append(Module(name, rule.target, i if part else None, N_IN[rule.transform]))
    return out


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value) -> None:
    keys = path.split("/")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


# ---------------------------------------------------------------------------------------------------------
# Ours -> PEFT
# ---------------------------------------------------------------------------------------------------------


def to_peft_tensors(params: dict, config: InternVLConfig, layout: str = "hf") -> tuple[dict, dict]:
    """Our adapters (``params`` holding ``lora_a``/``lora_b``) -> ({PEFT key: float32 array}, {module name:
    (rank, alpha, dropout)}) in ``layout``'s module names. Raises ValueError for an adapter that no PEFT module of
    that torch model holds."""
    tensors, meta = {}, {}
    by_kernel = defaultdict(list)
    table = modules(config.text.family, layout)
    for m in table:
        by_kernel[m.kernel].append(m)
    fused = defaultdict(list)  # fused module name -> [(Module, group path, A, B, Adapter)]
    adapted = {"/".join(k.key for k in p[:-1]) + "/kernel"
               for p, _ in jax.tree_util.tree_flatten_with_path(lora.adapters_of(params))[0] if p[-1].key == "lora_b"}
    for kernel in sorted(adapted):
        adapter = lora.adapter_for(config.lora, kernel)
        targets = by_kernel.get(lora.canonical_path(kernel))
        if adapter is None or not targets:
            raise ValueError(f"the LoRA adapter of {kernel} has no PEFT counterpart in the {layout} layout's model "
                             f"(adaptable kernels: {', '.join(sorted(by_kernel))})")
        if adapter.split and targets[0].part is None:
            raise ValueError(f"{kernel} has a split LoRA adapter (one per part), but the {layout} layout's torch "
                             f"Linear {targets[0].name.format(layer='*')} holds the kernel whole, with one lora_A: "
                             f"use one adapter on it (e.g. the vit preset, not vit_split), or layout='hf'")
        node_path = kernel.rsplit("/", 1)[0]
        parent, member = node_path.rsplit("/", 1)
        node = _get(params, node_path)
        a = lora.shared_a(_get(params, parent), adapter.group, parent, member) if adapter.group else node["lora_a"]
        a, b = np.asarray(a, np.float32), np.asarray(node["lora_b"], np.float32)
        if targets[0].rows is not None:
            if not adapter.group:
                raise ValueError(f"{kernel} holds rows of the fused torch Linear "
                                 f"{targets[0].name.format(layer='*')}, which PEFT adapts "
                                 f"with one lora_A: put its kernels in one shared-A group (rule group "
                                 f"{targets[0].group!r}, as internvl_jax.lora.preset_rules(..., family=) does)")
            fused[targets[0].name].append((targets[0], f"{parent}/{adapter.group}", a, b, adapter))
            continue
        layers = range(a.shape[0]) if targets[0].stacked else [None]
        for m in targets:
            for i in layers:
                ai, bi = (a, b) if i is None else (a[i], b[i])
                if adapter.split:  # A [*in, P, r], B [P, r, *rest]
                    ai, bi = ai[..., m.part, :], bi[m.part]
                elif m.part is not None:  # fused: the shared A, this part's columns of B [r, P, *rest]
                    bi = bi[:, m.part]
                _put(tensors, m.name.format(layer=i), ai, bi)
                meta[m.name.format(layer=i)] = (adapter.rank, adapter.alpha, adapter.dropout)
    for name, members in fused.items():
        if len({g for _, g, *_ in members}) != 1:
            raise ValueError(f"the kernels feeding the fused torch Linear {name} are in different shared-A groups "
                             f"({sorted({g for _, g, *_ in members})}); PEFT holds one lora_A for it")
        a, adapter = members[0][2], members[0][4]
        every = [m for m in table if m.name == name]
        n_rows = sum(len(m.row_index(config.text)) for m in every)
        layers = range(a.shape[0]) if members[0][0].stacked else [None]
        for i in layers:
            bi = np.zeros((n_rows, adapter.rank), np.float32)  # rows of kernels outside the group stay zero
            for m, _, _, b, _ in members:
                bi[m.row_index(config.text)] = (b if i is None else b[i]).reshape(adapter.rank, -1).T
            _put(tensors, name.format(layer=i), a if i is None else a[i], bi.T)
            meta[name.format(layer=i)] = (adapter.rank, adapter.alpha, adapter.dropout)
    return tensors, meta


def _put(tensors: dict, name: str, a, b) -> None:
    """PEFT's ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] of module ``name`` from our A [*in, r] and
    B [r, *out]."""
    r = a.shape[-1]
    tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)


def peft_config(meta: dict, base_model: str | None = None) -> dict:
    """adapter_config.json for modules {name: (rank, alpha, dropout)}: the commonest rank and alpha as ``r`` and
    ``lora_alpha``, the others in ``rank_pattern`` / ``alpha_pattern`` (exact module names)."""
    r = Counter(v[0] for v in meta.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in meta.values()).most_common(1)[0][0]
    exact = lambda name: f"^{re.escape(name)}"  # noqa: E731  PEFT matches (.*\.)?(pattern)$
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "r": int(r), "lora_alpha": float(alpha), "lora_dropout": max(v[2] for v in meta.values()),
        "target_modules": sorted(meta), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {exact(n): int(v[0]) for n, v in meta.items() if v[0] != r},
        "alpha_pattern": {exact(n): float(v[1]) for n, v in meta.items() if v[1] != alpha},
    }


def save_adapter(params: dict, config: InternVLConfig, dst: str, *, overwrite: bool = False,
                 base_model: str | None = None, layout: str = "hf") -> None:
    """Write our adapters to ``dst`` in PEFT's format (staged, renamed in when complete) with ``layout``'s module
    names; ``PeftModel.from_pretrained(model, dst)`` loads them onto that layout's torch model
    (``InternVLForConditionalGeneration`` for ``hf``, the original ``InternVLChatModel`` for ``original``). Only the
    adapters are written (train a projector fully and its weights go in the merged export, not here)."""
    from safetensors.numpy import save_file

    tensors, meta = to_peft_tensors(jax.device_get(params), config, layout)
    if not tensors:
        raise ValueError("the params hold no LoRA adapters (lora_a/lora_b) to save")
    with staged_folder(dst, overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(peft_config(meta, base_model), f, indent=2)


# ---------------------------------------------------------------------------------------------------------
# PEFT -> ours
# ---------------------------------------------------------------------------------------------------------


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter_config(path: str) -> dict:
    """adapter_config.json of a PEFT adapter folder, checked for what this loader supports."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: no such file (a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}, "
                              "expected 'LORA'")
    for key, ok, what in (("use_dora", False, "DoRA"), ("fan_in_fan_out", False, "fan_in_fan_out weights"),
                          ("bias", "none", "LoRA biases")):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"{file}: {key}={cfg[key]!r}: {what} are not supported (expected {ok!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise CheckpointError(f"{file}: {key} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def _pairs(tensors: dict, where: str) -> dict:
    """{PEFT key: array} -> {module name: (lora_A [r, in], lora_B [out, r])} as float32 numpy arrays."""
    pairs = defaultdict(dict)
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise CheckpointError(f"{where}: tensor {key!r} is not a LoRA weight (expected {PREFIX}<module>.lora_A"
                                  ".weight / .lora_B.weight)")
        pairs[m.group(1)][m.group(2)] = np.asarray(value, np.float32)
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{where}: module {name} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}


def _groups(found: dict, forced: dict, rules: tuple | None, family: str, alpha) -> dict:
    """{kernel: shared-A group name} for the adapters ``found`` ({kernel: {(layer, part): (A, B, name, Module)}}):
    ``forced`` (parts of a fused torch Linear), then the ``rules``' groups, or without rules the family's
    ``lora.FUSED`` groups whose separate modules share one A and one ``alpha(name)`` in every layer. Raises
    CheckpointError where the members of a group the rules name differ."""
    if rules is not None:
        wanted = {k: a.group for k in found if (a := lora.adapter_for(rules, k)) is not None and a.group}
    else:
        wanted = {k: group for regex, group in lora.FUSED.get(family, ()) for k in found
                  if re.search(regex, lora.canonical_path(k))}
    members = defaultdict(list)
    for kernel, group in wanted.items():
        if kernel not in forced:
            members[(kernel.rsplit("/", 2)[0], group)].append(kernel)
    groups = dict(forced)
    for (parent, group), kernels in members.items():
        first = found[kernels[0]]
        same = all(found[k].keys() == first.keys() and all(
            np.array_equal(found[k][key][0], first[key][0]) and alpha(found[k][key][2]) == alpha(first[key][2])
            for key in first) for k in kernels)
        same = same and (rules is not None or len(kernels) > 1)  # detected: a group of at least two
        if not same and rules is not None:
            raise CheckpointError(f"the rules put {kernels} in the shared-A group {parent}/{group}, but their "
                                  "lora_A (or layers, or alpha) differ")
        if same:
            groups.update({k: group for k in kernels})
    return groups


def layout_of(names, family: str) -> str:
    """The layout (``hf`` or ``original``) whose adaptable Linears for ``family`` include the most of the torch
    module ``names`` (all of them, for a file of that layout; ``hf`` on a tie)."""
    def hits(layout):
        table = modules(family, layout)
        return sum(any(m.pattern.match(n) for m in table) for n in names)
    return max(MODULE_PREFIXES, key=hits)


def from_peft_tensors(tensors: dict, peft: dict, config: InternVLConfig, *, rules: tuple | None = None,
                      where: str = "adapter", layout: str | None = None) -> tuple[tuple, dict]:
    """({PEFT key: array}, adapter_config dict) -> (our LoRA rule table, adapters tree of float32 numpy arrays) for
    the model ``config``. ``rules``: lay the adapters out as this table says (e.g. gradients in the layout of
    existing adapters) instead of detecting fused vs split and shared-A groups. ``layout``: the module names'
    (None: found from them, :func:`layout_of`)."""
    family = config.text.family
    pairs = _pairs(tensors, where)
    layout = layout_of(pairs, family) if layout is None else layout
    table = modules(family, layout)
    found = defaultdict(dict)  # kernel -> {(layer, part): (A, B, name, mod)}
    forced = {}  # kernel -> the shared-A group of the fused torch Linear it holds rows of
    for name, (a_t, b_t) in pairs.items():
        hits = [(mod, mm) for mod in table if (mm := mod.pattern.match(name))]
        if not hits:
            raise CheckpointError(f"{where}: module {name} is not an adaptable Linear of the {layout} layout's "
                                  f"InternVL with a {family} LLM")
        for mod, mm in hits if hits[0][0].rows is not None else hits[:1]:  # a fused Linear: all its kernels
            layer = int(mm.group("layer")) if mod.stacked else None
            rows = b_t
            if mod.rows is not None:  # this kernel's rows of B, the shared A
                n_rows = sum(len(m.row_index(config.text)) for m, _ in hits)
                if b_t.shape[0] != n_rows:
                    raise CheckpointError(f"{where}: {name}: lora_B {list(b_t.shape)}, expected {n_rows} rows (the "
                                          "fused Linear's)")
                rows = b_t[mod.row_index(config.text)]
                forced[mod.kernel] = mod.group
            found[mod.kernel][(layer, mod.part)] = (a_t, rows, name, mod)
    alpha_of = lambda name: float(_pattern_value(peft.get("alpha_pattern"), name, peft["lora_alpha"]))  # noqa: E731
    groups = _groups(found, forced, rules, family, alpha_of)
    shapes = abstract_params(config.replace(lora=()))
    out_rules, adapters = [], {}
    use_rs = bool(peft.get("use_rslora", False))
    for kernel, entries in sorted(found.items()):
        kshape = _get(shapes, kernel).shape
        mod = next(iter(entries.values()))[3]
        stacked = mod.stacked
        per_layer = kshape[1:] if stacked else kshape
        in_shape, features = per_layer[: mod.n_in], per_layer[mod.n_in:]
        ranks = {v[0].shape[0] for v in entries.values()}
        alphas = {alpha_of(v[2]) for v in entries.values()}
        declared = {int(_pattern_value(peft.get("rank_pattern"), v[2], peft["r"])) for v in entries.values()}
        if len(ranks) != 1 or len(alphas) != 1:
            raise CheckpointError(f"{where}: the modules feeding {kernel} have ranks {sorted(ranks)} and alphas "
                                  f"{sorted(alphas)}; one rank and alpha per kernel is supported")
        r, alpha = ranks.pop(), alphas.pop()
        if declared != {r}:
            raise CheckpointError(f"{where}: {kernel}'s modules store rank {r} but adapter_config.json says "
                                  f"{sorted(declared)}")
        if use_rs:
            alpha = alpha * math.sqrt(r)  # rsLoRA's scale alpha/sqrt(r) as our alpha/r
        layers = kshape[0] if stacked else None
        parts = mod.part is not None
        group = groups.get(kernel, "")
        if rules is not None:
            given = lora.adapter_for(rules, kernel)
            split = bool(given and given.split)
        else:  # one fused adapter when every part of every layer is there and shares its A
            n_parts = features[0] if parts else 1
            split = parts and not all(
                (i, p) in entries and np.array_equal(entries[(i, p)][0], entries[(i, 0)][0])
                for i in (range(layers) if stacked else [None]) for p in range(n_parts))
        for key, (a_t, b_t, name, _) in entries.items():
            exp_a, exp_b = (r, math.prod(in_shape)), (math.prod(features[1:] if parts else features), r)
            if a_t.shape != exp_a or b_t.shape != exp_b:
                raise CheckpointError(f"{where}: {name}: lora_A {list(a_t.shape)} / lora_B {list(b_t.shape)}, "
                                      f"expected {list(exp_a)} / {list(exp_b)} for {kernel} of shape {list(kshape)}")
        lead = (layers,) if stacked else ()
        if split:
            a = np.zeros(lead + (*in_shape, features[0], r), np.float32)
            b = np.zeros(lead + (features[0], r, *features[1:]), np.float32)
        else:
            a = np.zeros(lead + (*in_shape, r), np.float32)
            b = np.zeros(lead + (r, *features), np.float32)
        for (i, p), (a_t, b_t, _, _) in entries.items():
            at = a_t.T.reshape(*in_shape, r)
            idx = (i,) if stacked else ()
            if split:
                a[idx + (Ellipsis, p, slice(None))] = at
                b[idx + (p,)] = b_t.T.reshape(r, *features[1:])
            elif parts:
                a[idx] = at
                b[idx + (slice(None), p)] = b_t.T.reshape(r, *features[1:])
            else:
                a[idx], b[idx] = at, b_t.T.reshape(r, *features)
        node = kernel.rsplit("/", 1)[0]
        # a group's members hold the same A (checked): the group node gets it once per member, the same array
        _set(adapters, f"{node.rsplit('/', 1)[0]}/{group}/lora_a" if group else f"{node}/lora_a", a)
        _set(adapters, f"{node}/lora_b", b)
        out_rules.append((f"^{re.escape(kernel)}$", int(r), float(alpha), float(peft.get("lora_dropout", 0.0)), split)
                         + ((group,) if group else ()))
    return tuple(out_rules), adapters


def load_adapter(path: str, config: InternVLConfig) -> tuple[InternVLConfig, dict]:
    """A PEFT LoRA adapter folder, in either layout's module names (found from them) -> (``config`` with its LoRA
    rule table, the adapters tree). Put them on a base:
    ``params = internvl_jax.lora.combine(base_params, adapters)`` and run ``InternVL(config)``; or merge them
    (:func:`internvl_jax.lora.merge`) for the plain model."""
    from safetensors.numpy import load_file

    peft = read_adapter_config(path)
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: no such file")
    rules, adapters = from_peft_tensors(load_file(file), peft, config, where=file)
    if not rules:
        raise CheckpointError(f"{file}: holds no LoRA weights")
    return config.replace(lora=rules), adapters


def load_with_adapter(base: str, adapter: str, *, dtype=None, merge: bool = False, mesh=None, rules="fsdp"):
    """(model, params) of a base checkpoint (either safetensors layout or a ``convert`` folder) with a PEFT adapter
    on it: unmerged (the low-rank path runs in each layer; no merge needed to evaluate) or ``merge``d into the
    kernels (the plain model, as fast as the base). On a ``mesh`` the base loads sharded by ``rules`` and the
    adapters go where the same rules put them (their logical axes); merged kernels keep their kernel's sharding."""
    import jax.numpy as jnp

    from internvl_jax.model import InternVL
    from sharding.place import shardings

    from .load import load_pretrained

    model, params = load_pretrained(base, dtype=jnp.float32 if dtype is None else dtype, mesh=mesh, rules=rules)
    config, adapters = load_adapter(adapter, model.config)
    if mesh is None:
        adapters = jax.tree.map(jnp.asarray, adapters)
    else:
        boxed = lora.adapters_of(abstract_params(config, boxed=True))
        adapters = jax.device_put(adapters, shardings(boxed, mesh, rules))
    params = lora.combine(params, adapters)
    if merge:
        merged = lora.merge(params, config.lora)
        if mesh is not None:
            merged = jax.tree.map(lambda m, p: jax.device_put(m, p.sharding), merged,
                                  lora.partition(params, lambda path: not lora.is_adapter_path(path))[0])
        return InternVL(config.replace(lora=())), merged
    return InternVL(config), params
