"""Will a model train (or serve) on a slice? Per-device memory from the rule shardings, and for TPU slices the
compiled train step's exact figures, without the accelerator.

``plan("InternVL2_5-8B", chips="v5p-64", rules="fsdp")`` reports per-device bytes of params, gradients, optimizer
state and activations (training) and of params plus KV cache (inference) against the chip's memory, the step's
FLOPs and the MFU a step time needs, and the fewest chips that fit. The command line wraps it
(``internvl-jax plan PRESET --chips v5p-64``; :func:`add_parser`, :func:`run`).

Params, gradients and optimizer state are exact: every array's shard shape under the rules (``jax.eval_shape``,
nothing allocated). Activations are an estimate, per device:

- per layer, the tensors its remat policy keeps for the backward pass, per token of the layer's input
  (``_decoder_terms``, ``_vit_terms``): ``full`` keeps only the layer input (the scan carry); ``dots_no_batch``
  adds the projection outputs (q, k, v, o, MLP); ``dots`` also the attention einsums (scores, probabilities x
  values); ``none`` every intermediate (norms, softmax, the MLP product);
- plus the working set of the backward pass of one layer (all of its intermediates and as many cotangents), for
  the larger of the LLM and the ViT, the float32 logits three times (logits, log-probabilities, their cotangent)
  of one chunk of the loss (``vocab_chunk`` positions of every row, the train step's 1024 by default) and the
  input batch;
- each term divided by the mesh axes its logical axes map to (``batch`` and, under ``fsdp_tp``, heads / MLP /
  vocab over ``tensor``). Attention scores are counted as the batched implementation materialises them
  ([rows, heads, L, L] float32); a fused (splash) kernel would not.

Steps compiled for a target (:func:`train_step`, :func:`forward_step`, :func:`decode_step`) come with abstract
arguments and their shardings, ready for :func:`sharding.topology.compile_for`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from internvl_jax.generate import CACHE_AXES, _step as _decode, init_cache
from internvl_jax.model import InternVL, _dummy_inputs, abstract_params
from internvl_jax.cli import Working, model_config
from train.step import abstract_batch, batch_shardings, train_step_spec

from .mesh import _resolve, make_mesh
from .place import (
    ShardingError, _is_box, _first_indivisible, batch_spec, mesh_axes_size, partition_specs, shardings, working_meshes,
)
from .rules import MESH_AXES, Rules, get_rules
from .topology import (
    GiB, TARGET_ATTENTION, Chip, CompiledStats, Slice, Step, parse_slice, torus_shape, tpu_devices,
)

# optimizer name -> optax transformation (the learning rate does not change shapes or memory)
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(1e-4, weight_decay=0.1),  # two moments per parameter
    "sgd": lambda: optax.sgd(1e-4, momentum=0.9),  # one momentum per parameter
}


@dataclass(frozen=True)
class Optimizer:
    """What a plan trains with: ``tx`` and the trainable mask (None: everything trains)."""

    name: str
    tx: optax.GradientTransformation
    trainable: object = None


def make_optimizer(config, optimizer: str = "adamw", stage: str | None = None) -> Optimizer:
    """A plain optimizer of ``OPTIMIZERS``, or the trainer's optimizer of the train config ``stage`` (its freezing
    rules: frozen parameters hold no optimizer state and get no gradient)."""
    if stage is None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        return Optimizer(optimizer, OPTIMIZERS[optimizer]())
    from train.config import load_train_config, optim_config

    return trainer_optimizer(f"adamw of stage {stage}", optim_config(load_train_config(stage), config), config)


def trainer_optimizer(name: str, ocfg, config) -> Optimizer:
    """The trainer's AdamW of the ``train.optim.OptimConfig`` ``ocfg`` for ``config``'s params, with its trainable
    mask (frozen params: no optimizer state, no gradient)."""
    from train.optim import build_optimizer, trainable_mask

    params = abstract_params(config)
    return Optimizer(name, build_optimizer(ocfg, params, 1000), trainable_mask(ocfg, params))


def with_lora(config, rank: int, stage: str | None = None):
    """``config`` with the adapters of ``internvl-jax train STAGE lora.rank=RANK`` and that run's optimizer
    (adapters and the stage's other trained params train; the towers under adapters are frozen: no gradient, no
    optimizer state). Without ``stage``: LoRA on the ViT and the LLM with the projector trained (the original's
    ``use_backbone_lora`` + ``use_llm_lora``). Returns ``(config, Optimizer)``."""
    from train.config import TrainConfig, load_train_config, lora_rules, lora_targets, optim_config

    base = load_train_config(stage) if stage else TrainConfig(name="vit+llm")
    cfg = dataclasses.replace(base, lora=dataclasses.replace(base.lora, rank=rank))
    if stage and not lora_targets(cfg):
        raise ValueError(f"--lora {rank} with --stage {stage}: the stage freezes the ViT and the LLM, so LoRA has no "
                         "tower to adapt; leave out --stage for adapters on the ViT and the LLM")
    config = config.replace(lora=lora_rules(cfg, config.text.family))
    return config, trainer_optimizer(f"adamw, LoRA r={rank} on {stage or 'the ViT and the LLM'}",
                                     optim_config(cfg, config), config)


REMATS = ("full", "dots_no_batch", "dots", "none")  # most to least recomputation (internvl_jax.layers.REMAT_POLICIES)
_PROJ = {"none", "dots", "dots_no_batch"}  # policies that keep projection (matmul without batch dims) outputs
_EINSUM = {"none", "dots"}  # policies that keep attention einsums (matmuls with batch dims)
_ALL = set(REMATS)
_NONE = {"none"}

MAX_CHIPS = 4096  # the smallest-fitting-slice search stops here


# ------------------------------------------------------------------------------------------------------------
# Target configs and the steps compiled for them
# ------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _boxed_params(config):
    """``abstract_params(config, boxed=True)``, traced once per config (plans evaluate many meshes)."""
    return abstract_params(config, boxed=True)


def target_config(preset, *, dtype: str = "bfloat16", remat: str = "full", platform: str = "tpu"):
    """A preset (name, checkpoint folder or config) with params and compute in ``dtype``, the remat policy and the attention
    implementation compiled for ``platform`` (``sharding.topology.TARGET_ATTENTION``)."""
    config = model_config(preset) if isinstance(preset, str) else preset
    return config.replace(dtype=dtype, param_dtype=dtype, remat=remat, attention_impl=TARGET_ATTENTION[platform])


def default_tiles(config, seq_len: int) -> int:
    """Image tiles per row when none are given: the release's tile budget (plus thumbnail), at most as many as
    fill half of the sequence with image tokens."""
    return min(config.max_dynamic_patch + config.use_thumbnail, seq_len // 2 // config.tokens_per_tile)


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch.get("pixel_values"), batch.get("tile_mask"))


def forward_step(config, mesh: Mesh, rules: str | Rules, *, rows: int, seq_len: int, tiles: int) -> Step:
    """``(params, batch) -> logits`` float32 [rows, seq_len, vocab], sharded by the rules."""
    boxed = _boxed_params(config)
    batch = abstract_batch(config, rows, seq_len, tiles)
    model = InternVL(config)
    out = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length", "vocab"), get_rules(rules)))
    return Step(lambda p, b: _logits(model, p, b), (nn.unbox(boxed), batch),
                (shardings(boxed, mesh, rules), batch_shardings(batch, mesh, rules)), out)


def train_step(config, mesh: Mesh, rules: str | Rules, *, rows: int, seq_len: int, tiles: int,
               optimizer: str | Optimizer = "adamw", mpo: str | None = None) -> Step:
    """The trainer's step (:func:`train.step.make_train_step`: weighted cross entropy over the global batch,
    gradients, an optimizer update) with ``(state, batch)`` abstract and sharded by the rules, state donated;
    with ``mpo`` ("copy" | "file"), the MPO step (:func:`train.preference_step.make_preference_step`, one pair
    per row) with its frozen reference copy or stored reference log-probs."""
    opt = optimizer if isinstance(optimizer, Optimizer) else make_optimizer(config, optimizer)
    if mpo:
        from train.preference import MPOConfig
        from train.preference_step import preference_step_spec

        return preference_step_spec(config, mesh, rules, opt.tx, MPOConfig(reference=mpo, max_pairs=1), rows=rows,
                                    seq_len=seq_len, tiles=tiles, trainable=opt.trainable)
    return train_step_spec(config, mesh, rules, opt.tx, rows=rows, seq_len=seq_len, tiles=tiles,
                           trainable=opt.trainable)


def abstract_cache(config, rows: int, length: int):
    """The KV cache of :func:`internvl_jax.generate.init_cache` as a boxed abstract tree (logical axes
    ``CACHE_AXES`` on every buffer)."""
    return jax.tree_util.tree_map(lambda x: nn.LogicallyPartitioned(x, CACHE_AXES),
                                  jax.eval_shape(lambda: init_cache(config, rows, length)))


def decode_step(config, mesh: Mesh, rules: str | Rules, *, rows: int, cache_len: int) -> Step:
    """One greedy generation step (``internvl_jax.generate``'s decode step on the generation layout):
    ``(params, start [rows], slot, token [rows], pos [rows], cache, rng) -> (token, pos, cache, rng)``, the cache
    donated and updated in place."""
    model = InternVL(config, unrolled=True)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_dummy_inputs(config)))["params"]
    cache = abstract_cache(config, rows, cache_len)
    row = jax.ShapeDtypeStruct((rows,), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    row_sh, rep = NamedSharding(mesh, batch_spec(1, rules)), NamedSharding(mesh, PartitionSpec())
    cache_sh = shardings(cache, mesh, rules)
    greedy = (False, 1.0, 0, 1.0)  # generate's sampling tuple: do_sample, temperature, top_k, top_p

    def step(params, start, slot, token, pos, cache, rng):
        return _decode(model, params, start, slot, token, pos, cache, rng, greedy)

    return Step(step, (nn.unbox(boxed), row, scalar, row, row, nn.unbox(cache), rng),
                (shardings(boxed, mesh, rules), row_sh, rep, row_sh, row_sh, cache_sh, rep),
                (row_sh, row_sh, cache_sh, rep), donate=(5,))


# ------------------------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------------------------

def _divisor(logical: tuple, rules: Rules, sizes: dict[str, int]) -> int:
    """How many ways an array with these logical axes is split on a mesh of ``sizes``."""
    return math.prod(mesh_axes_size(sizes, axes) for axes in nn.logical_to_mesh_axes(logical, rules))


def tree_bytes_per_device(boxed, rules: Rules, sizes: dict[str, int]) -> int:
    """Exact bytes one device holds of a boxed abstract tree: the sum of its shard sizes (dimensions divide,
    checked before)."""
    leaves = jax.tree_util.tree_leaves(nn.unbox(boxed))
    specs = jax.tree_util.tree_leaves(partition_specs(boxed, rules), is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = 0
    for leaf, spec in zip(leaves, specs):
        split = [math.prod(sizes[a] for a in ((ax,) if isinstance(ax, str) else ax)) if ax else 1 for ax in spec]
        total += math.prod(d // s for d, s in zip(leaf.shape, split)) * leaf.dtype.itemsize
    return total


def _decoder_terms(t, length: int):
    """Per token of one decoder layer: (logical axes after batch and length, elements, float32, policies that
    keep it for the backward pass)."""
    q, kv, e, m = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.hidden_size, t.intermediate_size
    return (
        (("embed",), e, False, _ALL),  # the layer input (scan carry)
        (("embed",), 2 * e, False, _NONE),  # the two norm outputs
        (("heads", "head_dim"), q, False, _PROJ),  # q
        (("kv_heads", "head_dim"), 2 * kv, False, _PROJ),  # k, v
        (("heads", None), t.num_heads * length, True, _EINSUM),  # scores
        (("heads", None), t.num_heads * length, True, _NONE),  # softmax
        (("heads", "head_dim"), q, False, _EINSUM),  # probabilities x values
        (("embed",), 2 * e, False, _PROJ),  # o_proj, down_proj outputs
        (("mlp",), 2 * m, False, _PROJ),  # gate, up
        (("mlp",), m, False, _NONE),  # silu(gate) * up
    )


def _vit_terms(v, tokens: int):
    """As :func:`_decoder_terms`, per token of one InternViT layer (``tokens`` per tile)."""
    w, m = v.hidden_size, v.intermediate_size
    return (
        (("vit_embed",), w, False, _ALL),  # the layer input (scan carry)
        (("vit_embed",), 4 * w, False, _NONE),  # two norms, two LayerScale products
        (("vit_heads", None), 3 * w, False, _PROJ),  # qkv
        (("vit_heads", None), v.num_heads * tokens, True, _EINSUM),  # scores
        (("vit_heads", None), v.num_heads * tokens, True, _NONE),  # softmax
        (("vit_heads", None), w, False, _EINSUM),  # probabilities x values
        (("vit_embed",), 2 * w, False, _PROJ),  # attention projection, fc2 outputs
        (("vit_mlp",), m, False, _PROJ),  # fc1
        (("vit_mlp",), m, False, _NONE),  # gelu
    )


def _stack_bytes(terms, layers: int, tokens: int, itemsize: int, remat: str, rules, sizes) -> tuple[int, int]:
    """(bytes the layers keep for the backward pass, bytes of one layer's backward working set) per device for
    ``tokens`` global tokens."""
    kept = work = 0
    for axes, elements, f32, policies in terms:
        b = tokens * elements * (4 if f32 else itemsize) // _divisor(("batch", "length") + axes, rules, sizes)
        kept += b * (remat in policies)
        work += 2 * b  # the intermediate and its cotangent
    return layers * kept, work


@dataclass(frozen=True)
class Estimate:
    """Estimated per-device bytes (params, gradients and optimizer state exact; activations an estimate, see the
    module docstring) and model FLOPs per device of one training step."""

    params: int
    grads: int
    opt_state: int
    activations: int
    inputs: int
    kv_cache: int
    model_flops: float
    reference: int = 0  # MPO with a frozen copy: the reference's params

    @property
    def train(self) -> int:
        return self.params + self.grads + self.opt_state + self.activations + self.inputs + self.reference

    @property
    def inference(self) -> int:
        return self.params + self.kv_cache


def model_flops(config, rows: int, seq_len: int, tiles: int, devices: int) -> float:
    """Model FLOPs of one training step per device: 6 per weight per token (forward and backward) plus the
    attention matmuls (12 x layers x width x context per token), for the LLM and the ViT; no rematerialisation."""
    t, v = config.text, config.vision
    llm = t.num_layers * (2 * t.hidden_size * (t.num_heads + t.num_kv_heads) * t.head_dim
                          + 3 * t.hidden_size * t.intermediate_size) + t.hidden_size * t.vocab_size
    vit_tokens = (config.image_size // v.patch_size) ** 2 + 1
    vit_layers = config.vision_layers_used
    vit = vit_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    text_tokens, image_tokens = rows * seq_len, rows * tiles * vit_tokens
    total = (6 * llm + 12 * t.num_layers * t.num_heads * t.head_dim * seq_len) * text_tokens
    total += (6 * vit + 12 * vit_layers * v.hidden_size * vit_tokens) * image_tokens
    return total / devices


def _jaxpr_matmul_flops(jaxpr) -> float:
    """FLOPs of every ``dot_general`` in a jaxpr (2 per multiply-add), scan bodies counted ``length`` times and
    nested jaxprs (jit, remat, custom derivatives) followed."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            continue
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    total += times * _jaxpr_matmul_flops(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub)
    return total


def program_flops(step: Step) -> float:
    """Matmul FLOPs of one call of a step, for all devices together, counted on its traced program: the
    rematerialised forward passes included, every scanned layer counted. (XLA's ``cost_analysis`` counts a
    loop body once, so for scanned layers it reports about one layer's share.)"""
    return _jaxpr_matmul_flops(jax.make_jaxpr(step.fn)(*step.args).jaxpr)


def estimate(config, sizes: dict[str, int], rules: str | Rules, *, rows: int, seq_len: int, tiles: int,
             optimizer: str | Optimizer = "adamw", mpo: str | None = None,
             vocab_chunk: int | None = 1024) -> Estimate:
    """Per-device bytes of training and inference for ``config`` (its dtype and remat) on a mesh of ``sizes``
    with ``rows`` global rows of ``seq_len`` tokens and ``tiles`` image tiles each; ``mpo="copy"`` adds the
    frozen reference's params (sharded like the policy's); ``vocab_chunk``: the positions whose logits the loss
    makes at once (the train step's default; None: the whole row). Raises :class:`~sharding.ShardingError` when
    the mesh does not divide a parameter or the batch."""
    rules = get_rules(rules)
    boxed = _boxed_params(config)
    _check_divides(boxed, rules, sizes)
    shards = _divisor(("batch",), rules, sizes)
    if rows % shards:
        raise ShardingError(f"{rows} rows do not divide over the {shards} batch shards of mesh {sizes}")
    params = tree_bytes_per_device(boxed, rules, sizes)
    optimizer = optimizer if isinstance(optimizer, Optimizer) else make_optimizer(config, optimizer)
    opt = tree_bytes_per_device(jax.eval_shape(optimizer.tx.init, boxed), rules, sizes)
    grads = params
    if optimizer.trainable is not None:  # frozen parameters get no gradient
        grads = tree_bytes_per_device(jax.tree_util.tree_map(lambda x, t: x if t else None, boxed,
                                                             optimizer.trainable, is_leaf=_is_box), rules, sizes)
    item = jnp.dtype(config.dtype).itemsize
    t, v = config.text, config.vision
    vit_tokens = (config.image_size // v.patch_size) ** 2 + 1
    llm_kept, llm_work = _stack_bytes(_decoder_terms(t, seq_len), t.num_layers, rows * seq_len, item,
                                      config.remat, rules, sizes)
    vit_kept, vit_work = (0, 0) if not tiles else _stack_bytes(
        _vit_terms(v, vit_tokens), config.vision_layers_used, rows * tiles * vit_tokens, item, config.remat, rules,
        sizes)
    logit_positions = seq_len if vocab_chunk is None else min(seq_len, vocab_chunk)
    logits = 3 * rows * logit_positions * t.vocab_size * 4 // _divisor(("batch", "length", "vocab"), rules, sizes)
    batch = abstract_batch(config, rows, seq_len, tiles)
    inputs = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values()) // shards
    cache = tree_bytes_per_device(abstract_cache(config, rows, seq_len), rules, sizes)
    return Estimate(params, grads, opt, llm_kept + vit_kept + max(llm_work, vit_work) + logits, inputs, cache,
                    model_flops(config, rows, seq_len, tiles, math.prod(sizes.values())),
                    reference=params if mpo == "copy" else 0)


def _check_divides(boxed, rules: Rules, sizes: dict[str, int]) -> None:
    problem = _first_indivisible(boxed, partition_specs(boxed, rules), sizes)
    if problem:
        ok = working_meshes(boxed, math.prod(sizes.values()), rules)
        hint = f"; meshes that work: {', '.join(map(str, ok))}" if ok else "; no mesh of this size works"
        raise ShardingError(f"{problem} does not divide on mesh {sizes}{hint}")


# ------------------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------------------

def parse_mesh(mesh: str | dict | None, devices: int, boxed, rules: Rules) -> dict[str, int]:
    """``{"data": .., "fsdp": .., "tensor": ..}`` from a dict, a ``"data,fsdp,tensor"`` string (one size may be -1)
    or None (the most sharded mesh on which every parameter divides)."""
    if mesh is None:
        found = working_meshes(boxed, devices, rules, limit=1)
        if not found:
            raise ShardingError(f"no mesh of {devices} devices divides every parameter under these rules")
        return found[0]
    if isinstance(mesh, str):
        try:
            mesh = [int(s) for s in mesh.split(",")]
        except ValueError:
            raise ValueError(f"mesh {mesh!r}: give three sizes data,fsdp,tensor, e.g. 1,32,1") from None
        if len(mesh) != 3:
            raise ValueError(f"mesh {mesh}: give three sizes data,fsdp,tensor, e.g. 1,32,1")
    sizes = [mesh.get(a, 1) for a in MESH_AXES] if isinstance(mesh, dict) else list(mesh)
    return dict(zip(MESH_AXES, _resolve(sizes, devices, "mesh")))


@dataclass(frozen=True)
class Plan:
    """The figures of :func:`plan`; ``lines()`` is the report, ending with ``per-device bytes: N`` (the compiled
    figure where there is one) and ``verdict: fits`` / ``verdict: does not fit``."""

    preset: str
    config: object
    target: Slice
    rules: str
    mesh: dict[str, int]
    rows: int
    seq_len: int
    tiles: int
    optimizer: str
    estimate: Estimate
    compiled: CompiledStats | None
    compile_seconds: float | None
    program_flops: float | None  # per device, see program_flops()
    step_time: float | None
    smallest: tuple[Slice, dict[str, int], Estimate] | None
    mpo: str | None = None

    @property
    def per_device_bytes(self) -> int:
        """The training step's per-device bytes: compiled where compiled, else estimated."""
        return self.compiled.total if self.compiled else self.estimate.train

    @property
    def fits(self) -> bool:
        return self.per_device_bytes <= self.target.chip.memory

    def _warnings(self) -> list[str]:
        positions = self.config.text.max_position_embeddings
        if self.seq_len <= positions:
            return []
        return [f"warning: {self.seq_len} tokens per row exceed the model's {positions} positions "
                f"(max_position_embeddings); use --seq-len {positions} or less"]

    def lines(self) -> list[str]:
        chip, e, c = self.target.chip, self.estimate, self.compiled
        cap = chip.memory
        pct = lambda b: f"{_gib(b)} ({100 * b / cap:.0f}%)"  # noqa: E731
        per_shard = self.rows // _divisor(("batch",), get_rules(self.rules), self.mesh)
        torus = f", torus {self.target.topology.split(':')[1]}" if self.target.topology else ""
        out = [
            f"plan: {self.preset}, {self.config.dtype} params and compute, {self.optimizer}, remat {self.config.remat}"
            + (f", MPO step (reference: {'frozen copy' if self.mpo == 'copy' else 'log-probs from file'})"
               if self.mpo else ""),
            f"target: {self.target.name} ({self.target.chips} x {chip.name}{torus}, {_gib(cap)} each), "
            f"mesh {self.mesh}, rules {self.rules}",
            f"batch: {self.rows} rows x {self.seq_len} tokens ({per_shard} per batch shard), {self.tiles} tiles per row",
            *self._warnings(),
            "per device (estimate):",
            f"  params             {_gib(e.params)}",
            f"  gradients          {_gib(e.grads)}",
            f"  optimizer state    {_gib(e.opt_state)}",
            *([f"  frozen reference   {_gib(e.reference)}"] if self.mpo == "copy" else []),
            f"  activations        {_gib(e.activations)}",
            f"  inputs             {_gib(e.inputs)}",
            f"  training total     {pct(e.train)}",
            f"  inference: params + KV cache of {self.seq_len} tokens = {_gib(e.params)} + {_gib(e.kv_cache)} = "
            f"{pct(e.inference)}: {'fits' if e.inference <= cap else 'does not fit'}",
        ]
        if c:
            out.append(f"compiled train step ({self.target.topology}, {self.compile_seconds:.0f} s): arguments "
                       f"{_gib(c.argument_bytes)}, outputs {_gib(c.output_bytes)} ({_gib(c.alias_bytes)} aliased), "
                       f"temporaries {_gib(c.temp_bytes)}, code {_gib(c.code_bytes)}: total {pct(c.total)}, "
                       f"{c.total / e.train:.2f}x the estimate")
        flops = f"step FLOPs per device: model {e.model_flops:.3e} (6 x weights x tokens + attention)"
        if c:
            flops += (f"; traced program {self.program_flops:.3e} (with rematerialisation); XLA cost analysis "
                      f"{c.flops:.3e} (counts a scanned layer stack once)")
        out.append(flops)
        if self.step_time:
            peak = self.step_time * chip.peak_flops
            line = f"a {self.step_time:g} s step needs {100 * e.model_flops / peak:.1f}% MFU"
            if c:
                line += f" ({100 * self.program_flops / peak:.1f}% hardware FLOP utilisation)"
            out.append(line + f" at {chip.peak_flops:.3g} FLOP/s per {chip.name}")
        if self.smallest:
            s, sizes, est = self.smallest
            out.append(f"smallest fitting: {s.name} ({s.chips} chip{'s' * (s.chips > 1)}), mesh {sizes}, {pct(est.train)} estimated")
        else:
            out.append(f"smallest fitting: none up to {MAX_CHIPS} {chip.name} chips")
        out += [f"per-device bytes: {self.per_device_bytes}", f"verdict: {'fits' if self.fits else 'does not fit'}"]
        return out


def _gib(b: int) -> str:
    """Bytes for the report: GiB, or MiB below 1 GiB (a frozen stage's optimizer state is a few MiB per device)."""
    return f"{b / GiB:.2f} GiB" if b >= GiB or b == 0 else f"{b / 2**20:.1f} MiB"


def _smallest(config, chip: Chip, rules: Rules, rows: int | None, rows_per_shard: int, seq_len: int, tiles: int,
              optimizer: Optimizer, boxed, mpo: str | None = None):
    """The fewest power-of-two chips (and the most sharded mesh there) whose estimate fits: ``rows`` global rows
    if given, else ``rows_per_shard`` per batch shard."""
    n = 1
    while n <= MAX_CHIPS:
        for sizes in working_meshes(boxed, n, rules, limit=1):
            shard_rows = rows if rows is not None else rows_per_shard * _divisor(("batch",), rules, sizes)
            try:
                est = estimate(config, sizes, rules, rows=shard_rows, seq_len=seq_len, tiles=tiles,
                               optimizer=optimizer, mpo=mpo)
            except ShardingError:  # the batch does not divide here
                continue
            if est.train <= chip.memory:
                return Slice(chip, n, torus_shape(chip, n) if chip.torus else None), sizes, est
        n *= 2
    return None


def _no_progress(message: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def plan(preset: str, chips: str = "v5p-64", mesh: str | dict | None = None, rules: str = "fsdp",
         seq_len: int = 2048, batch: int | None = None, tiles: int | None = None, remat: str = "full",
         dtype: str = "bfloat16", optimizer: str = "adamw", step_time: float | None = None,
         compile: bool = True, stage: str | None = None, mpo: str | None = None, lora: int = 0,
         progress: Callable[[str], contextlib.AbstractContextManager] | None = None) -> Plan:
    """Plan training (and inference) of ``preset`` on the slice ``chips`` (e.g. ``v5p-64``, ``v5p:4x4x2``,
    ``v5e-16``, ``h100-8``; see :mod:`sharding.topology`).

    mesh: dict or ``"data,fsdp,tensor"`` (default: the most sharded that divides every parameter); rules: a
    preset of ``sharding.RULES``; batch: global rows (default one per batch shard); tiles: image tiles per row
    (default :func:`default_tiles`); step_time: seconds, for the MFU it needs. With ``compile`` (TPU slices
    only), the real train step is compiled for the slice's abstract devices and its memory analysis reported;
    ``progress(message)``, a context manager, is entered around that compile (minutes for a large model: the
    command line shows the message and the elapsed time). mpo: "copy" | "file" plans the MPO step (one pair per
    row: ``seq_len`` holds its chosen and rejected sequences) with a frozen reference copy or stored log-probs.
    lora: a rank > 0 plans LoRA fine-tuning (:func:`with_lora`: on the towers ``stage`` trains, or the ViT and
    the LLM).
    """
    if mpo not in (None, "copy", "file"):
        raise ValueError(f"mpo is {mpo!r}: expected copy or file")
    if remat not in REMATS:
        raise ValueError(f"unknown remat policy {remat!r}; use one of {', '.join(REMATS)}")
    for name, value, least in (("seq_len", seq_len, 1), ("batch", batch, 1), ("tiles", tiles, 0)):
        if value is not None and value < least:
            raise ValueError(f"{name} is {value}: expected {'a positive number' if least else '0 or more'}")
    if step_time is not None and not step_time > 0:
        raise ValueError(f"step_time is {step_time}: expected positive seconds")

    target = parse_slice(chips)
    table = get_rules(rules)
    config = target_config(preset, dtype=dtype, remat=remat, platform=target.chip.platform)
    if lora < 0:
        raise ValueError(f"lora is {lora}: expected a rank > 0, or 0 for none")
    if lora:
        config, optimizer = with_lora(config, lora, stage)
    else:
        optimizer = make_optimizer(config, optimizer, stage)
    boxed = _boxed_params(config)
    sizes = parse_mesh(mesh, target.chips, boxed, table)
    shards = _divisor(("batch",), table, sizes)
    rows = shards if batch is None else batch
    tiles = default_tiles(config, seq_len) if tiles is None else tiles
    if tiles * config.tokens_per_tile > seq_len:
        raise ValueError(f"{tiles} tiles x {config.tokens_per_tile} image tokens do not fit in {seq_len} tokens")
    est = estimate(config, sizes, table, rows=rows, seq_len=seq_len, tiles=tiles, optimizer=optimizer, mpo=mpo)
    compiled = seconds = flops = None
    if compile and target.chip.torus:
        message = (f"compiling the train step for {target.name} ({target.topology}, mesh {sizes}), {rows} rows x "
                   f"{seq_len} tokens")
        with (progress or _no_progress)(message):
            m = make_mesh(*(sizes[a] for a in MESH_AXES), devices=tpu_devices(target.topology))
            t0 = time.perf_counter()
            step = train_step(config, m, table, rows=rows, seq_len=seq_len, tiles=tiles, optimizer=optimizer,
                              mpo=mpo)
            compiled = step.compile(m, table)[1]
            seconds = time.perf_counter() - t0
            flops = program_flops(step) / target.chips
    smallest = _smallest(config, target.chip, table, batch, max(1, rows // shards), seq_len, tiles, optimizer, boxed,
                         mpo)
    return Plan(preset, config, target, rules, sizes, rows, seq_len, tiles, optimizer.name, est, compiled, seconds,
                flops, step_time, smallest, mpo)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` command to an argparse ``add_subparsers()`` object; it calls :func:`run`."""
    p = subparsers.add_parser(
        "plan", help="per-device memory and FLOPs of training a preset on a TPU slice or GPUs (allocates nothing)")
    p.add_argument("preset", help="a model preset (e.g. InternVL2_5-8B) or a checkpoint folder with config.json")
    p.add_argument("--chips", default="v5p-64",
                   help="the slice: v5p-64, v5p:4x4x2, v5e-16, v6e-8, v4-32, h100-8, ... (default: v5p-64)")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 1,32,1 (default: the most sharded)")
    p.add_argument("--rules", default="fsdp", choices=["dp", "fsdp", "fsdp_tp"], help="sharding rules (default: fsdp)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default: 2048)")
    p.add_argument("--batch", type=int, default=None, help="global rows per step (default: one per batch shard)")
    p.add_argument("--tiles", type=int, default=None,
                   help="image tiles per row (default: the release's budget, at most half the sequence)")
    p.add_argument("--remat", default="full", choices=list(REMATS), help="remat policy (default: full)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="params and compute dtype (default: bfloat16)")
    p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="optimizer (default: adamw)")
    p.add_argument("--stage", default=None,
                   help="a train config (e.g. internvl2_5_stage1): the trainer's optimizer with its frozen parameters, "
                        "which hold no optimizer state and get no gradients")
    p.add_argument("--mpo", default=None, choices=["copy", "file"],
                   help="plan the MPO step (a pair per row) with a frozen reference copy, or reference log-probs "
                        "from a pre-pass file")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="plan LoRA fine-tuning at this rank: adapters on the towers --stage trains (default: the ViT "
                        "and the LLM, projector trained), their base weights frozen")
    p.add_argument("--step-time", type=float, default=None, help="target seconds per step: prints the MFU it needs")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="estimate only (TPU slices otherwise compile the train step ahead of time)")
    p.set_defaults(func=run)
    return p


def run(args) -> None:
    """Print the plan of parsed ``plan`` arguments (the compile's progress on stderr)."""
    result = plan(args.preset, chips=args.chips, mesh=args.mesh, rules=args.rules, seq_len=args.seq_len,
                  batch=args.batch, tiles=args.tiles, remat=args.remat, dtype=args.dtype, optimizer=args.optimizer,
                  stage=args.stage, step_time=args.step_time, compile=args.compile, mpo=args.mpo, lora=args.lora,
                  progress=Working)
    print("\n".join(result.lines()))
