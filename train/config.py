"""Train configs: typed, frozen dataclasses; one Python file per named preset in ``train/configs/``; ``key=value``
overrides from the command line, type-checked.

``internvl-jax train CONFIG [key=value ...]``: CONFIG is a preset name (``demo``, ``internvl2_5_stage1``, ...: the
files of ``train/configs``) or the path of a Python file that defines ``CONFIG = TrainConfig(...)``. Keys are
dotted field paths (``steps=100``, ``optim.lr=1e-5``, ``data.max_tokens=8192``; the rule tables as Python literals,
``"optim.lr_rules=(('^vision/', 0.1),)"``); an unknown key or a value of the
wrong type is a :class:`ConfigError` naming the key, the value and what was expected.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import pkgutil
import types
import typing
from dataclasses import dataclass, field

from internvl_jax.clip_config import CLIPConfig
from internvl_jax.config import InternVLConfig

from .optim import OptimConfig, stage_rules
from .preference import MPOConfig


class ConfigError(ValueError):
    """A train config that cannot be loaded or an override that does not fit it."""


@dataclass(frozen=True)
class DataConfig:
    """The input: meta files, row shapes, packing and loss weighting."""

    meta: str = ""  # the InternVL meta JSON of the training data (relative paths: from the current folder)
    eval_meta: str = ""  # held-out data in the same format ("" = no evaluation)
    rows: int = 8  # global rows per optimizer step (all processes together; split by accum_steps)
    max_tokens: int = 4096  # tokens per row: the static L (the original's max_packed_tokens)
    max_tiles: int = 13  # tile slots per row: the static T (the packer's tile budget)
    packing: bool = True  # several samples per row; False: one sample per row (plain SFT)
    split_long: bool = True  # split a sample longer than a row as the original does; False: skip it
    loss_weighting: str = "square"  # token | sample | square (1/sqrt(x) per sub-sample of x supervised tokens)
    max_dynamic_patch: int = 0  # tiles per image (0: the model's; a dataset's meta entry overrides both)
    v2pe: str = ""  # "" integer positions; "random" a stride per image (V2PE training); a number: a fixed stride
    min_num_frames: int = 8  # video frames per training sample, drawn in [min, max] as the original
    max_num_frames: int = 32
    workers: int = 0  # grain worker processes for decoding (0: in the training process)
    eval_samples: int = 64  # held-out samples per evaluation (0: no evaluation)


@dataclass(frozen=True)
class FreezeConfig:
    """The original's freezing flags (``internvl_chat_finetune.py``), turned into ``train.optim`` path rules by
    :func:`train.optim.stage_rules`; ``optim.lr_rules`` of the config come first and win."""

    freeze_backbone: bool = False  # the ViT
    freeze_mlp: bool = False  # the projector
    freeze_llm: bool = False  # the language model
    unfreeze_vit_layers: int = 0  # with freeze_backbone: train ViT layers[k:] (-k: the last k)
    unfreeze_lm_head: bool = False  # with freeze_llm: really train the head (the original's flag has no effect)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (:mod:`internvl_jax.lora`): ``rank`` > 0 (or ``rules``) turns it on. The towers named by
    ``targets`` get adapters and their base weights are frozen (no gradient, no optimizer state); the rest trains
    or not by the stage's freezing flags (the original: ``use_backbone_lora`` / ``use_llm_lora`` with the projector
    trained unless ``freeze_mlp``). Checkpoints then hold the trainable params only, plus the base's identity."""

    rank: int = 0  # 0: no LoRA
    alpha: float = 0.0  # 0: 2 * rank (the original's)
    dropout: float = 0.05
    # "auto": the towers the stage trains (vit unless freeze_backbone, llm unless freeze_llm); else a comma list of
    # internvl_jax.lora.TARGETS (vit, vit_split, llm, projector)
    targets: str = "auto"
    rules: tuple = ()  # extra (regex, rank, alpha[, dropout[, split[, group]]]) rules, tried before the targets'
    base_dtype: str = "float32"  # bfloat16: the frozen base stored in bfloat16 (adapters stay float32)
    # the PEFT adapter written with the export (workdir/adapter): hf = transformers' InternVLForConditionalGeneration
    # module names; original = the original InternVLChatModel's (convert.peft, layout=)
    adapter_layout: str = "hf"

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or bool(self.rules)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``init`` names a checkpoint (either safetensors layout or a ``convert`` orbax folder) to
    start from, with its tokenizer and template; without it, ``preset`` is initialised at random and
    ``tokenizer`` names the tokenizer folder."""

    name: str = "custom"
    workdir: str = ""  # output folder: metrics.jsonl, checkpoints/, export/; an existing run here resumes
    init: str = ""
    preset: str = ""
    # a model config written in the preset file (wins over ``preset``); a CLIPConfig for InternVL 1.0's stages
    model: InternVLConfig | CLIPConfig | None = None
    tokenizer: str = ""
    steps: int = 1000
    accum_steps: int = 1  # gradient accumulation micro-batches per step
    seed: int = 0
    # the model's runtime settings (the params are float32 master weights; compute in ``dtype``)
    dtype: str = "bfloat16"
    remat: str = "full"
    attention: str = "auto"
    scan_unroll: int = 1  # layers per scan iteration (InternVLConfig.scan_unroll; >= the depth: no loop, CPU-fast)
    drop_path: float = -1.0  # the ViT's drop_path_rate (-1: the checkpoint's)
    image_size: int = 0  # force_image_size: tiles of this size, position table interpolated (0: the checkpoint's)
    vocab_chunk: int = 1024  # positions whose logits are made at once by the loss (0: all)
    # the mesh: data,fsdp,tensor sizes (-1: the rest of the devices) and the sharding rule preset
    mesh: str = "1,-1,1"
    rules: str = "fsdp"
    cpu_devices: int = 0  # on a CPU host, simulate this many devices (set before JAX starts; the demo: 8)
    setup: str = ""  # "module:function" run first with the config, returning the config to run (see prepare())
    # bookkeeping
    log_every: int = 10  # console lines (metrics.jsonl gets every step)
    eval_every: int = 0  # held-out loss every N steps (0: at the end only, when eval data is given)
    save_every: int = 500
    keep: int = 3
    checkpoint_compression: bool = False  # zstd in orbax: ~8% smaller float checkpoints for ~2.5x the save's CPU
    max_nonfinite: int = 10  # stop after this many skipped updates (non-finite loss or gradient)
    export: str = ""  # "" | hf | original: safetensors of the final params in <workdir>/export
    tensorboard: bool = False
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # sft: supervised rows (conversations); mpo: preference pairs (MMPR records) and the MPO loss of ``mpo``;
    # contrastive / generative: InternVL 1.0's stages on image-text pairs (train/clip_train.py, train/data/captions.py)
    objective: str = "sft"
    mpo: MPOConfig = field(default_factory=MPOConfig)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


OBJECTIVES = ("sft", "mpo", "contrastive", "generative")
CLIP_OBJECTIVES = ("contrastive", "generative")  # InternVL 1.0 (InternVL-C / InternVL-G) stages


def is_clip_run(cfg: TrainConfig) -> bool:
    """Whether the run trains InternVL 1.0 (one of its stages)."""
    return cfg.objective in CLIP_OBJECTIVES


def lora_targets(cfg: TrainConfig) -> list[str]:
    """The LoRA target sets of the run (``lora.targets``; "auto": the towers the stage trains)."""
    if cfg.lora.targets != "auto":
        return [t.strip() for t in cfg.lora.targets.split(",") if t.strip()]
    return [name for name, frozen in (("vit", cfg.freeze.freeze_backbone), ("llm", cfg.freeze.freeze_llm))
            if not frozen]


def lora_rules(cfg: TrainConfig, family: str | None = None) -> tuple:
    """The adapters' rule table (``InternVLConfig.lora``) of the run; () without LoRA. ``family``: the model's LLM
    family, so that ``llm`` adapts its fused torch modules as the original does (shared-A groups,
    :func:`internvl_jax.lora.preset_rules`)."""
    if not cfg.lora.enabled:
        return ()
    from internvl_jax.lora import preset_rules

    targets = lora_targets(cfg) if cfg.lora.rank > 0 else []
    if cfg.lora.rank > 0 and not targets:
        raise ConfigError(f"lora.rank={cfg.lora.rank} but lora.targets=auto finds no trained tower in {cfg.name} "
                          "(it freezes the ViT and the LLM); set lora.targets=vit,llm (or vit_split, projector)")
    try:
        table = tuple(cfg.lora.rules) + (preset_rules(targets, cfg.lora.rank, cfg.lora.alpha or None,
                                                      cfg.lora.dropout, family) if targets else ())
        from internvl_jax.lora import compile_rules

        compile_rules(table)
    except ValueError as e:
        raise ConfigError(f"lora: {e}") from None
    return table


def optim_config(cfg: TrainConfig, config: InternVLConfig) -> OptimConfig:
    """``cfg.optim`` with the freezing flags of ``cfg.freeze`` appended to its path rules (``config``: the model,
    for whether its head is tied). With LoRA the adapters train (a rule put first) and the towers they are on are
    frozen."""
    f = cfg.freeze
    extra = cfg.optim.lr_rules
    freeze_backbone, freeze_mlp, freeze_llm = f.freeze_backbone, f.freeze_mlp, f.freeze_llm
    if cfg.lora.enabled:
        targets = lora_targets(cfg) if cfg.lora.rank > 0 else []
        freeze_backbone |= any(t.startswith("vit") for t in targets)
        freeze_llm |= "llm" in targets
        freeze_mlp |= "projector" in targets
        extra = ((r"/lora_[ab]$", 1.0),) + tuple(extra)
    rules = stage_rules(freeze_backbone, freeze_mlp, freeze_llm, f.unfreeze_vit_layers, f.unfreeze_lm_head,
                        tied_head=config.text.tie_word_embeddings, extra=extra)
    optim = dataclasses.replace(cfg.optim, lr_rules=rules)
    if is_clip_run(cfg):  # the stage's rules last: the config's rules and flags win
        from .clip_train import optim_for

        optim = optim_for(cfg.objective, optim)
    return optim


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for a config that cannot run, before anything is loaded."""
    checks = [
        (bool(cfg.workdir), "workdir is not set: give workdir=DIR (metrics, checkpoints and exports go there)"),
        (cfg.steps >= 1, f"steps={cfg.steps}: expected a positive number of optimizer steps"),
        (cfg.accum_steps >= 1, f"accum_steps={cfg.accum_steps}: expected >= 1"),
        (bool(cfg.init or cfg.preset or cfg.model),
         "give init=PATH (a checkpoint to start from) or preset=NAME (random initialisation)"),
        (bool(cfg.data.meta), "data.meta is not set: give data.meta=PATH of an InternVL meta JSON"),
        (cfg.data.loss_weighting in ("token", "sample", "square"),
         f"data.loss_weighting={cfg.data.loss_weighting!r}: expected token, sample or square"),
        (cfg.data.rows % cfg.accum_steps == 0,
         f"data.rows={cfg.data.rows} does not split into accum_steps={cfg.accum_steps} micro-batches"),
        (cfg.export in ("", "hf", "original"), f"export={cfg.export!r}: expected '', hf or original"),
        (cfg.dtype in ("float32", "bfloat16"), f"dtype={cfg.dtype!r}: expected float32 or bfloat16"),
        (cfg.save_every >= 1 and cfg.keep >= 1, f"save_every={cfg.save_every}, keep={cfg.keep}: expected >= 1"),
        (cfg.lora.rank >= 0, f"lora.rank={cfg.lora.rank}: expected >= 0 (0 = no LoRA)"),
        (cfg.objective in OBJECTIVES, f"objective={cfg.objective!r}: expected one of {', '.join(OBJECTIVES)}"),
        (cfg.lora.base_dtype in ("float32", "bfloat16"),
         f"lora.base_dtype={cfg.lora.base_dtype!r}: expected float32 or bfloat16"),
        (cfg.lora.adapter_layout in ("hf", "original"),
         f"lora.adapter_layout={cfg.lora.adapter_layout!r}: expected hf or original"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.data.meta and not os.path.isfile(cfg.data.meta):
        raise ConfigError(f"data.meta={cfg.data.meta}: no such file")
    if cfg.init and not os.path.isdir(cfg.init):
        raise ConfigError(f"init={cfg.init}: no such checkpoint folder")
    _validate_model_kind(cfg)
    lora_rules(cfg)  # a bad table or target set fails here, before anything is loaded
    if cfg.lora.adapter_layout == "original" and cfg.lora.rank > 0 and "vit_split" in lora_targets(cfg):
        raise ConfigError(f"lora.adapter_layout=original with lora.targets={cfg.lora.targets}: the original "
                          "InternVLChatModel's attn.qkv is one torch Linear, which PEFT adapts with one lora_A, not "
                          "q/k/v apart (vit_split); use the vit target or lora.adapter_layout=hf")
    try:
        cfg.mpo.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_batch_split(cfg: TrainConfig, sizes: dict[str, int]) -> None:
    """Raise :class:`ConfigError` unless a micro-batch (``data.rows / accum_steps`` rows) splits evenly over the
    mesh axes that ``cfg.rules`` puts the batch on. ``sizes``: the built mesh's {axis: size}, e.g.
    ``{"data": 1, "fsdp": 8, "tensor": 1}``. Without it JAX stops the first step with its own IndivisibleError; and
    with accumulation each device must keep its own rows in every micro-batch (``train.step._micro_batches``)."""
    from sharding.rules import get_rules

    axes = dict(get_rules(cfg.rules))["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(sizes[a] for a in axes)
    micro = cfg.data.rows // cfg.accum_steps
    if micro % shards:
        split = " x ".join(f"{a}={sizes[a]}" for a in axes)
        raise ConfigError(f"data.rows={cfg.data.rows} ({micro} rows per micro-batch with "
                          f"accum_steps={cfg.accum_steps}) does not split over the {shards} batch shards of "
                          f"mesh={cfg.mesh!r} ({split} with rules={cfg.rules}): expected data.rows a multiple of "
                          f"{shards * cfg.accum_steps}")


def _validate_model_kind(cfg: TrainConfig) -> None:
    """InternVL 1.0 stages train an InternVL 1.0 model (a CLIP preset, a CLIPConfig or an InternVL 1.0 checkpoint)
    with the settings that apply to it; the other objectives train an InternVL chat model."""
    from internvl_jax.presets import CLIP_PRESETS

    clip = is_clip_run(cfg)
    if cfg.model is not None and isinstance(cfg.model, CLIPConfig) != clip:
        raise ConfigError(f"objective={cfg.objective} trains {'an InternVL 1.0' if clip else 'an InternVL chat'} "
                          f"model, but the config's model is a {type(cfg.model).__name__}")
    if cfg.preset and cfg.model is None and not cfg.init and (cfg.preset in CLIP_PRESETS) != clip:
        expected = f"one of {', '.join(CLIP_PRESETS)}" if clip else "a chat model preset"
        raise ConfigError(f"preset={cfg.preset!r} with objective={cfg.objective}: expected {expected}")
    if not clip:
        return
    f = cfg.freeze
    checks = [
        (cfg.accum_steps == 1, f"accum_steps={cfg.accum_steps}: InternVL 1.0's contrastive terms take every "
                               "negative of the global batch at once; micro-batches would change the loss (use 1)"),
        (not cfg.lora.enabled, "lora: not supported for InternVL 1.0's stages (train by optim.lr_rules instead)"),
        (not cfg.data.eval_meta, "data.eval_meta: no held-out loss for InternVL 1.0's stages (leave it empty)"),
        (not (f.freeze_mlp or f.freeze_llm or f.unfreeze_lm_head),
         "freeze.freeze_mlp / freeze_llm / unfreeze_lm_head name InternVL chat towers; InternVL 1.0's stage decides "
         "QLLaMA and the heads (train/clip_train.py STAGE_RULES): change them with optim.lr_rules"),
        (cfg.export in ("", "original"), f"export={cfg.export!r}: InternVL 1.0 exports its original layout only "
                                         "(export=original)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ------------------------------------------------------------------------------------------------------------
# Presets and files
# ------------------------------------------------------------------------------------------------------------

def preset_names() -> list[str]:
    """The named configs: the modules of ``train/configs``."""
    from . import configs

    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if not m.name.startswith("_"))


def load_train_config(name_or_path: str) -> TrainConfig:
    """A preset by name, or ``CONFIG`` of a Python file."""
    if name_or_path.endswith(".py"):
        if not os.path.isfile(name_or_path):
            raise ConfigError(f"config file {name_or_path} does not exist")
        spec = importlib.util.spec_from_file_location("_train_config", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif name_or_path in preset_names():
        module = importlib.import_module(f"train.configs.{name_or_path}")
    else:
        close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown train config {name_or_path!r}{hint}; presets: {', '.join(preset_names())}, or "
                          "the path of a .py file defining CONFIG")
    config = getattr(module, "CONFIG", None)
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{name_or_path} defines no CONFIG = TrainConfig(...)")
    return config


def prepare(config: TrainConfig) -> TrainConfig:
    """``config`` after its ``setup`` hook (``"module:function"``, called with the config, returning the config to
    run; the demo writes its synthetic data there), or as it is without one."""
    if not config.setup:
        return config
    module, _, name = config.setup.partition(":")
    try:
        hook = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"setup={config.setup!r}: expected module:function of an importable function") from None
    return hook(config)


# ------------------------------------------------------------------------------------------------------------
# key=value overrides
# ------------------------------------------------------------------------------------------------------------

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _as_tuples(value):
    """A literal's lists as tuples, at every depth (the configs are hashable)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _parse_table(text: str, key: str) -> tuple:
    """A rule table (a field annotated plain ``tuple``, e.g. ``optim.lr_rules``) written as a Python literal:
    ``(("^vision/", 0.0), ("^projector/", 10.0))``; lists are taken as tuples, ``()`` empties it."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}={text}: expected a rule table as a Python literal, e.g. "
                          f"{key}=\"(('^vision/', 0.0), ('^projector/', 10.0))\" (quote it for the shell)")
    return _as_tuples(value)


def _parse(text: str, kind, key: str):
    """``text`` as a value of the annotated type ``kind`` (int, float, bool, str, a tuple of them, Optional, or a
    rule table: plain ``tuple``, see :func:`_parse_table`)."""
    if kind is tuple:
        return _parse_table(text, key)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        items = [t for t in text.split(",") if t.strip()]
        inner = args[0] if args else str
        return tuple(_parse(t.strip(), inner, key) for t in items)
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
    elif kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{key}={text}: expected {kind.__name__}") from None
    else:
        raise ConfigError(f"{key}: cannot set a field of type {kind} from the command line")
    raise ConfigError(f"{key}={text}: expected {kind.__name__}")


def _set(obj, path: list[str], text: str, full: str):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    key = path[0]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {full!r}{hint}; {type(obj).__name__} has: {', '.join(names)}")
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            raise ConfigError(f"{full} is a group of settings; set one of its keys, e.g. {full}."
                              f"{dataclasses.fields(current)[0].name}=...")
        return dataclasses.replace(obj, **{key: _set(current, path[1:], text, full)})
    if len(path) > 1:
        raise ConfigError(f"unknown config key {full!r}: {'.'.join(path[:1])} is not a group of settings")
    try:
        return dataclasses.replace(obj, **{key: _parse(text, hints[key], full)})
    except ConfigError:
        raise
    except ValueError as e:  # the dataclass's own check of the new value (e.g. a malformed rule table)
        raise ConfigError(f"{full}={text}: {e}") from None


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``["steps=10", "optim.lr=1e-4", ...]`` applied in order."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. steps=100 or optim.lr=1e-5")
        config = _set(config, key.strip().split("."), value.strip(), key.strip())
    return config
